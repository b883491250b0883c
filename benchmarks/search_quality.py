"""Search-quality benchmark: does the exported best beat the best warm-start baseline on `test` by more than the noise?

    .venv/bin/python benchmarks/search_quality.py --zoo Z [--config configs/demo.yaml] [--seeds 0 1 2]
        [--trials 60] [--arms ps ps+selection dfs ps+dfs] [--search-limit 200] [--workers N]
        [--out benchmarks/results/search_quality.json]

Arms, each at the same trial budget on the config with its `zoo:` replaced by Z:
  ps            the parameter-space search, best = the best weighted search mean (confirmation off)
  ps+selection  the same with noise-aware selection: the top `confirm.top_k` trials re-scored on the whole
                search split, best = the best confirmed weighted mean; a config whose search already scores
                the whole split searches on `--search-limit` items per task instead (else nothing to confirm)
  dfs           data-flow-space search (`search: {space: dataflow}`)
  ps+dfs        both spaces together (`search: {space: both}`)
  baseline      the warm-start baselines (search/warmstart.py) scored on `test`; the best of them by its test
                mean is the bar (a bar picked on test is the baseline's best case)
  single model  for reference, the base and each expert unmerged (their test scores from zoo.json): a merge
                is worth having only when it beats the best of them too (Sakana's "best source model")

The pick is `export --trial best`'s (studies/front.py `pick_trial`). Per arm: the mean test score over search
seeds ± its standard error over seeds, the per-run test SE from the per-item scores (evaluators/stderr.py),
the margin over the best baseline (mean, worst seed, and in per-run test SEs), the normalised score (per task
the merged test score ÷ that task's expert on its own task, from the zoo's zoo.json, averaged over tasks),
and wall time. Prints a table, writes the JSON with the git commit.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna

from mergetune.core.config import load_yaml
from mergetune.core.errors import ConfigError, MergetuneError
from mergetune.evaluators.stderr import weighted_standard_error
from mergetune.search.config import StudyConfig, parse_study_config
from mergetune.search.driver import run_study
from mergetune.search.space import SearchSpace
from mergetune.search.warmstart import baseline_params
from mergetune.studies.front import confirmed_records, pick_trial, trial_recipe
from mergetune.studies.scoring import summarise_recipes_on_split

from _common import git_commit, variant, wide_console  # benchmarks/, the script's own folder

ARMS = ("ps", "ps+selection", "dfs", "ps+dfs")
SPACE_OF_ARM = {"dfs": "dataflow", "ps+dfs": "both"}


# --- pure helpers (tests/test_search_quality.py) ---
def margin_in_se(margin: float, se: float) -> float:
    """A margin in units of a standard error (inf for a positive margin with no noise)."""
    if se > 0:
        return margin / se
    return math.copysign(math.inf, margin) if margin else 0.0


def normalised_score(scores: dict[str, float], own: dict[str, float]) -> float:
    """Mean over tasks of the merged score ÷ the task's expert's score on its own task."""
    missing = sorted(set(scores) - set(own))
    if missing:
        raise ConfigError(f"no expert own-task score for task {missing[0]!r}; tasks with one: {', '.join(own)}")
    return statistics.fmean(scores[task] / own[task] for task in scores)


def mean_and_se(values: list[float]) -> tuple[float, float | None]:
    """Mean over runs and its standard error (sample stdev / √n); None for one run."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def weighted_test(summary: dict[str, dict], weights: dict[str, float]) -> tuple[float, float | None]:
    """Weighted mean of per-objective summaries ({score, se, items}) and its standard error."""
    names = list(summary)
    total = sum(abs(weights.get(n, 1.0)) for n in names) or 1.0
    mean = sum(weights.get(n, 1.0) * summary[n]["score"] for n in names) / total
    return mean, weighted_standard_error([summary[n].get("se") for n in names], [weights.get(n, 1.0) for n in names])


def single_model_means(zoo_accuracy: dict, weights: dict[str, float]) -> dict[str, float]:
    """Weighted test mean of the base and of each expert unmerged, from zoo.json's `accuracy`."""
    models = {"base": zoo_accuracy["base"], **zoo_accuracy["experts"]}
    means = {}
    for name, scores in models.items():
        total = sum(abs(weights.get(task, 1.0)) for task in scores) or 1.0
        means[name] = sum(weights.get(task, 1.0) * score for task, score in scores.items()) / total
    return means


# --- configs ---
def config_on_zoo(path: str, zoo: Path) -> StudyConfig:
    """The study config at `path` with its `zoo:` (and a quick evaluator's zoo) replaced by `zoo`."""
    data = load_yaml(path)
    if not isinstance(data, dict) or "zoo" not in data or "models" in data:
        raise ConfigError(f"{path}: --zoo needs a config that takes its models from `zoo:` (no `models:`)")
    data["zoo"] = str(zoo)
    if isinstance(data.get("evaluator"), dict) and "zoo" in data["evaluator"]:
        data["evaluator"] = {**data["evaluator"], "zoo": str(zoo)}
    return parse_study_config(data, path)


def arm_config(arm: str, base: StudyConfig, work: Path, seed: int, trials: int, workers: int, search_limit: int) -> StudyConfig:
    """`base` for one arm and search seed; an arm the config schema does not know fails as a ConfigError."""
    changes: dict[str, object] = {"seed": seed, "budget": {"n_trials": trials}, "ray": {"workers": workers}}
    if arm == "ps":
        changes["confirm"] = {"top_k": 0}
    elif arm == "ps+selection":
        changes["confirm"] = {"top_k": base.confirm.top_k or 4}
        evaluator = base.evaluator.model_dump(mode="json")
        if evaluator.get("limit") is None and base.confirm.limit is None:
            changes["evaluator"] = {"limit": search_limit}
    else:
        changes["search"] = {"space": SPACE_OF_ARM[arm]}
    try:
        return variant(base, work, f"{arm.replace('+', '-')}-s{seed}", **changes)
    except ConfigError as exc:
        raise ConfigError(f"arm {arm}: {exc} (leave it out with --arms until this tree supports it)") from None


def objective_weights(config: StudyConfig) -> dict[str, float]:
    return {o.name: o.weight for o in config.objectives or []}


def expert_own_scores(zoo: Path) -> dict[str, float]:
    """Task → its expert's test score on that task, as the zoo build measured it (zoo.json `accuracy`)."""
    try:
        experts = json.loads((zoo / "zoo.json").read_text())["accuracy"]["experts"]
        return {task: float(scores[task]) for task, scores in experts.items()}
    except (OSError, KeyError, ValueError, TypeError):
        raise ConfigError(f"{zoo}/zoo.json has no accuracy.experts[TASK][TASK]; rebuild the zoo with `mergetune zoo build`") from None


# --- runs ---
def scored(summary: dict[str, dict], weights: dict[str, float], own: dict[str, float]) -> dict:
    mean, se = weighted_test(summary, weights)
    scores = {name: s["score"] for name, s in summary.items()}
    return {"test_mean": mean, "test_se": se, "test": scores, "normalised": normalised_score(scores, own)}


def baseline_run(config: StudyConfig, own: dict[str, float]) -> dict[str, dict]:
    """Each warm-start baseline (numbered as the warm start numbers them, for DARE's seed) on test."""
    space = SearchSpace(config)
    named = baseline_params(space)
    recipes = [space.recipe(optuna.trial.FixedTrial(params, number=i)) for i, (_, params) in enumerate(named)]
    summaries = summarise_recipes_on_split(config, recipes, "test")
    return {name: scored(s, objective_weights(config), own) for (name, _), s in zip(named, summaries)}


def search_run(config: StudyConfig, own: dict[str, float], console) -> dict:
    started = time.perf_counter()
    study = run_study(config, console=console)
    wall = time.perf_counter() - started
    best = pick_trial(study, "best")
    (summary,) = summarise_recipes_on_split(config, [trial_recipe(best)], "test")
    record = confirmed_records(study).get(best.number)
    run = {
        "seed": config.seed,
        "wall_s": wall,
        "trials": len(study.trials),
        "best_trial": best.number,
        "best_baseline_name": best.user_attrs.get("baseline"),
        "search_mean": statistics.fmean(best.values),
        "confirmed_mean": None if record is None else statistics.fmean(s["score"] for s in record["scores"].values()),
        "confirmed": len(confirmed_records(study)),
    }
    return run | scored(summary, objective_weights(config), own)


def arm_summary(runs: list[dict], bar: dict) -> dict:
    means = [r["test_mean"] for r in runs]
    mean, se_over_seeds = mean_and_se(means)
    per_run_se = statistics.fmean(r["test_se"] for r in runs if r["test_se"] is not None) if all(r["test_se"] for r in runs) else None
    margins = [m - bar["test_mean"] for m in means]
    margin = statistics.fmean(margins)
    return {
        "test_mean": mean,
        "test_se_over_seeds": se_over_seeds,
        "test_se_per_run": per_run_se,
        "margin": margin,
        "margin_min": min(margins),
        "margin_in_se": None if per_run_se is None else margin_in_se(margin, per_run_se),
        "wins": sum(m > 0 for m in margins),
        "normalised": statistics.fmean(r["normalised"] for r in runs),
        "wall_s": statistics.fmean(r["wall_s"] for r in runs),
    }


def table(arms: dict[str, dict], baselines: dict[str, dict], bar_name: str, title: str, singles: dict[str, float]):
    from rich.table import Table

    out = Table(title=title)
    for column in ("arm", "test mean ± SE (seeds)", "SE per run", "margin (worst)", "margin / SE", "wins", "normalised", "wall s"):
        out.add_column(column, justify="right", no_wrap=column == "arm")
    for arm, result in arms.items():
        s = result["summary"]
        seeds_se = "" if s["test_se_over_seeds"] is None else f" ± {s['test_se_over_seeds']:.3f}"
        out.add_row(
            arm, f"{s['test_mean']:.3f}{seeds_se}", "-" if s["test_se_per_run"] is None else f"{s['test_se_per_run']:.3f}",
            f"{s['margin']:+.3f} ({s['margin_min']:+.3f})", "-" if s["margin_in_se"] is None else f"{s['margin_in_se']:+.2f}",
            f"{s['wins']}/{len(result['runs'])}", f"{s['normalised']:.3f}", f"{s['wall_s']:.0f}",
        )  # fmt: skip
    bar = baselines[bar_name]
    out.add_row(f"baseline ({bar_name})", f"{bar['test_mean']:.3f}", "-" if bar["test_se"] is None else f"{bar['test_se']:.3f}",
                "-", "-", "-", f"{bar['normalised']:.3f}", "-")  # fmt: skip
    best_single = max(singles, key=singles.get)
    out.add_row(f"best single model ({best_single}, unmerged)", f"{singles[best_single]:.3f}", "-",
                f"{singles[best_single] - bar['test_mean']:+.3f}", "-", "-", "-", "-")  # fmt: skip
    return out


def runs_table(arms: dict[str, dict], bar: dict):
    from rich.table import Table

    out = Table(title="per run: the picked trial")
    for column in ("arm", "seed", "trial", "search mean", "confirmed", "test mean ± SE", "margin", "normalised"):
        out.add_column(column, justify="right")
    for arm, result in arms.items():
        for r in result["runs"]:
            out.add_row(
                arm, str(r["seed"]), f"#{r['best_trial']}" + (f" ({r['best_baseline_name']})" if r["best_baseline_name"] else ""),
                f"{r['search_mean']:.3f}", "-" if r["confirmed_mean"] is None else f"{r['confirmed_mean']:.3f}",
                f"{r['test_mean']:.3f} ± {r['test_se']:.3f}" if r["test_se"] is not None else f"{r['test_mean']:.3f}",
                f"{r['test_mean'] - bar['test_mean']:+.3f}", f"{r['normalised']:.3f}",
            )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, required=True, help="the zoo to search on (one the defaults were not tuned on)")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--search-limit", type=int, default=200,
                        help="ps+selection: search items per task when the config searches the whole split")  # fmt: skip
    parser.add_argument("--workers", type=int, default=None, help="Ray workers (default: the config's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/search_quality.json"))
    args = parser.parse_args()
    console = wide_console()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="search-quality-"))
    try:
        base = config_on_zoo(args.config, args.zoo)
        workers = args.workers or base.ray.workers
        own = expert_own_scores(args.zoo)
        # Every arm's config first: an arm this tree cannot run is one line before anything runs.
        configs = {arm: [arm_config(arm, base, work, s, args.trials, workers, args.search_limit) for s in args.seeds] for arm in args.arms}
    except MergetuneError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)

    import ray

    ray.init(num_cpus=workers * base.ray.cpus_per_worker, include_dashboard=False, log_to_driver=False)
    try:
        baselines = baseline_run(variant(base, work, "baselines", seed=args.seeds[0]), own)
        bar_name = max(baselines, key=lambda name: baselines[name]["test_mean"])
        results: dict[str, dict] = {}
        for arm, arm_configs in configs.items():
            runs = []
            for config in arm_configs:
                console.rule(f"{arm}, seed {config.seed}")
                runs.append(search_run(config, own, console))
            results[arm] = {"runs": runs, "summary": arm_summary(runs, baselines[bar_name])}
    finally:
        ray.shutdown()

    title = f"search quality on {args.zoo}: {args.trials} trials, seeds {args.seeds}, {args.config}"
    singles = single_model_means(json.loads((args.zoo / "zoo.json").read_text())["accuracy"], objective_weights(base))
    console.print(table(results, baselines, bar_name, title, singles))
    console.print(runs_table(results, baselines[bar_name]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "commit": git_commit(), "config": args.config, "zoo": str(args.zoo), "trials": args.trials, "seeds": args.seeds,
        "workers": workers, "search_limit": args.search_limit, "expert_own_task": own,
        "baselines": baselines, "best_baseline": bar_name, "single_models": singles, "arms": results,
    }  # fmt: skip
    args.out.write_text(json.dumps(payload, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
