"""The search worker's resident merge: inputs kept as stored, one float32 tensor at a time, in either placement.

Every trial's merge must equal the merge of every input held whole in float32 (as the search did
before inputs were kept as stored; float32 inputs, bit for bit) and what the disk engine exports
(any inputs, bit for bit),
whichever placement and path (chunked linear rules, pinned staging) the worker takes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_studies_fixtures import build_tiny_models

from mergetune.merge import placement as placement_module
from mergetune.merge import resident as resident_module
from mergetune.merge.engine import merge_modelset
from mergetune.merge.modelset import MOMENTS_FILE, ModelSet
from mergetune.merge.moments import compress_moments, rank1_reconstruct
from mergetune.merge.recipe import Recipe
from mergetune.merge.resident import ResidentModelSet
from mergetune.merge.ruleplan import complete_stats, merge_tensor, tensor_schedule
from mergetune.merge.thresholds import GlobalThresholds

torch.set_num_threads(1)
EXPERTS = ("math", "code", "art")

# Rules that exercise every path: sliced elementwise rules, the method library per tensor,
# global thresholds, randomness, and statistics (OTA's second moments).
RULES_NEEDING_BASE = [
    {"layers": [0, 1], "match": ["*.self_attn.*"], "method": "ties", "params": {"density": 0.4}},
    {"layers": [0, 1], "match": ["*.mlp.*"], "method": "dare_ties", "params": {"density": 0.6}},
    {"layers": [1, 2], "match": ["*.self_attn.*"], "method": "ota", "params": {"density": 0.5, "scope": "global"}},
    {"layers": [1, 2], "match": ["*.mlp.*"], "method": "della", "params": {"density": 0.5}},
    {"layers": [2, 3], "match": ["*.mlp.*"], "method": "breadcrumbs_ties", "params": {"density": 0.7, "gamma": 0.05}},
    {"layers": [2, 3], "method": "task_arithmetic", "params": {"lambda": 0.7}, "weights": {"math": 0.5, "code": 1.5, "art": 0.0}},
    {"match": ["model.embed_tokens.*"], "method": "ties", "params": {"density": 0.5, "scope": "global"}},
    {"method": "linear", "weights": {"math": 0.2, "code": 0.3, "art": 0.5}},
]
# Methods over the models themselves (not task vectors), and rules no tensor of layer 3 matches.
RULES_OVER_MODELS = [
    {"layers": [0, 1], "method": "passthrough", "models": ["code"]},
    {"layers": [1, 2], "method": "fisher"},
    {"layers": [2, 3], "method": "slerp", "models": ["math", "code"], "params": {"t": 0.3}},
    {"match": ["lm_head.*"], "method": "linear"},
]


def _write_moments(root: Path, dtype: torch.dtype) -> None:
    for i, name in enumerate(EXPERTS):
        state = load_file(root / name / "model.safetensors")
        gen = torch.Generator().manual_seed(i)
        moments = {k: (torch.rand(v.shape, generator=gen) * 1e-12).to(dtype) for k, v in state.items()}
        save_file(moments, root / name / MOMENTS_FILE, metadata={"step": "10"})


def _models(root: Path, dtype: torch.dtype) -> dict[str, str]:
    from transformers import AutoModelForCausalLM

    paths = build_tiny_models(root, num_layers=4)
    third = root / "art"  # a third expert: the code expert pushed further
    code = AutoModelForCausalLM.from_pretrained(paths["code"])
    with torch.no_grad():
        for p in code.parameters():
            p.mul_(1.01)
    code.save_pretrained(third, safe_serialization=True)
    paths["art"] = str(third)
    if dtype != torch.float32:
        for name in ("base", *EXPERTS):
            model = AutoModelForCausalLM.from_pretrained(paths[name]).to(dtype)
            model.save_pretrained(paths[name], safe_serialization=True)
    _write_moments(root, torch.float32)
    return paths


@pytest.fixture(scope="module")
def fp32_models(tmp_path_factory) -> dict[str, str]:
    return _models(tmp_path_factory.mktemp("fp32"), torch.float32)


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory) -> dict[str, str]:
    return _models(tmp_path_factory.mktemp("bf16"), torch.bfloat16)


def _recipe(models: dict[str, str], rules: list[dict], base: bool = True) -> Recipe:
    data = {"models": models if base else {e: models[e] for e in EXPERTS}, "rules": rules, "seed": 7}
    if base:
        data["base"] = "base"
    return Recipe.from_dict(data)


class Collect:
    """A sink that keeps a float32 copy of every tensor (what it gets is valid only during `write`)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.closed = False

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor.detach().to("cpu", torch.float32, copy=True)

    def close(self) -> None:
        self.closed = True


def merge_all_in_float32(modelset: ModelSet, recipe: Recipe, seed: int) -> dict[str, torch.Tensor]:
    """The search worker's merge with every input held whole in float32 (as before inputs were kept as
    stored): base, models, task vectors and statistics read once, every rule run by its method."""
    from mergetune.merge.reader import open_reader

    names = modelset.tensor_names
    with open_reader(modelset) as reader:
        base = {n: reader.tensor(modelset.base, n) for n in names}
        models = {e: {n: reader.tensor(c, n) for n in names} for e, c in modelset.experts.items()}
        vectors = {e: {n: t - base[n] for n, t in tensors.items()} for e, tensors in models.items()}
        stats = {k: {e: {n: reader.stat(k, e, n) for n in names} for e in files} for k, files in modelset.stats.items()}

    def scores(kind, expert):
        for n, tau in vectors[expert].items():
            if kind == "magnitude":
                yield n, tau.abs()
            elif stats["moments"][expert][n] is not None:
                yield n, stats["moments"][expert][n] * tau.square()

    thresholds = GlobalThresholds(scores)
    out = {}
    for name, plan in tensor_schedule(modelset, recipe):
        if plan is None:
            out[name] = base[name].clone()
            continue
        s = {k: complete_stats([stats[k].get(e, {}).get(name) for e in plan.experts]) for k in plan.stats}
        if plan.uses_deltas(True):
            out[name] = merge_tensor(plan, name, base[name], None, [vectors[e][name] for e in plan.experts], s, seed, thresholds)
        else:
            out[name] = merge_tensor(plan, name, base[name], [models[e][name] for e in plan.experts], None, s, seed, thresholds)
    return out


def _disk(modelset: ModelSet, recipe: Recipe) -> dict[str, torch.Tensor]:
    sink = Collect()
    merge_modelset(modelset, recipe, sink, seed=recipe.seed)
    return sink.tensors


def _resident(resident: ResidentModelSet, recipe: Recipe) -> dict[str, torch.Tensor]:
    sink = Collect()
    resident.merge_into(recipe, sink, seed=recipe.seed)
    assert sink.closed
    return sink.tensors


def _assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    different = [name for name in want if not torch.equal(got[name], want[name].float())]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


@pytest.fixture
def small_chunks_and_slabs(monkeypatch):
    """Chunks that do not divide the tensors, slabs that take only small tensors, pieces of a few KB."""
    monkeypatch.setitem(resident_module.CHUNK_ELEMENTS, "cpu", 1000)
    monkeypatch.setattr(placement_module, "SLAB_BYTES", 40_000)
    monkeypatch.setattr(placement_module, "PIECE_BYTES", 3_000)


PLACEMENTS = [("device", None), ("host", None), ("host", True)]  # host with the pinned-staging path forced on CPU


@pytest.mark.parametrize(("placement", "staged"), PLACEMENTS)
def test_fp32_trials_are_bit_identical_to_the_whole_float32_path(fp32_models, placement, staged, small_chunks_and_slabs):
    recipe = _recipe(fp32_models, RULES_NEEDING_BASE)
    modelset = ModelSet.from_recipe(recipe)
    resident = ResidentModelSet.load(modelset, placement=placement, staged=staged)
    want = merge_all_in_float32(modelset, recipe, recipe.seed)
    _assert_identical(_resident(resident, recipe), want)
    _assert_identical(_resident(resident, recipe), want)  # a second trial reuses the workspace
    _assert_identical(_disk(modelset, recipe), want)  # and the export reproduces it
    resident.close()


@pytest.mark.parametrize(("placement", "staged"), PLACEMENTS)
@pytest.mark.parametrize("rules", ["needing_base", "over_models", "base_free"])
def test_bf16_trials_equal_the_disk_engine(bf16_models, placement, staged, rules, small_chunks_and_slabs):
    recipe = {
        "needing_base": lambda: _recipe(bf16_models, RULES_NEEDING_BASE),
        "over_models": lambda: _recipe(bf16_models, RULES_OVER_MODELS),
        "base_free": lambda: _recipe(bf16_models, [{"method": "linear", "weights": {"math": 1, "code": 2, "art": 3}}], base=False),
    }[rules]()
    modelset = ModelSet.from_recipe(recipe)
    resident = ResidentModelSet.load(modelset, placement=placement, staged=staged)
    _assert_identical(_resident(resident, recipe), _disk(modelset, recipe))
    resident.close()


def test_inputs_stay_in_their_stored_dtype_and_float32_is_one_tensor_at_a_time(bf16_models):
    recipe = _recipe(bf16_models, [{"method": "ties", "params": {"density": 0.5}}])
    modelset = ModelSet.from_recipe(recipe)
    for placement in ("device", "host"):
        resident = ResidentModelSet.load(modelset, placement=placement)
        stored = resident.inputs.tensors
        weights = [t for (path, _), t in stored.items() if path.name == "model.safetensors"]
        assert weights and {t.dtype for t in weights} == {torch.bfloat16}
        resident.merge_into(recipe, Collect(), seed=0)
        largest = max(info.numel for info in modelset.reference.infos.values())
        # TIES reads the stored inputs slice by slice: float32 is only its output, the size of the largest tensor
        assert resident.workspace.nbytes == largest * 4
        resident.close()


def test_rank1_moments_stay_compressed_until_their_tensor_is_merged(bf16_models, tmp_path):
    compressed = {}
    for name in EXPERTS:
        compressed[name] = str(tmp_path / f"{name}.rank1.safetensors")
        compress_moments(Path(bf16_models[name]) / MOMENTS_FILE, compressed[name])
    recipe = Recipe.from_dict(
        {"models": bf16_models, "base": "base", "moments": compressed, "seed": 3,
         "rules": [{"method": "ota", "params": {"density": 0.6}}]}
    )
    modelset = ModelSet.from_recipe(recipe)
    resident = ResidentModelSet.load(modelset, placement="device")
    held = sum(t.numel() for (path, _), t in resident.inputs.tensors.items() if path.name.endswith(".rank1.safetensors"))
    full = sum(info.numel for info in modelset.reference.infos.values()) * len(EXPERTS)
    assert held < full / 5  # row and column sums, not the moments
    got = _resident(resident, recipe)
    _assert_identical(got, _disk(modelset, recipe))
    # and what OTA saw is the rank-1 reconstruction: a single-expert OTA of a 2-D tensor, checked by hand
    name = "model.layers.0.mlp.up_proj.weight"
    one = Recipe.from_dict({"models": bf16_models, "base": "base", "moments": compressed, "rules": [{"method": "ota", "models": ["code"]}]})
    merged = _resident(ResidentModelSet.load(ModelSet.from_recipe(one)), one)[name]
    base, code = (load_file(Path(bf16_models[m]) / "model.safetensors")[name].float() for m in ("base", "code"))
    v = load_file(Path(bf16_models["code"]) / MOMENTS_FILE)[name].float()
    v_hat = rank1_reconstruct(v.sum(1), v.sum(0))
    weight = v_hat.pow(0.5) + 1e-30
    torch.testing.assert_close(merged, base + weight * (code - base) / weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("placement", ["device", "host"])
def test_sliced_rules_write_straight_into_the_live_model_as_the_disk_engine_rounds(bf16_models, placement, small_chunks_and_slabs):
    from transformers import AutoModelForCausalLM

    from mergetune.merge.sinks import LiveModelSink

    recipe = _recipe(bf16_models, RULES_NEEDING_BASE)
    modelset = ModelSet.from_recipe(recipe)
    resident = ResidentModelSet.load(modelset, placement=placement)
    live = AutoModelForCausalLM.from_pretrained(bf16_models["base"], dtype=torch.bfloat16)
    storage = {name: t.data_ptr() for name, t in live.state_dict().items()}
    resident.merge_into(recipe, LiveModelSink(live), seed=recipe.seed)
    disk = {}
    merge_modelset(modelset, recipe, _BF16(disk), seed=recipe.seed)
    state = live.state_dict()
    different = [name for name in disk if not torch.equal(state[name], disk[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"
    assert {name: t.data_ptr() for name, t in state.items()} == storage  # in place: an evaluator's views stay valid
    # every rule here is sliceable: slices went into the model's bf16 storage, no float32 tensor-sized output was made
    # (the workspace holds slice-sized buffers only: DELLA's widened ranks)
    assert max(resident.workspace.sizes.values(), default=0) < max(info.numel for info in modelset.reference.infos.values())
    resident.close()


class _BF16(Collect):
    """The disk engine's output as a bf16 model holds it: each merged float32 tensor rounded once, whole."""

    def __init__(self, into: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.tensors = into

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor.detach().to("cpu", torch.bfloat16, copy=True)


def test_later_trials_read_the_task_vector_norms_of_their_own_experts_and_slices(bf16_models, small_chunks_and_slabs):
    """A rescaled DARE/DELLA trial reads the Σ|τ| an earlier trial summed (they never change within a study); a
    trial whose rules take the experts in another order, over other tensors, still equals a fresh worker's merge."""
    first = _recipe(bf16_models, [{"method": "dare_ties", "params": {"density": 0.6}}])
    later = _recipe(
        bf16_models,
        [
            {"layers": [0, 1], "method": "della", "models": ["art", "math"], "params": {"density": 0.5}},
            {"method": "dare_linear", "models": ["code", "art", "math"], "params": {"density": 0.3}},
        ],
    )
    modelset = ModelSet.from_recipe(first)
    resident = ResidentModelSet.load(modelset)
    _resident(resident, first)
    kept = len(resident.summaries.slice_norms)
    assert kept > 3 * len(modelset.tensor_names)  # every slice of every tensor, for each expert
    got = _resident(resident, later)
    assert len(resident.summaries.slice_norms) == kept  # read, none summed again
    fresh = ResidentModelSet.load(modelset)
    _assert_identical(got, _resident(fresh, later))
    _assert_identical(got, _disk(modelset, later))
    resident.close()
    fresh.close()
