"""Experts with added tokens: merged by token with `tokenizer: {source: ...}` (as mergekit), or refused in one line.

Expert `a` adds 8 chat tokens, expert `c` adds 4 of them and 2 of its own (both resized their
embedding and head, as a chat fine-tune does); `b` keeps the base's vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from architectures import build_models
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from parity import assert_parity, load_tensors
from rich.console import Console
from safetensors.torch import load_file

from mergetune.cli.main import main
from mergetune.core.errors import ConfigError, ModelSetError
from mergetune.merge.engine import merge_recipe_to_dir
from mergetune.merge.recipe import Recipe
from mergetune.search.config import parse_study_config

optuna.logging.set_verbosity(optuna.logging.WARNING)
ADDED = ["<|im_start|>", "<|im_end|>", "<tool>", "</tool>", "<think>", "</think>", "<ok>", "<no>"]
C_ADDED = ADDED[:4] + ["<c1>", "<c2>"]
BASE_TOKENS = 99  # the character tokenizer
RULES = [{"match": "*", "method": "ties", "params": {"density": 0.5}}]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return build_models(tmp_path_factory.mktemp("vocab"), "llama", ("a", "b", "c"), seed=5, added_tokens={"a": ADDED, "c": C_ADDED})


def recipe(models: dict[str, str], **extra) -> Recipe:
    return Recipe.from_dict({"models": models, "base": "base", "rules": RULES, **extra})


def test_without_the_option_the_size_difference_is_one_line_naming_the_sizes_and_the_option(models, tmp_path, capsys):
    with pytest.raises(ModelSetError) as info:
        merge_recipe_to_dir(recipe(models), tmp_path / "out")
    message = str(info.value)
    assert "107 rows (tokens) in expert 'a' but 99 in base" in message and "tokenizer: {source: union}" in message
    (tmp_path / "recipe.yaml").write_text(recipe(models).to_yaml())
    with pytest.raises(SystemExit) as done:
        main(["merge", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and len(err.strip().splitlines()) == 1 and "tokenizer: {source: union}" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()


@pytest.mark.parametrize("source", ["union", "base", "a"])
def test_merged_by_token_exactly_as_mergekit(models, tmp_path, source):
    from transformers import AutoTokenizer

    ours = tmp_path / "ours"
    merge_recipe_to_dir(recipe(models, tokenizer={"source": source}), ours)
    config = {
        "merge_method": "ties", "base_model": models["base"], "dtype": "float32",
        "models": [{"model": models[e], "parameters": {"weight": 1.0, "density": 0.5}} for e in "abc"],
        "tokenizer": {"source": models["a"] if source == "a" else source},
    }  # fmt: skip
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mergekit"), options=MergeOptions(quiet=True))
    expected = {"union": ADDED + C_ADDED[4:], "base": [], "a": ADDED}[source]
    ours_vocab = AutoTokenizer.from_pretrained(ours).get_vocab()
    assert AutoTokenizer.from_pretrained(ours).convert_ids_to_tokens(list(range(BASE_TOKENS, len(ours_vocab)))) == expected
    # mergekit orders the union's new tokens by its models' hash order (it varies between runs); compare by token.
    theirs_vocab = AutoTokenizer.from_pretrained(tmp_path / "mergekit").get_vocab()
    assert set(theirs_vocab) == set(ours_vocab)
    order = torch.tensor([theirs_vocab[token] for token, _ in sorted(ours_vocab.items(), key=lambda item: item[1])])
    theirs = {name: t[order] if t.shape[0] == len(order) else t for name, t in load_tensors(tmp_path / "mergekit").items()}
    assert_parity(load_tensors(ours), theirs)
    for out in (ours, tmp_path / "mergekit"):
        assert json.loads((out / "config.json").read_text())["vocab_size"] == BASE_TOKENS + len(expected)


def test_rows_are_mapped_by_token_string(models, tmp_path):
    """Rows by token, not by id: `<c1>` is id 103 in c and 107 in the union, `<think>` is only a's."""
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    lone = Recipe.from_dict({"models": models, "base": "base", "tokenizer": {"source": "union"},
                             "rules": [{"match": "*", "method": "linear"}]})  # fmt: skip
    merge_recipe_to_dir(lone, out)
    merged = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    union = AutoTokenizer.from_pretrained(out).get_vocab()
    rows = {e: load_file(Path(models[e]) / "model.safetensors")["model.embed_tokens.weight"] for e in ("base", "a", "b", "c")}
    own = {e: AutoTokenizer.from_pretrained(models[e]).get_vocab() for e in ("a", "c")}
    # linear averages the experts. Only c has <c1>: every model takes c's row, so the merge is c's row.
    torch.testing.assert_close(merged[union["<c1>"]], rows["c"][own["c"]["<c1>"]])
    torch.testing.assert_close(merged[union["<think>"]], rows["a"][own["a"]["<think>"]])
    # <tool> is in a and c, not the base: a and c keep theirs, b takes their mean.
    tool = {e: rows[e][own[e]["<tool>"]] for e in ("a", "c")}
    torch.testing.assert_close(merged[union["<tool>"]], (tool["a"] + tool["c"] + (tool["a"] + tool["c"]) / 2) / 3)
    # A base token keeps its id: the plain average of the experts' rows.
    torch.testing.assert_close(merged[union["q"]], sum(rows[e][union["q"]] for e in "abc") / 3)


def test_padding_to_a_multiple_fills_with_the_mean_row(models, tmp_path):
    linear = Recipe.from_dict({"models": models, "base": "base", "tokenizer": {"source": "union", "pad_to_multiple_of": 16},
                               "rules": [{"match": "*", "method": "linear"}]})  # fmt: skip
    merge_recipe_to_dir(linear, tmp_path / "out")
    embed = load_file(tmp_path / "out" / "model.safetensors")["model.embed_tokens.weight"]
    assert embed.shape[0] == 112 and json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 112
    torch.testing.assert_close(embed[109], embed[:109].mean(dim=0))


def study_config(models: dict[str, str], tmp_path: Path, name: str, **extra):
    data_file = tmp_path / "chat.jsonl"
    data_file.write_text("".join(json.dumps({"prompt": f"<|im_start|>{w}=", "answer": w + "<|im_end|>"}) + "\n" for w in ("hi", "ok", "yes")))
    return parse_study_config(
        {
            "study": name,
            "models": {"base": models["base"], "experts": {e: models[e] for e in "abc"}},
            "evaluator": {"kind": "quick", "metrics": ["logprob"],
                          "tasks": {"chat": {"search": str(data_file), "test": str(data_file), "max_new_tokens": 4}}},
            "search": {"layer_groups": 1, "methods": ["linear", "ties"]},
            "budget": {"n_trials": 3},
            "storage": f"sqlite:///{tmp_path / 'studies.db'}",
            "ray": {"workers": 1},
            **extra,
        },
        "test",
    )  # fmt: skip


def test_a_study_without_the_option_is_refused_before_any_trial(models, tmp_path):
    from mergetune.search.driver import run_study
    from mergetune.studies.store import find_study

    config = study_config(models, tmp_path, "refused")
    with pytest.raises(ModelSetError, match=r"107 rows \(tokens\) in expert 'a' but 99 in base.*tokenizer: \{source: union\}"):
        run_study(config, console=Console(quiet=True))
    assert find_study("refused", config.storage_url) is None  # nothing was started or stored


def test_a_union_study_runs_and_its_export_carries_the_added_tokens(models, tmp_path, ray_session):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergetune.evaluators.base import HFBackend, build_evaluator
    from mergetune.search.driver import run_study
    from mergetune.studies.export import export_trial

    config = study_config(models, tmp_path, "union", tokenizer={"source": "union"})
    study = run_study(config, console=Console(quiet=True))
    complete = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(complete) == 3, [t.user_attrs.get("fail_reason") for t in study.trials]
    best = max(complete, key=lambda t: t.values[0])
    assert best.user_attrs["recipe"]["tokenizer"] == {"source": "union"}
    export_trial(study, best, tmp_path / "export", fmt="all")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert set(ADDED + C_ADDED) <= set(tokenizer.get_vocab()) and len(tokenizer) == BASE_TOKENS + 10
    assert tokenizer("<|im_start|>hi").input_ids[1] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # one token
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert model.get_input_embeddings().weight.shape[0] == BASE_TOKENS + 10
    scores = build_evaluator(config.evaluator).evaluate(HFBackend(model, tokenizer), "search")
    assert scores["chat.logprob"] == pytest.approx(best.user_attrs["scores"]["chat.logprob"], abs=1e-5)
    docs = list(yaml.safe_load_all((tmp_path / "export" / "mergekit.yaml").read_text()))
    merges = [doc for doc in docs if "name" in doc] or docs  # a multi-merge's intermediates, else the one config
    assert all(doc["tokenizer"] == {"source": "union"} for doc in merges)


def test_a_merged_vocabulary_is_not_pushed_into_a_vllm_engine_started_from_the_base(models, tmp_path):
    from mergetune.search.plan import checked_config

    config = study_config(models, tmp_path, "vllm", tokenizer={"source": "union"},
                          evaluator={"kind": "lm_eval", "backend": "vllm", "tasks": ["chat"]})  # fmt: skip
    with pytest.raises(ConfigError, match=r"evaluator.backend: vllm: tokenizer: the merged vocabulary \(109 tokens\)"):
        checked_config(config)


def test_the_source_must_name_a_model(models):
    with pytest.raises(ConfigError, match=r"tokenizer.source: 'd' is not base, union or one of models"):
        recipe(models, tokenizer={"source": "d"})
    with pytest.raises(ConfigError, match=r"tokenizer.source: 'base2' is not base, union or an expert"):
        study_config(models, Path("/tmp"), "x", tokenizer={"source": "base2"})

