"""The tensor engine: checkpoints, task vectors, merge methods, streaming.

This package never imports MLflow; the MLflow layer builds on it.
"""

from mlflow_taskvec.engine.checkpoint import Checkpoint, open_checkpoint
from mlflow_taskvec.engine.merge import MergeResult, merge
from mlflow_taskvec.engine.methods import METHODS, MergeMethod, get_method, register
from mlflow_taskvec.engine.safetensors_io import TensorSpec
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.engine.writer import CheckpointWriter

__all__ = [
    "Checkpoint",
    "CheckpointWriter",
    "METHODS",
    "MergeMethod",
    "MergeResult",
    "TaskVector",
    "TensorSpec",
    "get_method",
    "merge",
    "open_checkpoint",
    "register",
]
