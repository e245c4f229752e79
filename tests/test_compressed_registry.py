"""Compressed task vectors in the registry: ``compress --register`` with lineage, and
composing from a registered compressed version, on a real sqlite store."""

from __future__ import annotations

import json

import blake3
import torch
import yaml
from click.testing import CliRunner
from mlflow_helpers import BASE_NAME, vector_name

from mlflow_taskvec import TaskVector, open_checkpoint
from mlflow_taskvec.cli import main as cli
from mlflow_taskvec.compose import compose_to
from mlflow_taskvec.engine.compressed import compress
from mlflow_taskvec.mlflow.downloads import resolve
from mlflow_taskvec.recipe import parse_recipe


def _fingerprint_by_the_spec(ckpt) -> str:
    """docs/specifications.md's fingerprint, written out: BLAKE3 over sorted records
    ``name NUL dtype NUL shape NUL hex(blake3(bytes)) LF`` of the dense tensors."""
    codes = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16"}
    records = []
    for name in sorted(ckpt.keys()):
        t = ckpt.get_tensor(name).contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        records.append(f"{name}\0{codes[t.dtype]}\0{','.join(map(str, t.shape))}\0{blake3.blake3(data).hexdigest()}\n")
    return blake3.blake3("".join(records).encode("utf-8")).hexdigest()


def _invoke(registry, *args):
    return CliRunner().invoke(cli, [str(a) for a in args], env={"MLFLOW_TRACKING_URI": registry.store.tracking_uri})


def test_compress_register_records_the_source_version_the_layout_and_both_sizes(registry, client, tmp_path):
    source_uri = f"models:/{vector_name('rotate')}/1"

    result = _invoke(registry, "compress", source_uri, "--format", "lowrank", "--rank", "2", "--register", "rotate-lowrank", "--alias", "current")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].startswith("registered: models:/rotate-lowrank/1  (model models:/m-")
    version = client.get_model_version("rotate-lowrank", "1")
    source = client.get_model_version(vector_name("rotate"), "1")
    # what it should hold, from the source's weights and the layout's definition, not from compress()
    vector = TaskVector.load(resolve(source_uri).path)
    stored = open_checkpoint(resolve("models:/rotate-lowrank/1").path)
    expected_stored = expected_dense = 0
    for name in vector.names:
        spec = vector.spec(name)
        t = vector.get_tensor(name, torch.float64)
        expected_dense += spec.nbytes
        if not bool(t.any()):
            continue  # an all-zero tensor stores nothing
        if len(spec.shape) == 2 and 2 * sum(spec.shape) < spec.numel:
            u, sv, vh = torch.linalg.svd(t, full_matrices=False)
            torch.testing.assert_close(stored.get_tensor(name).double(), (u[:, :2] * sv[:2]) @ vh[:2], rtol=0, atol=1e-5)
            expected_stored += 2 * sum(spec.shape) * spec.dtype.itemsize
        else:
            assert torch.equal(stored.get_tensor(name).double(), t), name  # stored dense
            expected_stored += spec.nbytes
    tags = version.tags
    assert tags["taskvec.compressed_from"] == source_uri
    assert tags["taskvec.kind"] == "task_vector"
    assert tags["taskvec.layout"] == "lowrank" and json.loads(tags["taskvec.layout_params"]) == {"rank": 2}
    assert (int(tags["taskvec.stored_bytes"]), int(tags["taskvec.dense_bytes"])) == (expected_stored, expected_dense)
    assert expected_stored < expected_dense
    fingerprint = _fingerprint_by_the_spec(stored)
    assert tags["taskvec.fingerprint"] == fingerprint != source.tags["taskvec.fingerprint"]
    for key in ("taskvec.task", "taskvec.base_uri", "taskvec.base_fingerprint", "taskvec.finetuned_uri", "taskvec.num_parameters"):
        assert tags[key] == source.tags[key], key
    assert version.run_id == source.run_id  # logged beside the vector it was made from
    assert str(client.get_model_version_by_alias("rotate-lowrank", "current").version) == "1"
    assert f"`{source_uri}`" in version.description
    assert tags["taskvec.source_fingerprint"] == source.tags["taskvec.fingerprint"]

    tree = _invoke(registry, "lineage", "models:/rotate-lowrank/1")
    assert tree.exit_code == 0, tree.output
    lines = tree.stdout.splitlines()
    assert lines[0].startswith(f"models:/rotate-lowrank/1  [task_vector]  task rotate  fp {fingerprint[:16]}")
    assert lines[1].startswith(f"└── compressed from: {source_uri}  [task_vector]  task rotate  fp {source.tags['taskvec.fingerprint'][:16]}")
    assert "fingerprint differs" not in tree.stdout
    assert any(f"base: models:/{BASE_NAME}/1" in line for line in lines[2:])  # the source's own lineage below it


def test_a_registered_compressed_vector_downloads_checked_and_composes_like_its_local_copy(registry, client, tmp_path):
    source_uri = f"models:/{vector_name('flip')}/1"
    assert _invoke(registry, "compress", source_uri, "--format", "sparse", "--density", "0.3", "--register", "flip-sparse").exit_code == 0

    fetched = resolve("models:/flip-sparse/1")
    assert open_checkpoint(fetched.path).metadata()["taskvec.layout"] == "sparse"  # stored compressed, not densified
    assert fetched.fingerprint == client.get_model_version("flip-sparse", "1").tags["taskvec.fingerprint"]
    local = compress(TaskVector.load(resolve(source_uri).path), tmp_path / "flip-sparse.safetensors", "sparse", density=0.3)
    recipe = {"base": f"models:/{BASE_NAME}/1", "scale": 0.5, "vectors": [{"vector": "models:/flip-sparse/1", "weight": -1.0}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    registered = _invoke(registry, "compose", tmp_path / "recipe.yaml", "--register", "flip-sparse-negation")

    assert registered.exit_code == 0, registered.output
    here = parse_recipe({**recipe, "base": str(resolve(recipe["base"]).path), "vectors": [{"vector": str(local.output), "weight": -1.0}]}, "local")
    expected = compose_to(here, output=tmp_path / "expected.safetensors").fingerprint
    tags = client.get_model_version("flip-sparse-negation", "1").tags
    assert tags["taskvec.fingerprint"] == expected
    assert json.loads(tags["taskvec.inputs"])[0]["fingerprint"] == local.fingerprint


def test_compress_register_refuses_a_setting_of_another_format_before_anything_is_registered(registry, client):
    result = _invoke(registry, "compress", f"models:/{vector_name('flip')}/1", "--format", "sparse", "--rank", "3", "--register", "never-made")

    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["Error: --rank: the sparse format takes density"]
    assert not client.search_registered_models(filter_string="name='never-made'")


def test_verify_checks_a_compressed_version_against_its_source_and_compresses_it_again(registry, client):
    assert _invoke(registry, "compress", f"models:/{vector_name('rotate')}/1", "--format", "bitdelta", "--register", "rotate-bitdelta").exit_code == 0

    result = _invoke(registry, "verify", "models:/rotate-bitdelta/1")

    assert result.exit_code == 0, result.output
    fingerprint = client.get_model_version("rotate-bitdelta", "1").tags["taskvec.fingerprint"]
    source_fp = client.get_model_version(vector_name("rotate"), "1").tags["taskvec.fingerprint"]
    assert result.stdout.splitlines() == [
        f"verified: models:/rotate-bitdelta/1 (task_vector, fingerprint {fingerprint[:16]})",
        f"  ok  stored weights: fingerprint {fingerprint[:16]} as recorded",
        f"  ok  source models:/{vector_name('rotate')}/1: fingerprint {source_fp[:16]} as recorded",
        f"  ok  compressed again from the source (bitdelta): fingerprint {fingerprint[:16]} as recorded",
    ]


def test_verify_refuses_a_compressed_version_whose_layout_tag_was_edited(registry, client):
    assert _invoke(registry, "compress", f"models:/{vector_name('flip')}/1", "--format", "lowrank", "--rank", "2", "--register", "flip-lowrank").exit_code == 0
    client.set_model_version_tag("flip-lowrank", "1", "taskvec.layout_params", '{"rank": 1}')

    result = _invoke(registry, "verify", "models:/flip-lowrank/1")

    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error: the recompressed task vector has fingerprint ")
    assert "the source and the layout do not reproduce it" in result.output
