"""Our methods against mergekit 0.1.5's own (in-process `merge_state_dicts`) on tiny Llama-shaped tensors.

Every tensor of a two-layer Llama state dict (embeddings, GQA attention, MLP, norms, head) is
merged by both; the max abs difference must be ≤ 1e-5 of the tensor's largest magnitude.
"""

from __future__ import annotations

import pytest
import torch

from mergetune.merge.methods import TensorInputs, get_method

from mergekit.merge_methods.api import merge_state_dicts

from mergetune.merge.sparsify import band_mask, topk_mask

HIDDEN, INTERMEDIATE, KV, VOCAB, LAYERS = 16, 40, 8, 50, 2
EXPERTS = ("math", "code", "chat")
WEIGHTS = {"math": 0.7, "code": 0.4, "chat": 0.9}


def llama_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (KV, HIDDEN),
            p + "self_attn.v_proj.weight": (KV, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    return shapes | {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}


@pytest.fixture(scope="module")
def state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    """A base and fine-tune-like experts (base + small deltas); norms start at 1 like Llama's."""
    gen = torch.Generator().manual_seed(0)
    base = {
        name: torch.ones(shape) if len(shape) == 1 else 0.1 * torch.randn(shape, generator=gen)
        for name, shape in llama_shapes().items()
    }
    out = {"base": base}
    for k, expert in enumerate(EXPERTS):
        scale = 0.01 * (k + 1)
        out[expert] = {name: t + scale * torch.randn(t.shape, generator=gen) for name, t in base.items()}
    # An unrelated model, so SLERP's spherical branch (not only its colinear lerp) is compared.
    out["far"] = {name: 0.1 * torch.randn(t.shape, generator=gen) for name, t in base.items()}
    return out


def ours(state: dict, method: str, experts: tuple[str, ...], params: dict, weights: dict | None) -> dict[str, torch.Tensor]:
    spec = get_method(method)
    merged = {}
    for name, base in state["base"].items():
        x = TensorInputs(
            name=name,
            base=base if spec.needs_base else None,
            weights=[weights[e] for e in experts] if weights else [1.0] * len(experts),
            models_given=[state[e][name] for e in experts],
            seed=0,
        )
        merged[name] = spec(x, **params)
    return merged


def theirs(state: dict, method: str, experts: tuple[str, ...], params: dict, weights: dict | None, use_base: bool) -> dict:
    models = {e: state[e] for e in experts}
    if use_base:
        models = {"base": state["base"], **models}
    parameters = dict(params)
    if weights:
        parameters["weight"] = {e: weights[e] for e in experts}
    return merge_state_dicts(
        models, method, parameters=parameters, base="base" if use_base else None, dtype=torch.float32
    )


def assert_parity(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        diff = (a[name] - b[name].float()).abs().max()
        scale = b[name].float().abs().max().clamp_min(1e-12)
        assert diff <= 1e-5 * scale, f"{name}: max |Δ| {diff:.3g} vs max |θ| {scale:.3g}"


PER_MODEL_DENSITY = {"math": 0.3, "code": 0.6, "chat": 0.45}
CASES = {
    "linear": ("linear", EXPERTS, {}, WEIGHTS),
    "linear_unnormalized": ("linear", EXPERTS, {"normalize": False}, WEIGHTS),
    "task_arithmetic": ("task_arithmetic", EXPERTS, {"lambda": 0.8}, WEIGHTS),
    "task_arithmetic_normalized": ("task_arithmetic", EXPERTS, {"normalize": True}, WEIGHTS),
    "ties": ("ties", EXPERTS, {"density": 0.5, "lambda": 0.9}, WEIGHTS),
    "ties_per_model_density": ("ties", EXPERTS, {"density": PER_MODEL_DENSITY}, WEIGHTS),
    "ties_unnormalized_l1": ("ties", EXPERTS, {"density": 0.3, "normalize": False, "rescale": True}, WEIGHTS),
    "breadcrumbs": ("breadcrumbs", EXPERTS, {"density": 0.8, "gamma": 0.05}, WEIGHTS),
    "breadcrumbs_dense_band": ("breadcrumbs", EXPERTS, {"density": 0.9, "gamma": 0.2, "lambda": 1.3}, WEIGHTS),
    "breadcrumbs_ties": ("breadcrumbs_ties", EXPERTS, {"density": 0.7, "gamma": 0.1}, WEIGHTS),
    "model_stock": ("model_stock", EXPERTS, {}, None),
    "model_stock_filter_wise": ("model_stock", EXPERTS, {"filter_wise": True}, None),
    "slerp_near": ("slerp", ("math",), {"t": 0.3}, None),
    "slerp_far": ("slerp", ("far",), {"t": 0.65}, None),
    "dare_ties_density_1": ("dare_ties", EXPERTS, {"density": 1.0, "lambda": 0.7}, WEIGHTS),
    "dare_linear_density_1": ("dare_linear", EXPERTS, {"density": 1.0}, WEIGHTS),
    "della_density_1": ("della", EXPERTS, {"density": 1.0}, WEIGHTS),
    "della_linear_density_1": ("della_linear", EXPERTS, {"density": 1.0, "epsilon": 0.05}, WEIGHTS),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_mergekit(state_dicts, case):
    torch.set_num_threads(1)
    method, experts, params, weights = CASES[case]
    our_params = {k: ([v[e] for e in experts] if isinstance(v, dict) else v) for k, v in params.items()}
    their_params = dict(params)
    use_base = get_method(method).needs_base
    assert_parity(
        ours(state_dicts, method, experts, our_params, weights),
        theirs(state_dicts, method, experts, their_params, weights, use_base),
    )


def test_far_slerp_takes_the_spherical_branch(state_dicts):
    # Guard the case above: with colinear inputs SLERP would silently be a lerp.
    from mergetune.merge.methods.slerp import DOT_THRESHOLD

    a, b = state_dicts["base"]["lm_head.weight"], state_dicts["far"]["lm_head.weight"]
    cos = (a.flatten() @ b.flatten()) / (a.norm() * b.norm())
    assert abs(cos) < DOT_THRESHOLD
    # ... and the norms (ones + small noise) exercise the colinear fallback.
    a, near = state_dicts["base"]["model.norm.weight"], state_dicts["math"]["model.norm.weight"]
    assert (a @ near) / (a.norm() * near.norm()) > DOT_THRESHOLD


def _one_expert(method: str, tau: torch.Tensor, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    base = torch.zeros_like(tau)
    x = TensorInputs(name="w", base=base, weights=[1.0], deltas_given=[tau])
    ours = get_method(method)(x, **params)
    theirs = merge_state_dicts({"base": {"w": base}, "e": {"w": tau}}, method, parameters={"weight": 1.0, **params}, base="base")
    return ours, theirs["w"]


def test_topk_keeps_exactly_k_in_mergekits_tie_order_on_bf16_values():
    # bf16 task vectors are full of equal magnitudes: at density 0.3 many entries tie at the cut.
    tau = (0.01 * torch.randn(48, 96, generator=torch.Generator().manual_seed(3))).bfloat16().float()
    for density in (0.05, 0.3, 0.77):
        k = int(density * tau.numel())
        cut = tau.abs().reshape(-1).sort(descending=True).values[k - 1]
        assert int((tau.abs() == cut).sum()) > 1 and int((tau.abs() >= cut).sum()) > k  # ties straddle the cut
        assert int(topk_mask(tau.abs(), density).sum()) == k
        ours, theirs = _one_expert("ties", tau, {"density": density})
        assert torch.equal(ours, theirs)  # the same k entries, bit for bit


def test_breadcrumbs_band_is_exact_when_outliers_tie():
    # fp32: two outliers of equal magnitude straddle the γ cut (n_top = 1); mergekit drops exactly one.
    tau = torch.linspace(-1, 1, 200)
    tau[17], tau[150] = 5.0, -5.0
    n_bot, target = 200 - 180 - 1, 180  # density 0.9, gamma 0.005 → n_top = 1
    assert int(band_mask(tau, 0.9, 0.005).sum()) == target and n_bot == 19
    ours, theirs = _one_expert("breadcrumbs", tau, {"density": 0.9, "gamma": 0.005})
    assert torch.equal(ours, theirs)
