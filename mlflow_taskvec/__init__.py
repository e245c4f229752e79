"""mlflow-taskvec: editing models with task arithmetic, as an MLflow workflow."""

__version__ = "0.1.0"

from mlflow_taskvec.errors import TaskVecError  # noqa: E402

__all__ = ["TaskVecError", "TaskVector", "linearize", "merge", "merge_to", "open_checkpoint", "__version__"]

# The engine (and torch with it) is imported on first use, so that commands which
# need neither (``mlflow-taskvec --version``, ``--help``) start in a fraction of the time.
_ENGINE_NAMES = {"TaskVector", "merge", "merge_to", "open_checkpoint"}


def __getattr__(name: str):
    if name in _ENGINE_NAMES:
        from mlflow_taskvec import engine

        return getattr(engine, name)
    if name == "linearize":
        from mlflow_taskvec.engine.linearize import linearize

        return linearize
    raise AttributeError(f"module 'mlflow_taskvec' has no attribute {name!r}")
