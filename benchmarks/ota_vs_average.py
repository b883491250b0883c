"""OTA and OTA+FFG against uniform averaging on a zoo: per-task exact match on the held-out `test` split.

Merges each recipe into one live model (the search worker's path) and scores it with the
quick evaluator; also prints how far each merge's weights are from the uniform average, so
"OTA differs from averaging" is visible in the weights as well as in the scores.

    .venv/bin/python benchmarks/ota_vs_average.py [--zoo zoo-demo] [--split test]

Prints a table and writes benchmarks/results/ota_vs_average.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from _common import git_commit  # benchmarks/, the script's own folder
from mergetune.evaluators.base import HFBackend, build_evaluator
from mergetune.merge.resident import ResidentModelSet
from mergetune.merge.recipe import Recipe
from mergetune.search.config import parse_study_config
from mergetune.search.workers import load_modelset

RESULTS = Path(__file__).resolve().parent / "results"

# (label, method, params): FFG keeps the top-ρ saliencies v·τ² of each expert (density = ρ).
RECIPES = (
    ("uniform average", "linear", {}),
    ("task arithmetic λ=1", "task_arithmetic", {"lambda": 1.0}),
    ("OTA (√v weights)", "ota", {}),
    ("OTA + FFG ρ=0.5", "ota", {"density": 0.5}),
    ("OTA + FFG ρ=0.2", "ota", {"density": 0.2}),
    ("OTA + FFG ρ=0.2 global", "ota", {"density": 0.2, "scope": "global"}),
)


def recipe_for(config, method: str, params: dict) -> Recipe:
    models = {"base": config.models.base, **config.models.experts}
    statistics_paths = {"moments": config.models.moments} if method == "ota" else {}
    return Recipe.from_dict(
        {"base": "base", "models": models, **statistics_paths, "rules": [{"match": "*", "method": method, "params": params}]}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="zoo-demo")
    parser.add_argument("--split", default="test", choices=["search", "test"])
    args = parser.parse_args()
    console = Console()
    config = parse_study_config({"study": "ota-vs-average", "zoo": args.zoo}, "ota_vs_average")
    resident = ResidentModelSet.load(load_modelset(config), device="cpu")
    backend = HFBackend.from_pretrained(config.models.base, "cpu")
    evaluator = build_evaluator(config.evaluator)
    tasks = [o.name for o in evaluator.objectives]

    rows, average = [], None
    for label, method, params in RECIPES:
        resident.merge_into(recipe_for(config, method, params), backend.weight_sink(), seed=0)
        weights = torch.cat([p.detach().flatten().clone() for p in backend.model.parameters()])
        if average is None:
            average = weights
        scores = evaluator.evaluate(backend, split=args.split)
        rows.append(
            {
                "recipe": label,
                "method": method,
                "params": params,
                "scores": scores,
                "mean": statistics.fmean(scores.values()),
                "rel_l2_to_average": float((weights - average).norm() / average.norm()),
            }
        )

    table = Table(title=f"{args.zoo}: exact match on `{args.split}`")
    for column in ("recipe", *tasks, "mean", "‖θ − θ_avg‖/‖θ_avg‖"):
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for row in rows:
        table.add_row(
            row["recipe"], *(f"{row['scores'][t]:.3f}" for t in tasks), f"{row['mean']:.3f}", f"{row['rel_l2_to_average']:.4f}"
        )
    console.print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "ota_vs_average.json"
    out.write_text(json.dumps({"zoo": args.zoo, "split": args.split, "commit": git_commit(), "rows": rows}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
