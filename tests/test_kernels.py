"""The compiled kernels give the bytes of the eager ones (merge/kernels.py's promise): every sliceable
method of the default search space, fp32 and bf16 inputs, given task vectors and stored bf16 slices.

Compiling needs a C++ compiler (Inductor's CPU backend); CI's machine has one. Each kernel variant
compiles once per process (seconds), so the cases share one `Kernels`.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_sliced_methods import BOUNDARY, NAME, boundary_entries, cuts_for, inputs_for, stored_models

from mergetune.merge.counter_rng import key_tensor
from mergetune.merge.kernels import EAGER, Kernels, della_probabilities, della_thresholds, exact_sqrt, l1_norm, ranks_carrier
from mergetune.merge.methods import TensorInputs, get_method
from mergetune.merge.methods.registry import InputSummaries, StoredSlice
from mergetune.merge.moments import moment_entries, rank1_reconstruct, rank1_slice
from mergetune.merge.ruleplan import RulePlan, merge_sliced
from mergetune.merge.sparsify import della_ramp

COMPILED = Kernels(compiled=True)
WEIGHTS = [0.7, 0.4, 0.9]
CASES = {
    "ties": {"density": 0.3},
    "dare_ties": {"density": 0.4, "rescale": True},
    "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05},
    "della": {"density": 0.5, "epsilon": 0.2},
    "ota": {"density": 0.5},
    "task_arithmetic": {"lambda": 0.7},
}


def whole(method, params, base, deltas, moments, kernels):
    x = TensorInputs(
        name=NAME, base=base, weights=WEIGHTS, deltas_given=deltas, moments=moments,
        global_cut=cuts_for(deltas, moments), seed=5, kernels=kernels,
    )  # fmt: skip
    return get_method(method)(x, **params)


def sliced_stored(method, params, base, deltas, moments, kernels, chunk=1000, sliced_moments=None, dtype=torch.bfloat16):
    """The engines' path: slices of the models as stored (`dtype`), the task vectors made inside the kernels;
    `sliced_moments(start, stop)` gives OTA's moments of a slice (default: slices of `moments`)."""
    spec = get_method(method)
    plan = RulePlan(0, None, spec, ["0", "1", "2"], WEIGHTS, spec.bind(params, 3), ())
    flat_base = base.to(dtype).reshape(-1)
    flat = [m.to(dtype).reshape(-1) for m in stored_models(base, deltas)]
    thresholds = cuts_for(deltas, moments)

    def fetch(start, stop):
        if sliced_moments is not None:
            return StoredSlice(flat_base[start:stop], [t[start:stop] for t in flat]), {"moments": sliced_moments(start, stop)}
        stats = {"moments": [m.reshape(-1)[start:stop] for m in moments]} if method == "ota" else {}
        return StoredSlice(flat_base[start:stop], [t[start:stop] for t in flat]), stats

    out = torch.empty(base.numel())
    summaries = InputSummaries(deltas, moments)
    return merge_sliced(plan, NAME, tuple(base.shape), fetch, out, chunk, 5, lambda kind, e, keep: thresholds(kind, int(e), keep), summaries, kernels).clone()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_kernels_give_the_eager_bytes(case, bf16):
    base, deltas, moments = inputs_for((64, 48), bf16, seed=11)
    eager = whole(case, CASES[case], base, deltas, moments, EAGER)
    assert not torch.equal(eager, base)  # the merge did something
    for how in BOUNDARY:  # compiled kernels with a selection's boundary entries patched after them, or marked for them
        with boundary_entries(how):
            assert torch.equal(whole(case, CASES[case], base, deltas, moments, COMPILED), eager)
            if bf16:
                stored_eager = sliced_stored(case, CASES[case], base, deltas, moments, EAGER)
                assert torch.equal(stored_eager.view(eager.shape), eager)
                assert torch.equal(sliced_stored(case, CASES[case], base, deltas, moments, COMPILED), stored_eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("params", [{"density": 0.5}, {"density": 0.5, "scope": "global"}, {"density": 1.0}, {"density": 0.7, "power": 0.3}])
def test_ota_reads_rank1_moments_as_factors_and_gives_the_bytes_of_their_reconstruction(params, dtype):
    """A resident merge hands OTA the rank-1 moments of a slice of whole rows as their factors (`moments.rank1_slice`),
    multiplied inside the kernel: the same bytes as the reconstruction's (`rank1_reconstruct`), eager and compiled,
    with one expert's moments dense beside them, the boundary entries patched or marked."""
    shape = (64, 48)
    base, deltas, _ = inputs_for(shape, dtype == torch.bfloat16, seed=23)
    gen = torch.Generator().manual_seed(3)
    sums = [(torch.rand(shape[0], generator=gen) * 1e-9, torch.rand(shape[1], generator=gen) * 1e-9) for _ in range(2)]
    dense = [rank1_reconstruct(r, c) for r, c in sums] + [torch.rand(shape, generator=gen) * 1e-12]
    expected = sliced_stored("ota", params, base, deltas, dense, EAGER, dtype=dtype)
    assert not torch.equal(expected.view(shape), base)  # the merge did something
    seen = []

    def factored(start, stop):
        sliced = [rank1_slice(r, c, start, stop) for r, c in sums] + [dense[2].reshape(-1)[start:stop]]
        seen.extend(type(v) for v in sliced[:2])
        return sliced

    for kernels in (EAGER, COMPILED):
        for how in BOUNDARY:
            with boundary_entries(how):
                assert torch.equal(sliced_stored("ota", params, base, deltas, dense, kernels, sliced_moments=factored, dtype=dtype), expected)
    assert set(seen) == {tuple}  # 1000-entry chunks made whole rows (960 entries): every slice read factors


def test_rank1_slices_are_factors_only_over_whole_rows():
    row_sums, col_sums = torch.rand(5), torch.rand(4)
    whole = rank1_reconstruct(row_sums, col_sums)
    rows, cols = rank1_slice(row_sums, col_sums, 4, 12)
    assert torch.equal(rows * cols, whole[1:3])
    assert torch.equal(moment_entries((rows, cols), torch.tensor([0, 5, 7])), whole[1:3].reshape(-1)[[0, 5, 7]])
    partial = rank1_slice(row_sums, col_sums, 2, 12)
    assert isinstance(partial, torch.Tensor) and torch.equal(partial, whole.reshape(-1)[2:12])
    assert torch.equal(rank1_slice(torch.zeros(5), col_sums, 0, 20), torch.zeros(20))


@pytest.mark.parametrize("row", [2, 3, 2048, 1 << 15, 36_864, 1 << 20], ids=lambda n: f"rows of {n}")
@pytest.mark.parametrize("density, epsilon", [(0.5, 0.1), (0.3, 0.3), (0.7, 0.3), (0.9, 0.05), (0.2, 0.0)])
def test_della_thresholds_follow_the_linear_ramp_within_two_units_eager_and_compiled(row, density, epsilon):
    """DELLA's integer thresholds T_r (`della_ramp`, `della_thresholds`) for every rank a row can have — int16 ranks
    widened as a CPU kernel reads them (`ranks_carrier`), int32 ranks of rows over 2^15 — are T_0 = ⌈(ρ−ε)·2^24⌉ and
    within two units of the exact (ρ−ε)·2^24 + 2ε·2^24·r/(n−1) (plus the fixed-point step's drift (n−1)/2^(s+1), a
    quarter unit at most for rows up to 2^15), rising with r; the same eagerly and compiled, and π = min(T, 2^24)/2^24."""
    dtype = torch.int16 if row <= 1 << 15 else torch.int32
    ranks = torch.arange(min(row, 1 << 16), dtype=torch.int64)
    if row > 1 << 16:  # the top ranks too, where r·f is largest
        ranks = torch.cat([ranks, torch.arange(row - (1 << 16), row, dtype=torch.int64)])
    carried = ranks_carrier(ranks.to(dtype))
    assert carried.dtype == torch.int32 and torch.equal(carried.long(), ranks)
    ramp = della_ramp(row, density, epsilon)
    want = (density - epsilon) * 2**24 + 2 * epsilon * 2**24 * ranks.double() / (row - 1)
    compiled = torch.compile(della_thresholds, dynamic=True)
    for thresholds in (della_thresholds(carried, ramp), compiled(carried, tuple(key_tensor(v) for v in ramp))):
        assert thresholds.dtype == torch.int32 and int(thresholds[0]) == math.ceil((density - epsilon) * 2**24)
        assert float((thresholds.double() - want).abs().max()) < 2 + (row - 1) / 2 ** (ramp[3] + 1)
        assert bool((thresholds[1:] >= thresholds[:-1]).all())
        assert torch.equal(della_probabilities(thresholds), thresholds.clamp_max(2**24).double().div(2**24).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernels", [EAGER, COMPILED], ids=["eager", "compiled"])
def test_masked_l1_sums_without_the_norms_are_the_sums_with_them(kernels, dtype):
    """A trial that reads its Σ|τ| from an earlier one sums only Σ|τ̂| (`gta_l1_sums(norms=False)`): each the same
    float64 as summed beside the norms, over vector bodies and tails (DELLA's draws and ranks)."""
    n = 300_007
    g = torch.Generator().manual_seed(4)
    base = torch.randn(n, generator=g).to(dtype)
    given = [(base.float() + 0.01 * torch.randn(n, generator=g)).to(dtype) for _ in range(3)]
    ranks = [ranks_carrier(torch.randint(0, 2048, (n,), generator=g, dtype=torch.int16)) for _ in given]
    ramp = tuple(key_tensor(v) for v in della_ramp(2048, 0.5, 0.1))
    experts = [(m, (key_tensor(7 + m), ranks[m], ramp, None, False)) for m in (0, 2)]
    offset, key = key_tensor(1000), key_tensor(123)
    both = kernels.gta_l1_sums(base, given, True, "magprune", experts, offset, key)
    masked = kernels.gta_l1_sums(base, given, True, "magprune", experts, offset, key, False)
    assert torch.equal(masked, both[1::2]) and bool((masked < both[0::2]).all())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_l1_norm_sums_both_halves_and_the_odd_entry(compiled):
    """Σ|x| of the pairs of halves plus an odd length's last entry, in float64: hand sums, and a float64 reference of
    a long bf16-valued vector within float32 pair rounding (one half-ulp per pair)."""
    norm = torch.compile(l1_norm, dynamic=True) if compiled else l1_norm
    assert [float(norm(torch.tensor(v, dtype=torch.float32))) for v in ([3.0, -1.0, 0.5], [2.0, -2.0], [-7.25], [])] == [4.5, 4.0, 7.25, 0.0]
    x = torch.randn(1_000_003, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16).float()
    reference = x.double().abs().sum()
    assert float(norm(x)) == pytest.approx(float(reference), rel=2**-24) and float(norm(x)) != float(norm(x[:-1]))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n", [1, 7, 17, 1000003])
def test_compiled_linear_keeps_the_fused_multiply_adds(n, normalize):
    """Linear from the models (as stored, bf16, and float32): the compiled kernel rounds each w·θ + acc once, as
    eager `add(alpha=)` does — the vector body and the tail, signed zeros too."""
    g = torch.Generator().manual_seed(n)
    models = [torch.randn(n, generator=g) * 10 ** torch.randint(-3, 3, (n,), generator=g) for _ in range(3)]
    models[0][::5] = -0.0
    for stored in (models, [m.bfloat16() for m in models]):
        def run(kernels):
            x = TensorInputs(name=NAME, weights=[0.7, 0.4, 0.3], stored=StoredSlice(None, stored), kernels=kernels)
            return get_method("linear")(x, normalize=normalize)

        eager = run(EAGER)
        assert torch.equal(eager.view(torch.int32), run(COMPILED).view(torch.int32))


@pytest.mark.parametrize("kernels", [EAGER, COMPILED], ids=["eager", "compiled"])
def test_ties_sign_election_on_exact_cancellation(kernels):
    """A sum of exactly 0 elects + (mergekit: (Σ ≥ 0)·2 − 1), so its positive terms agree; zeros never agree."""
    t1 = torch.tensor([1.0, -1.0, 2.0, 0.0, -0.0, -3.0])
    t2 = torch.tensor([-1.0, 1.0, -2.0, 0.0, -0.0, 1.0])
    t3 = torch.tensor([0.0, 0.0, 0.0, 0.0, -0.0, 2.0])
    out = kernels.combined(torch.zeros(6), [t1, t2, t3], [1.0, 1.0, 1.0], True, True, None, 1.0)
    # by hand: the + terms of each zero sum, divided by their weights' sum (the last: (1 + 2) / 2); no term agrees → 0
    assert out.tolist() == [1.0, 1.0, 2.0, 0.0, 0.0, 1.5]
    weighted = kernels.combined(torch.zeros(6), [t1, t2, t3], [0.5, 2.0, 1.0], True, True, None, 1.0)
    # weighted sums −1.5, 1.5, −3, 0, −0, 2.5: the elected sign's weighted terms over their weights (the last: (2 + 2) / 3)
    assert weighted.tolist() == [-1.0, 1.0, -2.0, 0.0, 0.0, float(torch.tensor(4.0) / 3)]


def test_ota_square_root_is_correctly_rounded_eager_and_compiled():
    """√v of OTA's curvature weight equals numpy's IEEE float32 sqrt, eagerly and compiled (eager torch's float32
    sqrt on a CPU is an ulp off for ~19% of entries, which made eager and compiled merges differ)."""
    import numpy as np

    torch.manual_seed(3)
    v = torch.cat([torch.rand(1 << 16) * 1e-12, torch.rand(1 << 16), torch.tensor([0.0, 1.0, 4.0, float(torch.finfo(torch.float32).tiny)])])
    want = torch.from_numpy(np.sqrt(v.numpy()))
    assert torch.equal(exact_sqrt(v), want)
    assert torch.equal(torch.compile(exact_sqrt, dynamic=True)(v), want)
