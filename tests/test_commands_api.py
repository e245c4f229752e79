"""``compress``, ``export-lora``, ``inspect``, ``similarity``, ``lineage``, ``verify`` and ``approve``
as library calls (``mlflow_taskvec.compose``, ``.similarity``, ``.engine.describe``,
``.mlflow.workflows``), what the CLI prints read from their result objects.

Real safetensors files, and a real sqlite store (conftest's ``registry``) where MLflow is
needed; expected values come from the formulas (SVD, cosine, L2 norms), not from the code
under test.
"""

from __future__ import annotations

import json
import math

import matplotlib.image
import pytest
import torch
from click.testing import CliRunner
from mlflow_helpers import COMPOSITE_NAME, vector_name
from safetensors.torch import load_file, save_file

from mlflow_taskvec.cli import main as cli
from mlflow_taskvec.compose import Compressed, ExportedAdapter, compress_vector, export_adapter
from mlflow_taskvec.engine.checkpoint import open_checkpoint
from mlflow_taskvec.engine.describe import describe
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.errors import OutputExistsError, ParameterError, TaskVecError
from mlflow_taskvec.mlflow import workflows
from mlflow_taskvec.mlflow.approval import Approval
from mlflow_taskvec.mlflow.verify import Verified
from mlflow_taskvec.similarity import Similarity, similarity_of

# An 8x8 delta of rank 2 (singular values 3 and 1) and a bias: rank 1 keeps the first
# component, rank 2 all of the matrix.
U = torch.linalg.qr(torch.arange(64.0).reshape(8, 8).sin())[0]
DELTA = 3.0 * torch.outer(U[:, 0], U[:, 1]) + 1.0 * torch.outer(U[:, 2], U[:, 3])
BIAS = torch.tensor([0.5, -0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.125])


@pytest.fixture
def pair(tmp_path):
    """A base folder (model.safetensors) and a fine-tune whose delta is DELTA and BIAS."""
    base = {"lin.weight": torch.ones(8, 8), "lin.bias": torch.zeros(8)}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    save_file({"lin.weight": base["lin.weight"] + DELTA, "lin.bias": BIAS.clone()}, str(tmp_path / "ft.safetensors"))
    return tmp_path / "base", tmp_path / "ft.safetensors"


@pytest.fixture
def vector(pair, tmp_path):
    base, ft = pair
    path = tmp_path / "tv.safetensors"
    TaskVector.extract(base, ft, task="t").save(path)
    return path


# -- compress ---------------------------------------------------------------------------


def test_a_local_compress_stores_the_truncated_svd_and_reports_it(vector, tmp_path):
    out = tmp_path / "lowrank.safetensors"

    result = workflows.compress_vector(vector, "lowrank", out, rank=1)

    assert isinstance(result, Compressed) and result.output == out
    u, s, vh = torch.linalg.svd(DELTA.double())
    stored = open_checkpoint(out)
    torch.testing.assert_close(stored.get_tensor("lin.weight").double(), s[0] * torch.outer(u[:, 0], vh[0]), rtol=0, atol=1e-5)
    assert torch.equal(stored.get_tensor("lin.bias"), BIAS)  # a 1-D tensor is stored dense
    stored_bytes, dense_bytes = (8 + 8) * 4 + 8 * 4, (64 + 8) * 4
    assert (result.result.stored_bytes, result.result.dense_bytes) == (stored_bytes, dense_bytes)
    lines = result.lines()
    assert lines[0] == f"compressed vector: {out}"
    assert lines[1].startswith("format: lowrank (rank 1)  tensors: ")
    assert lines[2].startswith(f"size: {stored_bytes} bytes stored, {dense_bytes} dense (")
    assert lines[3:] == [f"source fingerprint: {open_checkpoint(vector).fingerprint()}", f"fingerprint: {stored.fingerprint()}"]


def test_compress_prints_what_the_function_reports(vector, tmp_path):
    out = tmp_path / "cli.safetensors"
    expected = compress_vector(vector, tmp_path / "api.safetensors", "lowrank", rank=1).lines()[1:]

    printed = CliRunner().invoke(cli, ["compress", str(vector), "--format", "lowrank", "--rank", "1", "-o", str(out)])

    assert printed.exit_code == 0, printed.output
    assert printed.stdout.splitlines() == [f"compressed vector: {out}", *expected]


def test_compress_checks_its_settings_before_reading_the_vector(tmp_path):
    with pytest.raises(ParameterError) as raised:
        workflows.compress_vector(tmp_path / "missing.safetensors", "lowrank", tmp_path / "out.safetensors", rank=0)
    assert raised.value.param == "rank"
    with pytest.raises(ParameterError) as raised:
        workflows.compress_vector(tmp_path / "missing.safetensors", "sparse")
    assert raised.value.param == "output"


def test_compress_with_register_reports_the_version(registry, client):
    source = f"models:/{vector_name('rotate')}/1"

    result = workflows.compress_vector(source, "lowrank", register_as="api-rotate-lowrank", rank=2)

    assert isinstance(result, workflows.CompressedAndRegistered) and result.compressed.output is None
    version = client.get_model_version("api-rotate-lowrank", "1")
    assert version.tags["taskvec.compressed_from"] == source
    assert version.tags["taskvec.fingerprint"] == result.compressed.result.fingerprint
    assert int(version.tags["taskvec.stored_bytes"]) == result.compressed.result.stored_bytes
    lines = result.lines()
    assert lines[0].startswith("format: lowrank (rank 2)  tensors: ")
    assert lines[-3] == f"source fingerprint: {client.get_model_version(vector_name('rotate'), '1').tags['taskvec.fingerprint']}"
    assert lines[-1] == f"registered: models:/api-rotate-lowrank/1  (model {version.source}, run {version.run_id})"


# -- export-lora ------------------------------------------------------------------------


def lora_product(folder) -> torch.Tensor:
    weights = load_file(str(folder / "adapter_model.safetensors"))
    (a,) = [v for k, v in weights.items() if k.endswith("lora_A.weight")]
    (b,) = [v for k, v in weights.items() if k.endswith("lora_B.weight")]
    return b.double() @ a.double()


def test_export_adapter_writes_the_delta_as_factors_and_reports_the_left_out_bias(vector, tmp_path):
    out = tmp_path / "adapter"

    result = export_adapter(vector, out, rank=2)

    assert isinstance(result, ExportedAdapter)
    torch.testing.assert_close(lora_product(out), DELTA.double(), rtol=0, atol=1e-5)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 2)
    bias_share = float(BIAS.double().square().sum() / (DELTA.double().square().sum() + BIAS.double().square().sum()))
    assert result.result.left_out == pytest.approx({"lin.bias": bias_share}, rel=1e-6)
    assert result.result.relative_error == pytest.approx(math.sqrt(bias_share), rel=1e-4)  # the bias is all that is missing
    lines = result.lines()
    assert lines[:2] == [f"adapter: {out}", "r: 2  lora_alpha: 2  modules: 1"]
    assert lines[2].startswith("  lin.weight  rank    2  relative error ")
    assert lines[3] == f"not in the adapter ({bias_share:.4%} of ||tau||^2; use --modules-to-save for them): lin.bias"
    assert lines[4] == f"total relative Frobenius error: {result.result.relative_error:.6g}"


def test_export_adapter_of_a_fine_tune_extracts_it_against_the_base_and_names_the_base(pair, tmp_path):
    base, ft = pair

    export_adapter(ft, tmp_path / "adapter", base=base, energy=0.999)

    torch.testing.assert_close(lora_product(tmp_path / "adapter"), DELTA.double(), rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())


def test_export_adapter_refuses_a_checkpoint_without_its_base(pair, tmp_path):
    _, ft = pair
    with pytest.raises(TaskVecError, match="is a checkpoint, not a task vector"):
        export_adapter(ft, tmp_path / "adapter", rank=2)
    assert not (tmp_path / "adapter").exists()
    with pytest.raises(ParameterError) as raised:
        export_adapter(ft, tmp_path / "adapter", rank=2, dtype="float64")
    assert raised.value.param == "dtype" and str(raised.value) == "dtype: 'float64' is not one of float32, float16, bfloat16"


# -- inspect ----------------------------------------------------------------------------


def test_a_description_lists_counts_norms_and_layers(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"layers.0.w": torch.tensor([3.0, 4.0]), "layers.1.w": torch.tensor([[1.0, 2.0], [2.0, 4.0]]), "head.b": torch.tensor([12.0]),
               "steps": torch.tensor([3])}, str(path))
    d = describe(open_checkpoint(path))

    lines = d.lines(top=2, layers=True)

    assert lines[:7] == [
        f"source: {d.source}",
        "kind: checkpoint",
        "tensors: 4",
        "parameters: 8",
        "dtypes: float32 (7), int64 (1)",
        f"fingerprint: {open_checkpoint(path).fingerprint()}",
        f"l2 norm: {math.sqrt(25 + 25 + 144):.6g}",
    ]
    assert lines[7:10] == ["largest 2 tensors by l2 norm:", "  head.b      12", "  layers.0.w  5"]
    assert lines[10] == "l2 norm by layer:"
    assert sorted(lines[11:]) == ["  head      12", "  layers.0  5", "  layers.1  5"]
    assert d.lines(top=0) == lines[:7]
    printed = CliRunner().invoke(cli, ["inspect", str(path), "--top", "2", "--layers"])
    assert printed.exit_code == 0 and printed.stdout == "\n".join(lines) + "\n"


# -- similarity -------------------------------------------------------------------------


def saved_vector(tmp_path, task: str, delta: list[float]):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "zero.safetensors"))
    save_file({"w": torch.tensor(delta)}, str(tmp_path / f"{task}-ft.safetensors"))
    path = tmp_path / f"{task}.safetensors"
    TaskVector.extract(tmp_path / "zero.safetensors", tmp_path / f"{task}-ft.safetensors", task=task).save(path)
    return path


def test_similarity_of_two_vectors_is_their_cosine_and_the_heatmap_is_a_png(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    a, b = saved_vector(tmp_path, "a", [1.0, 0.0]), saved_vector(tmp_path, "b", [1.0, 1.0])
    heatmap = tmp_path / "heatmap.png"

    result = workflows.compare_vectors([a, b], heatmap=heatmap)

    assert isinstance(result, Similarity)
    assert result.frame.loc["a", "b"] == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    assert result.frame.loc["a", "a"] == pytest.approx(1.0, abs=1e-12)
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.lines() == [f"heatmap: {heatmap}"]
    assert "0.7071" in result.render("csv")
    assert similarity_of([a, b]).lines() == []


def test_similarity_checks_the_heatmap_path_before_reading_anything(tmp_path):
    (tmp_path / "taken.png").write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        similarity_of([tmp_path / "missing-1.safetensors", tmp_path / "missing-2.safetensors"], heatmap=tmp_path / "taken.png")
    with pytest.raises(ParameterError) as raised:
        similarity_of([tmp_path / "one.safetensors"])
    assert raised.value.param == "refs"


# -- lineage, verify, approve -------------------------------------------------------------


def test_show_lineage_renders_the_tree_or_writes_it(registry, tmp_path):
    from mlflow_taskvec.mlflow.lineage import lineage, render_dot, render_text

    ref = f"models:/{COMPOSITE_NAME}/1"

    shown = workflows.show_lineage(ref)
    assert shown.text == render_text(lineage(ref)) and shown.lines() == []
    assert vector_name("rotate") in shown.text and vector_name("flip") in shown.text

    written = workflows.show_lineage(ref, "dot", tmp_path / "lineage.dot")
    assert written.text is None and written.lines() == []
    assert (tmp_path / "lineage.dot").read_text("utf-8") == render_dot(lineage(ref)) + "\n"

    picture = workflows.show_lineage(ref, "png", tmp_path / "lineage.png")
    height, width = matplotlib.image.imread(tmp_path / "lineage.png").shape[:2]
    assert picture.picture_size == (width, height)
    assert picture.lines() == [f"lineage picture: {tmp_path / 'lineage.png'} ({width}x{height} pixels)"]


def test_show_lineage_checks_its_output_before_fetching(tmp_path):
    (tmp_path / "taken.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        workflows.show_lineage("models:/no-such-model/1", "text", tmp_path / "taken.txt")
    with pytest.raises(ParameterError) as raised:
        workflows.show_lineage("models:/no-such-model/1", "png")
    assert raised.value.param == "output"


def test_a_verified_version_prints_its_checks_unless_quiet():
    v = Verified("models:/m/3", "composite", "ab" * 32, ["base fingerprint", "recomposed fingerprint"])

    assert v.lines() == ["verified: models:/m/3 (composite, fingerprint abababababababab)", "  ok  base fingerprint", "  ok  recomposed fingerprint"]
    assert v.lines(checks=False) == v.lines()[:1]


def test_an_approval_prints_one_line_with_its_note():
    a = Approval("m", "3", "approved", "ana", "2026-12-07T00:00:00Z", note="eval passed")

    assert a.lines() == ["approved: models:/m/3 as 'approved' by ana at 2026-12-07T00:00:00Z (eval passed)"]
    assert Approval("m", "3", "approved", "ana", "t").lines() == ["approved: models:/m/3 as 'approved' by ana at t"]
