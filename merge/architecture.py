"""A model's layer structure, read from its own module tree (transformers, meta device, no weights).

`model_structure(config)` builds the model class its config names on the `meta` device, finds
the decoder-layer list (under `get_decoder()`, as long as the text config's layer count), and
gives every tensor a role: `attention` or `mlp` inside a layer — norms and other small modules
go with the block they feed or follow, found by one forward pass on meta tensors (Llama's
`post_attention_layernorm` feeds the MLP; Gemma 2's and OLMo 2's normalizes the attention's
output) — and `embedding`, `head`, `final_norm` or `other` outside the layers.

Everything is keyed by the checkpoint's own tensor names (what merges, recipes and vLLM use),
mapped to the live model's through transformers' own renaming (live_names.py).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mergetune.core.errors import ModelSetError
from mergetune.merge.live_names import NameMap

log = logging.getLogger(__name__)

Role = Literal["attention", "mlp", "embedding", "head", "final_norm", "other"]
LAYER_ROLES: tuple[Role, ...] = ("attention", "mlp")
_ATTENTION_WORDS = ("attention", "attn")
_MLP_WORDS = ("mlp", "feedforward", "feed_forward", "ffn", "moe", "experts")


class ArchitectureError(ModelSetError):
    """The model's structure cannot be read, or transformers transforms its tensors in a way mergetune cannot follow."""


def load_config(model: str | Path) -> Any:
    """The transformers config of a model directory (or hub id, through transformers' cache)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model))
    except (OSError, ValueError, KeyError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ArchitectureError(f"cannot read the transformers config of {str(model)!r} ({reason})") from None


def text_num_layers(config: Any) -> int:
    """Decoder layers of a config: its text config's (a multimodal wrapper nests it), by any of the usual keys."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            return value
    raise ArchitectureError(f"the {type(config).__name__} config has no num_hidden_layers; cannot tell its layers apart")


def meta_model(config: Any) -> torch.nn.Module:
    """The model class `config.architectures` names (else the causal-LM auto class), built on the meta device."""
    import transformers

    cls = next(
        (getattr(transformers, name) for name in (getattr(config, "architectures", None) or []) if hasattr(transformers, name)),
        None,
    )
    try:
        with torch.device("meta"):
            if cls is not None and hasattr(cls, "_from_config"):
                return cls._from_config(config)
            return transformers.AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # any failure to build means the same to the user: transformers lacks the class
        raise ArchitectureError(
            f"transformers {transformers.__version__} cannot build {', '.join(config.architectures or [type(config).__name__])} "
            f"({type(exc).__name__}: {exc}); upgrade transformers or use a supported architecture"
        ) from None


@dataclass(frozen=True)
class ModelStructure:
    """Where each tensor of a checkpoint sits in its model (keys: checkpoint names)."""

    architecture: str
    num_layers: int
    layer_path: str  # the decoder-layer list in the live model, e.g. "model.layers" or "gpt_neox.layers"
    roles: dict[str, Role]  # every checkpoint tensor (dropped ones inside the layers: by the module they sit in)
    layer_of: dict[str, int]  # the layer tensors' decoder layer
    tied: dict[str, str]  # a tensor → the one it is tied to, when the config ties them (the head → the embeddings)
    dropped: tuple[str, ...]  # checkpoint tensors transformers drops on load
    names: NameMap = field(repr=False, compare=False)
    traced: bool = True  # False: norms were placed by their names (the meta forward pass failed)

    def _split(self, name: str) -> tuple[str, str]:
        """A layer tensor's checkpoint name around its layer index: (`model.layers`, `self_attn.q_proj.weight`)."""
        layer = self.layer_of[name]
        live = self.names.to_live(name)
        inner = live[len(f"{self.layer_path}.{layer}.") :]
        if name.endswith(f".{layer}.{inner}"):  # renamed (if at all) only before the layer index
            return name[: len(name) - len(inner) - len(f".{layer}.")], inner
        cut = name.rfind(f".{layer}.")
        return name[:cut], name[cut + len(f".{layer}.") :]

    def decoder_patterns(self) -> tuple[str, ...]:
        """fnmatch patterns on checkpoint names that select exactly the layer tensors (`model.layers.*`)."""
        return tuple(dict.fromkeys(self._split(name)[0] + ".*" for name in self.layer_of))

    def layer_patterns(self, role: Role) -> tuple[str, ...]:
        """fnmatch patterns on checkpoint names, any layer, that select exactly the layer tensors of `role`:
        one per module of a layer (`model.layers.*.self_attn.*`), or one per tensor the layer module owns."""
        patterns: dict[str, None] = {}
        for name in self.layer_of:
            if self.roles[name] == role:
                prefix, inner = self._split(name)
                child, _, rest = inner.partition(".")
                patterns[f"{prefix}.*.{child}" + (".*" if rest else "")] = None
        return tuple(patterns)

    def vocabulary_names(self) -> list[str]:
        """Checkpoint tensors indexed by token: the input embeddings and a head of its own."""
        return [name for name, role in self.roles.items() if role in ("embedding", "head")]


def _modules_under(model: torch.nn.Module, path: str) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if name == path or name.startswith(path + ".")}


def _decoder_layers(model: torch.nn.Module, num_layers: int) -> str:
    """Path of the decoder-layer ModuleList: under `get_decoder()`, `num_layers` long (the largest such list)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    root = next((name for name, module in model.named_modules() if module is decoder), "")
    lists = [
        (sum(p.numel() for p in module.parameters()), name)
        for name, module in (_modules_under(model, root) if root else dict(model.named_modules())).items()
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers
    ]
    if not lists:
        raise ArchitectureError(
            f"{type(model).__name__}: no list of {num_layers} decoder layers in its module tree; cannot group its layers"
        )
    return max(lists)[1]


def _kind(attr: str, module: torch.nn.Module) -> str:
    """What a direct child of a decoder layer is: attention, mlp, norm or other (by class, then attribute name)."""
    cls = type(module).__name__.lower()
    if isinstance(module, torch.nn.LayerNorm) or "norm" in cls:
        return "norm"
    for kind, words in (("attention", _ATTENTION_WORDS), ("mlp", _MLP_WORDS)):
        if any(w in cls for w in words):
            return kind
    for kind, words in (("attention", _ATTENTION_WORDS), ("mlp", _MLP_WORDS)):
        if any(w in attr.lower() for w in words):
            return kind
    return "norm" if "norm" in attr.lower() else "other"


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):  # kwargs, and transformers' ModelOutput
        return [t for v in value.values() for t in _tensors(v)]
    return []


@dataclass
class _Call:
    order: int
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]


def _trace(model: torch.nn.Module, paths: list[str]) -> dict[str, _Call] | None:
    """The first call of each module in `paths` during one forward pass on meta tensors (None if it fails).

    The tensors are kept, so their identities (`is`) show which module fed which.
    """
    modules = dict(model.named_modules())
    calls: dict[str, _Call] = {}

    def hook(path: str):
        def record(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if path not in calls:
                calls[path] = _Call(len(calls), _tensors(args) + _tensors(kwargs), _tensors(output))

        return record

    handles = [modules[p].register_forward_hook(hook(p), with_kwargs=True) for p in paths]
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 4), dtype=torch.long, device="meta"))
    except Exception as exc:  # any model that cannot run on meta tensors falls back to names
        log.warning("%s: a forward pass on the meta device failed (%s: %s); norms are grouped by their names",
                    type(model).__name__, type(exc).__name__, exc)
        return None
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _shares(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return any(x is y for x in a for y in b)


def _place(child: str, blocks: dict[str, str], calls: dict[str, _Call] | None) -> str:
    """The block (child name of attention/mlp) a norm or other small module belongs to: the block its output
    feeds (a pre-norm), else the block whose output it takes (a post-norm), else the next block called."""
    if calls is None or child not in calls:
        name = child.rpartition(".")[2].lower()
        mlp = next((b for b, kind in blocks.items() if kind == "mlp"), None)
        attention = next((b for b, kind in blocks.items() if kind == "attention"), None)
        if mlp is not None and (any(w in name for w in _MLP_WORDS) or name.startswith("post_attention")):
            return mlp  # Llama's convention: post_attention_layernorm is the MLP's pre-norm
        return attention or next(iter(blocks))
    mine = calls[child]
    ordered = sorted((calls[b].order, b) for b in blocks if b in calls)
    for _, block in ordered:
        if _shares(mine.outputs, calls[block].inputs):
            return block
    for _, block in reversed(ordered):
        if _shares(mine.inputs, calls[block].outputs):
            return block
    later = [b for order, b in ordered if order > mine.order]
    return later[0] if later else ordered[-1][1] if ordered else next(iter(blocks))


def _live_roles(model: torch.nn.Module, layer_path: str, calls: dict[str, _Call] | None) -> dict[str, Role]:
    """Role of every tensor of the live model (its `state_dict` names)."""
    layers = model.get_submodule(layer_path)
    role_of_module: dict[str, Role] = {}
    for i, layer in enumerate(layers):
        kinds = {f"{layer_path}.{i}.{attr}": _kind(attr, module) for attr, module in layer.named_children()}
        blocks = {path: kind for path, kind in kinds.items() if kind in LAYER_ROLES}
        if not blocks:
            raise ArchitectureError(f"{type(model).__name__}: layer {i} has no attention or MLP module; cannot group its tensors")
        for path, kind in kinds.items():
            role_of_module[path] = kind if kind in LAYER_ROLES else blocks[_place(path, blocks, calls)]  # type: ignore[assignment]
    paths = {id(module): name for name, module in model.named_modules()}
    embedding = paths.get(id(model.get_input_embeddings())) if hasattr(model, "get_input_embeddings") else None
    head = paths.get(id(model.get_output_embeddings())) if hasattr(model, "get_output_embeddings") else None
    decoder = paths.get(id(model.get_decoder())) if hasattr(model, "get_decoder") else ""
    roles: dict[str, Role] = {}
    for name in model.state_dict():
        owner = name.rpartition(".")[0]
        if name.startswith(layer_path + "."):
            module = next((p for p in role_of_module if owner == p or owner.startswith(p + ".")), None)
            roles[name] = role_of_module[module] if module is not None else "attention"  # the layer's own tensors
        elif owner == embedding:
            roles[name] = "embedding"
        elif owner == head:
            roles[name] = "head"
        elif owner.rpartition(".")[0] == (decoder or "") and _kind(owner.rpartition(".")[2], model.get_submodule(owner)) == "norm":
            roles[name] = "final_norm"
        else:
            roles[name] = "other"
    return roles


def _ancestors(name: str, layer_path: str) -> list[str]:
    """The module paths above tensor `name` inside its decoder layer, innermost first."""
    parts = name.split(".")
    if not name.startswith(layer_path + "."):
        return []
    depth = len(layer_path.split(".")) + 1  # the layer itself (`model.layers.3`) is not among them
    return [".".join(parts[:i]) for i in range(len(parts) - 1, depth, -1)]


def model_structure(config: Any, checkpoint_names: list[str] | None = None) -> ModelStructure:
    """The structure of the model `config` describes (built on the meta device; nothing is allocated),
    keyed by `checkpoint_names` (default: the names `save_pretrained` would write).

    Raises ArchitectureError for a checkpoint tensor the model has no place for.
    """
    model = meta_model(config)
    num_layers = text_num_layers(config)
    layer_path = _decoder_layers(model, num_layers)
    layers = model.get_submodule(layer_path)
    calls = _trace(model, [f"{layer_path}.{i}.{attr}" for i, layer in enumerate(layers) for attr, _ in layer.named_children()])
    live_roles = _live_roles(model, layer_path, calls)
    names = NameMap(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    declared = getattr(model, "_tied_weights_keys", None)
    live_tied = dict(declared) if isinstance(declared, dict) and getattr(text, "tie_word_embeddings", False) else {}
    if checkpoint_names is None:
        checkpoint_names = [names.to_checkpoint(name) for name in live_roles if name not in live_tied]
    roles: dict[str, Role] = {}
    layer_of: dict[str, int] = {}
    dropped: list[str] = []
    checkpoint_of: dict[str, str] = {}
    module_roles = {  # every module inside the layers → the role of the tensors under it
        owner: role
        for name, role in live_roles.items()
        if name.startswith(layer_path + ".")
        for owner in _ancestors(name, layer_path)
    }
    for name in checkpoint_names:
        live = names.to_live(name)
        if names.dropped(name):
            dropped.append(name)
            owner = next((a for a in _ancestors(live, layer_path) if a in module_roles), None)
            if owner is not None:
                roles[name] = module_roles[owner]
            elif live.startswith(layer_path + "."):
                roles[name] = "attention"  # a layer's own tensor, as in `_live_roles`
            else:
                roles[name] = "other"
        elif live not in live_roles:
            raise ArchitectureError(
                f"checkpoint tensor {name!r} has no place in {type(model).__name__} as transformers loads it "
                f"(it would load as {live!r}); the checkpoint and its config.json describe different models"
            )
        else:
            checkpoint_of[live] = name
            roles[name] = live_roles[live]
        if live.startswith(layer_path + "."):
            layer_of[name] = int(live[len(layer_path) + 1 :].split(".", 1)[0])
    tied = {checkpoint_of.get(a, names.to_checkpoint(a)): checkpoint_of.get(b, names.to_checkpoint(b)) for a, b in live_tied.items()}
    return ModelStructure(
        type(model).__name__, num_layers, layer_path, roles, layer_of, tied, tuple(dropped), names, calls is not None
    )


@functools.lru_cache(maxsize=16)
def _cached_structure(model: str, config_text: str, checkpoint_names: tuple[str, ...] | None) -> ModelStructure:
    return model_structure(load_config(model), list(checkpoint_names) if checkpoint_names is not None else None)


def structure_of(model: str | Path, checkpoint_names: list[str] | None = None) -> ModelStructure:
    """`model_structure` of a model directory (or hub id) for its checkpoint's names; cached per config and names."""
    path = Path(model) / "config.json"
    text = path.read_text() if path.is_file() else ""
    return _cached_structure(str(model), text, tuple(checkpoint_names) if checkpoint_names is not None else None)
