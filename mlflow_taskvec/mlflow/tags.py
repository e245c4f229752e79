"""Every ``taskvec.*`` tag the MLflow layer writes on registered versions, logged models and runs.

A version's tags are its lineage: written in the same call that creates it, read by
lineage, verify, report and the download cache's integrity check.
"""

from mlflow_taskvec.engine.metadata import (
    BASE_FINGERPRINT,
    COMPOSITE,
    KIND,
    LAYOUT,
    LAYOUT_PARAMS,
    METHOD,
    RECIPE_SHA256,
    SOURCE_FINGERPRINT,
    TASK,
    TASK_VECTOR,
)

__all__ = [
    "BASE_FINGERPRINT", "COMPOSITE", "KIND", "LAYOUT", "LAYOUT_PARAMS", "METHOD", "RECIPE_SHA256", "SOURCE_FINGERPRINT", "TASK", "TASK_VECTOR",
]

# what the version is made of
BASE_URI = "taskvec.base_uri"
FINETUNED_URI = "taskvec.finetuned_uri"
FINGERPRINT = "taskvec.fingerprint"  # of the version's own weights: downloads are checked against it
NUM_PARAMETERS = "taskvec.num_parameters"
L2_NORM = "taskvec.l2_norm"
SCALE = "taskvec.scale"
PARAMS = "taskvec.params"  # JSON object of the method's parameters
INPUTS = "taskvec.inputs"  # JSON list of {uri, weight, fingerprint}
FINE_TUNING = "taskvec.fine_tuning"  # on task vectors (and composites of them): "linear" for linearized fine-tunes
OUTPUT_FORMAT = "taskvec.output_format"  # "peft" on a composite logged as a PEFT LoRA adapter (mlflow.transformers)
ADAPTER_RANK = "taskvec.adapter_rank"  # a PEFT composite's r (the most common module rank)
RELATIVE_ERROR = "taskvec.relative_error"  # a PEFT composite's largest per-module relative Frobenius error
REPRODUCIBLE = "taskvec.reproducible"  # "false" when the version names local paths (verify elsewhere cannot fetch them)

# compressed task vectors (also LAYOUT, LAYOUT_PARAMS and SOURCE_FINGERPRINT, as in the weights' header)
COMPRESSED_FROM = "taskvec.compressed_from"  # the version (or reference) the vector was compressed from
STORED_BYTES = "taskvec.stored_bytes"  # tensor bytes as stored
DENSE_BYTES = "taskvec.dense_bytes"  # tensor bytes of the dense vector it stands for

# search
SEARCH = "taskvec.search"  # JSON summary of the search that picked a winner's coefficients
SEARCH_ROLE = "taskvec.search.role"  # on runs: search | candidate | winner
SEARCH_FEASIBLE = "taskvec.search.feasible"
SEARCH_BEST_RUN_ID = "taskvec.search.best_run_id"
LEADERBOARD = "taskvec.leaderboard"  # JSON: the method a version won for, and the leaderboard's run

# runs
RUN_PROCESS = "taskvec.process"  # on runs a command started or resumed: host:pid:start of that process
RUN_STATUS_BEFORE = "taskvec.status_before"  # on a resumed run while it is resumed: its status before

# approval
APPROVAL_PREFIX = "taskvec.approval."  # taskvec.approval.<alias>.by / .at / .note
APPROVED_BY = "taskvec.approved_by"
APPROVED_AT = "taskvec.approved_at"

COMPOSITE_TAGS = (KIND, METHOD, SCALE, PARAMS, INPUTS, BASE_URI, BASE_FINGERPRINT, RECIPE_SHA256, FINGERPRINT)
TASK_VECTOR_TAGS = (KIND, TASK, BASE_URI, BASE_FINGERPRINT, FINETUNED_URI, FINGERPRINT, NUM_PARAMETERS, L2_NORM)


def approval(alias: str, part: str) -> str:
    """``taskvec.approval.<alias>.<part>`` (part: by, at, note)."""
    return f"{APPROVAL_PREFIX}{alias}.{part}"
