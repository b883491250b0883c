"""Translate a Recipe into mergekit configs: one `mergekit-yaml` document, or a `mergekit-multi` set.

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
Every config computes in float32 (`dtype: float32`, as we do) and writes our output dtype
(`out_dtype`); a recipe's `tokenizer:` is mergekit's own option (in each intermediate of a
multi-merge, whose stitch then sees one vocabulary). Parameters map by name; what mergekit cannot express (our `rescale: inverse_keep`,
`scope: global`, methods it lacks, a subset of the experts) is refused in one line.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from mergetune.core.errors import MergetuneError
from mergetune.merge.mergekit_config import MERGEKIT_METHODS, RANDOM_METHODS
from mergetune.merge.methods import get_method
from mergetune.merge.recipe import Recipe, Rule, layer_index, layer_position

Scalar = bool | int | float | str
ARCEE_FUSION_SAMPLE = 1_000_000  # mergekit estimates arcee_fusion's quantiles from this many entries above it


@dataclass(frozen=True)
class ModelLayout:
    """What the export needs of the models: tensor names (with their sizes), layer count, output dtype."""

    tensor_names: list[str]
    num_layers: int
    out_dtype: str | None = None  # the merged model's float dtype (None: several)
    sizes: dict[str, int] | None = None

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> ModelLayout:
        """Read from the recipe's model headers, as `mergetune merge` would see them."""
        from mergetune.merge.engine import output_layout
        from mergetune.merge.modelset import ModelSet

        modelset = ModelSet.from_recipe(recipe)
        layout = output_layout(modelset, recipe.dtype)
        dtypes = {str(dtype).removeprefix("torch.") for dtype, _ in layout.values() if dtype.is_floating_point}
        sizes = {name: _numel(shape) for name, (_, shape) in layout.items()}
        return cls(list(layout), modelset.num_layers, dtypes.pop() if len(dtypes) == 1 else None, sizes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def recipe_to_mergekit(recipe: Recipe, layout: ModelLayout | None = None) -> dict | list[dict]:
    """One mergekit-yaml config (dict) for a single-method recipe, else a mergekit-multi document list.

    `layout` (tensor names, layer count, output dtype) defaults to reading the recipe's models.
    """
    if layout is None:
        layout = ModelLayout.from_recipe(recipe)
    _check_exportable(recipe)
    if layout.out_dtype is None:
        raise MergetuneError(
            "the merged model's float tensors have several dtypes and mergekit writes one; set `dtype:` in the recipe "
            "to export it for mergekit"
        )
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


def run_command(config: dict | list[dict], seed: int) -> str:
    """The shell command that runs the exported file (`mergekit.yaml` in the current directory)."""
    docs = config if isinstance(config, list) else [config]
    flag = f" --random-seed {seed}" if {doc["merge_method"] for doc in docs} & RANDOM_METHODS else ""
    if isinstance(config, list):
        return f"mergekit-multi mergekit.yaml --intermediate-dir ./intermediate --out-path ./merged{flag}"
    return f"mergekit-yaml mergekit.yaml ./merged{flag}"


def mergekit_yaml(recipe: Recipe, config: dict | list[dict], layout: ModelLayout | None = None) -> str:
    """The YAML text with a header saying how to run it and how close its result is to ours."""
    docs = config if isinstance(config, list) else [config]
    methods = {doc["merge_method"] for doc in docs}
    lines = [f"# Run with: {run_command(config, recipe.seed)}"]
    if isinstance(config, list):
        lines.append("# (per-layer methods: one intermediate merge per method, then a stitch)")
    if methods & RANDOM_METHODS:
        lines.append(
            "# DARE/DELLA masks come from mergekit's RNG: the result matches ours in distribution (same keep "
            "probabilities and rescale), not bit for bit."
        )
    if "arcee_fusion" in methods and layout is not None and any(n > ARCEE_FUSION_SAMPLE for n in (layout.sizes or {}).values()):
        lines.append(
            "# arcee_fusion: mergekit estimates its thresholds from a random sample of tensors over 1M entries "
            "(ours are exact), so those tensors can differ slightly."
        )
    body = yaml.safe_dump_all(docs, sort_keys=False) if isinstance(config, list) else yaml.safe_dump(config, sort_keys=False)
    return "\n".join(lines) + "\n" + body


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
    """(shared params, per-expert params) of one (gradient-free) rule in mergekit's names, defaults filled in from our spec."""
    spec = get_method(method)
    target = MERGEKIT_METHODS[method]
    experts = recipe.experts
    given = rule.method_kwargs(experts)
    shared: dict[str, Scalar] = {}
    per_model: dict[str, list[Scalar]] = {}
    for name, param in spec.params.items():
        value = given.get(name, param.default)
        if name == "rescale" and value == "inverse_keep":
            raise MergetuneError(
                f"'{method}' with rescale: inverse_keep (survivors divided by their keep probability) has no mergekit "
                "equivalent — mergekit's rescale restores the L1 norm (our rescale: true); only the mergetune recipe "
                "format is exported for this trial"
            )
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
    elif len(set(rule.weight_list(experts))) > 1:
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
        chosen = rule if rule.method == method else fallback
        values[name] = _rule_values(recipe, chosen.at(layer_position(name, layout.num_layers)), method)
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
    if target.base == "required" or (target.base == "optional" and recipe.base is not None):
        config["base_model"] = _model_path(recipe, recipe.base)
    config["models"] = models
    if parameters:
        config["parameters"] = parameters
    if recipe.tokenizer is not None:
        config["tokenizer"] = _tokenizer(recipe)
    config["dtype"] = "float32"
    config["out_dtype"] = layout.out_dtype
    return config


def _tokenizer(recipe: Recipe) -> dict:
    """Our `tokenizer:` as mergekit's (the same option and semantics; a model source by its path)."""
    assert recipe.tokenizer is not None
    source = recipe.tokenizer.source
    if source not in ("base", "union"):
        source = "base" if source == recipe.base else _model_path(recipe, source)
    block: dict = {"source": source}
    if recipe.tokenizer.pad_to_multiple_of is not None:
        block["pad_to_multiple_of"] = recipe.tokenizer.pad_to_multiple_of
    return block


def _stitch(recipe: Recipe, methods: list[str], rules_by_tensor: dict[str, Rule], layout: ModelLayout) -> dict:
    """The final (unnamed) mergekit-multi document taking each tensor from its method's intermediate."""
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
    tail = {"dtype": "float32", "out_dtype": layout.out_dtype}
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
        got = resolve_setting(setting, name, layer_position(name, layout.num_layers))
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
