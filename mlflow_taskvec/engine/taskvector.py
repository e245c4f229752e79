"""Task vectors: ``tau = theta_finetuned - theta_base``, lazy and streaming.

A ``TaskVector`` is a linear combination of *terms*, each either a stored vector
(a safetensors checkpoint) or the difference of a fine-tune and its base. The
algebra (``+``, ``-``, scalar ``*`` and ``/``, ``sum``) only rewrites the terms;
tensors are computed one chunk at a time when they are needed (``save``,
``apply_to``, ``norm``, ``dot``), so nothing is ever held whole in memory.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from mlflow_taskvec.engine import metadata as meta_keys
from mlflow_taskvec.engine.checkpoint import Checkpoint, is_adapter, open_checkpoint
from mlflow_taskvec.engine.checks import finite_number
from mlflow_taskvec.engine.device import DeviceCheckpoint, DeviceRunner, parse_device
from mlflow_taskvec.engine.io import TensorSpec
from mlflow_taskvec.engine.streaming import (
    CHUNK_ELEMENTS,
    STORAGE_DTYPES,
    OrderedPool,
    check_finite,
    check_finite_output,
    chunk_ranges,
    one_torch_thread,
    parse_dtype,
    parse_threads,
    release_free_memory,
)
from mlflow_taskvec.engine.lora import open_adapter, stores_conv1d
from mlflow_taskvec.engine.lowrank import LowRankCheckpoint, save_low_rank
from mlflow_taskvec.engine.merging import MergeResult, merge, merge_to, union_of_tensors
from mlflow_taskvec.engine.writer import CheckpointWriter
from mlflow_taskvec.errors import TaskVecError, TaskVecWarning

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class _Term:
    weight: float
    stored: Checkpoint | None = None  # a saved task vector
    finetuned: Checkpoint | None = None  # or a fine-tune minus its base
    base: Checkpoint | None = None
    absent: frozenset[str] = frozenset()  # tensors of the combination this term lacks: zero here

    def chunk(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        if name in self.absent:
            return torch.zeros(stop - start, dtype=dtype)
        if self.stored is not None:
            return self.stored.read_chunk(name, start, stop, dtype)
        ft = self.finetuned.read_chunk(name, start, stop, dtype)
        return torch.sub(ft, self.base.read_chunk(name, start, stop, dtype))

    def sources(self) -> list[Checkpoint]:
        return [self.stored] if self.stored is not None else [self.finetuned, self.base]

    def of_conv1d_base(self) -> bool:
        """Whether this term's base is GPT-2-style: its ``config.json`` says so (``lora.stores_conv1d``),
        or a saved vector's metadata recorded it (``taskvec.base_conv1d``)."""
        if self.stored is not None:
            return self.stored.metadata().get(meta_keys.BASE_CONV1D) == "true"
        return stores_conv1d(self.base)


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

        ``include``/``exclude`` are glob patterns on tensor names, applied before the
        two sides' names are compared. Integer and bool buffers are skipped and listed
        in ``skipped``, also when only one side has them. ``finetuned`` may be a PEFT
        LoRA adapter folder: its vector stays low-rank. Nothing is computed yet.
        """
        if _is_adapter(finetuned):
            if dtype is not None and parse_dtype(dtype, "dtype", STORAGE_DTYPES) != torch.float32:
                raise TaskVecError(f"dtype: {dtype!r}: the task vector of a LoRA adapter is float32 (save it with another dtype instead)")
            return cls.load(finetuned, base=base)._selected(include, exclude, task)
        base_ckpt, ft_ckpt = open_checkpoint(base), open_checkpoint(finetuned)
        for ckpt, role in ((ft_ckpt, "fine-tuned checkpoint"), (base_ckpt, "base checkpoint")):
            if ckpt.metadata().get(meta_keys.KIND) == meta_keys.TASK_VECTOR:
                raise TaskVecError(
                    f"{ckpt.source}: is a task vector, not a {role} (in a recipe, use vector: instead of finetuned:)"
                )
        base_names = set(_select(base_ckpt.keys(), include, exclude))
        ft_names = set(_select(ft_ckpt.keys(), include, exclude))
        skipped = []
        for name in sorted(base_names ^ ft_names):
            (side, where), (other_side, other) = (("fine-tune", ft_ckpt), ("base", base_ckpt))[:: 1 if name in ft_names else -1]
            if where.spec(name).is_floating_point:
                raise TaskVecError(f"tensor {name!r} is in the {side} {where.source} but not in the {other_side} {other.source}")
            skipped.append(name)  # a buffer one side's save dropped (transformers 5 drops position_ids)
        out_dtype = parse_dtype(dtype, "dtype", STORAGE_DTYPES)
        specs: dict[str, TensorSpec] = {}
        for name in sorted(base_names & ft_names):
            b, f = base_ckpt.spec(name), ft_ckpt.spec(name)
            if b.shape != f.shape:
                raise TaskVecError(f"tensor {name!r} has shape {list(b.shape)} in the base but {list(f.shape)} in the fine-tune")
            if not (b.is_floating_point and f.is_floating_point):
                skipped.append(name)
                continue
            specs[name] = TensorSpec(out_dtype or _default_vector_dtype(b.dtype), b.shape)
        if not specs:
            if include or exclude:
                raise TaskVecError(f"no floating-point tensors of {base_ckpt.source} match the include/exclude patterns")
            raise TaskVecError(f"{base_ckpt.source}: has no floating-point tensors, so there is no task vector to extract")
        skipped = sorted({*skipped, *(n for n in base_ckpt.keys() if n not in specs)})
        term = _Term(1.0, finetuned=ft_ckpt, base=base_ckpt)
        return cls([term], specs, base_ckpt.fingerprint(), task=task, skipped=sorted(skipped))

    @classmethod
    def load(cls, source, base=None) -> "TaskVector":
        """Open a saved task vector (a file, a directory or a Checkpoint) lazily.

        ``source`` may be a PEFT LoRA adapter folder, the task vector of ``base`` (by default
        the adapter's ``base_model_name_or_path``, when that is a local folder).
        """
        if _is_adapter(source) and not isinstance(source, Checkpoint):
            source = open_adapter(source, base)
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

    def _selected(self, include, exclude, task) -> "TaskVector":
        """This vector restricted to the names the globs select (the rest listed as skipped)."""
        names = _select(self._specs, include, exclude)
        if not names:
            raise TaskVecError(f"no floating-point tensors of {self!r} match the include/exclude patterns")
        skipped = sorted({*self.skipped, *(n for n in self._specs if n not in set(names))})
        return TaskVector(self._terms, {n: self._specs[n] for n in names}, self.base_fingerprint, task or self.task, skipped)

    # -- description --------------------------------------------------------------
    @property
    def of_conv1d_base(self) -> bool:
        """Whether the base stores its weights as Conv1D, ``(in, out)`` (GPT-2's layout, ``lora.stores_conv1d``):
        read from the base folder a vector is extracted from, or from a saved vector's ``taskvec.base_conv1d``.
        A saved vector records it (only then: every other vector's header is as it was), so
        ``export_lora`` without the base still writes a ``fan_in_fan_out`` adapter of it."""
        return any(term.of_conv1d_base() for term in self._terms)

    @property
    def low_rank_source(self):
        """The low-rank checkpoint this vector is, unscaled, or None (then it is stored dense)."""
        if len(self._terms) == 1 and self._terms[0].weight == 1.0 and isinstance(self._terms[0].stored, LowRankCheckpoint):
            return self._terms[0].stored
        return None

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

    @property
    def source(self) -> str:
        """Where the vector comes from, for messages: its file, or its fine-tune's; what it combines."""
        parts = [t.stored.source if t.stored is not None else t.finetuned.source for t in self._terms]
        return parts[0] if len(parts) == 1 else f"{parts[0]} + {len(parts) - 1} more"

    def with_tensors(self, specs: dict[str, TensorSpec]) -> "TaskVector":
        """This vector over ``specs``' tensors too: those it lacks count as zero.

        That is what a vector filtered with ``include``/``exclude`` means: it leaves
        those tensors as they are. ``specs`` must agree with the vector's own shapes.
        """
        missing = frozenset(specs) - frozenset(self._specs)
        if not missing:
            return self
        terms = [replace(t, absent=t.absent | missing) for t in self._terms]
        return TaskVector(terms, {**specs, **self._specs}, self.base_fingerprint, self.task, self.skipped)

    def on_device(self, runner: DeviceRunner) -> "TaskVector":
        """This vector reading its chunks through ``DeviceCheckpoint``s (see ``engine.device``)."""

        def moved(ckpt):
            return None if ckpt is None else DeviceCheckpoint(ckpt, runner)

        terms = [replace(t, stored=moved(t.stored), finetuned=moved(t.finetuned), base=moved(t.base)) for t in self._terms]
        return TaskVector(terms, self._specs, self.base_fingerprint, self.task, self.skipped)

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
                check_finite(src.read_chunk(name, start, stop, values.dtype), lambda: f"tensor {name!r} of {src.source}")
        check_finite(values, lambda: f"tensor {name!r} of {self!r}")

    # -- algebra ------------------------------------------------------------------
    def _aligned_with(self, other: "TaskVector") -> tuple["TaskVector", "TaskVector"]:
        """Both vectors over the union of their tensors (see ``with_tensors``), same base checked."""
        if not isinstance(other, TaskVector):
            raise TypeError(f"cannot combine a TaskVector with {type(other).__name__}")
        if self.base_fingerprint != other.base_fingerprint:
            raise TaskVecError(
                f"task vectors come from different bases (base fingerprints {self.base_fingerprint[:16]} and {other.base_fingerprint[:16]})"
            )
        specs = union_of_tensors([self, other])
        return self.with_tensors(specs), other.with_tensors(specs)

    def _check_compatible(self, other: "TaskVector") -> None:
        self._aligned_with(other)

    def _scaled(self, factor: float) -> "TaskVector":
        factor = finite_number(factor)
        terms = [replace(t, weight=t.weight * factor) for t in self._terms]
        return TaskVector(terms, self._specs, self.base_fingerprint, self.task, self.skipped)

    def __add__(self, other: "TaskVector") -> "TaskVector":
        if isinstance(other, (int, float)) and other == 0:
            return self
        a, b = self._aligned_with(other)
        task = " + ".join(t for t in (self.task, other.task) if t) or None
        return TaskVector(a._terms + b._terms, a._specs, self.base_fingerprint, task, self.skipped)

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
        this = self
        if other is not None:
            this, other = self._aligned_with(other)
        aa = bb = ab = 0.0
        for name, spec in this._specs.items():
            for start, stop in chunk_ranges(spec.numel):
                a = this.chunk(name, start, stop, torch.float64)
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
            zero = self if aa == 0 else other
            raise TaskVecError(f"{zero.source}: the task vector is all zeros, so its cosine similarity is undefined")
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
        if self.of_conv1d_base:
            meta[meta_keys.BASE_CONV1D] = "true"
        return meta

    def save(
        self,
        output: str | os.PathLike,
        dtype: "str | torch.dtype | None" = None,
        max_shard_size: int | str | None = None,
        overwrite: bool = False,
        allow_nonfinite: bool = False,
        progress=None,
        dense: bool = False,
        device: "str | torch.device | None" = None,
        threads: int | None = None,
    ) -> str:
        """Stream the vector to ``output`` (a ``.safetensors`` file or a directory); returns its fingerprint.
        With ``device``, chunks are computed there (see ``engine.device``); otherwise on ``threads``
        compute threads (default: the machine's cores). The output is the same bits for any number:
        each chunk is computed alone and written in order.

        A vector that came from a LoRA adapter (unscaled, uncombined) is saved as its
        factors unless ``dense``, a 16-bit ``dtype`` or ``max_shard_size`` asks otherwise;
        the fingerprint is the dense vector's either way.
        """
        out_dtype = parse_dtype(dtype, "dtype", STORAGE_DTYPES)
        low_rank = self.low_rank_source
        if low_rank is not None and not dense and out_dtype in (None, torch.float32) and max_shard_size is None:
            kept = low_rank.subset(self.names)
            if not allow_nonfinite:
                kept.check_finite()
            save_low_rank(kept, output, self.metadata(), overwrite=overwrite, progress=progress)
            return kept.fingerprint()
        target = parse_device(device)
        workers = parse_threads(threads) if target is None else 1  # a device computes one chunk at a time
        source, run = self, (lambda job: job())
        if target is not None:
            runner = DeviceRunner(target)
            source, run = self.on_device(runner), runner.run
        specs = {n: TensorSpec(out_dtype or s.dtype, s.shape) for n, s in self._specs.items()}
        compute = torch.float64 if any(s.dtype == torch.float64 for s in specs.values()) else torch.float32
        inputs = [src for term in self._terms for src in term.sources()]
        nonzero: list[str] = []  # the first tensor seen not all zero (jobs may run on another thread)
        with (
            CheckpointWriter(output, specs, self.metadata(), max_shard_size=max_shard_size, overwrite=overwrite, inputs=inputs) as writer,
            one_torch_thread(),
            OrderedPool(writer, workers=workers) as pool,
        ):
            for name in writer.order:
                for start, stop in chunk_ranges(specs[name].numel):

                    def job(name=name, start=start, stop=stop):
                        values = source.chunk(name, start, stop, compute)
                        if not nonzero and bool(values.any()):
                            nonzero.append(name)
                        stored = values.to(specs[name].dtype)
                        if not allow_nonfinite:
                            source.check_finite(name, start, stop, values)
                            if stored.dtype != values.dtype:
                                check_finite_output(stored, name, start, specs[name].numel)
                        return stored

                    pool.submit(name, functools.partial(run, job))
                if specs[name].numel > CHUNK_ELEMENTS:
                    release_free_memory()
                pool.then(name, progress)
            pool.drain()
            fingerprint = writer.commit()
        if not nonzero:
            warnings.warn(
                TaskVecWarning(f"{output}: the task vector is all zeros: the fine-tune {self.source} equals its base on every tensor it covers"),
                stacklevel=2,
            )
        return fingerprint

    def apply_to(self, base, scale: float = 1.0, **options) -> dict[str, torch.Tensor]:
        """``base + scale * self`` as an in-memory state dict (options as for ``merge``)."""
        return merge(base, [self], [1.0], method="task_arithmetic", scale=scale, **options)

    def apply_to_output(self, base, output: str | os.PathLike, scale: float = 1.0, **options) -> MergeResult:
        """``base + scale * self`` streamed into ``output`` (options as for ``merge_to``)."""
        return merge_to(base, [self], [1.0], output, method="task_arithmetic", scale=scale, **options)


def _is_adapter(source) -> bool:
    """A PEFT LoRA adapter folder, or one already opened (a task vector, not a fine-tune)."""
    if isinstance(source, Checkpoint):
        return meta_keys.ADAPTER in source.metadata()
    return is_adapter(source)
