"""Checkpoints: lazy, read-only sets of named tensors, and the content fingerprint.

A checkpoint is one of:
- a single ``.safetensors`` file;
- an HF-style directory with ``model.safetensors``, or shards listed in
  ``model.safetensors.index.json`` (any directory holding exactly one
  ``.safetensors`` file is accepted too);
- an in-memory state dict.

Only safetensors is read: pickle-based checkpoints are refused, never loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import torch

from mlflow_taskvec.engine.io import (
    SafetensorsFile,
    TensorSpec,
    dtype_code,
    tensor_bytes,
)
from mlflow_taskvec.engine import metadata as meta_keys
from mlflow_taskvec.engine.streaming import flat_slice
from mlflow_taskvec.errors import TaskVecError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter folder has it (engine/lora.py reads one)


def is_adapter(path: "str | os.PathLike") -> bool:
    """Whether ``path`` is a PEFT adapter folder."""
    return isinstance(path, (str, os.PathLike)) and (Path(path) / ADAPTER_CONFIG).is_file()


def new_digest():
    """The hash behind fingerprints: BLAKE3 (cryptographic, and about twice as fast
    as sha256 here, which matters when every output byte is hashed)."""
    return blake3.blake3()


def tensor_digest(data: memoryview | bytes) -> str:
    return blake3.blake3(data).hexdigest()


def combine_digests(entries: list[tuple[str, TensorSpec, str]]) -> str:
    """The fingerprint: BLAKE3 over sorted (name, dtype, shape, BLAKE3 of bytes).

    It depends on tensor content only, never on file layout, so a single file and
    its sharded copy have the same fingerprint.
    """
    h = new_digest()
    for name, spec, digest in sorted(entries, key=lambda e: e[0]):
        shape = ",".join(str(d) for d in spec.shape)
        h.update(f"{name}\0{dtype_code(spec.dtype)}\0{shape}\0{digest}\n".encode("utf-8"))
    return h.hexdigest()


# fingerprints of files this process has hashed or written, by each file's (device, inode, size,
# mtime_ns): a rename or a hard link keeps them, so a file moved or linked is not hashed again
_FILE_FINGERPRINTS: dict[tuple, str] = {}


def files_key(files: "list[Path]") -> tuple | None:
    """What identifies unchanged files on disk, whatever their names (None when one is missing)."""
    try:
        return tuple(sorted((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for st in (os.stat(p) for p in files)))
    except OSError:
        return None


def remember_fingerprint(files: "list[Path]", fingerprint: str) -> None:
    """Record the fingerprint of the checkpoint made of ``files``, which this process has just
    written and hashed as it wrote (``CheckpointWriter.commit``): opening them again, under any
    name they are moved or hard-linked to, does not read them a second time. ``fresh=True`` still rehashes."""
    key = files_key(files)
    if key is not None:
        _FILE_FINGERPRINTS[key] = fingerprint


class Checkpoint:
    """A lazy, read-only mapping of tensor names to tensors."""

    source: str

    def keys(self) -> list[str]:
        raise NotImplementedError

    def spec(self, name: str) -> TensorSpec:
        raise NotImplementedError

    def get_tensor(self, name: str) -> torch.Tensor:
        """The tensor, as a zero-copy view when the storage allows it. Never modify it."""
        raise NotImplementedError

    def raw_bytes(self, name: str) -> memoryview:
        raise NotImplementedError

    def read_chunk(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Entries [start, stop) of the flattened tensor in ``dtype`` (a read-only view when no cast is needed)."""
        return flat_slice(self.get_tensor(name), start, stop, dtype)

    @property
    def stored_bytes(self) -> int:
        """Bytes of tensor data as stored (less than the tensors' own size for a compressed layout)."""
        return sum(self.spec(n).nbytes for n in self.keys())

    @property
    def dense_bytes(self) -> int:
        """Bytes of the dense tensors the checkpoint stands for (its stored bytes for a dense one)."""
        return sum(self.spec(n).nbytes for n in self.keys())

    def metadata(self) -> dict[str, str]:
        return {}

    @property
    def directory(self) -> Path | None:
        """The HF-style directory this checkpoint came from, if any."""
        return None

    def paths(self) -> list[Path]:
        """The files and folder this checkpoint is read from (none for one in memory)."""
        return []

    def __contains__(self, name: str) -> bool:
        return name in set(self.keys())

    def specs(self) -> dict[str, TensorSpec]:
        return {name: self.spec(name) for name in self.keys()}

    def fingerprint(self, fresh: bool = False) -> str:
        """The content fingerprint. Cached per object, and per process for files
        whose path, inode, size and mtime are unchanged; ``fresh=True`` rehashes
        (what a verification must do)."""
        key = None if fresh else self._file_key()
        cached = None if fresh else getattr(self, "_fingerprint", None) or _FILE_FINGERPRINTS.get(key)
        if cached is None:
            names = self.keys()
            # blake3 releases the GIL on large buffers: two threads use both cores.
            with ThreadPoolExecutor(max_workers=2) as pool:
                digests = list(pool.map(lambda n: tensor_digest(self.raw_bytes(n)), names))
            cached = combine_digests([(n, self.spec(n), d) for n, d in zip(names, digests)])
            if key is None:
                key = self._file_key()
            if key is not None:
                _FILE_FINGERPRINTS[key] = cached
        self._fingerprint = cached
        return cached

    def _file_key(self) -> tuple | None:
        """What identifies unchanged files on disk (None for in-memory checkpoints)."""
        return None

    def num_parameters(self) -> int:
        return sum(self.spec(n).numel for n in self.keys())


class SafetensorsCheckpoint(Checkpoint):
    """One or more safetensors files (shards) seen as one checkpoint."""

    def __init__(self, files: list[Path], source: str, directory: Path | None = None, metadata: dict | None = None):
        self.source = source
        self._directory = directory
        self._files = [SafetensorsFile(p) for p in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self._files:
            for name in f.keys():
                if name in self._where:
                    raise TaskVecError(f"{source}: tensor {name!r} appears in both {self._where[name].path.name} and {f.path.name}")
                self._where[name] = f
        self._keys = sorted(self._where)
        self._metadata = dict(metadata or {})
        if len(self._files) == 1:
            self._metadata = {**self._files[0].metadata(), **self._metadata}

    @property
    def directory(self) -> Path | None:
        return self._directory

    @property
    def files(self) -> list[Path]:
        return [f.path for f in self._files]

    def paths(self) -> list[Path]:
        return ([self._directory] if self._directory is not None else []) + self.files

    def keys(self) -> list[str]:
        return list(self._keys)

    def _file_key(self) -> tuple | None:
        return files_key(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def spec(self, name: str) -> TensorSpec:
        return self._file(name).spec(name)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def raw_bytes(self, name: str) -> memoryview:
        return self._file(name).raw_bytes(name)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._where[name]
        except KeyError:
            raise TaskVecError(f"{self.source}: no tensor named {name!r}") from None


class StateDictCheckpoint(Checkpoint):
    """An in-memory state dict, seen through the same interface."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], source: str = "<state dict>", metadata: dict | None = None):
        self.source = source
        self._tensors: dict[str, torch.Tensor] = {}
        for name, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise TaskVecError(f"{source}: entry {name!r} is a {type(value).__name__}, not a tensor")
            self._tensors[str(name)] = value.detach().cpu().contiguous()
        self._metadata = dict(metadata or {})

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def spec(self, name: str) -> TensorSpec:
        t = self._get(name)
        return TensorSpec(t.dtype, tuple(t.shape))

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._get(name)

    def raw_bytes(self, name: str) -> memoryview:
        return tensor_bytes(self._get(name))

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def _get(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise TaskVecError(f"{self.source}: no tensor named {name!r}") from None


def _open_directory(path: Path) -> SafetensorsCheckpoint:
    index = path / INDEX_NAME
    if index.is_file():
        try:
            data = json.loads(index.read_text("utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise TaskVecError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
        shard_names = sorted(set(weight_map.values()))
        for shard in shard_names:
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
                raise TaskVecError(f"{index}: shard name {shard!r} is not a plain file name")
            if not (path / shard).is_file():
                raise TaskVecError(f"{index}: lists shard {shard} which is missing from {path}")
        ckpt = SafetensorsCheckpoint(
            [path / s for s in shard_names], str(path), directory=path, metadata=data.get("metadata") or {}
        )
        for name, shard in weight_map.items():
            if name not in ckpt or ckpt._where[name].path.name != shard:
                raise TaskVecError(f"{index}: tensor {name!r} is listed in {shard} but not stored there")
        for name in ckpt.keys():
            if name not in weight_map:
                raise TaskVecError(f"{index}: tensor {name!r} is stored in a shard but missing from the weight_map")
        return ckpt
    single = path / WEIGHTS_NAME
    if single.is_file():
        return SafetensorsCheckpoint([single], str(path), directory=path)
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return SafetensorsCheckpoint(candidates, str(path), directory=path)
    if len(candidates) > 1:
        raise TaskVecError(f"{path}: several .safetensors files and no {INDEX_NAME} to say how they fit together")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise TaskVecError(
            f"{path}: holds only pickle weights ({', '.join(pickles)}); convert them to safetensors, pickle is never loaded"
        )
    raise TaskVecError(f"{path}: no safetensors weights found in this directory")


def open_checkpoint(source: "Checkpoint | Mapping[str, torch.Tensor] | str | os.PathLike") -> Checkpoint:
    """Open a checkpoint lazily from a path, a state dict, or return a Checkpoint as is."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, Mapping):
        return StateDictCheckpoint(source)
    path = Path(source)
    if path.is_dir():
        if is_adapter(path):
            raise TaskVecError(
                f"{path}: is a PEFT LoRA adapter, a task vector of its base: use it as a vector (with its base), not as a checkpoint"
            )
        return _in_its_layout(_open_directory(path))
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise TaskVecError(f"{path}: pickle checkpoints are never loaded; convert it to safetensors")
        return _in_its_layout(SafetensorsCheckpoint([path], str(path)))
    if path.exists():
        raise TaskVecError(f"{path}: not a regular file or a folder, so it holds no safetensors weights")
    raise TaskVecError(f"{path}: no such file or directory")


# Stored layouts: ``taskvec.layout`` in a file's metadata names how its tensors are encoded.
# Each layout's module registers its reader here; this module names none of them.
LayoutReader = Callable[["SafetensorsCheckpoint"], "Checkpoint"]
_LAYOUT_READERS: dict[str, LayoutReader] = {}


def register_layout(name: str, reader: LayoutReader) -> None:
    """Make ``open_checkpoint`` read files whose ``taskvec.layout`` is ``name`` through ``reader``
    (called with the file as stored; it returns the dense view of what the file stands for)."""
    if name in _LAYOUT_READERS and _LAYOUT_READERS[name] is not reader:
        raise ValueError(f"layout {name!r} already has a reader")
    _LAYOUT_READERS[name] = reader


def known_layouts() -> list[str]:
    return sorted(_LAYOUT_READERS)


def _in_its_layout(ckpt: SafetensorsCheckpoint) -> Checkpoint:
    """A file stored in a layout (compressed, low-rank factors) is seen as the dense tensors it stands for."""
    layout = ckpt.metadata().get(meta_keys.LAYOUT)
    if layout is None:
        return ckpt
    reader = _LAYOUT_READERS.get(layout)
    if reader is None:
        known = ", ".join(known_layouts()) or "none"
        raise TaskVecError(f"{ckpt.source}: unknown stored layout {layout!r} in its {meta_keys.LAYOUT} metadata (known: {known})")
    return reader(ckpt)
