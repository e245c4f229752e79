"""mlflow-taskvec: editing models with task arithmetic, as an MLflow workflow."""

__version__ = "0.1.0"

from mlflow_taskvec.engine import TaskVector, merge, merge_to, open_checkpoint  # noqa: E402
from mlflow_taskvec.errors import TaskVecError  # noqa: E402

__all__ = ["TaskVecError", "TaskVector", "merge", "merge_to", "open_checkpoint", "__version__"]
