"""The inputs of a merge: a base model and fine-tunes (plus statistics), validated from file headers.

`ModelSet` knows where every tensor lives (single-file or sharded safetensors) and checks,
before any tensor is read, that the models share tensor names, shapes and dtypes and that each
recipe rule gets the statistics its method needs. `ResidentModelSet` keeps the base, the task
vectors τ_k = θ_k − θ₀ and the statistics on a device, so a search trial re-merges into a live
model without touching the disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mergetune.core.errors import ModelSetError, NonFiniteMergeError
from mergetune.merge import moments as rank1
from mergetune.merge.methods import MethodSpec, TensorInputs, get_method, tensor_generator
from mergetune.merge.recipe import Recipe, Rule, layer_index, layer_position
from mergetune.merge.sinks import Sink
from mergetune.merge.sparsify import KEEP_ALL, KEEP_NONE, GlobalCut, global_cut

log = logging.getLogger(__name__)

MOMENTS_FILE = "adam_second_moments.safetensors"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
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
DEFAULT_TIED_WEIGHTS = {"lm_head.weight": "model.embed_tokens.weight"}  # when the model class is unknown
EXTRA_NAMES_SHOWN = 5


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # byte offset of the data in its file


def _corrupt(path: Path, reason: str) -> ModelSetError:
    return ModelSetError(f"{path}: not a valid safetensors file ({reason}); re-save or re-download it")


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos and metadata of a safetensors file, checked against the file size (reads the header only)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, "shorter than its 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise _corrupt(path, "truncated header")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ModelSetError(f"{path} not found") from None
    except (OSError, ValueError) as exc:  # ValueError covers JSON and UTF-8 decoding
        raise _corrupt(path, str(exc)) from None
    data_bytes = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    try:
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = DTYPES.get(entry["dtype"])
            if dtype is None:
                raise _corrupt(path, f"unknown dtype {entry['dtype']!r} of {name}")
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
            if end - start != math.prod(shape) * dtype.itemsize:
                raise _corrupt(path, f"tensor {name} has {end - start} bytes for shape {list(shape)}")
            if end > data_bytes:
                raise _corrupt(path, f"truncated: tensor {name} ends at byte {end} of {data_bytes}")
            infos[name] = TensorInfo(dtype, shape, 8 + n + start)
        metadata = dict(header.get("__metadata__") or {})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _corrupt(path, f"malformed header: {exc}") from None
    return infos, metadata


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

    def tied_weights(self) -> dict[str, str]:
        """Tensor name → the name it is tied to (`lm_head.weight` → the input embeddings), from the
        model class transformers names in config.json (`_tied_weights_keys`)."""
        try:
            config = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError):
            return dict(DEFAULT_TIED_WEIGHTS)
        import transformers

        for architecture in config.get("architectures") or []:
            keys = getattr(getattr(transformers, architecture, None), "_tied_weights_keys", None)
            if isinstance(keys, dict):
                return dict(keys)
        return dict(DEFAULT_TIED_WEIGHTS)

    def alias(self, name: str, source: str) -> None:
        """Read tensor `name` from `source` (a tied checkpoint stores its head as its embeddings)."""
        self.files[name] = self.files[source]
        self.infos[name] = self.infos[source]


@dataclass
class StatsFile:
    """Per-tensor statistics of one expert (second moments, Fisher or Gram) keyed by tensor name.

    Rank-1 compressed second moments (see `moments.py`) read back as full tensors transparently.
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

    def read(self, handle: Callable[[Path], object], key: str) -> Tensor:
        f = handle(self.path)
        if key in self.infos:
            return f.get_tensor(key).to(torch.float32, copy=True)
        return rank1.rank1_reconstruct(f.get_tensor(key + rank1.ROW_SUFFIX).float(), f.get_tensor(key + rank1.COL_SUFFIX).float())

    def expected_shape(self, tensor_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The shape this kind of statistic has for a model tensor (None: the tensor has none, e.g. a Gram of a bias)."""
        if self.kind != "gram":
            return tensor_shape
        return (tensor_shape[1], tensor_shape[1]) if len(tensor_shape) == 2 else None


@dataclass
class RulePlan:
    """A recipe rule resolved once per merge: method, experts, weights, bound params, statistics to load."""

    index: int
    rule: Rule
    spec: MethodSpec
    experts: list[str]
    weights: list[float]
    kwargs: dict[str, object]
    stats: tuple[str, ...]


class GlobalThresholds:
    """Per-expert global top-k cuts over all of the expert's tensors (`sparsify.GlobalCut`), cached.

    The cut for keep fraction ρ keeps exactly k = ⌊ρN⌋ entries: its threshold is the k-th largest
    score — exact `kthvalue` when the scores fit in `exact_limit` elements, else a histogram of
    log-scores and an exact pass over the bracketing bin — and one more pass counts the entries
    equal to it per tensor, which are kept in tensor order. Kinds: "magnitude" (|τ|), "saliency" (v·τ²).
    """

    BINS = 4096

    def __init__(self, scores: Callable[[str, str], Iterable[tuple[str, Tensor]]], exact_limit: int = 1 << 26) -> None:
        self._scores = scores
        self._exact_limit = exact_limit
        self._cache: dict[tuple[str, str, float], GlobalCut] = {}

    def __call__(self, kind: str, expert: str, keep: float) -> GlobalCut:
        key = (kind, expert, float(keep))
        if key not in self._cache:
            started = time.perf_counter()
            self._cache[key] = self._compute(kind, expert, float(keep))
            log.debug("global %s cut of %s at %.3f: %.3g (%.2fs)", kind, expert, keep, self._cache[key].threshold, time.perf_counter() - started)
        return self._cache[key]

    def _compute(self, kind: str, expert: str, keep: float) -> GlobalCut:
        # One pass counts the scores, keeps them if they fit, and brackets the positive ones.
        chunks: list[tuple[str, Tensor]] | None = []
        total, positives, lo, hi = 0, 0, math.inf, -math.inf
        for name, s in self._scores(kind, expert):
            flat = s.reshape(-1)
            total += flat.numel()
            if total > self._exact_limit:
                chunks = None  # too many to hold: histogram instead
            if chunks is not None:
                chunks.append((name, flat))
            pos = flat[flat > 0]
            if pos.numel():
                positives += pos.numel()
                lo, hi = min(lo, float(pos.min())), max(hi, float(pos.max()))
        k = int(keep * total)
        if k <= 0:
            return KEEP_NONE
        if k >= total:
            return KEEP_ALL
        if chunks is not None:
            threshold = float(torch.cat([flat for _, flat in chunks]).kthvalue(total - k + 1).values)
            return global_cut(k, threshold, chunks)
        if k > positives:
            threshold = 0.0  # every positive score is kept, and the first zeros with them
        else:
            threshold = self._histogram_kth_largest(kind, expert, k, lo, hi)
        return global_cut(k, threshold, self._scores(kind, expert))

    def _histogram_kth_largest(self, kind: str, expert: str, k: int, lo: float, hi: float) -> float:
        log_lo, width = math.log(lo), max(math.log(hi) - math.log(lo), 1e-30) / self.BINS

        def bins(pos: Tensor) -> Tensor:
            return ((pos.log() - log_lo) / width).long().clamp_(0, self.BINS - 1)

        counts = torch.zeros(self.BINS, dtype=torch.long)
        for _, s in self._scores(kind, expert):
            pos = s[s > 0]
            counts += torch.bincount(bins(pos), minlength=self.BINS)
        from_top = counts.flip(0).cumsum(0)
        target = int(self.BINS - 1 - int((from_top >= k).nonzero()[0]))
        above = int(counts[target + 1 :].sum())
        in_bin = []
        for _, s in self._scores(kind, expert):
            pos = s[s > 0]
            in_bin.append(pos[bins(pos) == target])
        bracket = torch.cat(in_bin)
        return float(bracket.kthvalue(bracket.numel() - (k - above) + 1).values)


def _rule_plan(i: int, rule: Rule, recipe: Recipe, available: dict[str, set[str]]) -> RulePlan:
    spec = get_method(rule.method)
    experts = rule.experts(recipe.experts)
    where = f"rules.{i}"
    for kind in sorted(spec.needs):
        missing = next((e for e in experts if e not in available[kind]), None)
        if missing is not None:
            raise ModelSetError(
                f"{where}: method '{rule.method}' needs {STAT_NAMES[kind]} for expert '{missing}'; "
                + STAT_FIXES[kind].format(expert=missing)
            )
    optional = tuple(kind for kind in sorted(spec.any_of) if all(e in available[kind] for e in experts))
    if spec.any_of and not optional:
        wanted = " or ".join(STAT_NAMES[kind] for kind in sorted(spec.any_of))
        first = sorted(spec.any_of)[0]
        raise ModelSetError(
            f"{where}: method '{rule.method}' needs {wanted} for every expert it merges; "
            + STAT_FIXES[first].format(expert=experts[0])
        )
    kwargs = spec.bind(rule.method_kwargs(recipe.experts), len(experts))
    return RulePlan(i, rule, spec, experts, rule.weight_list(recipe.experts), kwargs, (*sorted(spec.needs), *optional))


@dataclass
class ModelSet:
    """Base (optional for base-free methods) + named experts + per-expert statistics files; headers only."""

    base: Checkpoint | None
    experts: dict[str, Checkpoint]
    stats: dict[str, dict[str, StatsFile]]  # kind → expert → file

    @property
    def reference(self) -> Checkpoint:
        """The model whose names, config and tokenizer the output takes (the base, else the first expert)."""
        return self.base if self.base is not None else next(iter(self.experts.values()))

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
    ) -> ModelSet:
        """Open and cross-check the models and statistics; raises a one-line ModelSetError on the first problem.

        As mergekit: float tensors may differ in dtype (all merge in float32; the output dtype is the
        engine's choice); tensors outside the layers that only an expert has are dropped with a
        warning naming them, or refused with `strict` (extra layers are another architecture); a
        tied model (head stored as its input embeddings) merges with untied ones by reading its
        head from its embeddings.
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
        return cls(base_ckpt, expert_ckpts, stats)

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
        return cls.from_dirs(base, experts, moments=moments, fisher=recipe.fisher, gram=recipe.gram, strict=strict)

    def plan(self, recipe: Recipe) -> list[tuple[str, RulePlan | None]]:
        """Every tensor with the rule that merges it (None: keep the base's), after checking the recipe fits.

        Raises ModelSetError naming the rule, expert and fix when a method lacks its statistics.
        """
        unknown = next((e for e in recipe.experts if e not in self.experts), None)
        if unknown is not None:
            raise ModelSetError(f"recipe expert {unknown!r} is not in the model set; experts: {', '.join(self.experts)}")
        if recipe.base is not None and self.base is None:
            raise ModelSetError("the recipe has a base model but the model set has none")
        available = {kind: set(files) for kind, files in self.stats.items()}
        plans = [_rule_plan(i, rule.at(0.0), recipe, available) for i, rule in enumerate(recipe.rules)]
        at_position: dict[tuple[int, float], RulePlan] = {}  # gradient rules: one plan per layer position
        num_layers = self.num_layers
        schedule = []
        for name, info in self.reference.infos.items():
            plan = next((p for p in plans if p.rule.matches(name)), None)
            if plan is not None and recipe.rules[plan.index].has_gradients:
                x = layer_position(name, num_layers)
                if (plan.index, x) not in at_position:
                    at_position[plan.index, x] = _rule_plan(plan.index, recipe.rules[plan.index].at(x), recipe, available)
                plan = at_position[plan.index, x]
            if plan is not None:
                for kind in plan.stats:
                    if kind == "gram":
                        continue  # tensors without a Gram (not a linear weight) are averaged by RegMean
                    missing = next((e for e in plan.experts if self.stats[kind][e].key(name) is None), None)
                    if missing is not None:
                        raise ModelSetError(
                            f"{self.stats[kind][missing].path} has no entry for tensor {name!r}, which rules.{plan.index} "
                            f"merges with '{plan.rule.method}'; recompute the statistics for this model"
                        )
            schedule.append((name, plan))
        return schedule

    @contextlib.contextmanager
    def reader(self, device: str = "cpu") -> Iterator[ModelSetReader]:
        with contextlib.ExitStack() as stack:
            yield ModelSetReader(self, device, stack)


def _compare(ref_label: str, ref: Checkpoint, label: str, other: Checkpoint) -> list[str]:
    """Check `other` has every tensor of `ref` in its shape (float dtypes may differ); returns the names only `other` has."""
    where = f"{ref_label} ({ref.path}) and {label} ({other.path})"
    for name, info in ref.infos.items():
        theirs = other.infos.get(name)
        if theirs is None:
            raise ModelSetError(f"tensor {name!r} is in {ref_label} but not in {label}; {where} differ in architecture")
        if theirs.shape != info.shape:
            raise ModelSetError(f"tensor {name!r} has shape {list(info.shape)} in {ref_label} but {list(theirs.shape)} in {label}")
        if theirs.dtype != info.dtype and not (theirs.dtype.is_floating_point and info.dtype.is_floating_point):
            raise ModelSetError(
                f"tensor {name!r} is {str(info.dtype).removeprefix('torch.')} in {ref_label} but "
                f"{str(theirs.dtype).removeprefix('torch.')} in {label}; save both in one dtype"
            )
    return [name for name in other.infos if name not in ref.infos]


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


class ModelSetReader:
    """Lazy tensor access over a ModelSet's files, float32 on `device`.

    Weights are read with positional reads at the offsets the (validated) headers give, into
    fresh tensors: unlike safetensors' memory map, touched pages of the inputs do not pile up
    in the process's RSS, and no tensor aliases a file mapping another read shares.
    Statistics files are read through `safe_open`.
    """

    def __init__(self, modelset: ModelSet, device: str, stack: contextlib.ExitStack) -> None:
        self.modelset = modelset
        self.device = torch.device(device)
        self._stack = stack
        self._handles: dict[Path, object] = {}
        self._fds: dict[Path, int] = {}

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
            self._stack.callback(os.close, self._fds[path])
        return self._fds[path]

    def _handle(self, path: Path) -> object:
        from safetensors import safe_open

        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        return self._handles[path]

    def raw(self, ckpt: Checkpoint, name: str) -> Tensor:
        """The stored tensor, in its own dtype, on the CPU (a fresh tensor the caller owns)."""
        info, path = ckpt.infos[name], ckpt.files[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        try:
            while done < len(buffer):  # a read may return less than asked for
                count = os.preadv(self._fd(path), [buffer[done:]], info.offset + done)
                if count == 0:
                    raise EOFError("the file ends early")
                done += count
        except (OSError, EOFError) as exc:
            raise ModelSetError(f"{path}: cannot read tensor {name!r} ({exc}); re-save the model") from None
        return out

    def tensor(self, ckpt: Checkpoint, name: str) -> Tensor:
        return self.raw(ckpt, name).to(self.device, torch.float32)

    def stat(self, kind: str, expert: str, name: str) -> Tensor | None:
        stats = self.modelset.stats[kind].get(expert)
        key = stats.key(name) if stats is not None else None
        if key is None:
            return None
        return stats.read(self._handle, key).to(self.device)

    def scores(self, kind: str, expert: str) -> Iterator[tuple[str, Tensor]]:
        """(name, score) per tensor for an expert's global cut: |τ| or v·τ² (tensors without v are skipped)."""
        ms = self.modelset
        for name in ms.tensor_names:
            if kind == "saliency":
                v = self.stat("moments", expert, name)
                if v is None:
                    continue
            delta = self.tensor(ms.experts[expert], name)
            if ms.base is not None:
                delta.sub_(self.tensor(ms.base, name))
            yield name, (delta.abs_() if kind == "magnitude" else v * delta.square_())


def merge_tensor(
    plan: RulePlan,
    name: str,
    base: Tensor | None,
    models: list[Tensor] | None,
    deltas: list[Tensor] | None,
    stats: dict[str, list[Tensor] | None],
    seed: int,
    thresholds: GlobalThresholds,
) -> Tensor:
    """Run one rule's method on one tensor (float32 in, float32 out)."""

    def cut(kind: str, index: int, keep: float) -> GlobalCut:
        return thresholds(kind, plan.experts[index], keep)

    inputs = TensorInputs(
        name=name,
        base=base,
        weights=plan.weights,
        models_given=models,
        deltas_given=deltas,
        moments=stats.get("moments"),
        fisher=stats.get("fisher"),
        gram=stats.get("gram"),
        generator=tensor_generator(seed, name),
        global_cut=cut,
        seed=seed,
    )
    out = plan.spec.fn(inputs, **plan.kwargs)
    reference = base if base is not None else (models or deltas)[0]
    if out.shape != reference.shape:
        raise ValueError(f"method '{plan.spec.name}' returned shape {list(out.shape)} for {name} {list(reference.shape)}")
    # The sum is one pass without a mask allocation; only a non-finite sum (or an overflow) looks closer.
    if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
        given = models if models is not None else deltas
        culprit = "the base model" if base is not None and not torch.isfinite(base).all() else next(
            (f"expert {e!r}" for e, t in zip(plan.experts, given) if not torch.isfinite(t).all()), None
        )
        cause = f"{culprit} has NaN/inf values in it; fix or drop that model" if culprit else "change the rule's params"
        raise NonFiniteMergeError(
            f"merged tensor {name!r} (rules.{plan.index}, {plan.spec.name}) has NaN/inf values: {cause}; the merge stopped"
        )
    return out


def complete_stats(tensors: list[Tensor | None]) -> list[Tensor] | None:
    """The per-expert statistics of one tensor, or None when an expert has none for it (e.g. no Gram)."""
    return None if any(t is None for t in tensors) else tensors  # type: ignore[return-value]


class ResidentModelSet:
    """Base, task vectors and statistics held in float32 on one device: the search worker's per-trial merge.

    Loading reads the disk once; `merge_into` then merges every tensor straight into a sink
    (usually a `LiveModelSink` over the evaluator's model). Global thresholds are cached across
    trials, since they depend only on (kind, expert, keep fraction).
    """

    def __init__(
        self,
        modelset: ModelSet,
        device: str,
        base: dict[str, Tensor] | None,
        vectors: dict[str, dict[str, Tensor]],
        stats: dict[str, dict[str, dict[str, Tensor]]],
    ) -> None:
        self.modelset = modelset
        self.device = device
        self.base = base
        self.vectors = vectors  # expert → name → τ (or θ when there is no base)
        self.stats = stats  # kind → expert → name → statistic
        self.thresholds = GlobalThresholds(self._scores)
        largest = max(t.numel() for t in next(iter(vectors.values())).values())
        self._scratch = torch.empty(largest, dtype=torch.float32, device=device)

    @classmethod
    def load(cls, modelset: ModelSet, device: str = "cpu") -> ResidentModelSet:
        started = time.perf_counter()
        names = modelset.tensor_names
        with modelset.reader(device) as reader:
            base = {name: reader.tensor(modelset.base, name) for name in names} if modelset.base is not None else None
            vectors: dict[str, dict[str, Tensor]] = {}
            for expert, ckpt in modelset.experts.items():
                vectors[expert] = {}
                for name in names:
                    t = reader.tensor(ckpt, name)
                    vectors[expert][name] = t.sub_(base[name]) if base is not None else t
            stats: dict[str, dict[str, dict[str, Tensor]]] = {}
            for kind, files in modelset.stats.items():
                stats[kind] = {}
                for expert in files:
                    found = ((name, reader.stat(kind, expert, name)) for name in names)
                    stats[kind][expert] = {name: t for name, t in found if t is not None}
        log.info("model set resident on %s in %.1fs", device, time.perf_counter() - started)
        return cls(modelset, device, base, vectors, stats)

    def _scores(self, kind: str, expert: str) -> Iterator[tuple[str, Tensor]]:
        for name, tau in self.vectors[expert].items():
            if self.base is None:
                raise ValueError("global thresholds need a base model")
            if kind == "magnitude":
                yield name, tau.abs()
            else:
                v = self.stats["moments"].get(expert, {}).get(name)
                if v is not None:
                    yield name, v * tau.square()

    def merge_into(self, recipe: Recipe, sink: Sink, seed: int) -> dict[str, float]:
        """Merge the recipe into `sink` tensor by tensor; returns timings (seconds).

        Rules whose method is a fixed linear combination of the base and the task vectors
        (linear, task_arithmetic) are summed in place into one preallocated buffer — one pass per
        input, no allocation; every other method runs through the method library.
        """
        schedule = self.modelset.plan(recipe)
        combinations = {id(plan): linear_combination(plan) for _, plan in schedule if plan is not None}
        compute = write = 0.0
        for name, plan in schedule:
            started = time.perf_counter()
            if plan is None:
                out = self.base[name] if self.base is not None else self.vectors[next(iter(self.vectors))][name]
            elif combinations[id(plan)] is not None:
                out = self._combine(name, plan.experts, *combinations[id(plan)])
            else:
                given = [self.vectors[e][name] for e in plan.experts]
                stats = {
                    kind: complete_stats([self.stats[kind].get(e, {}).get(name) for e in plan.experts]) for kind in plan.stats
                }
                base = self.base[name] if self.base is not None else None
                out = merge_tensor(
                    plan,
                    name,
                    base,
                    None if base is not None else given,
                    given if base is not None else None,
                    stats,
                    seed,
                    self.thresholds,
                )
            computed = time.perf_counter()
            sink.write(name, out)
            compute += computed - started
            write += time.perf_counter() - computed
        sink.close()
        return {"merge_compute_s": compute, "merge_write_s": write}

    def _combine(self, name: str, experts: list[str], base_coefficient: float, coefficients: list[float]) -> Tensor:
        """base_coefficient·θ₀ + Σ c_k·τ_k (θ_k without a base) in the scratch buffer, valid until the next call."""
        first = self.vectors[experts[0]][name]
        out = self._scratch[: first.numel()].view(first.shape)
        if self.base is not None:
            torch.mul(self.base[name], base_coefficient, out=out)
        else:
            out.zero_()
        for expert, c in zip(experts, coefficients):
            if c != 0.0:
                out.add_(self.vectors[expert][name], alpha=c)
        return out


def linear_combination(plan: RulePlan) -> tuple[float, list[float]] | None:
    """(base coefficient, per-expert task-vector coefficients) for methods that are a fixed linear
    combination, mirroring `methods/linear.py` and `methods/task_arithmetic.py` (tests compare both paths)."""

    def param(public: str) -> object:
        spec = plan.spec.params[public]
        return plan.kwargs.get(spec.arg, spec.default)

    weights, total = plan.weights, sum(plan.weights)
    if plan.spec.name == "linear":
        divisor = total if param("normalize") and abs(total) > 1e-8 else 1.0
        return total / divisor, [w / divisor for w in weights]
    if plan.spec.name == "task_arithmetic":
        divisor = total if param("normalize") and abs(total) >= 1e-8 else 1.0
        scale = float(param("lambda"))
        return 1.0, [scale * w / divisor for w in weights]
    return None
