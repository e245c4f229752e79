"""The ``taskvec.*`` keys the engine writes into a safetensors file's ``__metadata__``.

The MLflow layer's registry tags (``mlflow_taskvec.mlflow.tags``) reuse several of
these names for the same facts, so a version's tags and its weights' header agree.
"""

FORMAT_VERSION = "taskvec.format_version"
KIND = "taskvec.kind"  # task_vector | composite
BASE_FINGERPRINT = "taskvec.base_fingerprint"
TASK = "taskvec.task"
SKIPPED = "taskvec.skipped"  # JSON list of the tensor names a task vector leaves out
METHOD = "taskvec.method"
RECIPE = "taskvec.recipe"  # the recipe's canonical JSON
RECIPE_SHA256 = "taskvec.recipe_sha256"

TASK_VECTOR = "task_vector"
COMPOSITE = "composite"

# Compressed task vectors (engine/compressed.py): the stored layout and what it stands for.
LAYOUT = "taskvec.layout"  # sparse | bitdelta | lowrank; absent: dense tensors
LAYOUT_PARAMS = "taskvec.layout_params"  # JSON: the layout's setting, e.g. {"density": 0.1}
LAYOUT_TENSORS = "taskvec.layout_tensors"  # JSON: each dense tensor's dtype, shape and encoding
SOURCE_FINGERPRINT = "taskvec.source_fingerprint"  # the vector it was compressed from
