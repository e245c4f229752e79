"""Composing a model: ``base + scale * method(w_i, t_i)``, streamed tensor by tensor."""

from __future__ import annotations

import fnmatch
import functools
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mlflow_taskvec.engine import metadata as meta_keys
from mlflow_taskvec.engine.checkpoint import open_checkpoint
from mlflow_taskvec.engine.coefficients import DEFAULT_GLOB, Coefficient, check_coefficient, coefficient_for
from mlflow_taskvec.engine.device import DeviceCheckpoint, DeviceRunner, parse_device
from mlflow_taskvec.engine.io import TensorSpec
from mlflow_taskvec.engine.methods import MergeContext, get_method, validate_params
from mlflow_taskvec.engine.streaming import (
    CHUNK_ELEMENTS,
    COMPUTE_DTYPES,
    STORAGE_DTYPES,
    OrderedPool,
    check_finite,
    check_finite_output,
    chunk_ranges,
    flat_slice,
    one_torch_thread,
    parse_dtype,
    parse_threads,
    release_free_memory,
    reuse_freed_memory,
)
from mlflow_taskvec.engine.output import OutputClaim
from mlflow_taskvec.engine.writer import CheckpointWriter, MemorySink
from mlflow_taskvec.errors import TaskVecError, TaskVecWarning

if TYPE_CHECKING:  # the task vector module builds on this one, not the other way round
    from mlflow_taskvec.engine.taskvector import TaskVector

# Elementwise sums stream best in chunks that stay in the CPU's cache.
LINEAR_CHUNK = 1 << 18
# A tensor a method takes whole and that is larger than this (entries) is computed alone.
WHOLE_ALONE = 8 * CHUNK_ELEMENTS


@dataclass
class MergeResult:
    """What ``merge_to`` wrote."""

    method: str
    scale: Coefficient
    weights: list[Coefficient]
    params: dict
    base_fingerprint: str
    num_tensors: int
    num_parameters: int
    seconds: float
    output: Path
    fingerprint: str


def merge(
    base,
    vectors: "Sequence[TaskVector]",
    weights: Sequence[Coefficient],
    method: str = "task_arithmetic",
    scale: Coefficient = 1.0,
    params: dict | None = None,
    dtype: "str | torch.dtype | None" = None,
    compute_dtype: "str | torch.dtype" = "float32",
    allow_nonfinite: bool = False,
    progress: Callable[[str], None] | None = None,
    device: "str | torch.device | None" = None,
    threads: int | None = None,
) -> dict[str, torch.Tensor]:
    """``base + scale * method(weights, vectors)`` as an in-memory state dict.

    Tensors of the base that the vectors do not cover (integer buffers, excluded
    names) are copied unchanged. The output dtype is the base's unless ``dtype``
    is set; arithmetic runs in ``compute_dtype`` (float32 or float64), on ``device``
    (``cpu``, ``cuda``, ``cuda:N`` or ``auto``; see ``engine.device``) when it is given.
    A weight or the scale may be a number or a mapping of tensor-name globs to numbers
    (``engine.coefficients``: first match wins, ``"*"`` the default). ``threads`` compute
    threads run independent chunks and tensors (default: the machine's cores); the
    output is the same bits for any number.
    """
    plan = _plan(base, vectors, weights, method, scale, params, dtype, compute_dtype, device, threads)
    return _execute(plan, MemorySink(plan.specs), allow_nonfinite, progress)


def merge_to(
    base,
    vectors: "Sequence[TaskVector]",
    weights: Sequence[Coefficient],
    output: str | os.PathLike,
    method: str = "task_arithmetic",
    scale: Coefficient = 1.0,
    params: dict | None = None,
    dtype: "str | torch.dtype | None" = None,
    compute_dtype: "str | torch.dtype" = "float32",
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    metadata: dict[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
    device: "str | torch.device | None" = None,
    threads: int | None = None,
    extra_files: "Callable[[str], dict[str, str]] | None" = None,
) -> MergeResult:
    """Compose ``base + scale * method(weights, vectors)`` into ``output``, streamed tensor by tensor.

    ``extra_files(fingerprint)``: a folder output's text files (its model card), in place before the final move.

    ``output`` is a ``.safetensors`` file or a folder (shards with ``max_shard_size``;
    the base folder's other files are copied beside the weights); it is written under a
    temporary name and moved into place when complete. Arguments as for ``merge``.
    """
    started = time.perf_counter()
    claim = OutputClaim(output, overwrite)  # locked from now on; the writer takes it over
    sink = None
    try:
        plan = _plan(base, vectors, weights, method, scale, params, dtype, compute_dtype, device, threads)
        metadata = {meta_keys.KIND: meta_keys.COMPOSITE, **(metadata or {}), meta_keys.BASE_FINGERPRINT: plan.base_fingerprint}
        inputs = [plan.base, *(src for v in plan.vectors for term in v.terms for src in term.sources())]
        sink = CheckpointWriter(
            claim, plan.specs, metadata, max_shard_size=max_shard_size, copy_files_from=plan.base.directory, inputs=inputs,
            extra_files=extra_files,
        )
        fingerprint = _execute(plan, sink, allow_nonfinite, progress)
    except BaseException:
        # abort() is idempotent; it also covers a signal between the writer's creation and _execute's own guard
        if sink is not None:
            sink.abort()
        else:
            claim.release()
        raise
    return MergeResult(
        method=plan.method.name,
        scale=plan.scale,
        weights=plan.weights,
        params=plan.params,
        base_fingerprint=plan.base_fingerprint,
        num_tensors=len(plan.specs),
        num_parameters=sum(s.numel for s in plan.specs.values()),
        seconds=time.perf_counter() - started,
        output=Path(output),
        fingerprint=fingerprint,
    )


@dataclass
class _Plan:
    """A checked merge: what every output tensor is and how it is computed."""

    base: object  # Checkpoint
    base_fingerprint: str
    vectors: list
    weights: list[Coefficient]
    method: object  # MergeMethod
    scale: Coefficient
    params: dict
    compute: torch.dtype
    specs: dict[str, TensorSpec]
    covered: set[str]
    # per covered tensor: each input's weight and the scale, resolved from the coefficients
    tensor_weights: dict[str, list[float]]
    tensor_scale: dict[str, float]
    device: torch.device | None = None
    threads: int = 1


def _plan(base, vectors, weights, method, scale, params, dtype, compute_dtype, device=None, threads=None) -> _Plan:
    merge_method = get_method(method)
    params = validate_params(merge_method, dict(params or {}))
    scale = check_coefficient(scale, "scale")
    if not vectors:
        raise TaskVecError("no task vectors to merge: the vector list is empty")
    merge_method.check_input_count(len(vectors))
    if len(weights) != len(vectors):
        raise TaskVecError(f"{len(vectors)} task vectors but {len(weights)} weights")
    weights = [check_coefficient(w, f"vectors[{i}].weight") for i, w in enumerate(weights)]
    out_dtype = parse_dtype(dtype, "dtype", STORAGE_DTYPES)
    compute = parse_dtype(compute_dtype, "compute_dtype", COMPUTE_DTYPES)
    device = parse_device(device)
    threads = parse_threads(threads)

    base_ckpt = open_checkpoint(base)
    base_fp = base_ckpt.fingerprint()
    for i, v in enumerate(vectors):
        if v.base_fingerprint != base_fp:
            raise TaskVecError(
                f"vectors[{i}] was extracted from a different base (its base fingerprint {v.base_fingerprint[:16]}, this base {base_fp[:16]})"
            )
    vector_specs = union_of_tensors(vectors)
    missing = sorted(set(vector_specs) - set(base_ckpt.keys()))
    if missing:
        i = next(i for i, v in enumerate(vectors) if missing[0] in v.names)
        raise TaskVecError(f"tensor {missing[0]!r} of {_label(vectors[i], i)} is not in the base {base_ckpt.source}")
    specs: dict[str, TensorSpec] = {}
    for name in base_ckpt.keys():
        spec = base_ckpt.spec(name)
        if name in vector_specs:
            if spec.shape != vector_specs[name].shape:
                i = next(i for i, v in enumerate(vectors) if name in v.names)
                raise TaskVecError(
                    f"tensor {name!r} has shape {list(spec.shape)} in the base but {list(vector_specs[name].shape)} in {_label(vectors[i], i)}"
                )
            specs[name] = TensorSpec(out_dtype or spec.dtype, spec.shape)
        else:
            specs[name] = TensorSpec(out_dtype if (out_dtype and spec.is_floating_point) else spec.dtype, spec.shape)
    _warn_zero_inputs(vectors)
    # A tensor some inputs lack counts as zero in them (what filtering one input means).
    vectors = [v.with_tensors(vector_specs) for v in vectors]
    covered = set(vector_specs)
    names = sorted(covered)
    tensor_weights = {n: [coefficient_for(w, n, f"vectors[{i}].weight") for i, w in enumerate(weights)] for n in names}
    tensor_scale = {n: coefficient_for(scale, n, "scale") for n in names}
    _check_representable(tensor_weights, tensor_scale, compute)
    _warn_unused_globs(names, [("scale", scale)] + [(f"vectors[{i}].weight", w) for i, w in enumerate(weights)])
    return _Plan(
        base_ckpt, base_fp, vectors, weights, merge_method, scale, params, compute, specs, covered, tensor_weights, tensor_scale,
        device, threads,
    )


def _warn_unused_globs(names: list[str], coefficients: list[tuple[str, Coefficient]]) -> None:
    """One warning per glob of a per-layer coefficient that matches none of the merged tensors."""
    for what, value in coefficients:
        if not isinstance(value, dict):
            continue
        for glob in value:
            if glob != DEFAULT_GLOB and not any(fnmatch.fnmatchcase(n, glob) for n in names):
                warnings.warn(TaskVecWarning(f"{what}: the glob {glob!r} matches no tensor of the inputs, so its value {value[glob]:g} is unused"), stacklevel=4)


def _warn_zero_inputs(vectors: list["TaskVector"]) -> None:
    """One warning per input that is all zeros (e.g. a LoRA adapter with lora_alpha 0, or no weights): it changes
    nothing. Reading stops at an input's first nonzero chunk, so a usual input costs one chunk."""
    for i, v in enumerate(vectors):
        if not v.names:
            warnings.warn(TaskVecWarning(f"{_label(v, i)}: the task vector holds no tensors, so it changes nothing in the composite"), stacklevel=4)
        elif not any(bool(v.chunk(n, start, stop).any()) for n in sorted(v.names, key=lambda n: v.spec(n).numel) for start, stop in chunk_ranges(v.spec(n).numel)):
            warnings.warn(TaskVecWarning(f"{_label(v, i)}: the task vector is all zeros, so it changes nothing in the composite"), stacklevel=4)


def _check_representable(tensor_weights: dict[str, list[float]], tensor_scale: dict[str, float], compute: torch.dtype) -> None:
    """Refuse, before anything is computed, a scale or weight (or their product) beyond the compute dtype's range."""
    limit = torch.finfo(compute).max
    kind = str(compute).removeprefix("torch.")
    for name, scale in tensor_scale.items():
        if abs(scale) > limit:
            raise TaskVecError(f"scale: {scale:g} is beyond the largest {kind} ({limit:.3g}) for tensor {name!r}")
        for i, w in enumerate(tensor_weights[name]):
            if abs(w) > limit or abs(w * scale) > limit:
                product = f" (times scale {scale:g}: {w * scale:g})" if abs(w) <= limit else ""
                raise TaskVecError(f"vectors[{i}].weight: {w:g}{product} is beyond the largest {kind} ({limit:.3g}) for tensor {name!r}")


def _execute(plan: _Plan, sink, allow_nonfinite: bool, progress):
    """Stream every output tensor into ``sink`` (a CheckpointWriter or a MemorySink); returns its commit."""
    base_ckpt, specs, vectors = plan.base, plan.specs, plan.vectors
    reader, run = base_ckpt, None  # chunks are computed where they are read: on the host by default
    if plan.device is not None:
        runner = DeviceRunner(plan.device)
        reader, vectors, run = DeviceCheckpoint(base_ckpt, runner), [v.on_device(runner) for v in vectors], runner.run
    try:
        # Every chunk and every input's pre-pass is independent of the others and runs
        # single-threaded torch ops, so the output is the same bits for any thread count.
        # A device computes one job at a time on its runner's thread: a second worker
        # prepares task arithmetic's next chunk meanwhile, as before threads existed.
        workers = plan.threads if plan.device is None else (2 if plan.method.linear else 1)
        with one_torch_thread(), reuse_freed_memory(), OrderedPool(sink, workers=workers) as pool:
            for name in sink.order:
                spec = specs[name]
                base_tensor = base_ckpt.get_tensor(name)
                read_base = functools.partial(reader.read_chunk, name)
                if name not in plan.covered:
                    jobs = (
                        functools.partial(flat_slice, base_tensor, start, stop, spec.dtype)
                        for start, stop in chunk_ranges(spec.numel)
                    )
                elif plan.method.linear:
                    jobs = _linear_jobs(
                        name, spec, read_base, base_ckpt.source, vectors, plan.tensor_weights[name], plan.tensor_scale[name],
                        plan.compute, allow_nonfinite,
                    )
                else:
                    jobs = _method_jobs(
                        name, spec, base_tensor, read_base, base_ckpt.source, vectors, plan.tensor_weights[name], plan.method,
                        plan.tensor_scale[name], plan.params, plan.compute, allow_nonfinite, pool.map,
                    )
                # A large tensor that a method needs whole holds its T inputs and temporaries at
                # once: it runs alone, so the peak is one such tensor's, whatever the thread count.
                alone = (
                    name in plan.covered and not plan.method.linear and spec.numel > WHOLE_ALONE
                    and plan.method.takes_whole_tensor(name, tuple(spec.shape), plan.params)
                )
                if alone:
                    pool.drain()
                for job in jobs:
                    pool.submit(name, job if run is None or name not in plan.covered else functools.partial(run, job))
                if alone:
                    pool.drain()
                if spec.numel > CHUNK_ELEMENTS:
                    release_free_memory()
                pool.then(name, progress)
        return sink.commit()
    except BaseException:
        sink.abort()
        raise


def _linear_jobs(name, spec, read_base, base_source, vectors, weights, scale, compute, allow_nonfinite):
    """``base + scale * sum_i w_i t_i`` accumulated term by term into one buffer, in
    chunks small enough that the base's chunk stays in cache while every term uses it."""
    terms = [(scale * w * term.weight, term) for v, w in zip(vectors, weights) for term in v.terms if name not in term.absent]

    def job(start: int, stop: int) -> torch.Tensor:
        out = read_base(start, stop, compute).clone()
        for coef, term in terms:
            out.add_(term.chunk(name, start, stop, compute), alpha=coef)
        # NaN and Inf propagate through a weighted sum (even times 0), so a finite
        # result proves every input finite; only a non-finite one needs a closer look.
        if not allow_nonfinite and out.numel() and not bool(torch.isfinite(out.sum())):
            if not bool(torch.isfinite(out).all()):
                check_finite(read_base(start, stop, compute), lambda: f"tensor {name!r} of the base {base_source}")
                for _, term in terms:
                    for src in term.sources():
                        check_finite(src.read_chunk(name, start, stop, compute), lambda s=src: f"tensor {name!r} of {s.source}")
                check_finite_output(out, name, start, spec.numel)
        result = out.to(spec.dtype)
        if not allow_nonfinite and result.dtype != out.dtype:
            check_finite_output(result, name, start, spec.numel)
        return result

    for start, stop in chunk_ranges(spec.numel, LINEAR_CHUNK):
        yield functools.partial(job, start, stop)


def _method_jobs(name, spec, base_tensor, read_base, base_source, vectors, weights, method, scale, params, compute, allow_nonfinite,
                 run_all=None):
    """One job per chunk; a method's whole-tensor pre-pass (``prepare``) comes first, one input
    per job through ``run_all`` (each input's entry of the result depends on that input alone).
    A tensor the method needs whole is one job: it reads the T inputs of that tensor, and nothing else."""
    numel = spec.numel
    if numel == 0:
        yield lambda: base_tensor.to(spec.dtype)
        return
    shape = tuple(spec.shape)
    whole = method.takes_whole_tensor(name, shape, params)
    ranges = [(0, numel)] if whole else list(chunk_ranges(numel, method.chunk_elements(shape)))

    def job(start: int, stop: int, prepared, deltas=None) -> torch.Tensor:
        base_chunk = read_base(start, stop, compute)
        if deltas is None:
            deltas = [v.chunk(name, start, stop, compute) for v in vectors]
        if not allow_nonfinite:
            check_finite(base_chunk, lambda: f"tensor {name!r} of the base {base_source}")
            for v, d in zip(vectors, deltas):
                v.check_finite(name, start, stop, d)
        base_chunk, merged = _merged_chunk(method, name, start, numel, shape, whole, params, prepared, base_chunk, deltas, weights, compute)
        result = torch.add(base_chunk, merged, alpha=scale).reshape(-1).to(spec.dtype)
        if not allow_nonfinite:
            check_finite_output(result, name, start, numel)
        return result

    prepared = None
    if method.prepare is not None and len(ranges) > 1:
        inputs = [lambda v=v: ((a, v.chunk(name, a, b, compute)) for a, b in ranges) for v in vectors]
        per_input = [functools.partial(_prepare_one, method, name, numel, params, chunks, compute) for chunks in inputs]
        prepared = (run_all or (lambda jobs: [job() for job in jobs]))(per_input)
    for start, stop in ranges:
        yield functools.partial(job, start, stop, prepared)


def _merged_chunk(method, name, start, numel, shape, whole, params, prepared, base_chunk, deltas, weights, compute):
    """``(base_chunk, method(weights, deltas))`` of one chunk (both in the tensor's shape when ``whole``);
    a chunk that is the whole tensor runs the method's pre-pass itself."""
    if method.prepare is not None and prepared is None:  # the whole tensor is this one chunk
        prepared = method.prepare(name, numel, params, [lambda d=d: [(0, d)] for d in deltas], compute)
    if whole:
        base_chunk, deltas = base_chunk.reshape(shape), [d.reshape(shape) for d in deltas]
    ctx = MergeContext(
        name=name, start=start, numel=numel, params=params, prepared=prepared, shape=shape, whole_tensor=whole, base=base_chunk,
        device=base_chunk.device,
    )
    return base_chunk, method.fn(deltas, weights, ctx)


def merge_tensor(method, name: str, base_tensor: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float], params: dict, compute: torch.dtype = torch.float32) -> torch.Tensor:
    """``method(weights, deltas)`` of the one tensor ``name``, its inputs' deltas given whole: the
    merged delta that ``merge``/``merge_to`` scale and add to the base (entries never depend on
    chunking: masks and thresholds are by position over the whole tensor). In ``base_tensor``'s shape."""
    shape = tuple(base_tensor.shape)
    numel = base_tensor.numel()
    whole = method.takes_whole_tensor(name, shape, params)
    flat = [d.reshape(-1).to(compute) for d in deltas]
    _, merged = _merged_chunk(method, name, 0, numel, shape, whole, params, None, base_tensor.reshape(-1).to(compute), flat, list(weights), compute)
    return merged.reshape(shape)


def plan_merge(base, vectors, weights, method="task_arithmetic", scale: Coefficient = 1.0, params=None, compute_dtype="float32") -> _Plan:
    """The checked merge ``merge``/``merge_to`` execute: the method and its parameters, every input
    from the base, shapes agreeing, each tensor's weights and scale resolved (inputs lacking a
    tensor count as zero there: ``plan.vectors``)."""
    return _plan(base, vectors, weights, method, scale, params, None, compute_dtype)


def _prepare_one(method, name, numel, params, chunks, compute):
    """``method.prepare`` of one input: its one entry of the per-input list."""
    (entry,) = method.prepare(name, numel, params, [chunks], compute)
    return entry


def union_of_tensors(vectors: "Sequence[TaskVector]") -> dict[str, TensorSpec]:
    """The tensors of all ``vectors`` (a tensor some lack counts as zero there); refuses a
    tensor whose shape differs between two of them, naming both."""
    specs: dict[str, TensorSpec] = {}
    owner: dict[str, int] = {}
    for i, v in enumerate(vectors):
        for name in v.names:
            spec = v.spec(name)
            if name not in specs:
                specs[name], owner[name] = spec, i
            elif spec.shape != specs[name].shape:
                j = owner[name]
                raise TaskVecError(
                    f"tensor {name!r} has shape {list(specs[name].shape)} in {_label(vectors[j], j)} but {list(spec.shape)} in {_label(v, i)}"
                )
    return dict(sorted(specs.items()))


def _label(v: "TaskVector", index: int) -> str:
    task = f" {v.task!r}" if v.task else ""
    return f"vectors[{index}] (task vector{task} from {v.source})"
