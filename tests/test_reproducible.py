"""A version registered from local paths says so: one warning line and taskvec.reproducible=false."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner
from mlflow_helpers import mlflow_store, template_db
from safetensors.torch import save_file
from small_models import base_state, finetune_state

from mlflow_taskvec.cli import main as cli
from mlflow_taskvec.engine.checkpoint import open_checkpoint


@pytest.fixture
def store(tmp_path, tmp_path_factory):
    with mlflow_store(tmp_path / "mlflow", template_db(tmp_path_factory)) as s:
        yield s


@pytest.fixture
def local(tmp_path):
    """An HF-style base folder (config.json: the composite has an architecture) and a fine-tune file."""
    base = base_state(0)
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text('{"model_type": "tiny"}')
    save_file(finetune_state(base, 1), str(tmp_path / "ft.safetensors"))
    return tmp_path


def test_registering_a_composite_of_local_paths_warns_tags_and_still_writes_the_output(store, local):
    (local / "recipe.yaml").write_text(yaml.safe_dump({"base": "base", "scale": 0.5, "vectors": [{"finetuned": "ft.safetensors"}]}))

    result = CliRunner().invoke(cli, ["compose", str(local / "recipe.yaml"), "--register", "local-composite", "-o", str(local / "out")])

    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert warnings == [
        "Warning: models:/local-composite/1 names local paths (base and 1 more) that verify on another "
        "machine cannot fetch (tagged taskvec.reproducible=false); register the inputs and use their models:/ URIs to make it reproducible"
    ]
    version = store.client.get_model_version("local-composite", "1")
    assert version.tags["taskvec.reproducible"] == "false"
    assert open_checkpoint(local / "out").fingerprint() == version.tags["taskvec.fingerprint"]


def test_registering_a_task_vector_of_local_paths_is_tagged_not_reproducible(store, local):
    result = CliRunner().invoke(cli, ["extract", "--base", str(local / "base"), "--finetuned", str(local / "ft.safetensors"), "--register", "local-vector"])

    assert result.exit_code == 0, result.output
    assert "Warning: models:/local-vector/1 names local paths" in result.stderr
    assert store.client.get_model_version("local-vector", "1").tags["taskvec.reproducible"] == "false"


def test_compose_register_also_writes_the_recipes_output(store, local):
    (local / "recipe.yaml").write_text(yaml.safe_dump({"base": "base", "vectors": [{"finetuned": "ft.safetensors"}], "output": "written"}))

    result = CliRunner().invoke(cli, ["compose", str(local / "recipe.yaml"), "--register", "with-output"])

    assert result.exit_code == 0, result.output
    assert f"composite: {local / 'written'}" in result.stdout
    version = store.client.get_model_version("with-output", "1")
    assert open_checkpoint(local / "written").fingerprint() == version.tags["taskvec.fingerprint"]
