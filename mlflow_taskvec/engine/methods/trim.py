"""Exact magnitude thresholds for trimming: which entries of a tensor are its top k by |x|.

A radix select over the magnitudes' float bit patterns (non-negative floats order like
integers), in memory bounded by one chunk: several times faster than ``torch.kthvalue``
on CPU, and it counts the ties at the threshold on the way, so exactly k entries survive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch


def trim_count(density: float, numel: int) -> int:
    """How many entries the trim step keeps: int(density * numel), at least 1."""
    return max(1, int(density * numel))


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
            # entries equal to the threshold: numel minus those where |x| - value has a sign
            # (float arithmetic; a comparison to a bool mask costs several times more on CPU)
            differ = chunk.abs().sub_(self.value).abs_().sign_().sum(dtype=torch.float64)
            tied = chunk.numel() - int(differ)
            self.tie_budget[start] = min(left, tied)
            left -= self.tie_budget[start]

    def apply(self, chunk: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``chunk`` with the entries the trim drops set to zero (a new tensor)."""
        magnitude = chunk.abs()
        if self.keeps_every_tie or self._budget(start) == 0:
            # keep |x| >= value (every tie kept) or |x| > value (none in this chunk): an
            # arithmetic 0/1 indicator, several times faster than boolean masks and
            # torch.where on CPU (x - y is 0 only when x == y, subnormals included)
            if self.keeps_every_tie:
                cut = torch.nextafter(torch.tensor(self.value, dtype=chunk.dtype), torch.tensor(-1.0, dtype=chunk.dtype))
            else:
                cut = torch.tensor(self.value, dtype=chunk.dtype)
            keep = magnitude.sub_(cut).sign_().clamp_(min=0)
            return keep.mul_(chunk)
        if self.value > 0 and bool(torch.isfinite(chunk.sum())):
            # |x| > value by the same arithmetic, then the chunk's first ``budget`` ties put
            # back: what torch.where on the mask gives (dropped entries +0: x * 0 may be -0,
            # and -0 + 0 is +0 while a kept x, never 0 here, is unchanged), in a third of the time
            ties = torch.nonzero(magnitude.reshape(-1) == self.value).reshape(-1)[: self._budget(start)]
            kept = magnitude.sub_(torch.tensor(self.value, dtype=chunk.dtype)).sign_().clamp_(min=0).mul_(chunk).add_(0.0)
            kept.view(-1)[ties] = chunk.reshape(-1)[ties]
            return kept
        return torch.where(self._keep_mask(magnitude, start), chunk, 0.0)

    def keep_mask(self, chunk: torch.Tensor, start: int = 0) -> torch.Tensor:
        """True at the entries of ``chunk`` (a flat slice starting at ``start``) that the trim keeps."""
        return self._keep_mask(chunk.abs(), start)

    def _budget(self, start: int) -> int:
        """How many ties the chunk starting at ``start`` keeps."""
        return self.tie_budget.get(start, self.ties_to_keep if start == 0 and not self.tie_budget else 0)

    def _keep_mask(self, magnitude: torch.Tensor, start: int) -> torch.Tensor:
        if self.keeps_every_tie:  # no tie plan is made then: every chunk keeps its ties
            return magnitude >= self.value
        keep = magnitude > self.value
        budget = self._budget(start)
        if budget > 0:
            # the first ``budget`` ties in flattened order (nonzero lists them in order)
            first = torch.nonzero(magnitude.reshape(-1) == self.value).reshape(-1)[:budget]
            keep.view(-1)[first] = True
        return keep


def _radix_select(chunks: Callable[[], Iterable[torch.Tensor]], k: int, dtype: torch.dtype) -> TrimThreshold:
    """Exact k-th largest magnitude by a radix select over the float bit patterns
    (non-negative floats order like integers).

    Pass 1 histograms the top 16 bits over every chunk. For float32, pass 2
    histograms the low 16 bits of the entries in the winning bin (all integer
    arithmetic, no boolean masks), which fixes the value. Otherwise pass 2 gathers
    the few entries that share the winning top bits, and the remaining digits are
    resolved on that small set in memory. A tensor given as one chunk is scanned
    only once.
    """
    float_dtype, int_dtype, bits = (
        (torch.float64, torch.int64, 64) if dtype == torch.float64 else (torch.float32, torch.int32, 32)
    )
    top_shift = bits - 16
    hist = None  # the histograms live where the chunks do (the CPU, or a GPU)
    only = None

    def bits_of(chunk: torch.Tensor) -> torch.Tensor:
        return chunk.reshape(-1).to(float_dtype).abs().view(int_dtype)

    for i, chunk in enumerate(chunks()):
        b = bits_of(chunk)
        top = b >> top_shift  # the sign bit is clear, so this is in [0, 2**15)
        counts = torch.bincount(top, minlength=1 << 16)
        hist = counts if hist is None else hist.add_(counts)
        only = (b, top) if i == 0 else None
    digit, remaining, tied = _pick(hist, k)
    if bits == 32 and only is None:
        low = None
        for b in map(bits_of, chunks()):
            counts = torch.bincount(_low_digits_in_bin(b, digit), minlength=1 << 17)
            low = counts if low is None else low.add_(counts)
        low_digit, remaining, tied = _pick(low[: 1 << 16], remaining)
        value = float(torch.tensor([(digit << 16) | low_digit], dtype=torch.int32).view(torch.float32))
        return TrimThreshold(value, ties_to_keep=remaining, ties_total=tied)
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


def _low_digits_in_bin(b: torch.Tensor, digit: int) -> torch.Tensor:
    """Float32 bit patterns ``b`` as histogram keys: the low 16 bits where the top 16 bits
    are ``digit``, 2**16 or more elsewhere."""
    outside = (b >> 16).sub_(digit).abs_().clamp_(max=1)  # 0 in the bin, 1 outside
    return (b & 0xFFFF).add_(outside.mul_(1 << 16))


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


def trim_threshold(chunks: Callable[[], Iterable[torch.Tensor]] | None, k: int, dtype: torch.dtype, whole: torch.Tensor | None = None) -> TrimThreshold:
    """The trim rule keeping exactly k entries of a tensor given whole or as ``chunks()``.

    A radix select over the magnitudes' bits: several times faster than
    ``torch.kthvalue`` on CPU, and it counts the ties at the threshold on the way.
    """
    return _radix_select((lambda: (whole,)) if whole is not None else chunks, k, dtype)


def top_k_rule(chunks: Callable[[], Iterable[tuple[int, torch.Tensor]]], k: int, dtype: torch.dtype) -> TrimThreshold:
    """The exact rule keeping the k largest-magnitude entries of one input given as
    ``chunks()`` -> (start, chunk) in order, with its ties planned across the chunks."""
    return top_k_rules(chunks, [k], dtype)[0]


# Up to this many entries of a chunk in the threshold's top-16-bit bin, pass 2 keeps their
# low bits to count the chunk's ties (32 KB a chunk at most); a chunk with more sends the
# rule to the tie-planning pass instead.
_KEEP_LOW_BITS = 1 << 13


def top_k_rules(chunks: Callable[[], Iterable[tuple[int, torch.Tensor]]], ks: list[int], dtype: torch.dtype) -> list[TrimThreshold]:
    """``top_k_rule`` for several k of the same input, sharing its passes over the chunks.

    For float32 over several chunks: pass 1 histograms the magnitudes' top 16 bits; pass 2
    histograms the low 16 bits of the entries in each rule's winning bin, which fixes each
    threshold, and keeps those low bits per chunk where they are few, which counts each
    chunk's ties at the threshold on the same data (no third pass unless a chunk had many).
    Otherwise (one chunk, float64) each rule is ``trim_threshold`` plus ``plan_ties``.
    """
    if dtype == torch.float64:
        return [_rule_with_ties(chunks, k, dtype) for k in ks]
    hist, starts = None, []
    for start, chunk in chunks():
        counts = torch.bincount(_bits32(chunk) >> 16, minlength=1 << 16)
        hist = counts if hist is None else hist.add_(counts)
        starts.append(start)
    if len(starts) <= 1:
        return [_rule_with_ties(chunks, k, dtype) for k in ks]
    picks = [_pick(hist, k) for k in ks]
    digits = sorted({digit for digit, _, _ in picks})
    low_hist = {d: torch.zeros(1 << 16, dtype=torch.int64) for d in digits}
    low_bits: dict[int, list[torch.Tensor | None]] = {d: [] for d in digits}  # per digit, per chunk in order (None: too many)
    for _, chunk in chunks():
        b = _bits32(chunk)
        top = b >> 16
        for digit in digits:
            low = b[top == digit] & 0xFFFF
            low_hist[digit].add_(torch.bincount(low, minlength=1 << 16))
            low_bits[digit].append(low if low.numel() <= _KEEP_LOW_BITS else None)
    rules = []
    for digit, remaining, _ in picks:
        low_digit, remaining, tied = _pick(low_hist[digit], remaining)
        value = float(torch.tensor([(digit << 16) | low_digit], dtype=torch.int32).view(torch.float32))
        rule = TrimThreshold(value, ties_to_keep=remaining, ties_total=tied)
        if not rule.keeps_every_tie:
            per_chunk = low_bits[digit]
            if any(low is None for low in per_chunk):
                rule.plan_ties(chunks())
            else:
                left = remaining
                for start, low in zip(starts, per_chunk):
                    rule.tie_budget[start] = min(left, int((low == low_digit).sum()))
                    left -= rule.tie_budget[start]
        rules.append(rule)
    return rules


def _bits32(chunk: torch.Tensor) -> torch.Tensor:
    return chunk.reshape(-1).to(torch.float32).abs().view(torch.int32)


def _rule_with_ties(chunks, k: int, dtype: torch.dtype) -> TrimThreshold:
    rule = trim_threshold(lambda: (c for _, c in chunks()), k, dtype)
    if not rule.keeps_every_tie:
        rule.plan_ties(chunks())
    return rule
