"""The inputs of a merge: a base model and fine-tunes (plus statistics), validated from file headers.

`ModelSet` knows where every tensor lives (single-file or sharded safetensors) and checks,
before any tensor is read, that the models share tensor names and shapes (float dtypes may
differ, as in mergekit) and that each statistics file belongs to them. Which rule merges which tensor is `ruleplan.py`'s job;
holding the inputs for a search worker is `resident.py`'s.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mergetune.core.errors import ModelSetError
from mergetune.merge import moments as rank1
from mergetune.merge.architecture import ModelStructure, structure_of
from mergetune.merge.recipe import Recipe, layer_index
from mergetune.merge.safetensors_io import TensorInfo, read_header
from mergetune.merge.vocabulary import TokenizerSpec, Vocabulary, align_vocabularies, mismatch_message

log = logging.getLogger(__name__)

MOMENTS_FILE = "adam_second_moments.safetensors"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
STAT_KINDS = ("moments", "fisher", "gram")
STAT_NAMES = {"moments": "Adam second moments", "fisher": "a diagonal Fisher", "gram": "RegMean Gram matrices"}
STAT_FIXES = {
    "moments": "add `moments: {{{expert}: PATH}}` to the recipe (models.moments in a study config) "
    f"or put {MOMENTS_FILE} in the expert's directory",
    "fisher": "compute it with `mergetune stats fisher MODEL --data CALIB.jsonl --out F.safetensors` "
    "and add `fisher: {{{expert}: F.safetensors}}`",
    "gram": "compute them with `mergetune stats gram MODEL --data CALIB.jsonl --out G.safetensors` "
    "and add `gram: {{{expert}: G.safetensors}}`",
}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
DEFAULT_TIED_WEIGHTS = {"lm_head.weight": "model.embed_tokens.weight"}  # a directory without config.json
EXTRA_NAMES_SHOWN = 5


def resolve_model_dir(spec: str | Path) -> Path:
    """A local model directory, or a hub id resolved through the Hugging Face cache (weights, config, tokenizer)."""
    path = Path(spec).expanduser()
    if path.exists() or not _HUB_ID.fullmatch(str(spec)):
        return path
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]
        return Path(snapshot_download(str(spec), allow_patterns=patterns))
    except Exception as exc:  # any hub/network failure is the same fix for the user
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelSetError(f"model {str(spec)!r} is neither a local directory nor a reachable hub repo ({reason})") from None


def has_weights(path: Path) -> bool:
    """Whether a model directory holds safetensors weights (one file, or shards with an index)."""
    return (path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file()


@dataclass
class Checkpoint:
    """A model directory's weights (one safetensors file or shards with an index); headers only."""

    path: Path
    files: dict[str, Path]  # tensor name → file
    infos: dict[str, TensorInfo]  # in file order

    @classmethod
    def open(cls, spec: str | Path) -> Checkpoint:
        path = resolve_model_dir(spec)
        if not path.is_dir():
            raise ModelSetError(f"model directory {path} not found")
        index = path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelSetError(f"{index}: not a valid safetensors index ({exc}); re-save the model") from None
        elif (path / SINGLE_FILE).is_file():
            weight_map, shards = None, [SINGLE_FILE]
        else:
            raise ModelSetError(
                f"{path} has no {SINGLE_FILE} or {INDEX_FILE}; mergetune reads safetensors only "
                "(re-save with save_pretrained(..., safe_serialization=True))"
            )
        files: dict[str, Path] = {}
        ordered: list[tuple[int, int, str, TensorInfo]] = []
        for i, shard in enumerate(shards):
            infos, _ = read_header(path / shard)
            for name, info in infos.items():
                if weight_map is not None and weight_map.get(name) != shard:
                    continue
                files[name] = path / shard
                ordered.append((i, info.offset, name, info))
        if weight_map is not None:
            missing = next((name for name in weight_map if name not in files), None)
            if missing is not None:
                raise ModelSetError(f"{index} lists {missing!r} in {weight_map[missing]}, which lacks it; re-save the model")
        return cls(path, files, {name: info for _, _, name, info in sorted(ordered, key=lambda t: t[:2])})

    def structure(self) -> ModelStructure:
        """The model's layer structure for these tensor names (its module tree on the meta device)."""
        return structure_of(self.path, list(self.infos))

    def tied_weights(self) -> dict[str, str]:
        """Tensor name → the name it is tied to (`lm_head.weight` → the input embeddings) when the config ties
        them, in checkpoint names (GPT-NeoX: `embed_out.weight`)."""
        config = self.path / "config.json"
        if not config.is_file():
            return dict(DEFAULT_TIED_WEIGHTS)
        if unties_embeddings(config):
            return {}  # what `structure().tied` says, without importing the model's transformers modules (seconds)
        return self.structure().tied

    def alias(self, name: str, source: str) -> None:
        """Read tensor `name` from `source` (a tied checkpoint stores its head as its embeddings)."""
        self.files[name] = self.files[source]
        self.infos[name] = self.infos[source]


@dataclass
class StatsFile:
    """Per-tensor statistics of one expert (second moments, Fisher or Gram) keyed by tensor name.

    Rank-1 compressed second moments (see `moments.py`) are kept as stored; `rebuild_stat` expands them.
    """

    path: Path
    kind: str
    infos: dict[str, TensorInfo]
    metadata: dict[str, str]

    @classmethod
    def open(cls, path: str | Path, kind: str) -> StatsFile:
        path = Path(path).expanduser()
        infos, metadata = read_header(path)
        return cls(path, kind, infos, metadata)

    @property
    def compressed(self) -> bool:
        return rank1.is_compressed(self.metadata)

    def key(self, name: str) -> str | None:
        """The stored key of tensor `name`: itself, or the optimizer-state spellings the OTA fork accepts."""
        candidates = [name]
        if self.kind == "moments":
            candidates += [name + ".exp_avg_sq", name.replace("weight", "weight.exp_avg_sq")]
        for key in candidates:
            if key in self.infos or (self.compressed and key + rank1.ROW_SUFFIX in self.infos):
                return key
        return None

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self.infos:
            return self.infos[key].shape
        return (self.infos[key + rank1.ROW_SUFFIX].shape[0], self.infos[key + rank1.COL_SUFFIX].shape[0])

    def keys(self) -> list[str]:
        """Every statistic in the file, by the key `shape` and `stored_keys` take (rank-1 pairs count once)."""
        return [k.removesuffix(rank1.ROW_SUFFIX) for k in self.infos if not k.endswith(rank1.COL_SUFFIX)]

    def stored_keys(self, key: str) -> tuple[str, ...]:
        """The file's entries that make up statistic `key`: itself, or its rank-1 row and column sums."""
        if key in self.infos:
            return (key,)
        return (key + rank1.ROW_SUFFIX, key + rank1.COL_SUFFIX)

    def nbytes(self) -> int:
        """Bytes of the stored entries (rank-1 files: the row and column sums, not the full moments)."""
        return sum(info.nbytes for info in self.infos.values())

    def expected_shape(self, tensor_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The shape this kind of statistic has for a model tensor (None: the tensor has none, e.g. a Gram of a bias)."""
        if self.kind != "gram":
            return tensor_shape
        return (tensor_shape[1], tensor_shape[1]) if len(tensor_shape) == 2 else None


def rebuild_stat(stored: list[Tensor], out: Tensor | None = None) -> Tensor:
    """A statistic in float32 from its stored entries (see `StatsFile.stored_keys`), into `out` when given.

    One entry is the statistic itself; two are rank-1 row and column sums, expanded here and
    only here, so compressed moments stay compressed until the tensor that needs them.
    """
    if len(stored) == 1:
        return stored[0].to(torch.float32, copy=True) if out is None else out.copy_(stored[0])
    row, col = stored
    return rank1.rank1_reconstruct(row.float(), col.float(), out=out)


@dataclass
class ModelSet:
    """Base (optional for base-free methods) + named experts + per-expert statistics files; headers only."""

    base: Checkpoint | None
    experts: dict[str, Checkpoint]
    stats: dict[str, dict[str, StatsFile]]  # kind → expert → file
    vocabulary: Vocabulary | None = None  # set when the token-indexed tensors were aligned to a new vocabulary

    @property
    def reference(self) -> Checkpoint:
        """The model whose names, config and tokenizer the output takes (the base, else the first expert)."""
        return self.base if self.base is not None else next(iter(self.experts.values()))

    @property
    def template_dir(self) -> Path:
        """Where the output's config, tokenizer and other non-weight files come from."""
        return self.vocabulary.template_dir if self.vocabulary is not None else self.reference.path

    @property
    def tensor_names(self) -> list[str]:
        return list(self.reference.infos)

    @property
    def num_layers(self) -> int:
        """Transformer layers of the reference model (from its tensor names), the span of recipe gradients."""
        return 1 + max((i for i in map(layer_index, self.reference.infos) if i is not None), default=-1)

    @classmethod
    def from_dirs(
        cls,
        base: Path | str | None,
        experts: dict[str, Path | str],
        moments: dict[str, Path | str] | None = None,
        fisher: dict[str, Path | str] | None = None,
        gram: dict[str, Path | str] | None = None,
        strict: bool = False,
        tokenizer: TokenizerSpec | None = None,
    ) -> ModelSet:
        """Open and cross-check the models and statistics; raises a one-line ModelSetError on the first problem.

        As mergekit: float tensors may differ in dtype (all merge in float32; the output dtype is the
        engine's choice); tensors outside the layers that only an expert has are dropped with a
        warning naming them, or refused with `strict` (extra layers are another architecture); a
        tied model (head stored as its input embeddings) merges with untied ones by reading its
        head from its embeddings. Models whose vocabularies differ merge by token with `tokenizer`
        (vocabulary.py; `source` names base, union or an expert), and are refused without it.
        """
        if not experts:
            raise ModelSetError("no experts given; a merge needs at least one fine-tuned model")
        base_ckpt = Checkpoint.open(base) if base is not None else None
        expert_ckpts = {name: Checkpoint.open(path) for name, path in experts.items()}
        labelled = ([("base", base_ckpt)] if base_ckpt is not None else []) + [
            (f"expert '{name}'", ckpt) for name, ckpt in expert_ckpts.items()
        ]
        (ref_label, ref), others = labelled[0], labelled[1:]
        _align_tied(labelled)
        vocabulary = None
        if tokenizer is not None:
            named = ([("base", base_ckpt)] if base_ckpt is not None else []) + list(expert_ckpts.items())
            names = [n for n in ref.structure().vocabulary_names() if all(n in ckpt.infos for _, ckpt in named)]
            vocabulary = align_vocabularies(named, named[0][0], tokenizer, names)
        for label, ckpt in others:
            extra = _compare(ref_label, ref, label, ckpt)
            layered = next((name for name in extra if layer_index(name) is not None), None)
            if layered is not None:  # more layers: another architecture (mergekit refuses too)
                raise ModelSetError(
                    f"tensor {layered!r} is in {label} but not in {ref_label}; {ref_label} ({ref.path}) and "
                    f"{label} ({ckpt.path}) differ in architecture"
                )
            if extra and strict:
                raise ModelSetError(
                    f"tensor {extra[0]!r} is in {label} but not in {ref_label}; {ref_label} ({ref.path}) and "
                    f"{label} ({ckpt.path}) differ in architecture (without --strict such tensors are dropped)"
                )
            if extra:
                more = len(extra) - EXTRA_NAMES_SHOWN
                shown = ", ".join(extra[:EXTRA_NAMES_SHOWN]) + (f" and {more} more" if more > 0 else "")
                log.warning("%s has %d tensor(s) %s lacks, dropped from the merge (as mergekit does): %s", label, len(extra), ref_label, shown)
        stats: dict[str, dict[str, StatsFile]] = {kind: {} for kind in STAT_KINDS}
        for kind, mapping in (("moments", moments), ("fisher", fisher), ("gram", gram)):
            for expert, path in (mapping or {}).items():
                if expert not in expert_ckpts:
                    raise ModelSetError(f"{kind}: {expert!r} is not an expert; experts: {', '.join(expert_ckpts)}")
                stats[kind][expert] = _check_stats(StatsFile.open(path, kind), ref)
        return cls(base_ckpt, expert_ckpts, stats, vocabulary)

    @classmethod
    def from_recipe(cls, recipe: Recipe, strict: bool = False) -> ModelSet:
        """The recipe's models and statistics; an expert directory's adam_second_moments.safetensors is found by itself."""
        experts = {name: recipe.models[name] for name in recipe.experts}
        moments = dict(recipe.moments)
        for name, path in experts.items():
            found = Path(path).expanduser() / MOMENTS_FILE
            if name not in moments and found.is_file():
                moments[name] = found
        base = recipe.models[recipe.base] if recipe.base is not None else None
        tokenizer = recipe.tokenizer
        if tokenizer is not None and tokenizer.source == recipe.base:
            tokenizer = tokenizer.model_copy(update={"source": "base"})
        return cls.from_dirs(
            base, experts, moments=moments, fisher=recipe.fisher, gram=recipe.gram, strict=strict, tokenizer=tokenizer
        )


def _compare(ref_label: str, ref: Checkpoint, label: str, other: Checkpoint) -> list[str]:
    """Check `other` has every tensor of `ref` in its shape (float dtypes may differ); returns the names only `other` has."""
    where = f"{ref_label} ({ref.path}) and {label} ({other.path})"
    for name, info in ref.infos.items():
        theirs = other.infos.get(name)
        if theirs is None:
            raise ModelSetError(f"tensor {name!r} is in {ref_label} but not in {label}; {where} differ in architecture")
        if theirs.shape != info.shape:
            if theirs.shape[1:] == info.shape[1:] and _indexed_by_token(ref, name):
                raise ModelSetError(mismatch_message(name, theirs.shape[0], ref_label, info.shape[0], label))
            raise ModelSetError(f"tensor {name!r} has shape {list(info.shape)} in {ref_label} but {list(theirs.shape)} in {label}")
        if theirs.dtype != info.dtype and not (theirs.dtype.is_floating_point and info.dtype.is_floating_point):
            raise ModelSetError(
                f"tensor {name!r} is {str(info.dtype).removeprefix('torch.')} in {ref_label} but "
                f"{str(theirs.dtype).removeprefix('torch.')} in {label}; save both in one dtype"
            )
    return [name for name in other.infos if name not in ref.infos]


def _indexed_by_token(ckpt: Checkpoint, name: str) -> bool:
    """Whether tensor `name` of the checkpoint has one row per token (input embeddings, a head)."""
    try:
        return name in ckpt.structure().vocabulary_names()
    except ModelSetError:  # a model transformers cannot build: no structure to tell
        return False


def unties_embeddings(config_json: Path) -> bool:
    """Whether a config.json says outright that nothing is tied: `tie_word_embeddings: false` and no nested
    sub-config (a multimodal model's text config) that could say otherwise — `architecture.model_structure`
    ties weights only where the text config's `tie_word_embeddings` is true."""
    try:
        raw = json.loads(config_json.read_text())
    except (OSError, ValueError):
        return False
    nested = any(isinstance(v, dict) and "model_type" in v for v in raw.values()) if isinstance(raw, dict) else True
    return isinstance(raw, dict) and raw.get("tie_word_embeddings") is False and not nested


def _align_tied(labelled: list[tuple[str, Checkpoint]]) -> None:
    """Where some models store a tied tensor (an untied head) and others do not, read it from
    the others' tie source (their input embeddings), as mergekit does."""
    names = {name for _, ckpt in labelled for name in ckpt.infos}
    for label, ckpt in labelled:
        lacking = [name for name in names if name not in ckpt.infos]
        if not lacking:
            continue
        tied = ckpt.tied_weights()
        for name in lacking:
            source = tied.get(name)
            if source in ckpt.infos:
                ckpt.alias(name, source)
                log.warning(
                    "%s ties %s to %s but another model stores its own: %s is merged from this model's %s (as mergekit "
                    "does) and written to the output, which transformers then loads untied",
                    label, name, source, name, source,
                )


def _check_stats(stats: StatsFile, ref: Checkpoint) -> StatsFile:
    matched = 0
    for name, info in ref.infos.items():
        key = stats.key(name)
        if key is None:
            continue
        matched += 1
        want = stats.expected_shape(info.shape)
        if want is not None and stats.shape(key) != want:
            raise ModelSetError(
                f"{stats.path}: {stats.kind} of tensor {name!r} has shape {list(stats.shape(key))}, expected {list(want)}; "
                "it was computed for another model"
            )
    if not matched:
        raise ModelSetError(f"{stats.path}: none of its keys names a tensor of the models; it belongs to another model")
    return stats


