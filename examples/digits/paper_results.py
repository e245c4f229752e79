"""The task-arithmetic paper's three results, read back from the registry the digits pipeline filled.

    python examples/digits/paper_results.py --tracking-uri sqlite:///demo/mlflow.db

Each result is a registered composite whose coefficients ``mlflow-taskvec search``
picked on the validation split; the figures are its test-split metrics, as
logged on its run (and its logged model) by the pipeline:

- negation: the target task's accuracy falls by at least 30 points below the
  base's, while the control task (plain digits) stays within 2 points;
- addition: one composite of at least 4 task vectors reaches a mean normalized
  accuracy (composite / each task's fine-tune) of at least 0.90; task
  arithmetic and TIES side by side;
- analogy: a task with no training data of its own gains at least 10 points
  over the base from ``C + (B - A)``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import pandas as pd
from mlflow.tracking import MlflowClient


@dataclass
class Target:
    result: str
    model: str
    what: str  # the figure, in words
    metric: str  # how to read it from the run's metrics
    goal: str  # in words
    passes: object  # value -> bool


def targets(negation_task: str, analogy_task: str) -> list[Target]:
    """What each result must show, read from the composite's test metrics."""
    return [
        Target("negation", "digits-negation", f"{negation_task} accuracy drop vs base",
               f"-{negation_task}.delta_accuracy", ">= 0.30", lambda v: v >= 0.30),
        Target("negation", "digits-negation", "digits (control) accuracy change vs base",
               "control.digits.delta_accuracy", "within +-0.02", lambda v: abs(v) <= 0.02),
        Target("addition", "digits-addition", "mean normalized accuracy (task arithmetic)",
               "mean.normalized_accuracy", ">= 0.90", lambda v: v >= 0.90),
        Target("addition", "digits-addition-ties", "mean normalized accuracy (TIES)",
               "mean.normalized_accuracy", ">= 0.90", lambda v: v >= 0.90),
        Target("analogy", "digits-analogy", f"{analogy_task} accuracy gain vs base",
               f"{analogy_task}.delta_accuracy", ">= 0.10", lambda v: v >= 0.10),
    ]


def _metric(metrics: dict[str, float], spec: str) -> float:
    negate = spec.startswith("-")
    value = metrics[spec.lstrip("-")]
    return -value if negate else value


def results_table(client: MlflowClient, negation_task: str, analogy_task: str) -> pd.DataFrame:
    """One row per target: the composite, its coefficients, the figure and whether it meets the target."""
    rows = []
    for t in targets(negation_task, analogy_task):
        version = max(client.search_model_versions(f"name='{t.model}'"), key=lambda v: int(v.version))
        metrics = client.get_run(version.run_id).data.metrics
        inputs = json.loads(version.tags["taskvec.inputs"])
        value = _metric(metrics, t.metric)
        rows.append(
            {
                "result": t.result,
                "composite": f"{t.model}/{version.version}",
                "method": version.tags["taskvec.method"]
                + (f" {json.loads(version.tags['taskvec.params'])}" if version.tags.get("taskvec.params", "{}") != "{}" else ""),
                "inputs": ", ".join(f"{i['uri'].split('/')[1].removeprefix('digits-').removesuffix('-vector')}:{i['weight']:+g}" for i in inputs),
                "scale": float(version.tags["taskvec.scale"]),
                "figure": t.what,
                "value": round(value, 3),
                "target": t.goal,
                "met": "yes" if t.passes(value) else "NO",
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--negation-task", default="invert")
    parser.add_argument("--analogy-task", default="rotate_invert")
    parser.add_argument("--format", choices=["table", "markdown"], default="table")
    args = parser.parse_args()
    table = results_table(MlflowClient(args.tracking_uri), args.negation_task, args.analogy_task)
    print(markdown(table) if args.format == "markdown" else table.to_string(index=False))


def markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
