"""mlflow-taskvec: editing models with task arithmetic, as an MLflow workflow."""

__version__ = "0.1.0"

from mlflow_taskvec.errors import TaskVecError, TaskVecWarning  # noqa: E402

# The Python API. Each name is imported from its module on first use, so that commands
# which need neither torch nor MLflow (``mlflow-taskvec --version``, ``--help``) start in a
# fraction of the time.
_LAZY = {
    "TaskVector": "mlflow_taskvec.engine.taskvector",
    "open_checkpoint": "mlflow_taskvec.engine.checkpoint",
    "merge": "mlflow_taskvec.engine.merging",
    "merge_to": "mlflow_taskvec.engine.merging",
    "MergeResult": "mlflow_taskvec.engine.merging",
    "compress": "mlflow_taskvec.engine.compressed",
    "export_lora": "mlflow_taskvec.engine.lora",
    "open_adapter": "mlflow_taskvec.engine.lora",
    "load_recipe": "mlflow_taskvec.recipe",
    "parse_recipe": "mlflow_taskvec.recipe",
    "compose_to": "mlflow_taskvec.compose",
}

__all__ = ["TaskVecError", "TaskVecWarning", *sorted(_LAZY), "__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mlflow_taskvec' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
