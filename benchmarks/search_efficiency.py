"""Search-efficiency benchmark: mergetune's default search vs NSGA-II, a mergekit-evolve-style CMA-ES, random
search and the fixed default recipes, at equal trial budgets over several seeds.

    .venv/bin/python benchmarks/search_efficiency.py [--config configs/demo.yaml] [--trials 60] [--seeds 0 1 2]
        [--arms default nsga2 cmaes_evolve random defaults] [--pruning] [--workers 2]
        [--out benchmarks/results/search_efficiency.json]

Arms:
  default          the config as is (TPE multivariate + M³ prior + warm start, per-layer method choice)
  nsga2            the same with NSGA-II
  cmaes_evolve     mergekit-evolve's search re-created: dare_ties everywhere, per-group weight + density per
                   expert (lambda fixed at 1), CMA-ES from x0 = (weights 1/K, density 1) with σ0 = 1/6 in the
                   [0, 1]-normalised space, one objective = the mean task score; no warm start, no M³ prior.
                   Optuna's CMA-ES needs one finished trial to learn the space, so x0 itself is trial 0
                   (with W workers, the W−1 trials asked before it finishes are uniform draws).
  random           random search over our space; no warm start, no prior
  defaults         the warm-start baselines (search/warmstart.py) scored as they are; no search
  default+pruning  `default` with two-stage pruning on (added by --pruning)

Per arm (mean ± sample std over seeds): the best trial's mean `test` score (best = highest mean search
score), trials until the mean search score reaches the best default recipe's, the hypervolume on `test` of
the search-score Pareto front (reference point 0, scores maximised in [0, 1]), wall time and finished
trials/hour. Prints a table, writes the JSON (with the git commit) and a PNG of the best-so-far mean search
score vs trial number (mean over seeds) next to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from mergetune.merge.recipe import Recipe
from mergetune.search.config import StudyConfig, load_study_config
from mergetune.search.driver import run_study
from mergetune.studies.storage import open_storage
from mergetune.search.space import SearchSpace, weight_param
from mergetune.search.warmstart import baseline_params
from mergetune.search.workers import TrialWorker
from mergetune.studies.scoring import score_recipes_on_split

from _common import git_commit, trials_per_hour, variant, wide_console  # benchmarks/, the script's own folder

SEARCH_ARMS = ("default", "nsga2", "cmaes_evolve", "random")
ARMS = (*SEARCH_ARMS, "defaults")
PRUNING_ARM = "default+pruning"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class MeanScoreWorker(TrialWorker):
    """The trial worker with one more objective, `mean`: the unweighted mean of the task scores
    (mergekit-evolve's single objective)."""

    def objectives(self) -> list[tuple[str, str]]:
        return [*super().objectives(), ("mean", "maximize")]

    def run(self, recipe: dict, seed: int) -> dict[str, object]:
        result = super().run(recipe, seed)
        if "scores" in result:
            result["scores"]["mean"] = statistics.fmean(result["scores"].values())
        return result


def arm_config(arm: str, base: StudyConfig, work: Path, seed: int, trials: int, workers: int) -> StudyConfig:
    common = {"seed": seed, "budget": {"n_trials": trials}, "ray": {"workers": workers}}
    name = f"{arm.replace('+', '-')}-s{seed}"
    if arm in ("default", "defaults"):
        return variant(base, work, name, **common)
    if arm == PRUNING_ARM:
        return variant(base, work, name, pruning={"enabled": True}, **common)
    if arm == "nsga2":
        return variant(base, work, name, sampler={"name": "nsga2"}, **common)
    if arm == "random":
        return variant(base, work, name, sampler={"name": "random", "m3_prior": None}, warm_start=False, **common)
    assert arm == "cmaes_evolve"
    return variant(
        base, work, name,
        search={"methods": ["dare_ties"], "ranges": {"lambda": (1.0, 1.0)}, "per_expert": ["density"], "shared": []},
        sampler={"name": "cmaes", "m3_prior": None}, objectives=[{"name": "mean"}], warm_start=False, **common,
    )  # fmt: skip


def evolve_x0(config: StudyConfig) -> dict[str, object]:
    """mergekit-evolve's starting point as trial params: dare_ties, weights 1/K, density 1, lambda 1."""
    space = SearchSpace(config)
    params = space.uniform_params("dare_ties", {"density": 1.0, "lambda": 1.0})
    for group in space.groups:
        params.update({weight_param(group.name, e): 1.0 / len(space.experts) for e in space.experts})
    return params


def run_cmaes_evolve(config: StudyConfig, console: Console) -> optuna.Study:
    x0 = evolve_x0(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # x0/sigma0 are deprecated in Optuna 4.9+, still supported
        sampler = optuna.samplers.CmaEsSampler(
            x0={k: v for k, v in x0.items() if not k.endswith((".method", ".lambda"))}, sigma0=1 / 6, seed=config.seed,
            warn_independent_sampling=False,
        )  # fmt: skip
    study = optuna.create_study(study_name=config.study, storage=open_storage(config.storage_url, create=True), direction="maximize")
    study.enqueue_trial(x0)
    return run_study(config, console=console, worker_cls=MeanScoreWorker, sampler=sampler)


def pareto_front(points: list[list[float]]) -> list[int]:
    """Indices of the points no other point weakly dominates with one strict gain (all maximised)."""
    array = np.asarray(points)
    return [
        i for i, p in enumerate(array)
        if not any(np.all(q >= p) and np.any(q > p) for j, q in enumerate(array) if j != i)
    ]  # fmt: skip


def hypervolume(points: list[list[float]]) -> float:
    """Hypervolume dominated by maximised scores in [0, 1] above the reference point 0 (Optuna's exact WFG)."""
    from optuna._hypervolume import compute_hypervolume  # not public in Optuna 5.0; exact for any dimension

    if not points:
        return 0.0
    return float(compute_hypervolume(-np.asarray(points, dtype=float), np.zeros(len(points[0]))))


def scored_run(config: StudyConfig, tasks: list[str], trials: list[dict], reference: float, wall: float) -> dict:
    """Best, reach, front and hypervolume of one run; `trials` are finished trials in order, each
    {number, recipe, scores (task → search score, None if pruned)}."""
    means = [statistics.fmean(t["scores"][n] for n in tasks) if t["scores"] else None for t in trials]
    complete = [i for i, m in enumerate(means) if m is not None]
    best = max(complete, key=lambda i: means[i])
    front = [complete[i] for i in pareto_front([[trials[i]["scores"][n] for n in tasks] for i in complete])]
    picked = [best, *(i for i in front if i != best)]
    test = score_recipes_on_split(config, [Recipe.from_dict(trials[i]["recipe"]) for i in picked], "test")
    test_of = dict(zip(picked, test))
    curve, running = [], None
    for m in means:
        running = m if running is None or (m is not None and m > running) else running
        curve.append(running)
    reach = next((k + 1 for k, m in enumerate(means) if m is not None and m >= reference - 1e-12), None)
    return {
        "seed": config.seed,
        "wall_s": wall,
        "finished": len(trials),
        "pruned": len(trials) - len(complete),
        "best_trial": trials[best]["number"],
        "best_search_mean": means[best],
        "best_test_mean": statistics.fmean(test_of[best][n] for n in tasks),
        "best_default_search_mean": reference,
        "trials_to_reach_best_default": reach,
        "front_size": len(front),
        "hypervolume_test": hypervolume([[test_of[i][n] for n in tasks] for i in front]),
        "best_so_far": curve,
    }


def study_trials(study: optuna.Study, tasks: list[str]) -> list[dict]:
    done = sorted(study.get_trials(deepcopy=False, states=FINISHED), key=lambda t: t.number)
    return [
        {
            "number": t.number,
            "recipe": t.user_attrs["recipe"],
            "scores": {n: t.user_attrs["scores"][n] for n in tasks} if t.state == TrialState.COMPLETE else None,
        }
        for t in done
    ]


def default_recipes(config: StudyConfig) -> list[dict]:
    """The warm-start baselines as finished 'trials' (numbered as the warm start numbers them), scored on search."""
    space = SearchSpace(config)
    recipes = [space.recipe(optuna.trial.FixedTrial(params, number=i)) for i, (_, params) in enumerate(baseline_params(space))]
    scores = score_recipes_on_split(config, recipes, "search")
    return [{"number": i, "recipe": r.to_dict(), "scores": s} for i, (r, s) in enumerate(zip(recipes, scores))]


def spread(values: list[float], spec: str = ".3f") -> str:
    """Mean ± sample standard deviation over seeds."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:{spec}} ± {statistics.stdev(values):{spec}}" if len(values) > 1 else f"{mean:{spec}}"


def summarise(runs: list[dict]) -> dict:
    reached = [r["trials_to_reach_best_default"] for r in runs if r["trials_to_reach_best_default"] is not None]
    rates = [r["trials_per_hour"] for r in runs if r.get("trials_per_hour")]
    return {
        "best_test_mean": [r["best_test_mean"] for r in runs],
        "trials_to_reach_best_default": reached,
        "reached": f"{len(reached)}/{len(runs)}",
        "hypervolume_test": [r["hypervolume_test"] for r in runs],
        "wall_s": [r["wall_s"] for r in runs],
        "trials_per_hour": rates,
        "pruned": [r["pruned"] for r in runs],
    }


def plot(arms: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for arm, result in arms.items():
        if arm == "defaults":  # no search: the best default recipe is a level, not a curve
            level = statistics.fmean(r["best_search_mean"] for r in result["runs"])
            axes.axhline(level, color="grey", linestyle="--", label="best default recipe")
            continue
        curves = [r["best_so_far"] for r in result["runs"]]
        length = max(len(c) for c in curves)
        mean_curve = [
            statistics.fmean(c[k] for c in curves if k < len(c) and c[k] is not None)
            if any(k < len(c) and c[k] is not None for c in curves) else np.nan
            for k in range(length)
        ]  # fmt: skip
        axes.plot(range(1, length + 1), mean_curve, label=arm)
    axes.set_xlabel("trial")
    axes.set_ylabel("best-so-far mean search score")
    axes.set_title("search efficiency (mean over seeds)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=[*ARMS, PRUNING_ARM], default=list(ARMS))
    parser.add_argument("--pruning", action="store_true", help=f"add the arm {PRUNING_ARM} (default with pruning on)")
    parser.add_argument("--workers", type=int, default=None, help="Ray workers (default: the config's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/search_efficiency.json"))
    args = parser.parse_args()
    arms = list(dict.fromkeys([*args.arms, *([PRUNING_ARM] if args.pruning else [])]))
    console = wide_console()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = load_study_config(args.config)
    workers = args.workers or base.ray.workers
    work = Path(tempfile.mkdtemp(prefix="search-efficiency-"))

    import ray

    ray.init(num_cpus=workers * base.ray.cpus_per_worker, include_dashboard=False, log_to_driver=False)
    try:
        # The best default recipe's mean search score, per seed: the bar every arm is timed to reach.
        defaults = {}
        for seed in args.seeds:
            config = arm_config("defaults", base, work, seed, args.trials, workers)
            started = time.perf_counter()
            defaults[seed] = (config, default_recipes(config), time.perf_counter() - started)
        tasks = list(defaults[args.seeds[0]][1][0]["scores"])
        results: dict[str, dict] = {}
        for arm in arms:
            runs = []
            for seed in args.seeds:
                default_config, default_trials, default_wall = defaults[seed]
                reference = max(statistics.fmean(t["scores"].values()) for t in default_trials)
                if arm == "defaults":
                    runs.append(scored_run(default_config, tasks, default_trials, reference, default_wall))
                    continue
                config = arm_config(arm, base, work, seed, args.trials, workers)
                console.rule(f"{arm}, seed {seed}")
                started = time.perf_counter()
                study = run_cmaes_evolve(config, console) if arm == "cmaes_evolve" else run_study(config, console=console)
                wall = time.perf_counter() - started
                run = scored_run(config, tasks, study_trials(study, tasks), reference, wall)
                run["trials_per_hour"] = trials_per_hour(study, FINISHED)
                runs.append(run)
            results[arm] = {"runs": runs, "summary": summarise(runs)}
    finally:
        ray.shutdown()

    table = Table(title=f"search efficiency: {args.trials} trials, seeds {args.seeds}, {args.config}")
    for column in ("arm", "best test", "trials to best default", "HV test", "wall s", "trials/h", "pruned"):
        table.add_column(column, justify="right", no_wrap=column == "arm")
    for arm, result in results.items():
        s = result["summary"]
        reach = f"{spread(s['trials_to_reach_best_default'], '.1f')} ({s['reached']})" if arm != "defaults" else "-"
        table.add_row(
            arm, spread(s["best_test_mean"]), reach, spread(s["hypervolume_test"]), spread(s["wall_s"], ".0f"),
            f"{statistics.fmean(s['trials_per_hour']):.0f}" if s["trials_per_hour"] else "-",
            f"{statistics.fmean(s['pruned']):.1f}",
        )  # fmt: skip
    console.print(table)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "commit": git_commit(), "config": args.config, "trials": args.trials, "seeds": args.seeds,
        "workers": workers, "tasks": tasks, "arms": results,
    }  # fmt: skip
    args.out.write_text(json.dumps(payload, indent=2))
    png = args.out.with_suffix(".png")
    plot(results, png)
    console.print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
