"""The elementwise steps of the sliceable methods, run eagerly or fused by `torch.compile` — the same functions.

A trial's merge should cost a few passes over memory. Eager torch makes one pass per op (a TIES
slice is ~40 of them), so the steps the task-arithmetic family and OTA repeat on every slice —
sparsify one expert's τ, combine the experts — are plain torch functions here that `Kernels`
runs either as they are or compiled into one loop each (Inductor: C++/OpenMP on a CPU, Triton
on a GPU), with numerics that match eager ones: no contraction into fused multiply-adds, IEEE
division, no flush of denormals. Integer ops (the counter-based draws) are exact either way;
the float ops are the same IEEE operations in the same order, so both give the same bytes
(tests/test_kernels.py). Compilation costs seconds per kernel variant once per process (and
Inductor caches it on disk); where it fails (no C++ compiler), the eager functions run.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from torch import Tensor

from mergetune.merge.counter_rng import UNIFORM_BITS, first_round, keep_below, stream_bits

log = logging.getLogger(__name__)

COMPILE_ENV = "MERGETUNE_COMPILE"  # "1": always compile the kernels, "0": never; unset: for models of COMPILE_MIN_PARAMS or more
# Compiling costs seconds per kernel variant and saves about 0.8 s per 100M parameters and merge (TIES: ~9 s;
# benchmarks/merge_speed.py, one CPU thread): a search worker re-merging for hours compiles from 50M
# parameters on, a one-shot disk merge only where one merge pays for it.
COMPILE_MIN_PARAMS = {"resident": 50_000_000, "disk": 1_000_000_000}
_COMPILE_OPTIONS = {
    "emulate_precision_casts": True,  # Triton: no fused multiply-adds (enable_fp_fusion off)
    "eager_numerics.division_rounding": True,  # Triton: IEEE division, as eager
    "eager_numerics.disable_ftz": True,  # Triton: keep denormals, as eager
    # Every step inlined into its consumers (Inductor's CSE computes it once there), none realized as a node of its
    # own: a kernel with a float-only node tiles by float32's 8 lanes, and AVX2 then loads and stores bf16 by halves
    # of a 16-lane vector through the stack (TIES ran 2.7x slower, DARE 1.9x; benchmarks/kernel_tiling.py). Raising
    # only the reads limit left DARE's L1 sums and TIES with tie marks 1.3-1.6x slower; compiling takes ~1.5x longer.
    "realize_reads_threshold": 1 << 20,
    "realize_opcount_threshold": 1 << 20,
    "realize_acc_reads_threshold": 1 << 20,
}


def within(s: Tensor, low: float | None, high: float | None) -> Tensor | None:
    """low < s < high, elementwise (float32 bounds, exclusive; None: no bound on that side, None for none at all)."""
    if low is None:
        return None if high is None else s < high
    return s > low if high is None else (s > low) & (s < high)


def task_vectors(base: Tensor, given: list[Tensor], stored: bool) -> tuple[Tensor, list[Tensor]]:
    """(θ₀, τ_k) in float32: from the stored models (τ_k = float32(θ_k) − float32(θ₀), as the engines make them),
    or the given task vectors."""
    base = base.to(torch.float32)
    return base, ([g.to(torch.float32) - base for g in given] if stored else given)


def rescaled(tau: Tensor, keep: Tensor | None, factor: float | None, divide_by: float | Tensor | None) -> Tensor:
    """τ·keep (None: τ), times the L1 `factor`, or divided by the keep probability (`divide_by`, clamped away from 0)."""
    masked = tau if keep is None else tau * keep
    if factor is not None:
        return masked * factor
    if divide_by is None:
        return masked
    if isinstance(divide_by, Tensor):
        return torch.where(keep, masked / divide_by.clamp_min(torch.finfo(torch.float32).tiny), masked)
    return masked / divide_by


def selected(tau: Tensor, moments: Tensor | None, low: float | None, high: float | None, tied: Tensor | None) -> Tensor | None:
    """The keep-mask of a selection (`order_stats.Selection.bounds`): scores |τ| (v·τ² given moments) strictly
    between its bounds, or marked in `tied` (0/1 of `Kernels.mark_dtype`: a bool tensor would cost a compiled kernel
    a slow vector load); None keeps everything."""
    if low is None and high is None and tied is None:
        return None
    keep = within(tau.abs() if moments is None else moments * tau.square(), low, high)
    if tied is None:
        return keep
    if keep is None:
        return tied != 0
    if not torch.compiler.is_compiling():
        # eagerly one pass, not three (0/1 bytes are valid bools); bf16 marks where a compiled kernel fell back to eager
        return keep.logical_or_(tied.view(torch.bool) if tied.dtype == torch.uint8 else tied != 0)
    return (keep.to(torch.float32) + tied.to(torch.float32)) > 0


def into(out: Tensor | None, merged: Tensor) -> Tensor:
    """`merged` rounded once into `out` (the slice's destination, in its own dtype: a live model's storage), which is
    returned; or `merged` itself when there is none. Compiled, the kernel stores each result there as it computes it:
    no float32 tensor of the slice is made, faulted in, and read again by a second copy."""
    if out is None:
        return merged
    return out.copy_(merged)


def ranks_carrier(ranks: Tensor, buffer: Tensor | None = None) -> Tensor:
    """DELLA's row ranks (one slice) as a kernel reads them: int16 ranks on a CPU widened to int32 (into `buffer`, a
    flat int32 tensor of at least their size, when given). Inductor's CPU backend vectorizes no int16 load (della's
    kernel ran scalar, ~10× slower)."""
    if ranks.dtype != torch.int16 or ranks.device.type != "cpu":
        return ranks
    out = torch.empty(ranks.shape, dtype=torch.int32) if buffer is None else buffer[: ranks.numel()].view(ranks.shape)
    return out.copy_(ranks)


def della_thresholds(ranks: Tensor, ramp: tuple) -> Tensor:
    """DELLA's keep thresholds T = T₀ + r·q + ⌊r·f / 2^s⌋ (int32) of integer row `ranks` r, for the `ramp` (T₀, q, f, s)
    of `sparsify.della_ramp` (ints, or 0-dim int32 tensors in a kernel): entry i is kept when its draw's top 24 bits
    are below T_i (`counter_rng.keep_below`). Integer ops, exact on every device; a float π compared with the draw
    made a compiled CPU kernel convert the bits to float one lane at a time (della's kernel 2.5 → 1.3 ns per element)."""
    start, whole, fraction, shift = ramp
    r = ranks.to(torch.int32)
    return start + r * whole + ((r * fraction) >> shift)  # r·f < 2^31 and r·q ≤ 2^24 (`della_ramp`): no wrap


def della_probabilities(thresholds: Tensor) -> Tensor:
    """The keep probabilities π = min(T, 2^24)/2^24 of `della_thresholds` (float32, exact): P(draw < T)."""
    return thresholds.clamp_max(1 << UNIFORM_BITS).to(torch.float32) * 2.0**-UNIFORM_BITS


def sparsified(tau: Tensor, sparsify: str, args: tuple, hashed: Tensor | None) -> Tensor:
    """One expert's τ̂ (see `methods.gta`): `args` are (low, high, tied, factor, divide_by) for a selection
    ("magnitude", "band"), (stream key, `keep_threshold(ρ)`, factor, divide_by) for "random", (stream key, ranks,
    `della_ramp`, factor, divide) for "magprune"; `hashed` is the slice's first round of the counter-based draws."""
    if sparsify in ("magnitude", "band"):
        low, high, tied, factor, divide_by = args
        return rescaled(tau, selected(tau, None, low, high, tied), factor, divide_by)
    if sparsify == "random":
        key, threshold, factor, divide_by = args
        return rescaled(tau, keep_below(stream_bits(hashed, key), threshold), factor, divide_by)
    key, ranks, ramp, factor, divide = args
    thresholds = della_thresholds(ranks, ramp)
    keep = keep_below(stream_bits(hashed, key), thresholds)
    return rescaled(tau, keep, factor, della_probabilities(thresholds) if divide else None)


def _hashed(sparsify: str, like: Tensor, offset: Tensor, key: Tensor) -> Tensor | None:
    """The slice's first round of counter-based draws; `offset` and `key` are 0-dim int32 tensors (`key_tensor`),
    so one compiled kernel serves every slice and tensor."""
    if sparsify not in ("random", "magprune"):
        return None
    index = torch.arange(like.numel(), dtype=torch.int32, device=like.device) + offset
    return first_round(index, key).view(like.shape)


def gta_slice(
    base: Tensor,
    given: list[Tensor],
    stored: bool,
    sparsify: str,
    experts: list[tuple],
    offset: Tensor,
    key: Tensor,
    weights: list[float],
    consensus: bool,
    normalize: bool,
    total: float | None,
    lambda_: float,
    out: Tensor | None = None,
) -> Tensor:
    """The task-arithmetic family on one slice: τ̂_k by `sparsified`, then `combined` (`into` `out`).
    `offset` and `key` (the tensor's `counter_rng.tensor_key`; 0-dim int32 tensors) place the slice's
    counter-based draws; a stream's key (in its args) is a 0-dim int32 tensor too."""
    base, taus = task_vectors(base, given, stored)
    hashed = _hashed(sparsify, base, offset, key)
    kept = [sparsified(tau, sparsify, args, hashed) for tau, args in zip(taus, experts)]
    return into(out, combined(base, kept, weights, consensus, normalize, total, lambda_))


def l1_norm(x: Tensor) -> Tensor:
    """Σ|x| in float64, the entries of x's two halves first added in pairs in float32 (an IEEE add, eagerly as
    compiled). Inductor's CPU backend widens float32 to float64 one lane at a time (ATen's vectorized conversions
    have no float32 → float64 case), so pairing halves those: DARE's L1 sums of 3 experts 2.97 → 1.85 ns per element (AVX-512); the two halves are
    two read streams per input, where four (pairs of pairs) ran slower than none."""
    flat = x.reshape(-1)
    half = flat.numel() // 2
    pairs = flat[:half].abs() + flat[half : 2 * half].abs()
    return pairs.sum(dtype=torch.float64) + flat[2 * half :].abs().sum(dtype=torch.float64)


def gta_l1_sums(
    base: Tensor, given: list[Tensor], stored: bool, sparsify: str, experts: list[tuple], offset: Tensor, key: Tensor,
    norms: bool = True,
) -> Tensor:
    """float64 [Σ|τ_k|, Σ|τ̂_k|] (`l1_norm`) over the slice, for each expert in `experts` (pairs (index, args)); without `norms`
    only the Σ|τ̂_k| (the Σ|τ_k| of a study's slices never change: `TensorSummaries.task_vector_l1`). Each sum is its
    own reduction, so a Σ|τ̂_k| is the same with or without the norms."""
    base, taus = task_vectors(base, given, stored)
    hashed = _hashed(sparsify, base, offset, key)
    sums = []
    for index, args in experts:
        tau = taus[index]
        if norms:
            sums.append(l1_norm(tau))
        sums.append(l1_norm(sparsified(tau, sparsify, args, hashed)))
    return torch.stack(sums)


def combined(
    base: Tensor, deltas: list[Tensor], weights: list[float], consensus: bool, normalize: bool, total: float | None, lambda_: float
) -> Tensor:
    """θ₀ + λ·(weighted, optionally sign-elected and normalised) sum of the task vectors (`combine.combine`;
    `total` is the float32 Σw an unelected sum is divided by, None for none)."""
    if not consensus:
        mixed = deltas[0] * weights[0]
        for d, w in zip(deltas[1:], weights[1:]):
            mixed = mixed + d * w
        if total is not None:
            mixed = mixed / total
    else:
        # Eagerly every op is a pass over memory: a weight of 1 is skipped (x·1 is x, bit for bit); compiled, it is free.
        eager = not torch.compiler.is_compiling()
        weighted = [d if eager and w == 1 else d * w for d, w in zip(deltas, weights)]
        summed = weighted[0]
        for d in weighted[1:]:
            summed = summed + d
        # The elected sign as ±1 (+0 elects +); d agrees where d·sign > 0, so zeros never agree. A sum of -0 has only
        # zero terms (exact cancellation gives +0), so copysign(1, sum) elects as `sum >= 0` does wherever a term can
        # agree (a NaN sum makes every agreeing term NaN either way). Multiplies, not torch.where: the same bits, and
        # eager CPU `where` is ~10× slower than a multiply (a compiled combine within 7% of selecting with `where`).
        sign = torch.copysign(torch.ones((), dtype=summed.dtype, device=summed.device), summed)
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for w, d in zip(weights, weighted):
            agree = d * sign > 0
            mixed += d * agree  # in place: eagerly the accumulators stay in cache
            divisor += agree if eager and w == 1 else agree * w
        if normalize:
            mixed = mixed / (divisor + (divisor == 0))  # a divisor of 0 becomes 1, any other stays exactly
    if lambda_ != 1:
        mixed = mixed * lambda_
    return mixed + base


def exact_sqrt(v: Tensor) -> Tensor:
    """√v correctly rounded. A compiled sqrt is (IEEE); eager CPU float32 sqrt is not (~19% of entries an ulp off),
    so eagerly it goes through float64 (exact once rounded back: 53 ≥ 2·24 + 2 bits)."""
    if torch.compiler.is_compiling():
        return v.sqrt()
    return v.double().sqrt().float()


def moment(v: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """A slice's second moment: dense, or rank-1 factors (`moments.Factors`: [rows, 1] and [1, cols]) multiplied here,
    broadcast over the slice's [rows, cols] — in a compiled kernel as it reads them."""
    return v if isinstance(v, Tensor) else v[0] * v[1]


def ota_slice(
    base: Tensor,
    given: list[Tensor],
    stored: bool,
    curvatures: list[Tensor] | None,
    moments: list[Tensor | tuple[Tensor, Tensor]],
    bounds: list[tuple[float, float, Tensor | None] | None],
    weights: list[float],
    epsilon: float,
    out: Tensor | None = None,
) -> Tensor:
    """OTA on one slice (`into` `out`): θ₀ + Σ W_k τ_k / Σ W_k with W_k = (w_k·v_k^p + ε)·m_k; m_k keeps the FFG selection of
    v·τ² given by `bounds` (low, high, tied; None: no mask). The v_k are dense or rank-1 factors (`moment`; the slice
    then shaped [rows, cols]). `curvatures` are the v_k^p for p ≠ ½, raised eagerly (a compiled pow need not round as
    eager pow does); None for p = ½: `exact_sqrt` here, in the kernel. Where a mask is active and every expert is
    masked out, θ₀."""
    base, taus = task_vectors(base, given, stored)
    numerator = torch.zeros_like(base)
    total = torch.zeros_like(base)
    for k, (tau, v, bound, w) in enumerate(zip(taus, map(moment, moments), bounds, weights)):
        weight = w * (exact_sqrt(v) if curvatures is None else curvatures[k]) + epsilon
        keep = None if bound is None else selected(tau, v, *bound)
        if keep is not None:
            weight = weight * keep
        numerator = numerator + weight * tau
        total = total + weight
    merged = base + numerator / total.clamp_min(torch.finfo(torch.float32).tiny)
    if any(bound is not None for bound in bounds):
        merged = torch.where(total <= 1.1 * len(taus) * epsilon, base, merged)
    return into(out, merged)


def weighted_add(acc: Tensor, x: Tensor, w: float) -> Tensor:
    """acc + w·x rounded once, as eager `add(alpha=)` computes it (a fused multiply-add); compiled code spells the
    fma out, since Inductor (told not to contract) would round the product and the sum apart."""
    if torch.compiler.is_compiling():
        return torch.ops.prims.fma(x, w, acc)
    return acc.add(x, alpha=w)


def linear_slice(models: list[Tensor], weights: list[float], total: float | None, out: Tensor | None = None) -> Tensor:
    """Σ w_k θ_k in float32 in mergekit's order (fused multiply-adds onto zeros), divided by the float32 Σw
    `total` (None: unnormalised), `into` `out`; the models as stored or float32."""
    summed = torch.zeros_like(models[0], dtype=torch.float32)
    for w, m in zip(weights, models):
        summed = weighted_add(summed, m.to(torch.float32), w)
    return into(out, summed if total is None else summed / total)


def combined_slice(
    base: Tensor, given: list[Tensor], stored: bool, weights: list[float], consensus: bool, normalize: bool, total: float | None,
    lambda_: float, out: Tensor | None = None,
) -> Tensor:
    """`combined` of one slice's task vectors, made from stored models or given, `into` `out`."""
    base, taus = task_vectors(base, given, stored)
    return into(out, combined(base, taus, weights, consensus, normalize, total, lambda_))


KERNELS = ("rescaled", "combined", "linear_slice", "combined_slice", "gta_slice", "gta_l1_sums", "ota_slice")


class Kernels:
    """The kernel functions as attributes, each run as written (`compiled=False`) or through `torch.compile`."""

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        for name in KERNELS:
            fn = globals()[name]
            setattr(self, name, _compiled(name, fn) if compiled else fn)

    def mark_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype of the tie marks `selected` reads: bf16 in a compiled CPU kernel, whose 16-lane tiles load bf16
        whole but uint8 by parts through the stack (TIES: 3.5 → 2.6 ns per element, 3 experts, AVX2), else uint8
        (eagerly viewed as bools; a GPU kernel reads bytes fast)."""
        return torch.bfloat16 if self.compiled and torch.device(device).type == "cpu" else torch.uint8


RECOMPILE_LIMIT = 64  # compiled variants per kernel: sparsifier, consensus, experts, which rescale (dynamo's default is 8)


def _compile_failures() -> tuple[type[BaseException], ...]:
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import InductorError

    return (TorchDynamoException, InductorError)


def _compiled(name: str, fn):
    """`fn` compiled on first call; if compiling fails (no C++ compiler, an unsupported backend), `fn` itself."""
    state: dict[str, object] = {}

    def run(*args, **kwargs):
        if "fn" not in state:
            state["fn"] = torch.compile(fn, dynamic=True, options=_COMPILE_OPTIONS)
        if state["fn"] is fn:
            return fn(*args, **kwargs)
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return state["fn"](*args, **kwargs)
        except _compile_failures() as exc:
            log.warning("compiling the %s kernel failed (%s); running it eagerly", name, str(exc).splitlines()[0][:200])
            state["fn"] = fn
            return fn(*args, **kwargs)

    return run


EAGER = Kernels(compiled=False)


def kernels_for(parameters: int, engine: str) -> Kernels:
    """Compiled kernels for models of COMPILE_MIN_PARAMS[engine] parameters or more ("resident": a search
    worker's re-merges, "disk": one merge to files), or as MERGETUNE_COMPILE says."""
    setting = os.environ.get(COMPILE_ENV)
    compiled = parameters >= COMPILE_MIN_PARAMS[engine] if setting is None else setting == "1"
    return Kernels(compiled) if compiled else EAGER
