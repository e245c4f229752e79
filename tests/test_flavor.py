"""The ``taskvec`` MLflow flavor: save_model, log_model, load_model, pyfunc and serving.

Two kinds of model: ``task_vector`` (load_model gives a lazy TaskVector) and
``checkpoint`` (load_model gives the nn.Module, rebuilt from its recorded factory;
pyfunc and ``mlflow models serve`` call it). Weights are safetensors, never pickle.
MLflow runs against a real sqlite store under tmp_path.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo
from mlflow_helpers import (
    CODE_PATHS,
    COMPOSITE_NAME,
    FACTORY,
    FACTORY_KWARGS,
    assert_same_state,
    digits_inputs,
    expected_composite_net,
    finetune_of,
    log_checkpoint,
    mlflow_store,
    run_module,
    state_of,
    template_db,
    tiny_net,
    weight_files,
)

from mlflow_taskvec import TaskVecError
from mlflow_taskvec.mlflow import flavor
from mlflow_taskvec.engine.checkpoint import SafetensorsCheckpoint, open_checkpoint
from mlflow_taskvec.engine.taskvector import TaskVector

# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    """A base, a fine-tune of it, and the task vector between them (in memory)."""
    base = tiny_net(0)
    ft = finetune_of(base, seed=1)
    vector = TaskVector.extract(state_of(base), state_of(ft), task="rotate")
    return base, ft, vector


@pytest.fixture
def store(tmp_path, tmp_path_factory):
    with mlflow_store(tmp_path / "mlflow", template_db(tmp_path_factory)) as s:
        yield s


def flavor_block(model_dir: Path) -> dict:
    return yaml.safe_load((Path(model_dir) / "MLmodel").read_text("utf-8"))["flavors"]["taskvec"]


# -- task_vector kind ---------------------------------------------------------------


def test_saved_task_vector_records_kind_lineage_and_statistics_in_the_flavor_block(models, tmp_path):
    base, ft, vector = models
    flavor.save_model(vector, tmp_path / "model")

    block = flavor_block(tmp_path / "model")
    independent_fingerprint = vector.save(tmp_path / "copy.safetensors")
    deltas = [(ft.state_dict()[n].double() - base.state_dict()[n].double()) for n in base.state_dict()]
    assert block["kind"] == "task_vector"
    assert block["task"] == "rotate"
    assert block["base_fingerprint"] == open_checkpoint(state_of(base)).fingerprint()
    assert block["fingerprint"] == independent_fingerprint
    assert block["num_tensors"] == len(base.state_dict()) == 20
    assert block["num_parameters"] == sum(p.numel() for p in base.parameters()) == 2145
    assert block["l2_norm"] == pytest.approx(vector.norm(), rel=1e-12)
    assert block["l2_norm"] == pytest.approx(math.sqrt(sum(float((d * d).sum()) for d in deltas)), rel=1e-6)
    assert block["dtype"] == "float32"
    assert block["format_version"] == flavor.FORMAT_VERSION == "1"


def test_loading_a_saved_task_vector_gives_a_lazy_vector_with_the_same_tensors(models, tmp_path):
    base, ft, vector = models
    flavor.save_model(vector, tmp_path / "model")

    loaded = flavor.load_model(str(tmp_path / "model"))

    assert isinstance(loaded, TaskVector)
    assert (loaded.task, loaded.base_fingerprint, loaded.names) == (vector.task, vector.base_fingerprint, vector.names)
    # lazy: backed by the model's safetensors file, not by tensors in memory
    (term,) = loaded.terms
    assert isinstance(term.stored, SafetensorsCheckpoint)
    assert all(Path(f).is_relative_to(tmp_path / "model" / "data") for f in term.stored.files)
    for name in vector.names:
        assert torch.equal(loaded.get_tensor(name), vector.get_tensor(name)), name
        torch.testing.assert_close(loaded.get_tensor(name), ft.state_dict()[name] - base.state_dict()[name])


def test_a_task_vector_model_has_no_pyfunc_flavor(models, tmp_path):
    flavor.save_model(models[2], tmp_path / "model")

    mlmodel = yaml.safe_load((tmp_path / "model" / "MLmodel").read_text("utf-8"))

    assert set(mlmodel["flavors"]) == {"taskvec"}


# -- checkpoint kind ------------------------------------------------------------------


def test_saved_checkpoint_records_its_architecture_and_fingerprint(models, tmp_path):
    base, _, _ = models
    flavor.save_model(base, tmp_path / "model", factory=FACTORY, factory_kwargs=FACTORY_KWARGS, code_paths=CODE_PATHS)

    block = flavor_block(tmp_path / "model")

    assert block["kind"] == "checkpoint"
    assert block["architecture"] == {"factory": "digits_tasks:build_model", "factory_kwargs": {"hidden": 16}}
    assert block["fingerprint"] == open_checkpoint(state_of(base)).fingerprint()
    assert (block["num_tensors"], block["num_parameters"], block["dtype"]) == (20, 2145, "float32")
    assert (tmp_path / "model" / block["code"] / "digits_tasks.py").is_file()


def test_loading_a_saved_checkpoint_rebuilds_the_module_with_equal_weights(models, tmp_path):
    base, _, _ = models
    flavor.save_model(base, tmp_path / "model", factory=FACTORY, factory_kwargs=FACTORY_KWARGS, code_paths=CODE_PATHS)

    loaded = flavor.load_model(str(tmp_path / "model"))

    assert isinstance(loaded, torch.nn.Module)
    assert type(loaded).__name__ == "DigitsNet"
    assert not loaded.training
    assert_same_state(state_of(loaded), state_of(base))


def test_a_checkpoint_without_an_architecture_factory_is_refused(models, tmp_path):
    with pytest.raises(TaskVecError, match="needs an architecture"):
        flavor.save_model(models[0], tmp_path / "model")


@pytest.mark.parametrize("kind", ["task_vector", "checkpoint"])
def test_no_pickle_file_is_written_for_either_kind(models, tmp_path, kind):
    base, _, vector = models
    if kind == "task_vector":
        flavor.save_model(vector, tmp_path / "model")
    else:
        flavor.save_model(base, tmp_path / "model", factory=FACTORY, factory_kwargs=FACTORY_KWARGS, code_paths=CODE_PATHS)

    assert weight_files(tmp_path / "model") == []
    assert [p.name for p in (tmp_path / "model" / "data").glob("*.safetensors")] == ["model.safetensors"]
    assert flavor_block(tmp_path / "model")["kind"] == kind


# -- log_model / load_model through the tracking store ---------------------------------------


def test_log_model_of_a_task_vector_returns_a_model_info_and_loads_back(models, store):
    _, _, vector = models
    with mlflow.start_run() as run:
        info = flavor.log_model(vector, name="rotate")

    assert isinstance(info, ModelInfo)
    assert info.model_id.startswith("m-")
    assert info.model_uri == f"models:/{info.model_id}"
    assert info.run_id == run.info.run_id
    assert info.flavors["taskvec"]["kind"] == "task_vector"
    loaded = flavor.load_model(info.model_uri)
    assert isinstance(loaded, TaskVector)
    assert loaded.base_fingerprint == vector.base_fingerprint
    for name in vector.names:
        assert torch.equal(loaded.get_tensor(name), vector.get_tensor(name)), name


def test_log_model_of_a_checkpoint_returns_a_model_info_and_loads_back(models, store):
    base, _, _ = models
    with mlflow.start_run():
        info = log_checkpoint(base, "base")

    assert info.model_id.startswith("m-")
    assert info.flavors["taskvec"]["architecture"]["factory"] == FACTORY
    assert store.client.get_logged_model(info.model_id).name == "base"
    assert_same_state(state_of(flavor.load_model(info.model_uri)), state_of(base))


def test_log_model_with_registered_model_name_registers_a_version_in_one_call(models, store):
    _, _, vector = models
    with mlflow.start_run():
        info = flavor.log_model(vector, name="rotate", registered_model_name="rotate-vector")

    assert info.registered_model_version == 1
    version = store.client.get_model_version("rotate-vector", "1")
    assert version.source == info.model_uri
    assert flavor.load_model("models:/rotate-vector/1").base_fingerprint == vector.base_fingerprint


def test_a_logged_model_holds_no_pickle_file(models, store, tmp_path):
    base, _, _ = models
    with mlflow.start_run():
        info = log_checkpoint(base, "base")

    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "dl")))

    assert (local / "data" / "model.safetensors").is_file()
    assert weight_files(local) == []


# -- pyfunc -------------------------------------------------------------------------------


def test_a_composite_loaded_as_pyfunc_predicts_what_the_module_computes(registry):
    model = mlflow.pyfunc.load_model(f"models:/{COMPOSITE_NAME}/1")
    frame = digits_inputs(5)

    predicted = model.predict(frame, params={"task": "digits"})

    assert predicted.shape == (5, 10)
    np.testing.assert_allclose(predicted, run_module(expected_composite_net(registry), frame, "digits"), atol=1e-5)
    np.testing.assert_array_equal(predicted, run_module(flavor.load_model(f"models:/{COMPOSITE_NAME}/1"), frame))


def test_pyfunc_params_reach_the_module(registry):
    model = mlflow.pyfunc.load_model(f"models:/{COMPOSITE_NAME}@champion")
    frame = digits_inputs(4)

    predicted = model.predict(frame, params={"task": "parity"})

    assert predicted.shape == (4, 2)
    np.testing.assert_allclose(predicted, run_module(expected_composite_net(registry), frame, "parity"), atol=1e-5)


def test_a_task_vector_cannot_be_loaded_as_pyfunc(registry):
    with pytest.raises(MlflowException, match='does not have the "python_function" flavor'):
        mlflow.pyfunc.load_model(registry.vectors["rotate"].model_uri)


# -- mlflow models serve ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def served_composite(registry, tmp_path):
    """``mlflow models serve`` of digits-composite/1 as a real process; yields its base URL."""
    port = _free_port()
    log = open(tmp_path / "serve.log", "wb")
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", f"models:/{COMPOSITE_NAME}/1", "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
        env=registry.store.env(),
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve was not up after 90 s:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        log.close()


def test_mlflow_models_serve_answers_invocations_with_the_composites_predictions(registry, served_composite):
    frame = digits_inputs(6)
    payload = {"dataframe_split": frame.to_dict(orient="split"), "params": {"task": "digits"}}

    answer = _post_json(f"{served_composite}/invocations", payload)

    predictions = np.array(answer["predictions"])
    assert predictions.shape == (6, 10)
    np.testing.assert_allclose(predictions, run_module(expected_composite_net(registry), frame, "digits"), atol=1e-5)
    payload["params"] = {"task": "parity"}
    parity = np.array(_post_json(f"{served_composite}/invocations", payload)["predictions"])
    np.testing.assert_allclose(parity, run_module(expected_composite_net(registry), frame, "parity"), atol=1e-5)
