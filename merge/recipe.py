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
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, field_validator, model_validator

from mergetune.core.config import load_yaml_model, validate_model
from mergetune.core.errors import ConfigError
from mergetune.merge.domains import rule_problem
from mergetune.merge.methods import get_method

ParamValue = Union[bool, int, float, str, dict[str, float]]
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """The transformer layer a tensor belongs to (`model.layers.3.mlp...` → 3), None for others."""
    found = _LAYER_RE.search(tensor_name)
    return int(found.group(1)) if found else None


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    match: list[str] = Field(default_factory=lambda: ["*"], description="fnmatch patterns on tensor names")
    layers: tuple[int, int] | None = Field(default=None, description="layer range [start, stop)")
    method: str
    models: list[str] | None = Field(default=None, description="experts this rule merges (default: all)")
    params: dict[str, ParamValue] = Field(default_factory=dict)
    weights: dict[str, FiniteFloat] = Field(default_factory=dict, description="per-expert weight (default 1.0)")

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

    def matches(self, tensor_name: str) -> bool:
        if self.layers is not None:
            layer = layer_index(tensor_name)
            if layer is None or not self.layers[0] <= layer < self.layers[1]:
                return False
        return any(fnmatch.fnmatchcase(tensor_name, pattern) for pattern in self.match)

    def experts(self, all_experts: list[str]) -> list[str]:
        return list(all_experts) if self.models is None else list(self.models)

    def method_kwargs(self, all_experts: list[str]) -> dict[str, object]:
        """Public params with per-expert dicts turned into lists in this rule's expert order."""
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
    rules: list[Rule] = Field(min_length=1)
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        default=None, description="output dtype (default: the base model's)"
    )
    # Statistics files per expert, so a recipe needing them re-merges standalone. An expert
    # directory's adam_second_moments.safetensors is used when `moments` does not name one.
    moments: dict[str, str] = Field(default_factory=dict, description="expert → Adam second-moment safetensors")
    fisher: dict[str, str] = Field(default_factory=dict, description="expert → diagonal Fisher safetensors")
    gram: dict[str, str] = Field(default_factory=dict, description="expert → RegMean Gram safetensors")

    @property
    def experts(self) -> list[str]:
        """The fine-tunes, in the order of `models`, without the base."""
        return [name for name in self.models if name != self.base]

    @model_validator(mode="after")
    def _check_rules(self) -> Recipe:
        if self.base is not None and self.base not in self.models:
            raise ValueError(f"base {self.base!r} is not one of models ({', '.join(self.models)})")
        experts = self.experts
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
            for name, value in rule.params.items():
                if isinstance(value, dict):
                    for key in value:
                        if key not in experts:
                            raise ValueError(f"{where}.params.{name}: {key!r} is not an expert")
                    if name in spec.params and not spec.params[name].per_model:
                        raise ValueError(f"{where}.params.{name}: method '{rule.method}' takes one value here")
            unknown = sorted(set(rule.params) - set(spec.params))
            if unknown:
                allowed = ", ".join(sorted(spec.params)) or "(none)"
                raise ValueError(f"{where}.params: method '{rule.method}' has no parameter {unknown[0]!r}; allowed: {allowed}")
            annotations = {name: param.annotation for name, param in spec.params.items()}
            problem = rule_problem(rule.method, rule.params, rule.weight_list(experts), annotations)
            if problem is not None:
                raise ValueError(f"{where}.{problem}")
            n = len(rule.experts(experts))
            try:
                spec.bind(rule.method_kwargs(experts), n)
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
