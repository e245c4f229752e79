"""The tensor engine: checkpoints, task vectors, merge methods, streaming.

This package imports torch, safetensors and blake3 only, never MLflow; the
layers above build on it.
"""

from mlflow_taskvec.engine.checkpoint import Checkpoint, open_checkpoint

# the stored layouts register their readers with the checkpoint module when imported
from mlflow_taskvec.engine import compressed, lowrank  # noqa: F401
from mlflow_taskvec.engine.io import TensorSpec
from mlflow_taskvec.engine.merging import MergeResult, merge, merge_to
from mlflow_taskvec.engine.methods import METHODS, MergeMethod, ParamSpec, get_method, merge_method
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.engine.writer import CheckpointWriter, MemorySink

__all__ = [
    "Checkpoint",
    "CheckpointWriter",
    "METHODS",
    "MemorySink",
    "MergeMethod",
    "MergeResult",
    "ParamSpec",
    "TaskVector",
    "TensorSpec",
    "get_method",
    "merge",
    "merge_method",
    "merge_to",
    "open_checkpoint",
]
