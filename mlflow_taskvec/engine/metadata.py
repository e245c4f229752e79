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
LAYOUT = "taskvec.layout"  # low_rank for a task vector stored as factors (dense when absent)
LOW_RANK = "taskvec.low_rank"  # JSON {name: {shape, rank, scaling}} of a low-rank task vector
ADAPTER = "taskvec.adapter"  # peft_lora on a task vector read from a PEFT adapter

TASK_VECTOR = "task_vector"
COMPOSITE = "composite"
LOW_RANK_LAYOUT = "low_rank"
PEFT_LORA = "peft_lora"
