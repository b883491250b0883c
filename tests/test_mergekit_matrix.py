"""The parity matrix: every method mergekit 0.1.5 and mergetune both have, run by both on the same models.

Each case is a plain mergekit config (non-default parameters, per-model values, per-layer
gradients and filters, three experts where the method takes them) on tiny Llama models saved
in float32 and in bfloat16. mergekit merges it with its own `run_merge`; we merge the recipe
`mergetune merge` reads from the same file (`recipe_from_mergekit`). Deterministic methods
must agree (tests/parity.py: float32 ≤ 1e-5 relative; bf16 ≤ 1 ulp on ≤ 0.1 % of values);
DARE/DELLA at density < 1 must agree in distribution.
"""

from __future__ import annotations

import logging

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods.api import merge_state_dicts
from mergekit.options import MergeOptions
from parity import assert_parity, load_tensors
from test_studies_fixtures import build_tiny_models

from mergetune.merge.engine import merge_recipe_to_dir
from mergetune.merge.mergekit_config import MERGEKIT_METHODS, recipe_from_mergekit
from mergetune.merge.methods import TensorInputs, get_method

EXPERTS = ("math", "code", "chat")
DTYPES = ("float32", "bfloat16")


@pytest.fixture(scope="module")
def zoos(tmp_path_factory) -> dict[str, dict[str, str]]:
    # Three layers, so every gradient has an interior point; deltas 0.02·N(0,1) on N(0, 0.02²)-ish weights.
    return {
        dtype: build_tiny_models(tmp_path_factory.mktemp(f"matrix_{dtype}"), num_layers=3, seed=2, experts=EXPERTS, dtype=dtype)
        for dtype in DTYPES
    }


def _models(zoo: dict[str, str], experts: tuple[str, ...], params: dict[str, dict]) -> list[dict]:
    return [{"model": zoo[e], **({"parameters": params[e]} if e in params else {})} for e in experts]


W3 = {"math": {"weight": [0.2, 0.9]}, "code": {"weight": 0.5}, "chat": {"weight": 0.8}}
# name → (merge_method, experts, per-model parameters, global parameters, uses base_model)
CASES: dict[str, tuple[str, tuple[str, ...], dict, dict, bool]] = {
    "linear": ("linear", EXPERTS, W3, {}, False),
    "linear_unnormalized": ("linear", EXPERTS, W3, {"normalize": False}, False),
    "task_arithmetic": ("task_arithmetic", EXPERTS, W3, {"lambda": [0.6, 1.3]}, True),
    "ties": (
        "ties", EXPERTS,
        {"math": {"weight": 0.7, "density": [0.2, 0.6]}, "code": {"weight": 0.4, "density": 0.5}, "chat": {"weight": 0.9, "density": 0.35}},
        {"lambda": 0.9}, True,
    ),
    "ties_rescaled": ("ties", EXPERTS, W3, {"density": 0.3, "normalize": False, "rescale": True}, True),
    "dare_ties_density_1": ("dare_ties", EXPERTS, W3, {"density": 1.0, "lambda": [0.7, 1.1]}, True),
    "dare_linear_density_1": ("dare_linear", EXPERTS, W3, {"density": 1.0, "normalize": True}, True),
    "della_density_1": ("della", EXPERTS, W3, {"density": 1.0, "epsilon": 0.05}, True),
    "della_linear_density_1": ("della_linear", EXPERTS, W3, {"density": 1.0, "lambda": 0.8}, True),
    "breadcrumbs": (
        "breadcrumbs", EXPERTS,
        {"math": {"weight": 0.7, "gamma": [0.02, 0.1]}, "code": {"weight": 0.4}, "chat": {"weight": 0.9, "density": 0.6}},
        {"density": 0.8, "gamma": 0.05}, True,
    ),
    "breadcrumbs_ties": ("breadcrumbs_ties", EXPERTS, W3, {"density": [0.9, 0.6], "gamma": 0.1, "lambda": 1.2}, True),
    "slerp": (
        "slerp", ("math",), {},
        {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.3}]}, True,
    ),
    "nuslerp": ("nuslerp", ("math", "code"), {"math": {"weight": 0.3}, "code": {"weight": 0.9}}, {"nuslerp_flatten": False}, True),
    "nuslerp_row_wise_no_base": (
        "nuslerp", ("math", "code"), {"math": {"weight": [1.0, 0.2]}, "code": {"weight": 0.6}},
        {"nuslerp_flatten": False, "nuslerp_row_wise": True}, False,
    ),
    "multislerp": ("multislerp", EXPERTS, W3, {}, True),
    "multislerp_no_base": ("multislerp", EXPERTS, W3, {"normalize_weights": False}, False),
    "karcher": ("karcher", EXPERTS, {}, {"max_iter": 25, "tol": 1e-6}, False),
    "model_stock": ("model_stock", EXPERTS, {}, {}, True),
    "model_stock_filter_wise": ("model_stock", EXPERTS, {}, {"filter_wise": True}, True),
    "sce": ("sce", EXPERTS, {}, {"select_topk": 0.4}, True),
    "sce_all": ("sce", EXPERTS, {}, {}, True),
    "ram": ("ram", EXPERTS, {}, {"epsilon": 0.01}, True),
    "ramplus_tl": ("ramplus_tl", EXPERTS, {}, {"epsilon": 0.01, "r": 0.3, "alpha": 0.5}, True),
    "nearswap": ("nearswap", ("math",), {}, {"t": [0.005, 0.03]}, True),
    "arcee_fusion": ("arcee_fusion", ("math",), {}, {}, True),
    "passthrough": ("passthrough", ("code",), {"code": {"scale": [0.5, 2.0]}}, {}, False),
}


def mergekit_config(zoo: dict[str, str], dtype: str, case: str) -> dict:
    method, experts, per_model, shared, uses_base = CASES[case]
    config = {"merge_method": method, "models": _models(zoo, experts, per_model), "dtype": "float32", "out_dtype": dtype}
    if uses_base:
        config["base_model"] = zoo["base"]
    if shared:
        config["parameters"] = shared
    return config


def run_both(config: dict, tmp_path, name: str) -> tuple[dict, dict]:
    theirs = tmp_path / f"{name}_mergekit"
    options = MergeOptions(random_seed=0, quiet=True, copy_tokenizer=False)
    run_merge(MergeConfiguration.model_validate(config), str(theirs), options=options)
    ours = tmp_path / f"{name}_ours"
    merge_recipe_to_dir(recipe_from_mergekit(config), ours)
    return load_tensors(ours), load_tensors(theirs)


def test_the_matrix_covers_every_method_both_tools_have():
    assert {CASES[c][0] for c in CASES} == set(MERGEKIT_METHODS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_deterministic_methods_match_mergekit(zoos, tmp_path, dtype, case):
    torch.set_num_threads(1)
    ours, theirs = run_both(mergekit_config(zoos[dtype], dtype, case), tmp_path, case)
    assert {t.dtype for t in theirs.values()} == {getattr(torch, dtype)}
    assert_parity(ours, theirs)


# --- inputs mergekit merges (issue 13 item 8) ---


def _with_config_change(src: str, dst, dtype=None, **changes) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    for key, value in changes.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(AutoModelForCausalLM.from_pretrained(src).state_dict(), strict=False)
    model.to(dtype or torch.float32).save_pretrained(dst, safe_serialization=True)
    return str(dst)


def _with_extra_tensor(src: str, dst) -> str:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    state["model.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


@pytest.mark.parametrize("variant", ["bf16_base_fp32_experts", "tied_base_untied_experts", "expert_with_extra_tensor"])
def test_inputs_mergekit_accepts_merge_as_in_mergekit(zoos, tmp_path, variant, caplog):
    zoo = dict(zoos["float32"])
    if variant == "bf16_base_fp32_experts":
        zoo["base"] = zoos["bfloat16"]["base"]
    elif variant == "tied_base_untied_experts":
        zoo["base"] = _with_config_change(zoo["base"], tmp_path / "tied", tie_word_embeddings=True)
    else:
        zoo["chat"] = _with_extra_tensor(zoo["chat"], tmp_path / "chat")
    config = {
        "merge_method": "ties", "base_model": zoo["base"], "models": _models(zoo, EXPERTS, W3),
        "parameters": {"density": 0.5},
    }  # fmt: skip  (no dtype: mergekit's own rule for the output dtype)
    with caplog.at_level(logging.WARNING):
        ours, theirs = run_both(config, tmp_path, variant)
    assert_parity(ours, theirs)
    assert {t.dtype for t in ours.values()} == {torch.float32}
    if variant == "expert_with_extra_tensor":
        assert "model.rotary_emb.inv_freq" in caplog.text


# --- DARE / DELLA: equal in distribution ---


def _one_tensor_merge(method: str, tau: torch.Tensor, params: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, mergekit's) Δ = θ − θ₀ for one expert's τ on a zero base."""
    base = torch.zeros_like(tau)
    x = TensorInputs(name="w", base=base, weights=[1.0], deltas_given=[tau], seed=seed)
    ours = get_method(method)(x, **params)
    torch.manual_seed(seed)
    theirs = merge_state_dicts({"base": {"w": base}, "e": {"w": tau}}, method, parameters={"weight": 1.0, **params}, base="base")["w"]
    return ours, theirs


def _profile(delta: torch.Tensor, tau: torch.Tensor, buckets: int = 5) -> tuple[float, list[float]]:
    """(kept fraction, mean Δ/τ in each fifth of |τ| ranks, smallest first)."""
    ratio = (delta / tau).reshape(-1)
    order = tau.abs().reshape(-1).argsort()
    return float((delta != 0).float().mean()), [float(chunk.mean()) for chunk in ratio[order].chunk(buckets)]


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("dare_linear", {"density": 0.3}),
        ("dare_ties", {"density": 0.6}),
        ("della_linear", {"density": 0.5, "epsilon": 0.2}),
        ("della", {"density": 0.4, "epsilon": 0.15}),
        ("dare_linear", {"density": 0.3, "rescale": False}),
    ],
)
def test_random_methods_match_mergekit_in_distribution(method, params):
    # 64 rows × 3200: per fifth 41k entries, so a mean Δ/τ has noise ~0.005 and the kept fraction ~0.002.
    tau = 0.02 * torch.randn(64, 3200, generator=torch.Generator().manual_seed(0))
    ours, theirs = _one_tensor_merge(method, tau, params, seed=1)
    (kept_ours, ranks_ours), (kept_theirs, ranks_theirs) = _profile(ours, tau), _profile(theirs, tau)
    assert kept_ours == pytest.approx(kept_theirs, abs=0.01)
    assert ranks_ours == pytest.approx(ranks_theirs, abs=0.03), (ranks_ours, ranks_theirs)
    if method.startswith("della"):
        assert ranks_theirs[0] < ranks_theirs[-1] - 0.1  # DELLA keeps large |τ| more often: the test can tell


def test_mergekit_config_file_runs_through_mergetune_merge(zoos, tmp_path):
    from mergetune.cli.main import main

    config = mergekit_config(zoos["bfloat16"], "bfloat16", "ties")
    path = tmp_path / "mergekit.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as done:
        main(["merge", str(path), "--out", str(tmp_path / "ours")])
    assert done.value.code == 0
    theirs = tmp_path / "theirs"
    run_merge(MergeConfiguration.model_validate(config), str(theirs), options=MergeOptions(quiet=True, copy_tokenizer=False))
    assert_parity(load_tensors(tmp_path / "ours"), load_tensors(theirs))
