"""Calibration statistics: diagonal Fisher and RegMean Gram files, keyed like the model's tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_studies_fixtures import build_tiny_models

from mergetune.cli.main import main
from mergetune.core.errors import ConfigError
from mergetune.merge.modelset import ModelSet
from mergetune.merge.stats import diagonal_fisher, encode, gram_matrices, load_model, read_calibration

torch.set_num_threads(1)

RECORDS = [{"prompt": "rev abc=", "answer": "cba"}, {"prompt": "sort dcab=", "answer": "abcd"}, {"prompt": "add 1 2=", "answer": "3"}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[dict[str, str], Path]:
    root = tmp_path_factory.mktemp("stats")
    models = build_tiny_models(root)
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return models, data


def test_fisher_is_the_mean_of_per_example_squared_gradients(setup, tmp_path):
    models, data = setup
    out = tmp_path / "F.safetensors"
    with pytest.raises(SystemExit) as info:
        main(["stats", "fisher", models["math"], "--data", str(data), "--out", str(out)])
    assert info.value.code == 0
    fisher = load_file(out)
    model, tokenizer = load_model(models["math"])
    assert set(fisher) == {name for name, _ in model.named_parameters()}
    with safe_open(out, framework="pt") as f:
        assert f.metadata()["examples"] == "3"
    # By hand: per-example loss on the answer tokens (+ </s>), squared gradients, mean.
    want = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for record in RECORDS:
        prompt = tokenizer(record["prompt"])["input_ids"]
        ids = torch.tensor([prompt + tokenizer(record["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]])
        labels = ids.clone()
        labels[0, : len(prompt)] = -100
        model.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        for name, p in model.named_parameters():
            want[name] += p.grad.square() / len(RECORDS)
    for name, value in want.items():
        torch.testing.assert_close(fisher[name], value, rtol=1e-4, atol=1e-12)
    assert fisher["model.layers.0.mlp.up_proj.weight"].abs().sum() > 0


def test_gram_is_xtx_over_tokens_of_each_linear_input(setup, tmp_path):
    models, data = setup
    out = tmp_path / "G.safetensors"
    with pytest.raises(SystemExit) as info:
        main(["stats", "gram", models["code"], "--data", str(data), "--out", str(out), "--batch-size", "2"])
    assert info.value.code == 0
    gram = load_file(out)
    model, tokenizer = load_model(models["code"])
    linear = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(gram) == set(linear)
    for name, module in linear.items():
        assert gram[name].shape == (module.in_features, module.in_features)
    # By hand for layer 0's q_proj: its input is input_layernorm(embeddings), padding excluded.
    rows = []
    with torch.no_grad():
        for ids, _ in encode(tokenizer, RECORDS):
            hidden = model.model.embed_tokens(torch.tensor([ids]))
            rows.append(model.model.layers[0].input_layernorm(hidden)[0])
    x = torch.cat(rows)
    torch.testing.assert_close(gram["model.layers.0.self_attn.q_proj.weight"], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    # The file is accepted as the expert's Gram statistics.
    modelset = ModelSet.from_dirs(Path(models["base"]), {"code": Path(models["code"])}, gram={"code": out})
    assert modelset.stats["gram"]["code"].key("lm_head.weight") == "lm_head.weight"


def test_gram_batching_does_not_change_the_result(setup):
    models, _ = setup
    model, tokenizer = load_model(models["base"])
    examples = encode(tokenizer, RECORDS)
    one, many = gram_matrices(model, examples, batch_size=1), gram_matrices(model, examples, batch_size=3)
    for name in one:
        torch.testing.assert_close(one[name], many[name], rtol=1e-4, atol=1e-6)
    assert diagonal_fisher(model, examples[:1])["lm_head.weight"].shape == model.lm_head.weight.shape


def test_bad_calibration_data_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a="}\n{"answer": "x"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: expected a JSON object with a \"prompt\""):
        read_calibration(bad)
    with pytest.raises(ConfigError, match="not found"):
        read_calibration(tmp_path / "missing.jsonl")


def test_regmean_merges_with_computed_grams(setup, tmp_path):
    from mergetune.merge.engine import merge_recipe_to_dir
    from mergetune.merge.recipe import Recipe

    models, data = setup
    grams = {}
    for name in ("math", "code"):
        grams[name] = str(tmp_path / f"{name}.safetensors")
        assert main_exit(["stats", "gram", models[name], "--data", str(data), "--out", grams[name]]) == 0
    recipe = Recipe.from_dict({"models": models, "base": "base", "rules": [{"method": "regmean"}], "gram": grams})
    merge_recipe_to_dir(recipe, tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    a, b = (load_file(Path(models[n]) / "model.safetensors") for n in ("math", "code"))
    name = "model.layers.0.self_attn.q_proj.weight"
    ga, gb = (load_file(grams[n])[name] for n in ("math", "code"))
    want = torch.linalg.solve(ga + gb, ga @ a[name].T + gb @ b[name].T).T
    torch.testing.assert_close(out[name], want, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(out["model.norm.weight"], (a["model.norm.weight"] + b["model.norm.weight"]) / 2)


def main_exit(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code
