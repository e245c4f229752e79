"""The MLflow project: its environment matches the package's, and every entry point runs.

Each entry point runs as ``mlflow run . -e NAME -P ... --env-manager local`` in a
subprocess against a temporary sqlite store (with ``-P steps=5`` so training is
instant), and the test checks what it registered.
"""

from __future__ import annotations

import configparser
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from mlflow_helpers import ROOT, Store, mlflow_store, template_db
from packaging.requirements import Requirement

from mlflow_taskvec.tracking.references import resolve

ENTRY_POINTS = {"main", "pretrain", "finetune", "extract", "compose", "search"}
MLFLOW = str(Path(sys.executable).parent / "mlflow")
PROJECT_EXPERIMENT = "project-tests"

# -- the environment ------------------------------------------------------------------


def normalized(requirement: str) -> str:
    """``Name>=1,<2`` as ``name<2,>=1``: canonical name, sorted specifiers."""
    req = Requirement(requirement)
    name = re.sub(r"[-_.]+", "-", req.name).lower()
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    specs = ",".join(sorted(str(s) for s in req.specifier))
    marker = f"; {req.marker}" if req.marker else ""
    return f"{name}{extras}{specs}{marker}"


def setup_cfg_requirements(extra: str) -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    install = [line for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    extras = [line for line in cfg["options.extras_require"][extra].splitlines() if line.strip()]
    return {normalized(r) for r in install + extras}


def conda_pip_requirements() -> set[str]:
    env = yaml.safe_load((ROOT / "conda.yaml").read_text("utf-8"))
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    return {normalized(r) for r in pip}


def test_conda_pip_dependencies_are_setup_cfgs_install_requires_plus_the_examples_extra():
    assert conda_pip_requirements() == setup_cfg_requirements("examples")


def test_conda_env_provides_python_and_pip():
    env = yaml.safe_load((ROOT / "conda.yaml").read_text("utf-8"))

    assert "pip" in env["dependencies"]
    assert any(isinstance(d, str) and d.startswith("python") for d in env["dependencies"])


def test_mlproject_declares_the_six_entry_points_and_the_conda_env():
    project = yaml.safe_load((ROOT / "MLproject").read_text("utf-8"))

    assert set(project["entry_points"]) == ENTRY_POINTS
    assert project["conda_env"] == "conda.yaml"
    assert (ROOT / project["conda_env"]).is_file()


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_every_placeholder_of_an_entry_points_command_is_a_declared_parameter(entry_point):
    spec = yaml.safe_load((ROOT / "MLproject").read_text("utf-8"))["entry_points"][entry_point]

    placeholders = set(re.findall(r"\{(\w+)\}", spec["command"]))

    assert placeholders == set(spec.get("parameters", {}))


# -- entry points through `mlflow run` -------------------------------------------------------


def mlflow_run(store: Store, entry_point: str, timeout: float = 300, **params) -> str:
    """``mlflow run . -e ENTRY_POINT -P k=v ... --env-manager local``; returns its output (asserting success)."""
    args = [MLFLOW, "run", ".", "-e", entry_point, "--env-manager", "local", "--experiment-name", PROJECT_EXPERIMENT]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    done = subprocess.run(args, cwd=ROOT, env=store.env(), capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"mlflow run -e {entry_point} failed ({done.returncode}):\n{output[-4000:]}"
    assert re.search(r"=== Run \(ID '[0-9a-f]+'\) succeeded ===", output), output[-4000:]
    return output


@contextmanager
def project_store(root: Path, tmp_path_factory) -> Iterator[Store]:
    """A store with the experiment that ``mlflow run --experiment-name`` uses, its artifacts under ``root``."""
    with mlflow_store(root, template_db(tmp_path_factory)) as store:
        store.client.create_experiment(PROJECT_EXPERIMENT, artifact_location=(root / "project-artifacts").as_uri())
        yield store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with project_store(tmp_path_factory.mktemp("project"), tmp_path_factory) as store:
        yield store


@pytest.fixture(scope="module")
def pretrained(store) -> str:
    return mlflow_run(store, "pretrain", name="digits-base", steps=5)


@pytest.fixture(scope="module")
def finetuned(store, pretrained) -> str:
    return mlflow_run(store, "finetune", task="rotate", steps=5)


def entry_point_of(store: Store, run_id: str) -> str:
    return store.client.get_run(run_id).data.tags["mlflow.project.entryPoint"]


def test_pretrain_registers_the_base_as_a_checkpoint_with_alias_current(store, pretrained):
    version = store.client.get_model_version("digits-base", "1")

    assert str(store.client.get_model_version_by_alias("digits-base", "current").version) == "1"
    assert entry_point_of(store, version.run_id) == "pretrain"
    assert store.client.get_run(version.run_id).data.params["steps"] == "5"
    resolved = resolve("models:/digits-base@current")
    assert resolved.conf["kind"] == "checkpoint"
    assert resolved.conf["architecture"]["factory"] == "digits_tasks:build_model"


def test_finetune_registers_the_task_vector_against_the_current_base(store, finetuned):
    version = store.client.get_model_version("digits-rotate-vector", "1")
    base = resolve("models:/digits-base/1")

    assert version.tags["taskvec.kind"] == "task_vector"
    assert version.tags["taskvec.task"] == "rotate"
    assert version.tags["taskvec.base_uri"] == "models:/digits-base/1"
    assert version.tags["taskvec.base_fingerprint"] == base.fingerprint
    assert entry_point_of(store, version.run_id) == "finetune"
    fine_tune = resolve(version.tags["taskvec.finetuned_uri"])
    assert fine_tune.run_id == version.run_id


def test_extract_registers_the_vector_between_two_mlflow_models(store, finetuned):
    rotate = store.client.get_model_version("digits-rotate-vector", "1")

    mlflow_run(store, "extract", base="models:/digits-base/1", finetuned=rotate.tags["taskvec.finetuned_uri"], name="extracted-rotate", task="rotate")

    version = store.client.get_model_version("extracted-rotate", "1")
    assert version.tags["taskvec.kind"] == "task_vector"
    assert version.tags["taskvec.fingerprint"] == rotate.tags["taskvec.fingerprint"]
    assert version.tags["taskvec.finetuned_uri"] == rotate.tags["taskvec.finetuned_uri"]


def test_compose_registers_a_composite_from_a_recipe_file(store, finetuned, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump({"base": "models:/digits-base@current", "scale": 0.5, "vectors": [{"vector": "models:/digits-rotate-vector/1", "weight": 1.0}]}),
        "utf-8",
    )

    mlflow_run(store, "compose", recipe=recipe, name="project-composite")

    version = store.client.get_model_version("project-composite", "1")
    rotate = store.client.get_model_version("digits-rotate-vector", "1")
    assert version.tags["taskvec.kind"] == "composite"
    assert version.tags["taskvec.base_uri"] == "models:/digits-base/1"
    assert version.tags["taskvec.inputs"] == (
        f'[{{"uri": "models:/digits-rotate-vector/1", "weight": 1.0, "fingerprint": "{rotate.tags["taskvec.fingerprint"]}"}}]'
    )
    assert entry_point_of(store, version.run_id) == "compose"


def test_search_registers_the_best_composite_of_a_grid(store, finetuned, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "base": "models:/digits-base@current",
                "vectors": [{"vector": "models:/digits-rotate-vector/1"}],
                "evaluation": {"evaluator": "digits_tasks:evaluate", "tasks": ["rotate"], "control_tasks": ["digits"]},
                "search": {"scale": {"low": 0.0, "high": 1.0, "step": 0.5}},
            }
        ),
        "utf-8",
    )

    mlflow_run(store, "search", recipe=recipe, name="project-searched")

    version = store.client.get_model_version("project-searched", "1")
    search = json.loads(version.tags["taskvec.search"])
    assert search["strategy"] == "grid" and search["candidates"] == 3 and search["objective"] == "mean_normalized"
    assert float(version.tags["taskvec.scale"]) in (0.0, 0.5, 1.0)
    parent = store.client.get_run(search["search_run_id"])
    assert entry_point_of(store, parent.info.run_id) == "search"
    assert "test.rotate.normalized_accuracy" in parent.data.metrics


MAIN_MODELS = {
    "digits-base": "checkpoint",
    **{f"digits-{task}-vector": "task_vector" for task in ("rotate", "flip", "invert", "parity", "flip_invert")},
    "digits-addition": "composite",
    "digits-addition-ties": "composite",
    "digits-negation": "composite",
    "digits-analogy": "composite",
}


def test_main_runs_the_whole_pipeline_and_registers_every_model(tmp_path, tmp_path_factory):
    with project_store(tmp_path / "main", tmp_path_factory) as store:
        mlflow_run(store, "main", timeout=600, steps=5)

        assert {m.name for m in store.client.search_registered_models()} == set(MAIN_MODELS)
        for name, kind in MAIN_MODELS.items():
            (version,) = store.client.search_model_versions(f"name='{name}'")
            assert version.tags.get("taskvec.kind") == (None if kind == "checkpoint" else kind), name
            assert resolve(f"models:/{name}/1").conf["kind"] == ("task_vector" if kind == "task_vector" else "checkpoint"), name
        addition = store.client.get_model_version("digits-addition", "1")
        assert {row["uri"] for row in json.loads(addition.tags["taskvec.inputs"])} == {
            f"models:/digits-{task}-vector/1" for task in ("rotate", "flip", "invert", "parity")
        }
        assert "mean.accuracy" in store.client.get_run(addition.run_id).data.metrics
