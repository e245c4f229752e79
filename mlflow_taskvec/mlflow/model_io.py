"""Model I/O for the ``taskvec`` flavor: writing a model's weights, the HF files a composite
carries over from its base, and rebuilding a saved module (from its factory or its HF config).

The flavor's verbs (``flavor.py``) and its pyfunc wrappers (``wrappers.py``) build on this module.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.utils.environment import _CONDA_ENV_FILE_NAME, _CONSTRAINTS_FILE_NAME, _PYTHON_ENV_FILE_NAME, _REQUIREMENTS_FILE_NAME

from mlflow_taskvec.callables import check_spec, import_callable
from mlflow_taskvec.engine import metadata as meta_keys
from mlflow_taskvec.engine.checkpoint import Checkpoint, StateDictCheckpoint, open_checkpoint
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.engine.writer import CheckpointWriter, copy_non_weight_files
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.mlflow import flavor_conf as conf_keys

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


def known_architecture(folder: Path) -> bool:
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


def carry_over_hf_files(hf_base: Path, weights_folder: str, path: Path) -> None:
    """The base's MLflow files other than its weights and environment (tokenizer, components,
    input example), copied byte for byte: the composite keeps the base's own flavor."""
    for item in sorted(hf_base.iterdir()):
        if item.name in _ENV_FILES or item.name == weights_folder:
            continue
        if item.is_dir():
            shutil.copytree(item, path / item.name)
        else:
            shutil.copy2(item, path / item.name)


def architecture_of(factory: str | None, factory_kwargs: Mapping[str, Any] | None, weights: Path) -> dict:
    if factory is None:
        if (weights / "config.json").is_file():
            # an HF-style folder: rebuilt by transformers' AutoModel.from_pretrained
            return {conf_keys.HF_CONFIG: "config.json"}
        raise TaskVecError(
            "a checkpoint model needs an architecture: pass factory='package.module:function' or save an HF-style folder with config.json"
        )
    check_spec(factory, "architecture factory")
    kwargs = dict(factory_kwargs or {})
    try:
        json.dumps(kwargs)
    except TypeError:
        raise TaskVecError("architecture factory_kwargs must be JSON-serializable") from None
    return {conf_keys.FACTORY: factory, conf_keys.FACTORY_KWARGS: kwargs}


def _place(source: Path, target: Path, link: bool) -> None:
    """``source`` copied to ``target``, or, with ``link``, hard-linked when both are on one file system."""
    if link:
        try:
            os.link(source, target)
            return
        except OSError:  # another file system, or one without hard links: copied
            pass
    shutil.copy2(source, target)


def write_weights(model, target: Path, link: bool = False) -> tuple[str, Checkpoint]:
    """Write ``model``'s weights under ``target`` (a folder); returns (kind, checkpoint).

    ``link``: a checkpoint's weight files are hard-linked instead of copied where the file system
    allows (for a folder that is only read and then removed, as ``log_model``'s is)."""
    if isinstance(model, TaskVector):
        model.save(target)
        return conf_keys.TASK_VECTOR, open_checkpoint(target)
    if isinstance(model, torch.nn.Module):
        source = StateDictCheckpoint({k: v for k, v in model.state_dict().items()}, source=type(model).__name__)
    elif isinstance(model, Mapping):
        source = StateDictCheckpoint(model)
    else:
        source = open_checkpoint(model)
    target.mkdir(parents=True)
    if isinstance(source, StateDictCheckpoint):
        with CheckpointWriter(target / "model.safetensors", source.specs(), source.metadata()) as w:
            for name in w.order:
                w.write(name, source.get_tensor(name))
            w.commit()
    else:
        for f in source.files:
            _place(f, target / f.name, link)
        index = source.directory / "model.safetensors.index.json" if source.directory else None
        if index is not None and index.is_file():
            shutil.copy2(index, target / index.name)
        if source.directory is not None:
            copy_non_weight_files(source.directory, target)
    kind = conf_keys.TASK_VECTOR if source.metadata().get(meta_keys.KIND) == meta_keys.TASK_VECTOR else conf_keys.CHECKPOINT
    return kind, open_checkpoint(target)


def main_dtype(ckpt: Checkpoint) -> str:
    counts: dict[str, int] = {}
    for name in ckpt.keys():
        spec = ckpt.spec(name)
        key = str(spec.dtype).removeprefix("torch.")
        counts[key] = counts.get(key, 0) + spec.numel
    return max(counts, key=counts.get) if counts else "none"


def build_module(conf: dict, weights_dir: Path, state: Mapping[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Rebuild the module of a ``checkpoint``-kind model and load its weights (strictly).

    With ``state``, those weights are loaded instead of the files in ``weights_dir``
    (which then only provides an HF config): how search candidates are evaluated
    without being written anywhere.
    """
    arch = conf.get(conf_keys.ARCHITECTURE) or {}
    if arch.get(conf_keys.HF_CONFIG):
        return _hf_module(Path(weights_dir), state)
    factory = arch.get(conf_keys.FACTORY)
    if not factory:
        raise TaskVecError(f"{weights_dir}: the model records no architecture factory")
    return module_from_factory(factory, arch.get(conf_keys.FACTORY_KWARGS, {}), state if state is not None else read_state(weights_dir))


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


def text_signature(folder: Path):
    """The signature of an HF checkpoint's pyfunc: one column of text in, a float32 matrix out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    hidden = json.loads((folder / "config.json").read_text("utf-8")).get("hidden_size", -1)
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, hidden))]))
