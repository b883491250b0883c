"""Demo-study benchmark: trials/hour with 1 vs 2 workers, and best trial vs warm-start baselines on `test`.

    .venv/bin/python benchmarks/search_demo.py [--config configs/demo.yaml] [--trials 60] [--seeds 0 1 2]
        [--throughput-trials 16]

Prints two tables and writes benchmarks/results/search_demo.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from optuna.trial import TrialState
from rich.table import Table

from mergetune.merge.recipe import Recipe
from mergetune.search.config import load_study_config
from mergetune.search.bookkeeping import stored_objectives
from mergetune.search.driver import run_study
from mergetune.studies.scoring import score_recipes_on_split

from _common import git_commit, mean, trials_per_hour, variant, wide_console  # benchmarks/, the script's own folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--throughput-trials", type=int, default=16)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    console = wide_console()
    base = load_study_config(args.config)
    results: dict[str, object] = {"config": args.config, "commit": git_commit()}
    work = Path(tempfile.mkdtemp(prefix="search-demo-"))

    rates = {}
    for workers in (1, 2):
        config = variant(
            base, work, f"throughput-w{workers}", ray={"workers": workers},
            budget={"n_trials": args.throughput_trials}, warm_start=False,
        )
        rates[workers] = trials_per_hour(run_study(config, console=console))
    table = Table(title="demo study throughput")
    for column in ("workers", "trials/hour"):
        table.add_column(column, justify="right")
    for workers, rate in rates.items():
        table.add_row(str(workers), f"{rate:.0f}")
    console.print(table)
    console.print(f"speed-up 2 vs 1 workers: {rates[2] / rates[1]:.2f}x")
    results["trials_per_hour"] = rates
    results["speedup_2_vs_1"] = rates[2] / rates[1]

    if not args.skip_quality:
        runs = []
        for seed in args.seeds:
            config = variant(base, work, f"quality-s{seed}", seed=seed, budget={"n_trials": args.trials})
            started = time.perf_counter()
            study = run_study(config, console=console)
            wall = time.perf_counter() - started
            objectives = stored_objectives(study)
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            best = max(done, key=lambda t: statistics.fmean(t.values))
            baselines = {t.user_attrs["baseline"]: t for t in done if t.user_attrs.get("baseline")}
            picked = [best, *baselines.values()]
            test = score_recipes_on_split(config, [Recipe.from_dict(t.user_attrs["recipe"]) for t in picked], "test")
            best_test, *baseline_tests = (mean(scores) for scores in test)
            run = {
                "seed": seed,
                "wall_s": wall,
                "best_trial": best.number,
                "best_search_mean": statistics.fmean(best.values),
                "best_test_mean": best_test,
                "baseline_test_mean": dict(zip(baselines, baseline_tests)),
                "objectives": [o.name for o in objectives],
            }
            run["margin_over_best_baseline"] = best_test - max(baseline_tests)
            runs.append(run)
        table = Table(title=f"best trial vs warm-start baselines, mean test score ({args.trials} trials)")
        for column in ("seed", "best trial", "best test", *runs[0]["baseline_test_mean"], "margin"):
            table.add_column(column, justify="right")
        for run in runs:
            table.add_row(
                str(run["seed"]), f"#{run['best_trial']}", f"{run['best_test_mean']:.3f}",
                *(f"{v:.3f}" for v in run["baseline_test_mean"].values()), f"{run['margin_over_best_baseline']:+.3f}",
            )
        console.print(table)
        margins = [run["margin_over_best_baseline"] for run in runs]
        console.print(
            f"margin over the best baseline: mean {statistics.fmean(margins):+.3f}, "
            f"min {min(margins):+.3f}, max {max(margins):+.3f} over seeds {args.seeds}"
        )
        results["quality"] = runs

    out = Path("benchmarks/results/search_demo.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
