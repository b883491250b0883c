"""Compiled merge kernels per element: every step inlined (mergetune's options) vs Inductor's default realize limits.

One slice of 4M entries (DELLA: rows of 2048, integer keep thresholds; OTA: dense moments, or rank-1 ones
as factors of rows of 2048), base + 3 experts as bf16, written into a bf16 destination as a live model's
storage takes it (`kernels.into`), 1 thread. Inductor's CPU backend tiles a loop by the narrowest float
type of *every* node in it: a step realized as its own node (a float-only body) makes it tile by
float32's lanes, and on AVX2 a bf16 tile is then loaded and stored by halves through the stack.

    .venv/bin/python benchmarks/kernel_tiling.py

Prints a rich table and writes benchmarks/results/kernel_tiling.json.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
N = 1 << 22
INLINED = ("realize_reads_threshold", "realize_opcount_threshold", "realize_acc_reads_threshold")


def per_element_ns(fn, repeats: int = 7) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best / N * 1e9


def carried_ranks(seed: int):
    """Row ranks of 2048-entry rows as a CPU kernel reads them (`kernels.ranks_carrier`: int16 widened to int32)."""
    from mergetune.merge.kernels import ranks_carrier

    g = torch.Generator().manual_seed(seed)
    return ranks_carrier(torch.argsort(torch.rand(N // 2048, 2048, generator=g), dim=1).to(torch.int16).reshape(-1))


def cases(k, base, given, out):
    from mergetune.merge.counter_rng import keep_threshold, key_tensor
    from mergetune.merge.sparsify import della_ramp

    offset, key = key_tensor(0), key_tensor(12345)
    marks = [torch.zeros(N, dtype=k.mark_dtype(base.device)) for _ in given]
    for m in marks:
        m[::97] = 1
    ties = [(0.005, None, m, None, None) for m in marks]
    dare = [(key_tensor(7 + i), key_tensor(keep_threshold(0.5)), 1.7, None) for i in range(len(given))]
    ranks = [carried_ranks(i) for i in range(len(given))]
    ramp = tuple(key_tensor(v) for v in della_ramp(2048, 0.5, 0.1))
    della = [(key_tensor(7 + i), r, ramp, 1.7, False) for i, r in enumerate(ranks)]
    moments = [torch.rand(N) * 1e-12 for _ in given]
    bounds = [(1e-20, None, m) for m in marks]
    rows = (N // 2048, 2048)  # rank-1 moments as a resident merge hands them over: factors of whole rows
    factors = [(torch.rand(rows[0], 1) * 1e-6, torch.rand(1, rows[1]) * 1e-6) for _ in given]
    as_rows = [t.view(rows) for t in (base, *given, out)]
    row_bounds = [(low, high, m.view(rows)) for low, high, m in bounds]
    ones = [1.0] * len(given)
    return {
        "task_arithmetic": lambda: k.combined_slice(base, given, True, ones, False, False, None, 1.0, out),
        "ties": lambda: k.gta_slice(base, given, True, "magnitude", ties, offset, key, ones, True, True, None, 1.0, out),
        "dare_ties": lambda: k.gta_slice(base, given, True, "random", dare, offset, key, ones, True, False, None, 1.0, out),
        "dare L1 sums": lambda: k.gta_l1_sums(base, given, True, "random", list(enumerate(dare)), offset, key),
        "della": lambda: k.gta_slice(base, given, True, "magprune", della, offset, key, ones, True, False, None, 1.0, out),
        "ota": lambda: k.ota_slice(base, given, True, None, moments, bounds, [0.7, 0.4, 0.9], 1e-30, out),
        "ota, rank-1 moments": lambda: k.ota_slice(
            as_rows[0], as_rows[1:-1], True, None, factors, row_bounds, [0.7, 0.4, 0.9], 1e-30, as_rows[-1]
        ),
    }


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from mergetune.merge import kernels

    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = torch.randn(N).to(torch.bfloat16)
    given = [(base.float() + 0.01 * torch.randn(N)).to(torch.bfloat16) for _ in range(3)]
    out = torch.empty(N, dtype=torch.bfloat16)
    results: dict[str, dict[str, float]] = {}
    saved = dict(kernels._COMPILE_OPTIONS)
    try:
        for label, inlined in (("inlined", True), ("default", False)):
            kernels._COMPILE_OPTIONS.clear()
            kernels._COMPILE_OPTIONS.update({k: v for k, v in saved.items() if inlined or k not in INLINED})
            torch._dynamo.reset()
            for name, fn in cases(kernels.Kernels(compiled=True), base, given, out).items():
                results.setdefault(name, {})[label] = per_element_ns(fn)
    finally:
        kernels._COMPILE_OPTIONS.clear()
        kernels._COMPILE_OPTIONS.update(saved)
    table = Table(title=f"Compiled kernel, ns per element (base + 3 experts, bf16, {torch.backends.cpu.get_cpu_capability()}, 1 thread)")
    for column in ("kernel", "inlined", "Inductor's default", "default / inlined"):
        table.add_column(column, justify="right")
    for name, row in results.items():
        table.add_row(name, f"{row['inlined']:.2f}", f"{row['default']:.2f}", f"{row['default'] / row['inlined']:.2f}×")
    Console().print(table)
    RESULTS.mkdir(exist_ok=True)
    data = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "elements": N, "ns_per_element": results}
    (RESULTS / "kernel_tiling.json").write_text(json.dumps(data, indent=2))
    print(f"wrote {RESULTS / 'kernel_tiling.json'}")


if __name__ == "__main__":
    main()
