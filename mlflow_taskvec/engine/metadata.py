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
LOW_RANK = "taskvec.low_rank"  # legacy (read only): JSON {name: {shape, rank, scaling}} of the lora layout
ADAPTER = "taskvec.adapter"  # peft_lora on a task vector read from a PEFT adapter
# "true" on a task vector of a GPT-2-style base (Conv1D weights stored (in, out), lora.stores_conv1d),
# absent on any other: what export-lora without --base writes fan_in_fan_out by
BASE_CONV1D = "taskvec.base_conv1d"

TASK_VECTOR = "task_vector"
COMPOSITE = "composite"
PEFT_LORA = "peft_lora"

# Stored layouts (engine/layouts.py): how the tensors are encoded and what they stand for.
LAYOUT = "taskvec.layout"  # lowrank | sparse | bitdelta (lora: legacy, read only); absent: dense tensors
LOWRANK_LAYOUT = "lowrank"  # the one low-rank layout: adapters' factors and compressed vectors (engine/lowrank.py)
LORA_LAYOUT = "lora"  # legacy (read only): LoRA factors as format 1 of this package saved them
LAYOUT_FORMAT = "taskvec.layout_format"  # the stored layout's format version ("2"; absent: format 1)
LAYOUT_PARAMS = "taskvec.layout_params"  # JSON: the layout's setting, e.g. {"density": 0.1}
LAYOUT_TENSORS = "taskvec.layout_tensors"  # JSON: each dense tensor's dtype, shape and encoding
SOURCE_FINGERPRINT = "taskvec.source_fingerprint"  # the vector it was compressed from
