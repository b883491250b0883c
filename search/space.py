"""The search space: an Optuna trial → a per-layer-group merge Recipe (define-by-run).

Layers are split into G groups of consecutive layers (optionally attention and MLP apart,
plus one group for embeddings, final norm and head). Which tensors are attention, MLP or
outside the layers comes from the base model's own module tree (merge/architecture.py), so
Gemma's extra norms and GPT-NeoX's fused attention land in their block's group. Per group,
`"{group}.method"` is a categorical choice; only the chosen method's parameters are
suggested, so they are conditional on it. Parameter names are stable across trials so TPE/NSGA-II can learn:

    g0.method                  categorical over the allowed methods
    g0.weight.<expert>         mixing weight (methods that weight experts); the M³ prior draws
                               a group's weights jointly (see samplers.py)
    g0.<method>.<param>        e.g. g0.ties.lambda, g0.slerp.t
    g0.<method>.<param>.<e>    per-expert params, e.g. g0.ties.density.math
    shared.*                   the same names without a group, for params in `search.shared`

With `search.space: dataflow` a trial is a layer path instead (search/dataflow_space.py, `dfs.*`
params, no merge); with `both`, the recipe and a path that may use the merge's layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import optuna

from mergetune.core.errors import ConfigError, MergetuneError
from mergetune.merge.architecture import ModelStructure, structure_of
from mergetune.merge.domains import UNWEIGHTED_METHODS, weight_domain
from mergetune.merge.methods import get_method, method_names
from mergetune.merge.recipe import Recipe, Rule, layer_index
from mergetune.search.config import StudyConfig
from mergetune.search.dataflow_space import DataflowSpace
from mergetune.search.params import SEARCHED_PARAMS, WEIGHT

DEFAULT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della")
WEIGHT_PARAM = re.compile(r"^(?P<group>[^.]+)\.weight\.(?P<expert>.+)$")


def weight_param(group: str, expert: str) -> str:
    return f"{group}.weight.{expert}"


@dataclass(frozen=True)
class LayerGroup:
    """One searched unit: a layer range (or none: embeddings/norm/head) and tensor-name patterns."""

    name: str
    layers: tuple[int, int] | None
    match: tuple[str, ...]


def base_structure(base: str) -> ModelStructure:
    """The layer structure of the base model, keyed by its checkpoint's tensor names (a directory without
    weights yet: by the names transformers would save)."""
    from mergetune.merge.modelset import Checkpoint, has_weights, resolve_model_dir

    try:
        path = resolve_model_dir(base)
        structure = Checkpoint.open(path).structure() if has_weights(path) else structure_of(path)
    except MergetuneError as exc:
        raise ConfigError(f"models.base: {exc}") from None
    check_layer_names(structure)
    return structure


def check_layer_names(structure: ModelStructure) -> None:
    """Recipes address layers by `layers.N.` in tensor names (`layer_index`); refuse a model whose layers are
    named otherwise (GPT-2's `transformer.h.N`), whose tensors no layer group would ever match."""
    odd = next((name for name, layer in structure.layer_of.items() if layer_index(name) != layer), None)
    if odd is not None:
        raise ConfigError(
            f"models.base: {structure.architecture} names its decoder layers like {odd!r}; recipes address layers "
            "as `layers.N.` only, so this architecture is not supported yet"
        )


def layer_groups(structure: ModelStructure, groups: int, split_attention_mlp: bool, separate_embeddings: bool) -> list[LayerGroup]:
    """G groups of consecutive layers (each split into attention and MLP on request), then the rest (`emb`)."""
    n_layers = structure.num_layers
    groups = min(groups, n_layers)
    bounds = [round(i * n_layers / groups) for i in range(groups + 1)]
    out = []
    for i in range(groups):
        span = (bounds[i], bounds[i + 1])
        if split_attention_mlp:
            out.append(LayerGroup(f"g{i}a", span, structure.layer_patterns("attention")))
            out.append(LayerGroup(f"g{i}m", span, structure.layer_patterns("mlp")))
        else:
            out.append(LayerGroup(f"g{i}", span, structure.decoder_patterns()))
    if separate_embeddings:
        out.append(LayerGroup("emb", None, ("*",)))  # embeddings, final norm, head and anything outside the layers
    return out


class SearchSpace:
    """Builds a Recipe from an Optuna trial; also turns a named classic recipe into trial params."""

    def __init__(self, config: StudyConfig, structure: ModelStructure | None = None) -> None:
        assert config.models is not None
        self.search = config.search
        self.models = {"base": config.models.base, **config.models.experts}
        self.experts = list(config.models.experts)
        self.seed = config.seed
        self.tokenizer = config.tokenizer
        has_moments = set(config.models.moments) == set(self.experts)
        stats = {"moments": has_moments, "fisher": bool(config.models.fisher) or has_moments, "gram": bool(config.models.gram)}
        self.methods = self._allowed_methods(self.search.methods, stats)
        self._check_against_methods()
        structure = structure if structure is not None else base_structure(config.models.base)
        self.dataflow = DataflowSpace(config, structure.num_layers, structure.architecture) if self.search.space != "parameter" else None
        # The dataflow space alone merges nothing: no layer groups, no recipe rules.
        self.groups = [] if self.search.space == "dataflow" else layer_groups(
            structure, self.search.layer_groups, self.search.split_attention_mlp, self.search.separate_embeddings
        )

    def _allowed_methods(self, requested: list[str] | None, stats: dict[str, bool]) -> list[str]:
        k = len(self.experts)
        if requested is None:
            candidates = [m for m in DEFAULT_METHODS if m in method_names()]
            if stats["moments"] and "ota" in method_names():
                candidates.append("ota")
            if k == 2 and "slerp" in method_names():
                candidates.append("slerp")
            return candidates
        for name in requested:
            spec = get_method(name)  # unknown name → ConfigError listing the available ones
            missing = sorted(kind for kind in spec.needs if not stats[kind])
            if missing or (spec.any_of and not any(stats[kind] for kind in spec.any_of)):
                need = missing[0] if missing else " or ".join(sorted(spec.any_of))
                raise ConfigError(f"search.methods: '{name}' needs {need} statistics; add models.{need} or drop it")
            if k < spec.min_models or (spec.max_models is not None and k > spec.max_models):
                raise ConfigError(f"search.methods: '{name}' cannot merge {k} experts; drop it")
        if not requested:
            raise ConfigError("search.methods: give at least one method")
        return list(requested)

    def _check_against_methods(self) -> None:
        """What the config alone cannot check: the weight range against the chosen methods."""
        low, high = self._range(WEIGHT)
        for method in self.methods:
            domain = weight_domain(method)
            if self.uses_weights(method) and (low not in domain or high not in domain):
                raise ConfigError(f"search.ranges.weight: [{low:g}, {high:g}] must lie in {domain} for '{method}', "
                                  "whose weights scale each expert's statistics; narrow the range or drop the method")

    # --- trial → recipe ---
    def _prefix(self, group: str, param: str) -> str:
        return "shared" if param in self.search.shared else group

    def _range(self, param: str, method: str | None = None) -> tuple[float, float]:
        found = self.search.range_of(param, method)
        if found is None:
            raise ConfigError(f"search.ranges: no range for {param!r}; add `{param}: [low, high]`")
        return found

    def searched_params(self, method: str) -> list[str]:
        spec = get_method(method)
        return [p for p in SEARCHED_PARAMS.get(method, ()) if p in spec.params]

    def uses_weights(self, method: str) -> bool:
        return method not in UNWEIGHTED_METHODS

    def searched(self, group: str, method: str) -> list[tuple[str, str | None, str, tuple[float, float]]]:
        """What `method` searches in `group`, in suggestion order: (param, expert or None, trial param name,
        range); `weight` (one per expert) comes last for weighted methods."""
        spec = get_method(method)
        out: list[tuple[str, str | None, str, tuple[float, float]]] = []
        for param in self.searched_params(method):
            low_high = self._range(param, method)
            name = f"{self._prefix(group, param)}.{method}.{param}"
            if spec.params[param].per_model and param in self.search.per_expert:
                out += [(param, e, f"{name}.{e}", low_high) for e in self.experts]
            else:
                out.append((param, None, name, low_high))
        if self.uses_weights(method):
            low_high = self._range(WEIGHT)
            out += [(WEIGHT, e, weight_param(self._prefix(group, WEIGHT), e), low_high) for e in self.experts]
        return out

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """Every parameter a trial of this space can suggest, with its distribution: the study's search space."""
        out: dict[str, optuna.distributions.BaseDistribution] = {}
        for group in self.groups:
            out[f"{group.name}.method"] = optuna.distributions.CategoricalDistribution(self.methods)
            for method in self.methods:
                for _, _, name, (low, high) in self.searched(group.name, method):
                    out[name] = optuna.distributions.FloatDistribution(low, high)
        if self.dataflow is not None:
            out.update(self.dataflow.distributions())
        return out

    def _suggest_rule(self, trial: optuna.Trial, group: LayerGroup) -> Rule:
        method = trial.suggest_categorical(f"{group.name}.method", self.methods)
        params: dict[str, float | dict[str, float]] = {}
        weights: dict[str, float] = {}
        for param, expert, name, (low, high) in self.searched(group.name, method):
            value = trial.suggest_float(name, low, high)
            if param == WEIGHT:
                weights[expert] = value
            elif expert is not None:
                params.setdefault(param, {})[expert] = value  # type: ignore[index]
            else:
                params[param] = value
        return Rule(match=list(group.match), layers=group.layers, method=method, params=params, weights=weights)

    def recipe(self, trial: optuna.Trial) -> Recipe:
        rules = [self._suggest_rule(trial, group) for group in self.groups]
        if rules and not self.search.separate_embeddings:
            # Embeddings, final norm and head follow group 0's choice.
            rules.append(rules[0].model_copy(update={"match": ["*"], "layers": None}))
        path = self.dataflow.path(trial) if self.dataflow is not None else None
        return Recipe(
            models=self.models, base="base", rules=rules, seed=self.seed + trial.number, tokenizer=self.tokenizer, dataflow=path
        )

    # --- classic recipes as params (warm start) ---
    def uniform_params(self, method: str, overrides: dict[str, float]) -> dict[str, object]:
        """Params that make every group use `method` with the method's defaults, `overrides`, and equal
        weights 1.0; a ValueError says which value lies outside its searched range (it is never clipped:
        a clipped classic is another recipe, e.g. nearly the base model for a density range near 0)."""
        spec = get_method(method)
        params: dict[str, object] = {}
        for group in self.groups:
            params[f"{group.name}.method"] = method
            for param, _, name, (low, high) in self.searched(group.name, method):
                value = 1.0 if param == WEIGHT else float(overrides.get(param, spec.params[param].default))
                if not low <= value <= high:
                    raise ValueError(f"{param} {value:g} lies outside search.ranges.{param} [{low:g}, {high:g}]")
                params[name] = value
        return params

