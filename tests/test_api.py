"""The Python API: the names ``mlflow_taskvec`` exports, loaded on first use."""

from __future__ import annotations

import subprocess
import sys

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import mlflow_taskvec
from mlflow_taskvec.cli import main
from mlflow_taskvec.compose import extract

API = ["MergeResult", "TaskVecError", "TaskVecWarning", "TaskVector", "compose_to", "compress", "export_lora", "linearize",
       "load_recipe", "merge", "merge_to", "open_adapter", "open_checkpoint", "parse_recipe"]


def test_every_api_name_is_exported_listed_and_the_object_of_its_module():
    assert sorted(n for n in mlflow_taskvec.__all__ if n != "__version__") == API
    assert set(API) <= set(dir(mlflow_taskvec))
    for name in API:
        value = getattr(mlflow_taskvec, name)
        assert getattr(sys.modules[value.__module__], name) is value, name
    assert mlflow_taskvec.compress.__module__ == "mlflow_taskvec.engine.compressed"
    assert issubclass(mlflow_taskvec.TaskVecWarning, UserWarning)


def test_an_unknown_name_is_an_attribute_error():
    try:
        mlflow_taskvec.no_such_name
    except AttributeError as exc:
        assert str(exc) == "module 'mlflow_taskvec' has no attribute 'no_such_name'"
    else:
        raise AssertionError("no AttributeError")


def test_importing_the_package_imports_neither_torch_nor_mlflow_until_a_name_is_used():
    code = (
        "import sys, mlflow_taskvec; dir(mlflow_taskvec); print('torch' in sys.modules, 'mlflow' in sys.modules);"
        "mlflow_taskvec.TaskVector; print('torch' in sys.modules, 'mlflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True", "False"]


def test_extract_reports_the_buffers_only_one_side_has(tmp_path):
    base = {"w": torch.ones(3, 2), "steps": torch.tensor([4])}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({"w": torch.full((3, 2), 1.5), "mask": torch.tensor([True, False])}, str(tmp_path / "ft.safetensors"))

    extracted = extract(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", task="t")
    assert extracted.one_sided == ["mask", "steps"] and extracted.low_rank_sizes is None
    assert torch.equal(extracted.vector.get_tensor("w"), torch.full((3, 2), 0.5))
    out = CliRunner().invoke(main, ["extract", "--base", str(tmp_path / "base.safetensors"), "--finetuned", str(tmp_path / "ft.safetensors"), "-o", str(tmp_path / "tv.safetensors")])
    assert out.exit_code == 0, out.output
    assert "skipped, in one of the two only (integer or bool buffers): mask, steps" in out.output.splitlines()


def test_an_existing_output_is_refused_in_the_words_of_each_front_end(tmp_path):
    """The engine's error names the parameter: ``overwrite=True`` in Python, the option on the command line."""
    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "base.safetensors"))
    save_file({"w": torch.full((2, 2), 3.0)}, str(tmp_path / "ft.safetensors"))
    out = tmp_path / "tv.safetensors"
    out.write_bytes(b"precious")
    vector = extract(tmp_path / "base.safetensors", tmp_path / "ft.safetensors").vector

    try:
        vector.save(out)
    except mlflow_taskvec.TaskVecError as exc:
        assert str(exc) == f"{out}: output already exists (pass overwrite=True to replace it)"
    else:
        raise AssertionError("no TaskVecError")
    cli = CliRunner().invoke(main, ["extract", "--base", str(tmp_path / "base.safetensors"), "--finetuned", str(tmp_path / "ft.safetensors"), "-o", str(out)])
    assert cli.exit_code == 1
    assert cli.output.strip().splitlines()[-1] == f"Error: {out}: output already exists (pass --overwrite to replace it)"
    assert out.read_bytes() == b"precious"
