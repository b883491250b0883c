"""Each merge method and sparsifier against numbers worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from mergetune.core.errors import ConfigError
from mergetune.merge.counter_rng import uniforms
from mergetune.merge.methods import TensorInputs, get_method, method_names
from mergetune.merge.methods.m3 import mixing_weights
from mergetune.merge.sparsify import (
    GlobalCut,
    apply_mask,
    band_fractions,
    band_mask,
    della_keep_probabilities,
    l1_factor,
    l1_sums,
    scores_of,
    topk_mask,
)

torch.set_num_threads(1)


def T(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def inputs(base, models=None, deltas=None, weights=None, **kw) -> TensorInputs:
    given = models if models is not None else deltas
    return TensorInputs(
        name=kw.pop("name", "model.layers.0.mlp.up_proj.weight"),
        base=base,
        weights=weights if weights is not None else [1.0] * len(given),
        models_given=models,
        deltas_given=deltas,
        **kw,
    )


def merge(method: str, x: TensorInputs, **params) -> torch.Tensor:
    return get_method(method)(x, **params)


def test_every_method_of_the_issue_is_registered():
    expected = {
        "linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "della_linear",
        "breadcrumbs", "breadcrumbs_ties", "model_stock", "fisher", "regmean", "ota", "m3", "passthrough",
    }  # fmt: skip
    assert expected <= set(method_names())


# --- linear, task arithmetic, passthrough ---


def test_linear_weighted_average_and_sum():
    x = inputs(None, models=[T(1, 2), T(3, 4)], weights=[1.0, 3.0])
    assert_close(merge("linear", x), T(2.5, 3.5))  # (1+9)/4, (2+12)/4
    assert_close(merge("linear", x, normalize=False), T(10, 14))


def test_linear_from_task_vectors_equals_linear_from_models():
    base, deltas = T(1, -1), [T(0.5, 2), T(-1, 1)]
    from_deltas = inputs(base, deltas=deltas, weights=[0.25, 0.5])
    from_models = inputs(None, models=[base + d for d in deltas], weights=[0.25, 0.5])
    assert_close(merge("linear", from_deltas), T(1 - 0.5, -1 + 4 / 3))  # θ₀ + (0.25τ₁ + 0.5τ₂)/0.75
    assert_close(merge("linear", from_deltas, normalize=False), merge("linear", from_models, normalize=False))


def test_task_arithmetic_scales_the_weighted_sum_of_task_vectors():
    x = inputs(T(1, 1, 1), deltas=[T(1, -1, 0), T(0, 2, 0)], weights=[0.5, 1.0])
    assert_close(merge("task_arithmetic", x, **{"lambda": 2.0}), T(2, 4, 1))  # 1 + 2·(0.5τ₁ + τ₂)
    assert_close(merge("task_arithmetic", x, **{"lambda": 2.0}, normalize=True), T(5 / 3, 3, 1))  # ÷ Σw = 1.5


def test_passthrough_scales_one_model_without_touching_it():
    model = T(1, -2)
    out = merge("passthrough", inputs(None, models=[model]), scale=2.0)
    assert_close(out, T(2, -4))
    out.zero_()
    assert_close(model, T(1, -2))


# --- TIES ---

TAU1 = T(3, -1, 0.5, -2, 0.1)
TAU2 = T(-1, -2, 1, 4, 0.2)


def test_ties_trims_elects_and_averages_agreeing_entries():
    # density 0.4 of 5 → k = 2: τ̂₁ = [3,0,0,−2,0], τ̂₂ = [0,−2,0,4,0]; w = [1, 2] → d₂ = [0,−4,0,8,0];
    # Σd = [3,−4,0,6,0] → signs [+,−,+,+,+]; agreeing: d₁[0], d₂[1], d₂[3]; divisors [1,2,1,2,1];
    # mean [3,−2,0,4,0]; λ = 0.5 → [1.5,−1,0,2,0]; plus the base 1.
    x = inputs(torch.ones(5), deltas=[TAU1, TAU2], weights=[1.0, 2.0])
    assert_close(merge("ties", x, density=0.4, **{"lambda": 0.5}), T(2.5, 0, 1, 3, 1))


def test_ties_per_model_density_and_unnormalised_sum():
    # τ₁ untrimmed, τ₂ keeps [0,−2,0,4,0]; Σd = [3,−3,0.5,2,0.1] → signs [+,−,+,+,+];
    # agreeing sums: [3, −1−2, 0.5, 4, 0.1]
    x = inputs(torch.zeros(5), deltas=[TAU1, TAU2])
    assert_close(merge("ties", x, density=[1.0, 0.4], normalize=False), T(3, -3, 0.5, 4, 0.1))


def test_ties_on_a_tensor_too_small_for_k_keeps_its_largest_entry():
    x = inputs(torch.zeros(3), deltas=[T(0.1, -0.5, 0.2)])
    assert_close(merge("ties", x, density=0.1), T(0, -0.5, 0))


def test_ties_global_scope_uses_the_engines_cut():
    calls = []

    def cut(kind, model, density):
        calls.append((kind, model, density))
        return GlobalCut(0.4)

    x = inputs(torch.zeros(5), deltas=[TAU1], global_cut=cut)
    assert_close(merge("ties", x, density=0.2, scope="global"), T(3, -1, 0.5, -2, 0))  # |τ| > 0.4
    assert calls == [("magnitude", 0, 0.2)]
    with pytest.raises(ValueError, match="global scope needs the expert's global cut"):
        merge("ties", inputs(torch.zeros(5), deltas=[TAU1]), density=0.2, scope="global")


def test_bad_choices_are_config_errors():
    x = inputs(torch.zeros(5), deltas=[TAU1])
    with pytest.raises(ConfigError, match="scope: .layer. is not one of tensor, global"):
        merge("ties", x, density=0.5, scope="layer")
    with pytest.raises(ConfigError, match="rescale: .* is not one of true, false, inverse_keep"):
        merge("dare_ties", x, density=0.5, rescale="l2")
    with pytest.raises(ConfigError, match="no parameter 'densty'"):
        merge("ties", x, densty=0.5)


# --- sparsifiers ---


def test_topk_mask_keeps_the_k_largest_scores():
    scores = T(0.3, 0.9, 0.1, 0.5)
    assert topk_mask(scores, 0.5).tolist() == [False, True, False, True]  # k = 2
    assert topk_mask(scores, 0.01).tolist() == [False, True, False, False]  # k = max(1, 0)
    assert topk_mask(T(1, 2, 3), 1.0).all() and not topk_mask(T(1, 2, 3), 0.0).any()


def test_random_mask_keeps_about_rho_and_inverse_keep_rescales_by_one_over_rho():
    tau = torch.linspace(0.1, 1.0, 20000)
    mask = uniforms(0, "t", 0, 0, tau.numel()) < 0.3
    assert abs(mask.float().mean().item() - 0.3) < 0.015
    out = apply_mask(tau, mask, "inverse_keep", 0.3)
    assert_close(out[mask], tau[mask] / 0.3)
    assert (out[~mask] == 0).all()


def test_l1_rescale_restores_the_l1_norm_and_skips_tiny_norms():
    tau = T(1, -2, 3, -4)
    mask = torch.tensor([True, False, False, True])
    out = apply_mask(tau, mask, "l1", factor=l1_factor(*map(float, l1_sums(tau, tau * mask))))
    assert_close(out, T(1, 0, 0, -4) * 2.0)  # ‖τ‖₁ = 10, kept 5
    tiny, keep = T(1e-9, 2e-9), torch.tensor([True, False])
    assert l1_factor(*map(float, l1_sums(tiny, tiny * keep))) is None
    assert_close(apply_mask(tiny, keep, "l1", factor=None), T(1e-9, 0))


def test_della_keep_probabilities_rise_with_rank_per_row():
    # |τ| ranks per row [0, 2, 1] and [2, 0, 1]; r̃ = rank/2; π = (0.5−0.1) + 0.2·r̃
    tau = torch.tensor([[0.1, -0.4, 0.3], [5.0, 1.0, -2.0]])
    assert_close(della_keep_probabilities(tau, 0.5, 0.1), torch.tensor([[0.4, 0.6, 0.5], [0.6, 0.4, 0.5]]))
    assert_close(della_keep_probabilities(T(0.1, -0.4, 0.3), 0.5, 0.1), T(0.4, 0.6, 0.5))  # 1-D: one row
    # ε larger than ρ is shrunk to ρ so probabilities stay in [0, 1] (mergekit would raise)
    assert_close(della_keep_probabilities(T(0.1, -0.4, 0.3), 0.1, 0.15), T(0.0, 0.2, 0.1))


def test_della_inverse_keep_divides_each_survivor_by_its_probability():
    tau = torch.linspace(-1, 1, 4001)
    x = inputs(torch.zeros_like(tau), deltas=[tau], seed=3)
    out = merge("della_linear", x, density=0.5, epsilon=0.2, rescale="inverse_keep")
    probs = della_keep_probabilities(tau, 0.5, 0.2)
    kept = out != 0
    assert_close(out[kept], tau[kept] / probs[kept])
    # larger magnitudes survive more often
    big = tau.abs() > 0.5
    assert kept[big].float().mean() > kept[~big & (tau != 0)].float().mean() + 0.1


BREAD = T(0.1, -0.5, 0.3, 0.9, -0.2, 0.7, 0.05, -0.6, 0.4, 0.8)


def test_breadcrumbs_band_drops_outliers_and_small_entries():
    # n = 10, ρ = 0.5 → 5 kept, γ = 0.2 → 2 top dropped, n_bot = 3: keep |τ| ∈ {0.3, 0.4, 0.5, 0.6, 0.7}
    keep = band_mask(BREAD, 0.5, 0.2)
    assert_close(BREAD * keep, T(0, -0.5, 0.3, 0, 0, 0.7, 0, -0.6, 0.4, 0))
    # ρ + γ > 1: the outlier cut shrinks to 1 − ρ (only 0.9 dropped)
    assert_close(BREAD * band_mask(BREAD, 0.9, 0.2), T(0.1, -0.5, 0.3, 0, -0.2, 0.7, 0.05, -0.6, 0.4, 0.8))
    assert band_mask(BREAD, 1.0, 0.2).all()  # ρ ≥ 1 is a no-op (mergekit)


def test_breadcrumbs_global_scope_keeps_the_band_between_two_thresholds():
    assert band_fractions(0.5, 0.2) == pytest.approx((0.2, 0.7))
    assert band_fractions(0.9, 0.2) == pytest.approx((0.1, 1.0))
    cuts = {0.2: GlobalCut(0.75), 0.7: GlobalCut(0.3, {"model.layers.0.mlp.up_proj.weight": 1})}
    x = inputs(torch.zeros(10), deltas=[BREAD], global_cut=lambda kind, k, f: cuts[round(f, 6)])
    out = merge("breadcrumbs", x, density=0.5, gamma=0.2, scope="global")
    assert_close(out, T(0, -0.5, 0.3, 0, 0, 0.7, 0, -0.6, 0.4, 0))  # 0.3 ≤ |τ| < 0.75


def test_saliency_scores_are_v_times_tau_squared_and_a_cut_keeps_its_count():
    tau, v = T(1, 2, -1, 0.5), T(4, 1, 0.25, 0)  # s = [4, 4, 0.25, 0]
    scores = scores_of("saliency", tau, v)
    assert scores.tolist() == [4, 4, 0.25, 0]
    assert topk_mask(scores, 0.25).tolist() == [True, False, False, False]  # k = 1: exactly one of the tie
    assert topk_mask(scores, 0.75).tolist() == [True, True, True, False]
    cut = GlobalCut(0.25, {"t": 1})  # above 0.25, plus the first entry equal to it
    assert cut.count("t", greater=2) == 3 and cut.count("other", greater=2) == 2


# --- SLERP ---


def test_slerp_between_base_and_one_expert():
    s = math.sin(math.pi / 4)
    x = inputs(T(2, 0), models=[T(0, 3)])  # orthogonal: Ω = π/2, sin Ω = 1
    assert_close(merge("slerp", x, t=0.5), T(2 * s, 3 * s))
    assert_close(merge("slerp", x, t=1 / 3), T(2 * math.sin(math.pi / 3), 3 * math.sin(math.pi / 6)))
    assert_close(merge("slerp", x, t=0.0), T(2, 0))


def test_slerp_falls_back_to_lerp_for_colinear_and_antipodal_tensors():
    assert_close(merge("slerp", inputs(T(1, 2), models=[T(2, 4.0001)]), t=0.25), T(1.25, 2.500025))
    assert_close(merge("slerp", inputs(T(1, 2), models=[T(-1, -2)]), t=0.5), T(0, 0))


def test_slerp_of_two_experts_interpolates_their_task_vectors():
    s = math.sin(math.pi / 4)
    x = inputs(T(10, 10), deltas=[T(1, 0), T(0, 1)])
    assert_close(merge("slerp", x, t=0.5), T(10 + s, 10 + s))


# --- model stock ---


def test_model_stock_ratio_from_the_task_vectors_angle():
    # τ₁ = [1,0], τ₂ = [1,1]: cos = 1/√2, t = 2c/(1+c); mean of experts = base + [1, 0.5]
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    x = inputs(T(1, 1), models=[T(2, 1), T(2, 2)])
    assert_close(merge("model_stock", x), T(1 + t, 1 + 0.5 * t))
    assert_close(merge("model_stock", inputs(T(1, 1), models=[T(2, 1), T(1, 2)])), T(1, 1))  # orthogonal: t = 0
    assert_close(merge("model_stock", inputs(T(0, 0), deltas=[T(1, 2), T(-1, -2)])), T(0, 0))  # singular: base


def test_model_stock_filter_wise_uses_one_ratio_per_row():
    base = torch.zeros(2, 2)
    deltas = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])]
    out = merge("model_stock", inputs(base, deltas=deltas), filter_wise=True)
    # row 0 orthogonal → base; row 1 identical (c = 1 → t = 1) → the mean [1, 0]
    assert_close(out, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))


# --- Fisher, RegMean ---


def test_fisher_weights_each_element_by_the_experts_fisher():
    models, fisher = [T(1, 2), T(3, 4)], [T(1, 3), T(3, 1)]
    assert_close(merge("fisher", inputs(None, models=models, fisher=fisher)), T(2.5, 2.5))
    weighted = inputs(None, models=models, fisher=fisher, weights=[1.0, 2.0])
    assert_close(merge("fisher", weighted), T(19 / 7, 2.8))  # (1+18)/7, (6+8)/5


def test_fisher_uses_second_moments_as_proxy_and_prefers_a_real_fisher():
    models = [T(1, 2), T(3, 4)]
    moments = [T(1e-20, 3e-20), T(3e-20, 1e-20)]  # tiny like LLM second moments: ε must not swamp them
    assert_close(merge("fisher", inputs(None, models=models, moments=moments)), T(2.5, 2.5))
    both = inputs(None, models=models, moments=moments, fisher=[T(1, 0), T(0, 1)])
    assert_close(merge("fisher", both), T(1, 4))
    with pytest.raises(ConfigError, match="weights must be"):
        merge("fisher", inputs(None, models=models, fisher=moments, weights=[1.0, -1.0]))


def test_regmean_solves_the_gram_weighted_least_squares():
    diag = inputs(None, models=[torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])],
                  gram=[torch.diag(T(2, 1)), torch.diag(T(1, 3))])  # fmt: skip
    assert_close(merge("regmean", diag), torch.tensor([[5 / 3, 3.5]]))  # (2·1+1·3)/3, (1·2+3·4)/4
    full = inputs(None, models=[torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])],
                  gram=[torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.eye(2)])  # fmt: skip
    assert_close(merge("regmean", full), torch.tensor([[0.5, 0.5]]))  # [[3,1],[1,3]] x = [2,2]
    assert_close(merge("regmean", full, reduce_non_diagonal_ratio=0.0), torch.tensor([[2 / 3, 1 / 3]]))


def test_regmean_singular_gram_falls_back_to_least_squares():
    ones = torch.ones(2, 2)
    x = inputs(None, models=[torch.tensor([[1.0, 1.0]])] * 2, gram=[ones, ones])
    assert_close(merge("regmean", x), torch.tensor([[1.0, 1.0]]))  # minimum-norm solution of 2a + 2b = 4


def test_regmean_averages_tensors_without_a_gram():
    norms = inputs(None, models=[T(1, 2), T(3, 6)], weights=[1.0, 3.0], gram=None)
    assert_close(merge("regmean", norms), T(2.5, 5))


# --- OTA + FFG (ALGORITHMS.md §1.3 / Part A) ---

OTA_TAU = [T(1, 2, -1, 0.5), T(3, -2, 1, 0.5)]
OTA_V = [T(4, 1, 0.25, 0), T(1, 9, 16, 0)]  # saliency s₁ = [4, 4, 0.25, 0], s₂ = [9, 36, 16, 0]


def ota_inputs(**kw) -> TensorInputs:
    return inputs(torch.full((4,), 10.0), deltas=OTA_TAU, moments=OTA_V, **kw)


def test_ota_without_mask_is_the_sqrt_v_weighted_mean_of_task_vectors():
    # W₁ = √v₁ = [2,1,0.5,0], W₂ = [1,3,4,0]: [(2+3)/3, (2−6)/4, (−0.5+4)/4.5, ε-weighted mean 0.5]
    expected = T(5 / 3, -1, 3.5 / 4.5, 0.5) + 10
    assert_close(merge("ota", ota_inputs()), expected)


def test_ota_weights_scale_each_experts_curvature_and_power_is_configurable():
    # W₂ = 3·√v₂ = [3, 9, 12, 0]: [(2+9)/5, (2−18)/10, (−0.5+12)/12.5, 0.5]
    assert_close(merge("ota", ota_inputs(weights=[1.0, 3.0])), T(2.2, -1.6, 0.92, 0.5) + 10)
    # p = 1: W = v: [(4+3)/5, (2−18)/10, (−0.25+16)/16.25, 0.5]
    assert_close(merge("ota", ota_inputs(), power=1.0), T(1.4, -1.6, 15.75 / 16.25, 0.5) + 10)


def test_ffg_masks_then_ota_averages_survivors_and_falls_back_to_the_base():
    # density 0.5 per tensor (k = 2): m₁ = [1,1,0,0] (s₁ top-2: 4, 4), m₂ = [0,1,1,0] (36, 16);
    # W₁ = [2,1,0,0], W₂ = [0,3,4,0] → [1, (2−6)/4, 1, all masked → θ₀]
    assert_close(merge("ota", ota_inputs(), density=0.5), T(1, -1, 1, 0) + 10)


def test_ffg_global_cuts_per_expert():
    requested = []

    def cut(kind, model, density):
        requested.append((kind, model, density))
        return [GlobalCut(0.2), GlobalCut(20.0)][model]

    # m₁ = s₁ > 0.2 = [1,1,1,0], m₂ = s₂ > 20 = [0,1,0,0] → [1, −1, −1, θ₀]
    out = merge("ota", ota_inputs(global_cut=cut), density=[0.5, 0.3], scope="global")
    assert_close(out, T(1, -1, -1, 0) + 10)
    assert requested == [("saliency", 0, 0.5), ("saliency", 1, 0.3)]


def test_ota_epsilon_default_does_not_swamp_llm_sized_moments():
    tiny = [v * 1e-16 for v in OTA_V]  # same ratios, realistic magnitudes
    x = inputs(torch.full((4,), 10.0), deltas=OTA_TAU, moments=tiny)
    assert_close(merge("ota", x), merge("ota", ota_inputs()))
    assert not torch.allclose(merge("ota", x, epsilon=1e-8), merge("ota", ota_inputs()))


def test_ota_rejects_bad_power_and_negative_weights():
    with pytest.raises(ConfigError, match="power"):
        merge("ota", ota_inputs(), power=0.0)
    with pytest.raises(ConfigError, match="weights"):
        merge("ota", ota_inputs(weights=[1.0, -1.0]))


# --- M³ ---


def test_m3_mixing_weights_follow_beta_and_dirichlet():
    from scipy import stats

    draws = [mixing_weights(0.5, 2, seed)[0] for seed in range(400)]
    assert stats.kstest(draws, stats.beta(0.5, 0.5).cdf).pvalue > 0.001
    three = torch.tensor([mixing_weights(2.0, 3, seed) for seed in range(300)], dtype=torch.float64)
    assert_close(three.sum(dim=1), torch.ones(300, dtype=torch.float64))
    assert_close(three.mean(dim=0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.03, rtol=0)
    assert mixing_weights(0.0, 3, 7) == [1.0, 0.0, 0.0]


def test_m3_draws_once_per_merge_not_per_tensor():
    def run(name, seed):
        # τ₁ = 1, τ₂ = 0: the output is λ·w₁
        x = inputs(torch.zeros(3), deltas=[torch.ones(3), torch.zeros(3)], name=name, seed=seed)
        return merge("m3", x, **{"lambda": 2.0})

    a, b = run("model.layers.0.mlp.up_proj.weight", 5), run("lm_head.weight", 5)
    w1 = mixing_weights(0.5, 2, 5)[0]
    assert_close(a, torch.full((3,), 2 * w1))
    assert_close(b, a)
    assert not torch.equal(run("lm_head.weight", 6), a)
    with pytest.raises(ValueError, match="TensorInputs.seed"):
        merge("m3", inputs(torch.zeros(3), deltas=[torch.ones(3), torch.zeros(3)]))


def test_m3_without_base_is_the_mixup_average():
    x = inputs(None, models=[T(1, 1), T(3, 5)], seed=11)
    w1, w2 = mixing_weights(0.5, 2, 11)
    assert_close(merge("m3", x), T(w1 + 3 * w2, w1 + 5 * w2))
