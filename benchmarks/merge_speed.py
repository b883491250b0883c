"""Merge speed: mergetune vs mergekit disk to disk, the resident per-trial re-merge, and the memory-bandwidth floor.

Builds a ~100M-parameter random Llama base and 3 perturbed fine-tunes (bfloat16 safetensors)
in a temp dir, then measures in one run:
  (a) disk to disk, each merge in a fresh subprocess (wall time from the tool's import to the merge's end, peak RSS from
      VmHWM): mergetune `merge_recipe_to_dir` vs mergekit 0.1.5 `run_merge`, for
      task_arithmetic and ties (density 0.5) — ties once the method library registers it;
  (b) the resident re-merge into a live model (`resident.ResidentModelSet.merge_into`, the per-trial cost)
      of every method of the default search space (linear, task_arithmetic, ties, dare_ties,
      breadcrumbs_ties, della, ota with density < 1; rank-1 second moments for OTA), after the
      worker's load-time order statistics (`summaries.ModelSummaries.precompute`: its time and
      bytes per parameter and expert are reported); with --large, on the larger model of
      `benchmarks/scale.py` too (its order statistics for one method at a time, its inputs mapped: `host` placement);
  (c) the floor: bytes that must be read (base + experts) and written (the merge) ÷ the memory
      bandwidth of a large torch copy.
Both tools compute in float32 and write bfloat16, with the same thread count.

    .venv/bin/python benchmarks/merge_speed.py [--threads 1] [--repeats 2] [--large]

Prints a rich table and writes benchmarks/results/merge_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
EXPERTS = ("e1", "e2", "e3")


def build_models(root: Path, hidden: int, layers: int, vocab: int, seed: int) -> int:
    """Base + perturbed fine-tunes saved as bf16 safetensors; returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergetune.zoo.tokenizer import build_char_tokenizer

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    tokenizer = build_char_tokenizer()
    base.save_pretrained(root / "base", safe_serialization=True)
    tokenizer.save_pretrained(root / "base")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for i, name in enumerate(EXPERTS):
        gen = torch.Generator().manual_seed(seed + 1 + i)
        with torch.no_grad():
            for key, p in base.state_dict().items():
                p.copy_(state[key] + 0.01 * torch.randn(p.shape, generator=gen).to(p.dtype))
        base.save_pretrained(root / name, safe_serialization=True)
        tokenizer.save_pretrained(root / name)
    return sum(v.numel() for v in state.values())


RESIDENT_METHODS = {  # the default search space's methods, at a density < 1 where they have one
    "linear": {},
    "task_arithmetic": {},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05},
    "della": {"density": 0.5, "epsilon": 0.1},
    "ota": {"density": 0.5},
}


def rules(method: str) -> dict:
    return {"method": method, "params": RESIDENT_METHODS.get(method, {})}


def child(tool: str, method: str, root: Path, out: Path, threads: int) -> dict:
    """One disk-to-disk merge in this (fresh) process: seconds from the tool's import to the merge's end, and peak RSS."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    started = time.perf_counter()  # the tool's own imports count, as they do for a user's merge command
    if tool == "mergetune":
        from mergetune.merge.engine import merge_recipe_to_dir
        from mergetune.merge.recipe import Recipe

        recipe = Recipe.from_dict(
            {
                "models": {"base": str(root / "base"), **{e: str(root / e) for e in EXPERTS}},
                "base": "base",
                "rules": [rules(method)],
                "dtype": "bfloat16",
            }
        )
        merge_recipe_to_dir(recipe, out, seed=0, force=True)
    else:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        params = {"weight": 1.0, **({"density": 0.5} if method == "ties" else {})}
        config = MergeConfiguration.model_validate(
            {
                "merge_method": method,
                "base_model": str(root / "base"),
                "models": [{"model": str(root / e), "parameters": params} for e in EXPERTS],
                "dtype": "float32",
                "out_dtype": "bfloat16",
            }
        )
        options = MergeOptions(quiet=True, random_seed=0, num_threads=threads or None, copy_tokenizer=True)
        run_merge(config, str(out), options)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM starts afresh at exec; ru_maxrss would carry over the forking parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(tool: str, method: str, root: Path, threads: int) -> dict:
    out = root / f"out-{tool}-{method}"
    command = [sys.executable, __file__, "--child", tool, "--method", method, "--root", str(root), "--out", str(out), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by a large torch copy."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * nbytes / best


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def resident_timings(root: Path, methods: list[str], repeats: int, one_method_at_a_time: bool = False, placement: str = "device") -> dict:
    """Per method: the median resident re-merge (after two warm-up merges) and the order statistics it reads —
    every kind the methods declare, computed at load for all methods at once; or (`one_method_at_a_time`, to
    bound memory) afresh for each method, only those its recipe reads (breadcrumbs per tensor: the ascending
    order alone), built during the first warm-up merge. The inputs in `placement` (`placement.Placement`)."""
    import contextlib
    import ctypes
    import gc

    import torch
    from scale import modelset_of
    from transformers import AutoModelForCausalLM

    from mergetune.merge.methods import get_method
    from mergetune.merge.recipe import Recipe
    from mergetune.merge.resident import ResidentModelSet
    from mergetune.merge.sinks import LiveModelSink

    modelset = modelset_of(root)  # the experts with their rank-1 moments (OTA)
    params = sum(info.numel for info in modelset.reference.infos.values())
    live = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16)
    groups = [[m] for m in methods] if one_method_at_a_time else [methods]
    out: dict[str, dict] = {}
    for group in groups:
        started = time.perf_counter()
        resident = ResidentModelSet.load(modelset, placement=placement)
        load_s = time.perf_counter() - started
        declared = tuple(sorted({kind for m in group for kind in get_method(m).orders}))
        started = time.perf_counter()
        if not one_method_at_a_time:
            resident.summaries.precompute(declared, modelset.experts, torch.get_num_threads())
        orders_s = time.perf_counter() - started
        for method in group:
            recipe = Recipe.from_dict(
                {"models": {"base": str(root / "base"), **{e: str(root / e) for e in EXPERTS}}, "base": "base", "rules": [rules(method)]}
            )
            # two warm-ups: the first compiles and sums each slice's Σ|τ| (DARE, DELLA), the second compiles the
            # kernels of the trials that read them
            times = [_timed(lambda r=resident, rc=recipe: r.merge_into(rc, LiveModelSink(live), seed=0)) for _ in range(repeats + 2)]
            seconds = statistics.median(times[2:])
            if one_method_at_a_time:
                orders_s = resident.summaries.build_s  # during the first warm-up merge
            out[method] = {
                "seconds": seconds,
                "load_s": load_s,
                "orders": list(declared) if not one_method_at_a_time else resident.summaries.built_kinds,
                "orders_s": orders_s,
                "orders_bytes": resident.summaries.nbytes,
                "orders_bytes_per_param_expert": resident.summaries.nbytes / (params * len(EXPERTS)),
            }
        del resident
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # glibc only: elsewhere the freed memory stays mapped
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # the freed order statistics back to the OS before the next method's
    return out


def resident_table(title: str, timings: dict, floor_s: float):
    from rich.table import Table

    table = Table(title=title)
    for column in ("method", "resident s", "floor s", "resident / floor", "order statistics", "built in s", "bytes / param / expert"):
        table.add_column(column, justify="right")
    for method, row in timings.items():
        table.add_row(
            method, f"{row['seconds']:.3f}", f"{floor_s:.3f}", f"{row['seconds'] / floor_s:.1f}×",
            "+".join(row["orders"]) or "—", f"{row['orders_s']:.1f}", f"{row['orders_bytes_per_param_expert']:.2f}",
        )  # fmt: skip
    return table


def large_model_timings(args, bandwidth: float, console) -> dict:
    """The resident re-merge on `benchmarks/scale.py`'s model (its default shape), one method's order statistics at a
    time, the inputs mapped from their files (`host` placement, as a multi-worker node holds them): held as a private
    copy besides the live model and TIES's 10 GB of order statistics, the 805M set reached this machine's 24 GiB."""
    import scale

    with tempfile.TemporaryDirectory(prefix="merge_speed-large-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        params = build_models(root, args.large_hidden, args.large_layers, args.large_vocab, args.seed)
        scale.write_rank1_moments(root, args.seed)
        model_bytes = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
        console.print(f"built the large model set: {params / 1e6:.0f}M params, {time.perf_counter() - started:.0f}s")
        timings = resident_timings(root, list(RESIDENT_METHODS), args.repeats, one_method_at_a_time=True, placement="host")
    floor_s = (2 + len(EXPERTS)) * model_bytes / bandwidth
    console.print(resident_table(f"Resident re-merge, {params / 1e6:.0f}M params (scale.py's model), {args.threads} thread(s)", timings, floor_s))
    return {"params": params, "model_bytes": model_bytes, "floor_s": floor_s, "resident": timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--child", choices=["mergetune", "mergekit"])
    parser.add_argument("--method", default="task_arithmetic")
    parser.add_argument("--root", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run; 0: the machine's default (all cores)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=11)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--large", action="store_true", help="also the resident re-merge on scale.py's model")
    parser.add_argument("--large-hidden", type=int, default=1536)
    parser.add_argument("--large-layers", type=int, default=28)
    parser.add_argument("--large-vocab", type=int, default=4096)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.method, args.root, args.out, args.threads)))
        return

    import torch
    from rich.console import Console
    from rich.table import Table
    from scale import write_rank1_moments

    from mergetune.core.versions import package_versions
    from mergetune.merge.methods import method_names

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    console = Console(width=160)
    methods = ["task_arithmetic"] + (["ties"] if "ties" in method_names() else [])
    with tempfile.TemporaryDirectory(prefix="merge_speed-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        params = build_models(root, args.hidden, args.layers, args.vocab, args.seed)
        write_rank1_moments(root, args.seed)
        model_bytes = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
        console.print(f"built base + {len(EXPERTS)} experts: {params / 1e6:.1f}M params, {model_bytes / 1e6:.0f} MB each (bf16), {time.perf_counter() - started:.0f}s")
        bandwidth = memory_bandwidth()
        floor_bytes = (1 + len(EXPERTS)) * model_bytes + model_bytes  # read base + experts, write the merge
        floor_s = floor_bytes / bandwidth
        disk: dict[str, dict[str, list[dict]]] = {m: {"mergetune": [], "mergekit": []} for m in methods}
        for _ in range(args.repeats):
            for method in methods:
                for tool in ("mergetune", "mergekit"):
                    disk[method][tool].append(run_child(tool, method, root, args.threads))
                    console.print(f"  {method:16s} {tool:9s} {disk[method][tool][-1]}")
        resident = resident_timings(root, list(RESIDENT_METHODS), args.repeats)
    large = large_model_timings(args, bandwidth, console) if args.large else None

    table = Table(title=f"Merge speed: {params / 1e6:.0f}M params, base + {len(EXPERTS)} experts, bf16 on disk, {args.threads} thread(s)")
    for column in ("method", "mergetune s", "mergekit s", "speed-up", "mergetune RSS MB", "mergekit RSS MB", "resident s", "floor s", "resident / floor"):
        table.add_column(column, justify="right")
    rows = []
    for method in methods:
        ours = min(r["seconds"] for r in disk[method]["mergetune"])
        theirs = min(r["seconds"] for r in disk[method]["mergekit"])
        row = {
            "method": method,
            "mergetune_s": ours,
            "mergekit_s": theirs,
            "speedup": theirs / ours,
            "mergetune_peak_rss_mb": max(r["peak_rss_mb"] for r in disk[method]["mergetune"]),
            "mergekit_peak_rss_mb": max(r["peak_rss_mb"] for r in disk[method]["mergekit"]),
            "resident_s": resident[method]["seconds"],
            "resident_load_s": resident[method]["load_s"],
            "floor_s": floor_s,
            "resident_over_floor": resident[method]["seconds"] / floor_s,
            "runs": disk[method],
        }
        rows.append(row)
        table.add_row(
            method,
            f"{ours:.2f}",
            f"{theirs:.2f}",
            f"{row['speedup']:.2f}×",
            f"{row['mergetune_peak_rss_mb']:.0f}",
            f"{row['mergekit_peak_rss_mb']:.0f}",
            f"{row['resident_s']:.3f}",
            f"{floor_s:.3f}",
            f"{row['resident_over_floor']:.1f}×",
        )
    console.print(table)
    console.print(resident_table(f"Resident re-merge, {params / 1e6:.0f}M params, {args.threads} thread(s)", resident, floor_s))
    console.print(
        f"memory bandwidth (torch copy, read+write): {bandwidth / 1e9:.1f} GB/s; floor = {floor_bytes / 1e6:.0f} MB moved; "
        f"resident load {rows[0]['resident_load_s']:.1f}s (once per worker)"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "params": params,
        "model_bytes": model_bytes,
        "threads": args.threads,
        "repeats": args.repeats,
        "bandwidth_bytes_per_s": bandwidth,
        "floor_bytes": floor_bytes,
        "rows": rows,
        "resident": resident,
        "large": large,
        "machine": platform.platform(),
        "versions": package_versions(),
    }
    (RESULTS / "merge_speed.json").write_text(json.dumps(result, indent=2))
    console.print(f"wrote {RESULTS / 'merge_speed.json'}")


if __name__ == "__main__":
    main()
