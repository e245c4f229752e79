"""Task vectors: ``tau = theta_finetuned - theta_base``, lazy and streaming.

A ``TaskVector`` is a linear combination of *terms*, each either a stored vector
(a safetensors checkpoint) or the difference of a fine-tune and its base. The
algebra (``+``, ``-``, scalar ``*`` and ``/``, ``sum``) only rewrites the terms;
tensors are computed one chunk at a time when they are needed (``save``,
``apply_to``, ``norm``, ``dot``), so nothing is ever held whole in memory.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from mlflow_taskvec.engine import metadata as meta_keys
from mlflow_taskvec.engine.checkpoint import Checkpoint, open_checkpoint
from mlflow_taskvec.engine.checks import finite_number
from mlflow_taskvec.engine.device import DeviceRunner, on_device, parse_device
from mlflow_taskvec.engine.io import TensorSpec
from mlflow_taskvec.engine.streaming import (
    CHUNK_ELEMENTS,
    STORAGE_DTYPES,
    check_finite,
    chunk_ranges,
    flat_slice,
    one_torch_thread,
    parse_dtype,
    release_free_memory,
)
from mlflow_taskvec.engine.merge import MergeResult, check_same_tensors, merge, merge_to
from mlflow_taskvec.engine.writer import CheckpointWriter
from mlflow_taskvec.errors import TaskVecError

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class _Term:
    weight: float
    stored: Checkpoint | None = None  # a saved task vector
    finetuned: Checkpoint | None = None  # or a fine-tune minus its base
    base: Checkpoint | None = None

    def chunk(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        if self.stored is not None:
            return self.stored.read_chunk(name, start, stop, dtype)
        ft = self.finetuned.read_chunk(name, start, stop, dtype)
        return torch.sub(ft, self.base.read_chunk(name, start, stop, dtype))

    def sources(self) -> list[Checkpoint]:
        return [self.stored] if self.stored is not None else [self.finetuned, self.base]


def _default_vector_dtype(dtype: torch.dtype) -> torch.dtype:
    # 16-bit deltas lose the precision that makes base + tau reproduce the fine-tune.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _select(names: Iterable[str], include: Sequence[str] | None, exclude: Sequence[str] | None) -> list[str]:
    out = []
    for n in names:
        if include and not any(fnmatch.fnmatchcase(n, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(n, p) for p in exclude):
            continue
        out.append(n)
    return out


class TaskVector:
    """A lazy task vector. Build one with ``TaskVector.extract`` or ``TaskVector.load``."""

    def __init__(
        self,
        terms: Sequence[_Term],
        specs: dict[str, TensorSpec],
        base_fingerprint: str,
        task: str | None = None,
        skipped: Sequence[str] = (),
    ):
        self._terms = tuple(terms)
        self._specs = dict(sorted(specs.items()))
        self.base_fingerprint = base_fingerprint
        self.task = task
        self.skipped = tuple(skipped)

    # -- construction -------------------------------------------------------------
    @classmethod
    def extract(
        cls,
        base,
        finetuned,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        task: str | None = None,
        dtype: "str | torch.dtype | None" = None,
    ) -> "TaskVector":
        """The task vector ``finetuned - base`` over their floating-point tensors.

        ``include``/``exclude`` are glob patterns on tensor names. Integer and bool
        buffers are skipped and listed in ``skipped``. Nothing is computed yet.
        """
        base_ckpt, ft_ckpt = open_checkpoint(base), open_checkpoint(finetuned)
        base_names, ft_names = set(base_ckpt.keys()), set(ft_ckpt.keys())
        if base_names != ft_names:
            missing = sorted(ft_names - base_names)
            if missing:
                raise TaskVecError(f"tensor {missing[0]!r} is in the fine-tune {ft_ckpt.source} but not in the base {base_ckpt.source}")
            extra = sorted(base_names - ft_names)
            raise TaskVecError(f"tensor {extra[0]!r} is in the base {base_ckpt.source} but not in the fine-tune {ft_ckpt.source}")
        out_dtype = parse_dtype(dtype, "dtype", STORAGE_DTYPES)
        specs: dict[str, TensorSpec] = {}
        skipped = []
        for name in sorted(base_names):
            b, f = base_ckpt.spec(name), ft_ckpt.spec(name)
            if b.shape != f.shape:
                raise TaskVecError(f"tensor {name!r} has shape {list(b.shape)} in the base but {list(f.shape)} in the fine-tune")
            if not (b.is_floating_point and f.is_floating_point):
                skipped.append(name)
                continue
            specs[name] = TensorSpec(out_dtype or _default_vector_dtype(b.dtype), b.shape)
        selected = _select(specs, include, exclude)
        if not selected:
            raise TaskVecError(f"no floating-point tensors of {base_ckpt.source} match the include/exclude patterns")
        skipped.extend(n for n in specs if n not in set(selected))
        specs = {n: specs[n] for n in selected}
        term = _Term(1.0, finetuned=ft_ckpt, base=base_ckpt)
        return cls([term], specs, base_ckpt.fingerprint(), task=task, skipped=sorted(skipped))

    @classmethod
    def load(cls, source) -> "TaskVector":
        """Open a saved task vector (a file, a directory or a Checkpoint) lazily."""
        ckpt = open_checkpoint(source)
        meta = ckpt.metadata()
        kind = meta.get(meta_keys.KIND, meta_keys.TASK_VECTOR)
        if kind != meta_keys.TASK_VECTOR:
            raise TaskVecError(f"{ckpt.source}: is a {kind} checkpoint, not a task vector")
        if meta_keys.BASE_FINGERPRINT not in meta:
            raise TaskVecError(f"{ckpt.source}: not a task vector (its metadata has no {meta_keys.BASE_FINGERPRINT})")
        for name in ckpt.keys():
            if not ckpt.spec(name).is_floating_point:
                raise TaskVecError(f"{ckpt.source}: tensor {name!r} of a task vector is not floating point")
        skipped = json.loads(meta.get(meta_keys.SKIPPED, "[]"))
        return cls(
            [_Term(1.0, stored=ckpt)],
            ckpt.specs(),
            meta[meta_keys.BASE_FINGERPRINT],
            task=meta.get(meta_keys.TASK) or None,
            skipped=skipped,
        )

    # -- description --------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> TensorSpec:
        return self._specs[name]

    @property
    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    @property
    def num_parameters(self) -> int:
        return sum(s.numel for s in self._specs.values())

    @property
    def terms(self) -> tuple[_Term, ...]:
        return self._terms

    def __repr__(self) -> str:
        label = f" {self.task!r}" if self.task else ""
        return f"<TaskVector{label}: {len(self._specs)} tensors, {self.num_parameters} parameters, base {self.base_fingerprint[:12]}>"

    # -- reading ------------------------------------------------------------------
    def chunk(self, name: str, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Entries [start, stop) of the flattened tensor ``name``; may be a read-only view."""
        out = None
        for term in self._terms:
            x = term.chunk(name, start, stop, dtype)
            if out is None:
                out = x if (term.weight == 1.0 and len(self._terms) == 1) else x * term.weight
            else:
                out.add_(x, alpha=term.weight)
        return out

    def get_tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        spec = self._specs[name]
        return self.chunk(name, 0, spec.numel, dtype).reshape(spec.shape)

    def check_finite(self, name: str, start: int, stop: int, values: torch.Tensor) -> None:
        """Refuse non-finite ``values`` (this vector's chunk), naming the input that holds them."""
        if values.numel() == 0 or bool(torch.isfinite(values.sum())):
            return
        for term in self._terms:
            for src in term.sources():
                check_finite(flat_slice(src.get_tensor(name), start, stop, values.dtype), lambda: f"tensor {name!r} of {src.source}")
        check_finite(values, lambda: f"tensor {name!r} of {self!r}")

    # -- algebra ------------------------------------------------------------------
    def _check_compatible(self, other: "TaskVector") -> None:
        if not isinstance(other, TaskVector):
            raise TypeError(f"cannot combine a TaskVector with {type(other).__name__}")
        if self.base_fingerprint != other.base_fingerprint:
            raise TaskVecError(
                f"task vectors come from different bases (base fingerprints {self.base_fingerprint[:16]} and {other.base_fingerprint[:16]})"
            )
        check_same_tensors(self, other)

    def _scaled(self, factor: float) -> "TaskVector":
        factor = finite_number(factor)
        terms = [_Term(t.weight * factor, t.stored, t.finetuned, t.base) for t in self._terms]
        return TaskVector(terms, self._specs, self.base_fingerprint, self.task, self.skipped)

    def __add__(self, other: "TaskVector") -> "TaskVector":
        if isinstance(other, (int, float)) and other == 0:
            return self
        self._check_compatible(other)
        task = " + ".join(t for t in (self.task, other.task) if t) or None
        return TaskVector(self._terms + other._terms, self._specs, self.base_fingerprint, task, self.skipped)

    def __radd__(self, other) -> "TaskVector":  # lets builtin sum() start from 0
        if isinstance(other, (int, float)) and other == 0:
            return self
        return self.__add__(other)

    def __neg__(self) -> "TaskVector":
        return self._scaled(-1.0)

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        return self + (-other)

    def __mul__(self, factor: float) -> "TaskVector":
        return self._scaled(factor)

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> "TaskVector":
        divisor = finite_number(divisor)
        if divisor == 0:
            raise TaskVecError("cannot divide a task vector by zero")
        return self._scaled(1.0 / divisor)

    @staticmethod
    def sum(vectors: Iterable["TaskVector"]) -> "TaskVector":
        vectors = list(vectors)
        if not vectors:
            raise TaskVecError("cannot sum an empty list of task vectors")
        total = vectors[0]
        for v in vectors[1:]:
            total = total + v
        return total

    # -- reductions ---------------------------------------------------------------
    def _reduce(self, other: "TaskVector | None") -> tuple[float, float, float]:
        """(self.self, other.other, self.other) in float64, streaming."""
        if other is not None:
            self._check_compatible(other)
        aa = bb = ab = 0.0
        for name, spec in self._specs.items():
            for start, stop in chunk_ranges(spec.numel):
                a = self.chunk(name, start, stop, torch.float64)
                aa += float(torch.dot(a, a))
                if other is not None:
                    b = other.chunk(name, start, stop, torch.float64)
                    bb += float(torch.dot(b, b))
                    ab += float(torch.dot(a, b))
        return aa, bb, ab

    def norm(self) -> float:
        """The L2 norm over all tensors."""
        return math.sqrt(self._reduce(None)[0])

    def dot(self, other: "TaskVector") -> float:
        return self._reduce(other)[2]

    def cosine(self, other: "TaskVector") -> float:
        aa, bb, ab = self._reduce(other)
        if aa == 0 or bb == 0:
            raise TaskVecError("the cosine similarity of a zero task vector is undefined")
        return ab / math.sqrt(aa * bb)

    def tensor_norms(self) -> dict[str, float]:
        """The L2 norm of each tensor."""
        out = {}
        for name, spec in self._specs.items():
            sq = 0.0
            for start, stop in chunk_ranges(spec.numel):
                a = self.chunk(name, start, stop, torch.float64)
                sq += float(torch.dot(a, a))
            out[name] = math.sqrt(sq)
        return out

    # -- writing ------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        meta = {
            meta_keys.FORMAT_VERSION: FORMAT_VERSION,
            meta_keys.KIND: meta_keys.TASK_VECTOR,
            meta_keys.BASE_FINGERPRINT: self.base_fingerprint,
            meta_keys.SKIPPED: json.dumps(list(self.skipped)),
        }
        if self.task:
            meta[meta_keys.TASK] = self.task
        return meta

    def save(
        self,
        output: str | os.PathLike,
        dtype: "str | torch.dtype | None" = None,
        max_shard_size: int | str | None = None,
        overwrite: bool = False,
        allow_nonfinite: bool = False,
        progress=None,
        device: "str | torch.device | None" = None,
    ) -> str:
        """Stream the vector to ``output`` (a ``.safetensors`` file or a directory); returns its fingerprint.
        With ``device``, chunks are computed there (see ``engine.device``)."""
        out_dtype = parse_dtype(dtype, "dtype", STORAGE_DTYPES)
        target = parse_device(device)
        source, run = self, (lambda job: job())
        if target is not None:
            runner = DeviceRunner(target)
            source, run = on_device(self, runner), runner.run
        specs = {n: TensorSpec(out_dtype or s.dtype, s.shape) for n, s in self._specs.items()}
        compute = torch.float64 if any(s.dtype == torch.float64 for s in specs.values()) else torch.float32
        with CheckpointWriter(output, specs, self.metadata(), max_shard_size=max_shard_size, overwrite=overwrite) as writer, one_torch_thread():
            for name in writer.order:
                for start, stop in chunk_ranges(specs[name].numel):

                    def job(name=name, start=start, stop=stop):
                        values = source.chunk(name, start, stop, compute)
                        if not allow_nonfinite:
                            source.check_finite(name, start, stop, values)
                        return values.to(specs[name].dtype)

                    writer.write(name, run(job))
                if specs[name].numel > CHUNK_ELEMENTS:
                    release_free_memory()
                if progress is not None:
                    progress(name)
            return writer.commit()

    def apply_to(self, base, scale: float = 1.0, **options) -> dict[str, torch.Tensor]:
        """``base + scale * self`` as an in-memory state dict (options as for ``merge``)."""
        return merge(base, [self], [1.0], method="task_arithmetic", scale=scale, **options)

    def apply_to_output(self, base, output: str | os.PathLike, scale: float = 1.0, **options) -> MergeResult:
        """``base + scale * self`` streamed into ``output`` (options as for ``merge_to``)."""
        return merge_to(base, [self], [1.0], output, method="task_arithmetic", scale=scale, **options)
