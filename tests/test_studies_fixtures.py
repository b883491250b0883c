"""Builders shared by the studies/export/report tests: tiny Llama models and synthetic Optuna studies."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import optuna
import pytest

from mergetune.merge.recipe import Recipe

EXPERTS = ("math", "code")


def build_tiny_models(
    root: Path, num_layers: int = 2, seed: int = 0, experts: tuple[str, ...] = EXPERTS, dtype: str = "float32"
) -> dict[str, str]:
    """base + experts (two by default; Llama, hidden 32) saved as safetensors (in `dtype`) with the char tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergetune.zoo.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config)
    paths = {}
    for i, name in enumerate(("base", *experts)):
        model = LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        if name != "base":
            generator = torch.Generator().manual_seed(seed + 100 + i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=generator))
        path = root / name
        model.to(getattr(torch, dtype)).save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        paths[name] = str(path)
    return paths


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_tiny_models(tmp_path_factory.mktemp("tiny_zoo"))


def linear_recipe(models: dict[str, str], w: float) -> Recipe:
    return Recipe.from_dict(
        {
            "models": models,
            "base": "base",
            "rules": [
                {"layers": [0, 1], "method": "linear", "weights": {"math": w, "code": 1 - w}},
                {"match": "*", "method": "linear", "weights": {"math": 1 - w, "code": w}},
            ],
        }
    )


def make_study(
    storage: str, models: dict[str, str], n_trials: int = 12, name: str = "synthetic", seed: int = 0, se: float | None = None
) -> optuna.Study:
    """A two-objective study whose trials carry the search driver's user attrs (recipe, scores, baseline;
    with `se`, every score's standard error)."""
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "maximize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["arith", "code"])
    study.set_user_attr(
        "config",
        {"study": name, "objectives": [{"name": "arith", "weight": 2.0}, {"name": "code", "weight": 1.0}]},
    )
    rng = random.Random(seed)
    for i in range(n_trials):
        trial = study.ask()
        w = trial.suggest_float("g0.weight", 0.0, 1.0)
        trial.suggest_categorical("g0.method", ["linear"])
        recipe = linear_recipe(models, w)
        scores = {"arith": w + 0.1 * rng.random(), "code": 1 - w + 0.1 * rng.random()}
        trial.set_user_attr("recipe", recipe.to_dict())
        trial.set_user_attr("scores", scores)
        if se is not None:
            trial.set_user_attr("score_se", {name: se for name in scores})
        trial.set_user_attr("timings", {"merge_s": 0.1, "eval_s": 0.2})
        if i < 2:
            trial.set_user_attr("baseline", ["uniform", "task_arithmetic"][i])
        study.tell(trial, [scores["arith"], scores["code"]])
    failed = study.ask()
    failed.set_user_attr("fail_reason", "synthetic failure")
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    return study
