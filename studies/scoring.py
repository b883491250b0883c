"""Held-out re-scoring: merge recipes into one live model (the search worker's path) and score a split."""

from __future__ import annotations

import logging

from rich.progress import Progress

from mergetune.merge.recipe import Recipe
from mergetune.search.config import StudyConfig, parse_study_config

log = logging.getLogger(__name__)


def score_recipes_on_split(
    config: StudyConfig | dict, recipes: list[Recipe], split: str = "test", device: str = "cpu"
) -> list[dict[str, float]]:
    """Scores of each recipe on `split`, loading the model set, live model and evaluator once."""
    summaries = summarise_recipes_on_split(config, recipes, split, device)
    return [{name: float(s["score"]) for name, s in summary.items()} for summary in summaries]


def summarise_recipes_on_split(
    config: StudyConfig | dict, recipes: list[Recipe], split: str = "test", device: str = "cpu"
) -> list[dict[str, dict]]:
    """Per recipe, per objective on `split`: the score with its standard error and item count (the
    evaluator's `summarise`), loading the model set, live model and evaluator once."""
    from mergetune.evaluators.base import build_evaluator, load_backend
    from mergetune.merge.resident import ResidentModelSet
    from mergetune.search.plan import resident_placement
    from mergetune.search.workers import apply_recipe, load_modelset, load_path_model

    if isinstance(config, dict):
        config = parse_study_config(config, "study config")
    assert config.models is not None and config.evaluator is not None
    modelset = load_modelset(config)
    backend = load_backend(config.evaluator, config.models.base, device, modelset.vocabulary)  # the engine before the inputs
    paths = load_path_model(config, backend)
    resident = None if config.search.space == "dataflow" else ResidentModelSet.load(modelset, device=device, placement=resident_placement(config))
    evaluator = build_evaluator(config.evaluator)
    results = []
    with Progress(transient=True) as progress:
        task = progress.add_task(f"scoring on {split}", total=len(recipes))
        for recipe in recipes:
            apply_recipe(recipe, backend, resident, paths, recipe.seed)
            results.append(evaluator.summarise(backend, split=split))
            progress.advance(task)
    return results
