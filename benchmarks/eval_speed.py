"""Per-trial scoring time of the quick evaluator vs lm-eval on a zoo's search splits, and the share outside forward passes.

A "trial" here is what a search worker does after merging: write new weights into the live
model (an expert's, cycling through the zoo's experts), then `evaluate(backend, split="search")`.
Forward passes are timed with hooks on the model; the rest (tokenizing, batching, lm-eval's
request building and metrics, decoding) is the evaluator's overhead.

    .venv/bin/python benchmarks/eval_speed.py --zoo zoo-demo --trials 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mergetune.core.versions import package_versions
from mergetune.evaluators.base import HFBackend, build_evaluator

RESULTS = Path(__file__).parent / "results"


class ForwardTimer:
    """Wall time spent inside the model's top-level forward (hooks), and the number of calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._started = 0.0
        model.register_forward_pre_hook(self._before)
        model.register_forward_hook(self._after)

    def _before(self, module, args) -> None:
        self._started = time.perf_counter()

    def _after(self, module, args, output) -> None:
        self.seconds += time.perf_counter() - self._started
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def write_expert(backend: HFBackend, expert_dir: Path) -> None:
    from safetensors.torch import load_file

    sink = backend.weight_sink()
    for name, tensor in load_file(expert_dir / "model.safetensors").items():
        sink.write(name, tensor)
    sink.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo-demo"))
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64, help="both evaluators")
    parser.add_argument("--limit", type=float, default=None, help="items per task (count, or fraction < 1); default all")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    limit = None if args.limit is None else (args.limit if args.limit < 1 else int(args.limit))
    manifest = json.loads((args.zoo / "zoo.json").read_text())
    experts = [args.zoo / path for path in manifest["experts"].values()]
    items = {
        task: sum(1 for line in (args.zoo / spec["splits"]["search"]).read_text().splitlines() if line.strip())
        for task, spec in manifest["tasks"].items()
    }

    backend = HFBackend.from_pretrained(args.zoo / manifest["base"], "cpu")
    timer = ForwardTimer(backend.model)
    configs = {
        "quick": {"kind": "quick", "zoo": str(args.zoo), "limit": limit, "batch_size": args.batch_size},
        "lm_eval": {"kind": "lm_eval", "zoo": str(args.zoo), "limit": limit, "batch_size": args.batch_size},
    }
    rows, scores = [], {}
    for label, config in configs.items():
        started = time.perf_counter()
        evaluator = build_evaluator(config)
        build_s = time.perf_counter() - started
        evaluator.evaluate(backend)  # warm-up: lazily built lm-eval model, first-call allocations
        walls, forwards, calls = [], [], []
        for trial in range(args.trials):
            write_expert(backend, experts[trial % len(experts)])
            timer.reset()
            started = time.perf_counter()
            result = evaluator.evaluate(backend, split="search")
            walls.append(time.perf_counter() - started)
            forwards.append(timer.seconds)
            calls.append(timer.calls)
            scores.setdefault(trial, {})[label] = result
        wall, forward = statistics.median(walls), statistics.median(forwards)
        rows.append(
            {
                "evaluator": label,
                "build_s": build_s,
                "trial_s_median": wall,
                "trial_s_all": walls,
                "forward_s_median": forward,
                "outside_forward_share": 1 - forward / wall,
                "forward_calls": statistics.median(calls),
            }
        )
    # Both score exact match on the same items with greedy decoding, so they should agree.
    agree = all(scores[t]["quick"] == scores[t]["lm_eval"] for t in scores) if limit is None else None

    table = Table(title=f"scoring one trial on {args.zoo} (search splits: {items}; {args.threads} thread(s))")
    for column in ("evaluator", "build (s)", "per trial (s)", "in forward (s)", "outside forward", "forward calls"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["evaluator"],
            f"{row['build_s']:.2f}",
            f"{row['trial_s_median']:.3f}",
            f"{row['forward_s_median']:.3f}",
            f"{row['outside_forward_share']:.0%}",
            f"{row['forward_calls']:.0f}",
        )
    console = Console()
    console.print(table)
    console.print(f"lm-eval / quick per-trial time: {rows[1]['trial_s_median'] / rows[0]['trial_s_median']:.1f}×")
    if agree is not None:
        console.print(f"quick and lm-eval exact-match scores identical on every trial: {agree}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "eval_speed.json"
    out.write_text(
        json.dumps(
            {
                "zoo": str(args.zoo),
                "preset": manifest.get("preset"),
                "items_per_task": items,
                "trials": args.trials,
                "threads": args.threads,
                "batch_size": args.batch_size,
                "limit": limit,
                "rows": rows,
                "scores_agree": agree,
                "scores": scores,
                "versions": package_versions(),
            },
            indent=2,
        )
    )
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
