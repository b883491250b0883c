"""Every sliceable method gives, slice by slice, the bytes of one call on the whole tensor — and those bytes
equal the straightforward sort-based reference (TIES, breadcrumbs, OTA+FFG; per tensor and global scope).

The references sparsify with `sparsify.topk_mask` / `band_mask` (one sort of the whole tensor per
expert, mergekit's tie order) and combine as the methods do; inputs are fp32 and bf16-valued
(full of equal magnitudes at the cut).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_order_stats import global_reference

from mergetune.merge import boundary
from mergetune.merge.methods import TensorInputs, get_method
from mergetune.merge.methods.combine import combine
from mergetune.merge.methods.registry import InputSummaries, StoredSlice, per_model
from mergetune.merge.ruleplan import RulePlan, merge_sliced
from mergetune.merge.sparsify import GlobalCut, band_mask, scores_of, topk_mask
from mergetune.merge.thresholds import GlobalThresholds

torch.set_num_threads(1)
PROPERTY = settings(max_examples=25, deadline=None)
NAME = "model.layers.0.mlp.up_proj.weight"
MODELS: dict[tuple[int, ...], list[torch.Tensor]] = {}  # the models behind each set of task vectors made here

CASES = {
    "ties": {"density": 0.3},
    "ties_rescaled": {"density": [0.2, 0.7, 0.45], "normalize": False, "rescale": True},
    "ties_global": {"density": 0.4, "scope": "global"},
    "breadcrumbs": {"density": 0.6, "gamma": 0.1},
    "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05, "rescale": True},
    "breadcrumbs_global": {"density": 0.5, "gamma": 0.2, "scope": "global"},
    "dare_ties": {"density": 0.4},
    "dare_linear": {"density": 0.6, "rescale": "inverse_keep"},
    "della": {"density": 0.5, "epsilon": 0.2},
    "della_linear": {"density": [0.3, 0.6, 0.5], "rescale": "inverse_keep"},
    "ota": {"density": 0.5},
    "ota_global": {"density": [0.3, 0.6, 0.5], "scope": "global"},
    "task_arithmetic": {"lambda": 0.7},
    "linear": {},
}


BOUNDARY = ("patched", "marked")


@contextmanager
def boundary_entries(how: str):
    """Every selection's listed boundary entries merged apart from the kernel ("patched"), or read by it as marks."""
    saved = boundary.PATCH_MAX_SHARE
    boundary.PATCH_MAX_SHARE = 1.0 if how == "patched" else -1.0
    try:
        yield
    finally:
        boundary.PATCH_MAX_SHARE = saved


def method_of(case: str) -> str:
    return case.removesuffix("_rescaled").removesuffix("_global")


def inputs_for(shape: tuple[int, ...], bf16: bool, seed: int, experts: int = 3):
    gen = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(shape, generator=gen)
    models = [base + 3e-4 * torch.randn(shape, generator=gen) for _ in range(experts)]
    if bf16:
        base, models = base.bfloat16().float(), [m.bfloat16().float() for m in models]
    moments = [torch.rand(shape, generator=gen) * 1e-12 for _ in range(experts)]
    if bf16:
        moments = [m.bfloat16().float() for m in moments]
    deltas = [m - base for m in models]
    MODELS[tuple(id(d) for d in deltas)] = models
    return base, deltas, moments


def stored_models(base: torch.Tensor, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """The experts θ_k whose task vectors θ_k − θ₀ (float32) are `deltas`, as `inputs_for` made them."""
    return MODELS[tuple(id(d) for d in deltas)]


def cuts_for(deltas, moments):
    """The engine's global cuts over one tensor per expert."""
    def scores(kind, expert):
        yield NAME, scores_of(kind, deltas[int(expert)], moments[int(expert)])

    thresholds = GlobalThresholds(scores)
    return lambda kind, model, keep: thresholds(kind, str(model), keep)


def whole(method: str, base, deltas, moments, params, seed: int = 5) -> torch.Tensor:
    spec = get_method(method)
    uses_deltas = spec.needs_base
    x = TensorInputs(
        name=NAME, base=base, weights=[0.7, 0.4, 0.9][: len(deltas)],
        deltas_given=deltas if uses_deltas else None, models_given=None if uses_deltas else [base + d for d in deltas],
        moments=moments, global_cut=cuts_for(deltas, moments), seed=seed,
    )  # fmt: skip
    return spec(x, **params)


def sliced(method: str, base, deltas, moments, params, chunk: int, seed: int = 5) -> torch.Tensor:
    spec = get_method(method)
    uses_deltas = spec.needs_base
    plan = RulePlan(0, None, spec, ["0", "1", "2"][: len(deltas)], [0.7, 0.4, 0.9][: len(deltas)], spec.bind(params, len(deltas)), ())
    flat = [t.reshape(-1) for t in stored_models(base, deltas)]
    thresholds = cuts_for(deltas, moments)

    def fetch(start, stop):
        stats = {"moments": [m.reshape(-1)[start:stop] for m in moments]} if method == "ota" else {}
        return StoredSlice(base.reshape(-1)[start:stop], [t[start:stop] for t in flat]), stats

    def expert_cut(kind, expert, keep):
        return thresholds(kind, int(expert), keep)

    summaries = InputSummaries(deltas, moments) if uses_deltas else None
    out = torch.empty(base.numel())
    return merge_sliced(plan, NAME, tuple(base.shape), fetch, out, chunk, seed, expert_cut, summaries).clone()


def reference(case: str, base, deltas, moments, params) -> torch.Tensor:
    """The sort-based reference: one sort of each expert's whole scores (`topk_mask`, `band_mask`, global by brute force)."""
    method, k = method_of(case), len(deltas)
    weights = [0.7, 0.4, 0.9][:k]
    rho = per_model(params.get("density", 1.0), k)
    scope = params.get("scope", "tensor")
    if method == "ota":
        scores = [scores_of("saliency", d, v) for d, v in zip(deltas, moments)]
        if scope == "global":
            masks = [global_reference([(NAME, s)], r)[NAME] for s, r in zip(scores, rho)]
        else:
            masks = [topk_mask(s, r) for s, r in zip(scores, rho)]
        weight = [(w * v.double().sqrt().float() + 1e-30) * m for w, v, m in zip(weights, moments, masks)]  # √v rounded once
        numerator, total = torch.zeros_like(base), torch.zeros_like(base)
        for wt, d in zip(weight, deltas):
            numerator += wt * d
            total += wt
        merged = base + numerator / total.clamp_min(torch.finfo(torch.float32).tiny)
        return torch.where(total <= 1.1 * k * 1e-30, base, merged)
    if method.startswith("breadcrumbs"):
        gamma = per_model(params.get("gamma", 0.01), k)
        if scope == "global":
            from mergetune.merge.sparsify import band_fractions

            masks = []
            for d, r, g in zip(deltas, rho, gamma):
                top, bottom = band_fractions(r, g)
                outer = global_reference([(NAME, d.abs())], bottom)[NAME]
                inner = global_reference([(NAME, d.abs())], top)[NAME]
                masks.append(outer & ~inner)
        else:
            masks = [band_mask(d, r, g) for d, r, g in zip(deltas, rho, gamma)]
    else:
        if scope == "global":
            masks = [global_reference([(NAME, d.abs())], r)[NAME] for d, r in zip(deltas, rho)]
        else:
            masks = [topk_mask(d.abs(), r) for d, r in zip(deltas, rho)]
    kept = []
    for d, m in zip(deltas, masks):
        out = d * m
        if params.get("rescale") is True:
            before, after = float(d.abs().sum(dtype=torch.float64)), float(out.abs().sum(dtype=torch.float64))
            factor = float(torch.tensor(before, dtype=torch.float32) / torch.tensor(after, dtype=torch.float32))
            out = out * factor
        kept.append(out)
    spec = get_method(method)
    defaults = {name: p.default for name, p in spec.params.items()}
    return combine(base, kept, weights, consensus=method in ("ties", "breadcrumbs_ties"),
                   normalize=params.get("normalize", defaults["normalize"]), lambda_=params.get("lambda", 1.0))  # fmt: skip


@PROPERTY
@given(
    case=st.sampled_from(list(CASES)),
    shape=st.sampled_from([(37,), (8, 20), (3, 5, 7), (64, 48)]),
    bf16=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    chunk=st.sampled_from([1, 7, 100, 1000, 1 << 20]),
    how=st.sampled_from(BOUNDARY),
)
def test_slices_give_the_bytes_of_the_whole_tensor(case, shape, bf16, seed, chunk, how):
    base, deltas, moments = inputs_for(shape, bf16, seed)
    method, params = method_of(case), CASES[case]
    with boundary_entries(how):
        got = sliced(method, base, deltas, moments, params, chunk).view(shape)
    assert torch.equal(got, whole(method, base, deltas, moments, params))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [c for c in CASES if method_of(c).startswith("della")])
def test_della_slices_read_their_own_ranks_in_both_passes(case, bf16):
    # a one-slice tensor's merge pass reuses the ranks its totals pass widened; a later slice must not
    base, deltas, moments = inputs_for((64, 48), bf16, 3)
    method, params = method_of(case), CASES[case]
    want = whole(method, base, deltas, moments, params)
    for chunk in (100, 1000, 64 * 48):
        assert torch.equal(sliced(method, base, deltas, moments, params, chunk).view(want.shape), want)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [c for c in CASES if method_of(c) in ("ties", "breadcrumbs", "breadcrumbs_ties", "ota")])
@pytest.mark.parametrize("how", BOUNDARY)
def test_selections_equal_the_sort_based_reference(case, bf16, how):
    base, deltas, moments = inputs_for((96, 64), bf16, seed=3)
    if bf16:  # the cut falls inside a run of equal magnitudes
        magnitudes = deltas[0].abs().reshape(-1).sort(descending=True).values
        k = int(per_model(CASES[case].get("density", 1.0), 3)[0] * magnitudes.numel())
        assert int((magnitudes == magnitudes[k - 1]).sum()) > 10
    method, params = method_of(case), CASES[case]
    want = reference(case, base, deltas, moments, params)
    with boundary_entries(how):
        assert torch.equal(whole(method, base, deltas, moments, params), want)
        assert torch.equal(sliced(method, base, deltas, moments, params, chunk=1000).view(want.shape), want)


def test_a_slice_without_the_engines_statistics_is_refused():
    base, deltas, _ = inputs_for((40,), False, 0, experts=1)
    x = TensorInputs(name=NAME, base=base[:10], weights=[1.0], deltas_given=[deltas[0][:10]], full_shape=(40,), seed=0)
    with pytest.raises(ValueError, match="order statistics"):
        get_method("ties")(x, density=0.5)
    with pytest.raises(ValueError, match="L1 norms"):
        get_method("dare_ties")(x, density=0.5)
    unused = GlobalCut(0.0)
    assert unused.count(NAME, 3) == 3
