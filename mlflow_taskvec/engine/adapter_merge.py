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

Peak memory is the largest module's dense delta times the number of inputs, times the threads
merging modules side by side (``threads``, default the cores; plus the
adapter being written), never the model. 1-D tensors (biases, norms) cannot go into a
LoRA adapter: where their merged delta is not zero they are left out and listed.
"""

from __future__ import annotations

import dataclasses
import functools
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
from mlflow_taskvec.engine.streaming import OrderedPool, check_finite, check_finite_output, one_torch_thread, parse_threads, release_free_memory
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
    threads: int | None = None,
) -> AdapterMergeResult:
    """Write ``scale * method(weights, vectors)`` of ``base`` as a PEFT LoRA adapter at ``output``
    (see the module docstring); nothing is written when anything is refused. ``svd="randomized"``
    (opt-in; other bits than the default ``"exact"``) truncates by ``lora.randomized_svd``.
    ``threads`` compute threads merge modules side by side (default: the machine's cores; the
    same bits for any number, each module computed alone on one torch thread)."""
    started = time.perf_counter()
    check_rank_settings(rank, energy, svd)
    workers = parse_threads(threads)
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
            result = _merge(plan, list(vectors), rank, energy, svd, dtype, allow_nonfinite, fan_in_fan_out, progress, workers)
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


def _merge(plan, originals, rank, energy, svd, dtype, allow_nonfinite, fan_in_fan_out, progress, workers=1) -> dict:
    """Every tensor's module merged on ``workers`` threads (each module alone, single-threaded, so
    the same bits for any number), gathered in name order."""
    gathered = _Gathered(progress)
    jobs = functools.partial(_merge_module, plan, originals, rank, energy, svd, dtype, allow_nonfinite, fan_in_fan_out)
    # a module's job holds its inputs' dense deltas while it runs: at most `workers` run at once,
    # and a finished one keeps only its factors
    with OrderedPool(gathered, workers=workers, max_pending=2 * workers) as pool:
        for name in sorted(plan.covered):
            pool.submit(name, functools.partial(jobs, name))
    return gathered.result()


class _Gathered:
    """The sink of ``_merge``'s pool: each module's outcome, in name order."""

    def __init__(self, progress):
        self.progress = progress
        self.modules: list[MergedModule] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.ranks: dict[str, int] = {}
        self.left_out: dict[str, float] = {}
        self.zero: list[str] = []

    def write(self, name: str, outcome: tuple) -> None:
        kind, value = outcome
        if kind == "zero":
            self.zero.append(name)
        elif kind == "left_out":
            self.left_out[name] = value
        elif kind == "module":
            module, tensors = value
            self.tensors.update(tensors)
            self.ranks[module.module] = module.rank
            self.modules.append(module)
        if self.progress is not None:
            self.progress(name)

    def result(self) -> dict:
        return {"tensors": self.tensors, "ranks": self.ranks, "modules": self.modules, "left_out": self.left_out, "zero": self.zero}


def _merge_module(plan, originals, rank, energy, svd, dtype, allow_nonfinite, fan_in_fan_out, name) -> tuple:
    """The outcome of one tensor: ("zero", None), ("left_out", ||delta||^2), ("module", (MergedModule,
    its adapter tensors)) or ("none", None) (a 1-D tensor whose merged delta is zero)."""
    shape = tuple(plan.specs[name].shape)
    module = name.rsplit(".", 1)[0] if "." in name else name
    coefs = [plan.tensor_scale[name] * w for w in plan.tensor_weights[name]]
    factors = _factors(originals, name)  # per input: (left, right, scaling, rank), None (zero) or "dense"
    is_matrix = len(shape) == 2 and name.endswith(".weight")
    if all(f is None for f in factors):  # zero in every input: zero whatever the method
        return ("zero", None) if is_matrix else ("none", None)
    if is_matrix and plan.method.linear and rank is None and energy is None and "dense" not in factors:
        present = [(f, c) for f, c in zip(factors, coefs) if f is not None and c != 0]
        total = sum(f[3] for f, _ in present)
        if total == 0:  # only weights of 0
            return ("zero", None)
        if total <= min(shape):
            left = torch.cat([f[0]().to(torch.float64) for f, _ in present], dim=1)
            right = torch.cat([f[1]().to(torch.float64) * (f[2] * c) for f, c in present], dim=0)
            b_factor, a_factor = left.to(dtype), right.to(dtype)
            if not allow_nonfinite:
                check_finite_output(b_factor.reshape(-1), name, 0, b_factor.numel())
                check_finite_output(a_factor.reshape(-1), name, 0, a_factor.numel())
            embedding = is_embedding_module(module)
            tensors = peft_factor_tensors(module, b_factor, a_factor, embedding, fan_in_fan_out)
            return ("module", (MergedModule(name, module, total, 0.0, True, embedding), tensors))
        # more factors than the module has room for: the SVD at full rank below
    delta = _merged_delta(plan, name, shape, plan.compute, allow_nonfinite)
    norm_sq = float(delta.double().square().sum())
    if not is_matrix:
        return ("left_out", norm_sq) if norm_sq > 0 else ("none", None)
    if norm_sq == 0:
        return ("zero", None)
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
    del delta
    release_free_memory()  # the module's deltas and the SVD's work space, freed into this thread's arena
    embedding = is_embedding_module(module)
    tensors = peft_factor_tensors(module, b_factor, a_factor, embedding, fan_in_fan_out)
    k = int(b_factor.shape[1])
    return ("module", (MergedModule(name, module, k, math.sqrt(err_sq / norm_sq), False, embedding), tensors))


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
