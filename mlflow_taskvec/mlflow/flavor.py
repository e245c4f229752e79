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
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
from mlflow_taskvec.engine import metadata as meta_keys
from mlflow_taskvec.engine.lowrank import LowRankCheckpoint
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.mlflow import flavor_conf as conf_keys
from mlflow_taskvec.mlflow.model_io import (  # noqa: F401  (build_module, hf_flavor_of, ...: the flavor's API too)
    architecture_of,
    build_module,
    carry_over_hf_files,
    has_tokenizer,
    hf_flavor_of,
    known_architecture,
    main_dtype,
    module_from_factory,
    read_state,
    text_signature,
    write_weights,
)
from mlflow_taskvec.mlflow.wrappers import CheckpointPyfunc, HFPyfunc

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
    link_weights: bool = False,
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
        link_weights: hard-link a checkpoint's weight files into ``path`` instead of copying them,
            where the file system allows (``log_model`` does: its folder is uploaded, then removed).
            Weights hashed as they were written (``CheckpointWriter``) or before, under any name, are not read again to be fingerprinted.

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
        carry_over_hf_files(Path(hf_base), data, path)
    kind, ckpt = write_weights(model, path / data, link=link_weights)
    conf: dict[str, Any] = {
        conf_keys.KIND: kind,
        conf_keys.DATA: data,
        conf_keys.FORMAT_VERSION: FORMAT_VERSION,
        conf_keys.FINGERPRINT: ckpt.fingerprint(),
        conf_keys.NUM_TENSORS: len(ckpt.keys()),
        conf_keys.NUM_PARAMETERS: ckpt.num_parameters(),
        conf_keys.DTYPE: main_dtype(ckpt),
        conf_keys.CODE: code_subpath,
    }
    meta = ckpt.metadata()
    if meta_keys.LAYOUT in meta:  # a stored layout (compressed, low-rank): the layout and both sizes
        conf.update({conf_keys.LAYOUT: meta[meta_keys.LAYOUT], conf_keys.STORED_BYTES: ckpt.stored_bytes, conf_keys.DENSE_BYTES: ckpt.dense_bytes})
    if isinstance(ckpt, LowRankCheckpoint):  # stored as factors: each tensor's rank
        conf[conf_keys.RANKS] = {n: ckpt.rank(n) for n in ckpt.keys() if ckpt.rank(n)}
    if kind == conf_keys.TASK_VECTOR:
        vector = TaskVector.load(ckpt)
        conf.update({conf_keys.TASK: vector.task, conf_keys.BASE_FINGERPRINT: vector.base_fingerprint, conf_keys.L2_NORM: vector.norm()})
    else:
        conf[conf_keys.ARCHITECTURE] = architecture_of(factory, factory_kwargs, path / data)
        if meta_keys.BASE_FINGERPRINT in meta:
            conf[conf_keys.BASE_FINGERPRINT] = meta[meta_keys.BASE_FINGERPRINT]
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
    elif kind == conf_keys.CHECKPOINT:
        if conf[conf_keys.ARCHITECTURE].get(conf_keys.HF_CONFIG) and has_tokenizer(path / data) and known_architecture(path / data):
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
        link_weights=True,  # the folder Model.log saves into is uploaded to the artifact store, then removed
        **kwargs,
    )


def read_conf(local_model_dir: str | os.PathLike) -> dict:
    """The flavor block of a downloaded ``taskvec`` model."""
    return _get_flavor_configuration(model_path=str(local_model_dir), flavor_name=FLAVOR_NAME)


def load_model(model_uri: str, dst_path: str | None = None):
    """Load a ``taskvec`` model: a lazy ``TaskVector`` or an ``nn.Module``, by kind.

    Example::

        vector = load_model("models:/rotate-vector/1")
        net = load_model("models:/digits-composite@champion")
    """
    local = Path(_download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path))
    conf = read_conf(local)
    _add_code_from_conf_to_system_path(str(local), conf)
    data = local / conf.get(conf_keys.DATA, _DATA)
    if conf[conf_keys.KIND] == conf_keys.TASK_VECTOR:
        return TaskVector.load(data)
    return build_module(conf, data)


def _load_pyfunc(data_path: str, model_config: dict | None = None):
    data = Path(data_path)
    conf = json.loads((data / _CONF_FILE).read_text("utf-8"))
    if conf.get(conf_keys.KIND) != conf_keys.CHECKPOINT:
        raise TaskVecError(f"{data}: only checkpoint-kind taskvec models can be loaded as pyfunc")
    module = build_module(conf, data)
    if (conf.get(conf_keys.ARCHITECTURE) or {}).get(conf_keys.HF_CONFIG):
        return HFPyfunc(module, data)
    return CheckpointPyfunc(module)
