"""PEFT LoRA adapters as task vectors, and task vectors as LoRA adapters.

Reading (``open_adapter``): a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) is the task vector of its base. Per target
module the delta is PEFT's ``get_delta_weight``: ``(B @ A) * scaling`` with
``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``),
``r`` and ``lora_alpha`` taken per module from ``rank_pattern`` /
``alpha_pattern`` as PEFT matches them, transposed under ``fan_in_fan_out`` and
for embedding LoRA (``lora_embedding_A/B``). Tensors the adapter saves whole
(``modules_to_save``, biases trained with ``bias: all | lora_only``) are deltas
``saved - base``; ``lora_bias`` adds ``lora_B.bias * scaling`` to the base's bias.
Every other floating-point tensor of the base is a zero (rank-0) delta, so the
vector has the base's tensors like any extracted one. The factors stay factors
(see ``lowrank``); they are multiplied out one tensor at a time.

Writing (``export_lora``): each 2-D delta is cut to rank ``r`` by truncated SVD
and written as a PEFT adapter with ``lora_alpha = r`` (scaling 1); of a GPT-2-style base
(``stores_conv1d``) as ``fan_in_fan_out``, its Conv1D weights' factors stored as PEFT holds them.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlflow_taskvec.engine import metadata as meta_keys
from mlflow_taskvec.engine.checkpoint import ADAPTER_CONFIG, Checkpoint, SafetensorsCheckpoint, new_digest, open_checkpoint
from mlflow_taskvec.engine.checks import finite_number, fraction, positive_int
from mlflow_taskvec.engine.io import TensorSpec
from mlflow_taskvec.engine.lowrank import DENSE_DTYPE, DenseDelta, LowRankCheckpoint, LowRankTensor, rank_for_energy
from mlflow_taskvec.engine.output import OutputClaim, refuse_aliasing
from mlflow_taskvec.engine.writer import CheckpointWriter
from mlflow_taskvec.errors import ParameterError, TaskVecError, TaskVecWarning

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# PEFT's LoraConfig default, for a config that leaves it out
DEFAULT_LORA_ALPHA = 8
# Module names PEFT wraps as embedding LoRA when an exported adapter targets them.
_EMBEDDING_HINTS = ("embed", "wte", "wpe")
# Hugging Face model types whose attention and MLP weights are transformers' Conv1D, stored (in, out)
# (PEFT's fan_in_fan_out), and those modules' names there; their other 2-D weights are Linear or Embedding.
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
CONV1D_MODULES = ("c_attn", "q_attn", "c_proj", "c_fc")
# Above this many entries a delta given a small rank is factored by the seeded ``randomized_svd``
# (the same bits every run; an exact SVD of an LLM's 32000 x 4096 embedding takes minutes).
RANDOMIZED_SVD_ABOVE = 4096 * 4096
# The opt-in randomized SVD (``svd="randomized"``): extra sketch columns and power iterations.
SVD_METHODS = ("exact", "randomized")
RANDOMIZED_OVERSAMPLE = 32
RANDOMIZED_POWER_ITERATIONS = 2


def adapter_fingerprint(path: "str | os.PathLike", fresh: bool = False) -> str:
    """The content fingerprint of an adapter folder as stored: its config and its factors.

    An adapter's task vector needs its base; this names the adapter alone, which is what
    a download is checked against and cached by.
    """
    path = Path(path)
    digest = new_digest()
    digest.update((path / ADAPTER_CONFIG).read_bytes())
    digest.update(SafetensorsCheckpoint([path / ADAPTER_WEIGHTS], str(path)).fingerprint(fresh=fresh).encode("ascii"))
    return digest.hexdigest()


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` that decide the deltas."""

    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model_name_or_path: str | None

    def rank_and_scaling(self, module: str) -> tuple[int, float]:
        """PEFT's per-module r and scaling (``LoraModel._create_and_replace``)."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return r, (alpha / math.sqrt(r) if self.use_rslora else alpha / r)


def _pattern_key(patterns: dict, key: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of ``key`` at a dot."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def read_adapter_config(path: Path) -> AdapterConfig:
    where = path / ADAPTER_CONFIG
    try:
        data = json.loads(where.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise TaskVecError(f"{where}: not a valid JSON adapter config") from None
    if not isinstance(data, dict):
        raise TaskVecError(f"{where}: an adapter config must be a JSON object")
    peft_type = data.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise TaskVecError(f"{where}: peft_type: {peft_type!r} is not LORA (only LoRA adapters are task vectors)")
    if data.get("use_dora"):
        raise TaskVecError(f"{where}: use_dora: DoRA adapters are not supported (their delta is not (B @ A) * scaling)")
    for unsupported in ("target_parameters", "trainable_token_indices", "layer_replication"):
        if data.get(unsupported):
            raise TaskVecError(f"{where}: {unsupported}: not supported in a task vector")
    if "r" not in data:
        raise TaskVecError(f"{where}: r: required field is missing")
    r = positive_int(data["r"], f"{where}: r")
    rank_pattern = {str(k): positive_int(v, f"{where}: rank_pattern[{k!r}]") for k, v in (data.get("rank_pattern") or {}).items()}
    alpha = data.get("lora_alpha", DEFAULT_LORA_ALPHA)
    alpha_pattern = {str(k): finite_number(v, f"{where}: alpha_pattern[{k!r}]") for k, v in (data.get("alpha_pattern") or {}).items()}
    base = data.get("base_model_name_or_path")
    return AdapterConfig(
        r=r,
        lora_alpha=finite_number(alpha, f"{where}: lora_alpha"),
        use_rslora=bool(data.get("use_rslora", False)),
        fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        base_model_name_or_path=str(base) if base else None,
    )


# -- reading an adapter -----------------------------------------------------------------------------

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)$")


def open_adapter(path: "str | os.PathLike", base: "Checkpoint | str | os.PathLike | None" = None) -> LowRankCheckpoint:
    """The task vector of a PEFT LoRA adapter on ``base``, as a lazy low-rank checkpoint.

    Without ``base``, the adapter's ``base_model_name_or_path`` is used when it is a local
    folder. Warns (``TaskVecWarning``) when the adapter names another base than ``base``.
    """
    path = Path(path)
    config = read_adapter_config(path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = path / "adapter_model.bin"
        hint = f" ({pickled.name} is pickle, never loaded)" if pickled.is_file() else ""
        raise TaskVecError(f"{path}: no {ADAPTER_WEIGHTS}{hint}")
    if base is None:
        named = config.base_model_name_or_path
        if not named or not Path(named).is_dir():
            raise TaskVecError(
                f"{path}: a LoRA adapter is a task vector of its base: give the base (its base_model_name_or_path {named!r} is not a local folder)"
            )
        base = named
    base_ckpt = open_checkpoint(base)
    _warn_if_other_base(path, config, base_ckpt)
    factors = SafetensorsCheckpoint([weights], str(path))

    lora_parts: dict[str, dict[str, str]] = {}
    whole: dict[str, str] = {}  # base name -> adapter key of a tensor saved whole
    for key in factors.keys():
        name = key.removeprefix(PEFT_PREFIX)
        if "lora_magnitude_vector" in name:
            raise TaskVecError(f"{path}: tensor {key!r} is a DoRA magnitude vector; DoRA adapters are not supported")
        m = _LORA_KEY.match(name)
        if m:
            lora_parts.setdefault(m["module"], {})[m["part"]] = key
        else:
            whole[name.replace(".base_layer.", ".")] = key

    low_rank: dict[str, LowRankTensor] = {}
    dense: dict[str, DenseDelta] = {}
    bias_addends: dict[str, tuple[str, float]] = {}
    for module, parts in sorted(lora_parts.items()):
        rank, scaling = config.rank_and_scaling(module)
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key, b_key = (parts.get("lora_embedding_A"), parts.get("lora_embedding_B")) if embedding else (parts.get("lora_A.weight"), parts.get("lora_B.weight"))
        if a_key is None or b_key is None:
            raise TaskVecError(f"{path}: module {module!r} has only one of its LoRA factors A and B")
        a, b = factors.spec(a_key), factors.spec(b_key)
        for key, spec in ((a_key, a), (b_key, b)):
            if len(spec.shape) != 2 or not spec.is_floating_point:
                raise TaskVecError(
                    f"{path}: factor {key!r} is {len(spec.shape)}-D {spec.dtype}; only Linear and Embedding LoRA (2-D floating-point factors) are supported"
                )
        if a.shape[0] != rank or b.shape[1] != rank:
            raise TaskVecError(
                f"{path}: module {module!r} has factors A {list(a.shape)} and B {list(b.shape)}, which disagree with its r = {rank}"
            )
        name = f"{module}.weight"
        # delta = B @ A (out, in); transposed for embeddings and fan_in_fan_out: A.T @ B.T
        transposed = embedding or config.fan_in_fan_out
        shape = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        _check_against_base(path, base_ckpt, name, shape, f"module {module!r}")
        if transposed:
            left, right = _transposed(factors, a_key), _transposed(factors, b_key)
        else:
            left, right = _getter(factors, b_key), _getter(factors, a_key)
        low_rank[name] = LowRankTensor(shape, rank, scaling, left=left, right=right, stored_nbytes=a.nbytes + b.nbytes)
        if "lora_B.bias" in parts:
            bias_addends[f"{module}.bias"] = (parts["lora_B.bias"], scaling)

    for name in sorted(set(whole) | set(bias_addends)):
        if name in low_rank:
            # PEFT saves a targeted embedding's own weight beside its factors (save_embedding_layers)
            if name in whole and name in base_ckpt and torch.equal(factors.get_tensor(whole[name]), base_ckpt.get_tensor(name)):
                continue
            raise TaskVecError(f"{path}: tensor {name!r} is both a LoRA target and saved whole with other values than the base's")
        key = whole.get(name)
        spec = factors.spec(key) if key else factors.spec(bias_addends[name][0])
        if not spec.is_floating_point:
            raise TaskVecError(f"{path}: tensor {key!r} is not floating point")
        _check_against_base(path, base_ckpt, name, spec.shape, f"tensor {key or bias_addends[name][0]!r}")
        addend, scaling = bias_addends.get(name, (None, 1.0))
        dense[name] = DenseDelta(
            TensorSpec(DENSE_DTYPE, spec.shape),
            value=_getter(factors, key) if key else _zeros(spec.shape),
            minus=_getter(base_ckpt, name) if key else None,
            addend=_getter(factors, addend) if addend else None,
            scaling=scaling,
        )
    for name in base_ckpt.keys():
        spec = base_ckpt.spec(name)
        if spec.is_floating_point and name not in low_rank and name not in dense:
            low_rank[name] = LowRankTensor(spec.shape, 0)
    metadata = {
        meta_keys.KIND: meta_keys.TASK_VECTOR,
        meta_keys.BASE_FINGERPRINT: base_ckpt.fingerprint(),
        meta_keys.SKIPPED: json.dumps(sorted(n for n in base_ckpt.keys() if not base_ckpt.spec(n).is_floating_point)),
        meta_keys.ADAPTER: meta_keys.PEFT_LORA,
        meta_keys.LAYOUT: meta_keys.LOWRANK_LAYOUT,
    }
    if stores_conv1d(base_ckpt):
        metadata[meta_keys.BASE_CONV1D] = "true"
    return LowRankCheckpoint(low_rank, dense, metadata, str(path), files=[factors, *_files_of(base_ckpt)])


def _files_of(ckpt: Checkpoint) -> list:
    return [ckpt] if isinstance(ckpt, SafetensorsCheckpoint) else []


def _getter(ckpt: Checkpoint, name: str):
    return lambda: ckpt.get_tensor(name)


def _transposed(ckpt: Checkpoint, name: str):
    return lambda: ckpt.get_tensor(name).T


def _zeros(shape):
    return lambda: torch.zeros(shape, dtype=DENSE_DTYPE)


def _check_against_base(path: Path, base: Checkpoint, name: str, shape: tuple[int, ...], what: str) -> None:
    if name not in base:
        raise TaskVecError(f"{path}: {what} changes {name!r}, which the base {base.source} lacks")
    base_spec = base.spec(name)
    if tuple(base_spec.shape) != tuple(shape):
        raise TaskVecError(
            f"{path}: {what} gives {name!r} the shape {list(shape)}, but it is {list(base_spec.shape)} in the base {base.source}"
        )
    if not base_spec.is_floating_point:
        raise TaskVecError(f"{path}: {what} changes {name!r}, which is not floating point in the base")


def _warn_if_other_base(path: Path, config: AdapterConfig, base: Checkpoint) -> None:
    named = config.base_model_name_or_path
    if not named:
        return
    directory = base.directory
    if Path(named).exists():
        try:
            if open_checkpoint(named).fingerprint() == base.fingerprint():
                return
        except TaskVecError:
            pass
    own_name = None
    if directory is not None and (directory / "config.json").is_file():
        try:
            own_name = json.loads((directory / "config.json").read_text("utf-8")).get("_name_or_path")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            own_name = None
    if own_name == named:
        return
    if own_name is None and not Path(named).exists():
        return  # a hub name and a base that records none: nothing to compare
    says = f" (whose config names {own_name!r})" if own_name else ""
    warnings.warn(
        f"{path}: the adapter was trained on {named!r}, not on the base {base.source}{says}",
        TaskVecWarning,
        stacklevel=3,
    )


# -- writing an adapter -----------------------------------------------------------------------------


@dataclass
class ExportedTensor:
    name: str
    module: str
    rank: int
    relative_error: float  # ||delta - B A||_F / ||delta||_F
    embedding: bool = False


@dataclass
class LoraExport:
    """What ``export_lora`` wrote and how closely the adapter matches the vector."""

    output: Path
    r: int
    rank_pattern: dict[str, int]
    tensors: list[ExportedTensor]
    saved_whole: list[str]  # tensors written whole under modules_to_save
    left_out: dict[str, float] = field(default_factory=dict)  # name -> its share of ||tau||_F^2
    zero: list[str] = field(default_factory=list)  # zero deltas: nothing to write
    relative_error: float = 0.0  # ||tau - adapter||_F / ||tau||_F over the whole vector


def stores_conv1d(ckpt: "Checkpoint | None") -> bool:
    """Whether ``ckpt`` is a Hugging Face folder whose ``config.json`` names a model type with
    Conv1D weights (``CONV1D_MODEL_TYPES``, GPT-2's layout): an adapter of it is ``fan_in_fan_out``."""
    directory = ckpt.directory if ckpt is not None else None
    if directory is None or not (directory / "config.json").is_file():
        return False
    try:
        model_type = json.loads((directory / "config.json").read_text("utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False
    return model_type in CONV1D_MODEL_TYPES


def is_conv1d_module(module: str) -> bool:
    """A module that is a Conv1D in a model of ``CONV1D_MODEL_TYPES`` (by its last name)."""
    return module.rsplit(".", 1)[-1] in CONV1D_MODULES


def is_embedding_module(module: str) -> bool:
    last = module.rsplit(".", 1)[-1].lower()
    return any(h in last for h in _EMBEDDING_HINTS)


def truncated_svd(
    delta: torch.Tensor, rank: int | None, energy: float | None, seed_name: str = ""
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U_k, S_k, Vh_k of the best rank-k approximation (k = rank, or the smallest keeping ``energy`` of
    ||delta||^2). A delta of more than ``RANDOMIZED_SVD_ABOVE`` entries with a ``rank`` under a quarter
    of its smaller side goes to ``randomized_svd`` seeded by ``seed_name`` (its tensor's name), never
    torch's global generator: the same input gives the same bits in every run and process."""
    full = min(delta.shape)
    if rank is not None and delta.numel() > RANDOMIZED_SVD_ABOVE and rank < full // 4 and rank + RANDOMIZED_OVERSAMPLE < full:
        return randomized_svd(delta, rank, seed_name)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    if rank is None:
        rank = rank_for_energy(s, energy)
    k = min(rank, full)
    return u[:, :k], s[:k], vh[:k]


def randomized_svd(delta: torch.Tensor, rank: int, seed_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U_k, S_k, Vh_k of a rank-``rank`` approximation of ``delta`` by randomized subspace iteration
    (Halko, Martinsson and Tropp 2011, algorithm 4.4): a Gaussian sketch of ``rank +
    RANDOMIZED_OVERSAMPLE`` columns, ``RANDOMIZED_POWER_ITERATIONS`` power iterations each
    re-orthonormalized by QR, then the exact SVD of the small projection. The sketch is drawn from a
    generator seeded by ``seed_name`` (crc32), so the same tensor name gives the same bits. Where the
    sketch would be as wide as the matrix, the exact SVD (``truncated_svd``)."""
    sketch = rank + RANDOMIZED_OVERSAMPLE
    if sketch >= min(delta.shape):
        return truncated_svd(delta, rank, None)
    generator = torch.Generator().manual_seed(zlib.crc32(seed_name.encode("utf-8")))
    omega = torch.randn(delta.shape[1], sketch, generator=generator, dtype=delta.dtype)
    q, _ = torch.linalg.qr(delta @ omega)
    for _ in range(RANDOMIZED_POWER_ITERATIONS):
        z, _ = torch.linalg.qr(delta.T @ q)
        q, _ = torch.linalg.qr(delta @ z)
    u_small, s, vh = torch.linalg.svd(q.T @ delta, full_matrices=False)
    return q @ u_small[:, :rank], s[:rank], vh[:rank]


def svd_factors(
    delta: torch.Tensor, rank: int | None, energy: float | None, dtype: torch.dtype, svd: str = "exact", seed_name: str = ""
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoRA factors ``B (rows, k)`` and ``A (k, cols)`` in ``dtype`` of the truncated SVD of the 2-D
    ``delta`` (``truncated_svd``, or ``randomized_svd`` with ``svd="randomized"``, which needs a
    ``rank``; sqrt(S) on each side), and ``||delta - B A||_F^2``."""
    if svd == "randomized":
        u, s, vh = randomized_svd(delta, rank, seed_name)
    else:
        u, s, vh = truncated_svd(delta, rank, energy, seed_name)
    root = s.sqrt()
    b_factor, a_factor = (u * root).to(dtype), (root[:, None] * vh).to(dtype)
    approx = b_factor.double() @ a_factor.double()
    return b_factor, a_factor, float((delta.double() - approx).square().sum())


def peft_factor_tensors(
    module: str, b_factor: torch.Tensor, a_factor: torch.Tensor, embedding: bool, fan_in_fan_out: bool = False
) -> dict[str, torch.Tensor]:
    """The saved tensors of one module whose delta is ``b_factor @ a_factor`` at scaling 1 (in the
    base weight's orientation; ``fan_in_fan_out``: a Conv1D weight stored (in, out), as GPT-2's)."""
    prefix = f"{PEFT_PREFIX}{module}"
    if embedding:  # PEFT's embedding LoRA: delta = (B_e @ A_e).T, A_e (r, num_embeddings)
        return {f"{prefix}.lora_embedding_A": b_factor.T.contiguous(), f"{prefix}.lora_embedding_B": a_factor.T.contiguous()}
    if fan_in_fan_out:  # PEFT's Conv1D LoRA: delta = (B @ A).T, A (r, in_features = the weight's rows)
        return {f"{prefix}.lora_A.weight": b_factor.T.contiguous(), f"{prefix}.lora_B.weight": a_factor.T.contiguous()}
    return {f"{prefix}.lora_A.weight": a_factor.contiguous(), f"{prefix}.lora_B.weight": b_factor.contiguous()}


def adapter_config(
    ranks: dict[str, int], base_model_name_or_path: str | None, modules_to_save: list[str] | None = None, fan_in_fan_out: bool = False
) -> tuple[int, dict[str, int], dict]:
    """``(r, rank_pattern, config)`` of an adapter whose modules have ``ranks`` at scaling 1:
    ``r`` the most common rank (the larger on a tie), the others in ``rank_pattern`` and
    ``alpha_pattern`` alike."""
    counts = list(ranks.values())
    r = max(set(counts), key=lambda k: (counts.count(k), k))
    rank_pattern = {re.escape(module): k for module, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": sorted(ranks),
        "modules_to_save": modules_to_save,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return r, rank_pattern, config


def write_adapter(claim: OutputClaim, tensors: dict[str, torch.Tensor], config: dict, metadata: dict[str, str]) -> None:
    """Write an adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``) under a
    temporary name beside ``claim``'s path and move it into place when complete."""
    specs = {n: TensorSpec(t.dtype, tuple(t.shape)) for n, t in tensors.items()}

    def write(folder: Path) -> None:
        folder.mkdir()
        with CheckpointWriter(folder / ADAPTER_WEIGHTS, specs, metadata) as writer:
            for n in writer.order:
                writer.write(n, tensors[n])
            writer.commit()
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")

    claim.write(write)


def export_lora(
    vector,
    output: "str | os.PathLike",
    rank: int | None = None,
    energy: float | None = None,
    modules_to_save: Sequence[str] = (),
    base: "Checkpoint | str | os.PathLike | None" = None,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress=None,
    fan_in_fan_out: bool | None = None,
) -> LoraExport:
    """Write ``vector`` (a ``TaskVector``) as a PEFT LoRA adapter folder at ``output``.

    Each 2-D tensor ``NAME.weight`` of module ``NAME`` becomes ``B @ A``, the truncated SVD
    of its delta: rank ``rank``, or with ``energy`` the smallest rank per module keeping
    that share of its squared Frobenius norm (``rank_pattern``). ``lora_alpha`` equals
    each module's rank, so PEFT's scaling is 1. Modules matching a ``modules_to_save``
    glob are written whole (``base + delta``, so ``base`` is needed). 1-D tensors of other
    modules cannot go into a LoRA adapter and are left out (listed in the result).

    ``fan_in_fan_out`` (by default: whether ``base``, or the base the vector was extracted
    from, is a GPT-2-style model, ``stores_conv1d``; a saved vector's ``taskvec.base_conv1d``
    says it without the base, ``TaskVector.of_conv1d_base``): the weights are Conv1D's, stored
    ``(in, out)``, and every module's factors are written as PEFT's Conv1D LoRA holds them, with
    ``fan_in_fan_out: true`` in the config. Detected so, a 2-D weight of another module than a
    Conv1D (``CONV1D_MODULES``) or an embedding is refused unless it goes to ``modules_to_save``.
    """
    if (rank is None) == (energy is None):
        raise ParameterError("rank", "give exactly one of rank or energy")
    if rank is not None:
        positive_int(rank, "rank")
    if energy is not None:
        fraction(energy, "energy")
    claim = OutputClaim(output, overwrite)  # held to the end: the lock, and what stood there at the start
    try:
        base_ckpt = open_checkpoint(base) if base is not None else None
        sources = [src for term in vector.terms for src in term.sources()] + ([base_ckpt] if base_ckpt is not None else [])
        refuse_aliasing(claim.path, [p for ckpt in sources for p in ckpt.paths()])
        detected = fan_in_fan_out is None
        if detected:
            fan_in_fan_out = stores_conv1d(base_ckpt) or vector.of_conv1d_base
        return _export(vector, claim, rank, energy, modules_to_save, base_ckpt, base_model_name_or_path, dtype, progress, fan_in_fan_out, detected)
    finally:
        claim.release()


def _export(vector, claim, rank, energy, modules_to_save, base_ckpt, base_model_name_or_path, dtype, progress, fan_in_fan_out, detected) -> LoraExport:
    output = claim.path
    if base_ckpt is not None and base_ckpt.fingerprint() != vector.base_fingerprint:
        raise TaskVecError(
            f"the base {base_ckpt.source} (fingerprint {base_ckpt.fingerprint()[:16]}) is not the vector's base ({vector.base_fingerprint[:16]})"
        )

    def module_of(name: str) -> str:
        return name.rsplit(".", 1)[0] if "." in name else name

    whole_modules = sorted({module_of(n) for n in vector.names if any(fnmatch.fnmatchcase(module_of(n), p) for p in modules_to_save)})
    for pattern in modules_to_save:
        if not any(fnmatch.fnmatchcase(m, pattern) for m in {module_of(n) for n in vector.names}):
            raise ParameterError("modules_to_save", f"{pattern!r} matches no module of the vector")
    if whole_modules and base_ckpt is None:
        raise ParameterError("modules_to_save", "needs the base: a saved module is written with its full weights")
    candidates = [n for n in vector.names if n.endswith(".weight") and len(vector.spec(n).shape) == 2 and module_of(n) not in whole_modules]
    if not candidates:
        raise TaskVecError("export-lora: the vector has no 2-D weight tensor to factor into a LoRA adapter")

    tensors: dict[str, torch.Tensor] = {}
    exported: list[ExportedTensor] = []
    left_out_sq: dict[str, float] = {}
    zero: list[str] = []
    saved_whole: list[str] = []
    total_sq = error_sq = 0.0
    for name in vector.names:
        delta = vector.get_tensor(name, torch.float32)
        norm_sq = float(delta.double().square().sum())
        total_sq += norm_sq
        module = module_of(name)
        if module in whole_modules:
            full = base_ckpt.get_tensor(name).to(torch.float32) + delta
            tensors[f"{PEFT_PREFIX}{name}"] = full.to(dtype).contiguous()
            saved_whole.append(name)
        elif name not in candidates:
            if norm_sq > 0:
                left_out_sq[name] = norm_sq
                error_sq += norm_sq
        elif norm_sq == 0:
            zero.append(name)
        else:
            embedding = is_embedding_module(module)
            if fan_in_fan_out and detected and not (embedding or is_conv1d_module(module)):
                raise ParameterError(
                    "modules_to_save", f"module {module!r} is not a Conv1D of this GPT-2-style base, whose adapter stores every module as "
                    "Conv1D (fan_in_fan_out): name it here to write it whole",
                )
            b_factor, a_factor, err_sq = svd_factors(delta, rank, energy, dtype, seed_name=name)
            error_sq += err_sq
            tensors.update(peft_factor_tensors(module, b_factor, a_factor, embedding, fan_in_fan_out))
            exported.append(ExportedTensor(name, module, int(b_factor.shape[1]), math.sqrt(err_sq / norm_sq), embedding))
        if progress is not None:
            progress(name)
    if not exported:
        raise TaskVecError("export-lora: every 2-D weight delta of the vector is zero: there is nothing to factor")

    r, rank_pattern, config = adapter_config(
        {t.module: t.rank for t in exported}, base_model_name_or_path, sorted({module_of(n) for n in saved_whole}) or None, fan_in_fan_out
    )
    metadata = {"format": "pt", meta_keys.BASE_FINGERPRINT: vector.base_fingerprint}
    if vector.task:
        metadata[meta_keys.TASK] = vector.task
    write_adapter(claim, tensors, config, metadata)
    return LoraExport(
        output=output,
        r=r,
        rank_pattern=rank_pattern,
        tensors=exported,
        saved_whole=saved_whole,
        left_out={n: sq / total_sq for n, sq in left_out_sq.items()} if total_sq else {},
        zero=zero,
        relative_error=math.sqrt(error_sq / total_sq) if total_sq else 0.0,
    )
