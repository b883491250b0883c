"""The data-flow space: an Optuna trial → a DataflowPath of T slots (define-by-run, stable names).

    dfs.s3.skip     categorical [false, true] (with `dataflow.skips`; slot 0 is always kept, so no path is empty)
    dfs.s3.source   categorical: base, each expert, `merged` (space `both`); not suggested for a skipped slot
    dfs.s3.layer    int in [0, L-1]: the source's decoder layer
    dfs.s3.scale    float in `dataflow.scale` (not suggested when the range is one value)

T is `search.dataflow.slots` (default L, the base's layer count; at most 2L). Warm starts are paths
the space can express exactly: each model's own layers in order (scale 1, the slots past L skipped).
"""

from __future__ import annotations

import optuna

from mergetune.core.errors import ConfigError
from mergetune.merge.dataflow import MERGED, DataflowPath, DataflowSlot
from mergetune.search.config import StudyConfig

# What evaluators/dataflow_model.py can assemble (pre-norm blocks whose attention keys the KV cache by layer_idx).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
PREFIX = "dfs"


def slot_param(slot: int, what: str) -> str:
    return f"{PREFIX}.s{slot}.{what}"


class DataflowSpace:
    """Suggests a path; turns a model's identity path into trial params (warm start)."""

    def __init__(self, config: StudyConfig, num_layers: int, architecture: str) -> None:
        assert config.models is not None
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"search.space: {config.search.space}: data-flow paths support Llama decoders ({', '.join(SUPPORTED_ARCHITECTURES)}), "
                f"not {architecture}; use `search.space: parameter`"
            )
        dataflow = config.search.dataflow
        self.num_layers = num_layers
        self.slots = dataflow.slots if dataflow.slots is not None else num_layers
        if self.slots > 2 * num_layers:
            raise ConfigError(
                f"search.dataflow.slots: {self.slots} is more than twice the base's {num_layers} layers; give at most {2 * num_layers}"
            )
        self.scale = dataflow.scale
        self.skips = dataflow.skips
        models = ["base", *config.models.experts]
        self.sources = [MERGED, *models] if config.search.space == "both" else models

    @property
    def scaled(self) -> bool:
        return self.scale[0] < self.scale[1]

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        out: dict[str, optuna.distributions.BaseDistribution] = {}
        for t in range(self.slots):
            if self.skippable(t):
                out[slot_param(t, "skip")] = optuna.distributions.CategoricalDistribution([False, True])
            out[slot_param(t, "source")] = optuna.distributions.CategoricalDistribution(self.sources)
            out[slot_param(t, "layer")] = optuna.distributions.IntDistribution(0, self.num_layers - 1)
            if self.scaled:
                out[slot_param(t, "scale")] = optuna.distributions.FloatDistribution(*self.scale)
        return out

    def skippable(self, slot: int) -> bool:
        return self.skips and slot > 0

    def path(self, trial: optuna.Trial) -> DataflowPath:
        slots = []
        for t in range(self.slots):
            if self.skippable(t) and trial.suggest_categorical(slot_param(t, "skip"), [False, True]):
                continue
            source = trial.suggest_categorical(slot_param(t, "source"), self.sources)
            layer = trial.suggest_int(slot_param(t, "layer"), 0, self.num_layers - 1)
            scale = trial.suggest_float(slot_param(t, "scale"), *self.scale) if self.scaled else self.scale[0]
            slots.append(DataflowSlot(source=source, layer=layer, scale=scale))
        return DataflowPath(slots=slots)

    def identity_params(self, source: str) -> dict[str, object]:
        """Params whose path is `source`'s own layers in order at scale 1; a ValueError says why the space
        cannot express it (too few slots, no skips for the extra ones, 1 outside the scale range)."""
        if self.slots < self.num_layers:
            raise ValueError(f"{self.slots} slots cannot hold the {self.num_layers} layers of one model")
        if self.slots > self.num_layers and not self.skips:
            raise ValueError(f"{self.slots} slots exceed the {self.num_layers} layers and skips are off")
        if self.scaled and not self.scale[0] <= 1.0 <= self.scale[1]:
            raise ValueError(f"scale 1 lies outside search.dataflow.scale [{self.scale[0]:g}, {self.scale[1]:g}]")
        if not self.scaled and self.scale[0] != 1.0:
            raise ValueError(f"every scale is {self.scale[0]:g}, not 1")
        params: dict[str, object] = {}
        for t in range(self.slots):
            if self.skippable(t):
                params[slot_param(t, "skip")] = t >= self.num_layers
            if t >= self.num_layers:
                continue
            params[slot_param(t, "source")] = source
            params[slot_param(t, "layer")] = t
            if self.scaled:
                params[slot_param(t, "scale")] = 1.0
        return params
