"""The model card of a composite: a ``README.md`` in the Hugging Face format.

YAML front matter with ``base_model`` and ``tags: [merge, task-arithmetic]`` (what the
Hub reads to place a model in its base's model tree), then the recipe, the inputs with
their fingerprints, the method and, when there are any, the metrics.
"""

from __future__ import annotations

import json
import re
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


# What users name (model names, tasks, paths) goes into Markdown that the registry UI and the Hub
# render: it must stay text. A name without these characters is shown as it always was.
_CODE_BREAKERS = re.compile(r"[`|\n\r]")  # end a code span or a table cell
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "&#124;", "`": "&#96;", "[": "&#91;", "]": "&#93;", "\\": "&#92;", "\n": " ", "\r": " "}


def md_text(value) -> str:
    """``value`` as plain text in a Markdown table cell or heading: no HTML, link or code markup, one line."""
    return "".join(_ENTITIES.get(c, c) for c in str(value))


def md_code(value) -> str:
    """``value`` as an inline code span; as escaped text when it holds what would end the span or the cell."""
    text = str(value)
    return md_text(text) if _CODE_BREAKERS.search(text) else f"`{text}`"


def md_fence(text: str, info: str = "") -> list[str]:
    """``text`` in a fenced code block whose fence no line of ``text`` can close."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + info, text, fence]


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
        f"# Composite of {md_text(base_model)}",
        "",
        f"Made with mlflow-taskvec by task arithmetic: `base + scale * {recipe.method}(weights, task vectors)`.",
        "",
        "| | |",
        "|---|---|",
        f"| method | `{recipe.method}` (params: {md_text(params)}) |",
        f"| scale | {_coefficient(recipe.scale)} |",
        f"| base | {md_code(recipe.base)} (fingerprint `{base_fingerprint[:16]}`) |",
        f"| fingerprint | `{fingerprint}` |",
        f"| recipe sha256 | `{recipe.sha256()}` |",
        *(["", LINEAR_NOTE] if linear else []),
        "",
        "## Inputs",
        "",
        "| input | task | weight | fingerprint |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {md_code(i['ref'])} | {md_text(i.get('task') or '')} | {md_text(_coefficient(i['weight']))} | `{(i.get('fingerprint') or '')[:16]}` |"
        for i in inputs
    ]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {md_text(name)} | {value:.4f} |" for name, value in sorted(metrics.items())]
    recipe_yaml = yaml.safe_dump(recipe.model_dump(exclude={"output", "search"}, exclude_none=True), sort_keys=False).strip()
    lines += ["", "## Recipe", "", *md_fence(recipe_yaml, "yaml"), ""]
    return "\n".join(lines)


def _coefficient(value) -> str:
    """A scale or weight: a number, or per-layer coefficients (a mapping) as JSON."""
    return f"{value:g}" if isinstance(value, (int, float)) else json.dumps(value, sort_keys=True, default=str)
