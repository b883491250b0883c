"""DARE and DELLA masks come from the counter-based generator: equal, element for element, to an independent
numpy implementation of its formula (so no device or thread count can change them), and within binomial
noise of their keep probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergetune.merge.counter_rng import keep_below, keep_threshold, stream_key, tensor_key, uniforms
from mergetune.merge.methods import TensorInputs, get_method
from mergetune.merge.sparsify import della_ramp

NAME = "model.layers.3.self_attn.q_proj.weight"


def numpy_uniforms(seed: int, name: str, stream: int, start: int, count: int) -> np.ndarray:
    """The generator's formula in numpy uint32 arithmetic (wrapping, as lowbias32 is defined)."""

    def lowbias32(x: np.ndarray) -> np.ndarray:
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))

    index = np.arange(start, start + count, dtype=np.uint64).astype(np.uint32)
    bits = lowbias32(lowbias32(index ^ np.uint32(tensor_key(seed, name))) ^ np.uint32(stream_key(seed, name, stream)))
    return (bits >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_uniforms_equal_the_numpy_formula(threads):
    for seed, stream, start, count in [(0, 0, 0, 100_000), (7, 2, 123_457, 70_001), (2**40, 1, 2**31 - 5, 5)]:
        assert np.array_equal(uniforms(seed, NAME, stream, start, count).numpy(), numpy_uniforms(seed, NAME, stream, start, count))
    with pytest.raises(ValueError, match="below 2\\^31"):
        uniforms(0, NAME, 0, 2**31 - 1, 2)


def _dare_mask(tau: torch.Tensor, density: float, seed: int, method: str = "dare_linear", **params) -> list[torch.Tensor]:
    """The kept entries of each expert (τ_k = 1 everywhere, unrescaled: the output of expert k alone is its mask)."""
    masks = []
    for k in range(3):
        deltas = [torch.zeros_like(tau) for _ in range(3)]
        deltas[k] = tau
        x = TensorInputs(name=NAME, base=torch.zeros_like(tau), weights=[1.0] * 3, deltas_given=deltas, seed=seed)
        masks.append(get_method(method)(x, density=density, rescale=False, **params) != 0)
    return masks


def test_dare_masks_equal_the_numpy_reference_and_slices_do_not_matter(threads):
    tau = torch.ones(300, 701)
    for k, mask in enumerate(_dare_mask(tau, 0.3, seed=11)):
        want = numpy_uniforms(11, NAME, k, 0, tau.numel()).reshape(tau.shape).astype(np.float64) < 0.3  # exactly: u < ρ
        assert np.array_equal(mask.numpy(), want)


def test_della_masks_equal_the_numpy_reference(threads):
    gen = torch.Generator().manual_seed(0)
    tau = (torch.randn(64, 500, generator=gen) * 8).round()  # many equal magnitudes: ties broken by index
    density, epsilon = 0.4, 0.15
    for k, mask in enumerate(_dare_mask(tau, density, seed=3, method="della_linear", epsilon=epsilon)):
        ranks = np.argsort(np.argsort(np.abs(tau.numpy()), axis=1, kind="stable"), axis=1, kind="stable").astype(np.int64)
        start, whole, fraction, shift = della_ramp(tau.shape[1], density, epsilon)
        thresholds = start + ranks * whole + ((ranks * fraction) >> shift)  # int64: no wrap to rely on
        want = numpy_uniforms(3, NAME, k, 0, tau.numel()).reshape(tau.shape) * 2**24 < thresholds
        nonzero = tau.numpy() != 0  # a dropped τ = 0 looks kept: compare where τ ≠ 0
        assert np.array_equal(mask.numpy()[nonzero], want[nonzero])


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_keep_fraction_and_rescale_are_within_binomial_noise(density):
    n = 400_000
    tau = torch.linspace(0.5, 1.5, n)
    x = TensorInputs(name=NAME, base=torch.zeros(n), weights=[1.0], deltas_given=[tau], seed=1)
    out = get_method("dare_linear")(x, density=density, rescale="inverse_keep")
    kept = out != 0
    sigma = math.sqrt(density * (1 - density) / n)
    assert abs(float(kept.float().mean()) - density) < 5 * sigma
    torch.testing.assert_close(out[kept], tau[kept] / density)  # survivors divided by ρ: E[τ̂] = τ
    assert abs(float(out.sum() / tau.sum()) - 1) < 5 * math.sqrt((1 - density) / (density * n)) * 1.2
    l1 = get_method("dare_linear")(x, density=density)  # mergekit's rescale: the L1 norm is restored
    assert float(l1.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-5)
    della = get_method("della_linear")(x, density=density, epsilon=0.05, rescale=False)
    assert abs(float((della != 0).float().mean()) - density) < 5 * sigma  # π averages to ρ over a row


def test_experts_tensors_and_seeds_draw_independent_masks():
    a = uniforms(0, NAME, 0, 0, 10_000) < 0.5
    for other in (uniforms(0, NAME, 1, 0, 10_000), uniforms(0, "lm_head.weight", 0, 0, 10_000), uniforms(1, NAME, 0, 0, 10_000)):
        agreement = float((a == (other < 0.5)).float().mean())
        assert abs(agreement - 0.5) < 0.03


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.floats(0.0, 1.0), st.integers(0, 1 << 24).map(lambda u: u / 2**24), st.sampled_from([0.1, 0.3, 0.5, 0.9, 1.0 - 2**-30])))
def test_keep_threshold_decides_exactly_as_uniform_below_probability(probability):
    # every 24-bit uniform next to the cut, and the extremes: the integer compare keeps exactly where u < p (a float32
    # compare would round p·2^24 to float32 first: for p ≥ 0.25 that moves the cut by one uniform)
    cut = int(probability * 2**24)
    words = sorted({u for u in (0, 1, cut - 2, cut - 1, cut, cut + 1, cut + 2, (1 << 24) - 1) if 0 <= u < 1 << 24})
    bits = torch.tensor([u << 8 for u in words], dtype=torch.int64).to(torch.int32)  # bits whose top 24 are u
    assert keep_below(bits, keep_threshold(probability)).tolist() == [u * 2.0**-24 < probability for u in words]
