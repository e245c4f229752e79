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
import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from mlflow_taskvec.errors import TaskVecError

# Random masks are drawn in fixed blocks of the flattened tensor, each from its
# own generator, so that any chunking aligned to blocks gives the same masks.
RANDOM_BLOCK = 1 << 20
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


def parse_threads(value: "int | None", what: str = "threads") -> int:
    """How many compute threads the engine runs: ``value``, or the machine's cores when None.

    The thread count never changes a bit of the output: the work is cut into independent
    tensors and chunks, each computed by one single-threaded torch call sequence, and
    written in a fixed order.
    """
    if value is None:
        return max(1, os.cpu_count() or 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TaskVecError(f"{what}: {value!r} must be a positive integer (the number of compute threads)")
    return value


@contextlib.contextmanager
def one_torch_thread():
    """Run torch ops on one thread while streaming.

    The parallelism that pays here is over independent chunks and tensors: the
    compute pool's workers each run one chunk's ops, and the writer thread writes
    and hashes. Torch's own intra-op threads would compete with them for the same
    cores, OpenMP's fork/join on chunk-sized ops costs more than it gains (10x
    slower when the machine is busy), and a reduction's result could then depend
    on the thread count.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _load_libc_function(name: str):
    # glibc's soname first: find_library runs ldconfig in a subprocess (milliseconds at every start-up)
    for soname in ("libc.so.6", None):
        try:
            libc = ctypes.CDLL(soname or ctypes.util.find_library("c") or "libc.so.6")
            return getattr(libc, name)
        except (OSError, AttributeError):  # not glibc: nothing to do
            continue
    return None


_MALLOC_TRIM = _load_libc_function("malloc_trim")
_MALLOPT = _load_libc_function("mallopt")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024
# While streaming, freed chunk-sized buffers stay in the heap up to this much.
_KEEP_FREED_BYTES = 64 * 1024 * 1024


@contextlib.contextmanager
def reuse_freed_memory():
    """Let the heap keep freed chunk-sized buffers while streaming.

    Every elementwise op on a chunk allocates a chunk-sized result (4 MB for float32).
    By default glibc serves such sizes with fresh mmaps, or trims them off the heap
    when freed, so each one costs its page faults again: 3-5x the arithmetic itself
    for the trim and election temporaries. Here they come from the heap and go back
    to it; ``release_free_memory`` still returns the heap to the OS after each large
    tensor. glibc's defaults are restored on exit.
    """
    if _MALLOPT is None:
        yield
        return
    _MALLOPT(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's upper bound on 64-bit
    _MALLOPT(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES)
    try:
        yield
    finally:
        _MALLOPT(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
        _MALLOPT(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS.

    glibc keeps freed chunk-sized buffers in per-thread arenas, so with a writer
    and compute threads the resident memory creeps up over a large tensor's many
    chunks even though nothing is live; trimming after such a tensor keeps the
    peak bounded by what is really in use.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def derive_seed(seed: int, input_index: int, name: str, block: int) -> int:
    """The generator seed of one random block: the first 8 bytes (little-endian) of
    sha256 of ``f"{seed}\\0{input_index}\\0{name}\\0{block}"``, top bit cleared."""
    digest = hashlib.sha256(f"{seed}\0{input_index}\0{name}\0{block}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keep_mask(seed: int, input_index: int, name: str, start: int, length: int, numel: int, keep_probability) -> torch.Tensor:
    """Bernoulli(keep_probability) mask for entries [start, start+length) of input ``input_index``
    of tensor ``name`` (``numel`` entries): block b's mask is ``torch.rand(block length,
    generator=manual_seed(derive_seed(seed, input_index, name, b))) < keep_probability``.
    ``keep_probability`` may be a tensor of ``length`` entries (one probability per entry).
    ``start`` may fall inside a block (the block is drawn whole and sliced: the same
    entries get the same draws), though chunks on block boundaries draw each block once."""
    parts = []
    first = start // RANDOM_BLOCK
    last = (start + length - 1) // RANDOM_BLOCK
    for block in range(first, last + 1):
        block_len = min(RANDOM_BLOCK, numel - block * RANDOM_BLOCK)
        gen = torch.Generator().manual_seed(derive_seed(seed, input_index, name, block))
        parts.append(torch.rand(block_len, generator=gen))
    draws = parts[0] if len(parts) == 1 else torch.cat(parts)
    offset = start - first * RANDOM_BLOCK
    return draws[offset : offset + length] < keep_probability


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


def check_finite_output(values: torch.Tensor, name: str, start: int, numel: int) -> None:
    """Refuse output entries [start, start + len(values)) of tensor ``name`` that are NaN or Inf
    although every input was finite: the arithmetic overflowed, or the output dtype is too narrow."""
    if values.numel() == 0 or bool(torch.isfinite(values.sum())):
        return
    bad = int(values.numel() - torch.isfinite(values).sum())
    if not bad:
        return
    stop = start + values.numel()
    where = "" if (start, stop) == (0, numel) else f" (in entries {start}..{stop - 1} of its {numel})"
    dtype = str(values.dtype).removeprefix("torch.")
    fix = "write it as dtype: float32" if values.dtype in (torch.float16, torch.bfloat16) else "check the scale and weights"
    raise TaskVecError(
        f"tensor {name!r}: {bad} entries of the output are not finite in {dtype}{where}; {fix}, or set allow_nonfinite to accept them"
    )


class OrderedPool:
    """Computes output chunks on worker threads and hands them to ``sink`` in order.

    Each job is a callable returning one chunk of tensor ``name``; at most
    ``max_pending`` jobs are in flight (default: twice the workers, at least 6),
    which bounds memory. Torch ops release the GIL, so single-threaded workers keep
    every core busy; the results reach ``sink`` in submission order whatever the
    number of workers.
    """

    def __init__(self, sink, workers: int = 2, max_pending: int | None = None):
        self.sink = sink
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="taskvec-compute")
        self._pending: deque[tuple[str, "Future | Callable[[str], object]"]] = deque()
        self._max_pending = max_pending if max_pending is not None else max(6, 2 * workers)

    def map(self, jobs: "list[Callable[[], object]]") -> list:
        """Run independent ``jobs`` and return their results in order: the first on this thread,
        the others on the workers (beside the chunks in flight; all here with one worker)."""
        if self.workers == 1 or len(jobs) <= 1:
            return [job() for job in jobs]
        futures = [self._pool.submit(job) for job in jobs[1:]]
        try:
            first = jobs[0]()
            return [first, *(f.result() for f in futures)]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def submit(self, name: str, job: Callable[[], torch.Tensor]) -> None:
        self._pending.append((name, self._pool.submit(job)))
        while len(self._pending) > self._max_pending:
            self._write_oldest()

    def then(self, name: str, callback: Callable[[str], object] | None) -> None:
        """Call ``callback(name)`` once every chunk submitted so far has reached the sink (a
        progress bar steps when a tensor is written, not when its jobs are handed out)."""
        if callback is not None:
            self._pending.append((name, callback))

    def _write_oldest(self) -> None:
        name, fut = self._pending.popleft()
        if isinstance(fut, Future):
            self.sink.write(name, fut.result())
        else:
            fut(name)

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
                if isinstance(fut, Future):
                    fut.cancel()
            self._pool.shutdown(wait=True)
