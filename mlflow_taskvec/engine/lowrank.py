"""Low-rank task vectors: deltas held as factors, densified one tensor at a time.

A low-rank tensor is ``delta = scaling * (left @ right)`` with ``left`` of shape
``(rows, rank)`` and ``right`` of shape ``(rank, cols)``; a rank-0 tensor is all
zeros and stores nothing. A ``LowRankCheckpoint`` presents such factors (and
any dense deltas beside them) as the dense float32 tensors they stand for, so
everything that reads a checkpoint (fingerprints, norms, merges) sees the dense
vector, and the same delta stored dense or low-rank has one fingerprint.

Densification is canonical: every entry is ``sum_k left[i, k] * right[k, j]``
accumulated in float64 in the order ``k = 0, 1, ...`` (each product of two
float32 numbers is exact in float64, so fused or unfused multiply-adds agree),
times ``scaling`` in float64, rounded once to float32. An entry therefore never
depends on which rows are computed together, on threads or on the BLAS, and a
chunk computed on its own equals the same slice of the whole tensor, bit for bit.

The stored layout (``taskvec.layout = lora``) is one safetensors file with
``NAME.lowrank_left`` and ``NAME.lowrank_right`` per low-rank tensor, ``NAME`` for a
dense one, and ``taskvec.low_rank`` in the metadata: per tensor its shape, rank
and scaling.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mlflow_taskvec.engine import metadata as meta_keys
from mlflow_taskvec.engine.checkpoint import Checkpoint, SafetensorsCheckpoint
from mlflow_taskvec.engine.io import TensorSpec, tensor_bytes
from mlflow_taskvec.engine.streaming import check_finite, flat_slice
from mlflow_taskvec.engine.writer import CheckpointWriter
from mlflow_taskvec.errors import TaskVecError

LEFT_SUFFIX = ".lowrank_left"
RIGHT_SUFFIX = ".lowrank_right"
DENSE_DTYPE = torch.float32


@dataclass(frozen=True)
class DenseDelta:
    """A dense delta: ``value - minus`` in float32 (a saved tensor minus the base's),
    plus ``scaling * addend`` rounded to float32, each term optional but ``value``."""

    spec: TensorSpec
    value: Callable[[], torch.Tensor]
    minus: Callable[[], torch.Tensor] | None = None
    addend: Callable[[], torch.Tensor] | None = None
    scaling: float = 1.0

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        out = flat_slice(self.value(), start, stop, DENSE_DTYPE)
        if self.minus is not None:
            out = torch.sub(out, flat_slice(self.minus(), start, stop, DENSE_DTYPE))
        if self.addend is not None:
            extra = flat_slice(self.addend(), start, stop, torch.float64).mul(self.scaling).to(DENSE_DTYPE)
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

    @property
    def numel(self) -> int:
        return TensorSpec(DENSE_DTYPE, self.shape).numel

    def rows(self, first: int, last: int) -> torch.Tensor:
        """Rows [first, last) of the dense float32 delta (rank > 0; see the module docstring)."""
        left = self.left()[first:last].to(torch.float64)
        right = self.right().to(torch.float64)
        acc = left[:, 0:1] * right[0:1, :]
        for k in range(1, self.rank):
            acc.addcmul_(left[:, k : k + 1], right[k : k + 1, :])
        return acc.mul_(self.scaling).to(DENSE_DTYPE)

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        """Entries [start, stop) of the flattened dense delta, computing only the rows they touch."""
        if self.rank == 0 or stop <= start:
            return torch.zeros(max(0, stop - start), dtype=DENSE_DTYPE)
        cols = self.shape[1]
        first, last = start // cols, -(-stop // cols)
        return self.rows(first, last).reshape(-1)[start - first * cols : stop - first * cols]

    def dense(self) -> torch.Tensor:
        if self.rank == 0:
            return torch.zeros(self.shape, dtype=DENSE_DTYPE)
        return self.rows(0, self.shape[0])

    @property
    def stored_nbytes(self) -> int:
        if self.rank == 0:
            return 0
        return sum(t().numel() * t().element_size() for t in (self.left, self.right))


class LowRankCheckpoint(Checkpoint):
    """A task vector held as low-rank tensors (and dense deltas), read as its dense float32 tensors."""

    def __init__(
        self,
        low_rank: dict[str, LowRankTensor],
        dense: dict[str, DenseDelta],
        metadata: dict[str, str],
        source: str,
        files: Sequence[SafetensorsCheckpoint] = (),
    ):
        overlap = sorted(set(low_rank) & set(dense))
        if overlap:
            raise TaskVecError(f"{source}: tensor {overlap[0]!r} is both low-rank and dense")
        self.source = source
        self.low_rank = dict(low_rank)
        self._dense = dict(dense)
        self._metadata = dict(metadata)
        self._files = list(files)
        self._keys = sorted([*self.low_rank, *self._dense])

    # -- the Checkpoint interface: the dense vector -----------------------------------
    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self.low_rank or name in self._dense

    def spec(self, name: str) -> TensorSpec:
        if name in self.low_rank:
            return TensorSpec(DENSE_DTYPE, self.low_rank[name].shape)
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
                parts = [("delta", lambda n=name: self.read_chunk(n, 0, self.spec(n).numel, DENSE_DTYPE))]
            for label, get in parts:
                check_finite(get().reshape(-1).to(DENSE_DTYPE), lambda: f"{label} factor of tensor {name!r} of {self.source}")


    def rank(self, name: str) -> int | None:
        """The rank of a low-rank tensor; None for a dense one."""
        return self.low_rank[name].rank if name in self.low_rank else None

    @property
    def stored_bytes(self) -> int:
        """Bytes the factors and dense deltas take (what the lora layout stores)."""
        return sum(self.low_rank[n].stored_nbytes if n in self.low_rank else self.spec(n).nbytes for n in self._keys)

    def dense_nbytes(self, names: Sequence[str] | None = None) -> int:
        names = self._keys if names is None else names
        return sum(self.spec(n).nbytes for n in names)

    def subset(self, names: Sequence[str], metadata: dict[str, str] | None = None) -> "LowRankCheckpoint":
        keep = set(names)
        return LowRankCheckpoint(
            {n: t for n, t in self.low_rank.items() if n in keep},
            {n: e for n, e in self._dense.items() if n in keep},
            self._metadata if metadata is None else metadata,
            self.source,
        )


def is_low_rank_file(metadata: dict[str, str]) -> bool:
    return metadata.get(meta_keys.LAYOUT) == meta_keys.LORA_LAYOUT


def read_low_rank(ckpt: SafetensorsCheckpoint) -> LowRankCheckpoint:
    """The low-rank layout stored in ``ckpt`` (a file whose metadata says ``taskvec.layout: low_rank``)."""
    meta = ckpt.metadata()
    try:
        table = json.loads(meta[meta_keys.LOW_RANK])
        if not isinstance(table, dict):
            raise TypeError
    except (KeyError, json.JSONDecodeError, TypeError):
        raise TaskVecError(f"{ckpt.source}: a low-rank task vector needs a JSON object in its {meta_keys.LOW_RANK} metadata") from None
    low_rank: dict[str, LowRankTensor] = {}
    factor_names = set()
    for name, entry in table.items():
        try:
            shape, rank, scaling = tuple(int(d) for d in entry["shape"]), int(entry["rank"]), float(entry["scaling"])
        except (KeyError, TypeError, ValueError):
            raise TaskVecError(f"{ckpt.source}: {meta_keys.LOW_RANK} entry {name!r} needs shape, rank and scaling") from None
        if rank == 0:
            low_rank[name] = LowRankTensor(shape, 0)
            continue
        left_name, right_name = name + LEFT_SUFFIX, name + RIGHT_SUFFIX
        for factor, want in ((left_name, (shape[0], rank)), (right_name, (rank, shape[-1]))):
            if factor not in ckpt:
                raise TaskVecError(f"{ckpt.source}: low-rank tensor {name!r} has no factor {factor!r}")
            got = ckpt.spec(factor)
            if len(shape) != 2 or got.shape != want or not got.is_floating_point:
                raise TaskVecError(
                    f"{ckpt.source}: factor {factor!r} has shape {list(got.shape)} ({got.dtype}), expected floating point {list(want)}"
                )
        factor_names.update((left_name, right_name))
        low_rank[name] = LowRankTensor(
            shape, rank, scaling, left=_getter(ckpt, left_name), right=_getter(ckpt, right_name)
        )
    dense = {}
    for name in ckpt.keys():
        if name in factor_names:
            continue
        if name in low_rank:
            raise TaskVecError(f"{ckpt.source}: tensor {name!r} is stored both dense and as factors")
        dense[name] = DenseDelta(ckpt.spec(name), _getter(ckpt, name))
    return LowRankCheckpoint(low_rank, dense, meta, ckpt.source, files=[ckpt])


def _getter(ckpt: Checkpoint, name: str) -> Callable[[], torch.Tensor]:
    return lambda: ckpt.get_tensor(name)


def save_low_rank(
    ckpt: LowRankCheckpoint,
    output: "str | os.PathLike",
    metadata: dict[str, str],
    overwrite: bool = False,
    progress=None,
) -> None:
    """Write ``ckpt`` in the low-rank layout: its factors as they are, dense deltas as float32."""
    specs: dict[str, TensorSpec] = {}
    table = {}
    sources: dict[str, Callable[[], torch.Tensor]] = {}
    for name in ckpt.keys():
        if name in ckpt.low_rank:
            t = ckpt.low_rank[name]
            table[name] = {"shape": list(t.shape), "rank": t.rank, "scaling": t.scaling}
            if t.rank:
                for suffix, get in ((LEFT_SUFFIX, t.left), (RIGHT_SUFFIX, t.right)):
                    value = get()
                    specs[name + suffix] = TensorSpec(value.dtype, tuple(value.shape))
                    sources[name + suffix] = get
        else:
            specs[name] = ckpt.spec(name)
            sources[name] = (lambda n=name: ckpt.get_tensor(n))
    meta = {**metadata, meta_keys.LAYOUT: meta_keys.LORA_LAYOUT, meta_keys.LOW_RANK: json.dumps(table, sort_keys=True)}
    with CheckpointWriter(output, specs, meta, overwrite=overwrite) as writer:
        for name in writer.order:
            writer.write(name, sources[name]().contiguous())
        writer.commit()
    if progress is not None:
        for name in ckpt.keys():
            progress(name)
