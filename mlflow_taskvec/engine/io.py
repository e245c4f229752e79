"""The safetensors file format, read lazily through mmap and written as a stream.

Reading: the header is parsed and checked against the file size before any
tensor is touched, so a truncated file or a header that claims impossible sizes
fails with one clear message. Tensors are zero-copy views of a private
(copy-on-write) memory map: their pages are file-backed and are not counted as
anonymous memory.

Writing: the header is computed up front from the tensor specs, then each
tensor's bytes are appended as they are produced, so a file of any size is
written without holding more than the tensor (or chunk) in hand.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from mlflow_taskvec.errors import TaskVecError

# safetensors' own limit on the JSON header; anything larger is not a real file.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPE_BY_CODE: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        DTYPE_BY_CODE[_code] = getattr(torch, _attr)
CODE_BY_DTYPE: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPE_BY_CODE.items()}


def dtype_code(dtype: torch.dtype) -> str:
    try:
        return CODE_BY_DTYPE[dtype]
    except KeyError:
        raise TaskVecError(f"dtype {dtype} cannot be stored in safetensors") from None


def item_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor is, without its data."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * item_size(self.dtype)

    @property
    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point


@dataclass(frozen=True)
class _Entry:
    spec: TensorSpec
    start: int  # absolute byte offset in the file
    end: int


def _whole_number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_header(path: Path, file_size: int) -> tuple[dict[str, _Entry], dict[str, str], int]:
    if file_size < 8:
        raise TaskVecError(f"{path}: truncated safetensors file ({file_size} bytes, the header length alone needs 8)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES:
            raise TaskVecError(f"{path}: corrupt safetensors header (claims a {header_len}-byte header)")
        if 8 + header_len > file_size:
            raise TaskVecError(
                f"{path}: truncated safetensors file (header claims {header_len} bytes, file has {file_size - 8} after the length)"
            )
        raw = f.read(header_len)
    data_start = 8 + header_len
    entries, metadata = parse_header_bytes(path, raw, data_start, data_size=file_size - data_start)
    return entries, metadata, data_start


def parse_header_bytes(path: Path, raw: bytes, data_start: int, data_size: int | None = None) -> tuple[dict[str, _Entry], dict[str, str]]:
    """The tensors and metadata a safetensors header (its JSON bytes) declares, checked against
    the ``data_size`` bytes after it (None: not checked, for a file still being written)."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TaskVecError(f"{path}: corrupt safetensors header (not valid JSON: {exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(header, dict):
        raise TaskVecError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TaskVecError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        try:
            code = info["dtype"]
            shape, offsets = tuple(info["shape"]), tuple(info["data_offsets"])
            if len(offsets) != 2 or not all(_whole_number(d) for d in shape + offsets):
                raise TypeError
            start, end = offsets
        except (KeyError, TypeError, ValueError):
            raise TaskVecError(f"{path}: corrupt safetensors header (entry {name!r} lacks dtype, or its shape or data_offsets are not lists of whole numbers)") from None
        if code not in DTYPE_BY_CODE:
            raise TaskVecError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
        if any(d < 0 for d in shape) or start < 0 or end < start:
            raise TaskVecError(f"{path}: corrupt safetensors header (tensor {name!r} has negative sizes or offsets)")
        spec = TensorSpec(DTYPE_BY_CODE[code], shape)
        if end - start != spec.nbytes:
            raise TaskVecError(
                f"{path}: corrupt safetensors header (tensor {name!r} of shape {list(shape)} {code} needs {spec.nbytes} bytes, offsets span {end - start})"
            )
        if data_size is not None and end > data_size:
            raise TaskVecError(
                f"{path}: truncated safetensors file (tensor {name!r} ends at byte {end} of the data, which holds {data_size})"
            )
        entries[name] = _Entry(spec, data_start + start, data_start + end)
    spans = sorted((e.start, e.end, n) for n, e in entries.items() if e.end > e.start)
    for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise TaskVecError(f"{path}: corrupt safetensors header (tensors {n0!r} and {n1!r} overlap)")
    return entries, metadata


class SafetensorsFile:
    """One safetensors file, opened lazily; ``get_tensor`` returns mmap-backed views."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise TaskVecError(f"{self.path}: no such file") from None
        self._entries, self._metadata, _ = _parse_header(self.path, size)
        self._mmap: mmap.mmap | None = None
        if size > 0:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: pages stay file-backed for reading, and the buffer is
                # writable so torch can wrap it without copying; nothing is written back.
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def spec(self, name: str) -> TensorSpec:
        return self._entries[name].spec

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        spec = entry.spec
        if spec.numel == 0:
            return torch.empty(spec.shape, dtype=spec.dtype)
        flat = torch.frombuffer(self._mmap, dtype=spec.dtype, count=spec.numel, offset=entry.start)
        return flat.view(spec.shape)

    def raw_bytes(self, name: str) -> memoryview:
        entry = self._entries[name]
        if entry.end == entry.start:
            return memoryview(b"")
        return memoryview(self._mmap)[entry.start : entry.end]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without copying when it is contiguous."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def storage_order(specs: dict[str, TensorSpec]) -> list[str]:
    """Names in the order their bytes are laid out: larger items first, so every
    tensor starts at an offset aligned to its item size (as safetensors itself does)."""
    return sorted(specs, key=lambda n: (-item_size(specs[n].dtype), n))


class StreamingWriter:
    """Writes one safetensors file whose tensors arrive in ``self.order``, in chunks.

    The header is written first; ``write`` appends bytes and checks that each
    chunk has the expected dtype and does not overrun its tensor.
    """

    def __init__(self, path: str | os.PathLike, specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = specs
        self.order = storage_order(specs)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name in self.order:
            spec = specs[name]
            header[name] = {
                "dtype": dtype_code(spec.dtype),
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        # Unbuffered: nothing is left in a buffer to flush on abort, which on a full
        # disk would fail again and keep the partial file from being removed.
        self._file = open(self.path, "wb", buffering=0)
        self._write_all(struct.pack("<Q", len(raw)) + raw)
        self._index = 0
        self._remaining = specs[self.order[0]].nbytes if self.order else 0

    def _next(self) -> None:
        self._index += 1
        if self._index < len(self.order):
            self._remaining = self.specs[self.order[self._index]].nbytes

    def _skip_empty_before(self, name: str | None) -> None:
        """Zero-byte tensors need no bytes: writing them is optional."""
        while not self.done and self._remaining == 0 and self.order[self._index] != name:
            self._next()

    @property
    def done(self) -> bool:
        return self._index >= len(self.order)

    def write(self, name: str, chunk: torch.Tensor) -> memoryview:
        """Append ``chunk`` (all or part of tensor ``name``); returns the bytes written."""
        self._skip_empty_before(name)
        if self.done or self.order[self._index] != name:
            expected = "nothing more" if self.done else repr(self.order[self._index])
            raise RuntimeError(f"writer expected {expected}, got {name!r}")
        spec = self.specs[name]
        if chunk.dtype != spec.dtype:
            raise RuntimeError(f"tensor {name!r}: expected {spec.dtype}, got {chunk.dtype}")
        data = tensor_bytes(chunk)
        if data.nbytes > self._remaining:
            raise RuntimeError(f"tensor {name!r}: chunk overruns the tensor")
        self._write_all(data)
        self._remaining -= data.nbytes
        if self._remaining == 0:
            self._next()
        return data

    def _write_all(self, data) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            view = view[self._file.write(view) :]

    def close(self) -> None:
        self._skip_empty_before(None)
        if not self.done:
            self._file.close()
            raise RuntimeError(f"{self.path}: closed before tensor {self.order[self._index]!r} was written")
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        """Close without writing anything more (the caller removes the file)."""
        try:
            self._file.close()
        except OSError:
            pass
