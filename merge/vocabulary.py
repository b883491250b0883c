"""Merging models whose vocabularies differ (added tokens): one output tokenizer, every embedding row aligned by token.

`tokenizer: {source: base | union | MODEL}` (recipes and study configs, as mergekit's `tokenizer:`)
picks the output vocabulary: the base's, the union of every model's (the base's tokens first,
then each model's new tokens in order), or one model's. Every token-indexed tensor (input
embeddings, an untied head) of every model is then re-indexed to it, with mergekit's rules for
a token a model lacks: the row of the only model that has it, else the base's row, else the
mean of the models that have it (zero when none has it); with `pad_to_multiple_of`, rows past
the vocabulary take the mean of the real rows. The merge then runs on aligned tensors of one
shape, so every engine and method is unchanged.

The aligned tensors are written once, per model, into a cache directory keyed by the inputs
(`$MERGETUNE_CACHE`, default ~/.cache/mergetune), with a template of the output model (its
config's vocab_size, the output tokenizer, the reference's other files); the checkpoints read
those tensors from there. Workers on one node share it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from mergetune.core.errors import ModelSetError

if TYPE_CHECKING:  # torch is imported where tensors are made: study configs validate without it
    import torch
    from torch import Tensor

    from mergetune.merge.modelset import Checkpoint

log = logging.getLogger(__name__)

CACHE_ENV = "MERGETUNE_CACHE"
FORMAT_VERSION = "1"
TOKENIZER_FILES = {
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
}  # fmt: skip
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf"}
ALIGNED_FILE = "model{model}-tensor{tensor}.safetensors"  # one file per model and token-indexed tensor
TEMPLATE_DIR = "template"


class TokenizerSpec(BaseModel):
    """The output vocabulary of a merge whose models' vocabularies differ (mergekit's `tokenizer:`)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(default="union", description="base, union, or the name of the model whose tokenizer the output takes")
    pad_to_multiple_of: int | None = Field(default=None, ge=1, description="round the output vocabulary size up to a multiple")


def mismatch_message(name: str, rows: int, ref_label: str, ref_rows: int, label: str) -> str:
    """The one-line refusal of models whose token-indexed tensors differ in size (no `tokenizer:` option)."""
    return (
        f"tensor {name!r} has {rows} rows (tokens) in {label} but {ref_rows} in {ref_label}: their vocabularies differ "
        "(added tokens?); set `tokenizer: {source: union}` (or base, or a model's name) to merge them by token, as mergekit does"
    )


@dataclass(frozen=True)
class Vocabulary:
    """The aligned output vocabulary: its size, and the template directory (config + tokenizer) of the output model."""

    size: int
    template_dir: Path


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mergetune")


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # a missing or broken tokenizer is one fix for the user
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelSetError(f"{path}: cannot load its tokenizer ({reason}); merging by token needs each model's tokenizer") from None


def _own_vocab(tokenizer: Any, rows: int) -> dict[str, int]:
    """Token → id of the tokens a model has rows for (ids past its embedding are padding in the tokenizer only)."""
    return {token: i for token, i in tokenizer.get_vocab().items() if i < rows}


def _union_tokenizer(base: Any, others: list[tuple[Any, int]], base_rows: int) -> Any:
    """The base tokenizer plus every other model's tokens it lacks, as mergekit's union builds it: plain tokens
    first (model by model, by id), then added tokens (model by model, by id) with their own settings."""
    with tempfile.TemporaryDirectory() as tmp:  # a copy: adding tokens must not change the base's tokenizer
        base.save_pretrained(tmp)
        out = _load_tokenizer(Path(tmp))
    known = set(_own_vocab(base, base_rows))
    everyone = [(base, base_rows), *others]
    added: dict[str, Any] = {}  # content → its settings in the first model that adds it
    for tokenizer, rows in everyone:
        for i, info in tokenizer.added_tokens_decoder.items():
            if i < rows:
                added.setdefault(info.content, info)
    plain: dict[str, None] = {}
    for tokenizer, rows in everyone:
        for token, _ in sorted(_own_vocab(tokenizer, rows).items(), key=lambda item: item[1]):
            if token not in known and token not in added:
                plain[token] = None
    for token in plain:
        out.add_tokens(token)
    for info in added.values():
        if info.content not in known:
            out.add_tokens(info)
    return out


@dataclass
class _Plan:
    """Row sources of every model for the output vocabulary."""

    size: int  # output rows (with padding)
    tokens: int  # output vocabulary entries (rows before the padding)
    rows: dict[str, Tensor]  # label → per output row, the model's own row (-1: it lacks the token)

    def identity(self, own_rows: dict[str, int]) -> bool:
        import torch

        ids = torch.arange(self.size)
        return all(own_rows[label] == self.size and torch.equal(rows, ids) for label, rows in self.rows.items())


def _plan(out_vocab: dict[str, int], vocabs: dict[str, dict[str, int]], pad_to: int | None) -> _Plan:
    import torch

    tokens = len(out_vocab)
    if sorted(out_vocab.values()) != list(range(tokens)):
        raise ModelSetError("tokenizer.source: the output tokenizer's ids are not 0..n-1 without gaps; it cannot index an embedding")
    size = tokens if not pad_to or tokens % pad_to == 0 else (tokens // pad_to + 1) * pad_to
    rows = {}
    for label, vocab in vocabs.items():
        index = torch.full((size,), -1, dtype=torch.long)
        for token, i in out_vocab.items():
            if token in vocab:
                index[i] = vocab[token]
        rows[label] = index
    return _Plan(size, tokens, rows)


def _aligned(plan: _Plan, tensors: dict[str, Tensor], base_label: str, dtype: torch.dtype) -> Iterator[Tensor]:
    """Each model's tensor re-indexed to the output vocabulary, in model order, one at a time (mergekit's
    default embeddings for the tokens a model lacks)."""
    import torch

    labels = list(tensors)
    present = torch.stack([plan.rows[label][: plan.tokens] >= 0 for label in labels])  # models × tokens
    missing = (~present.all(dim=0)).nonzero().flatten().tolist()
    width = next(iter(tensors.values())).shape[1:]
    defaults: dict[int, Tensor] = {}
    for row in missing:
        have = [label for label, has in zip(labels, present[:, row].tolist()) if has]
        if len(have) == 1:
            source = [have[0]]
        elif not have:
            log.warning("output token %d is in no model's vocabulary; its rows are zero", row)
            defaults[row] = torch.zeros(width)
            continue
        elif base_label in have:
            source = [base_label]
        else:
            source = have
        stacked = torch.stack([tensors[label][int(plan.rows[label][row])].float() for label in source])
        defaults[row] = stacked.mean(dim=0)
    for label, tensor in tensors.items():
        index = plan.rows[label]
        aligned = torch.zeros((plan.size, *width), dtype=dtype)
        own = (index >= 0).nonzero().flatten()
        aligned[own] = tensor[index[own]].to(dtype)
        for row, value in defaults.items():
            if index[row] < 0:
                aligned[row] = value.to(dtype)
        if plan.size > plan.tokens:
            aligned[plan.tokens :] = aligned[: plan.tokens].float().mean(dim=0).to(dtype)
        yield aligned


def _digest(models: list[tuple[str, Checkpoint]], spec: TokenizerSpec, names: list[str]) -> str:
    """A key of everything the aligned tensors depend on: the spec, and every model directory's files (size, mtime)."""
    h = hashlib.sha256(f"{FORMAT_VERSION}|{spec.model_dump_json()}|{names}".encode())
    for label, ckpt in models:
        h.update(f"|{label}|{ckpt.path.resolve()}".encode())
        for name in names:
            h.update(f"|{name}:{ckpt.files[name]}:{ckpt.infos[name].offset}".encode())
        for path in sorted(ckpt.path.iterdir()):
            if path.is_file():
                stat = path.stat()
                h.update(f"|{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _write_template(template: Path, reference: Path, tokenizer: Any, size: int) -> None:
    """The output model's non-weight files: the reference's, with the output tokenizer and vocab_size."""
    template.mkdir()
    for src in sorted(reference.iterdir()):
        if src.is_file() and src.suffix not in WEIGHT_SUFFIXES and src.name not in TOKENIZER_FILES and src.name != "model.safetensors.index.json":
            shutil.copy2(src, template / src.name)
    tokenizer.save_pretrained(template)
    config_path = template / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        target = config["text_config"] if "vocab_size" not in config and isinstance(config.get("text_config"), dict) else config
        target["vocab_size"] = size
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def align_vocabularies(
    models: list[tuple[str, Checkpoint]], base_label: str, spec: TokenizerSpec, names: list[str]
) -> Vocabulary | None:
    """Re-index the token-indexed tensors `names` of every model to the output vocabulary of `spec` (None when
    nothing changes: same tokens, same rows); the checkpoints then read those tensors from the cache."""
    import torch
    from safetensors.torch import save_file

    from mergetune.merge.reader import read_stored
    from mergetune.merge.safetensors_io import read_header

    labels = [label for label, _ in models]
    ckpts = dict(models)
    if spec.source not in ("base", "union", *labels):
        raise ModelSetError(f"tokenizer.source: {spec.source!r} names no model; give base, union or one of {', '.join(labels)}")
    if not names:
        raise ModelSetError(f"tokenizer: {ckpts[base_label].path} has no token-indexed tensor (embeddings) to merge by token")
    own_rows = {label: ckpt.infos[names[0]].shape[0] for label, ckpt in models}
    tokenizers = {label: _load_tokenizer(ckpt.path) for label, ckpt in models}
    vocabs = {label: _own_vocab(tokenizers[label], own_rows[label]) for label in labels}
    if spec.source == "union":
        others = [(tokenizers[label], own_rows[label]) for label in labels if label != base_label]
        out_tokenizer = _union_tokenizer(tokenizers[base_label], others, own_rows[base_label])
    else:
        out_tokenizer = tokenizers[base_label if spec.source == "base" else spec.source]
    plan = _plan(out_tokenizer.get_vocab(), vocabs, spec.pad_to_multiple_of)
    if plan.identity(own_rows):
        return None
    directory = cache_root() / "vocab" / _digest(models, spec, names)
    if not (directory / TEMPLATE_DIR).is_dir():
        log.info("aligning %s of %d models to a %d-token vocabulary in %s", ", ".join(names), len(models), plan.size, directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".align-", dir=directory.parent))
        try:
            for t, name in enumerate(names):  # one tensor of every model in memory at a time
                tensors = {label: read_stored(ckpt, name) for label, ckpt in models}
                dtype = tensors[labels[0]].dtype
                for tensor in tensors.values():
                    dtype = torch.promote_types(dtype, tensor.dtype)
                for m, aligned in enumerate(_aligned(plan, tensors, base_label, dtype)):
                    save_file({name: aligned.contiguous()}, tmp / ALIGNED_FILE.format(model=m, tensor=t), metadata={"format": "pt"})
            _write_template(tmp / TEMPLATE_DIR, ckpts[base_label].path, out_tokenizer, plan.size)
            try:
                os.rename(tmp, directory)
            except OSError:  # another worker finished first: use its copy
                if not (directory / TEMPLATE_DIR).is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for m, (_, ckpt) in enumerate(models):
        for t, name in enumerate(names):
            path = directory / ALIGNED_FILE.format(model=m, tensor=t)
            ckpt.files[name], ckpt.infos[name] = path, read_header(path)[0][name]
    log.info("vocabulary: %d tokens (%s) from %s", plan.size, spec.source, ", ".join(f"{l} {own_rows[l]}" for l in labels))
    return Vocabulary(plan.size, directory / TEMPLATE_DIR)

