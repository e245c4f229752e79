"""Merge methods: small pure functions over the tensors of one parameter name.

A method receives, for one chunk of one parameter (flattened), the task vectors'
entries ``deltas[i]`` (in the compute dtype; never modify them), their weights
``w_i``, and a ``MergeContext``; it returns the merged delta. The executor adds
it to the base: ``output = base + scale * merged``.

Methods that trim (``ties``, ``magnitude_prune``) get each input's magnitude
trim rule over the *whole* tensor in ``ctx.thresholds``; methods that drop
(``dare_*``) draw their masks from ``ctx.keep_mask``, which depends only on
(seed, input index, tensor name, position), never on processing order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from mlflow_taskvec.errors import TaskVecError

# Random masks are drawn in fixed blocks of the flattened tensor, each from its
# own generator, so that any chunking aligned to blocks gives the same masks.
RANDOM_BLOCK = 1 << 20


def derive_seed(seed: int, input_index: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{input_index}\0{name}\0{block}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class MergeContext:
    name: str
    start: int  # offset of this chunk in the flattened tensor
    numel: int  # size of the whole tensor
    params: dict
    thresholds: "list[TrimThreshold] | None" = None

    def keep_mask(self, input_index: int, length: int, keep_probability: float) -> torch.Tensor:
        """Bernoulli(keep_probability) mask for entries [start, start+length) of input ``input_index``."""
        if self.start % RANDOM_BLOCK:
            raise ValueError("chunks must start on a random-block boundary")
        seed = int(self.params.get("seed", 0))
        parts = []
        first = self.start // RANDOM_BLOCK
        last = (self.start + length - 1) // RANDOM_BLOCK
        for block in range(first, last + 1):
            block_len = min(RANDOM_BLOCK, self.numel - block * RANDOM_BLOCK)
            gen = torch.Generator().manual_seed(derive_seed(seed, input_index, self.name, block))
            parts.append(torch.rand(block_len, generator=gen) < keep_probability)
        mask = parts[0] if len(parts) == 1 else torch.cat(parts)
        return mask[:length]


MethodFn = Callable[[list[torch.Tensor], list[float], MergeContext], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn
    description: str
    params: frozenset = field(default_factory=frozenset)  # accepted parameter names
    required: frozenset = field(default_factory=frozenset)
    trims: bool = False  # needs per-input magnitude thresholds over the whole tensor
    # base + scale * sum_i w_i t_i: the executor accumulates it term by term in one
    # buffer, with no per-vector temporaries.
    linear: bool = False


METHODS: dict[str, MergeMethod] = {}


def register(name: str, description: str, params=(), required=(), trims: bool = False, linear: bool = False):
    def deco(fn: MethodFn) -> MethodFn:
        METHODS[name] = MergeMethod(name, fn, description, frozenset(params), frozenset(required), trims, linear)
        return fn

    return deco


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise TaskVecError(f"unknown merge method {name!r} (known: {', '.join(sorted(METHODS))})") from None


def validate_params(method: MergeMethod, params: dict) -> dict:
    """Check a method's parameters; returns them with defaults filled in."""
    unknown = sorted(set(params) - method.params)
    if unknown:
        raise TaskVecError(f"method {method.name!r} takes no parameter {unknown[0]!r} (accepted: {', '.join(sorted(method.params)) or 'none'})")
    missing = sorted(method.required - set(params))
    if missing:
        raise TaskVecError(f"method {method.name!r} needs parameter {missing[0]!r}")
    out = dict(params)
    if "density" in out:
        d = out["density"]
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0 < d <= 1) or math.isnan(d):
            raise TaskVecError(f"params.density: {d!r} must be a number in (0, 1]")
        out["density"] = float(d)
    if "seed" in method.params:
        s = out.setdefault("seed", 0)
        if isinstance(s, bool) or not isinstance(s, int):
            raise TaskVecError(f"params.seed: {s!r} must be an integer")
    return out


def trim_count(density: float, numel: int) -> int:
    """How many entries the trim step keeps: int(density * numel), at least 1."""
    return max(1, int(density * numel))


# -- the methods ---------------------------------------------------------------


def _weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t, alpha=w)
    return out


def _trimmed(deltas: list[torch.Tensor], ctx: MergeContext) -> list[torch.Tensor]:
    return [rule.apply(d, ctx.start) for d, rule in zip(deltas, ctx.thresholds)]


def _dropped(deltas: list[torch.Tensor], ctx: MergeContext) -> list[torch.Tensor]:
    p = ctx.params["density"]
    return [torch.where(ctx.keep_mask(i, d.numel(), p), d / p, 0.0) for i, d in enumerate(deltas)]


def _elect_and_mean(scaled: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES sign election and disjoint mean over already weighted deltas ``d_i = w_i t_i``.

    With ``P = sum_i max(d_i, 0)`` and ``N = sum_i min(d_i, 0)``, the elected sign is
    ``+`` where ``P + N >= 0``, and the agreeing entries sum to ``P`` there, ``N``
    elsewhere; the divisor likewise sums ``|w_i|`` over the positive or the negative
    entries. The divisor uses ``|w_i|``: with positive weights this is the paper's
    weighted disjoint mean, and a negative weight still negates (dividing by ``w_i``
    itself would cancel the sign it put on ``d_i``). Everything is float arithmetic:
    on CPU that is several times faster than boolean masks and ``torch.where``.
    """
    pos_sum = torch.zeros_like(scaled[0])
    neg_sum = torch.zeros_like(scaled[0])
    pos_weight = torch.zeros_like(scaled[0])
    neg_weight = torch.zeros_like(scaled[0])
    for d, w in zip(scaled, weights):
        pos_sum.add_(d.clamp(min=0))
        neg_sum.add_(d.clamp(max=0))
        sign = torch.sign(d)  # zeros have sign 0: they count on neither side
        pos_weight.add_(sign.clamp(min=0), alpha=abs(w))
        neg_weight.sub_(sign.clamp_(max=0), alpha=abs(w))
    # 1 where the elected sign is + (P + N >= 0), else 0
    plus = torch.add(pos_sum, neg_sum).sign_().add_(1).clamp_(max=1)
    numerator = pos_sum.sub_(neg_sum).mul_(plus).add_(neg_sum)
    divisor = pos_weight.sub_(neg_weight).mul_(plus).add_(neg_weight)
    # no agreeing entry: the numerator is 0 too, and 0 / tiny = 0 (a zero divisor counts as 1)
    return numerator.div_(divisor.clamp_(min=torch.finfo(divisor.dtype).tiny))


@register("task_arithmetic", "base + scale * sum_i w_i t_i", linear=True)
def task_arithmetic(deltas, weights, ctx):
    return _weighted_sum(deltas, weights)


@register(
    "ties",
    "trim each t_i to its top density fraction by magnitude, elect a sign per entry, average the agreeing entries",
    params=("density",),
    required=("density",),
    trims=True,
)
def ties(deltas, weights, ctx):
    trimmed = _trimmed(deltas, ctx)
    return _elect_and_mean([t.mul_(w) if w != 1 else t for t, w in zip(trimmed, weights)], weights)


@register("magnitude_prune", "the ties trim step, then task arithmetic", params=("density",), required=("density",), trims=True)
def magnitude_prune(deltas, weights, ctx):
    return _weighted_sum(_trimmed(deltas, ctx), weights)


@register(
    "dare_linear",
    "drop each entry with probability 1 - density, rescale the kept ones by 1/density, then task arithmetic",
    params=("density", "seed"),
    required=("density",),
)
def dare_linear(deltas, weights, ctx):
    return _weighted_sum(_dropped(deltas, ctx), weights)


@register(
    "dare_ties",
    "the dare drop and rescale, then the ties sign election and disjoint mean (no trim)",
    params=("density", "seed"),
    required=("density",),
)
def dare_ties(deltas, weights, ctx):
    dropped = _dropped(deltas, ctx)
    return _elect_and_mean([t.mul_(w) if w != 1 else t for t, w in zip(dropped, weights)], weights)


# -- exact magnitude thresholds --------------------------------------------------


@dataclass
class TrimThreshold:
    """Which entries of one input the trim keeps: every ``|x| > value``, plus the
    first ``ties_to_keep`` entries with ``|x| == value`` in flattened order, so that
    exactly k entries survive even when magnitudes tie (common in 16-bit deltas).

    When only some ties are kept, ``tie_budget`` maps each chunk's start to how
    many of its ties it keeps, so chunks can be processed in any order.
    """

    value: float
    ties_to_keep: int
    ties_total: int
    tie_budget: dict[int, int] = field(default_factory=dict)

    @property
    def keeps_every_tie(self) -> bool:
        return self.ties_to_keep == self.ties_total

    def plan_ties(self, chunks: Iterable[tuple[int, torch.Tensor]]) -> None:
        """Split ``ties_to_keep`` over the chunks (given as (start, chunk) in order)."""
        left = self.ties_to_keep
        for start, chunk in chunks:
            tied = int((chunk.abs() == self.value).sum())
            self.tie_budget[start] = min(left, tied)
            left -= self.tie_budget[start]

    def apply(self, chunk: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``chunk`` with the entries the trim drops set to zero (a new tensor)."""
        magnitude = chunk.abs()
        if self.keeps_every_tie:
            # keep |x| >= value: an arithmetic 0/1 indicator, several times faster
            # than boolean masks and torch.where on CPU
            below = torch.nextafter(torch.tensor(self.value, dtype=chunk.dtype), torch.tensor(-1.0, dtype=chunk.dtype))
            keep = magnitude.sub_(below).sign_().clamp_(min=0)
            return keep.mul_(chunk)
        keep = magnitude > self.value
        budget = self.tie_budget.get(start, self.ties_to_keep if start == 0 and not self.tie_budget else 0)
        if budget > 0:
            tied = magnitude == self.value
            keep |= tied & (tied.cumsum(0) <= budget)
        return torch.where(keep, chunk, 0.0)


def _radix_select(chunks: Callable[[], Iterable[torch.Tensor]], k: int, dtype: torch.dtype) -> TrimThreshold:
    """Exact k-th largest magnitude by a radix select over the float bit patterns
    (non-negative floats order like integers).

    Pass 1 histograms the top 16 bits over every chunk; pass 2 gathers the few
    entries that share the winning top bits; the remaining digits are resolved on
    that small set in memory. A tensor given as one chunk is scanned only once.
    """
    float_dtype, int_dtype, bits = (
        (torch.float64, torch.int64, 64) if dtype == torch.float64 else (torch.float32, torch.int32, 32)
    )
    top_shift = bits - 16
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    only = None

    def bits_of(chunk: torch.Tensor) -> torch.Tensor:
        return chunk.reshape(-1).to(float_dtype).abs().view(int_dtype)

    for i, chunk in enumerate(chunks()):
        b = bits_of(chunk)
        top = b >> top_shift  # the sign bit is clear, so this is in [0, 2**15)
        hist += torch.bincount(top, minlength=1 << 16)
        only = (b, top) if i == 0 else None
    digit, remaining, tied = _pick(hist, k)
    if only is not None:
        b, top = only
        candidates = b[top == digit]
    else:
        candidates = torch.cat([b[(b >> top_shift) == digit] for b in map(bits_of, chunks())])
    prefix = digit
    for shift in range(top_shift - 16, -1, -16):
        digits = (candidates >> shift) & 0xFFFF
        digit, remaining, tied = _pick(torch.bincount(digits, minlength=1 << 16), remaining)
        candidates = candidates[digits == digit]
        prefix = (prefix << 16) | digit
    value = float(torch.tensor([prefix], dtype=torch.int64).to(int_dtype).view(float_dtype))
    return TrimThreshold(value, ties_to_keep=remaining, ties_total=tied)


def _pick(hist: torch.Tensor, k: int) -> tuple[int, int, int]:
    """The bin holding the k-th largest entry, how many of that bin are still to
    take (counting from the top), and how many the bin holds."""
    from_top = torch.flip(hist, [0]).cumsum(0)
    if k > int(from_top[-1]):
        raise ValueError("k exceeds the number of entries")
    idx = int(torch.searchsorted(from_top, k))
    remaining = k - (int(from_top[idx - 1]) if idx > 0 else 0)
    digit = (1 << 16) - 1 - idx
    return digit, remaining, int(hist[digit])


def kth_largest_magnitude(chunks: Callable[[], Iterable[torch.Tensor]], k: int, dtype: torch.dtype = torch.float32) -> float:
    """The k-th largest |x| of a tensor seen as chunks, in memory bounded by one chunk.

    ``chunks()`` returns a fresh iterable over the tensor's chunks. Non-negative
    float bit patterns order like integers, so a radix select over 16-bit digits
    finds the exact value in two passes (four for float64).
    """
    return _radix_select(chunks, k, dtype).value


def trim_threshold(chunks: Callable[[], Iterable[torch.Tensor]] | None, k: int, dtype: torch.dtype, whole: torch.Tensor | None = None) -> TrimThreshold:
    """The trim rule keeping exactly k entries of a tensor given whole or as ``chunks()``.

    A radix select over the magnitudes' bits: several times faster than
    ``torch.kthvalue`` on CPU, and it counts the ties at the threshold on the way.
    """
    return _radix_select((lambda: (whole,)) if whole is not None else chunks, k, dtype)
