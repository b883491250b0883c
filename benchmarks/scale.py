"""Real-scale residency on one node: a random bf16 Llama + 3 experts merged by 2 workers, `device` vs `host` placement.

Builds the base and 3 perturbed fine-tunes (bf16 safetensors, rank-1 second moments for
OTA) in a temp dir, then for each placement starts 2 worker processes that, like the
search worker, load their live model (bf16) first, then the resident inputs, and re-merge
into the live model. Measured in one run:
  - peak RSS of each worker (VmHWM) and of the node (both workers' PSS summed, sampled every
    50 ms: pages the workers share count once), against the memory plan's prediction
    (`merge.memory_plan`, without its scoring-activations estimate: nothing is scored here);
  - in one worker (the other idle), the per-trial re-merge time of linear, task_arithmetic, ties,
    dare_ties and ota against the memory-bandwidth floor: bytes read (base + experts as
    stored) and written (the live model) ÷ the bandwidth of a large torch copy.
With --compare-object-store, the same inputs shared through Ray's object store instead of
the mapped files: setup time, one float32 read pass over every input, node PSS (with the raylet).

    .venv/bin/python benchmarks/scale.py --compare-object-store                 # 0.8B params: the full run (~40 min)
    .venv/bin/python benchmarks/scale.py --hidden 256 --layers 4 --vocab 2048   # a quick check

Prints rich tables and writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
EXPERTS = ("e1", "e2", "e3")
METHODS = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.8},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "ota": {"density": 0.5},
}
WORKERS = 2


def write_rank1_moments(root: Path, seed: int) -> None:
    """Rank-1 second moments (row and column sums; `mergetune moments compress`'s format) for each expert."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mergetune.merge.moments import COL_SUFFIX, FORMAT_KEY, RANK1, ROW_SUFFIX

    with safe_open(root / "base" / "model.safetensors", framework="pt") as f:
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    for i, expert in enumerate(EXPERTS):
        gen = torch.Generator().manual_seed(seed + 10 + i)
        tensors = {}
        for name, shape in shapes.items():
            if len(shape) == 2:
                tensors[name + ROW_SUFFIX] = torch.rand(shape[0], generator=gen) * 1e-8
                tensors[name + COL_SUFFIX] = torch.rand(shape[1], generator=gen) * 1e-8
            else:
                tensors[name] = torch.rand(shape, generator=gen) * 1e-12
        save_file(tensors, root / expert / "adam_second_moments.safetensors", metadata={FORMAT_KEY: RANK1})


def recipe_for(root: Path, method: str):
    from mergetune.merge.recipe import Recipe

    return Recipe.from_dict(
        {
            "models": {"base": str(root / "base"), **{e: str(root / e) for e in EXPERTS}},
            "base": "base",
            "rules": [{"method": method, "params": METHODS[method]}],
        }
    )


def modelset_of(root: Path):
    from mergetune.merge.modelset import ModelSet

    return ModelSet.from_recipe(recipe_for(root, "ota"))  # finds the moments beside the experts


def status_bytes(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --- the worker process ---
def worker(root: Path, placement: str, threads: int, repeats: int) -> None:
    """Load like the search worker (live model first, then the inputs), then serve `merge` and `exit` on stdin."""
    import torch
    from transformers import AutoModelForCausalLM

    from mergetune.merge.resident import ResidentModelSet
    from mergetune.merge.sinks import LiveModelSink

    torch.set_num_threads(threads)
    started = time.perf_counter()
    live = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16)
    resident = ResidentModelSet.load(modelset_of(root), device="cpu", placement=placement)
    recipes = {m: recipe_for(root, m) for m in METHODS}
    for recipe in recipes.values():  # one merge of each: the workspace reaches its size, every input page is read
        resident.merge_into(recipe, LiveModelSink(live), seed=0)
    reply({"ready_s": time.perf_counter() - started, "workspace_bytes": resident.workspace.nbytes})
    for command in sys.stdin:
        if command.strip() == "merge":
            times = {}
            for method, recipe in recipes.items():
                runs = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    resident.merge_into(recipe, LiveModelSink(live), seed=0)
                    runs.append(time.perf_counter() - t0)
                times[method] = statistics.median(runs)
            reply({"merge_s": times})
        elif command.strip() == "exit":
            reply({"peak_rss_bytes": status_bytes(os.getpid(), "VmHWM")})
            return


def reply(data: dict) -> None:
    print(json.dumps(data), flush=True)


class NodeSampler(threading.Thread):
    """Peak of the workers' summed PSS (shared pages split between the processes that map them)."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids, self.peak, self._done = pids, 0, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, sum(pss_bytes(pid) for pid in self.pids))
            time.sleep(0.05)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def run_placement(root: Path, placement: str, threads: int, repeats: int) -> dict:
    command = [sys.executable, __file__, "--worker", "--root", str(root), "--placement", placement, "--threads", str(threads), "--repeats", str(repeats)]
    procs = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(WORKERS)]
    sampler = NodeSampler([p.pid for p in procs])
    sampler.start()
    try:
        ready = [read(p) for p in procs]
        send(procs[0], "merge")  # timed in one worker while the other idles: not two workers sharing the cores
        timings = read(procs[0])["merge_s"]
        peaks = []
        for p in procs:
            send(p, "exit")
            peaks.append(read(p)["peak_rss_bytes"])
            p.wait(timeout=60)
    finally:
        node_peak = sampler.stop()
        for p in procs:
            if p.poll() is None:
                p.kill()
    return {
        "ready_s": [r["ready_s"] for r in ready],
        "workspace_bytes": ready[0]["workspace_bytes"],
        "worker_peak_rss_bytes": peaks,
        "node_peak_pss_bytes": node_peak,
        "merge_s": timings,
    }


def send(proc: subprocess.Popen, line: str) -> None:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def read(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"worker {proc.pid} exited with {proc.wait()}")
    return json.loads(line)


def predicted(root: Path, placement: str) -> dict:
    """The memory plan for 2 CPU workers on this machine, as the workers here run (no scoring)."""
    import psutil

    from mergetune.merge.memory_plan import Engine, Machine, MethodUse, plan_memory

    methods = [MethodUse(m, (tuple(p.items()),)) for m, p in METHODS.items()]
    plan = plan_memory(modelset_of(root), methods, Engine("hf"), Machine("cpu", None, psutil.virtual_memory().total, WORKERS), placement)
    worker_bytes = plan.device_bytes - plan.per_worker["eval_activations"]
    shared = plan.per_node["shared_inputs"]
    return {
        "worker_rss_bytes": worker_bytes + shared,  # a worker's RSS counts the mapped inputs it reads
        "node_bytes": shared + WORKERS * worker_bytes,
        "plan": plan.to_json(),
    }


# --- Ray's object store as the shared copy (optional comparison) ---
def compare_object_store(root: Path, threads: int) -> dict:
    """Setup time, one float32 read pass over every input and node PSS: mapped files vs Ray's object store."""
    import ray
    import torch

    from mergetune.merge.placement import stored_entries
    from mergetune.merge.safetensors_io import MappedFile

    entries = {f"{path}:{name}": (path, info) for (path, name), info in stored_entries(modelset_of(root)).items()}
    largest = max(info.numel for _, info in entries.values())
    total = sum(info.nbytes for _, info in entries.values())

    @ray.remote(num_cpus=1)
    class Holder:
        def __init__(self) -> None:
            torch.set_num_threads(threads)
            self.buffer = torch.empty(largest)

        def pid(self) -> int:
            return os.getpid()

        def use_files(self) -> float:
            started = time.perf_counter()
            maps = {path: MappedFile(path) for path in {p for p, _ in entries.values()}}
            self.tensors = [maps[p].tensor(info) for p, info in entries.values()]
            return time.perf_counter() - started

        def use_store(self, refs: list) -> float:
            started = time.perf_counter()
            arrays = ray.get(refs)  # zero-copy numpy views of the node's shared object store
            self.tensors = [torch.from_numpy(a).view(info.dtype).view(info.shape) for a, (_, info) in zip(arrays, entries.values())]
            return time.perf_counter() - started

        def read_pass(self) -> float:
            started = time.perf_counter()
            for t in self.tensors:
                self.buffer[: t.numel()].copy_(t.reshape(-1))
            return time.perf_counter() - started

    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False, object_store_memory=int(total * 1.2) + 2**28)
    try:
        raylet = [p.pid for p in __import__("psutil").process_iter(["name"]) if p.info["name"] in ("raylet", "plasma_store")]
        out = {}
        for mode in ("files", "object_store"):
            holders = [Holder.remote() for _ in range(WORKERS)]
            pids = ray.get([h.pid.remote() for h in holders])
            started = time.perf_counter()
            refs: list = []
            if mode == "files":
                setup = ray.get([h.use_files.remote() for h in holders])
            else:
                from mergetune.merge.safetensors_io import read_tensor

                refs = []
                for path, info in entries.values():
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        t = read_tensor(fd, path, "", info)
                    finally:
                        os.close(fd)
                    refs.append(ray.put(t.view(torch.uint8).numpy()))
                setup = ray.get([h.use_store.remote(refs) for h in holders])
            setup_s = time.perf_counter() - started
            ray.get([h.read_pass.remote() for h in holders])
            passes = [min(ray.get(h.read_pass.remote()) for _ in range(2)) for h in holders]
            out[mode] = {
                "setup_s": setup_s,
                "worker_setup_s": setup,
                "read_pass_s": passes,
                "node_pss_bytes": sum(pss_bytes(pid) for pid in pids + (raylet if mode == "object_store" else [])),
            }
            for h in holders:
                ray.kill(h)
            del refs  # the object store frees the copy once no reference is left
            time.sleep(1)
        out["inputs_bytes"] = total
        return out
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--root", type=Path)
    parser.add_argument("--placement", choices=["device", "host"], nargs="*", default=["device", "host"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-object-store", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.root, args.placement[0], args.threads, args.repeats)
        return

    from merge_speed import build_models, memory_bandwidth
    from rich.console import Console
    from rich.table import Table

    from mergetune.core.versions import package_versions

    console = Console(width=160)
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        params = build_models(root, args.hidden, args.layers, args.vocab, args.seed)
        write_rank1_moments(root, args.seed)
        model_bytes = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
        inputs_bytes = sum(f.stat().st_size for d in ("base", *EXPERTS) for f in (root / d).glob("*.safetensors"))
        console.print(
            f"built base + {len(EXPERTS)} experts: {params / 1e6:.0f}M params, {model_bytes / 1e9:.2f} GB each (bf16), "
            f"inputs {inputs_bytes / 1e9:.2f} GB with rank-1 moments, {time.perf_counter() - started:.0f}s"
        )
        import torch

        torch.set_num_threads(args.threads)
        bandwidth = memory_bandwidth()
        floor_s = ((1 + len(EXPERTS)) * model_bytes + model_bytes) / bandwidth
        rows = {}
        for placement in args.placement:
            measured = run_placement(root, placement, args.threads, args.repeats)
            rows[placement] = {**measured, "predicted": predicted(root, placement)}
            console.print(f"  {placement}: {json.dumps({k: v for k, v in measured.items() if k != 'merge_s'})}")
        comparison = compare_object_store(root, args.threads) if args.compare_object_store else None

    gb = 1e9
    memory = Table(title=f"Peak memory, {params / 1e6:.0f}M-param bf16 Llama, base + {len(EXPERTS)} experts, {WORKERS} workers on one node")
    for column in ("placement", "worker RSS GB", "plan GB", "worker/plan", "node GB", "plan GB", "node/plan", "node / (1.3·inputs + live models)"):
        memory.add_column(column, justify="right")
    for placement, row in rows.items():
        worker_peak = max(row["worker_peak_rss_bytes"])
        p = row["predicted"]
        bound = 1.3 * inputs_bytes + WORKERS * model_bytes
        row["node_over_bound"] = row["node_peak_pss_bytes"] / bound
        memory.add_row(
            placement,
            f"{worker_peak / gb:.2f}",
            f"{p['worker_rss_bytes'] / gb:.2f}",
            f"{worker_peak / p['worker_rss_bytes']:.2f}",
            f"{row['node_peak_pss_bytes'] / gb:.2f}",
            f"{p['node_bytes'] / gb:.2f}",
            f"{row['node_peak_pss_bytes'] / p['node_bytes']:.2f}",
            f"{row['node_over_bound']:.2f}",
        )
    console.print(memory)
    speed = Table(title=f"Per-trial re-merge into the live model, {args.threads} thread(s); floor {floor_s:.3f}s at {bandwidth / gb:.1f} GB/s")
    speed.add_column("method")
    for placement in rows:
        speed.add_column(f"{placement} s", justify="right")
        speed.add_column(f"{placement} / floor", justify="right")
    for method in METHODS:
        cells = []
        for row in rows.values():
            cells += [f"{row['merge_s'][method]:.3f}", f"{row['merge_s'][method] / floor_s:.1f}×"]
        speed.add_row(method, *cells)
    console.print(speed)
    if comparison is not None:
        shared = Table(title="One shared host copy: mapped safetensors vs Ray's object store")
        for column in ("copy", "setup s", "read pass s (each worker)", "node PSS GB"):
            shared.add_column(column, justify="right")
        for mode in ("files", "object_store"):
            c = comparison[mode]
            shared.add_row(mode, f"{c['setup_s']:.2f}", " / ".join(f"{s:.2f}" for s in c["read_pass_s"]), f"{c['node_pss_bytes'] / gb:.2f}")
        console.print(shared)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "params": params,
        "model_bytes": model_bytes,
        "inputs_bytes": inputs_bytes,
        "workers": WORKERS,
        "threads": args.threads,
        "shape": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
        "bandwidth_bytes_per_s": bandwidth,
        "floor_s": floor_s,
        "placements": rows,
        "object_store_comparison": comparison,
        "machine": platform.platform(),
        "versions": package_versions(),
    }
    (RESULTS / "scale.json").write_text(json.dumps(result, indent=2))
    console.print(f"wrote {RESULTS / 'scale.json'}")


if __name__ == "__main__":
    main()
