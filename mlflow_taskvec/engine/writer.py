"""Writing checkpoints: one file or shards plus an index, atomically, as a stream.

Everything is written under a temporary sibling of the output path and moved
into place only when complete, so an interrupted or failed run never leaves an
output that looks finished (``output.py`` claims the path: lock, aliasing, final move);
a full disk is refused up front when it can be seen, and otherwise removes the partial. Writes and hashing run on a background thread,
overlapping the computation of the next tensors.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from mlflow_taskvec.engine.checkpoint import INDEX_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME, Checkpoint, combine_digests, new_digest, remember_fingerprint
from mlflow_taskvec.engine.io import StreamingWriter, TensorSpec, storage_order
from mlflow_taskvec.engine.output import OutputClaim, refuse_aliasing, remove_path
from mlflow_taskvec.errors import TaskVecError

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_WEIGHT_SUFFIXES = (".safetensors", ".h5", ".msgpack", ".gguf", ".onnx") + PICKLE_SUFFIXES
# At most this many chunks wait for the writer thread: bounds memory held in flight.
_MAX_PENDING = 4


def parse_size(value: int | str | None, what: str = "max_shard_size") -> int | None:
    """Parse ``500MB``, ``2GiB`` or a byte count."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TaskVecError(f"{what}: {value!r} is not a size")
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise TaskVecError(f"{what}: {value!r} is not a size (use bytes, or a number with KB, MB, GB, KiB, MiB or GiB)")
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if size <= 0:
        raise TaskVecError(f"{what}: {value!r} must be positive")
    return size


def write_text_atomically(path: Path, text: str) -> None:
    """Write a small text file whole or not at all: a temporary sibling, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_size(size: int) -> str:
    """``1234567`` as ``1.2 MB`` (decimal units, as ``parse_size`` reads them)."""
    for unit, factor in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} bytes"


def plan_shards(specs: dict[str, TensorSpec], max_shard_size: int | None) -> list[list[str]]:
    """Greedy shards in name order, each at most ``max_shard_size`` bytes (a larger tensor gets its own)."""
    names = sorted(specs)
    if max_shard_size is None:
        return [names]
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = specs[name].nbytes
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


class CheckpointWriter:
    """Streams tensors into ``output`` (a ``.safetensors`` file, or a directory).

    Its interface (``order``, ``write``, ``commit``, ``abort``) is ``MemorySink``'s too.

    Tensors must be written in ``self.order``, each whole or in consecutive
    chunks of its flattened data. ``commit()`` returns the output's fingerprint.
    Use as a context manager: an exception discards everything written.
    """

    def __init__(
        self,
        output: "str | os.PathLike | OutputClaim",
        specs: dict[str, TensorSpec],
        metadata: dict[str, str] | None = None,
        max_shard_size: int | str | None = None,
        copy_files_from: Path | None = None,
        overwrite: bool = False,
        inputs: Iterable[Checkpoint] = (),
        extra_files: "Callable[[str], dict[str, str]] | None" = None,
    ):
        """``output`` is a path, or an ``OutputClaim`` taken before the work began (the writer
        then owns it). ``inputs`` are the checkpoints the output is computed from: an output
        that is, contains or lies inside one of them is refused. ``extra_files(fingerprint)``
        gives a folder output's text files (a model card), written before the final move so
        that the folder appears complete."""
        self._extra_files = extra_files
        self._claim = output if isinstance(output, OutputClaim) else OutputClaim(output, overwrite)
        self.output = self._claim.path
        self.specs = dict(specs)
        self._closed = False
        self._files: list[StreamingWriter] = []
        self._tmp: Path | None = None
        # Everything else is set up before the partial exists: a signal that lands once it
        # exists (a test sends one exactly then) always finds a writer that abort() can undo.
        self._digests: dict[str, str] = {}
        self._hashers: dict = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskvec-writer")  # starts no thread yet
        self._slots = threading.BoundedSemaphore(_MAX_PENDING)
        self._futures: list[Future] = []
        self._needed = self._free_at_start = 0
        try:
            refuse_aliasing(self.output, [p for ckpt in inputs for p in ckpt.paths()])
            shard_size = parse_size(max_shard_size)
            self._single_file = self.output.suffix == ".safetensors"
            if self._single_file and shard_size is not None:
                raise TaskVecError(f"{self.output}: a sharded output must be a directory, not a .safetensors file")
            self._metadata = {"format": "pt", **(metadata or {})}
            self._copy_from = copy_files_from
            self._check_free_space()
            self._tmp = self._claim.partial()
            shards = plan_shards(self.specs, shard_size)
            if self._single_file:
                paths = [self._tmp]
            else:
                self._tmp.mkdir()
                if len(shards) == 1:
                    paths = [self._tmp / WEIGHTS_NAME]
                else:
                    n = len(shards)
                    paths = [self._tmp / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            self._sharded = len(shards) > 1
            self._file_of: dict[str, StreamingWriter] = {}
            self.order: list[str] = []
            for path, names in zip(paths, shards):
                w = StreamingWriter(path, {n: self.specs[n] for n in names}, self._metadata)
                self._files.append(w)
                for n in names:
                    self._file_of[n] = w
                self.order.extend(storage_order({n: self.specs[n] for n in names}))
            self._claim.stage("writing")  # the partial exists: a signal from here on removes it
        except BaseException as exc:
            self._closed = True
            for w in self._files:
                w.abort()
            self._discard()
            self._claim.release()
            if _is_disk_full(exc):
                raise self._explain(exc) from None
            raise

    def _needed_bytes(self) -> int:
        """Roughly what the output takes on disk: its tensors, headers, and the files copied beside them."""
        needed = sum(s.nbytes for s in self.specs.values()) + 64 * len(self.specs) + (1 << 16)
        if self._copy_from is not None:
            needed += sum(p.stat().st_size for item in copyable_files(self._copy_from) for p in ([item] if item.is_file() else item.rglob("*")) if p.is_file())
        return needed

    def _check_free_space(self) -> None:
        self._needed = self._needed_bytes()
        usage = shutil.disk_usage(self.output.parent)
        self._free_at_start = usage.free
        if usage.total and self._needed > usage.free:  # some network file systems report no sizes at all
            raise TaskVecError(
                f"{self.output}: not enough free space in {self.output.parent}: the output needs {format_size(self._needed)}, "
                f"{format_size(self._free_at_start)} are free; nothing was written"
            )

    def _explain(self, exc: OSError) -> TaskVecError:
        """A full disk as one line naming the output and the space it needs."""
        return TaskVecError(
            f"{self.output}: the disk of {self.output.parent} filled up while writing (the output needs {format_size(self._needed)}, "
            f"{format_size(self._free_at_start)} were free at the start); the partial output was removed"
        )

    # -- writing ---------------------------------------------------------------
    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Queue ``chunk`` (the whole tensor or its next consecutive part) for writing."""
        self._raise_pending_error()
        self._slots.acquire()
        try:
            fut = self._pool.submit(self._write_now, name, chunk)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _f: self._slots.release())
        self._futures.append(fut)
        if len(self._futures) > 64:
            self._futures = [f for f in self._futures if not f.done() or f.exception() is not None]

    def _write_now(self, name: str, chunk: torch.Tensor) -> None:
        data = self._file_of[name].write(name, chunk)
        hasher = self._hashers.get(name)
        if hasher is None:
            hasher = self._hashers[name] = new_digest()
        hasher.update(data)

    def _raise_pending_error(self) -> None:
        for fut in self._futures:
            if fut.done() and fut.exception() is not None:
                exc = fut.exception()
                if _is_disk_full(exc):
                    raise self._explain(exc) from None
                raise exc

    # -- finishing -------------------------------------------------------------
    def commit(self) -> str:
        """Finish every file, write the index, copy the base's other files, move into place."""
        try:
            for fut in self._futures:
                fut.result()
            self._pool.shutdown(wait=True)
            for w in self._files:
                w.close()
            for name in self.specs:
                hasher = self._hashers.get(name) or new_digest()
                self._digests[name] = hasher.hexdigest()
            fingerprint = combine_digests([(n, self.specs[n], d) for n, d in self._digests.items()])
            if not self._single_file:
                if self._sharded:
                    index = {
                        "metadata": {"total_size": sum(s.nbytes for s in self.specs.values()), **self._metadata},
                        "weight_map": {n: self._file_of[n].path.name for n in sorted(self.specs)},
                    }
                    (self._tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", "utf-8")
                if self._copy_from is not None:
                    copy_non_weight_files(self._copy_from, self._tmp)
                for name, text in (self._extra_files(fingerprint) if self._extra_files is not None else {}).items():
                    (self._tmp / name).write_text(text, "utf-8")
            self._claim.move_into_place(self._tmp)
            self._closed = True
            self._claim.release()
            # hashed as written: the files are not read again to be fingerprinted
            remember_fingerprint([self.output] if self._single_file else [self.output / w.path.name for w in self._files], fingerprint)
            return fingerprint
        except BaseException as exc:
            self.abort()
            if _is_disk_full(exc):
                raise self._explain(exc) from None
            raise

    def abort(self) -> None:
        """Discard everything written: the temporary is always removed, even on a full disk."""
        if self._closed:
            return
        self._closed = True
        try:
            self._pool.shutdown(wait=True, cancel_futures=True)
            for w in self._files:
                w.abort()
        finally:
            self._discard()
            self._claim.release()

    def _discard(self) -> None:
        if self._tmp is not None:
            remove_path(self._tmp)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.abort()
            raise RuntimeError("CheckpointWriter left without commit()")


class MemorySink:
    """Collects written tensors into an in-memory state dict.

    The same interface as ``CheckpointWriter`` (``order``, ``write``, ``commit``,
    ``abort``), so one executor streams into either; ``commit`` returns the state dict.
    """

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

    def abort(self) -> None:
        self.tensors.clear()



def copyable_files(source_dir: Path) -> list[Path]:
    """The config, tokenizer and other non-weight files of a model folder, and its folders that hold no weights."""
    out = []
    for item in sorted(source_dir.iterdir()):
        if item.name.startswith(".") or item.name == INDEX_NAME or item.suffix in _WEIGHT_SUFFIXES:
            continue
        if item.is_file() or (item.is_dir() and not any(p.suffix in _WEIGHT_SUFFIXES for p in item.rglob("*"))):
            out.append(item)
    return out


def copy_non_weight_files(source_dir: Path, target_dir: Path) -> list[str]:
    """Copy config, tokenizer and other non-weight files so the output is a drop-in replacement.

    Folders without weights go too (a sentence-transformers model's ``1_Pooling/``,
    ``2_Normalize/``); a folder holding weights of its own is not the base's checkpoint
    and is left out.
    """
    copied = []
    for item in copyable_files(source_dir):
        if item.is_dir():
            shutil.copytree(item, target_dir / item.name)
            copied.append(item.name + "/")
        else:
            shutil.copy2(item, target_dir / item.name)
            copied.append(item.name)
    return copied


def _is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
