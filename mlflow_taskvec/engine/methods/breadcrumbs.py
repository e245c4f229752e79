"""Model breadcrumbs (Davari & Belilovsky, arXiv 2312.06795): drop each task vector's
largest outliers and its small rest, keep the band in between.

Per input tensor of n entries: ``keep = int(density * n)``, ``top = int(gamma * n)``,
``bottom = max(0, n - keep - top)``; ranking ``|t_i|`` ascending, the entries of rank
``[bottom, bottom + keep)`` stay and the others become zero. Then ``breadcrumbs`` is
the weighted sum, ``breadcrumbs_ties`` the ties sign election and disjoint mean.

The band is exact and streamed: it is the top ``n - bottom`` entries by magnitude
minus the top ``top`` ones, two exact top-k rules of the trim step (ties in magnitude
rank by flattened position, the earlier entry above, in both, so the second set lies
inside the first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlflow_taskvec.engine.methods import ParamSpec, merge_method
from mlflow_taskvec.engine.methods.linear import weighted_sum
from mlflow_taskvec.engine.methods.ties import elect_and_mean, weighted_in_place
from mlflow_taskvec.engine.methods.trim import TrimThreshold, top_k_rule, top_k_rules
from mlflow_taskvec.errors import TaskVecError

DENSITY = ParamSpec("density", float, low=0.0, high=1.0, low_open=True, description="fraction of each t_i's entries kept")
GAMMA = ParamSpec("gamma", float, default=0.01, low=0.0, high=1.0, high_open=True, description="fraction of each t_i's largest entries dropped as outliers")


def check_band(params: dict) -> None:
    total = params["density"] + params["gamma"]
    if total > 1:
        raise TaskVecError(
            f"params.gamma: density {params['density']:g} + gamma {params['gamma']:g} = {total:g} is more than 1 "
            "(the kept band and the dropped outliers cannot cover more than every entry)"
        )


def band_counts(numel: int, density: float, gamma: float) -> tuple[int, int, int]:
    """(keep, top, bottom) for a tensor of ``numel`` entries."""
    keep, top = int(density * numel), int(gamma * numel)
    return keep, top, max(0, numel - keep - top)


@dataclass
class Band:
    """The entries of one input breadcrumbs keeps: in ``upper`` (its top n - bottom) but not in
    ``outliers`` (its top ``top``); None is the empty set."""

    upper: TrimThreshold | None
    outliers: TrimThreshold | None

    def apply(self, chunk: torch.Tensor, start: int) -> torch.Tensor:
        """``chunk`` with the entries outside the band set to zero (a new tensor)."""
        if self.upper is None:
            return torch.zeros_like(chunk)
        kept = self.upper.apply(chunk, start)
        if self.outliers is not None:
            kept.sub_(self.outliers.apply(chunk, start))  # x - x = 0 on the outliers, x - 0 = x elsewhere
        return kept


def prepare_band(name, numel, params, inputs, dtype) -> list[Band]:
    keep, _, bottom = band_counts(numel, params["density"], params["gamma"])
    if keep == 0:
        return [Band(None, None) for _ in inputs]
    # ascending ranks [bottom, bottom + keep) are, from the top, the n - bottom largest
    # entries less the n - bottom - keep largest (``top`` of them, or fewer where bottom is 0)
    outlier_count = numel - bottom - keep
    bands = []
    for chunks in inputs:  # both rules of an input from the same passes over it
        if outlier_count:
            upper, outliers = top_k_rules(chunks, [numel - bottom, outlier_count], dtype)
        else:
            upper, outliers = top_k_rule(chunks, numel - bottom, dtype), None
        bands.append(Band(upper, outliers))
    return bands


def banded(deltas: list[torch.Tensor], ctx) -> list[torch.Tensor]:
    return [band.apply(d, ctx.start) for d, band in zip(deltas, ctx.prepared)]


@merge_method(
    "breadcrumbs",
    "zero each t_i's top gamma fraction (outliers) and its smallest entries, keeping a density fraction between; then task arithmetic",
    params=(DENSITY, GAMMA),
    prepare=prepare_band,
    check=check_band,
    paper="2312.06795",
)
def breadcrumbs(deltas, weights, ctx):
    return weighted_sum(banded(deltas, ctx), weights)


@merge_method(
    "breadcrumbs_ties",
    "the breadcrumbs band of each t_i, then the ties sign election and disjoint mean",
    params=(DENSITY, GAMMA),
    prepare=prepare_band,
    check=check_band,
    paper="2312.06795",
)
def breadcrumbs_ties(deltas, weights, ctx):
    return elect_and_mean(weighted_in_place(banded(deltas, ctx), weights), weights)
