"""Tables of registered composites, for people and for scripts."""

from __future__ import annotations

import json

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_taskvec.errors import TaskVecError


def composites_frame(name: str) -> pd.DataFrame:
    """One row per composite version of registered model ``name``: method, scale,
    params, inputs with weights, and the metrics of the run that composed it."""
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as exc:
        raise TaskVecError(f"{name}: {str(exc).splitlines()[0]}") from None
    rows = []
    for mv in sorted(versions, key=lambda v: int(v.version)):
        tags = mv.tags or {}
        if tags.get("taskvec.kind") != "composite":
            continue
        inputs = json.loads(tags.get("taskvec.inputs", "[]"))
        row = {
            "version": int(mv.version),
            "method": tags.get("taskvec.method", ""),
            "scale": float(tags.get("taskvec.scale", "nan")),
            "params": tags.get("taskvec.params", "{}"),
            "weights": ", ".join(f"{i['uri']}:{i['weight']:g}" for i in inputs),
        }
        if mv.run_id:
            row.update(sorted(client.get_run(mv.run_id).data.metrics.items()))
        rows.append(row)
    if not rows:
        raise TaskVecError(f"{name}: no composite versions registered under this name")
    return pd.DataFrame(rows).set_index("version")
