"""Properties every merge must keep, checked by hypothesis on small random tensors."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from mergetune.merge.methods import TensorInputs, get_method

torch.set_num_threads(1)
PROPERTY = settings(max_examples=40, deadline=None)

shapes = st.sampled_from([(7,), (3, 5), (4, 4), (2, 3, 2)])
seeds = st.integers(0, 2**31 - 1)
experts = st.integers(1, 4)


def randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def task_vectors(shape, k: int, seed: int, agree: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Base and K task vectors with no zero entries; with `agree`, every element has one sign across experts."""
    base = randn(shape, seed)
    sign = torch.where(randn(shape, seed + 1) >= 0, 1.0, -1.0)
    deltas = []
    for i in range(k):
        magnitude = randn(shape, seed + 2 + i).abs() + 0.01
        deltas.append(magnitude * (sign if agree else torch.where(randn(shape, seed + 50 + i) >= 0, 1.0, -1.0)))
    return base, deltas


def run(method: str, base, deltas, weights, seed: int = 0, name: str = "t", **params) -> torch.Tensor:
    x = TensorInputs(
        name=name, base=base, weights=weights, deltas_given=deltas, seed=seed
    )
    return get_method(method)(x, **params)


@PROPERTY
@given(shape=shapes, seed=seeds, weight=st.floats(0.05, 5.0) | st.floats(-5.0, -0.05))
def test_linear_with_one_model_is_the_identity(shape, seed, weight):
    model = randn(shape, seed)
    x = TensorInputs(name="t", base=None, weights=[weight], models_given=[model])
    assert_close(get_method("linear")(x), model)


@PROPERTY
@given(
    shape=shapes,
    seed=seeds,
    k=experts,
    weights=st.lists(st.floats(0.1, 2.0), min_size=4, max_size=4),
    lam=st.floats(0.1, 2.0),
    method=st.sampled_from(["ties", "dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs_ties"]),
    normalize=st.booleans(),
)
def test_sparsified_methods_at_density_one_without_sign_conflict_are_task_arithmetic(
    shape, seed, k, weights, lam, method, normalize
):
    base, deltas = task_vectors(shape, k, seed, agree=True)
    w = weights[:k]
    expected = run("task_arithmetic", base, deltas, w, **{"lambda": lam}, normalize=normalize)
    got = run(method, base, deltas, w, seed=seed, density=1.0, **{"lambda": lam}, normalize=normalize)
    assert_close(got, expected, rtol=1e-5, atol=1e-5)


WEIGHTED = ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "della_linear",
            "breadcrumbs", "breadcrumbs_ties"]  # fmt: skip


@PROPERTY
@given(
    shape=shapes,
    seed=seeds,
    k=st.integers(2, 4),
    weights=st.lists(st.floats(-3.0, 3.0), min_size=3, max_size=3),
    method=st.sampled_from(WEIGHTED),
    density=st.sampled_from([1.0, 0.5]),
)
def test_weights_summing_to_zero_give_no_nan(shape, seed, k, weights, method, density):
    base, deltas = task_vectors(shape, k, seed, agree=False)
    w = weights[: k - 1]
    w = [*w, -sum(w)]
    params = {} if method in ("linear", "task_arithmetic") else {"density": density}
    if method == "task_arithmetic":
        params["normalize"] = True
    x = TensorInputs(name="t", base=base, weights=w, deltas_given=deltas, seed=seed)
    out = get_method(method)(x, **params)
    assert torch.isfinite(out).all()


RANDOM = ["dare_ties", "dare_linear", "della", "della_linear", "m3"]


@PROPERTY
@given(shape=shapes, seed=seeds, k=st.integers(2, 3), method=st.sampled_from(RANDOM))
def test_same_seed_gives_identical_bytes(shape, seed, k, method):
    base, deltas = task_vectors(shape, k, seed, agree=False)
    params = {} if method == "m3" else {"density": 0.5}
    a = run(method, base, deltas, [1.0] * k, seed=seed, name="model.layers.1.mlp.down_proj.weight", **params)
    b = run(method, base, [d.clone() for d in deltas], [1.0] * k, seed=seed, name="model.layers.1.mlp.down_proj.weight", **params)
    assert a.numpy().tobytes() == b.numpy().tobytes()


@PROPERTY
@given(seed=seeds, other=seeds, density=st.floats(0.2, 0.8))
def test_different_seeds_give_different_dare_masks(seed, other, density):
    if seed == other:
        return
    base, deltas = task_vectors((16, 16), 1, 0, agree=True)
    a = run("dare_linear", base, deltas, [1.0], seed=seed, density=density)
    b = run("dare_linear", base, deltas, [1.0], seed=other, density=density)
    assert not torch.equal(a != base, b != base)


@PROPERTY
@given(seed=seeds, density=st.floats(0.2, 0.8))
def test_tensors_of_one_merge_get_independent_dare_masks(seed, density):
    base, deltas = task_vectors((16, 16), 1, 0, agree=True)
    a = run("dare_linear", base, deltas, [1.0], seed=seed, name="model.layers.0.mlp.up_proj.weight", density=density)
    b = run("dare_linear", base, deltas, [1.0], seed=seed, name="model.layers.1.mlp.up_proj.weight", density=density)
    assert not torch.equal(a != base, b != base)


@PROPERTY
@given(shape=shapes, seed=seeds, k=st.integers(1, 3), density=st.floats(0.05, 1.0))
def test_global_scope_with_this_tensors_own_cut_equals_tensor_scope(shape, seed, k, density):
    from mergetune.merge.sparsify import global_cut, topk_count

    def own_cut(kind, i, rho):
        scores = deltas[i].abs()
        count = topk_count(rho, scores.numel())
        threshold = float(scores.reshape(-1).sort(descending=True).values[count - 1])
        return global_cut(count, threshold, [("t", int((scores > threshold).sum()), int((scores == threshold).sum()))])

    base, deltas = task_vectors(shape, k, seed, agree=False)
    x = TensorInputs(name="t", base=base, weights=[1.0] * k, deltas_given=deltas, global_cut=own_cut)
    assert torch.equal(get_method("ties")(x, density=density, scope="global"), get_method("ties")(x, density=density))


@PROPERTY
@given(shape=shapes, seed=seeds, k=st.integers(1, 3), t=st.floats(0.0, 1.0))
def test_methods_leave_their_inputs_untouched(shape, seed, k, t):
    base, deltas = task_vectors(shape, k, seed, agree=False)
    moments = [d.abs() * 1e-12 for d in deltas]
    snapshot = [base.clone(), *(d.clone() for d in deltas), *(m.clone() for m in moments)]
    for method, params in [("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5}), ("ota", {"density": 0.5}),
                           ("model_stock", {}), ("slerp", {"t": t}), ("della", {"density": 0.5})]:  # fmt: skip
        spec = get_method(method)
        if k < spec.min_models or (spec.max_models is not None and k > spec.max_models):
            continue
        x = TensorInputs(name="t", base=base, weights=[1.0] * k, deltas_given=deltas, moments=moments, seed=seed)
        out = spec(x, **params)
        assert out.shape == base.shape and out.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(snapshot, [base, *deltas, *moments]))
