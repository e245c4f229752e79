"""Describing a checkpoint or task vector: counts, dtypes, fingerprint, norms."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from mlflow_taskvec.engine import metadata as meta_keys
from mlflow_taskvec.engine.checkpoint import Checkpoint
from mlflow_taskvec.engine.merging import union_of_tensors
from mlflow_taskvec.engine.lowrank import LowRankCheckpoint
from mlflow_taskvec.engine.streaming import chunk_ranges, flat_slice
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.tables import smaller_by

REPORTED_METADATA = (meta_keys.TASK, meta_keys.BASE_FINGERPRINT, meta_keys.METHOD, meta_keys.RECIPE_SHA256)  # what the text report names


@dataclass
class Description:
    source: str
    kind: str
    fingerprint: str
    num_tensors: int
    num_parameters: int
    dtypes: dict[str, int]  # dtype -> parameter count
    l2_norm: float  # over floating-point tensors
    tensor_norms: dict[str, float] = field(repr=False)
    metadata: dict[str, str] = field(default_factory=dict, repr=False)
    layout: str = "dense"  # how the tensors are stored (engine/layouts.py)
    stored_bytes: int = 0  # tensor data as stored
    dense_bytes: int = 0  # the tensors' own size

    # for a vector in the low-rank layout (engine/lowrank.py): ranks {name: rank}, dense_tensors, zero_tensors
    low_rank: dict | None = None

    def as_dict(self, top: int = 10, layers: bool = False) -> dict:
        """What ``inspect --format json`` prints: the description with the ``top`` largest tensors
        (and the norms by layer with ``layers``)."""
        out = {
            "source": self.source,
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "num_tensors": self.num_tensors,
            "num_parameters": self.num_parameters,
            "dtypes": self.dtypes,
            "l2_norm": self.l2_norm,
            "largest": [{"name": n, "l2_norm": v} for n, v in self.largest(top)],
            "metadata": self.metadata,
            "layout": self.layout,
            "stored_bytes": self.stored_bytes,
            "dense_bytes": self.dense_bytes,
        }
        if self.low_rank is not None:
            out["low_rank"] = self.low_rank
        if layers:
            out["layers"] = self.layer_norms()
        return out

    def lines(self, top: int = 10, layers: bool = False) -> list[str]:
        """What ``inspect`` prints as text: the description with the ``top`` largest tensors
        (and the norms by layer with ``layers``)."""
        lines = [f"source: {self.source}", f"kind: {self.kind}"]
        lines += [f"{key.removeprefix('taskvec.')}: {self.metadata[key]}" for key in REPORTED_METADATA if key in self.metadata]
        lines += [
            f"tensors: {self.num_tensors}",
            f"parameters: {self.num_parameters}",
            "dtypes: " + ", ".join(f"{k} ({v})" for k, v in sorted(self.dtypes.items())),
            f"fingerprint: {self.fingerprint}",
            f"l2 norm: {self.l2_norm:.6g}",
        ]
        if self.layout != "dense":
            lines.append(f"layout: {self.layout}")
            lines.append(f"size: {self.stored_bytes} bytes stored, {self.dense_bytes} dense ({smaller_by(self.stored_bytes, self.dense_bytes)})")
            if self.low_rank is not None:
                ranks = ", ".join(map(str, sorted(set(self.low_rank["ranks"].values())))) or "-"
                lines.append(f"low-rank tensors: {len(self.low_rank['ranks'])} (rank {ranks}); dense: {self.low_rank['dense_tensors']}; zero: {self.low_rank['zero_tensors']}")
        if top > 0 and self.tensor_norms:
            largest = self.largest(top)
            lines.append(f"largest {min(top, len(self.tensor_norms))} tensors by l2 norm:")
            width = max(len(n) for n, _ in largest)
            lines += [f"  {name:<{width}}  {norm:.6g}" for name, norm in largest]
        if layers:
            groups = self.layer_norms()
            width = max((len(n) for n in groups), default=0)
            lines += ["l2 norm by layer:", *(f"  {name:<{width}}  {norm:.6g}" for name, norm in groups.items())]
        return lines

    def largest(self, n: int = 10) -> list[tuple[str, float]]:
        return sorted(self.tensor_norms.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def layer_norms(self, depth: int | None = None) -> dict[str, float]:
        """L2 norms grouped by layer: names cut after their numeric block index
        (``model.layers.3.mlp.up.weight`` -> ``model.layers.3``), or after ``depth`` parts."""
        groups: dict[str, float] = {}
        for name, norm in self.tensor_norms.items():
            parts = name.split(".")
            if depth is not None:
                key = ".".join(parts[:depth])
            else:
                idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
                key = ".".join(parts[: idx + 1]) if idx is not None else ".".join(parts[:-1]) or name
            groups[key] = groups.get(key, 0.0) + norm * norm
        return {k: math.sqrt(v) for k, v in groups.items()}


def tensor_norm(tensor: torch.Tensor) -> float:
    sq = 0.0
    for start, stop in chunk_ranges(tensor.numel()):
        x = flat_slice(tensor, start, stop, torch.float64)
        sq += float(torch.dot(x, x))
    return math.sqrt(sq)


def describe(ckpt: Checkpoint) -> Description:
    meta = ckpt.metadata()
    dtypes: Counter[str] = Counter()
    norms: dict[str, float] = {}
    for name in ckpt.keys():
        spec = ckpt.spec(name)
        dtypes[str(spec.dtype).removeprefix("torch.")] += spec.numel
        if spec.is_floating_point:
            norms[name] = tensor_norm(ckpt.get_tensor(name))
    return Description(
        source=ckpt.source,
        kind=meta.get(meta_keys.KIND, "checkpoint"),
        fingerprint=ckpt.fingerprint(),
        num_tensors=len(ckpt.keys()),
        num_parameters=ckpt.num_parameters(),
        dtypes=dict(dtypes),
        l2_norm=math.sqrt(sum(v * v for v in norms.values())),
        tensor_norms=norms,
        metadata=meta,
        layout=meta.get(meta_keys.LAYOUT, "dense"),
        stored_bytes=ckpt.stored_bytes,
        dense_bytes=ckpt.dense_bytes,
        low_rank=_low_rank_summary(ckpt),
    )


def _low_rank_summary(ckpt: Checkpoint) -> dict | None:
    if not isinstance(ckpt, LowRankCheckpoint):
        return None
    ranks = {n: ckpt.rank(n) for n in ckpt.keys() if ckpt.rank(n)}
    return {
        "ranks": ranks,
        "dense_tensors": sum(1 for n in ckpt.keys() if ckpt.rank(n) is None),
        "zero_tensors": sum(1 for n in ckpt.keys() if ckpt.rank(n) == 0),
    }


def cosine_matrix(vectors) -> "torch.Tensor":
    """Pairwise cosine similarities of task vectors, in one streaming pass.

    Each chunk of every vector is stacked into a matrix X and ``X @ X.T`` is
    accumulated in float64, so n vectors cost one read each, not n(n-1)/2 pairs.
    """
    first = vectors[0]
    for other in vectors[1:]:
        first._check_compatible(other)
    specs = union_of_tensors(vectors)
    vectors = [v.with_tensors(specs) for v in vectors]  # a tensor one lacks is zero there
    n = len(vectors)
    gram = torch.zeros((n, n), dtype=torch.float64)
    for name, spec in specs.items():
        for start, stop in chunk_ranges(spec.numel):
            x = torch.stack([v.chunk(name, start, stop, torch.float64) for v in vectors])
            gram += x @ x.T
    norms = gram.diagonal().sqrt()
    zero = [i for i in range(n) if norms[i] == 0]
    if zero:
        raise TaskVecError(f"{vectors[zero[0]].source}: the task vector is all zeros, so its cosine similarity is undefined")
    return gram / torch.outer(norms, norms)
