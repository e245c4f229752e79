"""Cosine similarities of task vectors (the paper's Figure: near 0 for unrelated tasks), as a
table and as a heatmap picture."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow_taskvec.engine.describe import cosine_matrix
from mlflow_taskvec.engine.output import check_output_path, write_file
from mlflow_taskvec.errors import ParameterError
from mlflow_taskvec.references import load_vector, local_paths, open_reference
from mlflow_taskvec.tables import render_table


@dataclass
class Similarity:
    """The cosine-similarity matrix of some task vectors (a pandas frame labelled by task) and
    the heatmap written of it (or None)."""

    frame: object  # pandas.DataFrame
    heatmap: Path | None = None

    def render(self, fmt: str = "table") -> str:
        """The matrix as ``mlflow-taskvec similarity`` prints it: table, csv, markdown or json."""
        return render_table(self.frame, fmt)

    def lines(self) -> list[str]:
        """What ``mlflow-taskvec similarity`` prints on stderr after the matrix: the heatmap it wrote."""
        return [f"heatmap: {self.heatmap}"] if self.heatmap is not None else []


def similarity_of(
    refs: Sequence["str | os.PathLike"], base: "str | os.PathLike | None" = None, heatmap: "str | os.PathLike | None" = None,
    overwrite: bool = False,
) -> Similarity:
    """The cosine similarities of the task vectors ``refs`` (at least two; ``base``: for PEFT
    adapters) and, with ``heatmap``, a PNG of them there; the heatmap path is checked before
    anything is read."""
    if len(refs) < 2:
        raise ParameterError("refs", "give at least two task vectors")
    if heatmap is not None:
        check_heatmap_path(heatmap, refs, base, overwrite)
    frame = similarity_frame(refs, base)
    if heatmap is None:
        return Similarity(frame)
    write_heatmap(frame, heatmap, refs, base, overwrite)
    return Similarity(frame, Path(heatmap))


def similarity_frame(refs: Sequence["str | os.PathLike"], base: "str | os.PathLike | None" = None):
    """The cosine-similarity matrix of the task vectors ``refs`` (``base``: for PEFT adapters) as a
    pandas frame labelled by task (else by file name), in one streaming pass over the vectors."""
    import pandas as pd

    base_ckpt = open_reference(base) if base else None
    vectors = [load_vector(r, base=base_ckpt) for r in refs]
    labels = [v.task or Path(str(r)).name for v, r in zip(vectors, refs)]
    return pd.DataFrame(cosine_matrix(vectors).numpy(), index=pd.Index(labels, name="cosine"), columns=labels)


def check_heatmap_path(path: "str | os.PathLike", refs: Sequence, base=None, overwrite: bool = False) -> None:
    """Refuse, before anything is read, a heatmap path that is an input, exists (without
    ``overwrite``), or lies in a missing folder."""
    check_output_path(path, overwrite, inputs=local_paths([*refs, base]), what="heatmap")


def write_heatmap(frame, path: "str | os.PathLike", refs: Sequence, base=None, overwrite: bool = False) -> Path:
    """``frame`` (a similarity matrix) as a PNG heatmap at ``path``, through the output claim."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(frame)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n, 1 + 0.8 * n))
    im = ax.imshow(frame.to_numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(n), frame.columns, rotation=45, ha="right")
    ax.set_yticks(range(n), frame.index)
    for i in range(n):
        for j in range(n):
            value = frame.iat[i, j]
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color="white" if abs(value) > 0.6 else "black")
    fig.colorbar(im, ax=ax, label="cosine similarity")
    fig.tight_layout()
    try:
        return write_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), "heatmap", overwrite=overwrite, inputs=local_paths([*refs, base]))
    finally:
        plt.close(fig)
