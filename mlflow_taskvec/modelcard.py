"""The model card of a composite: a ``README.md`` in the Hugging Face format.

YAML front matter with ``base_model`` and ``tags: [merge, task-arithmetic]`` (what the
Hub reads to place a model in its base's model tree), then the recipe, the inputs with
their fingerprints, the method and, when there are any, the metrics.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from mlflow_taskvec.recipe import Recipe

CARD_NAME = "README.md"
LINEAR_NOTE = (
    "Fine-tuning: **linear** (`taskvec.fine_tuning=linear`). The inputs are task vectors of fine-tunes trained "
    "linearized at the base (arXiv 2305.12827), so these weights `w` are meant for the base's first-order Taylor "
    "model `f(x; b) + J(b)(w - b)`: `mlflow_taskvec.linearize(module, base_weights)` with `module` holding `w`; "
    "the metrics are of that model."
)
TAGS = ["merge", "task-arithmetic"]


def hub_name_of(folder: Path | None) -> str | None:
    """The Hub name of a base folder when its path says it: a Hugging Face cache snapshot
    (``.../models--owner--name/snapshots/<revision>``). A folder's own card and config name
    the model it was trained from, not itself, so they are not read."""
    if folder is None:
        return None
    for part in reversed(Path(folder).resolve().parts):
        if part.startswith("models--") and part.count("--") >= 2:
            return part.removeprefix("models--").replace("--", "/", 1)
    return None


def model_card(
    recipe: Recipe,
    base_model: str,
    inputs: Sequence[Mapping],
    fingerprint: str,
    base_fingerprint: str,
    metrics: Mapping[str, float] | None = None,
    linear: bool = False,
) -> str:
    """The card's text. ``inputs``: one ``{"ref", "weight", "fingerprint", "task"}`` per vector;
    ``linear``: the inputs are linearized fine-tunes' vectors (a paragraph says how to evaluate it)."""
    front = {"base_model": base_model, "tags": TAGS, "library_name": "mlflow-taskvec"}
    params = ", ".join(f"{k}={v}" for k, v in sorted(recipe.params.items())) or "none"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# Composite of {base_model}",
        "",
        f"Made with mlflow-taskvec by task arithmetic: `base + scale * {recipe.method}(weights, task vectors)`.",
        "",
        "| | |",
        "|---|---|",
        f"| method | `{recipe.method}` (params: {params}) |",
        f"| scale | {_coefficient(recipe.scale)} |",
        f"| base | `{recipe.base}` (fingerprint `{base_fingerprint[:16]}`) |",
        f"| fingerprint | `{fingerprint}` |",
        f"| recipe sha256 | `{recipe.sha256()}` |",
        *(["", LINEAR_NOTE] if linear else []),
        "",
        "## Inputs",
        "",
        "| input | task | weight | fingerprint |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{i['ref']}` | {i.get('task') or ''} | {_coefficient(i['weight'])} | `{(i.get('fingerprint') or '')[:16]}` |" for i in inputs]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items())]
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe.model_dump(exclude={"output", "search"}, exclude_none=True), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def _coefficient(value) -> str:
    """A scale or weight: a number, or per-layer coefficients (a mapping) as JSON."""
    return f"{value:g}" if isinstance(value, (int, float)) else json.dumps(value, sort_keys=True, default=str)
