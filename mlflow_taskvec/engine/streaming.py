"""Streaming execution: one parameter name (and one chunk of it) at a time.

Large tensors are cut into chunks of ``CHUNK_ELEMENTS`` entries of their
flattened data, so peak anonymous memory is bounded by a few chunks per input,
whatever the size of the model. Chunks start on multiples of the random block
size, so random masks do not depend on the chunking.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from mlflow_taskvec.engine.methods import RANDOM_BLOCK
from mlflow_taskvec.engine.safetensors_io import TensorSpec
from mlflow_taskvec.errors import TaskVecError

CHUNK_ELEMENTS = RANDOM_BLOCK

COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
STORAGE_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(value: "str | torch.dtype | None", what: str, allowed: dict[str, torch.dtype]) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).removeprefix("torch.").lower()
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64", "half": "float16", "double": "float64"}
    key = aliases.get(key, key)
    if key not in allowed:
        raise TaskVecError(f"{what}: {value!r} is not one of {', '.join(allowed)}")
    return allowed[key]


@contextlib.contextmanager
def one_torch_thread():
    """Run torch ops on one thread while streaming.

    The parallelism that pays here is a pipeline: this thread computes while the
    writer thread writes and hashes. Torch's own intra-op threads would compete
    with it for the same cores, and OpenMP's fork/join on chunk-sized ops then
    costs more than it gains (10x slower when the machine is busy).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _load_malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS.

    glibc keeps freed chunk-sized buffers in per-thread arenas, so with a writer
    and compute threads the resident memory creeps up over a large tensor's many
    chunks even though nothing is live; trimming after such a tensor keeps the
    peak bounded by what is really in use.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def chunk_ranges(numel: int, chunk: int = CHUNK_ELEMENTS) -> Iterator[tuple[int, int]]:
    if numel == 0:
        yield 0, 0
        return
    for start in range(0, numel, chunk):
        yield start, min(numel, start + chunk)


def flat_slice(tensor: torch.Tensor, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Entries [start, stop) of the flattened tensor in ``dtype`` (a view when no cast is needed)."""
    return tensor.reshape(-1)[start:stop].to(dtype)


def check_finite(chunk: torch.Tensor, describe: Callable[[], str]) -> None:
    """Refuse NaN and Inf. A finite sum proves every entry finite, so the exact scan
    runs only when the one-pass sum is not finite (including a rare overflow)."""
    if chunk.numel() == 0 or bool(torch.isfinite(chunk.sum())):
        return
    if not bool(torch.isfinite(chunk).all()):
        raise TaskVecError(f"{describe()} holds NaN or Inf values (set allow_nonfinite to accept them)")


class MemorySink:
    """Collects written tensors into an in-memory state dict (same interface as CheckpointWriter)."""

    def __init__(self, specs: dict[str, TensorSpec]):
        self.specs = specs
        self.order = sorted(specs)
        self.tensors: dict[str, torch.Tensor] = {}
        self._filled: dict[str, int] = {}

    def write(self, name: str, chunk: torch.Tensor) -> None:
        spec = self.specs[name]
        if name not in self.tensors:
            self.tensors[name] = torch.empty(spec.numel, dtype=spec.dtype)
            self._filled[name] = 0
        start = self._filled[name]
        flat = chunk.reshape(-1)
        self.tensors[name][start : start + flat.numel()] = flat
        self._filled[name] = start + flat.numel()

    def commit(self) -> dict[str, torch.Tensor]:
        return {n: self.tensors[n].view(self.specs[n].shape) for n in self.order}


class OrderedPool:
    """Computes output chunks on worker threads and hands them to ``sink`` in order.

    Each job is a callable returning one chunk of tensor ``name``; at most
    ``max_pending`` jobs are in flight, which bounds memory. Torch ops release the
    GIL, so two single-threaded workers keep both cores busy.
    """

    def __init__(self, sink, workers: int = 2, max_pending: int = 6):
        self.sink = sink
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="taskvec-compute")
        self._pending: deque[tuple[str, Future]] = deque()
        self._max_pending = max_pending

    def submit(self, name: str, job: Callable[[], torch.Tensor]) -> None:
        self._pending.append((name, self._pool.submit(job)))
        while len(self._pending) > self._max_pending:
            self._write_oldest()

    def _write_oldest(self) -> None:
        name, fut = self._pending.popleft()
        self.sink.write(name, fut.result())

    def drain(self) -> None:
        while self._pending:
            self._write_oldest()

    def __enter__(self) -> "OrderedPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            for _, fut in self._pending:
                fut.cancel()
            self._pool.shutdown(wait=True)
