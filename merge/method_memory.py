"""How much memory a merge method allocates for one tensor, measured by running it on a small one.

The memory plan needs each method's peak temporaries (masks, sign votes, rescaled copies,
its output) in units of the tensor's float32 size. Rather than a table that goes stale when a
method changes, `method_peak_buffers` runs the method on a small random tensor under a
dispatch mode that sees every tensor torch allocates, and frees through storage finalizers.
Scratch that kernels allocate inside one op (invisible to the dispatcher) is added from
`KERNEL_SCRATCH`, the CPU kernels' own allocations.
"""

from __future__ import annotations

import weakref
from functools import lru_cache

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mergetune.merge.methods import TensorInputs, get_method
from mergetune.merge.methods.registry import InputSummaries, StoredSlice
from mergetune.merge.sparsify import GlobalCut

PROBE_SHAPE = (128, 256)
# Bytes per input element an op allocates inside its kernel (CPU): kthvalue/topk copy the
# values and sort int64 indices alongside; sort copies the values it orders.
KERNEL_SCRATCH = {"kthvalue": 8 + 4, "topk": 8 + 4, "sort": 4, "argsort": 4}


class PeakAllocations(TorchDispatchMode):
    """Tracks the bytes of live tensor storages allocated under it, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: only storages new to this op are allocations.
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in inputs:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._release, key)
        scratch = KERNEL_SCRATCH.get(func.__name__.split(".")[0], 0)
        if scratch:
            source = args[0] if args and isinstance(args[0], torch.Tensor) else None
            scratch *= source.numel() if source is not None else 0
        self.peak = max(self.peak, self.current + scratch)
        return out


@lru_cache(maxsize=None)
def method_peak_buffers(
    method: str, num_models: int, stats: tuple[str, ...], params: tuple[tuple[str, object], ...], stored: str = "float32"
) -> float:
    """Peak bytes a method allocates for one tensor (its output included), in float32 tensors of that size.

    The inputs — base, task vectors (or models) and statistics, which the resident merge keeps
    in its workspace — are made before measuring. A sliceable method is measured as one slice of
    a tensor stored in dtype `stored` (its inputs reach it as stored: float32 copies of a bf16 slice
    count), whose order statistics, whole-tensor sums and per-tensor facts (`TensorInputs.memo`)
    exist already, as for every slice after a tensor's first. `params` are public recipe params.
    """
    spec = get_method(method)
    gen = torch.Generator().manual_seed(0)
    rows, cols = PROBE_SHAPE

    def tensor(scale: float = 1.0) -> torch.Tensor:
        return torch.randn(PROBE_SHAPE, generator=gen) * scale

    base = tensor()
    models = [(base + tensor(0.01)).to(getattr(torch, stored)) for _ in range(num_models)]
    base = base.to(getattr(torch, stored))
    deltas = [m.float() - base.float() for m in models]
    positive = {kind: [tensor().abs() * 1e-12 for _ in range(num_models)] for kind in stats if kind != "gram"}
    grams = [torch.eye(cols) + 0.1 * torch.ones(cols, cols) for _ in range(num_models)] if "gram" in stats else None
    name = f"probe.{rows}x{cols}"
    common = dict(
        name=name,
        weights=[1.0 / num_models] * num_models,
        gram=grams,
        global_cut=lambda kind, index, keep: GlobalCut(0.01),  # about a third of the probe's |τ|
        seed=0,
    )
    kwargs = spec.bind(dict(params), num_models)
    if spec.sliceable:
        summaries = InputSummaries(deltas, positive.get("moments")) if spec.needs_base else None
        flat = {kind: [t.reshape(-1) for t in ts] for kind, ts in positive.items()}
        sliced = dict(
            stored=StoredSlice(base.reshape(-1), [m.reshape(-1) for m in models]),
            moments=flat.get("moments"), fisher=flat.get("fisher"), full_shape=PROBE_SHAPE, summaries=summaries, memo={},
        )  # fmt: skip
        x = TensorInputs(**common, **sliced)
        totals = spec.fn(TensorInputs(**common, **sliced, totals_pass=True), **kwargs) if spec.totals else None
        x.totals = totals if totals is not None and totals.numel() else None
        spec.fn(x, **kwargs)  # the tensor's first slice: its selections and tie masks, kept for the others
    else:
        given = dict(deltas_given=deltas) if spec.needs_base else dict(models_given=[m.float() for m in models])
        x = TensorInputs(**common, base=base.float(), moments=positive.get("moments"), fisher=positive.get("fisher"), **given)
    tracker = PeakAllocations()
    with tracker:
        out = spec.fn(x, **kwargs)
    del out
    return tracker.peak / (rows * cols * 4)
