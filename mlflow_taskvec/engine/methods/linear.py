"""Task arithmetic (Ilharco et al., arXiv 2212.04089): the weighted sum of the task vectors."""

from __future__ import annotations

import torch

from mlflow_taskvec.engine.methods import merge_method


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``sum_i w_i t_i`` (a new tensor)."""
    out = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t, alpha=w)
    return out


@merge_method("task_arithmetic", "base + scale * sum_i w_i t_i", linear=True, paper="2212.04089")
def task_arithmetic(deltas, weights, ctx):
    return weighted_sum(deltas, weights)
