"""The architecture matrix: every supported family, as tiny random models from transformers' own config classes.

Per architecture (tests/architectures.py: Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3 text,
Phi-3, GPT-NeoX, OLMo 2; base + 3 experts):
- the layer structure read from the model's module tree puts every checkpoint tensor in exactly
  one search group, the group of its block (Gemma's extra norms, GPT-NeoX's fused attention,
  OLMo 2's post-norms), and agrees with the layer index recipes use;
- `mergetune merge` equals mergekit 0.1.5's `run_merge` for linear, ties and task_arithmetic;
- the live merge (resident inputs → the transformers model, through transformers' renaming on
  load) equals `AutoModelForCausalLM.from_pretrained` of the disk merge, tensor for tensor;
- a 3-trial study runs on the HF backend through the driver and the real trial worker, and
  its export loads with `AutoModelForCausalLM.from_pretrained` and scores as its trial did.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from pathlib import Path

import optuna
import pytest
import torch
from architectures import ARCHITECTURES, build_models, tiny_config
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from parity import assert_parity, load_tensors
from rich.console import Console
from safetensors.torch import load_file

from mergetune.merge.architecture import model_structure
from mergetune.merge.engine import merge_recipe_to_dir
from mergetune.merge.modelset import ModelSet, unties_embeddings
from mergetune.merge.recipe import Recipe, layer_index
from mergetune.merge.resident import ResidentModelSet
from mergetune.merge.sinks import LiveModelSink
from mergetune.search.config import parse_study_config
from mergetune.search.space import SearchSpace
from mergetune.search.warmstart import baseline_params

optuna.logging.set_verbosity(optuna.logging.WARNING)
ARCHS = list(ARCHITECTURES)
EXPERTS = ("a", "b", "c")
LAYERS = 3  # an interior layer, so groups of 2 split the layers unevenly
TASK = [{"prompt": f"rev {w}=", "answer": w[::-1]} for w in ("abc", "hello", "merge", "tiny", "zebra", "quick")]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("archs")
    return {arch: build_models(root / arch, arch, EXPERTS, num_layers=LAYERS, seed=3) for arch in ARCHS}


def study_data(models: dict[str, str], tmp_path: Path, name: str, **extra) -> dict:
    data_file = tmp_path / "rev.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in TASK))
    return {
        "study": name,
        "models": {"base": models["base"], "experts": {e: models[e] for e in EXPERTS}},
        # logprob is continuous: a random tiny model still scores distinct, comparable values
        "evaluator": {"kind": "quick", "metrics": ["logprob"],
                      "tasks": {"rev": {"search": str(data_file), "test": str(data_file), "max_new_tokens": 6}}},
        "search": {"layer_groups": 2, "split_attention_mlp": True, "methods": ["linear", "task_arithmetic", "ties"]},
        "budget": {"n_trials": 3},
        "storage": f"sqlite:///{tmp_path / 'studies.db'}",
        "ray": {"workers": 1},
        **extra,
    }  # fmt: skip


def groups_of(space: SearchSpace, names: list[str]) -> dict[str, str]:
    """Each tensor → the group whose rule merges it (the recipe's first match, as the merge resolves it)."""
    recipe = space.recipe(optuna.trial.FixedTrial(baseline_params(space)[0][1]))
    index = {id(rule): group.name for rule, group in zip(recipe.rules, space.groups)}
    return {name: index[id(recipe.rule_for(name))] for name in names}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tensor_is_in_exactly_one_group_the_group_of_its_block(zoo, arch, tmp_path):
    models = zoo[arch]
    ckpt = ModelSet.from_dirs(models["base"], {e: models[e] for e in EXPERTS}).reference
    names = list(ckpt.infos)
    structure = ckpt.structure()
    assert structure.traced  # norms placed by the forward pass on meta tensors, not by the name fallback
    config = parse_study_config(study_data(models, tmp_path, "groups"), "test")
    space = SearchSpace(config)
    groups = groups_of(space, names)
    spans = {g.name: g.layers for g in space.groups}
    for name in names:
        layer = structure.layer_of.get(name)
        assert layer == layer_index(name), name  # recipes' layer index agrees with the module tree
        if layer is None:
            assert groups[name] == "emb", name
            continue
        group = groups[name]
        assert group[-1] == {"attention": "a", "mlp": "m"}[structure.roles[name]], name
        assert spans[group][0] <= layer < spans[group][1], name
        # The layered groups' patterns are disjoint: a tensor's group does not hang on rule order.
        matching = [g.name for g in space.groups if g.layers and g.layers[0] <= layer < g.layers[1]
                    and any(fnmatch.fnmatchcase(name, p) for p in g.match)]  # fmt: skip
        assert matching == [group], name
    assert set(groups.values()) == {g.name for g in space.groups}  # no group is empty
    assert ModelSet.from_dirs(models["base"], {"a": models["a"]}).num_layers == structure.num_layers == LAYERS


@pytest.mark.parametrize("arch", ARCHS)
def test_the_tied_weights_read_from_config_json_alone_are_the_model_trees(zoo, arch, tmp_path):
    ckpt = ModelSet.from_dirs(zoo[arch]["base"], {"a": zoo[arch]["a"]}).base
    assert ckpt.tied_weights() == ckpt.structure().tied
    assert unties_embeddings(ckpt.path / "config.json") == (not ARCHITECTURES[arch][1]["tie_word_embeddings"])
    nested = tmp_path / "config.json"  # a sub-config could tie its own embeddings: the model tree decides
    nested.write_text(json.dumps({"tie_word_embeddings": False, "text_config": {"model_type": arch, "tie_word_embeddings": True}}))
    assert not unties_embeddings(nested)


def test_gemma_norms_neox_fused_attention_olmo_post_norms_and_tied_heads_are_grouped_by_the_model():
    gemma = model_structure(tiny_config("gemma2"))
    roles = {name.split(".", 3)[3]: role for name, role in gemma.roles.items() if gemma.layer_of.get(name) == 0}
    assert roles["input_layernorm.weight"] == roles["post_attention_layernorm.weight"] == "attention"  # around attention
    assert roles["pre_feedforward_layernorm.weight"] == roles["post_feedforward_layernorm.weight"] == "mlp"
    assert gemma.tied == {"lm_head.weight": "model.embed_tokens.weight"} and "lm_head.weight" not in gemma.roles
    assert gemma.vocabulary_names() == ["model.embed_tokens.weight"]
    neox = model_structure(tiny_config("gpt_neox"))
    assert neox.layer_patterns("attention") == ("gpt_neox.layers.*.input_layernorm.*", "gpt_neox.layers.*.attention.*")
    assert neox.layer_patterns("mlp") == ("gpt_neox.layers.*.post_attention_layernorm.*", "gpt_neox.layers.*.mlp.*")
    assert neox.roles["embed_out.weight"] == "head"  # the checkpoint's name, though transformers 5 loads it as lm_head
    olmo = model_structure(tiny_config("olmo2"))  # post-norms only: each follows its block
    assert olmo.layer_patterns("attention") == ("model.layers.*.self_attn.*", "model.layers.*.post_attention_layernorm.*")
    llama = model_structure(tiny_config("llama"))  # post_attention_layernorm feeds the MLP
    assert llama.layer_patterns("mlp") == ("model.layers.*.mlp.*", "model.layers.*.post_attention_layernorm.*")
    nested = model_structure(tiny_config("llama", num_layers=5))
    assert nested.num_layers == 5 and nested.decoder_patterns() == ("model.layers.*",)


@pytest.mark.parametrize("arch", ARCHS)
def test_mergetune_merge_equals_mergekit_run_merge(zoo, arch, tmp_path):
    torch.set_num_threads(1)
    models = zoo[arch]
    cases = {
        "linear": ({"weight": 0.6}, {}, False),
        "task_arithmetic": ({"weight": 0.7}, {"lambda": 0.9}, True),
        "ties": ({"weight": 0.8, "density": 0.4}, {"lambda": 1.1}, True),
    }
    for method, (per_model, shared, uses_base) in cases.items():
        config = {"merge_method": method, "models": [{"model": models[e], "parameters": per_model} for e in EXPERTS],
                  "dtype": "float32", "out_dtype": "float32", **({"parameters": shared} if shared else {})}  # fmt: skip
        if uses_base:
            config["base_model"] = models["base"]
        theirs = tmp_path / f"{method}_mergekit"
        run_merge(MergeConfiguration.model_validate(config), str(theirs), options=MergeOptions(quiet=True, copy_tokenizer=False))
        from mergetune.merge.mergekit_config import recipe_from_mergekit

        merge_recipe_to_dir(recipe_from_mergekit(config), tmp_path / f"{method}_ours")
        ours, mergekits = load_tensors(tmp_path / f"{method}_ours"), load_tensors(theirs)
        # Pythia's stale buffers (GPT-NeoX): mergekit writes them as float32, we keep their dtype; transformers drops them.
        dropped = ModelSet.from_dirs(models["base"], {"a": models["a"]}).reference.structure().dropped
        assert all(torch.equal(ours[n].to(mergekits[n].dtype), mergekits[n]) for n in dropped)
        assert_parity({n: t for n, t in ours.items() if n not in dropped}, {n: t for n, t in mergekits.items() if n not in dropped})


@pytest.mark.parametrize("arch", ARCHS)
def test_the_live_merge_equals_the_disk_merge_loaded_by_transformers(zoo, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    models = zoo[arch]
    rules = [{"layers": [0, 2], "method": "ties", "params": {"density": 0.5}}, {"match": "*", "method": "task_arithmetic"}]
    recipe = Recipe.from_dict({"models": models, "base": "base", "rules": rules})
    live = AutoModelForCausalLM.from_pretrained(models["base"])
    ResidentModelSet.load(ModelSet.from_recipe(recipe)).merge_into(recipe, LiveModelSink(live), seed=0)
    merge_recipe_to_dir(recipe, tmp_path / "out")
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert set(stored) == set(load_file(Path(models["base"]) / "model.safetensors"))  # checkpoint names, no added head
    disk = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    theirs, ours = disk.state_dict(), live.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours), [n for n in ours if not torch.equal(ours[n], theirs[n])]
    tied = ARCHITECTURES[arch][1]["tie_word_embeddings"]
    head, embeddings = disk.get_output_embeddings().weight, disk.get_input_embeddings().weight
    assert (head.data_ptr() == embeddings.data_ptr()) == tied
    base = AutoModelForCausalLM.from_pretrained(models["base"])
    assert not torch.equal(head, base.get_output_embeddings().weight)  # the head was merged, under any name


def test_gpt_neox_checkpoint_names_reach_the_live_model_and_stale_buffers_are_dropped(zoo):
    from transformers import AutoModelForCausalLM

    live = AutoModelForCausalLM.from_pretrained(zoo["gpt_neox"]["base"])
    sink = LiveModelSink(live)
    head = torch.randn(live.lm_head.weight.shape)
    sink.write("embed_out.weight", head)  # what Pythia's (and our export's) checkpoint calls the head
    assert torch.equal(live.lm_head.weight, head)
    sink.write("gpt_neox.layers.0.attention.bias", torch.ones(1, 1, 4, 4, dtype=torch.bool))  # dropped on load, as here
    sink.write("gpt_neox.layers.0.attention.rotary_emb.inv_freq", torch.ones(2))
    with pytest.raises(KeyError, match="the live model has no tensor 'gpt_neox.layers.9.mlp.dense_h_to_4h.weight'"):
        sink.write("gpt_neox.layers.9.mlp.dense_h_to_4h.weight", torch.zeros(1))


def _scores(model_dir: Path, config) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergetune.evaluators.base import HFBackend, build_evaluator

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return build_evaluator(config.evaluator).evaluate(HFBackend(model, AutoTokenizer.from_pretrained(model_dir)), "search")


@pytest.mark.parametrize("arch", ARCHS)
def test_a_study_runs_and_its_export_loads_and_scores_as_its_trial(zoo, arch, tmp_path, ray_session, caplog):
    from mergetune.search.driver import run_study
    from mergetune.studies.export import export_trial

    config = parse_study_config(study_data(zoo[arch], tmp_path, f"arch_{arch}"), "test")
    with caplog.at_level(logging.WARNING):
        study = run_study(config, console=Console(quiet=True))
    complete = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(complete) == 3, [t.user_attrs.get("fail_reason") for t in study.trials]
    best = max(complete, key=lambda t: t.values[0])
    export_trial(study, best, tmp_path / "export", fmt="all")
    assert (tmp_path / "export" / "mergekit.yaml").is_file()
    assert _scores(tmp_path / "export", config)["rev.logprob"] == pytest.approx(best.user_attrs["scores"]["rev.logprob"], abs=1e-5)


@pytest.fixture(scope="module")
def tied_base(zoo, tmp_path_factory) -> dict[str, str]:
    """Qwen2-shaped models whose base ties its head (no lm_head in its file) while the experts store their own."""
    import shutil

    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("mixed_tie")
    untied = build_models(root / "untied", "qwen2", EXPERTS, num_layers=LAYERS, seed=4, tie_word_embeddings=False)
    base = AutoModelForCausalLM.from_pretrained(untied["base"])
    base.config.tie_word_embeddings = True
    base.tie_weights()
    base.save_pretrained(root / "base")
    shutil.copy(Path(untied["base"]) / "tokenizer.json", root / "base")
    shutil.copy(Path(untied["base"]) / "tokenizer_config.json", root / "base")
    assert "lm_head.weight" not in load_file(root / "base" / "model.safetensors")
    return {**untied, "base": str(root / "base")}


def test_a_tied_base_with_untied_experts_exports_an_untied_model_that_vllm_would_read_the_same(tied_base, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = Recipe.from_dict({"models": tied_base, "base": "base", "rules": [{"match": "*", "method": "task_arithmetic"}]})
    merge_recipe_to_dir(recipe, tmp_path / "out")
    # A head of its own: every loader must use it (vLLM skips `lm_head.` when the config ties it).
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(out.lm_head.weight, load_file(tmp_path / "out" / "model.safetensors")["lm_head.weight"])
    assert out.lm_head.weight.data_ptr() != out.model.embed_tokens.weight.data_ptr()


def test_vllm_refuses_a_tied_base_whose_experts_store_their_own_heads(tied_base, tmp_path):
    from mergetune.core.errors import ConfigError
    from mergetune.search.plan import checked_config

    data = study_data(tied_base, tmp_path, "tied_vllm", evaluator={"kind": "lm_eval", "backend": "vllm", "tasks": ["rev"]})
    with pytest.raises(ConfigError, match=r"vllm: the base ties lm_head.weight to its embeddings but an expert stores its own"):
        checked_config(parse_study_config(data, "test"))
    tied = study_data(build_models(tmp_path / "all_tied", "gemma2", EXPERTS), tmp_path, "gemma_vllm",
                      evaluator={"kind": "lm_eval", "backend": "vllm", "tasks": ["rev"]})  # fmt: skip
    assert checked_config(parse_study_config(tied, "test")).models is not None  # every model tied: nothing to refuse


def test_without_a_meta_forward_pass_norms_are_placed_by_their_names(monkeypatch, caplog):
    import transformers

    def fails(self, *args, **kwargs):
        raise RuntimeError("Tensor.item() cannot be called on meta tensors")

    for cls in (transformers.LlamaForCausalLM, transformers.Gemma2ForCausalLM):
        monkeypatch.setattr(cls, "forward", fails)
    with caplog.at_level(logging.WARNING):
        llama, gemma = model_structure(tiny_config("llama")), model_structure(tiny_config("gemma2"))
    assert not llama.traced and "norms are grouped by their names" in caplog.text
    assert llama.layer_patterns("mlp") == ("model.layers.*.mlp.*", "model.layers.*.post_attention_layernorm.*")
    assert gemma.layer_patterns("mlp") == (
        "model.layers.*.mlp.*", "model.layers.*.post_attention_layernorm.*",
        "model.layers.*.pre_feedforward_layernorm.*", "model.layers.*.post_feedforward_layernorm.*",
    )  # fmt: skip  (the Llama convention: Gemma's post-attention norm lands with the MLP without the trace)


@pytest.mark.parametrize("arch", ["gpt_neox", "gemma2", "qwen3"])
def test_the_vllm_push_sends_checkpoint_names_and_no_head_of_a_tied_model(zoo, arch, tmp_path, vllm_engine_core):
    """vLLM's loaders take Hugging Face checkpoint names (README table): GPT-NeoX's head is `embed_out.weight`
    there, not transformers 5's `lm_head.weight`; a tied model's head is its embeddings, pushed once."""
    from types import SimpleNamespace

    from fake_vllm import FakeLLM

    from mergetune.evaluators.vllm import VLLMBackend

    models = zoo[arch]
    recipe = Recipe.from_dict({"models": models, "base": "base", "rules": [{"match": "*", "method": "task_arithmetic"}]})
    modelset = ModelSet.from_recipe(recipe)
    layout = {name: list(info.shape) for name, info in modelset.reference.infos.items()}  # what vLLM's load_weights takes
    llm = FakeLLM(vllm_engine_core, layout, "float32")
    ResidentModelSet.load(modelset).merge_into(recipe, VLLMBackend(SimpleNamespace(model=llm), bucket_bytes=4096).weight_sink(), seed=0)
    merge_recipe_to_dir(recipe, tmp_path / "out")
    expected, pushed = load_file(tmp_path / "out" / "model.safetensors"), llm.weights()
    assert set(pushed) == set(expected) and all(torch.equal(pushed[n].to(expected[n].dtype), expected[n]) for n in expected)
    assert "lm_head.weight" not in pushed
    assert ("embed_out.weight" in pushed) == (arch == "gpt_neox")


def test_a_model_whose_layers_recipes_cannot_address_is_refused_in_one_line():
    import transformers

    from mergetune.core.errors import ConfigError
    from mergetune.search.space import check_layer_names

    gpt2 = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel names its decoder layers like 'transformer\.h\.0\.[\w.]+'; "
                                          r"recipes address layers as `layers\.N\.` only"):  # fmt: skip
        check_layer_names(model_structure(gpt2))
    check_layer_names(model_structure(tiny_config("gpt_neox")))  # `gpt_neox.layers.N.`: addressable
