"""The ``taskvec`` MLflow model flavor.

Two kinds of model, named by ``kind`` in the MLmodel flavor block:

- ``task_vector``: a task vector's tensors in safetensors, with its lineage
  (task, base reference and fingerprint, fine-tuned reference), fingerprint,
  counts, L2 norm and dtype. ``load_model`` returns a lazy ``TaskVector``. A vector
  in a stored layout (a LoRA adapter's factors, a compressed vector) is stored as it
  is (``layout: lowrank``, ``sparse`` or ``bitdelta``, with ``stored_bytes`` and
  ``dense_bytes``, and each low-rank tensor's rank).
- ``checkpoint``: full model weights in safetensors plus how to build the module:
  a ``"package.module:factory"`` with JSON keyword arguments (its code shipped
  through ``code_paths`` when it is not installed), or, for an HF-style folder
  with ``config.json``, transformers' ``AutoModel`` (transformers installed). ``load_model`` returns the
  ``torch.nn.Module``; ``mlflow.pyfunc.load_model`` and ``mlflow models serve``
  work, calling ``module(inputs, **params)`` (an HF checkpoint takes text). A
  checkpoint saved with ``hf_base`` (an ``mlflow.transformers`` or
  ``mlflow.sentence_transformers`` base) keeps that flavor and its pyfunc too.

Weights never go through pickle.

Example::

    import mlflow
    from mlflow_taskvec import TaskVector
    from mlflow_taskvec.mlflow import flavor

    vector = TaskVector.extract("base/", "finetuned/", task="rotate")
    with mlflow.start_run():
        info = flavor.log_model(vector, name="rotate")
    same = flavor.load_model(info.model_uri)  # a lazy TaskVector
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mlflow import pyfunc
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.models.utils import _save_example
from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _mlflow_conda_env,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
)
from mlflow.utils.file_utils import write_to
from mlflow.utils.model_utils import (
    _add_code_from_conf_to_system_path,
    _get_flavor_configuration,
    _validate_and_copy_code_paths,
    _validate_and_prepare_target_save_path,
)
from mlflow.utils.requirements_utils import _get_pinned_requirement

from mlflow_taskvec import __version__
from mlflow_taskvec.callables import check_spec, import_callable
from mlflow_taskvec.engine import metadata as meta_keys
from mlflow_taskvec.engine.checkpoint import Checkpoint, StateDictCheckpoint, open_checkpoint
from mlflow_taskvec.engine.lowrank import LowRankCheckpoint
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.engine.writer import copy_non_weight_files
from mlflow_taskvec.errors import TaskVecError

FLAVOR_NAME = "taskvec"
FORMAT_VERSION = "1"
_DATA = "data"
# A copy of the flavor block inside data/: ``_load_pyfunc`` only receives that folder.
_CONF_FILE = "taskvec.json"


def get_default_pip_requirements() -> list[str]:
    """The packages a model saved by this flavor needs to be loaded."""
    # torch's local label (+cpu, +cu121) is not installable from PyPI: pin the release only.
    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    reqs += [_get_pinned_requirement(p) for p in ("safetensors", "numpy", "pandas")]
    return reqs + [f"mlflow-taskvec=={__version__}"]


def get_default_conda_env() -> dict:
    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())


# The HF flavors a composite carries over from its base: flavor name -> its weights folder.
HF_FLAVORS = {"sentence_transformers": ("data", "model.sentence_transformer"), "transformers": ("model_binary", "model")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "spiece.model", "merges.txt")
_ENV_FILES = (MLMODEL_FILE_NAME, _CONDA_ENV_FILE_NAME, _PYTHON_ENV_FILE_NAME, _REQUIREMENTS_FILE_NAME, _CONSTRAINTS_FILE_NAME)


def hf_flavor_of(model_dir: "Path | None") -> tuple[str, str] | None:
    """``(flavor, weights folder)`` when the MLflow model at ``model_dir`` is an
    ``mlflow.transformers`` or ``mlflow.sentence_transformers`` model (not a PEFT one)."""
    if model_dir is None or not (Path(model_dir) / MLMODEL_FILE_NAME).is_file():
        return None
    flavors = yaml.safe_load((Path(model_dir) / MLMODEL_FILE_NAME).read_text("utf-8")).get("flavors", {})
    for name, (key, default) in HF_FLAVORS.items():
        if name in flavors and not flavors[name].get("peft_adaptor"):
            return name, flavors[name].get(key, default)
    return None


def _known_architecture(folder: Path) -> bool:
    """Whether the installed transformers can build the model a folder's ``config.json`` names: only
    then is a text input example given (MLflow serves it to check it, and would warn otherwise)."""
    try:
        from transformers import CONFIG_MAPPING

        return json.loads((folder / "config.json").read_text("utf-8")).get("model_type") in CONFIG_MAPPING
    except (ImportError, OSError, ValueError):
        return False


def has_tokenizer(folder: Path) -> bool:
    """Whether an HF folder, or an MLflow transformers model folder, holds a tokenizer."""
    folder = Path(folder)
    return any((folder / f).is_file() or (folder / "components" / "tokenizer" / f).is_file() for f in TOKENIZER_FILES)


def _carry_over_hf_files(hf_base: Path, weights_folder: str, path: Path) -> None:
    """The base's MLflow files other than its weights and environment (tokenizer, components,
    input example), copied byte for byte: the composite keeps the base's own flavor."""
    for item in sorted(hf_base.iterdir()):
        if item.name in _ENV_FILES or item.name == weights_folder:
            continue
        if item.is_dir():
            shutil.copytree(item, path / item.name)
        else:
            shutil.copy2(item, path / item.name)


def _architecture(factory: str | None, factory_kwargs: Mapping[str, Any] | None, weights: Path) -> dict:
    if factory is None:
        if (weights / "config.json").is_file():
            # an HF-style folder: rebuilt by transformers' AutoModel.from_pretrained
            return {"hf_config": "config.json"}
        raise TaskVecError(
            "a checkpoint model needs an architecture: pass factory='package.module:function' or save an HF-style folder with config.json"
        )
    check_spec(factory, "architecture factory")
    kwargs = dict(factory_kwargs or {})
    try:
        json.dumps(kwargs)
    except TypeError:
        raise TaskVecError("architecture factory_kwargs must be JSON-serializable") from None
    return {"factory": factory, "factory_kwargs": kwargs}


def _write_weights(model, target: Path) -> tuple[str, Checkpoint]:
    """Write ``model``'s weights under ``target`` (a folder); returns (kind, checkpoint)."""
    if isinstance(model, TaskVector):
        model.save(target)
        return "task_vector", open_checkpoint(target)
    if isinstance(model, torch.nn.Module):
        source = StateDictCheckpoint({k: v for k, v in model.state_dict().items()}, source=type(model).__name__)
    elif isinstance(model, Mapping):
        source = StateDictCheckpoint(model)
    else:
        source = open_checkpoint(model)
    target.mkdir(parents=True)
    if isinstance(source, StateDictCheckpoint):
        from mlflow_taskvec.engine.writer import CheckpointWriter

        with CheckpointWriter(target / "model.safetensors", source.specs(), source.metadata()) as w:
            for name in w.order:
                w.write(name, source.get_tensor(name))
            w.commit()
    else:
        for f in source.files:
            shutil.copy2(f, target / f.name)
        index = source.directory / "model.safetensors.index.json" if source.directory else None
        if index is not None and index.is_file():
            shutil.copy2(index, target / index.name)
        if source.directory is not None:
            copy_non_weight_files(source.directory, target)
    kind = meta_keys.TASK_VECTOR if source.metadata().get(meta_keys.KIND) == meta_keys.TASK_VECTOR else "checkpoint"
    return kind, open_checkpoint(target)


def save_model(
    model,
    path: str | os.PathLike,
    factory: str | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
    lineage: Mapping[str, Any] | None = None,
    code_paths: list[str] | None = None,
    mlflow_model: Model | None = None,
    signature=None,
    input_example=None,
    pip_requirements=None,
    extra_pip_requirements=None,
    conda_env=None,
    metadata: dict[str, Any] | None = None,
    hf_base: "str | os.PathLike | None" = None,
) -> None:
    """Save a task vector or a checkpoint as a ``taskvec`` MLflow model at ``path``.

    Args:
        model: a ``TaskVector`` (kind ``task_vector``); or an ``nn.Module``, a state
            dict, or a safetensors file/folder (kind ``checkpoint``, unless the file is
            a saved task vector).
        factory: for checkpoints, ``"package.module:function"`` that builds the module.
        factory_kwargs: JSON keyword arguments for ``factory``.
        lineage: extra fields recorded in the flavor block (``base_uri``,
            ``finetuned_uri``, ``method``, ...).
        code_paths: local code shipped with the model (e.g. the module of ``factory``).
        hf_base: the local MLflow model folder of an ``mlflow.transformers`` or
            ``mlflow.sentence_transformers`` base: the checkpoint is saved in that flavor's
            layout, with the base's tokenizer, modules and config byte for byte, and the
            model keeps the base's flavor (and its pyfunc, which takes text) beside ``taskvec``.

    Example::

        save_model(net, "model_dir", factory="digits_tasks:build_model", code_paths=["digits_tasks.py"])
    """
    path = Path(path)
    _validate_and_prepare_target_save_path(str(path))
    mlflow_model = mlflow_model or Model()
    if metadata is not None:
        mlflow_model.metadata = metadata
    code_subpath = _validate_and_copy_code_paths(code_paths, str(path))
    carried = hf_flavor_of(hf_base) if hf_base is not None else None
    if hf_base is not None and carried is None:
        raise TaskVecError(f"{hf_base}: not an mlflow.transformers or mlflow.sentence_transformers model")
    data = carried[1] if carried else _DATA
    if carried:
        _carry_over_hf_files(Path(hf_base), data, path)
    kind, ckpt = _write_weights(model, path / data)
    conf: dict[str, Any] = {
        "kind": kind,
        "data": data,
        "format_version": FORMAT_VERSION,
        "fingerprint": ckpt.fingerprint(),
        "num_tensors": len(ckpt.keys()),
        "num_parameters": ckpt.num_parameters(),
        "dtype": _main_dtype(ckpt),
        "code": code_subpath,
    }
    meta = ckpt.metadata()
    if meta_keys.LAYOUT in meta:  # a stored layout (compressed, low-rank): the layout and both sizes
        conf.update(layout=meta[meta_keys.LAYOUT], stored_bytes=ckpt.stored_bytes, dense_bytes=ckpt.dense_bytes)
    if isinstance(ckpt, LowRankCheckpoint):  # stored as factors: each tensor's rank
        conf["ranks"] = {n: ckpt.rank(n) for n in ckpt.keys() if ckpt.rank(n)}
    if kind == "task_vector":
        vector = TaskVector.load(ckpt)
        conf.update(task=vector.task, base_fingerprint=vector.base_fingerprint, l2_norm=vector.norm())
    else:
        conf["architecture"] = _architecture(factory, factory_kwargs, path / data)
        if meta_keys.BASE_FINGERPRINT in meta:
            conf["base_fingerprint"] = meta[meta_keys.BASE_FINGERPRINT]
    for key, value in (lineage or {}).items():
        conf[key] = value
    (path / data / _CONF_FILE).write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n", "utf-8")

    if carried:
        base_model = Model.load(str(Path(hf_base) / MLMODEL_FILE_NAME))
        for name in (carried[0], pyfunc.FLAVOR_NAME):
            if name in base_model.flavors:
                mlflow_model.flavors[name] = base_model.flavors[name]
        mlflow_model.signature = signature or base_model.signature
        mlflow_model.saved_input_example_info = base_model.saved_input_example_info
        if extra_pip_requirements is None and pip_requirements is None and (Path(hf_base) / _REQUIREMENTS_FILE_NAME).is_file():
            lines = (Path(hf_base) / _REQUIREMENTS_FILE_NAME).read_text("utf-8").splitlines()
            extra_pip_requirements = [line for line in lines if line.strip() and not line.startswith(("mlflow", "-"))]
    elif kind == "checkpoint":
        if conf["architecture"].get("hf_config") and has_tokenizer(path / data) and _known_architecture(path / data):
            signature = signature or text_signature(path / data)
            input_example = input_example if input_example is not None else ["The quick brown fox jumps over the lazy dog."]
        if input_example is not None:
            _save_example(mlflow_model, input_example, str(path))
        if signature is not None:
            mlflow_model.signature = signature
        pyfunc.add_to_model(
            mlflow_model,
            loader_module="mlflow_taskvec.mlflow.flavor",
            data=_DATA,
            code=code_subpath,
            conda_env=_CONDA_ENV_FILE_NAME,
            python_env=_PYTHON_ENV_FILE_NAME,
        )
    mlflow_model.add_flavor(FLAVOR_NAME, **conf)
    mlflow_model.save(str(path / MLMODEL_FILE_NAME))

    if conda_env is None:
        default_reqs = get_default_pip_requirements() if pip_requirements is None else None
        conda_env, pip_reqs, pip_constraints = _process_pip_requirements(default_reqs, pip_requirements, extra_pip_requirements)
    else:
        conda_env, pip_reqs, pip_constraints = _process_conda_env(conda_env)
    with open(path / _CONDA_ENV_FILE_NAME, "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if pip_constraints:
        write_to(str(path / _CONSTRAINTS_FILE_NAME), "\n".join(pip_constraints))
    write_to(str(path / _REQUIREMENTS_FILE_NAME), "\n".join(pip_reqs))
    _PythonEnv.current().to_yaml(str(path / _PYTHON_ENV_FILE_NAME))


def _main_dtype(ckpt: Checkpoint) -> str:
    counts: dict[str, int] = {}
    for name in ckpt.keys():
        spec = ckpt.spec(name)
        key = str(spec.dtype).removeprefix("torch.")
        counts[key] = counts.get(key, 0) + spec.numel
    return max(counts, key=counts.get) if counts else "none"


def log_model(
    model,
    name: str = "model",
    factory: str | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
    lineage: Mapping[str, Any] | None = None,
    code_paths: list[str] | None = None,
    registered_model_name: str | None = None,
    signature=None,
    input_example=None,
    await_registration_for=DEFAULT_AWAIT_MAX_SLEEP_SECONDS,
    pip_requirements=None,
    extra_pip_requirements=None,
    conda_env=None,
    metadata: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    hf_base: "str | os.PathLike | None" = None,
    **kwargs,
):
    """Log a task vector or checkpoint as a ``taskvec`` model of the active run.

    Returns MLflow's ``ModelInfo`` (with ``model_id`` and ``model_uri``); with
    ``registered_model_name`` it also registers a version.

    Example::

        with mlflow.start_run():
            info = log_model(vector, name="rotate", registered_model_name="rotate-vector")
    """
    return Model.log(
        artifact_path=None,
        name=name,
        flavor=sys.modules[__name__],
        model=model,
        factory=factory,
        factory_kwargs=factory_kwargs,
        lineage=lineage,
        code_paths=code_paths,
        registered_model_name=registered_model_name,
        signature=signature,
        input_example=input_example,
        await_registration_for=await_registration_for,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        conda_env=conda_env,
        metadata=metadata,
        params=params,
        tags=tags,
        hf_base=hf_base,
        **kwargs,
    )


def read_conf(local_model_dir: str | os.PathLike) -> dict:
    """The flavor block of a downloaded ``taskvec`` model."""
    return _get_flavor_configuration(model_path=str(local_model_dir), flavor_name=FLAVOR_NAME)


def build_module(conf: dict, weights_dir: Path, state: Mapping[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Rebuild the module of a ``checkpoint``-kind model and load its weights (strictly).

    With ``state``, those weights are loaded instead of the files in ``weights_dir``
    (which then only provides an HF config): how search candidates are evaluated
    without being written anywhere.
    """
    arch = conf.get("architecture") or {}
    if arch.get("hf_config"):
        return _hf_module(Path(weights_dir), state)
    factory = arch.get("factory")
    if not factory:
        raise TaskVecError(f"{weights_dir}: the model records no architecture factory")
    return module_from_factory(factory, arch.get("factory_kwargs", {}), state if state is not None else read_state(weights_dir))


def _hf_module(weights_dir: Path, state: Mapping[str, torch.Tensor] | None) -> torch.nn.Module:
    """The HF model of ``weights_dir``'s config.json (its ``architectures`` class, else AutoModel)
    with ``state``, or the folder's own weights, loaded.

    The module is built from the config and the weights loaded into it, which works the same
    on transformers 4 and 5 (transformers 5 refuses ``from_pretrained(state_dict=...)``). A
    missing parameter or an unexpected tensor is refused; buffers the model rebuilds itself
    (``position_ids``) may be absent.
    """
    try:
        import transformers
    except ImportError:
        raise TaskVecError(f"{weights_dir}: this model is an HF checkpoint; loading it needs the transformers package") from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(weights_dir))
        name = next((a for a in (config.architectures or []) if hasattr(transformers, a)), None)
        cls = getattr(transformers, name) if name else transformers.AutoModel
        module = cls.from_config(config) if cls is transformers.AutoModel else cls(config)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TaskVecError(f"{weights_dir}: cannot rebuild the HF architecture from config.json: {first}") from None
    weights = dict(state) if state is not None else read_state(weights_dir)
    buffers = {n for n, _ in module.named_buffers()}  # non-persistent ones too: older saves kept them
    persistent = set(module.state_dict())
    result = module.load_state_dict({n: t for n, t in weights.items() if n not in buffers or n in persistent}, strict=False)
    parameters = {n for n, _ in module.named_parameters()}
    missing = [n for n in result.missing_keys if n in parameters]
    if missing or result.unexpected_keys:
        what = f"parameter {missing[0]!r} is missing" if missing else f"tensor {result.unexpected_keys[0]!r} is not in the model"
        raise TaskVecError(f"{weights_dir}: the weights do not fit {type(module).__name__} (from config.json): {what}")
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    return module.eval()


def read_state(weights: "Path | str") -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at ``weights``, copied into memory (a state dict to load)."""
    ckpt = open_checkpoint(weights)
    return {name: ckpt.get_tensor(name).clone() for name in ckpt.keys()}


def module_from_factory(factory: str, factory_kwargs: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """``package.module:factory(**factory_kwargs)`` with ``state`` loaded strictly."""
    module = import_callable(factory, "architecture factory")(**dict(factory_kwargs))
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise TaskVecError(f"the weights do not fit {factory!r}: {first}") from None
    return module.eval()


def load_model(model_uri: str, dst_path: str | None = None):
    """Load a ``taskvec`` model: a lazy ``TaskVector`` or an ``nn.Module``, by kind.

    Example::

        vector = load_model("models:/rotate-vector/1")
        net = load_model("models:/digits-composite@champion")
    """
    local = Path(_download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path))
    conf = read_conf(local)
    _add_code_from_conf_to_system_path(str(local), conf)
    data = local / conf.get("data", _DATA)
    if conf["kind"] == "task_vector":
        return TaskVector.load(data)
    return build_module(conf, data)


class _CheckpointPyfunc:
    """``predict`` calls the module on a float32 tensor of the inputs, with ``params``
    as keyword arguments. An HF checkpoint takes text instead (see ``_HFPyfunc``)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def get_raw_model(self):
        return self.module

    def predict(self, data, params: dict[str, Any] | None = None):
        if hasattr(data, "to_numpy"):
            data = data.to_numpy()
        with torch.no_grad():
            out = self.module(torch.from_numpy(np.array(data, dtype=np.float32)), **(params or {}))
        return out.detach().cpu().numpy()


class _HFPyfunc:
    """An HF checkpoint as pyfunc: text in (a string, a list of strings, a one-column
    DataFrame), one embedding per text out. A sentence-transformers folder (``modules.json``)
    encodes as ``SentenceTransformer.encode`` does (its pooling and normalization); any other
    folder gives the attention-masked mean of the last hidden state. Token ids (rows of ints,
    ragged rows padded) are accepted too, their padding masked out."""

    def __init__(self, module: torch.nn.Module, folder: Path):
        self.module = module
        self.tokenizer = None
        self.encoder = None
        if has_tokenizer(folder):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if (folder / "modules.json").is_file():
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                pass
            else:
                self.encoder = SentenceTransformer(str(folder), device="cpu")
        self.pad_id = getattr(module.config, "pad_token_id", None) or 0

    def get_raw_model(self):
        return self.module

    def predict(self, data, params: dict[str, Any] | None = None):
        texts = _texts_of(data)
        with torch.no_grad():
            if texts is not None:
                if self.encoder is not None:
                    return np.asarray(self.encoder.encode(texts, convert_to_numpy=True))
                if self.tokenizer is None:
                    raise TaskVecError("this HF checkpoint has no tokenizer files: give token ids, not text")
                batch = dict(self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))
            else:
                batch = _padded_ids(data, self.pad_id)
            hidden = self.module(**batch, **(params or {})).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return pooled.detach().cpu().numpy()


def _texts_of(data) -> list[str] | None:
    """The texts in ``data``, or None when it holds token ids."""
    if isinstance(data, str):
        return [data]
    if hasattr(data, "columns"):  # a DataFrame: its one column
        if len(data.columns) != 1:
            raise TaskVecError(f"give text as one column, not {len(data.columns)} columns ({', '.join(map(str, data.columns))})")
        data = data.iloc[:, 0].tolist()
    elif hasattr(data, "tolist"):
        data = data.tolist()
    data = list(data)
    if data and all(isinstance(x, str) for x in data):
        return data
    return None


def _padded_ids(data, pad_id: int) -> dict[str, torch.Tensor]:
    rows = [[int(t) for t in (row.tolist() if hasattr(row, "tolist") else row)] for row in data]
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        mask[i, : len(row)] = torch.tensor([t != pad_id for t in row], dtype=torch.int64)
    return {"input_ids": ids, "attention_mask": mask}


def text_signature(folder: Path):
    """The signature of an HF checkpoint's pyfunc: one column of text in, a float32 matrix out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    hidden = json.loads((folder / "config.json").read_text("utf-8")).get("hidden_size", -1)
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, hidden))]))


def _load_pyfunc(data_path: str, model_config: dict | None = None):
    data = Path(data_path)
    conf = json.loads((data / _CONF_FILE).read_text("utf-8"))
    if conf.get("kind") != "checkpoint":
        raise TaskVecError(f"{data}: only checkpoint-kind taskvec models can be loaded as pyfunc")
    module = build_module(conf, data)
    if (conf.get("architecture") or {}).get("hf_config"):
        return _HFPyfunc(module, data)
    return _CheckpointPyfunc(module)
