"""Shared helpers for the MLflow tests (test_flavor, test_registry, test_project).

Everything runs against a REAL MLflow tracking store: a sqlite database and a
local artifact folder under a temporary directory. Creating and migrating an
MLflow sqlite database takes seconds, so one empty, migrated database is made
per test session and copied for each store (a copy takes milliseconds).

The model is the digits example's MLP with ``hidden=16`` (2145 parameters: 1312 in the encoder, 833 in the eight frozen heads);
fine-tunes are the base plus small random noise on the encoder, as in the
task-arithmetic setting where only the encoder is fine-tuned. Import what you
need explicitly: ``from mlflow_helpers import ...``.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
if str(DIGITS) not in sys.path:
    sys.path.insert(0, str(DIGITS))

import digits_tasks  # noqa: E402

from mlflow_taskvec.mlflow import flavor  # noqa: E402
from mlflow_taskvec.engine import checkpoint, following  # noqa: E402
from mlflow_taskvec.engine.taskvector import TaskVector  # noqa: E402
from mlflow_taskvec.recipe import parse_recipe  # noqa: E402
from mlflow_taskvec.mlflow.downloads import resolve  # noqa: E402
from mlflow_taskvec.mlflow.registry import Registered, register_composite, register_task_vector  # noqa: E402

HIDDEN = 16
FACTORY = "digits_tasks:build_model"
FACTORY_KWARGS = {"hidden": HIDDEN}
CODE_PATHS = [str(DIGITS / "digits_tasks.py")]
PIXELS = [f"pixel_{i}" for i in range(64)]
EXPERIMENT = "taskvec-tests"

# -- models -----------------------------------------------------------------------


def tiny_net(seed: int = 0) -> torch.nn.Module:
    """The digits example's architecture with a 16-unit encoder, deterministic in ``seed``."""
    return digits_tasks.build_model(seed, hidden=HIDDEN).eval()


def finetune_of(net: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """A copy of ``net`` with Gaussian noise (std ``std``) added to every encoder weight."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(net)
    with torch.no_grad():
        for p in out.encoder.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return out.eval()


def state_of(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    """Same names, shapes, dtypes and values (exactly, unless ``atol`` is given)."""
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        if atol:
            torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=name)
        else:
            assert torch.equal(got, want), name


def digits_inputs(n: int = 5) -> pd.DataFrame:
    """``n`` test digits as a DataFrame of 64 float32 pixel columns."""
    x, _ = digits_tasks.load_task("digits", "test")
    return pd.DataFrame(x[:n].numpy(), columns=PIXELS)


def run_module(net: torch.nn.Module, frame: pd.DataFrame, task: str = "digits"):
    with torch.no_grad():
        return net(torch.tensor(frame.to_numpy(), dtype=torch.float32), task).numpy()


def signature_for(net: torch.nn.Module):
    """A signature with the pixel columns and a ``task`` parameter (default ``digits``)."""
    example = digits_inputs()
    return infer_signature(example, run_module(net, example), params={"task": "digits"})


def log_checkpoint(net: torch.nn.Module, name: str, registered_model_name: str | None = None, signature=None):
    """Log ``net`` as a checkpoint-kind taskvec model of the active run."""
    return flavor.log_model(
        net,
        name=name,
        factory=FACTORY,
        factory_kwargs=FACTORY_KWARGS,
        code_paths=CODE_PATHS,
        registered_model_name=registered_model_name,
        signature=signature,
    )


def weight_files(folder: Path) -> list[str]:
    """Every file under ``folder`` that could hold pickled weights."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.suffix in (".pkl", ".pt", ".pth", ".bin", ".ckpt"))


# -- a real tracking store ------------------------------------------------------------

_TEMPLATE: Path | None = None


def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow sqlite database, made once per session."""
    global _TEMPLATE
    if _TEMPLATE is None or not _TEMPLATE.is_file():
        db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
        MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
        _TEMPLATE = db
    return _TEMPLATE


@dataclass
class Store:
    root: Path
    tracking_uri: str
    experiment_id: str
    cache: Path
    artifacts: Path
    client: MlflowClient = field(repr=False)

    def env(self, *, experiment: bool = True, **extra: str) -> dict[str, str]:
        """The environment for a subprocess that should use this store (and the venv's tools first on PATH).

        With ``experiment`` its runs go to the store's experiment (whose artifacts
        live under the store's root), not to experiment 0, whose artifact folder
        is ``./mlruns`` of the subprocess's working directory; ``mlflow run
        --experiment-name`` needs it off (MLflow refuses a name and an id)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        if experiment:
            env["MLFLOW_EXPERIMENT_ID"] = self.experiment_id
        env.update(
            MLFLOW_TRACKING_URI=self.tracking_uri,
            MLFLOW_TASKVEC_CACHE=str(self.cache),
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env


@contextmanager
def mlflow_store(root: Path, template: Path) -> Iterator[Store]:
    """A sqlite tracking store and artifact folder under ``root``, active until exit.

    Sets the tracking URI, the experiment (``MLFLOW_EXPERIMENT_ID``) and the
    download cache (``MLFLOW_TASKVEC_CACHE``); on exit ends any active run and
    restores the previous tracking URI and environment.
    """
    root.mkdir(parents=True, exist_ok=True)
    db = root / "mlflow.db"
    shutil.copyfile(template, db)
    uri = f"sqlite:///{db}"
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TASKVEC_CACHE", str(root / "cache"))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            client = MlflowClient()
            experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
            mp.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
            yield Store(root, uri, experiment_id, root / "cache", root / "artifacts", client)
        finally:
            while mlflow.active_run() is not None:
                mlflow.end_run()
            mlflow.set_tracking_uri(previous_uri)


# -- a small registry: base, fine-tunes, task vectors and a composite ---------------------

BASE_NAME = "digits-base"
VECTOR_TASKS = ("rotate", "flip")
COMPOSITE_NAME = "digits-composite"
COMPOSITE_SCALE = 0.7
COMPOSITE_WEIGHTS = {"rotate": 1.0, "flip": -0.5}

# The taskvec.* tags every registered task vector, and every registered composite, carries.
TASKVEC_VECTOR_TAGS = {
    "taskvec.kind",
    "taskvec.task",
    "taskvec.base_uri",
    "taskvec.base_fingerprint",
    "taskvec.finetuned_uri",
    "taskvec.fingerprint",
    "taskvec.num_parameters",
    "taskvec.l2_norm",
}
TASKVEC_COMPOSITE_TAGS = {
    "taskvec.kind",
    "taskvec.method",
    "taskvec.scale",
    "taskvec.params",
    "taskvec.inputs",
    "taskvec.base_uri",
    "taskvec.base_fingerprint",
    "taskvec.recipe_sha256",
    "taskvec.fingerprint",
}


def vector_name(task: str) -> str:
    return f"digits-{task}-vector"


@dataclass
class FineTune:
    task: str
    net: torch.nn.Module
    run_id: str
    model_id: str


@dataclass
class DigitsRegistry:
    """What ``build_registry`` made, with the in-memory models to check against."""

    store: Store
    base_net: torch.nn.Module
    base_model_id: str
    base_run_id: str
    finetunes: dict[str, FineTune]
    vectors: dict[str, Registered]
    composite: Registered
    composite_recipe: dict

    @property
    def base_uri(self) -> str:
        return f"models:/{BASE_NAME}/1"


def composite_recipe() -> dict:
    """``digits-base + 0.7 * (rotate@current - 0.5 * flip/1)``: one input by alias, one by version."""
    return {
        "base": f"models:/{BASE_NAME}@current",
        "method": "task_arithmetic",
        "scale": COMPOSITE_SCALE,
        "vectors": [
            {"vector": f"models:/{vector_name('rotate')}@current", "weight": COMPOSITE_WEIGHTS["rotate"]},
            {"vector": f"models:/{vector_name('flip')}/1", "weight": COMPOSITE_WEIGHTS["flip"]},
        ],
    }


def expected_composite_state(registry: DigitsRegistry, weights=COMPOSITE_WEIGHTS, scale=COMPOSITE_SCALE) -> dict[str, torch.Tensor]:
    """``base + scale * sum_i w_i (ft_i - base)``, computed from the in-memory models."""
    base = state_of(registry.base_net)
    out = {name: t.clone() for name, t in base.items()}
    for task, weight in weights.items():
        ft = state_of(registry.finetunes[task].net)
        for name in out:
            out[name] += scale * weight * (ft[name] - base[name])
    return out


def expected_composite_net(registry: DigitsRegistry) -> torch.nn.Module:
    net = tiny_net(0)
    net.load_state_dict(expected_composite_state(registry))
    return net.eval()


def build_registry(store: Store) -> DigitsRegistry:
    """Register ``digits-base`` (checkpoint kind, alias ``current``); log one fine-tune per
    task in its own run and register its task vector (alias ``current``); register a composite."""
    client = store.client
    base_net = tiny_net(0)
    with mlflow.start_run(run_name="pretrain") as run:
        info = log_checkpoint(base_net, "base", registered_model_name=BASE_NAME, signature=signature_for(base_net))
        base_run_id = run.info.run_id
    client.set_registered_model_alias(BASE_NAME, "current", "1")
    base_ref = resolve(f"models:/{BASE_NAME}/1")

    finetunes, vectors = {}, {}
    for i, task in enumerate(VECTOR_TASKS):
        net = finetune_of(base_net, seed=100 + i)
        with mlflow.start_run(run_name=f"finetune-{task}") as run:
            ft_info = log_checkpoint(net, "finetuned")
        finetunes[task] = FineTune(task, net, run.info.run_id, ft_info.model_id)
        ft_ref = resolve(ft_info.model_uri)
        vector = TaskVector.extract(base_ref.path, ft_ref.path, task=task)
        vectors[task] = register_task_vector(vector, vector_name(task), base_ref, ft_ref, alias="current")

    recipe = composite_recipe()
    composite = register_composite(parse_recipe(recipe), COMPOSITE_NAME, alias="champion")
    return DigitsRegistry(store, base_net, info.model_id, base_run_id, finetunes, vectors, composite, recipe)


# -- versions of their own, and tampering with what the store holds ---------------------------


def register_vector_copy(registry: DigitsRegistry, task: str, name: str, alias: str | None = None) -> Registered:
    """Register ``task``'s task vector again, as a version of ``name``: one a test may approve,
    tamper with or delete without touching the shared registry."""
    base_ref = resolve(registry.base_uri)
    ft_ref = resolve(f"models:/{registry.finetunes[task].model_id}")
    vector = TaskVector.extract(base_ref.path, ft_ref.path, task=task)
    return register_task_vector(vector, name, base_ref, ft_ref, alias=alias)


def file_uri_path(uri: str) -> Path:
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(uri).path))


def stored_weights(client: MlflowClient, model_id: str) -> Path:
    """The safetensors file of a logged taskvec model, where the store keeps it."""
    (weights,) = sorted((file_uri_path(client.get_logged_model(model_id).artifact_location) / "data").glob("*.safetensors"))
    return weights


def run_artifact(client: MlflowClient, run_id: str, name: str) -> Path:
    """A file logged in a run, where the store keeps it."""
    return file_uri_path(client.get_run(run_id).info.artifact_uri) / name


def flip_last_byte(path: Path) -> None:
    """Change one byte of a safetensors file's tensor data (its last byte), in place."""
    data = bytearray(Path(path).read_bytes())
    data[-1] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def replace_weights_with_matching_records(client: MlflowClient, model_id: str) -> str:
    """Change one byte of a logged model's weights and rewrite the fingerprint its MLmodel and
    taskvec.json record to match (a replacement only a check against the registry can see);
    returns the new fingerprint."""
    from mlflow_taskvec.engine.checkpoint import open_checkpoint

    weights = stored_weights(client, model_id)
    old = open_checkpoint(weights).fingerprint(fresh=True)
    flip_last_byte(weights)
    new = open_checkpoint(weights).fingerprint(fresh=True)
    for record in (weights.parent.parent / "MLmodel", weights.parent / "taskvec.json"):
        record.write_text(record.read_text("utf-8").replace(old, new), "utf-8")
    return new


def all_versions(client: MlflowClient) -> list[tuple[str, str]]:
    return sorted((mv.name, str(mv.version)) for mv in client.search_model_versions())


# -- a base and real fine-tunes (for searches whose winner must make sense) -------------------


def register_trained_vectors(tasks, steps: int = 40, lr: float = 1e-2) -> torch.nn.Module:
    """Register ``digits-base`` and, per task, a real fine-tune of its encoder (``steps`` full-batch
    Adam steps) as the task vector ``digits-<task>-vector`` version 1; returns the base net."""
    base_net = tiny_net(0)
    with mlflow.start_run(run_name="pretrain"):
        log_checkpoint(base_net, "base", registered_model_name=BASE_NAME, signature=signature_for(base_net))
    base = resolve(f"models:/{BASE_NAME}/1")
    for task in tasks:
        net = digits_tasks.train(copy.deepcopy(base_net), task, steps=steps, lr=lr)
        with mlflow.start_run(run_name=f"finetune-{task}"):
            info = log_checkpoint(net, "finetuned")
        ft = resolve(info.model_uri)
        register_task_vector(TaskVector.extract(base.path, ft.path, task=task), vector_name(task), base, ft)
    return base_net


def served_answer(model_uri: str, payload, deadline_s: float = 240, read_timeout_s: float = 60):
    """``mlflow models serve`` of ``model_uri`` on a free 127.0.0.1 port (this checkout's package on
    its path): ``payload`` POSTed to /invocations once the server answers (within ``deadline_s``),
    its JSON answer returned; the server's process group is stopped either way."""
    import json
    import signal
    import socket
    import subprocess
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "-h", "127.0.0.1", "-p", str(port), "--env-manager", "local"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        deadline = time.time() + deadline_s
        body = json.dumps(payload).encode()
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"})
                return json.loads(urllib.request.urlopen(request, timeout=read_timeout_s).read())
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise AssertionError(server.stderr.read().decode()[-2000:] if server.poll() is not None else "the server did not answer")
                time.sleep(1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def count_hashing(monkeypatch) -> tuple[list[int], list[int]]:
    """The bytes hashed in a pass over finished files, and those hashed while a download wrote them."""
    after: list[int] = []
    real_digest = checkpoint.tensor_digest
    monkeypatch.setattr(checkpoint, "tensor_digest", lambda data: after.append(memoryview(data).nbytes) or real_digest(data))
    during: list[int] = []
    real_new = following.new_digest

    class Counting:
        def __init__(self):
            self.digest = real_new()

        def update(self, data):
            during.append(memoryview(data).nbytes)
            self.digest.update(data)

        def hexdigest(self):
            return self.digest.hexdigest()

    monkeypatch.setattr(following, "new_digest", Counting)
    return after, during
