"""Translate a Recipe into mergekit configs: one `mergekit-yaml` document, or a `mergekit-multimerge` set.

mergekit resolves a parameter per tensor from a setting that is a scalar, a gradient list
(piecewise linear over the layers at x = ℓ/(L−1); tensors outside the layers use x = 0), or a
list of `{filter, value}` conditions where the first condition whose filter is a substring of
the tensor name wins. We build settings from the exact per-tensor values our recipe implies
(a gradient of length L hits every layer's value exactly), then re-resolve every tensor name
with mergekit's rules and refuse to export if any value would differ.

A recipe whose rules all use one method becomes one config. Otherwise each method gets an
intermediate merge over the whole model, and a final stitch picks every tensor from the
intermediate its rule names: a `passthrough` over layer slices when methods change only between
whole layers, else a `linear` merge with 0/1 weights per tensor (exact in float32).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from safetensors import safe_open

from mergetune.core.errors import MergetuneError
from mergetune.merge.methods import get_method
from mergetune.merge.recipe import Recipe, Rule, layer_index

Scalar = bool | int | float | str


@dataclass(frozen=True)
class MergekitMethod:
    """What mergekit 0.1.5 knows about one method: base policy and parameter defaults."""

    uses_base: bool
    shared: dict[str, Scalar] = field(default_factory=dict)
    per_model: dict[str, Scalar | None] = field(default_factory=dict)


_GTA_SHARED = {"int8_mask": False, "lambda": 1.0}
# Mirrors mergekit 0.1.5's method specs (tests/test_export_mergekit.py checks it against mergekit).
MERGEKIT_METHODS: dict[str, MergekitMethod] = {
    "linear": MergekitMethod(False, {"normalize": True}, {"weight": None}),
    "task_arithmetic": MergekitMethod(
        True, {**_GTA_SHARED, "normalize": False, "rescale": False}, {"weight": None, "density": 1.0}
    ),
    "ties": MergekitMethod(True, {**_GTA_SHARED, "normalize": True, "rescale": False}, {"weight": None, "density": 1.0}),
    "dare_ties": MergekitMethod(
        True, {**_GTA_SHARED, "normalize": False, "rescale": True}, {"weight": None, "density": 1.0}
    ),
    "della": MergekitMethod(
        True,
        {**_GTA_SHARED, "normalize": True, "rescale": True},
        {"weight": None, "density": 1.0, "epsilon": 0.15},
    ),
    "breadcrumbs": MergekitMethod(
        True,
        {**_GTA_SHARED, "normalize": False, "rescale": False},
        {"weight": None, "density": 1.0, "gamma": 0.01},
    ),
    "slerp": MergekitMethod(True, {"t": None}),
    "model_stock": MergekitMethod(True, {"filter_wise": False}),
    "passthrough": MergekitMethod(False, {}, {"scale": None}),
}
RANDOM_METHODS = {"dare_ties", "della"}


@dataclass(frozen=True)
class ModelLayout:
    """Tensor names and layer count of the models a recipe merges (read from the base's files)."""

    tensor_names: list[str]
    num_layers: int

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelLayout:
        path = Path(path)
        config_file = path / "config.json"
        files = sorted(path.glob("*.safetensors"))
        if not config_file.is_file() or not files:
            raise MergetuneError(
                f"{path} is not a local safetensors model directory; mergekit export reads tensor names from it"
            )
        names: list[str] = []
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                names.extend(handle.keys())
        config = json.loads(config_file.read_text())
        num_layers = config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers")
        if not num_layers:
            raise MergetuneError(f"{config_file} has no num_hidden_layers; cannot map layer ranges for mergekit")
        return cls(sorted(names), int(num_layers))


def recipe_to_mergekit(recipe: Recipe, layout: ModelLayout | None = None) -> dict | list[dict]:
    """One mergekit-yaml config (dict) for a single-method recipe, else a mergekit-multimerge document list.

    `layout` (tensor names, layer count) defaults to reading the base model's directory.
    """
    if layout is None:
        layout = ModelLayout.from_dir(recipe.models[recipe.base or next(iter(recipe.models))])
    _check_exportable(recipe)
    rules_by_tensor = {name: recipe.rule_for(name) for name in layout.tensor_names}
    methods = list(dict.fromkeys(rule.method for rule in recipe.rules if rule in rules_by_tensor.values()))
    if len(methods) == 1:
        return _single_method_config(recipe, methods[0], rules_by_tensor, layout)
    docs = []
    for method in methods:
        doc = _single_method_config(recipe, method, rules_by_tensor, layout)
        docs.append({"name": f"{method}_part", **doc})
    docs.append(_stitch(recipe, methods, rules_by_tensor, layout))
    return docs


def mergekit_yaml(recipe: Recipe, config: dict | list[dict]) -> str:
    """The YAML text with a header saying how to run it (and which random seed to pass)."""
    docs = config if isinstance(config, list) else [config]
    methods = {doc["merge_method"] for doc in docs}
    seed = f" --random-seed {recipe.seed}" if methods & RANDOM_METHODS else ""
    if isinstance(config, list):
        header = (
            "# Per-layer methods: run with\n"
            f"#   mergekit-multimerge mergekit.yaml --intermediate-dir ./intermediate --out-path ./merged{seed}\n"
        )
        body = yaml.safe_dump_all(docs, sort_keys=False)
    else:
        header = f"# Run with: mergekit-yaml mergekit.yaml ./merged{seed}\n"
        body = yaml.safe_dump(config, sort_keys=False)
    if seed:
        header += "# DARE/DELLA masks come from mergekit's RNG: the result matches ours in distribution, not bit for bit.\n"
    return header + body


def _check_exportable(recipe: Recipe) -> None:
    for i, rule in enumerate(recipe.rules):
        if rule.method not in MERGEKIT_METHODS:
            raise MergetuneError(
                f"rules.{i} uses '{rule.method}', which mergekit does not have; "
                "only the mergetune recipe format is exported for this trial (use --format recipe or model)"
            )
        if rule.models is not None and set(rule.models) != set(recipe.experts):
            raise MergetuneError(
                f"rules.{i} merges a subset of the experts ({', '.join(rule.models)}); mergekit configs merge "
                "the same models everywhere, so only the mergetune recipe format is exported for this trial"
            )


def _rule_values(recipe: Recipe, rule: Rule, method: str) -> tuple[dict[str, Scalar], dict[str, list[Scalar]]]:
    """(shared params, per-expert params) of one rule in mergekit's names, defaults filled in from our spec."""
    spec = get_method(method)
    target = MERGEKIT_METHODS[method]
    experts = recipe.experts
    given = rule.method_kwargs(experts)
    shared: dict[str, Scalar] = {}
    per_model: dict[str, list[Scalar]] = {}
    for name, param in spec.params.items():
        value = given.get(name, param.default)
        if name in target.shared:
            shared[name] = value
        elif name in target.per_model:
            per_model[name] = list(value) if isinstance(value, list) else [value] * len(experts)
        elif value != param.default:
            raise MergetuneError(
                f"parameter '{name}' of '{method}' has no mergekit equivalent (value {value!r}); "
                "only the mergetune recipe format is exported for this trial"
            )
    if "weight" in target.per_model:
        per_model["weight"] = rule.weight_list(experts)
    elif any(w != 1.0 for w in rule.weight_list(experts)):
        raise MergetuneError(f"mergekit's '{method}' takes no per-model weights; only our recipe format is exported")
    return shared, per_model


def _single_method_config(
    recipe: Recipe, method: str, rules_by_tensor: dict[str, Rule], layout: ModelLayout
) -> dict:
    """A mergekit-yaml config computing `method` on every tensor (with each tensor's own rule values).

    Tensors whose rule uses another method take the first `method` rule's values; in a multi-merge
    their result is discarded by the stitch.
    """
    fallback = next(rule for rule in recipe.rules if rule.method == method)
    values = {}
    for name, rule in rules_by_tensor.items():
        values[name] = _rule_values(recipe, rule if rule.method == method else fallback, method)
    target = MERGEKIT_METHODS[method]
    experts = recipe.experts
    shared_names = list(values[layout.tensor_names[0]][0])
    model_param_names = list(values[layout.tensor_names[0]][1])

    parameters = {
        pname: _setting({n: v[0][pname] for n, v in values.items()}, layout) for pname in shared_names
    }
    models = []
    for k, expert in enumerate(experts):
        model_params = {
            pname: _setting({n: v[1][pname][k] for n, v in values.items()}, layout) for pname in model_param_names
        }
        entry: dict = {"model": _model_path(recipe, expert)}
        if model_params:
            entry["parameters"] = model_params
        models.append(entry)
    config: dict = {"merge_method": method}
    if target.uses_base:
        config["base_model"] = _model_path(recipe, recipe.base)
    config["models"] = models
    if parameters:
        config["parameters"] = parameters
    config["dtype"] = "float32"
    if recipe.dtype:
        config["out_dtype"] = recipe.dtype
    return config


def _stitch(recipe: Recipe, methods: list[str], rules_by_tensor: dict[str, Rule], layout: ModelLayout) -> dict:
    """The final (unnamed) multimerge document taking each tensor from its method's intermediate."""
    method_of = {name: rule.method for name, rule in rules_by_tensor.items()}
    layer_method: dict[int, set[str]] = {}
    for name, method in method_of.items():
        layer = layer_index(name)
        if layer is not None:
            layer_method.setdefault(layer, set()).add(method)
    per_layer = [layer_method.get(i, set()) for i in range(layout.num_layers)]
    outside = {name: m for name, m in method_of.items() if layer_index(name) is None}
    pre = {m for name, m in outside.items() if "embed" in name}
    post = {m for name, m in outside.items() if "embed" not in name}
    whole_layers = all(len(s) == 1 for s in per_layer)
    tail = {"dtype": "float32", **({"out_dtype": recipe.dtype} if recipe.dtype else {})}
    if whole_layers and pre <= per_layer[0] and post <= per_layer[-1]:
        slices = []
        for layer, methods_here in enumerate(per_layer):
            method = next(iter(methods_here))
            if slices and slices[-1]["method"] == method:
                slices[-1]["stop"] = layer + 1
            else:
                slices.append({"method": method, "start": layer, "stop": layer + 1})
        return {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": f"{s['method']}_part", "layer_range": [s["start"], s["stop"]]}]}
                for s in slices
            ],
            **tail,
        }
    models = []
    for method in methods:
        weight = _setting({name: 1.0 if m == method else 0.0 for name, m in method_of.items()}, layout)
        models.append({"model": f"{method}_part", "parameters": {"weight": weight}})
    return {"merge_method": "linear", "models": models, "parameters": {"normalize": False}, **tail}


def _model_path(recipe: Recipe, name: str | None) -> str:
    path = recipe.models[name]
    return str(Path(path).absolute()) if Path(path).exists() else path


# --- per-tensor settings in mergekit's filter/gradient language ---


def _setting(values: dict[str, Scalar], layout: ModelLayout) -> object:
    """The smallest mergekit setting that resolves to `values[name]` for every tensor name."""
    distinct = set(values.values())
    if len(distinct) == 1:
        setting: object = _plain(next(iter(distinct)))
    else:
        setting = _conditional(values, layout)
    for name, wanted in values.items():
        got = resolve_setting(setting, name, _position(name, layout.num_layers))
        if not _same(got, wanted):
            raise MergetuneError(
                f"mergekit cannot express this recipe's value for {name} ({wanted!r} vs {got!r}); "
                "only the mergetune recipe format is exported for this trial"
            )
    return setting


def _conditional(values: dict[str, Scalar], layout: ModelLayout) -> list[dict]:
    L = layout.num_layers
    by_suffix: dict[str, list[Scalar | None]] = {}
    for name, value in values.items():
        layer = layer_index(name)
        if layer is None:
            continue
        suffix = name.split(f"layers.{layer}.", 1)[1]
        by_suffix.setdefault(suffix, [None] * L)[layer] = value
    # Fill layers a suffix does not occur in (never resolved) with a neighbour's value.
    vectors = {s: tuple(_filled(v)) for s, v in by_suffix.items()}
    common = Counter(vectors.values()).most_common(1)[0][0] if vectors else None
    conditions = []
    for name, value in values.items():
        if layer_index(name) is None:
            conditions.append({"filter": name, "value": _plain(value)})
    groups: dict[tuple, list[str]] = {}
    for suffix, vector in vectors.items():
        if vector != common:
            groups.setdefault(vector, []).append(suffix)
    for vector, suffixes in groups.items():
        for flt in _filters_for(suffixes, [s for s in vectors if s not in suffixes]):
            conditions.append({"filter": flt, "value": _gradient(vector)})
    if common is not None:
        conditions.append({"value": _gradient(common)})
    return conditions


def _filters_for(suffixes: list[str], others: list[str]) -> list[str]:
    """One shared filter (e.g. `.mlp.`) when the suffixes' common module path names only them, else one each."""
    common = suffixes[0].split(".")
    for suffix in suffixes[1:]:
        parts = suffix.split(".")
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    prefix = "." + ".".join(common) + "." if common else ""
    if prefix and len(common) < min(len(s.split(".")) for s in suffixes):
        if not any(prefix in f".{other}" for other in others):
            return [prefix]
    return [f".{suffix}" for suffix in suffixes]


def _filled(vector: list[Scalar | None]) -> list[Scalar]:
    known = [v for v in vector if v is not None]
    out, last = [], known[0]
    for v in vector:
        last = v if v is not None else last
        out.append(last)
    return out


def _gradient(vector: tuple[Scalar, ...]) -> object:
    return _plain(vector[0]) if len(set(vector)) == 1 else [_plain(v) for v in vector]


def _plain(value: Scalar) -> Scalar:
    """YAML-friendly scalars (no numpy/torch types)."""
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    return float(value)


def _position(name: str, num_layers: int) -> float:
    layer = layer_index(name)
    return 0.0 if layer is None or num_layers <= 1 else layer / (num_layers - 1)


def _same(a: object, b: object) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or isinstance(b, str):
        return a == b
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))


def resolve_setting(setting: object, tensor_name: str, t: float) -> object:
    """mergekit 0.1.5's `evaluate_setting` (filters, then gradients), for checking our settings."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
            return resolve_setting(cond["value"], tensor_name, t)
    return None
