"""The GPU check: the vLLM backend end to end on one GPU, in a few minutes — run this first on a GPU node.

Needs only `pip install 'mergetune[vllm]'` and one CUDA GPU; everything is offline. It builds
(or takes, `--zoo`) the demo zoo, starts vLLM through the backend (worker extension, CUDA IPC
push), loads an HF transformers reference on the same GPU, and runs one trial per method
(linear, task_arithmetic, ties, dare_ties, della, ota). Each trial merges the recipe into vLLM
and into the HF model from the same resident set, then checks:

- lm-eval exact match of every zoo task on vLLM equals the HF backend's (same merged weights);
- the push changed vLLM's greedy output (vs the previous trial);
- no stale KV: prompts cached before the push answer the same right after it as after a
  second confirmed reset (the push's own reset worked);
- parameters were updated in place (vLLM's parameter addresses never change, so CUDA graphs
  and compiled code stay valid).

Once: CPU and CUDA DARE masks are equal. Printed: push time per GiB, merge time per method,
the memory plan's prediction vs `torch.cuda.max_memory_allocated` (this process). Writes
JSON to benchmarks/results/gpu_check.json; exits 1 on any mismatch, 2 when it cannot run.

    python benchmarks/gpu_check.py                  # builds the demo zoo into --work (4 min on 1 CPU thread here)
    python benchmarks/gpu_check.py --zoo zoo-demo   # an existing zoo
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "della", "ota")
BLOCK_TOKENS = 16  # vLLM's default KV block on CUDA: only whole blocks are cached


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=None, help="an existing zoo (mergetune zoo build); default: build the demo zoo")
    parser.add_argument("--work", type=Path, default=Path("gpu-check"), help="where a built zoo goes")
    parser.add_argument("--limit", type=int, default=64, help="items per task and trial")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"), help="engine and HF dtype")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="vLLM's share of the GPU")
    parser.add_argument("--bucket-mib", type=int, default=16, help="push bucket (small, so a push spans several)")
    parser.add_argument(
        "--max-score-diff", type=float, default=0.0, help="allowed |vLLM − HF| exact match per task (bf16 ties can flip an item)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    return parser.parse_args(argv)


def trial_recipes(models: dict[str, str], seed: int) -> list[tuple[str, dict[str, Any]]]:
    """One recipe per method over all experts, with seeded random weights (recipe dicts, as the driver sends)."""
    rng = random.Random(seed)
    experts = [name for name in models if name != "base"]
    recipes = []
    for method in METHODS:
        weights = {expert: round(rng.uniform(0.2, 1.0), 3) for expert in experts}
        rule: dict[str, Any] = {"match": "*", "method": method, "weights": weights}
        if method in ("ties", "dare_ties", "della"):
            rule["params"] = {"density": 0.5}
        recipes.append((method, {"models": models, "base": "base", "rules": [rule]}))
    return recipes


def cache_prompts(count: int, seed: int, max_new_tokens: int, max_model_len: int) -> list[str]:
    """Zoo-style prompts of at least two whole KV blocks (so vLLM caches them), short enough to answer."""
    rng = random.Random(seed)
    letters = max_model_len - max_new_tokens - len("reverse =") - 2  # BOS, and one token to spare
    assert letters >= 2 * BLOCK_TOKENS, "the model's context is too short for two cached blocks"
    return [f"reverse {''.join(rng.choice(string.ascii_lowercase) for _ in range(letters))}=" for _ in range(count)]


DARE_NAME = "model.layers.0.mlp.up_proj.weight"


def dare_masks(device: str, compiled: bool, shape: tuple[int, int] = (513, 257), density: float = 0.3, seed: int = 0) -> list:
    """The entries DARE (dare_linear) and DELLA keep of one expert's τ on `device`, as CPU bool tensors: the
    methods run as a worker runs them (counter-based draws, eager or compiled kernels)."""
    import torch

    from mergetune.merge.kernels import EAGER, Kernels
    from mergetune.merge.methods import TensorInputs, get_method

    tau = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    kernels = Kernels(compiled=True) if compiled else EAGER
    masks = []
    for method, params in (("dare_linear", {"density": density, "rescale": False}), ("della", {"density": density, "epsilon": 0.1, "rescale": False})):
        x = TensorInputs(name=DARE_NAME, base=torch.zeros_like(tau), weights=[1.0], deltas_given=[tau], seed=seed, kernels=kernels)
        masks.append((get_method(method)(x, **params) != 0).cpu())
    return masks


def dare_masks_match(device: str) -> bool:
    """DARE's and DELLA's masks on `device` (eager and compiled) equal the CPU's eager ones, entry for entry."""
    import torch

    reference = dare_masks("cpu", compiled=False)
    return all(torch.equal(a, b) for compiled in (False, True) for a, b in zip(reference, dare_masks(device, compiled)))


def score_mismatches(method: str, vllm: dict[str, float], hf: dict[str, float], tolerance: float = 0.0) -> list[str]:
    """One line per task whose exact match differs between the backends by more than `tolerance` (or is missing)."""
    lines = []
    for task in sorted(set(vllm) | set(hf)):
        if task not in vllm or task not in hf or abs(vllm[task] - hf[task]) > tolerance:
            lines.append(f"{method}: {task} exact match vLLM {vllm.get(task)} != HF {hf.get(task)}")
    return lines


def planned_peak_bytes(modelset: Any, methods: list[str], dtype: str, bucket_bytes: int, gpu_bytes: int) -> int:
    """The memory plan's prediction of this process's peak CUDA memory: the resident inputs (device
    placement), the merge workspace of the worst method, the push bucket, and the HF reference model
    with a scoring batch's activations (vLLM's own memory lives in its engine process, not counted here)."""
    import torch

    from mergetune.merge.memory_plan import Engine, Machine, MethodUse, plan_memory

    machine = Machine(device="cuda", gpu_bytes=gpu_bytes, host_bytes=2**40, workers_per_node=1)
    uses = [MethodUse(m, ((("density", 0.5),),) if m in ("ties", "dare_ties", "della") else ((),)) for m in methods]
    ours = plan_memory(modelset, uses, Engine("vllm", dtype=getattr(torch, dtype)), machine, "device").per_worker
    hf = plan_memory(modelset, uses, Engine("hf", dtype=getattr(torch, dtype)), machine, "device").per_worker
    return ours["resident_inputs"] + ours["workspace"] + max(bucket_bytes, ours["weight_transfer"]) + hf["engine"] + hf["eval_activations"]


def gib(nbytes: float) -> float:
    return nbytes / 2**30


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The printed report: one line per trial, then push rate, memory and the verdict."""
    lines = [f"{'method':<16} {'merge s':>8} {'push s':>8} {'push MiB':>9} {'buckets':>7}  exact match vLLM | HF"]
    for trial in results["trials"]:
        scores = " ".join(f"{task}={trial['vllm'][task]:.3f}|{trial['hf'].get(task, float('nan')):.3f}" for task in sorted(trial["vllm"]))
        lines.append(
            f"{trial['method']:<16} {trial['merge_s']:>8.3f} {trial['push']['seconds']:>8.3f} "
            f"{trial['push']['bytes'] / 2**20:>9.1f} {trial['push']['buckets']:>7}  {scores}"
        )
    pushed = sum(t["push"]["bytes"] for t in results["trials"])
    seconds = sum(t["push"]["seconds"] for t in results["trials"])
    lines.append(f"push: {seconds / max(gib(pushed), 1e-12):.2f} s/GiB over {gib(pushed):.3f} GiB ({results['transport']})")
    plan = results["memory"]["planned_bytes"]
    lines.append(
        f"memory: plan {gib(plan):.2f} GiB, "
        f"torch.cuda.max_memory_allocated {gib(results['memory']['max_allocated_bytes']):.2f} GiB "
        f"(of which the HF reference model {gib(results['memory']['hf_model_bytes']):.2f} GiB)"
    )
    lines.append(f"DARE masks CPU == CUDA: {results['dare_masks_match']}")
    lines.extend(f"MISMATCH {line}" for line in results["mismatches"])
    lines.append("gpu check: OK" if not results["mismatches"] else f"gpu check: {len(results['mismatches'])} mismatches")
    return lines


def vllm_greedy(backend: Any, prompts: list[str], max_tokens: int) -> list[str]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=["\n"])
    return [out.outputs[0].text for out in backend.llm.generate(prompts, params, use_tqdm=False)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mergetune.evaluators.base import HFBackend, build_evaluator
    from mergetune.evaluators.vllm import VLLMBackend
    from mergetune.evaluators.vllm_push import reset_prefix_cache_confirmed, rpc
    from mergetune.merge.modelset import ModelSet
    from mergetune.merge.resident import ResidentModelSet
    from mergetune.merge.recipe import Recipe
    from mergetune.zoo.build import build_zoo

    zoo = args.zoo
    if zoo is None:
        zoo = args.work / "zoo-demo"
        if not (zoo / "zoo.json").is_file():
            build_zoo(zoo, "demo", seed=args.seed)
    manifest = json.loads((zoo / "zoo.json").read_text())
    models = {"base": str(zoo / manifest["base"]), **{name: str(zoo / path) for name, path in manifest["experts"].items()}}
    max_model_len = int(json.loads((zoo / manifest["base"] / "config.json").read_text())["max_position_embeddings"])
    bucket_bytes = args.bucket_mib * 2**20
    mismatches: list[str] = []

    # The engine first (it sizes its KV cache from the free memory), then the resident set and the reference.
    started = time.perf_counter()
    # One BOS on both backends, as the zoo's models were trained (lm-eval's models decide it each their own way otherwise).
    lm_eval_args = {"add_bos_token": True}
    model_args = {"dtype": args.dtype, "gpu_memory_utilization": args.gpu_memory_utilization, "max_model_len": max_model_len,
                  "enable_prefix_caching": True, "seed": args.seed, **lm_eval_args}  # fmt: skip
    vllm = VLLMBackend.from_pretrained(models["base"], model_args, "auto", device="cuda", bucket_bytes=bucket_bytes)
    engine_start_s = time.perf_counter() - started
    modelset = ModelSet.from_recipe(Recipe.from_dict(trial_recipes(models, args.seed)[0][1]))
    resident = ResidentModelSet.load(modelset, device="cuda")
    before_hf = torch.cuda.memory_allocated()
    hf = HFBackend.from_pretrained(models["base"], "cuda", dtype=getattr(torch, args.dtype))
    hf_model_bytes = torch.cuda.memory_allocated() - before_hf
    evaluators = {
        name: build_evaluator(
            {"kind": "lm_eval", "backend": name, "zoo": str(zoo), "limit": args.limit, "batch_size": 64, "model_args": lm_eval_args}
        )
        for name in ("vllm", "hf")
    }
    prompts = cache_prompts(16, args.seed, 13, max_model_len)
    (storage,) = rpc(vllm.llm, "mergetune_parameter_storage")
    torch.cuda.reset_peak_memory_stats()

    trials, previous = [], vllm_greedy(vllm, prompts, 13)  # the base model's answers, now cached
    for method, recipe_dict in trial_recipes(models, args.seed):
        recipe = Recipe.from_dict(recipe_dict)
        t0 = time.perf_counter()
        resident.merge_into(recipe, vllm.weight_sink(), seed=args.seed)
        merge_s = time.perf_counter() - t0
        push = dict(vllm.last_push)
        resident.merge_into(recipe, hf.weight_sink(), seed=args.seed)
        after_push = vllm_greedy(vllm, prompts, 13)  # served from the cache if the push's reset failed
        reset_prefix_cache_confirmed(vllm.llm, 5, 0.1)
        fresh = vllm_greedy(vllm, prompts, 13)
        if after_push != fresh:
            mismatches.append(f"{method}: stale KV: {sum(a != b for a, b in zip(after_push, fresh))} prompts answered from the old weights")
        if fresh == previous:
            mismatches.append(f"{method}: the push did not change any greedy output")
        if rpc(vllm.llm, "mergetune_parameter_storage") != [storage]:
            mismatches.append(f"{method}: vLLM's parameters moved (not updated in place)")
        scores = {name: evaluator.evaluate(backend) for (name, evaluator), backend in zip(evaluators.items(), (vllm, hf))}
        mismatches += score_mismatches(method, scores["vllm"], scores["hf"], args.max_score_diff)
        trials.append({"method": method, "merge_s": merge_s, "push": push, "vllm": scores["vllm"], "hf": scores["hf"]})
        previous = fresh

    dare_ok = dare_masks_match("cuda")
    if not dare_ok:
        mismatches.append("DARE masks differ between CPU and CUDA")
    vllm.close()
    return {
        "zoo": str(zoo),
        "gpu": torch.cuda.get_device_name(),
        "transport": vllm.pusher.transport,
        "engine_start_s": engine_start_s,
        "trials": trials,
        "dare_masks_match": dare_ok,
        "memory": {
            "planned_bytes": planned_peak_bytes(
                modelset, METHODS, args.dtype, bucket_bytes, torch.cuda.get_device_properties(0).total_memory
            ),
            "max_allocated_bytes": torch.cuda.max_memory_allocated(),
            "hf_model_bytes": hf_model_bytes,
        },
        "mismatches": mismatches,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from mergetune.core.errors import MergetuneError
    from mergetune.evaluators.vllm import check_vllm_version, installed_vllm_version

    if not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    try:
        check_vllm_version(installed_vllm_version())
    except MergetuneError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results = run(args)
    results["wall_s"] = time.perf_counter() - started
    for line in summary_lines(results):
        print(line)
    print(f"wall {results['wall_s']:.0f} s (engine start {results['engine_start_s']:.0f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 1 if results["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
