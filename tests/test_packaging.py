"""The package's metadata and the MLflow project's files agree: dependencies, entry points, parameters."""

from __future__ import annotations

import configparser
import re

import pytest
import yaml
from mlflow_helpers import ROOT
from packaging.requirements import Requirement

ENTRY_POINTS = {"main", "pretrain", "finetune", "extract", "compose", "search", "leaderboard"}


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


def test_mlproject_declares_the_seven_entry_points_and_the_conda_env():
    project = yaml.safe_load((ROOT / "MLproject").read_text("utf-8"))

    assert set(project["entry_points"]) == ENTRY_POINTS
    assert project["conda_env"] == "conda.yaml"
    assert (ROOT / project["conda_env"]).is_file()


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_every_placeholder_of_an_entry_points_command_is_a_declared_parameter(entry_point):
    spec = yaml.safe_load((ROOT / "MLproject").read_text("utf-8"))["entry_points"][entry_point]

    placeholders = set(re.findall(r"\{(\w+)\}", spec["command"]))

    assert placeholders == set(spec.get("parameters", {}))
