"""Consensus merging with TALL masks (Wang et al., ICML 2024, arXiv 2405.07813): keep only
the entries that at least k tasks need.

With ``t_MTL = sum_i d_i`` (``d_i = w_i t_i``), input i's mask is
``m_i = |d_i| >= mask_lambda * |t_MTL - d_i|`` (the entry matters to task i more
than the other tasks' sum disturbs it); the consensus mask is ``sum_i m_i >= k``,
and the merged vector of task arithmetic (``consensus_ta``) or ties
(``consensus_ties``) is multiplied by it. Elementwise: streamed chunk by chunk.
"""

from __future__ import annotations

import torch

from mlflow_taskvec.engine.methods import ParamSpec, merge_method
from mlflow_taskvec.engine.methods.linear import weighted_sum
from mlflow_taskvec.engine.methods.ties import DENSITY, prepare_trim, ties

K = ParamSpec("k", int, default=2, low=1, description="how many task masks must keep an entry")
MASK_LAMBDA = ParamSpec("mask_lambda", float, default=0.4, low=0.0, high=1.0, description="lambda of the TALL masks")


def consensus_mask(deltas: list[torch.Tensor], weights: list[float], total: torch.Tensor, k: int, mask_lambda: float) -> torch.Tensor:
    """``[sum_i (|d_i| >= mask_lambda * |total - d_i|) >= k]`` as 0/1 in the deltas' dtype (``total = sum_i d_i``)."""
    count = torch.zeros_like(total)
    for t, w in zip(deltas, weights):
        d = t * w
        count.add_(d.abs() >= torch.sub(total, d).abs_().mul_(mask_lambda))
    return count.ge_(k)


@merge_method(
    "consensus_ta",
    "task arithmetic, keeping only the entries that the TALL masks of at least k inputs select",
    params=(K, MASK_LAMBDA),
    paper="2405.07813",
)
def consensus_ta(deltas, weights, ctx):
    total = weighted_sum(deltas, weights)
    return total.mul_(consensus_mask(deltas, weights, total, ctx.params["k"], ctx.params["mask_lambda"]))


@merge_method(
    "consensus_ties",
    "ties, keeping only the entries that the TALL masks of at least k inputs select",
    params=(DENSITY, K, MASK_LAMBDA),
    prepare=prepare_trim,
    paper="2405.07813",
)
def consensus_ties(deltas, weights, ctx):
    mask = consensus_mask(deltas, weights, weighted_sum(deltas, weights), ctx.params["k"], ctx.params["mask_lambda"])
    return ties(deltas, weights, ctx).mul_(mask)
