"""Export one trial: our recipe YAML, mergekit YAML, and the merged model with a model card.

    DIR/recipe.yaml      re-runs with `mergetune merge DIR/recipe.yaml OUT`
    DIR/mergekit.yaml    `mergekit-yaml` (or `mergekit-multi` for per-layer methods); its header is the command
    DIR/*.safetensors, config.json, tokenizer files, README.md (model card)

A recipe with a data-flow path exports its path model (studies/dataflow_export.py): one layer per slot,
scales folded in, and a mergekit `passthrough` config when mergekit can express the path.

The whole directory is written atomically; an existing non-empty DIR needs `force`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import optuna
from optuna.trial import FrozenTrial

from mergetune.core.errors import MergetuneError
from mergetune.core.fs import atomic_output_dir, check_output_dir
from mergetune.core.versions import package_versions
from mergetune.merge.recipe import Recipe
from mergetune.studies.front import (
    confirmed_records,
    objective_names,
    recipe_summary,
    recorded_test_scores,
    search_errors,
    trial_recipe,
    with_error,
)
from mergetune.studies.mergekit import ModelLayout, mergekit_yaml, recipe_to_mergekit

log = logging.getLogger(__name__)

ExportFormat = Literal["model", "recipe", "mergekit", "all"]
RECIPE_FILE = "recipe.yaml"
MERGEKIT_FILE = "mergekit.yaml"


def export_trial(
    study: optuna.Study,
    trial: FrozenTrial,
    out: str | Path,
    *,
    fmt: ExportFormat = "all",
    force: bool = False,
    device: str = "cpu",
) -> Path:
    """Write the trial's exports into `out` (atomically); returns the output directory."""
    out = Path(out)
    check_output_dir(out, force)
    recipe = trial_recipe(trial)
    mergekit_text, mergekit_note = None, None
    if fmt in ("mergekit", "all"):
        try:
            mergekit_text = _mergekit_text(recipe)
        except MergetuneError as exc:
            if fmt == "mergekit":
                raise
            mergekit_note = str(exc)
            log.warning("no mergekit config for trial %d: %s", trial.number, exc)
    with atomic_output_dir(out, force=force) as tmp:
        if fmt in ("model", "all"):
            if recipe.dataflow is not None:
                from mergetune.studies.dataflow_export import write_path_model

                write_path_model(recipe, tmp, device=device)
            else:
                from mergetune.merge.engine import merge_recipe_to_dir

                merge_recipe_to_dir(recipe, tmp, seed=recipe.seed, device=device, force=True)
            (tmp / "README.md").write_text(model_card(study, trial, recipe, mergekit_note))
        if fmt in ("recipe", "all"):
            (tmp / RECIPE_FILE).write_text(recipe.to_yaml())
        if mergekit_text is not None:
            (tmp / MERGEKIT_FILE).write_text(mergekit_text)
    return out


def _mergekit_text(recipe: Recipe) -> str:
    if recipe.dataflow is None:
        layout = ModelLayout.from_recipe(recipe)
        return mergekit_yaml(recipe, recipe_to_mergekit(recipe, layout), layout)
    from mergetune.studies.dataflow_export import passthrough_config, passthrough_problem

    problem = passthrough_problem(recipe)
    if problem is not None:
        raise MergetuneError(problem)
    merged = recipe.model_copy(update={"dataflow": None})
    if recipe.rules:
        layout = ModelLayout.from_recipe(merged)
        ps_config = recipe_to_mergekit(merged, layout)
        dtype = layout.out_dtype
    else:
        ps_config, dtype = None, recipe.dtype or _stored_dtype(recipe.models[recipe.base or "base"])
    config = passthrough_config(recipe, ps_config, dtype)
    return mergekit_yaml(recipe, config)


def _stored_dtype(model_dir: str) -> str:
    import json

    data = json.loads((Path(model_dir) / "config.json").read_text())
    return str(data.get("dtype") or data.get("torch_dtype") or "float32")


def model_card(study: optuna.Study, trial: FrozenTrial, recipe: Recipe, mergekit_note: str | None = None) -> str:
    """README.md of an exported model: provenance, search and test scores, the recipe."""
    names = objective_names(study)
    test = recorded_test_scores(study).get(trial.number, {})
    versions = package_versions()
    lines = [
        "---",
        "tags: [merge, mergetune]",
        "---",
        f"# {study.study_name} — trial {trial.number}",
        "",
        f"A merge of {', '.join(recipe.experts)}"
        + (f" onto `{recipe.base}`" if recipe.base else "")
        + f", found by mergetune {versions['mergetune']} (study `{study.study_name}`, trial {trial.number}"
        + (f", warm-start baseline `{trial.user_attrs['baseline']}`" if trial.user_attrs.get("baseline") else "")
        + ").",
        "",
        f"Methods: {recipe_summary(recipe)}",
        "",
        "| objective | search split (± SE) | confirmed (more search items) | test split |",
        "|---|---|---|---|",
    ]
    again = confirmed_records(study).get(trial.number, {}).get("scores", {})
    for name, value, se in zip(names, trial.values, search_errors(study, trial)):
        test_value = test.get(name)
        confirmed = "not re-scored" if name not in again else f"{with_error(again[name]['score'], again[name].get('se'))} ({again[name]['items']} items)"
        lines.append(
            f"| {name} | {with_error(value, se)} | {confirmed} | {'not scored' if test_value is None else f'{test_value:.4f}'} |"
        )
    if not test:
        lines += ["", "Test-split scores: run `mergetune front --study NAME --evaluate test`, then export again."]
    lines += ["", "## Recipe", "", f"Re-run with `mergetune merge {RECIPE_FILE} OUT`:", "", "```yaml", recipe.to_yaml().rstrip(), "```"]
    if mergekit_note:
        lines += ["", f"No mergekit config: {mergekit_note}"]
    lines += ["", "## Versions", ""] + [f"- {k} {v}" for k, v in versions.items()]
    return "\n".join(lines) + "\n"
