"""`make demo`: the whole digits pipeline through `mlflow run`, on a local sqlite store.

Creates ``demo/`` (an sqlite tracking store and an artifact folder), runs the
MLproject's ``main`` entry point (each step a child run: pre-training, eight
fine-tunes, a coefficient search per composite of the paper's results, and the
method leaderboard on all eight task vectors), then prints the registered
versions with their lineage and metrics, the leaderboard's table (as logged to
its run), the paper's three results read back from the registry
(``paper_results.py``), and the command that opens the MLflow UI on that store.
Exits non-zero when a result misses its target.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
EXPERIMENT = "taskvec-digits"


def registry_table(client) -> pd.DataFrame:
    from paper_results import short_name

    rows = []
    for rm in client.search_registered_models(order_by=["name"]):
        for mv in sorted(client.search_model_versions(f"name='{rm.name}'"), key=lambda v: int(v.version)):
            tags = mv.tags or {}
            kind = tags.get("taskvec.kind", "checkpoint")
            weights = ""
            if kind == "composite":
                inputs = json.loads(tags["taskvec.inputs"])
                weights = ", ".join(f"{short_name(i['uri'])}:{i['weight']:g}" for i in inputs)
            metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
            key = {k: v for k, v in metrics.items() if k.endswith(".accuracy") and not k.startswith("mean.")}
            rows.append(
                {
                    "name": mv.name,
                    "version": int(mv.version),
                    "kind": kind,
                    "method": tags.get("taskvec.method", tags.get("taskvec.task", "")),
                    "scale": f"{float(tags['taskvec.scale']):.3g}" if "taskvec.scale" in tags else "",
                    "weights": weights,
                    "metrics": ", ".join(f"{k.removesuffix('.accuracy')}={v:.3f}" for k, v in sorted(key.items())),
                }
            )
    return pd.DataFrame(rows)


def leaderboard_table(client, experiment_id: str) -> str:
    """The markdown table the newest leaderboard run logged (``leaderboard/leaderboard.md``)."""
    import mlflow

    runs = client.search_runs([experiment_id], "tags.`taskvec.leaderboard.role` = 'leaderboard'", order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise LookupError("no leaderboard run in the experiment: run the digits pipeline (make demo) first")
    return Path(mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id, artifact_path="leaderboard/leaderboard.md")).read_text("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=ROOT / "demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    demo = args.dir.resolve()
    if demo.exists():
        shutil.rmtree(demo)
    (demo / "artifacts").mkdir(parents=True)
    tracking_uri = f"sqlite:///{demo / 'mlflow.db'}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_TASKVEC_CACHE": str(demo / "cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONWARNINGS": "ignore",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TASKVEC_CACHE", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")})

    import mlflow
    import paper_results
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(demo / "artifacts").as_uri())
    started = time.perf_counter()
    cmd = ["mlflow", "run", str(ROOT), "-e", "main", "--env-manager", "local", "--experiment-name", EXPERIMENT, "-P", f"steps={args.steps}", "-P", f"seed={args.seed}"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    elapsed = time.perf_counter() - started

    table = registry_table(client)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", 90)
    print(f"\nregistered model versions ({elapsed:.0f} s):")
    print(table.to_string(index=False))
    print(f"\nthe method leaderboard (seed {args.seed}, 8 tasks, test split, coefficients searched on the validation split):")
    print(leaderboard_table(client, experiment_id))
    results = paper_results.results_table(client)
    print(f"\nthe paper's three results (seed {args.seed}, test split, coefficients searched on the validation split):")
    print(results.to_string(index=False))
    print("\nopen the MLflow UI on this store with:")
    print(f"  mlflow ui --backend-store-uri {tracking_uri} --port 5000")
    del mlflow
    missed = results[results["met"] != "yes"]
    if len(missed):
        sys.exit(f"run_demo: {len(missed)} of {len(results)} targets missed: {', '.join(missed['figure'])}")


if __name__ == "__main__":
    main()
