"""A merge recipe: ordered rules (tensor-name patterns and/or a layer range → method, params, weights).

The first rule that matches a tensor decides how it is merged, so each layer group can use a
different method. Recipes round-trip through YAML/JSON; unknown keys are rejected.

    base: base
    models: {base: ./zoo/base, math: ./zoo/experts/math, code: ./zoo/experts/code}
    seed: 0
    rules:
      - layers: [0, 2]            # transformer layers 0 and 1 (stop is exclusive)
        method: ties
        params: {density: {math: 0.4, code: 0.6}, lambda: 1.0}
        weights: {math: 1.0, code: 0.8}
      - match: "*"                # everything else
        method: linear
        params: {t: [0.2, 0.8]}   # a mergekit gradient: any numeric param, any weight
        weights: {math: [1.0, 0.5, 0.0], code: 1.0}

Models whose vocabularies differ (added tokens) merge by token with `tokenizer: {source: base |
union | MODEL}` (merge/vocabulary.py), as mergekit's `tokenizer:` option.

A list for a numeric param or weight is a mergekit gradient: piecewise linear over the model's
L layers, evaluated at x = ℓ/(L−1) for layer ℓ (x = 1 when L = 1) and at x = 0 for tensors
outside the layers (embeddings, final norm, head), exactly as mergekit does (`gradient_value`).
Per-expert values are dicts (`{math: 0.4}`); a dict value may itself be a gradient.
"""

from __future__ import annotations

import fnmatch
import math
import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from mergetune.core.config import load_yaml_model, validate_model
from mergetune.core.errors import ConfigError
from mergetune.merge.dataflow import MERGED, DataflowPath
from mergetune.merge.domains import rule_problem
from mergetune.merge.methods import get_method
from mergetune.merge.vocabulary import TokenizerSpec

def _finite(value: float | list[float]) -> float | list[float]:
    if not all(math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
        raise ValueError("Input should be a finite number")
    return value


Number = Union[float, list[float]]  # a value, or a mergekit gradient over the layers
# Weights checked as a whole, so an error names the field rather than a union branch (params are
# checked value by value in `_check_rules`, which says what each one accepts).
Weight = Annotated[Number, AfterValidator(_finite)]
ParamValue = Union[bool, int, float, str, list[float], dict[str, Number]]
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """The transformer layer a tensor belongs to (`model.layers.3.mlp...` → 3), None for others."""
    found = _LAYER_RE.search(tensor_name)
    return int(found.group(1)) if found else None


def layer_position(tensor_name: str, num_layers: int) -> float:
    """Where mergekit evaluates a gradient for this tensor: ℓ/(L−1) in layer ℓ (1 if L = 1), 0 outside the layers."""
    layer = layer_index(tensor_name)
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def gradient_value(knots: list[float], x: float) -> float:
    """mergekit's gradient: piecewise linear through the knots, spread evenly over x ∈ [0, 1]."""
    scaled = x * (len(knots) - 1)
    i0 = int(scaled)
    i1 = min(len(knots) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * knots[i0] + frac * knots[i1]


def _at(value: object, x: float) -> object:
    if isinstance(value, list):
        return gradient_value(value, x)
    if isinstance(value, dict):
        return {key: _at(v, x) for key, v in value.items()}
    return value


def _gradient_lengths(value: object) -> list[int]:
    if isinstance(value, list):
        return [len(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _gradient_lengths(v)]
    return []


def _is_numeric(default: object) -> bool:
    """Params a gradient may set: float-valued ones (not flags, names or iteration counts)."""
    return isinstance(default, float)


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    match: list[str] = Field(default_factory=lambda: ["*"], description="fnmatch patterns on tensor names")
    layers: tuple[int, int] | None = Field(default=None, description="layer range [start, stop)")
    method: str
    models: list[str] | None = Field(default=None, description="experts this rule merges (default: all)")
    params: dict[str, ParamValue] = Field(default_factory=dict)
    weights: dict[str, Weight] = Field(default_factory=dict, description="per-expert weight (default 1.0), or a gradient")

    @field_validator("match", mode="before")
    @classmethod
    def _one_pattern_is_a_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("layers")
    @classmethod
    def _ordered_range(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 0 <= value[0] < value[1]:
            raise ValueError("layers must be [start, stop) with 0 <= start < stop")
        return value

    @field_validator("params", "weights")
    @classmethod
    def _gradients_not_empty(cls, value: dict[str, object]) -> dict[str, object]:
        for name, v in value.items():
            if 0 in _gradient_lengths(v):
                raise ValueError(f"{name}: a gradient needs at least one value")
        return value

    @property
    def has_gradients(self) -> bool:
        return any(_gradient_lengths(v) for v in (*self.params.values(), *self.weights.values()))

    def gradient_points(self) -> list[float]:
        """The positions x of every gradient knot (where each knot's own value applies), 0 and 1."""
        lengths = {n for v in (*self.params.values(), *self.weights.values()) for n in _gradient_lengths(v)}
        return sorted({0.0, 1.0, *(i / (n - 1) for n in lengths if n > 1 for i in range(n))})

    def at(self, x: float) -> Rule:
        """This rule with every gradient evaluated at position x (itself when it has none)."""
        if not self.has_gradients:
            return self
        return self.model_copy(
            update={"params": {k: _at(v, x) for k, v in self.params.items()}, "weights": _at(self.weights, x)}
        )

    def matches(self, tensor_name: str) -> bool:
        if self.layers is not None:
            layer = layer_index(tensor_name)
            if layer is None or not self.layers[0] <= layer < self.layers[1]:
                return False
        return any(fnmatch.fnmatchcase(tensor_name, pattern) for pattern in self.match)

    def experts(self, all_experts: list[str]) -> list[str]:
        return list(all_experts) if self.models is None else list(self.models)

    def method_kwargs(self, all_experts: list[str]) -> dict[str, object]:
        """Public params with per-expert dicts turned into lists in this rule's expert order (no gradients: see `at`)."""
        spec = get_method(self.method)
        experts = self.experts(all_experts)
        out: dict[str, object] = {}
        for name, value in self.params.items():
            if isinstance(value, dict):
                default = spec.params[name].default
                out[name] = [float(value.get(e, default)) for e in experts]
            else:
                out[name] = value
        return out

    def weight_list(self, all_experts: list[str]) -> list[float]:
        return [float(self.weights.get(e, 1.0)) for e in self.experts(all_experts)]


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: dict[str, str] = Field(description="model name → local directory (or hub id)")
    base: str | None = Field(default=None, description="name of the base model in `models`")
    rules: list[Rule] = Field(description="the parameter-space merge; empty only for a data-flow path without `merged`")
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        default=None, description="output dtype (default: the base model's)"
    )
    # Statistics files per expert, so a recipe needing them re-merges standalone. An expert
    # directory's adam_second_moments.safetensors is used when `moments` does not name one.
    moments: dict[str, str] = Field(default_factory=dict, description="expert → Adam second-moment safetensors")
    fisher: dict[str, str] = Field(default_factory=dict, description="expert → diagonal Fisher safetensors")
    gram: dict[str, str] = Field(default_factory=dict, description="expert → RegMean Gram safetensors")
    tokenizer: TokenizerSpec | None = Field(
        default=None, description="merge models whose vocabularies differ by token: source base, union or a model's name"
    )
    dataflow: DataflowPath | None = Field(
        default=None, description="the layers a token passes through (merge/dataflow.py); null: the merged model's own"
    )

    @property
    def experts(self) -> list[str]:
        """The fine-tunes, in the order of `models`, without the base."""
        return [name for name in self.models if name != self.base]

    @model_validator(mode="after")
    def _check_rules(self) -> Recipe:
        if self.base is not None and self.base not in self.models:
            raise ValueError(f"base {self.base!r} is not one of models ({', '.join(self.models)})")
        experts = self.experts
        if not self.rules and (self.dataflow is None or MERGED in self.dataflow.sources):
            raise ValueError("rules: give at least one rule")
        if self.dataflow is not None:
            if MERGED in self.models:
                raise ValueError(f"models: {MERGED!r} names the parameter-space merge in a dataflow path; rename that model")
            unknown = sorted(self.dataflow.sources - {*self.models, MERGED})
            if unknown:
                raise ValueError(f"dataflow: source {unknown[0]!r} is not one of models ({', '.join(self.models)}) or {MERGED}")
        if self.tokenizer is not None and self.tokenizer.source not in ("base", "union", *self.models):
            raise ValueError(f"tokenizer.source: {self.tokenizer.source!r} is not base, union or one of models ({', '.join(self.models)})")
        for kind in ("moments", "fisher", "gram"):
            unknown = next((name for name in getattr(self, kind) if name not in experts), None)
            if unknown is not None:
                raise ValueError(f"{kind}: {unknown!r} is not an expert; experts: {', '.join(experts)}")
        for i, rule in enumerate(self.rules):
            where = f"rules.{i}"
            try:
                spec = get_method(rule.method)
            except ConfigError as exc:
                raise ValueError(f"{where}.method: {exc}") from None
            for name in [*(rule.models or []), *rule.weights]:
                if name not in experts:
                    raise ValueError(f"{where}: {name!r} is not an expert; experts: {', '.join(experts)}")
            unknown = sorted(set(rule.params) - set(spec.params))
            if unknown:
                allowed = ", ".join(sorted(spec.params)) or "(none)"
                raise ValueError(f"{where}.params: method '{rule.method}' has no parameter {unknown[0]!r}; allowed: {allowed}")
            for name, value in rule.params.items():
                if isinstance(value, dict):
                    for key in value:
                        if key not in experts:
                            raise ValueError(f"{where}.params.{name}: {key!r} is not an expert")
                    if not spec.params[name].per_model:
                        raise ValueError(f"{where}.params.{name}: method '{rule.method}' takes one value here")
                if _gradient_lengths(value) and not _is_numeric(spec.params[name].default):
                    raise ValueError(f"{where}.params.{name}: a gradient (list) needs a numeric parameter; give one value")
            annotations = {name: param.annotation for name, param in spec.params.items()}
            for x in rule.gradient_points():  # every knot, so each gradient value is checked like a plain one
                at = rule.at(x)
                problem = rule_problem(rule.method, at.params, at.weight_list(experts), annotations)
                if problem is not None:
                    raise ValueError(f"{where}.{problem}")
            n = len(rule.experts(experts))
            for x in rule.gradient_points():  # every knot, so each gradient value is checked like a plain one
                try:
                    spec.bind(rule.at(x).method_kwargs(experts), n)
                except ConfigError as exc:
                    raise ValueError(f"{where}: {exc}") from None
            if spec.needs_base and self.base is None:
                raise ValueError(f"{where}: method '{rule.method}' needs a base model (set `base:`)")
            if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
                count = f"{spec.min_models}" if spec.max_models == spec.min_models else f"at least {spec.min_models}"
                if spec.max_models not in (None, spec.min_models):
                    count = f"{spec.min_models} to {spec.max_models}"
                raise ValueError(f"{where}: method '{rule.method}' takes {count} expert(s), got {n}")
        return self

    def rule_for(self, tensor_name: str) -> Rule:
        for rule in self.rules:
            if rule.matches(tensor_name):
                return rule
        raise ConfigError(f"tensor {tensor_name!r} matches no rule; add a last rule with match: '*'")

    # --- serialisation ---
    def to_dict(self) -> dict:
        data = self.model_dump(mode="json", exclude_none=True)
        for kind in ("moments", "fisher", "gram"):
            if not data[kind]:
                del data[kind]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: object, source: str = "recipe") -> Recipe:
        return validate_model(cls, data, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        return load_yaml_model(cls, path)
