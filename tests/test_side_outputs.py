"""What users name stays text in the Markdown the registry UI and the Hub render, and a
registered composite records references, never the download cache's paths (issue 24).

Real sqlite MLflow store (conftest's ``registry``), real safetensors files, the real CLI.
"""

from __future__ import annotations

import json
import os
import re

import yaml
from click.testing import CliRunner
from mlflow_helpers import composite_recipe
from safetensors.torch import save_file
from small_models import base_state, finetune_state

from mlflow_taskvec.cli import main as cli
from mlflow_taskvec.compose import compose_to
from mlflow_taskvec.engine import metadata as meta_keys
from mlflow_taskvec.engine.checkpoint import open_checkpoint
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.mlflow.downloads import resolve
from mlflow_taskvec.modelcard import md_code, md_text
from mlflow_taskvec.recipe import parse_recipe
from mlflow_taskvec.references import open_reference


def _cells(row: str) -> list[str]:
    """A Markdown table row's cells, split as GFM splits them (on unescaped pipes)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def test_names_with_markup_stay_text_and_plain_names_are_shown_as_before():
    assert md_code("models:/digits-base/1") == "`models:/digits-base/1`"
    assert md_text("rotate_v2") == "rotate_v2"
    hostile = "x`<img src=x onerror=alert(1)>`|[a](javascript:b)\nnext"
    for shown in (md_code(hostile), md_text(hostile)):
        assert not set(shown) & set("`<>|[]\n"), shown
        assert "&lt;img src=x onerror=alert(1)&gt;" in shown


def test_a_composite_card_escapes_task_names_and_base_folder_names(tmp_path):
    folder = tmp_path / "base | <b>\nnew line"
    folder.mkdir()
    base = base_state(0)
    save_file(base, str(folder / "model.safetensors"))
    save_file(finetune_state(base, 1), str(tmp_path / "ft.safetensors"))
    recipe = parse_recipe({"base": str(folder), "vectors": [{"finetuned": str(tmp_path / "ft.safetensors"), "task": "a|b <i>x</i>\n# heading"}]})

    compose_to(recipe, output=tmp_path / "composite")

    card = (tmp_path / "composite" / "README.md").read_text("utf-8")
    body = card.split("---", 2)[2].split("## Recipe")[0]  # the recipe itself is in a fenced block: text there
    assert yaml.safe_load(card.split("---")[1])["base_model"] == str(folder)  # the front matter is YAML: quoted, exact
    assert "<b>" not in body and "<i>" not in body
    heading = [line for line in body.splitlines() if line.startswith("# ")]
    assert heading == ["# Composite of " + md_text(str(folder))]
    rows = body.split("## Inputs")[1].split("##")[0].strip().splitlines()
    assert [len(_cells(r)) for r in rows] == [4, 4, 4]
    assert _cells(rows[2])[1] == "a&#124;b &lt;i&gt;x&lt;/i&gt; # heading"
    base_row = next(r for r in body.splitlines() if r.startswith("| base |"))
    assert len(_cells(base_row)) == 2


def test_a_registered_composite_records_references_in_its_weights_and_card_and_one_recipe_digest(registry, client, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(composite_recipe(), sort_keys=False), "utf-8")
    output = tmp_path / "composite"

    result = CliRunner().invoke(cli, ["compose", str(recipe), "--register", "refs-composite", "-o", str(output)])

    assert result.exit_code == 0, result.output
    tags = client.get_model_version("refs-composite", "1").tags
    cache = os.environ["MLFLOW_TASKVEC_CACHE"]
    for weights in (output, resolve("models:/refs-composite/1").path):
        meta = open_checkpoint(weights).metadata()
        assert meta[meta_keys.RECIPE_SHA256] == tags["taskvec.recipe_sha256"]
        recorded = json.loads(meta[meta_keys.RECIPE])
        assert recorded["base"] == tags["taskvec.base_uri"]
        assert [v["vector"] for v in recorded["vectors"]] == [row["uri"] for row in json.loads(tags["taskvec.inputs"])]
        card = (weights / "README.md").read_text("utf-8")
        assert cache not in card and cache not in meta[meta_keys.RECIPE]
        assert yaml.safe_load(card.split("---")[1])["base_model"] == tags["taskvec.base_uri"]
        assert f"| recipe sha256 | `{tags['taskvec.recipe_sha256']}` |" in card


def test_a_model_name_with_a_backtick_cannot_inject_markup_into_a_description(registry, client, tmp_path):
    name = "evil`<img src=x onerror=alert(1)>`"
    finetune = f"models:/{registry.finetunes['rotate'].model_id}"
    extract = ["extract", "--base", "models:/digits-base/1", "--finetuned", finetune, "--register", name]
    assert CliRunner().invoke(cli, extract).exit_code == 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base": "models:/digits-base/1", "vectors": [{"vector": f"models:/{name}/1"}]}), "utf-8")

    result = CliRunner().invoke(cli, ["compose", str(recipe), "--register", "uses-evil"])

    assert result.exit_code == 0, result.output
    described = client.get_model_version("uses-evil", "1").description
    assert "<img" not in described and "&lt;img src=x onerror=alert(1)&gt;" in described
    row = next(line for line in described.splitlines() if line.startswith("| task vector |"))
    assert len(_cells(row)) == 5


def test_compress_takes_the_base_of_a_lora_adapter(tmp_path):
    import torch

    base = base_state(0)
    save_file(base, str(tmp_path / "base.safetensors"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    g = torch.Generator().manual_seed(5)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["attn"]}), "utf-8")
    save_file({"base_model.model.model.layers.0.attn.lora_A.weight": torch.randn(2, 4, generator=g),
               "base_model.model.model.layers.0.attn.lora_B.weight": torch.randn(4, 2, generator=g)}, str(adapter / "adapter_model.safetensors"))
    out = tmp_path / "c.safetensors"

    result = CliRunner().invoke(cli, ["compress", str(adapter), "--base", str(tmp_path / "base.safetensors"), "--format", "lowrank", "--rank", "2", "-o", str(out)])

    assert result.exit_code == 0, result.output
    dense = TaskVector.load(open_reference(str(adapter), base=open_reference(str(tmp_path / "base.safetensors"))))
    stored = TaskVector.load(out)
    name = "model.layers.0.attn.weight"
    assert torch.allclose(stored.get_tensor(name), dense.get_tensor(name), atol=1e-5)
