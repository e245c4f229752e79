"""Every key of the ``taskvec`` flavor's configuration: the ``flavors: taskvec:`` block of a
model's MLmodel file (also written beside the weights as ``taskvec.json``).

Written by ``flavor.save_model``; read by registration, downloads (the fingerprint the
weights are checked against), input resolution, evaluation and module rebuilding.
"""

from mlflow_taskvec.engine.metadata import TASK_VECTOR

__all__ = ["TASK_VECTOR"]

# what the weights are
KIND = "kind"  # TASK_VECTOR or CHECKPOINT
CHECKPOINT = "checkpoint"
DATA = "data"  # the weights' folder inside the model directory
FORMAT_VERSION = "format_version"
FINGERPRINT = "fingerprint"
NUM_TENSORS = "num_tensors"
NUM_PARAMETERS = "num_parameters"
DTYPE = "dtype"
CODE = "code"  # the copied code paths' folder (a factory's module), or None

# a stored layout (compressed, low-rank)
LAYOUT = "layout"
STORED_BYTES = "stored_bytes"
DENSE_BYTES = "dense_bytes"
RANKS = "ranks"  # each factored tensor's rank

# a task vector
TASK = "task"
BASE_FINGERPRINT = "base_fingerprint"  # also on a checkpoint whose weights record it
L2_NORM = "l2_norm"

# a checkpoint: how its module is rebuilt
ARCHITECTURE = "architecture"  # {FACTORY, FACTORY_KWARGS} or {HF_CONFIG}
FACTORY = "factory"
FACTORY_KWARGS = "factory_kwargs"
HF_CONFIG = "hf_config"

# lineage, given by the registration that logs the model
BASE_URI = "base_uri"
FINETUNED_URI = "finetuned_uri"
FINETUNED_FINGERPRINT = "finetuned_fingerprint"
COMPRESSED_FROM = "compressed_from"
METHOD = "method"
SCALE = "scale"
PARAMS = "params"
INPUTS = "inputs"
RECIPE_SHA256 = "recipe_sha256"
