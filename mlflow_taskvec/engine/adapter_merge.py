"""Merging into one PEFT LoRA adapter, module by module, never materializing the model.

``merge_to_adapter`` writes ``scale * method(w_i, t_i)`` as a PEFT LoRA adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``) of the base, for inputs that are
PEFT adapters, low-rank task vectors or dense task vectors.

- ``task_arithmetic`` of low-rank inputs is exact: per module the factors are
  concatenated, each input's weight, the scale and its LoRA scaling folded into its
  ``A`` rows (PEFT's ``add_weighted_adapter(..., combination_type="cat")``); the module's
  rank is the sum of its inputs' ranks. Where that sum exceeds the module's size, the
  module goes the way below at full rank (lossless).
- Every other method (and task arithmetic with a ``rank``/``energy``, or with a dense
  input): the module's dense delta of each input is formed (that module's only), merged by
  the method exactly as ``merge_to`` merges it (``merging.merge_tensor``), scaled, and cut
  back to a rank by the truncated SVD ``export_lora`` uses (``lora.svd_factors``): ``rank``,
  or per module the smallest rank keeping ``energy`` of its squared Frobenius norm, by
  default the sum of the inputs' ranks there, capped by the module's size. Each module's
  relative Frobenius error ``||delta - B A|| / ||delta||`` is returned and recorded in the
  adapter's metadata (``taskvec.relative_errors``). ``svd="randomized"`` (opt-in: other bits)
  truncates by a seeded randomized SVD instead (``lora.randomized_svd``), several times faster
  per module and within a fraction of a percent of the exact error (docs/lora-merging.md).

Adapters with ``fan_in_fan_out`` (Conv1D weights stored (in, out), GPT-2's layout) are read
transposed (``lora.open_adapter``) and the merged adapter keeps their layout: ``fan_in_fan_out``
in its config and every module's factors stored as PEFT's Conv1D LoRA holds them.

Peak memory is the largest module's dense delta times the number of inputs (plus the
adapter being written), never the model. 1-D tensors (biases, norms) cannot go into a
LoRA adapter: where their merged delta is not zero they are left out and listed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlflow_taskvec.engine import metadata as meta_keys
from mlflow_taskvec.engine.checkpoint import SafetensorsCheckpoint, is_adapter, new_digest
from mlflow_taskvec.engine.checks import fraction, positive_int
from mlflow_taskvec.engine.coefficients import Coefficient
from mlflow_taskvec.engine.lora import (
    ADAPTER_WEIGHTS,
    SVD_METHODS,
    adapter_config,
    is_embedding_module,
    peft_factor_tensors,
    read_adapter_config,
    stores_conv1d,
    svd_factors,
    write_adapter,
)
from mlflow_taskvec.engine.lowrank import max_rank
from mlflow_taskvec.engine.merging import merge_tensor, plan_merge
from mlflow_taskvec.engine.output import OutputClaim, refuse_aliasing
from mlflow_taskvec.engine.streaming import check_finite, check_finite_output, one_torch_thread
from mlflow_taskvec.errors import ParameterError, TaskVecError

RELATIVE_ERRORS = "taskvec.relative_errors"  # JSON {module: ||delta - B A|| / ||delta||} of a merged adapter


@dataclass
class MergedModule:
    name: str  # the tensor, NAME.weight
    module: str
    rank: int
    relative_error: float  # 0.0 where the factors were concatenated (exact)
    exact: bool  # concatenated factors (task arithmetic of low-rank inputs)
    embedding: bool = False


@dataclass
class AdapterMergeResult:
    """What ``merge_to_adapter`` wrote."""

    output: Path
    method: str
    scale: Coefficient
    weights: list[Coefficient]
    params: dict
    base_fingerprint: str
    r: int
    rank_pattern: dict[str, int]
    modules: list[MergedModule]
    left_out: dict[str, float] = field(default_factory=dict)  # 1-D tensors with a non-zero merged delta -> its ||.||^2
    zero: list[str] = field(default_factory=list)  # 2-D tensors whose merged delta is zero: not in the adapter
    seconds: float = 0.0
    bytes_written: int = 0

    @property
    def relative_error(self) -> float:
        """The largest module's relative Frobenius error."""
        return max((m.relative_error for m in self.modules), default=0.0)


def check_rank_settings(rank: int | None, energy: float | None, svd: str = "exact") -> None:
    """``rank`` and ``energy`` as ``export_lora`` checks them, but both optional here; ``svd`` one of
    ``SVD_METHODS`` (the randomized one needs a rank: ``energy`` asks for the whole spectrum)."""
    if svd not in SVD_METHODS:
        raise ParameterError("svd", f"{svd!r} is not one of {', '.join(SVD_METHODS)}")
    if svd == "randomized" and energy is not None:
        raise ParameterError("svd", "randomized needs a rank (the given one or the default), not energy: the energy rule needs every singular value")
    if rank is not None and energy is not None:
        raise ParameterError("rank", "give at most one of rank or energy")
    if rank is not None:
        positive_int(rank, "rank")
    if energy is not None:
        fraction(energy, "energy")


def check_adapter_bases(folders: "Sequence[tuple[int, str | os.PathLike]]") -> None:
    """Refuse PEFT adapter folders (``(input index, folder)``) whose ``base_model_name_or_path``
    name two different bases (before they are opened, so before any warning about them)."""
    named: dict[str, int] = {}
    for i, folder in folders:
        if not is_adapter(folder):
            continue
        base_name = read_adapter_config(Path(folder)).base_model_name_or_path
        if base_name:
            named.setdefault(base_name, i)
            if len(named) > 1:
                (first, j), (other, _) = list(named.items())[:2]
                raise TaskVecError(f"vectors[{i}]: the adapters name different bases: vectors[{j}] {first!r}, vectors[{i}] {other!r}")


def adapters_fan_in_fan_out(folders: "Sequence[tuple[int, str | os.PathLike]]") -> bool:
    """Whether the PEFT adapter folders among ``folders`` (``(input index, folder)``) store Conv1D
    weights (``fan_in_fan_out``, GPT-2's layout), which the merged adapter then keeps; refused where
    they disagree (PEFT fixes the orientation by the module's type, so one base has one)."""
    seen: dict[bool, int] = {}
    for i, folder in folders:
        if is_adapter(folder):
            seen.setdefault(read_adapter_config(Path(folder)).fan_in_fan_out, i)
    if len(seen) > 1:
        raise TaskVecError(
            f"vectors[{seen[False]}] has fan_in_fan_out false and vectors[{seen[True]}] true: adapters of one base store its weights one way"
        )
    return True in seen


def _check_adapter_inputs(base, vectors) -> bool:
    """Refuse adapters that name two different bases or disagree on ``fan_in_fan_out``, and an input
    module whose rank exceeds its size; whether the merged adapter is ``fan_in_fan_out``: as its
    input adapters are, or without one as the base's layout is (``lora.stores_conv1d``)."""
    adapters = [(i, v.low_rank_source.source) for i, v in enumerate(vectors) if v.low_rank_source is not None]
    check_adapter_bases(adapters)
    fan_in_fan_out = adapters_fan_in_fan_out(adapters) if any(is_adapter(folder) for _, folder in adapters) else stores_conv1d(base)
    for i, v in enumerate(vectors):
        low = v.low_rank_source
        if low is None:
            continue
        for name in v.names:
            t = low.low_rank.get(name)
            if t is not None and len(t.shape) == 2 and t.rank > max_rank(t.shape):
                raise TaskVecError(
                    f"vectors[{i}] ({low.source}): tensor {name!r} has rank {t.rank}, more than its size {list(t.shape)} allows"
                )
    return fan_in_fan_out


def merge_to_adapter(
    base,
    vectors: Sequence,
    weights: Sequence[Coefficient],
    output: "str | os.PathLike",
    method: str = "task_arithmetic",
    scale: Coefficient = 1.0,
    params: dict | None = None,
    rank: int | None = None,
    energy: float | None = None,
    svd: str = "exact",
    base_model_name_or_path: str | None = None,
    compute_dtype: "str | torch.dtype" = "float32",
    dtype: torch.dtype = torch.float32,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
    progress=None,
) -> AdapterMergeResult:
    """Write ``scale * method(weights, vectors)`` of ``base`` as a PEFT LoRA adapter at ``output``
    (see the module docstring); nothing is written when anything is refused. ``svd="randomized"``
    (opt-in; other bits than the default ``"exact"``) truncates by ``lora.randomized_svd``."""
    started = time.perf_counter()
    check_rank_settings(rank, energy, svd)
    claim = OutputClaim(output, overwrite)
    try:
        plan = plan_merge(base, vectors, weights, method, scale, params, compute_dtype)
        fan_in_fan_out = _check_adapter_inputs(plan.base, vectors)
        dense_inputs = [i for i, v in enumerate(vectors) if v.low_rank_source is None]
        if dense_inputs and rank is None and energy is None:
            i = dense_inputs[0]
            raise TaskVecError(
                f"vectors[{i}] ({vectors[i].source}) is a dense task vector: give --rank or --energy to cut it to a LoRA adapter"
            )
        refuse_aliasing(claim.path, [p for v in plan.vectors for term in v.terms for src in term.sources() for p in src.paths()] + plan.base.paths())
        with one_torch_thread():  # intra-op threads fork/join per module and stall on a busy machine (as in merge_to)
            result = _merge(plan, list(vectors), rank, energy, svd, dtype, allow_nonfinite, fan_in_fan_out, progress)
        tensors, ranks = result.pop("tensors"), result.pop("ranks")
        if not ranks:
            raise TaskVecError("the merged delta is zero on every 2-D weight: there is no adapter to write")
        r, rank_pattern, config = adapter_config(ranks, base_model_name_or_path, fan_in_fan_out=fan_in_fan_out)
        meta = {
            "format": "pt",
            **(metadata or {}),
            meta_keys.BASE_FINGERPRINT: plan.base_fingerprint,
            RELATIVE_ERRORS: json.dumps({m.module: m.relative_error for m in result["modules"]}, sort_keys=True),
        }
        write_adapter(claim, tensors, config, meta)
    finally:
        claim.release()
    return AdapterMergeResult(
        output=Path(output),
        method=plan.method.name,
        scale=plan.scale,
        weights=plan.weights,
        params=plan.params,
        base_fingerprint=plan.base_fingerprint,
        r=r,
        rank_pattern=rank_pattern,
        seconds=time.perf_counter() - started,
        bytes_written=sum(p.stat().st_size for p in Path(output).iterdir() if p.is_file()),
        **result,
    )


def _merge(plan, originals, rank, energy, svd, dtype, allow_nonfinite, fan_in_fan_out, progress) -> dict:
    modules: list[MergedModule] = []
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    left_out: dict[str, float] = {}
    zero: list[str] = []
    compute = plan.compute
    for name in sorted(plan.covered):
        shape = tuple(plan.specs[name].shape)
        module = name.rsplit(".", 1)[0] if "." in name else name
        coefs = [plan.tensor_scale[name] * w for w in plan.tensor_weights[name]]
        factors = _factors(originals, name)  # per input: (left, right, scaling, rank), None (zero) or "dense"
        is_matrix = len(shape) == 2 and name.endswith(".weight")
        if all(f is None for f in factors):  # zero in every input: zero whatever the method
            if is_matrix:
                zero.append(name)
            if progress is not None:
                progress(name)
            continue
        if is_matrix and plan.method.linear and rank is None and energy is None and "dense" not in factors:
            present = [(f, c) for f, c in zip(factors, coefs) if f is not None and c != 0]
            total = sum(f[3] for f, _ in present)
            if total == 0:  # only weights of 0
                zero.append(name)
                if progress is not None:
                    progress(name)
                continue
            if total <= min(shape):
                left = torch.cat([f[0]().to(torch.float64) for f, _ in present], dim=1)
                right = torch.cat([f[1]().to(torch.float64) * (f[2] * c) for f, c in present], dim=0)
                b_factor, a_factor = left.to(dtype), right.to(dtype)
                if not allow_nonfinite:
                    check_finite_output(b_factor.reshape(-1), name, 0, b_factor.numel())
                    check_finite_output(a_factor.reshape(-1), name, 0, a_factor.numel())
                embedding = is_embedding_module(module)
                tensors.update(peft_factor_tensors(module, b_factor, a_factor, embedding, fan_in_fan_out))
                ranks[module] = total
                modules.append(MergedModule(name, module, total, 0.0, True, embedding))
                if progress is not None:
                    progress(name)
                continue
            # more factors than the module has room for: the SVD at full rank below
        delta = _merged_delta(plan, name, shape, compute, allow_nonfinite)
        norm_sq = float(delta.double().square().sum())
        if not is_matrix:
            if norm_sq > 0:
                left_out[name] = norm_sq
        elif norm_sq == 0:
            zero.append(name)
        else:
            target = rank
            if rank is None and energy is None:
                if "dense" in factors:  # a 2-D tensor an adapter saved whole (modules_to_save)
                    i = factors.index("dense")
                    raise TaskVecError(
                        f"vectors[{i}]: tensor {name!r} is a dense delta (saved whole): give --rank or --energy to cut it to a LoRA module"
                    )
                target = sum(f[3] for f in factors if f is not None)
            if target is not None:
                target = min(target, min(shape))
            b_factor, a_factor, err_sq = svd_factors(delta.to(torch.float32), target, energy, dtype, svd, name)
            embedding = is_embedding_module(module)
            tensors.update(peft_factor_tensors(module, b_factor, a_factor, embedding, fan_in_fan_out))
            ranks[module] = int(b_factor.shape[1])
            modules.append(MergedModule(name, module, int(b_factor.shape[1]), math.sqrt(err_sq / norm_sq), False, embedding))
        del delta
        if progress is not None:
            progress(name)
    return {"tensors": tensors, "ranks": ranks, "modules": modules, "left_out": left_out, "zero": zero}


def _factors(originals, name: str) -> list:
    """Per input: its low-rank factors of ``name`` as (left, right, scaling, rank), None where its
    delta there is zero (rank 0, or a tensor it lacks), or "dense"."""
    out = []
    for v in originals:
        if name not in v.names:
            out.append(None)
            continue
        low = v.low_rank_source
        t = low.low_rank.get(name) if low is not None else None
        if t is None:
            out.append("dense")
        elif t.rank == 0:
            out.append(None)
        else:
            out.append((t.left, t.right, t.scaling, t.rank))
    return out


def _merged_delta(plan, name: str, shape: tuple[int, ...], compute: torch.dtype, allow_nonfinite: bool) -> torch.Tensor:
    """``scale * method(w_i, t_i)`` of the one tensor ``name``: each input's dense delta of it, merged
    as ``merge_to`` merges it."""
    numel = plan.specs[name].numel
    base_tensor = plan.base.get_tensor(name).to(compute)
    deltas = [v.chunk(name, 0, numel, compute) for v in plan.vectors]
    if not allow_nonfinite:
        check_finite(base_tensor.reshape(-1), lambda: f"tensor {name!r} of the base {plan.base.source}")
        for v, d in zip(plan.vectors, deltas):
            v.check_finite(name, 0, numel, d)
    merged = merge_tensor(plan.method, name, base_tensor, deltas, plan.tensor_weights[name], plan.params, compute)
    delta = merged.mul(plan.tensor_scale[name]).reshape(shape)
    if not allow_nonfinite:
        check_finite_output(delta.reshape(-1), name, 0, numel)
    return delta



def adapter_delta_fingerprint(folder: "str | os.PathLike") -> str:
    """What decides an adapter's deltas, as one fingerprint: the config's ranks, alphas and
    layout (not the base's name, nor how the config file is written) and the factors' tensors
    (not the file's metadata). Equal for a merged adapter and the copy PEFT saves of it."""
    folder = Path(folder)
    config = dataclasses.replace(read_adapter_config(folder), base_model_name_or_path=None)
    digest = new_digest()
    digest.update(json.dumps(dataclasses.asdict(config), sort_keys=True).encode("utf-8"))
    digest.update(SafetensorsCheckpoint([folder / ADAPTER_WEIGHTS], str(folder)).fingerprint(fresh=True).encode("ascii"))
    return digest.hexdigest()
