"""Compressed task vectors: smaller stored layouts of the ``task_vector`` kind.

A compressed vector is one safetensors file whose metadata records its layout
(``taskvec.layout``) and, per tensor of the vector it stands for, that tensor's
dtype, shape and encoding (``taskvec.layout_tensors``). Its stored tensors are
named ``<tensor>/<part>``:

- ``sparse`` (``density`` D): the top ``k = max(1, int(D * numel))`` entries by
  magnitude of every tensor (exactly k, ties broken by flattened order, as the
  ``ties`` trim), as ascending flat ``indices`` (int32, or int64 past 2**31
  entries) and their ``values``;
- ``bitdelta`` (BitDelta, Liu et al., arXiv 2402.10193): per 2-D tensor its
  ``signs`` packed 8 per byte (entry ``8j + b`` is bit ``b`` of byte ``j``,
  1 where the entry is > 0) and one ``scale``, the mean of ``|t|``; the tensor
  reads back as ``+scale`` / ``-scale``. Other tensors are stored dense;
- ``lowrank`` (``rank`` R, ``energy`` E or ``density`` D): per 2-D tensor
  ``t`` (m x n) the truncated SVD ``t ~ left @ right`` with ``left = U_r diag(S_r)``
  (m x r) and ``right = Vh_r`` (r x n); the rank is R, the fewest singular values
  holding a fraction E of ``sum S^2``, or ``int(D * m * n / (m + n))`` (D of the dense
  size); a tensor whose factors would not be smaller, and every other tensor, is stored
  dense. It is written in the one low-rank layout (``engine/lowrank.py``), the one
  adapters' factors use, and read back with its canonical densification.

In every layout a tensor that is all zeros (a layer the fine-tune froze) is stored as
its shape alone (encoding ``zero``).

Reading ``sparse`` and ``bitdelta`` files goes through ``CompressedCheckpoint``, which
``open_checkpoint`` returns for such a file (the layouts are registered with the
checkpoint module below): it shows the dense tensors, densified block by block when
read (so composing from it keeps memory flat), and its fingerprint is that of the
densified vector. Every part's dtype and shape, and a sparse tensor's indices, are
checked before a value is used. ``TaskVector.load`` and everything built on it take
it as they take a dense vector.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mlflow_taskvec.engine import metadata as meta_keys
from mlflow_taskvec.engine.checks import fraction, positive_int
from mlflow_taskvec.engine.checkpoint import Checkpoint, SafetensorsCheckpoint, open_checkpoint, register_layout
from mlflow_taskvec.engine.device import parse_device
from mlflow_taskvec.engine.io import TensorSpec, dtype_code, tensor_bytes
from mlflow_taskvec.engine.layouts import check_part, corrupt, entry_spec, layout_table, part_name, refuse_unclaimed
from mlflow_taskvec.engine.lowrank import DenseDelta, LowRankCheckpoint, LowRankTensor, rank_for_energy, save_low_rank
from mlflow_taskvec.engine.methods.trim import trim_count, trim_threshold
from mlflow_taskvec.engine.streaming import CHUNK_ELEMENTS, flat_slice, one_torch_thread
from mlflow_taskvec.engine.output import OutputClaim
from mlflow_taskvec.engine.writer import CheckpointWriter
from mlflow_taskvec.errors import ParameterError, TaskVecError

LAYOUTS = ("sparse", "bitdelta", "lowrank")
# Which of density / rank / energy each layout accepts.
LAYOUT_SETTINGS = {"sparse": ("density",), "bitdelta": (), "lowrank": ("density", "rank", "energy")}
_INT32_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class _Encoded:
    """How one tensor of the vector is stored: its dense spec, encoding and parts."""

    spec: TensorSpec
    encoding: str  # dense | zero | sparse | bitdelta | lowrank
    parts: dict[str, TensorSpec]  # part name -> stored spec

    def describe(self) -> dict:
        return {"dtype": dtype_code(self.spec.dtype), "shape": list(self.spec.shape), "encoding": self.encoding}


def check_settings(layout: str, density: float | None = None, rank: int | None = None, energy: float | None = None) -> dict:
    """The layout's setting as a dict (``{'density': 0.1}``); raises naming the parameter that does not fit."""
    if layout not in LAYOUTS:
        raise ParameterError("layout", f"{layout!r} is not one of {', '.join(LAYOUTS)}")
    given = {k: v for k, v in dict(density=density, rank=rank, energy=energy).items() if v is not None}
    accepted = LAYOUT_SETTINGS[layout]
    for key in given:
        if key not in accepted:
            raise ParameterError(key, f"the {layout} format takes {' or '.join(accepted) if accepted else 'no setting'}")
    if accepted and len(given) != 1:
        raise ParameterError(accepted[0], f"the {layout} format needs exactly one of {', '.join(accepted)}")
    if "density" in given:
        fraction(given["density"], "density")
    if "energy" in given:
        fraction(given["energy"], "energy")
    if "rank" in given:
        positive_int(given["rank"], "rank")
    return given


# -- encoding ---------------------------------------------------------------------


def sparse_indices(flat: torch.Tensor, density: float) -> torch.Tensor:
    """Ascending flat indices of the top ``max(1, int(density * numel))`` entries by magnitude
    (exactly that many: among entries tied with the last one kept, the first in flattened order)."""
    rule = trim_threshold(None, trim_count(density, flat.numel()), flat.dtype, whole=flat)
    return rule.keep_mask(flat).nonzero().reshape(-1)


def pack_signs(flat: torch.Tensor) -> torch.Tensor:
    """Bit ``b`` of byte ``j`` is 1 where entry ``8j + b`` is > 0; the last byte is padded with 0."""
    bits = (flat > 0).to(torch.uint8)
    bits = torch.nn.functional.pad(bits, (0, -bits.numel() % 8)).reshape(-1, 8)
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8)
    return (bits * weights).sum(1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Entries [start, stop) of the sign bits (0 or 1, uint8) packed by ``pack_signs``."""
    first, last = start // 8, (stop + 7) // 8
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (packed[first:last].unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[start - 8 * first : stop - 8 * first]


def lowrank_rank(singular_values: torch.Tensor, shape: tuple[int, int], settings: dict) -> int:
    """The rank the ``lowrank`` layout keeps for a tensor of ``shape`` with these singular values."""
    m, n = shape
    if "rank" in settings:
        return min(settings["rank"], min(m, n))
    if "density" in settings:
        return max(1, min(min(m, n), int(settings["density"] * m * n / (m + n))))
    return rank_for_energy(singular_values, settings["energy"])


class _Encoder:
    """Encodes one tensor at a time; plans every tensor's parts before writing."""

    def __init__(self, vector, layout: str, settings: dict, device: torch.device | None = None):
        self.vector, self.layout, self.settings, self.device = vector, layout, settings, device
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    def compute_dtype(self, spec: TensorSpec) -> torch.dtype:
        return torch.float64 if spec.dtype == torch.float64 else torch.float32

    def dense(self, name: str) -> torch.Tensor:
        spec = self.vector.spec(name)
        return self.vector.get_tensor(name, self.compute_dtype(spec)).reshape(spec.shape)

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        """Where the decompositions run (the vector's host memory when no device is given)."""
        return t if self.device is None else t.to(self.device)

    def plan(self, name: str) -> _Encoded:
        spec = self.vector.spec(name)
        dense = _Encoded(spec, "dense", {part_name(name, "dense"): spec})
        value_dtype = spec.dtype
        if spec.numel and not bool(self.dense(name).any()):
            return _Encoded(spec, "zero", {})
        if self.layout == "sparse":
            k = trim_count(self.settings["density"], spec.numel) if spec.numel else 0
            index_dtype = torch.int32 if spec.numel <= _INT32_LIMIT else torch.int64
            return _Encoded(spec, "sparse", {part_name(name, "indices"): TensorSpec(index_dtype, (k,)), part_name(name, "values"): TensorSpec(value_dtype, (k,))})
        if len(spec.shape) != 2 or spec.numel == 0:
            return dense
        m, n = spec.shape
        if self.layout == "bitdelta":
            return _Encoded(spec, "bitdelta", {part_name(name, "signs"): TensorSpec(torch.uint8, ((spec.numel + 7) // 8,)), part_name(name, "scale"): TensorSpec(value_dtype, ())})
        # lowrank: the rank from density or rank needs no decomposition; energy needs the singular values
        singular = torch.linalg.svdvals(self._on_device(self.dense(name))).cpu() if "energy" in self.settings else None
        r = lowrank_rank(singular, (m, n), self.settings)
        if r * (m + n) >= m * n:
            return dense
        return _Encoded(spec, "lowrank", {part_name(name, "left"): TensorSpec(value_dtype, (m, r)), part_name(name, "right"): TensorSpec(value_dtype, (r, n))})

    def parts(self, name: str, encoded: _Encoded) -> dict[str, torch.Tensor]:
        """The stored tensors of ``name``; the last two tensors' are kept, since the
        writer asks for parts in its storage order, not tensor by tensor."""
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        t = self.dense(name)
        dtype = encoded.spec.dtype
        if encoded.encoding == "zero":
            out = {}
        elif encoded.encoding == "dense":
            out = {"dense": t.to(dtype)}
        elif encoded.encoding == "sparse":
            flat = t.reshape(-1)
            idx = sparse_indices(flat, self.settings["density"]) if flat.numel() else torch.zeros(0, dtype=torch.int64)
            out = {"indices": idx.to(encoded.parts[part_name(name, "indices")].dtype), "values": flat[idx].to(dtype)}
        elif encoded.encoding == "bitdelta":
            scale = t.abs().to(torch.float64).mean()
            out = {"signs": pack_signs(t.reshape(-1)), "scale": scale.to(dtype)}
        else:
            r = encoded.parts[part_name(name, "right")].shape[0]
            u, s, vh = torch.linalg.svd(self._on_device(t), full_matrices=False)
            out = {"left": (u[:, :r] * s[:r]).to(dtype).cpu().contiguous(), "right": vh[:r].to(dtype).cpu().contiguous()}
        self._cache[name] = out
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return out


@dataclass
class CompressionResult:
    """What ``compress`` wrote."""

    output: Path
    layout: str
    settings: dict
    fingerprint: str  # of the densified vector
    source_fingerprint: str | None
    stored_bytes: int
    dense_bytes: int
    encodings: dict[str, int]  # encoding -> number of tensors

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.stored_bytes if self.stored_bytes else math.inf


def compress(
    vector,
    output: str | os.PathLike,
    layout: str,
    density: float | None = None,
    rank: int | None = None,
    energy: float | None = None,
    source_fingerprint: str | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    device: "str | torch.device | None" = None,
) -> CompressionResult:
    """Store the task vector ``vector`` in a compressed ``layout`` at ``output`` (a
    ``.safetensors`` file or a folder), one tensor at a time; returns sizes and the
    densified vector's fingerprint. ``source_fingerprint`` (the stored vector's) is
    recorded in the metadata. With ``device`` the SVDs of ``lowrank`` run there."""
    settings = check_settings(layout, density, rank, energy)
    claim = OutputClaim(output, overwrite)  # held from before any work; the writer takes it over
    try:
        plans = _write_compressed(vector, claim, layout, settings, parse_device(device), source_fingerprint, progress)
    except BaseException:
        claim.release()  # idempotent: the writer may have let go already
        raise
    stored = open_checkpoint(output)  # the densified view
    counts: dict[str, int] = {}
    for p in plans.values():
        counts[p.encoding] = counts.get(p.encoding, 0) + 1
    return CompressionResult(
        output=Path(output),
        layout=layout,
        settings=settings,
        fingerprint=stored.fingerprint(),
        source_fingerprint=source_fingerprint,
        stored_bytes=stored.stored_bytes,
        dense_bytes=stored.dense_bytes,
        encodings=counts,
    )


def _write_compressed(vector, claim: OutputClaim, layout: str, settings: dict, device, source_fingerprint, progress) -> dict[str, _Encoded]:
    """Plan every tensor's encoding and write the layout through ``claim``; returns the plans."""
    encoder = _Encoder(vector, layout, settings, device)
    with one_torch_thread():  # decompositions give the same bits run after run
        plans = {name: encoder.plan(name) for name in vector.names}
        specs = {part: spec for p in plans.values() for part, spec in p.parts.items()}
        owner = {part: name for name, p in plans.items() for part in p.parts}
        metadata = {
            **vector.metadata(),
            meta_keys.LAYOUT: layout,
            meta_keys.LAYOUT_PARAMS: json.dumps(settings, sort_keys=True),
            meta_keys.LAYOUT_TENSORS: json.dumps({n: p.describe() for n, p in plans.items()}, sort_keys=True, separators=(",", ":")),
        }
        if source_fingerprint:
            metadata[meta_keys.SOURCE_FINGERPRINT] = source_fingerprint
        inputs = [src for term in vector.terms for src in term.sources()]  # never written over
        if layout == "lowrank":
            save_low_rank(_as_low_rank(encoder, plans), claim, metadata, progress=progress, inputs=inputs)
        else:
            with CheckpointWriter(claim, specs, metadata, inputs=inputs) as writer:
                seen = set()
                for part in writer.order:
                    name = owner[part]
                    writer.write(part, encoder.parts(name, plans[name])[part.rsplit("/", 1)[1]])
                    if progress is not None and name not in seen:
                        seen.add(name)
                        progress(name)
                writer.commit()
    return plans


def _as_low_rank(encoder: _Encoder, plans: dict[str, _Encoded]) -> LowRankCheckpoint:
    """The planned ``lowrank`` encoding as a low-rank checkpoint whose factors are computed when written."""
    low_rank, dense = {}, {}
    for name, plan in plans.items():
        spec = plan.spec
        if plan.encoding == "zero":
            low_rank[name] = LowRankTensor(spec.shape, 0, dtype=spec.dtype)
        elif plan.encoding == "dense":
            dense[name] = DenseDelta(spec, lambda n=name, p=plan: encoder.parts(n, p)["dense"])
        else:
            right = plan.parts[part_name(name, "right")]
            low_rank[name] = LowRankTensor(
                spec.shape,
                right.shape[0],
                left=lambda n=name, p=plan: encoder.parts(n, p)["left"],
                right=lambda n=name, p=plan: encoder.parts(n, p)["right"],
                dtype=spec.dtype,
                stored_nbytes=sum(s.nbytes for s in plan.parts.values()),
                factor_dtype=spec.dtype,
            )
    return LowRankCheckpoint(low_rank, dense, {}, str(encoder.vector))


# -- reading ----------------------------------------------------------------------


class CompressedCheckpoint(Checkpoint):
    """A compressed task vector seen as its dense tensors, densified block by block.

    Blocks are fixed runs of ``CHUNK_ELEMENTS`` entries of the flattened tensor, so a
    value reads back with the same bits whatever chunks ask for it; the last few
    blocks are kept, for the executor's chunks that share one.
    """

    _KEPT_BLOCKS = 4

    def __init__(self, stored: SafetensorsCheckpoint):
        self.stored = stored
        self.source = stored.source
        self.layout = stored.metadata()[meta_keys.LAYOUT]
        try:
            self.settings = json.loads(stored.metadata().get(meta_keys.LAYOUT_PARAMS, "{}"))
        except json.JSONDecodeError:
            raise TaskVecError(f"{self.source}: corrupt {self.layout} task vector: its {meta_keys.LAYOUT_PARAMS} metadata is not JSON") from None
        self._specs: dict[str, TensorSpec] = {}
        self._encoding: dict[str, str] = {}
        claimed: set[str] = set()
        for name, entry in layout_table(stored).items():
            spec = entry_spec(stored, name, entry)
            encoding = entry.get("encoding")
            if encoding not in _ENCODINGS[self.layout]:
                allowed = ", ".join(_ENCODINGS[self.layout])
                raise corrupt(stored, name, f"has encoding {encoding!r}, not one of {allowed} (the {self.layout} layout's)")
            claimed.update(_check_parts(stored, name, encoding, spec))
            self._specs[name], self._encoding[name] = spec, encoding
        refuse_unclaimed(stored, claimed)
        self._checked: set[str] = set()  # sparse tensors whose indices were checked
        self._blocks: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def keys(self) -> list[str]:
        return sorted(self._specs)

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def spec(self, name: str) -> TensorSpec:
        self._check(name)
        return self._specs[name]

    def encoding(self, name: str) -> str:
        self._check(name)
        return self._encoding[name]

    def metadata(self) -> dict[str, str]:
        return self.stored.metadata()

    @property
    def directory(self) -> Path | None:
        return self.stored.directory

    def paths(self) -> list[Path]:
        return self.stored.paths()

    @property
    def files(self) -> list[Path]:
        """The safetensors files that hold the stored layout (what a copy copies)."""
        return self.stored.files

    @property
    def stored_bytes(self) -> int:
        return self.stored.stored_bytes

    def get_tensor(self, name: str) -> torch.Tensor:
        """The whole dense tensor (a new tensor)."""
        spec = self.spec(name)
        return self.read_chunk(name, 0, spec.numel, spec.dtype).clone().reshape(spec.shape)

    def raw_bytes(self, name: str) -> memoryview:
        return tensor_bytes(self.get_tensor(name))

    def read_chunk(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        spec = self.spec(name)
        if self._encoding[name] == "dense":
            return flat_slice(self.stored.get_tensor(part_name(name, "dense")), start, stop, dtype)
        if stop <= start:
            return torch.empty(0, dtype=dtype)
        pieces = []
        for block in range(start // CHUNK_ELEMENTS, (stop - 1) // CHUNK_ELEMENTS + 1):
            lo = block * CHUNK_ELEMENTS
            values = self._block(name, block, lo, min(spec.numel, lo + CHUNK_ELEMENTS))
            pieces.append(values[max(start, lo) - lo : min(stop, lo + CHUNK_ELEMENTS) - lo])
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return out.to(dtype)

    def _block(self, name: str, block: int, lo: int, hi: int) -> torch.Tensor:
        key = (name, block)
        with self._lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return self._blocks[key]
        values = _DENSIFY[self._encoding[name]](self, name, lo, hi)
        with self._lock:
            self._blocks[key] = values
            while len(self._blocks) > self._KEPT_BLOCKS:
                self._blocks.popitem(last=False)
        return values

    def _part(self, name: str, part: str) -> torch.Tensor:
        return self.stored.get_tensor(part_name(name, part))

    def _zero(self, name: str, lo: int, hi: int) -> torch.Tensor:
        return torch.zeros(hi - lo, dtype=self._specs[name].dtype)

    def _sparse(self, name: str, lo: int, hi: int) -> torch.Tensor:
        indices, values = self._part(name, "indices"), self._part(name, "values")
        if name not in self._checked:
            _check_indices(self.stored, name, indices, self._specs[name].numel)
            with self._lock:
                self._checked.add(name)
        first = int(torch.searchsorted(indices, lo))
        last = int(torch.searchsorted(indices, hi))
        out = torch.zeros(hi - lo, dtype=self._specs[name].dtype)
        out[indices[first:last].to(torch.int64) - lo] = values[first:last]
        return out

    def _bitdelta(self, name: str, lo: int, hi: int) -> torch.Tensor:
        scale = self._part(name, "scale").to(self._specs[name].dtype)
        bits = unpack_signs(self._part(name, "signs"), lo, hi)
        return (bits.to(scale.dtype) * 2 - 1) * scale  # exactly +scale or -scale

    def _file_key(self) -> tuple | None:
        key = self.stored._file_key()
        return None if key is None else (*key, "densified")

    def _check(self, name: str) -> None:
        if name not in self._specs:
            raise TaskVecError(f"{self.source}: no tensor named {name!r}")


_ENCODINGS = {"sparse": ("zero", "sparse"), "bitdelta": ("zero", "dense", "bitdelta")}
_DENSIFY = {
    "zero": CompressedCheckpoint._zero,
    "sparse": CompressedCheckpoint._sparse,
    "bitdelta": CompressedCheckpoint._bitdelta,
}


def _check_parts(stored: SafetensorsCheckpoint, name: str, encoding: str, spec: TensorSpec) -> list[str]:
    """The stored parts of one tensor, each checked for its dtype and shape; returns their names."""
    if encoding == "zero":
        return []
    if encoding == "dense":
        return [check_part(stored, name, "dense", spec.shape, (spec.dtype,))]
    if encoding == "bitdelta":
        if len(spec.shape) != 2:
            raise corrupt(stored, name, f"is bitdelta-encoded with shape {list(spec.shape)}: only a matrix is")
        return [
            check_part(stored, name, "signs", ((spec.numel + 7) // 8,), (torch.uint8,)),
            check_part(stored, name, "scale", (), (spec.dtype,)),
        ]
    # sparse: as many values as indices, no more than the tensor has entries
    key = part_name(name, "indices")
    count = stored.spec(key).shape[0] if key in stored and len(stored.spec(key).shape) == 1 else None
    if count is None or count > spec.numel:
        shape = list(stored.spec(key).shape) if key in stored else None
        if shape is None:
            raise corrupt(stored, name, "lacks its stored part 'indices'")
        raise corrupt(stored, name, f"has part 'indices' of shape {shape}: not a list of at most {spec.numel} entries")
    return [
        check_part(stored, name, "indices", (count,), (torch.int32, torch.int64)),
        check_part(stored, name, "values", (count,), (spec.dtype,)),
    ]


def _check_indices(stored: SafetensorsCheckpoint, name: str, indices: torch.Tensor, numel: int) -> None:
    """A sparse tensor's flat indices: strictly ascending, each in [0, numel)."""
    if not indices.numel():
        return
    if int(indices[0]) < 0 or int(indices[-1]) >= numel:
        raise corrupt(stored, name, f"has an index outside [0, {numel}) (first {int(indices[0])}, last {int(indices[-1])})")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise corrupt(stored, name, "has indices that are not strictly ascending (a repeated or unordered index)")


register_layout("sparse", CompressedCheckpoint)
register_layout("bitdelta", CompressedCheckpoint)
