"""Low-rank task vectors: the one low-rank layout, for adapters and compressed vectors.

A low-rank tensor is ``delta = scaling * (left @ right)`` with ``left`` of shape
``(rows, rank)`` and ``right`` of shape ``(rank, cols)``; a rank-0 tensor is all
zeros and stores nothing. A ``LowRankCheckpoint`` presents such factors (and
any dense deltas beside them) as the dense tensors they stand for, so everything
that reads a checkpoint (fingerprints, norms, merges) sees the dense vector, and the
same delta stored dense or low-rank has one fingerprint. PEFT adapters
(``engine/lora.py``) and ``compress --format lowrank`` (``engine/compressed.py``) both
give one.

Densification is canonical: every entry is ``sum_k left[i, k] * right[k, j]``
accumulated in float64 in the order ``k = 0, 1, ...`` (each product of two float32
numbers is exact in float64, so fused or unfused multiply-adds agree), times
``scaling`` in float64, rounded once to the tensor's dtype. An entry therefore never
depends on which rows are computed together, on threads or on the BLAS, and a chunk
computed on its own equals the same slice of the whole tensor, bit for bit.

The stored layout, format 2 (``taskvec.layout = lowrank``, ``taskvec.layout_format =
2``): one safetensors file whose ``taskvec.layout_tensors`` lists every tensor of the
vector as ``{dtype, shape, encoding}``, the encoding being ``lowrank`` (with ``rank``
and ``scaling``; parts ``NAME/left`` and ``NAME/right``), ``dense`` (part
``NAME/dense``) or ``zero`` (nothing stored). Files of format 1 still read, with the
fingerprints they had: the ``lora`` layout (``NAME.lowrank_left``/``NAME.lowrank_right``
and a ``taskvec.low_rank`` table; canonical densification) and the compressed
``lowrank`` layout (parts ``NAME/B`` and ``NAME/A``; densified as the plain product
``B @ A`` in the stored dtype, block by block of ``CHUNK_ELEMENTS`` entries, as that
version did).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mlflow_taskvec.engine import metadata as meta_keys
from mlflow_taskvec.engine.checkpoint import Checkpoint, SafetensorsCheckpoint, register_layout
from mlflow_taskvec.engine.io import TensorSpec, dtype_code, tensor_bytes
from mlflow_taskvec.engine.layouts import (
    check_part,
    corrupt,
    entry_int,
    entry_number,
    entry_shape,
    entry_spec,
    layout_table,
    part_name,
    refuse_unclaimed,
)
from mlflow_taskvec.engine.streaming import CHUNK_ELEMENTS, check_finite, flat_slice
from mlflow_taskvec.engine.writer import CheckpointWriter
from mlflow_taskvec.errors import TaskVecError

DENSE_DTYPE = torch.float32
FORMAT = "2"  # taskvec.layout_format of the files save_low_rank writes
LEGACY_LEFT_SUFFIX = ".lowrank_left"  # the lora layout (format 1)
LEGACY_RIGHT_SUFFIX = ".lowrank_right"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class DenseDelta:
    """A dense delta: ``value - minus`` in the spec's dtype (float32 for an adapter's: a saved
    tensor minus the base's), plus ``scaling * addend`` rounded to it, each term optional but ``value``."""

    spec: TensorSpec
    value: Callable[[], torch.Tensor]
    minus: Callable[[], torch.Tensor] | None = None
    addend: Callable[[], torch.Tensor] | None = None
    scaling: float = 1.0

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        dtype = self.spec.dtype
        out = flat_slice(self.value(), start, stop, dtype)
        if self.minus is not None:
            out = torch.sub(out, flat_slice(self.minus(), start, stop, dtype))
        if self.addend is not None:
            extra = flat_slice(self.addend(), start, stop, torch.float64).mul(self.scaling).to(dtype)
            out = torch.add(out, extra)
        return out

    def dense(self) -> torch.Tensor:
        if self.minus is None and self.addend is None:
            return self.value()
        return self.chunk(0, self.spec.numel).reshape(self.spec.shape)


@dataclass(frozen=True)
class LowRankTensor:
    """``scaling * (left @ right)`` of shape ``shape``; ``left``/``right`` read lazily.

    ``shape`` may have more than two dimensions only for rank 0 (a zero tensor).
    """

    shape: tuple[int, ...]
    rank: int
    scaling: float = 1.0
    left: Callable[[], torch.Tensor] | None = None  # (rows, rank)
    right: Callable[[], torch.Tensor] | None = None  # (rank, cols)
    dtype: torch.dtype = DENSE_DTYPE  # of the dense tensor it stands for
    stored_nbytes: int = 0  # bytes its factors take
    factor_dtype: torch.dtype | None = None  # the factors' dtype, when known without reading them

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.dtype, self.shape)

    @property
    def numel(self) -> int:
        return self.spec.numel

    def rows(self, first: int, last: int) -> torch.Tensor:
        """Rows [first, last) of the dense delta (rank > 0; see the module docstring)."""
        left = self.left()[first:last].to(torch.float64)
        right = self.right().to(torch.float64)
        acc = left[:, 0:1] * right[0:1, :]
        for k in range(1, self.rank):
            acc.addcmul_(left[:, k : k + 1], right[k : k + 1, :])
        return acc.mul_(self.scaling).to(self.dtype)

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        """Entries [start, stop) of the flattened dense delta, computing only the rows they touch."""
        if self.rank == 0 or stop <= start:
            return torch.zeros(max(0, stop - start), dtype=self.dtype)
        cols = self.shape[1]
        first, last = start // cols, -(-stop // cols)
        return self.rows(first, last).reshape(-1)[start - first * cols : stop - first * cols]

    def dense(self) -> torch.Tensor:
        if self.rank == 0:
            return torch.zeros(self.shape, dtype=self.dtype)
        return self.rows(0, self.shape[0])


@dataclass(frozen=True)
class ProductTensor(LowRankTensor):
    """A tensor of the format-1 compressed ``lowrank`` layout: ``left @ right`` as a plain
    product in the stored dtype, computed for the rows of each fixed block of
    ``CHUNK_ELEMENTS`` entries (so it reads back with the bits that version gave)."""

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        if self.rank == 0 or stop <= start:
            return torch.zeros(max(0, stop - start), dtype=self.dtype)
        left, right = self.left(), self.right()
        cols, numel = self.shape[1], self.numel
        pieces = []
        for block in range(start // CHUNK_ELEMENTS, (stop - 1) // CHUNK_ELEMENTS + 1):
            lo = block * CHUNK_ELEMENTS
            hi = min(numel, lo + CHUNK_ELEMENTS)
            first, last = lo // cols, (hi + cols - 1) // cols
            values = (left[first:last] @ right).reshape(-1)[lo - first * cols : hi - first * cols]
            pieces.append(values[max(start, lo) - lo : min(stop, hi) - lo])
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return out.to(self.dtype)

    def dense(self) -> torch.Tensor:
        return self.chunk(0, self.numel).clone().reshape(self.shape)


class LowRankCheckpoint(Checkpoint):
    """A task vector held as low-rank tensors (and dense deltas), read as its dense tensors.

    ``files`` are the checkpoints it is read from (an adapter's factors and its base);
    ``stored``, for a vector read from a file of the layout, that file.
    """

    def __init__(
        self,
        low_rank: dict[str, LowRankTensor],
        dense: dict[str, DenseDelta],
        metadata: dict[str, str],
        source: str,
        files: Sequence[SafetensorsCheckpoint] = (),
        stored: SafetensorsCheckpoint | None = None,
    ):
        overlap = sorted(set(low_rank) & set(dense))
        if overlap:
            raise TaskVecError(f"{source}: tensor {overlap[0]!r} is both low-rank and dense")
        self.source = source
        self.low_rank = dict(low_rank)
        self._dense = dict(dense)
        self._metadata = dict(metadata)
        self._files = list(files)
        self.stored = stored
        self._keys = sorted([*self.low_rank, *self._dense])

    # -- the Checkpoint interface: the dense vector -----------------------------------
    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self.low_rank or name in self._dense

    def spec(self, name: str) -> TensorSpec:
        if name in self.low_rank:
            return self.low_rank[name].spec
        return self._entry(name).spec

    def get_tensor(self, name: str) -> torch.Tensor:
        if name in self.low_rank:
            return self.low_rank[name].dense().reshape(self.low_rank[name].shape)
        return self._entry(name).dense()

    def read_chunk(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        source = self.low_rank.get(name) or self._entry(name)
        return source.chunk(start, stop).to(dtype)

    def raw_bytes(self, name: str) -> memoryview:
        return tensor_bytes(self.get_tensor(name))

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    @property
    def directory(self) -> Path | None:
        return None if self.stored is None else self.stored.directory

    @property
    def files(self) -> list[Path]:
        """The safetensors files that hold the stored layout (what a copy copies)."""
        if self.stored is None:
            raise TaskVecError(f"{self.source}: is read from an adapter, not stored in one file of the low-rank layout")
        return self.stored.files

    def paths(self) -> list[Path]:
        """The factor file and the base's files it is read with, and the adapter folder."""
        out = [p for f in self._files for p in f.paths()]
        if Path(self.source).exists():
            out.append(Path(self.source))
        return out

    def _file_key(self) -> tuple | None:
        keys = [f._file_key() for f in self._files]
        if not keys or any(k is None for k in keys):
            return None
        # the dense vector's fingerprint, not the factor file's: keyed apart from it
        return ("low_rank", *keys)

    def _entry(self, name: str):
        try:
            return self._dense[name]
        except KeyError:
            raise TaskVecError(f"{self.source}: no tensor named {name!r}") from None

    # -- what is stored -------------------------------------------------------------
    def check_finite(self) -> None:
        """Refuse NaN and Inf in the stored factors and dense deltas (cheaper than in the products)."""
        for name in self._keys:
            if name in self.low_rank:
                t = self.low_rank[name]
                parts = [("left", t.left), ("right", t.right)] if t.rank else []
            else:
                parts = [("delta", lambda n=name: self.read_chunk(n, 0, self.spec(n).numel, self.spec(n).dtype))]
            for label, get in parts:
                check_finite(get().reshape(-1), lambda: f"{label} factor of tensor {name!r} of {self.source}")

    def rank(self, name: str) -> int | None:
        """The rank of a low-rank tensor; None for a dense one."""
        return self.low_rank[name].rank if name in self.low_rank else None

    @property
    def stored_bytes(self) -> int:
        """Bytes the factors and dense deltas take (what the low-rank layout stores)."""
        return sum(self.low_rank[n].stored_nbytes if n in self.low_rank else self.spec(n).nbytes for n in self._keys)

    def subset(self, names: Sequence[str], metadata: dict[str, str] | None = None) -> "LowRankCheckpoint":
        keep = set(names)
        return LowRankCheckpoint(
            {n: t for n, t in self.low_rank.items() if n in keep},
            {n: e for n, e in self._dense.items() if n in keep},
            self._metadata if metadata is None else metadata,
            self.source,
        )


def max_rank(shape: Sequence[int]) -> int:
    """The largest rank a tensor of ``shape`` can be stored with as factors: ``min(m, n)`` for an
    ``m x n`` matrix, 0 (all zeros, nothing stored) for any other shape."""
    return min(shape) if len(shape) == 2 else 0


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values whose squares hold ``energy`` of their sum (0 for a zero
    matrix); sums in float64, with 1e-12 of slack so that ``energy = 1`` keeps every nonzero one."""
    squares = singular_values.to(torch.float64).square()
    total = float(squares.sum())
    if total == 0:
        return 0
    cumulative = torch.cumsum(squares, 0) / total
    found = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64) - 1e-12).item()) + 1
    return min(found, len(squares))


def _getter(ckpt: Checkpoint, name: str) -> Callable[[], torch.Tensor]:
    return lambda: ckpt.get_tensor(name)


# -- the stored layout: one writer, one reader per format -------------------------------


def save_low_rank(
    ckpt: LowRankCheckpoint,
    output: "str | os.PathLike",
    metadata: dict[str, str],
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    inputs: Sequence[Checkpoint] = (),
) -> None:
    """Write ``ckpt`` in the low-rank layout (format 2): its factors as they are, dense deltas in their dtype.
    ``output`` is a path or an ``OutputClaim`` already held; ``inputs`` are checkpoints the output
    must not be written over."""
    specs: dict[str, TensorSpec] = {}
    table = {}
    sources: dict[str, Callable[[], torch.Tensor]] = {}
    for name in ckpt.keys():
        spec = ckpt.spec(name)
        entry = {"dtype": dtype_code(spec.dtype), "shape": list(spec.shape)}
        t = ckpt.low_rank.get(name)
        if t is None:
            entry["encoding"] = "dense"
            specs[part_name(name, "dense")] = spec
            sources[part_name(name, "dense")] = (lambda n=name: ckpt.get_tensor(n))
        elif t.rank == 0:
            entry["encoding"] = "zero"
        else:
            if t.rank > max_rank(spec.shape):
                raise TaskVecError(f"{ckpt.source}: tensor {name!r} of shape {list(spec.shape)} cannot have rank {t.rank} (at most {min(spec.shape)})")
            entry.update(encoding="lowrank", rank=t.rank, scaling=t.scaling)
            for part, get, shape in (("left", t.left, (spec.shape[0], t.rank)), ("right", t.right, (t.rank, spec.shape[1]))):
                specs[part_name(name, part)] = TensorSpec(t.factor_dtype or get().dtype, shape)
                sources[part_name(name, part)] = get
        table[name] = entry
    meta = {
        **metadata,
        meta_keys.LAYOUT: meta_keys.LOWRANK_LAYOUT,
        meta_keys.LAYOUT_FORMAT: FORMAT,
        meta_keys.LAYOUT_TENSORS: json.dumps(table, sort_keys=True, separators=(",", ":")),
    }
    with CheckpointWriter(output, specs, meta, overwrite=overwrite, inputs=list(inputs)) as writer:
        for name in writer.order:
            writer.write(name, sources[name]().contiguous())
        writer.commit()
    if progress is not None:
        for name in ckpt.keys():
            progress(name)


def read_low_rank(ckpt: SafetensorsCheckpoint) -> LowRankCheckpoint:
    """A file of the ``lowrank`` layout (format 2, or the compressed layout of format 1) as its dense view."""
    layout_format = ckpt.metadata().get(meta_keys.LAYOUT_FORMAT, "1")
    if layout_format not in ("1", FORMAT):
        raise TaskVecError(
            f"{ckpt.source}: low-rank layout format {layout_format!r} is newer than this version reads (1 or {FORMAT}): upgrade mlflow-taskvec"
        )
    legacy = layout_format == "1"
    left_part, right_part = ("B", "A") if legacy else ("left", "right")
    low_rank: dict[str, LowRankTensor] = {}
    dense: dict[str, DenseDelta] = {}
    claimed: set[str] = set()
    for name, entry in layout_table(ckpt).items():
        spec = entry_spec(ckpt, name, entry)
        encoding = entry.get("encoding")
        if encoding == "zero":
            low_rank[name] = LowRankTensor(spec.shape, 0, dtype=spec.dtype)
        elif encoding == "dense":
            key = check_part(ckpt, name, "dense", spec.shape, (spec.dtype,))
            claimed.add(key)
            dense[name] = DenseDelta(spec, _getter(ckpt, key))
        elif encoding == "lowrank":
            if len(spec.shape) != 2:
                raise corrupt(ckpt, name, f"is low-rank with shape {list(spec.shape)}: only a matrix has factors")
            (m, n), dtypes = spec.shape, ((spec.dtype,) if legacy else _FLOATS)
            if legacy:  # format 1 recorded no rank: the factor A (rank x n) says it
                shape_a = ckpt.spec(part_name(name, "A")).shape if part_name(name, "A") in ckpt else None
                if shape_a is None:
                    raise corrupt(ckpt, name, "lacks its stored part 'A'")
                rank, scaling, cls = (shape_a[0] if len(shape_a) == 2 else 0), 1.0, ProductTensor
                if not 1 <= rank <= max_rank(spec.shape):
                    raise corrupt(ckpt, name, f"has part 'A' of shape {list(shape_a)}: its rank is not in [1, {max_rank(spec.shape)}]")
            else:
                rank, scaling, cls = entry_int(ckpt, name, entry, "rank", 1, max_rank(spec.shape)), entry_number(ckpt, name, entry, "scaling"), LowRankTensor
            left = check_part(ckpt, name, left_part, (m, rank), dtypes)
            right = check_part(ckpt, name, right_part, (rank, n), dtypes)
            claimed.update((left, right))
            stored = ckpt.spec(left).nbytes + ckpt.spec(right).nbytes
            low_rank[name] = cls(spec.shape, rank, scaling, _getter(ckpt, left), _getter(ckpt, right), spec.dtype, stored)
        else:
            raise corrupt(ckpt, name, f"has encoding {encoding!r}, not one of zero, dense, lowrank")
    refuse_unclaimed(ckpt, claimed)
    return LowRankCheckpoint(low_rank, dense, ckpt.metadata(), ckpt.source, files=[ckpt], stored=ckpt)


def read_lora_layout(ckpt: SafetensorsCheckpoint) -> LowRankCheckpoint:
    """A file of the format-1 ``lora`` layout (factors ``NAME.lowrank_left``/``NAME.lowrank_right``,
    a ``taskvec.low_rank`` table of shape, rank and scaling) as its dense float32 view."""
    low_rank: dict[str, LowRankTensor] = {}
    claimed: set[str] = set()
    for name, entry in layout_table(ckpt, meta_keys.LOW_RANK).items():
        shape = entry_shape(ckpt, name, entry)
        rank = entry_int(ckpt, name, entry, "rank", 0, max_rank(shape))
        scaling = entry_number(ckpt, name, entry, "scaling")
        if rank == 0:
            low_rank[name] = LowRankTensor(shape, 0)
            continue
        parts = []
        for suffix, want in ((LEGACY_LEFT_SUFFIX, (shape[0], rank)), (LEGACY_RIGHT_SUFFIX, (rank, shape[1]))):
            key = name + suffix
            if key not in ckpt:
                raise corrupt(ckpt, name, f"lacks its factor {key!r}")
            got = ckpt.spec(key)
            if got.shape != want or not got.is_floating_point:
                raise corrupt(ckpt, name, f"has factor {key!r} of shape {list(got.shape)} ({got.dtype}), expected floating point {list(want)}")
            parts.append(key)
        claimed.update(parts)
        stored = sum(ckpt.spec(k).nbytes for k in parts)
        low_rank[name] = LowRankTensor(shape, rank, scaling, _getter(ckpt, parts[0]), _getter(ckpt, parts[1]), stored_nbytes=stored)
    dense = {}
    for name in ckpt.keys():
        if name in claimed:
            continue
        if name in low_rank:
            raise corrupt(ckpt, name, "is stored both dense and as factors")
        dense[name] = DenseDelta(ckpt.spec(name), _getter(ckpt, name))
    return LowRankCheckpoint(low_rank, dense, ckpt.metadata(), ckpt.source, files=[ckpt], stored=ckpt)


register_layout(meta_keys.LOWRANK_LAYOUT, read_low_rank)
register_layout(meta_keys.LORA_LAYOUT, read_lora_layout)
