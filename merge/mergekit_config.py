"""mergekit 0.1.5's merge methods as our recipes see them, and a plain mergekit YAML read as a Recipe.

`MERGEKIT_METHODS` says, per mergekit method, how it treats a base model and which parameters
it takes (shared or per model, with mergekit's defaults; tests check it against mergekit
itself). The exporter (`studies/mergekit.py`) and the importer here both use it.

`recipe_from_mergekit` turns a `mergekit-yaml` config into an equivalent Recipe: `models:` with
per-model and global `parameters` (scalars, gradient lists, `{filter, value}` conditions),
`base_model`, `dtype`/`out_dtype`. Gradients stay gradients (our recipes evaluate them as
mergekit does). Conditions are resolved against the base model's tensor names: tensors that
pick the same condition for every parameter form one rule. What has no equivalent here
(`slices`, `modules`, per-token embedding settings, LoRA references, a parameter mergetune
lacks) is refused in one line naming it; `tokenizer_source`/`tokenizer: {source}` map to our
`tokenizer:` (merge/vocabulary.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from mergetune.core.config import load_yaml
from mergetune.core.errors import ConfigError
from mergetune.merge.methods import MethodSpec, get_method, method_names
from mergetune.merge.recipe import Recipe

Scalar = bool | int | float | str


@dataclass(frozen=True)
class MergekitMethod:
    """What mergekit 0.1.5 knows about one method: base policy and parameter defaults (None: required)."""

    base: Literal["required", "optional", "ignored"]
    shared: dict[str, Scalar | None] = field(default_factory=dict)
    per_model: dict[str, Scalar | None] = field(default_factory=dict)


def _gta(normalize: bool, rescale: bool, **per_model: float) -> MergekitMethod:
    shared = {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0}
    return MergekitMethod("required", shared, {"weight": None, "density": 1.0, **per_model})


# Mirrors mergekit 0.1.5's method specs (tests/test_export_mergekit.py checks it against mergekit).
MERGEKIT_METHODS: dict[str, MergekitMethod] = {
    "linear": MergekitMethod("ignored", {"normalize": True}, {"weight": None}),
    "task_arithmetic": _gta(False, False),
    "ties": _gta(True, False),
    "dare_ties": _gta(False, True),
    "dare_linear": _gta(False, True),
    "della": _gta(True, True, epsilon=0.15),
    "della_linear": _gta(False, True, epsilon=0.15),
    "breadcrumbs": _gta(False, False, gamma=0.01),
    "breadcrumbs_ties": _gta(False, False, gamma=0.01),
    "slerp": MergekitMethod("required", {"t": None}),
    "nuslerp": MergekitMethod("optional", {"nuslerp_row_wise": False, "nuslerp_flatten": True}, {"weight": None}),
    "multislerp": MergekitMethod("optional", {"normalize_weights": True, "eps": 1e-8}, {"weight": None}),
    "karcher": MergekitMethod("ignored", {"max_iter": 10, "tol": 1e-5}),
    "model_stock": MergekitMethod("required", {"filter_wise": False}),
    "sce": MergekitMethod("required", {"int8_mask": False, "select_topk": 1.0}),
    "ram": MergekitMethod("required", {"epsilon": 1e-5}),
    "ramplus_tl": MergekitMethod("required", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
    "nearswap": MergekitMethod("required", {"t": None}),
    "arcee_fusion": MergekitMethod("required"),
    "passthrough": MergekitMethod("ignored", {}, {"scale": None}),
}
RANDOM_METHODS = frozenset({"dare_ties", "dare_linear", "della", "della_linear"})
# mergekit parameters that change memory use only, never the result.
NO_EFFECT_PARAMS = frozenset({"int8_mask"})
SUPPORTED_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer")


def is_mergekit_config(data: object) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def load_recipe(path: str | Path) -> Recipe:
    """A recipe file, or a plain mergekit YAML (it has `merge_method:`) translated into one."""
    path = Path(path)
    try:
        text = path.read_text()
        docs = list(yaml.safe_load_all(text))
    except (OSError, yaml.YAMLError):
        docs = [load_yaml(path)]  # the one-line error for a missing or malformed file
    if len(docs) > 1:
        raise ConfigError(
            f"{path}: {len(docs)} YAML documents (a mergekit-multi config); mergetune reads one recipe or "
            "one mergekit-yaml config — import each document on its own"
        )
    data = docs[0] if docs else None
    if is_mergekit_config(data):
        return recipe_from_mergekit(data, str(path))
    return Recipe.from_dict(data, str(path))


def _model_path(ref: object, where: str) -> str:
    if isinstance(ref, str) and "+" not in ref:
        return ref
    raise ConfigError(f"{where}: only plain model paths are supported ({ref!r}); LoRA references and revisions are not")


def _names(paths: list[str]) -> list[str]:
    """Short unique model names from their paths (directory names)."""
    out: list[str] = []
    for p in paths:
        stem = Path(p.rstrip("/")).name.replace(".", "_") or "model"
        name, i = stem, 2
        while name in out or name == "base":
            name, i = f"{stem}_{i}", i + 1
        out.append(name)
    return out


def _is_condition_list(value: object) -> bool:
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value))


def _conditions(value: object, where: str) -> list[tuple[str | None, object]]:
    items = [value] if isinstance(value, dict) else value
    out = []
    for item in items:
        if not isinstance(item, dict) or "value" not in item or set(item) - {"filter", "value"}:
            raise ConfigError(f"{where}: a condition is {{filter: SUBSTRING, value: VALUE}}, not {item!r}")
        flt = item.get("filter")
        out.append((None if flt in (None, "*") else str(flt), item["value"]))
    return out


def _choose(conditions: list[tuple[str | None, object]], tensor_name: str) -> int | None:
    """mergekit's rule: the first condition without a filter or whose filter is a substring of the name."""
    return next((i for i, (flt, _) in enumerate(conditions) if flt is None or flt in tensor_name), None)


def recipe_from_mergekit(config: dict, source: str = "mergekit config") -> Recipe:
    """The Recipe that merges what `mergekit-yaml` would merge with this config (see the module docstring)."""
    unsupported = [key for key in config if key not in SUPPORTED_KEYS]
    if unsupported:
        raise ConfigError(
            f"{source}: mergetune does not support mergekit's {', '.join(unsupported)}; "
            f"it reads {', '.join(SUPPORTED_KEYS)}"
        )
    method = config["merge_method"]
    if method not in MERGEKIT_METHODS or method not in method_names():
        raise ConfigError(f"{source}: merge_method {method!r} is not a mergekit method mergetune has; "
                          f"choose one of {', '.join(sorted(MERGEKIT_METHODS))}")  # fmt: skip
    target = MERGEKIT_METHODS[method]
    spec = get_method(method)
    entries = config.get("models") or []
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: models: give a list of {{model: PATH, parameters: {{...}}}}")
    base_path = _model_path(config["base_model"], f"{source}: base_model") if config.get("base_model") else None
    if target.base == "required" and base_path is None:
        raise ConfigError(f"{source}: merge_method {method} needs base_model")
    tokenizer = _tokenizer_setting(config, source)

    inputs: list[tuple[str, dict]] = []  # (path, per-model parameters) of the models merged as experts
    for i, entry in enumerate(entries):
        where = f"{source}: models.{i}"
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise ConfigError(f"{where}: expected {{model: PATH, parameters: {{...}}}}")
        path = _model_path(entry["model"], f"{where}.model")
        if target.base != "ignored" and path == base_path:
            continue  # the base listed among the models is still the base
        inputs.append((path, entry.get("parameters") or {}))
    if target.base == "ignored" and base_path is not None and base_path not in [p for p, _ in inputs]:
        inputs.append((base_path, {}))  # mergekit merges an ignored base like any other model
    uses_base = target.base != "ignored" and base_path is not None
    if not inputs:
        raise ConfigError(f"{source}: models lists no model besides the base")

    experts = _names([p for p, _ in inputs])
    shared_given = config.get("parameters") or {}
    for name in list(shared_given) + [n for _, params in inputs for n in params]:
        if name not in spec.params and name != "weight" and name not in NO_EFFECT_PARAMS:
            raise ConfigError(f"{source}: parameter {name!r} of {method} has no mergetune equivalent; remove it")
    # Every (parameter, expert or None) setting, in mergekit's precedence: the model's own, then the global one.
    settings: dict[tuple[str, str | None], object] = {}
    for pname, value in shared_given.items():
        if pname in NO_EFFECT_PARAMS:
            continue
        per_model = pname == "weight" or (pname in spec.params and spec.params[pname].per_model)
        if per_model:
            for expert in experts:
                settings[pname, expert] = value
        else:
            settings[pname, None] = value
    for expert, (_, params) in zip(experts, inputs):
        for pname, value in params.items():
            if pname in NO_EFFECT_PARAMS:
                continue
            if pname != "weight" and not spec.params[pname].per_model:
                raise ConfigError(f"{source}: parameter {pname!r} of {method} is global in mergekit; set it under parameters:")
            settings[pname, expert] = value
    for pname, default in {**target.shared, **target.per_model}.items():
        if default is None and pname != "weight" and not any(key[0] == pname for key in settings):
            raise ConfigError(f"{source}: merge_method {method} needs parameter {pname!r}")
    if "weight" in target.per_model:
        missing = next((e for e in experts if ("weight", e) not in settings), None)
        if missing is not None:
            raise ConfigError(f"{source}: model {missing!r} has no weight; mergekit's {method} needs one per model")

    conditional = {key: _conditions(v, f"{source}: {key[0]}") for key, v in settings.items() if _is_condition_list(v)}
    models = {"base": base_path} if uses_base else {}
    models.update({e: p for e, (p, _) in zip(experts, inputs)})
    if tokenizer is not None and tokenizer["source"] not in ("base", "union"):
        by_path = {p: name for name, p in models.items()}
        chosen = _model_path(tokenizer["source"], f"{source}: tokenizer.source")
        if chosen not in by_path:
            raise ConfigError(f"{source}: tokenizer.source {tokenizer['source']!r} is none of the merged models")
        tokenizer["source"] = by_path[chosen]
    recipe = {
        "models": models,
        "base": "base" if uses_base else None,
        "dtype": config.get("out_dtype") or config.get("dtype"),
        "tokenizer": tokenizer,
        "rules": [],
    }
    if not conditional:
        recipe["rules"] = [_rule(spec, settings, ["*"])]
    else:
        from mergetune.merge.modelset import ModelSet

        from mergetune.merge.vocabulary import TokenizerSpec

        experts = {e: p for e, p in models.items() if e != "base"}
        spec_of_tokenizer = TokenizerSpec(**tokenizer) if tokenizer is not None else None
        names = ModelSet.from_dirs(models.get("base"), experts, tokenizer=spec_of_tokenizer).tensor_names
        groups: dict[tuple, list[str]] = {}
        for name in names:
            signature = tuple(_choose(conds, name) for conds in conditional.values())
            groups.setdefault(signature, []).append(name)
        for signature, names in groups.items():
            chosen = dict(settings)
            for (key, conds), index in zip(conditional.items(), signature):
                if index is None:
                    del chosen[key]
                else:
                    chosen[key] = conds[index][1]
            recipe["rules"].append(_rule(spec, chosen, names))
    return Recipe.from_dict({k: v for k, v in recipe.items() if v is not None}, source)


def _tokenizer_setting(config: dict, source: str) -> dict | None:
    """mergekit's `tokenizer_source: X` or `tokenizer: {source: X, pad_to_multiple_of: N}` as our `tokenizer:`
    (its source still a path or base/union; per-token `tokens:` settings have no equivalent)."""
    if "tokenizer_source" in config and "tokenizer" in config:
        raise ConfigError(f"{source}: give tokenizer_source or tokenizer, not both (mergekit refuses both too)")
    if config.get("tokenizer_source") is not None:
        return {"source": config["tokenizer_source"]}
    block = config.get("tokenizer")
    if block is None:
        return None
    if not isinstance(block, dict) or set(block) - {"source", "pad_to_multiple_of"}:
        raise ConfigError(f"{source}: tokenizer: mergetune reads source and pad_to_multiple_of (not per-token `tokens:`)")
    return {"source": block.get("source", "union"), **({"pad_to_multiple_of": block["pad_to_multiple_of"]} if block.get("pad_to_multiple_of") else {})}


def _number(value: object) -> object:
    """YAML reads `1e-5` as a string; mergekit (and we) take it as the number it spells."""
    if isinstance(value, list):
        return [_number(v) for v in value]
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _rule(spec: MethodSpec, settings: dict[tuple[str, str | None], object], match: list[str]) -> dict:
    params: dict[str, object] = {}
    weights: dict[str, object] = {}
    for (pname, expert), value in settings.items():
        if pname == "weight" or isinstance(spec.params[pname].default, float):
            value = _number(value)
        if pname == "weight":
            weights[expert] = value
        elif expert is None:
            params[pname] = value
        else:
            params.setdefault(pname, {})[expert] = value
    rule: dict = {"match": match, "method": spec.name}
    if params:
        rule["params"] = params
    if weights:
        rule["weights"] = weights
    return rule
