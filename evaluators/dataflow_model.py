"""A data-flow path on the HF backend: the live model's decoder runs the path's layers, shared by reference.

The worker loads the decoder layers of every source model once (`PathModel.load`); a path then
swaps the live decoder's layer list for slot modules that share those layers' parameters (no copy,
no merge). Each slot is a shallow copy of its layer whose attention carries the slot's index, so a
layer used twice writes two KV-cache entries (DynamicCache is keyed by `layer_idx`), and the model
config's layer count is the path's. `restore` puts the live model's own layers back before a merge.
Only Llama decoder layers are supported (pre-norm blocks with `self_attn.layer_idx`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from mergetune.core.errors import ConfigError
from mergetune.merge.dataflow import MERGED, DataflowPath

SUPPORTED_MODEL_TYPES = ("llama",)


def check_dataflow_architecture(model_type: str | None, where: str = "search.space") -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{where}: data-flow paths support Llama-family decoders ({', '.join(SUPPORTED_MODEL_TYPES)}), not "
            f"{model_type!r}; use `search.space: parameter`"
        )


class ScaledLayer(nn.Module):
    """Slot t of a path: layer(s_t · h_t), the whole incoming hidden state scaled (Sakana's W)."""

    def __init__(self, layer: nn.Module, scale: float) -> None:
        super().__init__()
        self.layer = layer
        self.scale = scale

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.layer(hidden_states * self.scale, *args, **kwargs)


def slot_layer(layer: nn.Module, index: int, scale: float = 1.0) -> nn.Module:
    """`layer` as slot `index`: a shallow copy sharing every parameter, its attention's `layer_idx` = index."""
    slot = copy.copy(layer)
    slot._modules = dict(layer._modules)  # copy.copy shares the dict; the attention below must not leak back
    attention = copy.copy(layer.self_attn)
    attention.layer_idx = index
    slot._modules["self_attn"] = attention
    return slot if scale == 1.0 else ScaledLayer(slot, scale)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers


class PathModel:
    """The live model plus the decoder layers of the path's sources; `apply(path)` / `restore()` swap them."""

    def __init__(self, model: nn.Module, banks: dict[str, list[nn.Module]]) -> None:
        check_dataflow_architecture(getattr(model.config, "model_type", None))
        self.model = model
        self.decoder = model.get_decoder()
        self.own = self.decoder.layers
        self.num_layers = model.config.num_hidden_layers
        # `merged` is the live model's own layers, whatever a merge wrote into them.
        self.banks = {**banks, MERGED: list(self.own)}

    @classmethod
    def load(cls, model: nn.Module, sources: dict[str, str | Path], live_source: str | None = None) -> PathModel:
        """Load each source's decoder layers (name → model dir) in the live model's dtype and device, once.
        `live_source` names the model the live one holds unmerged (dataflow without a merge): its layers are the live ones."""
        from transformers import AutoModelForCausalLM

        parameter = next(model.parameters())
        banks: dict[str, list[nn.Module]] = {}
        for name, path in sources.items():
            if name == live_source:
                banks[name] = list(decoder_layers(model))
                continue
            loaded = AutoModelForCausalLM.from_pretrained(str(path), dtype=parameter.dtype, use_safetensors=True)
            check_dataflow_architecture(getattr(loaded.config, "model_type", None), f"models: {name}")
            banks[name] = list(decoder_layers(loaded).to(parameter.device).eval())
            del loaded  # embeddings and head are the live model's
        return cls(model, banks)

    def apply(self, path: DataflowPath) -> None:
        """Make the live model run `path`; a layer index past a source's layers is a ConfigError."""
        layers = []
        for t, slot in enumerate(path.slots):
            bank = self.banks.get(slot.source)
            if bank is None:
                raise ConfigError(f"dataflow.slots.{t}: source {slot.source!r} is not loaded ({', '.join(self.banks)})")
            if slot.layer >= len(bank):
                raise ConfigError(f"dataflow.slots.{t}: {slot.source} has layers 0-{len(bank) - 1}, not {slot.layer}")
            layers.append(slot_layer(bank[slot.layer], t, slot.scale))
        self.decoder.layers = nn.ModuleList(layers)
        self.model.config.num_hidden_layers = len(layers)

    def restore(self) -> None:
        self.decoder.layers = self.own
        self.model.config.num_hidden_layers = self.num_layers
