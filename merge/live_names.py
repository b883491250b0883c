"""Checkpoint tensor names ↔ the names of a loaded transformers model, as transformers itself maps them.

transformers 5 renames some checkpoint tensors when it loads a model (its conversion mapping:
GPT-NeoX `embed_out.` → `lm_head.`, multimodal `language_model.` prefixes, old LayerNorm
`gamma`/`beta`) and reverses that when it saves. Merges run on checkpoint names (what every
checkpoint on disk and vLLM's loaders use); a sink writing into a live model translates here.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from mergetune.core.errors import ModelSetError


class LiveNameError(ModelSetError):
    """transformers loads a checkpoint tensor in a way a tensor-by-tensor merge cannot follow."""


class NameMap:
    """One model's mapping: `to_live` as `from_pretrained` renames, `to_checkpoint` as `save_pretrained` does.

    A conversion that fuses or splits tensors (Mixtral's and Qwen-MoE's experts) is refused:
    a merge writes one checkpoint tensor at a time.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._live = dict.fromkeys(model.state_dict(), True)
        self._prefix = getattr(model, "base_model_prefix", None)
        self._ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
        # Buffers transformers no longer saves (e.g. `rotary_emb.inv_freq`): old checkpoints still carry them.
        self._stale = {
            f"{path.rpartition('.')[2]}.{buffer}".lstrip(".")
            for path, module in model.named_modules()
            for buffer in getattr(module, "_non_persistent_buffers_set", ())
        }
        self._load: list[Any] = []
        self._save: list[Any] = []
        self._converters: list[Any] = []
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming
        except ImportError:  # transformers 4 loads checkpoints under their own names
            return
        if getattr(model, "config", None) is None:
            return
        load = get_model_conversion_mapping(model)
        self._load = [c for c in load if isinstance(c, WeightRenaming)]
        self._converters = [c for c in load if isinstance(c, WeightConverter)]
        # As save_pretrained reverts them: the non-legacy transforms, last first, each reversed.
        save = [c.reverse_transform() for c in get_model_conversion_mapping(model, add_legacy=False)[::-1]]
        self._save = [c for c in save if isinstance(c, WeightRenaming)]

    @property
    def live_names(self) -> list[str]:
        return list(self._live)

    def to_live(self, name: str) -> str:
        """The model's name for checkpoint tensor `name` (renamed as transformers renames it on load)."""
        live = name
        if self._load or self._converters:
            from transformers.core_model_loading import rename_source_key

            live, converter = rename_source_key(name, self._load, self._converters, self._prefix, self._live)
            if converter is not None:
                raise LiveNameError(
                    f"transformers fuses checkpoint tensor {name!r} with others when it loads this model ({converter}); "
                    "mergetune merges tensor by tensor and cannot follow that (mixture-of-experts layouts are not supported yet)"
                )
        return live

    def dropped(self, name: str) -> bool:
        """Whether transformers drops checkpoint tensor `name` on load: the model class lists it among the keys to
        ignore (GPT-NeoX's `attention.bias`), or it is a buffer the model no longer saves (`rotary_emb.inv_freq`)."""
        return self.to_live(name) not in self._live and (
            any(p.search(name) for p in self._ignored) or any(name.endswith("." + leaf) for leaf in self._stale)
        )

    def to_checkpoint(self, live: str) -> str:
        """The checkpoint name `save_pretrained` writes for the model's tensor `live`."""
        if not self._save:
            return live
        from transformers.core_model_loading import apply_renamings

        return apply_renamings(live, self._save)
