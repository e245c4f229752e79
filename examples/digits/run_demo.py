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
    path = mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id, artifact_path="leaderboard/leaderboard.md", tracking_uri=client.tracking_uri)
    return Path(path).read_text("utf-8")


def report(client, experiment_id: str, seed: int, heading: str = "registered model versions") -> None:
    """Print the registry, the leaderboard and the paper's results of the store ``client`` reads;
    exit non-zero (``SystemExit`` with one line) when a result misses its target."""
    import paper_results

    table = registry_table(client)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", 90)
    print(f"\n{heading}:")
    print(table.to_string(index=False))
    print(f"\nthe method leaderboard (seed {seed}, 8 tasks, test split, coefficients searched on the validation split):")
    print(leaderboard_table(client, experiment_id))
    results = paper_results.results_table(client)
    print(f"\nthe paper's three results (seed {seed}, test split, coefficients searched on the validation split):")
    print(results.to_string(index=False))
    print("\nopen the MLflow UI on this store with:")
    print(f"  mlflow ui --backend-store-uri {client.tracking_uri} --port 5000")
    missed = results[results["met"] != "yes"]
    if len(missed):
        sys.exit(f"run_demo: {len(missed)} of {len(results)} targets missed: {', '.join(missed['figure'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=ROOT / "demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--report-only", action="store_true", help="report the store --dir holds (a finished demo) without running the pipeline again")
    args = parser.parse_args()
    demo = args.dir.resolve()
    tracking_uri = f"sqlite:///{demo / 'mlflow.db'}"
    if args.report_only:
        if not (demo / "mlflow.db").is_file():
            sys.exit(f"run_demo: {demo} holds no demo store (mlflow.db): run make demo first")
        os.environ.update(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_TASKVEC_CACHE=str(demo / "cache"), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        report(client, client.get_experiment_by_name(EXPERIMENT).experiment_id, args.seed)
        return
    if demo.exists():
        shutil.rmtree(demo)
    (demo / "artifacts").mkdir(parents=True)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_TASKVEC_CACHE": str(demo / "cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONWARNINGS": "ignore",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TASKVEC_CACHE", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")})

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(demo / "artifacts").as_uri())
    started = time.perf_counter()
    cmd = ["mlflow", "run", str(ROOT), "-e", "main", "--env-manager", "local", "--experiment-name", EXPERIMENT, "-P", f"steps={args.steps}", "-P", f"seed={args.seed}"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    report(client, experiment_id, args.seed, f"registered model versions ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
