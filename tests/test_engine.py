"""The merge engine: streaming disk merges, resident re-merges into a live model, validation and statistics plumbing."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_studies_fixtures import build_tiny_models

from mergetune.cli.main import main
from mergetune.core.errors import ModelSetError
from mergetune.merge.engine import merge_recipe_to_dir
from mergetune.merge.methods import TensorInputs, register
from mergetune.merge.modelset import MOMENTS_FILE, ModelSet, StatsFile, rebuild_stat
from mergetune.merge.resident import ResidentModelSet
from mergetune.merge.order_stats import TensorOrder
from mergetune.merge.sparsify import topk_mask
from mergetune.merge.thresholds import GlobalThresholds, SummaryThresholds
from mergetune.merge.moments import compress_moments, rank1_reconstruct, rank1_reconstruct_slice
from mergetune.merge.recipe import Recipe
from mergetune.merge.methods.gta import top_selection
from mergetune.merge.sinks import LiveModelSink

torch.set_num_threads(1)


# Test-only methods (unique names) that expose what the engine hands a method.
@register("_test_reads_moments", needs=("moments",))
def _reads_moments(x: TensorInputs) -> torch.Tensor:
    return x.moments[0]


@register("_test_reads_gram", needs=("gram",))
def _reads_gram(x: TensorInputs) -> torch.Tensor:
    return x.base if x.gram is None else x.base + x.gram[0].sum()


@register("_test_global_mask")
def _global_mask(x: TensorInputs, *, keep: float = 0.5) -> torch.Tensor:
    return x.base + x.deltas[0] * top_selection(x, "magnitude", 0, keep, "global").mask(x.deltas[0].abs())


@register("_test_fails_on_layer_1")
def _fails_on_layer_1(x: TensorInputs) -> torch.Tensor:
    if ".layers.1." in x.name:
        raise RuntimeError("boom")
    return x.base


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    paths = build_tiny_models(tmp_path_factory.mktemp("engine_zoo"))
    for i, name in enumerate(("math", "code")):
        state = load_file(Path(paths[name]) / "model.safetensors")
        gen = torch.Generator().manual_seed(i)
        moments = {k: torch.rand(v.shape, generator=gen) * 1e-12 for k, v in state.items()}
        save_file(moments, Path(paths[name]) / MOMENTS_FILE, metadata={"step": "10", "beta2": "0.999"})
    return paths


def _recipe(models: dict[str, str], rules: list[dict], **extra) -> Recipe:
    return Recipe.from_dict({"models": models, "base": "base", "rules": rules, **extra})


def _state(path: str | Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_linear_merge_equals_hand_average(models, tmp_path):
    recipe = _recipe(models, [{"method": "linear", "weights": {"math": 0.3, "code": 0.9}}])
    merge_recipe_to_dir(recipe, tmp_path / "out")
    out = _state(tmp_path / "out")
    a, b = _state(models["math"]), _state(models["code"])
    for name, tensor in out.items():
        torch.testing.assert_close(tensor, (0.3 * a[name] + 0.9 * b[name]) / 1.2, rtol=1e-6, atol=1e-7)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors", "README.md"} <= files
    assert MOMENTS_FILE not in files


def test_unmatched_tensors_keep_the_base(models, tmp_path):
    recipe = _recipe(models, [{"layers": [0, 1], "method": "linear"}])
    merge_recipe_to_dir(recipe, tmp_path / "out", progress=True)
    out, base, a, b = (load_file(Path(p) / "model.safetensors") for p in (tmp_path / "out", models["base"], models["math"], models["code"]))
    for name in out:
        want = (a[name] + b[name]) / 2 if ".layers.0." in name else base[name]
        torch.testing.assert_close(out[name], want)


def test_resident_merge_into_live_model_equals_disk_merge(models, tmp_path):
    from transformers import AutoModelForCausalLM

    modelset = ModelSet.from_dirs(Path(models["base"]), {"math": Path(models["math"]), "code": Path(models["code"])})
    resident = ResidentModelSet.load(modelset)
    live = AutoModelForCausalLM.from_pretrained(models["base"])
    first = _recipe(models, [{"method": "linear", "weights": {"math": 1.0, "code": 0.0}}])
    second = _recipe(
        models,
        [
            {"layers": [1, 2], "method": "_test_global_mask", "params": {"keep": 0.3}, "models": ["code"]},
            {"match": "*.mlp.*", "method": "task_arithmetic", "params": {"lambda": [0.7, 1.3], "normalize": True}, "weights": {"math": [0.5, 1.0], "code": 2.0}},
            {"match": "*.self_attn.*", "method": "task_arithmetic", "weights": {"math": 0.5, "code": -0.5}},
            {"match": "*", "method": "linear", "weights": {"math": 0.25, "code": 0.75}},
        ],
    )
    timings = resident.merge_into(first, LiveModelSink(live), seed=0)
    assert set(timings) == {"merge_compute_s", "merge_write_s"} and all(v >= 0 for v in timings.values())
    resident.merge_into(second, LiveModelSink(live), seed=0)  # overwrites every tensor of the first merge
    merge_recipe_to_dir(second, tmp_path / "out")
    expected = _state(tmp_path / "out")
    for name, tensor in live.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-7)
    # The global threshold keeps ~30% of the code expert's |τ| over all its tensors, not per tensor.
    base, code = load_file(Path(models["base"]) / "model.safetensors"), load_file(Path(models["code"]) / "model.safetensors")
    tau = torch.cat([(code[k] - base[k]).flatten() for k in base])
    threshold = tau.abs().kthvalue(tau.numel() - int(0.3 * tau.numel()) + 1).values
    name = "model.layers.1.mlp.up_proj.weight"
    d = code[name] - base[name]
    torch.testing.assert_close(expected[name], base[name] + d * (d.abs() >= threshold))


def _kept(cut, name: str, scores: torch.Tensor) -> torch.Tensor:
    """A tensor's keep-mask under a global cut: its top `cut.count` entries in its sort order."""
    order = TensorOrder.build(scores)
    return order.top(cut.count(name, order.count_greater(cut.threshold))).mask(scores)


def test_global_thresholds_histogram_and_summaries_match_exact():
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, generator=gen).exp() for n in (1000, 37, 5000)] + [torch.zeros(300)]
    chunks[0][:200] = chunks[0][0]  # a run of equal scores
    named = [(f"t{i}", c) for i, c in enumerate(chunks)]

    def scores(kind, expert):
        return iter(named)

    flat = torch.cat(chunks)
    exact, approx = GlobalThresholds(scores), GlobalThresholds(scores, exact_limit=10)
    summarised = SummaryThresholds(lambda kind, expert: ((name, TensorOrder.build(c)) for name, c in named))
    for keep in (0.001, 0.1, 0.5, 0.9, 0.99, float(200 / flat.numel())):
        k = int(keep * flat.numel())
        want = float(flat.sort(descending=True).values[k - 1])
        for cuts in (exact, approx, summarised):
            cut = cuts("magnitude", "e", keep)
            assert cut.threshold == pytest.approx(want)
            assert sum(int(_kept(cut, name, c).sum()) for name, c in named) == k  # exactly k, zeros included
        assert summarised("magnitude", "e", keep) == exact("magnitude", "e", keep)
    assert approx("magnitude", "e", 0.99).threshold == 0.0  # beyond the positives: all of them, and the first zeros
    assert exact("magnitude", "e", 0.0).threshold == math.inf and exact("magnitude", "e", 1.0).threshold == -math.inf


def test_global_cut_keeps_exactly_k_with_ties_in_tensor_then_sort_order():
    # |τ| full of equal values, as in bf16 checkpoints: 2 > 1 > 0 in three tensors (≤ 16 entries: the sort keeps index order).
    named = [("a", torch.tensor([1.0, 2.0, 1.0, 0.0])), ("b", torch.tensor([1.0, 1.0, 2.0])), ("c", torch.tensor([1.0]))]
    cuts = GlobalThresholds(lambda kind, expert: iter(named))
    cut = cuts("magnitude", "e", 0.5)  # N = 8 → k = 4: both 2s, then the first two 1s (a[0], a[2])
    assert [_kept(cut, name, s).tolist() for name, s in named] == [[True, True, True, False], [False, False, True], [False]]
    cut = cuts("magnitude", "e", 0.75)  # k = 6: the 1s of a, then b[0], b[1]
    assert [_kept(cut, name, s).tolist() for name, s in named] == [[True, True, True, False], [True, True, True], [False]]
    # Within a tensor the ties follow its sort order (mergekit's, not index order, beyond 16 entries).
    big = torch.ones(40)
    cut = GlobalThresholds(lambda kind, expert: iter([("big", big)]))("magnitude", "e", 0.25)
    assert torch.equal(_kept(cut, "big", big), topk_mask(big, 0.25))
    assert not torch.equal(topk_mask(big, 0.25), torch.arange(40) < 10)


def _sharded_copy(src: str, dst: Path) -> Path:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst, safe_serialization=True, max_shard_size="40KB")
    for f in Path(src).glob("tokenizer*"):
        shutil.copy(f, dst / f.name)
    assert (dst / "model.safetensors.index.json").is_file()
    return dst


def test_sharded_read_and_write(models, tmp_path):
    sharded = {"base": str(_sharded_copy(models["base"], tmp_path / "base")), "math": models["math"], "code": str(_sharded_copy(models["code"], tmp_path / "code"))}
    rules = [{"method": "linear", "weights": {"math": 0.4, "code": 0.6}}]
    merge_recipe_to_dir(_recipe(models, rules), tmp_path / "single")
    merge_recipe_to_dir(_recipe(sharded, rules), tmp_path / "sharded", max_shard_bytes=30_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    single, sharded_out = _state(tmp_path / "single"), _state(tmp_path / "sharded")
    for name, tensor in single.items():
        torch.testing.assert_close(sharded_out[name], tensor, rtol=0, atol=0)


def test_output_dtype_follows_the_recipe(models, tmp_path):
    merge_recipe_to_dir(_recipe(models, [{"method": "linear"}], dtype="bfloat16"), tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text()).get("dtype") in ("bfloat16", None)


def _variant(models: dict[str, str], tmp_path: Path, **config_changes) -> str:
    """A copy of the math expert with another architecture or dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(models["math"])
    dtype = config_changes.pop("dtype", torch.float32)
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    out = tmp_path / "variant"
    model.save_pretrained(out, safe_serialization=True)
    return str(out)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"intermediate_size": 48}, r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \[\d+, \d+\] in base but \[\d+, \d+\] in expert 'math'"),
        ({"num_hidden_layers": 1}, r"tensor 'model\.layers\.1\.[\w.]+' is in base but not in expert 'math'"),
    ],
)
def test_model_mismatch_is_one_line_naming_tensor_and_models(models, tmp_path, change, message):
    variant = _variant(models, tmp_path, **change)
    with pytest.raises(ModelSetError, match=message) as info:
        ModelSet.from_dirs(Path(models["base"]), {"math": Path(variant), "code": Path(models["code"])})
    assert "\n" not in str(info.value)


def _saved(model, path: Path, tokenizer_from: str) -> str:
    model.save_pretrained(path, safe_serialization=True)
    for f in Path(tokenizer_from).glob("tokenizer*"):
        shutil.copy(f, path / f.name)
    return str(path)


def test_mixed_input_dtypes_merge_in_float32_and_write_the_widest(models, tmp_path):
    # mergekit's rule: a bf16 base with fp32 experts merges in float32 and writes float32.
    from transformers import AutoModelForCausalLM

    bf16_base = _saved(AutoModelForCausalLM.from_pretrained(models["base"]).to(torch.bfloat16), tmp_path / "b", models["base"])
    mixed = {**models, "base": bf16_base}
    rules = [{"method": "task_arithmetic", "weights": {"math": 0.5, "code": 0.25}}]
    merge_recipe_to_dir(_recipe(mixed, rules), tmp_path / "out")
    out, base = load_file(tmp_path / "out" / "model.safetensors"), load_file(Path(bf16_base) / "model.safetensors")
    math_, code = load_file(Path(models["math"]) / "model.safetensors"), load_file(Path(models["code"]) / "model.safetensors")
    for name, tensor in out.items():
        assert tensor.dtype == torch.float32
        b = base[name].float()
        torch.testing.assert_close(tensor, b + 0.5 * (math_[name] - b) + 0.25 * (code[name] - b))
    merge_recipe_to_dir(_recipe(mixed, rules, dtype="bfloat16"), tmp_path / "bf16")
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}


def _with_extra_tensor(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    state["model.rotary_emb.inv_freq"] = torch.ones(4)  # e.g. a buffer an older transformers saved
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


def test_extra_expert_tensors_are_dropped_with_a_warning_or_refused_when_strict(models, tmp_path, caplog):
    extra = _with_extra_tensor(models["math"], tmp_path / "extra")
    with caplog.at_level("WARNING"):
        modelset = ModelSet.from_dirs(Path(models["base"]), {"math": Path(extra), "code": Path(models["code"])})
    assert "model.rotary_emb.inv_freq" in caplog.text and "dropped" in caplog.text
    assert modelset.tensor_names == ModelSet.from_dirs(Path(models["base"]), {"code": Path(models["code"])}).tensor_names
    with pytest.raises(ModelSetError, match=r"tensor 'model\.rotary_emb\.inv_freq' is in expert 'math' but not in base.*--strict"):
        ModelSet.from_dirs(Path(models["base"]), {"math": Path(extra)}, strict=True)
    # More layers than the base is another architecture, as in mergekit.
    deeper = _variant(models, tmp_path, num_hidden_layers=3)
    with pytest.raises(ModelSetError, match=r"tensor 'model\.layers\.2\.[\w.]+' is in expert 'math' but not in base"):
        ModelSet.from_dirs(Path(models["base"]), {"math": Path(deeper)})


def test_tied_base_with_an_untied_expert_merges_the_head_as_mergekit(models, tmp_path):
    # The base stores no lm_head (tied to its embeddings); mergekit reads its head from
    # embed_tokens and writes a merged lm_head.weight.
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(models["base"])
    config.tie_word_embeddings = True
    tied = AutoModelForCausalLM.from_config(config)
    tied.load_state_dict(AutoModelForCausalLM.from_pretrained(models["base"]).state_dict(), strict=False)
    tied_base = _saved(tied, tmp_path / "tied", models["base"])
    assert "lm_head.weight" not in load_file(Path(tied_base) / "model.safetensors")
    rules = [{"method": "task_arithmetic", "weights": {"math": 0.5, "code": 0.5}}]
    merge_recipe_to_dir(_recipe({**models, "base": tied_base}, rules), tmp_path / "out")
    out, base = load_file(tmp_path / "out" / "model.safetensors"), load_file(Path(tied_base) / "model.safetensors")
    math_, code = load_file(Path(models["math"]) / "model.safetensors"), load_file(Path(models["code"]) / "model.safetensors")
    embed = base["model.embed_tokens.weight"]
    head = embed + 0.5 * (math_["lm_head.weight"] - embed) + 0.5 * (code["lm_head.weight"] - embed)
    torch.testing.assert_close(out["lm_head.weight"], head)
    # A search worker's live model (tied, loaded from the base) gets the same weights: the head is untied once.
    recipe = _recipe({**models, "base": tied_base}, rules)
    live = AutoModelForCausalLM.from_pretrained(tied_base)
    ResidentModelSet.load(ModelSet.from_recipe(recipe)).merge_into(recipe, LiveModelSink(live), seed=0)
    for name, tensor in live.state_dict().items():
        torch.testing.assert_close(tensor, out[name])
    # ... and an untied base with a tied expert reads that expert's head from its embeddings.
    merge_recipe_to_dir(_recipe({**models, "math": tied_base}, rules), tmp_path / "out2")
    out2, base2 = load_file(tmp_path / "out2" / "model.safetensors"), load_file(Path(models["base"]) / "model.safetensors")
    b = base2["lm_head.weight"]
    torch.testing.assert_close(out2["lm_head.weight"], b + 0.5 * (embed - b) + 0.5 * (code["lm_head.weight"] - b))


def _damaged_expert(models: dict[str, str], tmp_path: Path, damage: str) -> Path:
    expert = tmp_path / "damaged"
    shutil.copytree(models["math"], expert)
    weights = expert / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) - 100])
    elif damage == "garbage":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + data[24:])
    else:
        weights.unlink()
    return expert


@pytest.mark.parametrize(
    ("damage", "message"),
    [("truncated", "truncated: tensor"), ("garbage", "not a valid safetensors file"), ("missing", "has no model.safetensors")],
)
def test_damaged_files_are_one_line_errors_naming_the_file(models, tmp_path, damage, message):
    expert = _damaged_expert(models, tmp_path, damage)
    with pytest.raises(ModelSetError, match=message) as info:
        ModelSet.from_dirs(Path(models["base"]), {"math": expert})
    assert str(expert) in str(info.value) and "\n" not in str(info.value)


def test_cli_merge_errors_exit_2_and_leave_nothing(models, tmp_path, capsys):
    expert = _damaged_expert(models, tmp_path, "truncated")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"models": {**models, "math": str(expert)}, "base": "base", "rules": [{"method": "linear"}]}))
    with pytest.raises(SystemExit) as info:
        main(["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "truncated" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    recipe.write_text(yaml.safe_dump({"models": models, "base": "base", "rules": [{"method": "linear"}]}))
    with pytest.raises(SystemExit) as info:
        main(["merge", str(recipe), "--out", str(tmp_path / "out"), "--seed", "3"])
    assert info.value.code == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_failing_merge_leaves_no_partial_output(models, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        merge_recipe_to_dir(_recipe(models, [{"method": "_test_fails_on_layer_1"}]), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_methods_get_their_statistics_or_a_clear_error(models, tmp_path):
    # Moments are found in the expert directories; an explicit recipe path wins.
    recipe = _recipe(models, [{"method": "_test_reads_moments", "models": ["code"]}])
    merge_recipe_to_dir(recipe, tmp_path / "found")
    moments = load_file(Path(models["code"]) / MOMENTS_FILE)
    out = load_file(tmp_path / "found" / "model.safetensors")
    assert all(torch.equal(out[k], moments[k]) for k in out)

    bare = tmp_path / "bare"
    shutil.copytree(models["code"], bare, ignore=shutil.ignore_patterns(MOMENTS_FILE))
    with pytest.raises(ModelSetError, match=r"rules\.0: method '_test_reads_moments' needs Adam second moments for expert 'code'; add `moments: \{code: PATH\}`"):
        merge_recipe_to_dir(_recipe({**models, "code": str(bare)}, [{"method": "_test_reads_moments", "models": ["code"]}]), tmp_path / "x")
    with pytest.raises(ModelSetError, match=r"needs RegMean Gram matrices for expert 'math'; compute them with `mergetune stats gram"):
        merge_recipe_to_dir(_recipe(models, [{"method": "_test_reads_gram"}]), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_compressed_moments_are_read_transparently(models, tmp_path):
    compressed = tmp_path / "rank1.safetensors"
    compress_moments(Path(models["code"]) / MOMENTS_FILE, compressed)
    full = load_file(Path(models["code"]) / MOMENTS_FILE)
    stored = load_file(compressed)
    assert sum(t.numel() for t in stored.values()) < sum(t.numel() for t in full.values()) / 5
    recipe = _recipe(models, [{"method": "_test_reads_moments", "models": ["code"]}], moments={"code": str(compressed)})
    merge_recipe_to_dir(recipe, tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    for name, v in full.items():
        want = rank1_reconstruct(v.sum(1), v.sum(0)) if v.dim() == 2 else v
        torch.testing.assert_close(out[name], want)


def test_rank1_round_trip_is_exact_for_rank1_and_zero(tmp_path):
    rows, cols = torch.rand(5), torch.rand(7)
    src = tmp_path / "v.safetensors"
    save_file({"w": torch.outer(rows, cols), "zero": torch.zeros(3, 4), "norm": torch.rand(6)}, src, metadata={"step": "5"})
    with pytest.raises(SystemExit) as info:
        main(["moments", "compress", str(src), "--out", str(tmp_path / "c.safetensors")])
    assert info.value.code == 0
    stats = StatsFile.open(tmp_path / "c.safetensors", "moments")
    assert stats.compressed and stats.metadata["step"] == "5" and stats.shape("w") == (5, 7)
    from safetensors import safe_open

    with safe_open(tmp_path / "c.safetensors", framework="pt") as f:
        read = {k: rebuild_stat([f.get_tensor(e) for e in stats.stored_keys(k)]) for k in ("w", "zero", "norm")}
    original = load_file(src)
    torch.testing.assert_close(read["w"], original["w"])
    assert torch.equal(read["zero"], original["zero"]) and torch.equal(read["norm"], original["norm"])


@pytest.mark.parametrize("rows,cols", [(7, 5), (1, 9), (9, 1)])
def test_rank1_slices_are_the_whole_reconstruction_written_in_place(rows, cols):
    torch.manual_seed(rows * cols)
    row_sums, col_sums = torch.rand(rows), torch.rand(cols)
    whole = rank1_reconstruct(row_sums, col_sums).reshape(-1)
    n = rows * cols
    for start in range(n):
        for stop in range(start + 1, n + 1):
            buffer = torch.full((n + 3,), 7.0)
            got = rank1_reconstruct_slice(row_sums, col_sums, start, stop, out=buffer)
            assert got.data_ptr() == buffer.data_ptr() and torch.equal(got, whole[start:stop])
            assert torch.equal(buffer[stop - start :], torch.full((n + 3 - (stop - start),), 7.0))
    assert torch.equal(rank1_reconstruct_slice(torch.zeros(rows), col_sums, 0, n), torch.zeros(n))


def test_statistics_for_another_model_are_refused(models, tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    save_file({"model.norm.weight": torch.ones(7)}, wrong)
    with pytest.raises(ModelSetError, match=r"moments of tensor 'model\.norm\.weight' has shape \[7\], expected \[32\]"):
        ModelSet.from_dirs(Path(models["base"]), {"math": Path(models["math"])}, moments={"math": wrong})


def test_real_methods_check_their_inputs_before_any_work(models, tmp_path):
    from mergetune.core.errors import ConfigError

    bare = {**models}
    for name in ("math", "code"):
        bare[name] = str(tmp_path / name)
        shutil.copytree(models[name], bare[name], ignore=shutil.ignore_patterns(MOMENTS_FILE))
    with pytest.raises(ModelSetError, match=r"method 'ota' needs Adam second moments for expert 'math'"):
        merge_recipe_to_dir(_recipe(bare, [{"method": "ota"}]), tmp_path / "out")
    with pytest.raises(ModelSetError, match=r"method 'regmean' needs RegMean Gram matrices .* `mergetune stats gram"):
        merge_recipe_to_dir(_recipe(models, [{"method": "regmean"}]), tmp_path / "out")
    third = {**models, "art": models["code"]}
    with pytest.raises(ConfigError, match=r"method 'slerp' takes"):
        _recipe(third, [{"method": "slerp"}])
    assert not (tmp_path / "out").exists()
    # With the moments found beside the experts, OTA merges, globally thresholded too.
    recipe = _recipe(models, [{"method": "ota", "params": {"density": 0.5, "scope": "global"}}])
    merge_recipe_to_dir(recipe, tmp_path / "ota")
    modelset = ModelSet.from_recipe(recipe)
    live = _live(models["base"])
    ResidentModelSet.load(modelset).merge_into(recipe, LiveModelSink(live), seed=0)
    disk = _state(tmp_path / "ota")
    for name, tensor in live.state_dict().items():
        torch.testing.assert_close(tensor, disk[name], rtol=1e-6, atol=1e-7)


def _live(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)
