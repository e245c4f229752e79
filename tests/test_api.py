"""The Python API: the names ``mlflow_taskvec`` exports, loaded on first use."""

from __future__ import annotations

import subprocess
import sys

import mlflow_taskvec

API = ["MergeResult", "TaskVecError", "TaskVecWarning", "TaskVector", "compose_to", "compress", "export_lora",
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
