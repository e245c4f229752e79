"""The task-arithmetic paper's three results, read back from the registry the digits pipeline filled.

    python examples/digits/paper_results.py --tracking-uri sqlite:///demo/mlflow.db

Each result is the newest version of a registered composite whose coefficients
``mlflow-taskvec search`` picked on the validation split; the figures are its
test-split metrics, as logged on its run (and its logged model). The
``accuracy`` column shows the reference (the base, or for normalized accuracy
the fine-tunes' mean) and then the composite:

- negation: the target task's accuracy falls by at least 30 points below the
  base's, while the control task (plain digits) stays within 2 points;
- addition: one composite of at least 4 task vectors reaches a mean normalized
  accuracy (composite / each task's fine-tune) of at least 0.90; task
  arithmetic and TIES side by side;
- analogy: a task with no training data of its own gains at least 10 points
  over the base from ``C + (B - A)``, while the control task keeps 95% of the
  base's accuracy (the search's ``control_min_ratio``; about 5 points).

Exits 1 when a target is missed (the table still printed), 2 when a composite
or one of its metrics is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import ANALOGY, NEGATION_TASK  # noqa: E402


@dataclass
class Target:
    result: str
    model: str
    figure: str  # the figure, in words
    metric: str  # the run's metric it is read from
    sign: int  # +1, or -1 for a drop
    goal: str  # in words
    passes: Callable[[float], bool]
    reference: str  # the metric the composite's accuracy is compared with (base or fine-tune)
    accuracy: str  # the composite's accuracy behind the figure


def targets(negation_task: str = NEGATION_TASK, analogy_task: str = ANALOGY[3]) -> list[Target]:
    """What each result must show, read from the composite's test metrics."""
    return [
        Target("negation", "digits-negation", f"{negation_task} accuracy drop below the base",
               f"{negation_task}.delta_accuracy", -1, ">= 0.30", lambda v: v >= 0.30,
               f"{negation_task}.base_accuracy", f"{negation_task}.accuracy"),
        Target("negation", "digits-negation", "digits (control) accuracy change vs the base",
               "control.digits.delta_accuracy", 1, "within 0.02", lambda v: abs(v) <= 0.02,
               "control.digits.base_accuracy", "control.digits.accuracy"),
        Target("addition", "digits-addition", "mean normalized accuracy, 4 tasks (task arithmetic)",
               "mean.normalized_accuracy", 1, ">= 0.90", lambda v: v >= 0.90,
               "mean.finetuned_accuracy", "mean.accuracy"),
        Target("addition", "digits-addition-ties", "mean normalized accuracy, 4 tasks (TIES)",
               "mean.normalized_accuracy", 1, ">= 0.90", lambda v: v >= 0.90,
               "mean.finetuned_accuracy", "mean.accuracy"),
        Target("analogy", "digits-analogy", f"{analogy_task} accuracy gain over the base",
               f"{analogy_task}.delta_accuracy", 1, ">= 0.10", lambda v: v >= 0.10,
               f"{analogy_task}.base_accuracy", f"{analogy_task}.accuracy"),
        Target("analogy", "digits-analogy", "digits (control) accuracy change vs the base",
               "control.digits.delta_accuracy", 1, ">= -0.05", lambda v: v >= -0.05,
               "control.digits.base_accuracy", "control.digits.accuracy"),
    ]


def short_name(uri: str) -> str:
    """``models:/digits-rotate-vector/1`` -> ``rotate`` (the pipeline's registered names)."""
    return uri.split("/")[1].removeprefix("digits-").removesuffix("-vector")


def results_table(client: MlflowClient, negation_task: str = NEGATION_TASK, analogy_task: str = ANALOGY[3]) -> pd.DataFrame:
    """One row per target: the composite, its coefficients, the figure and whether it meets the target."""
    rows = []
    for t in targets(negation_task, analogy_task):
        versions = client.search_model_versions(f"name='{t.model}'")
        if not versions:
            raise LookupError(f"no registered model {t.model!r}: run the digits pipeline (make demo) first")
        version = max(versions, key=lambda v: int(v.version))
        metrics = client.get_run(version.run_id).data.metrics
        missing = [m for m in (t.metric, t.reference, t.accuracy) if m not in metrics]
        if missing:
            raise LookupError(f"{t.model}/{version.version} has no metric {missing[0]!r} (it has: {', '.join(sorted(metrics))})")
        params = json.loads(version.tags.get("taskvec.params", "{}"))
        value = t.sign * metrics[t.metric]
        rows.append(
            {
                "result": t.result,
                "composite": f"{t.model}/{version.version}",
                "method": version.tags["taskvec.method"] + "".join(f" {k}={v:.2g}" for k, v in params.items()),
                "inputs": ", ".join(f"{i['weight']:+.2g} {short_name(i['uri'])}" for i in json.loads(version.tags["taskvec.inputs"])),
                "scale": f"{float(version.tags['taskvec.scale']):.3g}",
                "figure": t.figure,
                "accuracy": f"{metrics[t.reference]:.3f} -> {metrics[t.accuracy]:.3f}",
                "value": f"{value:.3f}",
                "target": t.goal,
                "met": "yes" if t.passes(value) else "NO",
            }
        )
    return pd.DataFrame(rows)


def docs_table(text: str) -> str:
    """The results table docs/results.md holds between its ``paper-results`` markers."""
    begin, end = text.index("<!-- paper-results:begin"), text.index("<!-- paper-results:end -->")
    return text[text.index("\n", begin) + 1 : end].strip()


def markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def parse_markdown(text: str) -> list[dict[str, str]]:
    """The rows of a table written by ``markdown``, as dicts keyed by column."""
    lines = [line.strip() for line in text.strip().splitlines()]
    columns = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(columns, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def figures(cell: str) -> list[float]:
    """The numbers in a cell such as ``0.525 -> 0.075`` or ``0.450``."""
    return [float(x) for x in re.findall(r"-?\d+\.\d+", cell)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--format", choices=["table", "markdown"], default="table")
    args = parser.parse_args()
    try:
        table = results_table(MlflowClient(args.tracking_uri))
    except LookupError as exc:
        print(f"paper_results: {exc.args[0]}", file=sys.stderr)
        return 2
    print(markdown(table) if args.format == "markdown" else table.to_string(index=False))
    return 0 if (table["met"] == "yes").all() else 1


if __name__ == "__main__":
    sys.exit(main())
