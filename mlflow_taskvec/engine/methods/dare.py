"""DARE (Yu et al., arXiv 2311.03099): drop entries at random, rescale the rest, then task
arithmetic (``dare_linear``) or the TIES election and disjoint mean (``dare_ties``).

Masks come from ``ctx.keep_mask``: they depend only on (seed, input index, tensor
name, position), never on chunking, threads or tensor order.
"""

from __future__ import annotations

import torch

from mlflow_taskvec.engine.methods import ParamSpec, merge_method
from mlflow_taskvec.engine.methods.linear import weighted_sum
from mlflow_taskvec.engine.methods.ties import elect_and_mean, weighted_in_place

KEEP = ParamSpec("density", float, low=0.0, high=1.0, low_open=True, description="keep probability p of each entry")
SEED = ParamSpec("seed", int, default=0, searchable=False, description="seed of the drop masks")


def dropped(deltas: list[torch.Tensor], ctx) -> list[torch.Tensor]:
    p = ctx.params["density"]
    return [torch.where(ctx.keep_mask(i, d.numel(), p), d / p, 0.0) for i, d in enumerate(deltas)]


@merge_method(
    "dare_linear",
    "drop each entry with probability 1 - density, rescale the kept ones by 1/density, then task arithmetic",
    params=(KEEP, SEED),
    paper="2311.03099",
)
def dare_linear(deltas, weights, ctx):
    return weighted_sum(dropped(deltas, ctx), weights)


@merge_method(
    "dare_ties",
    "the dare drop and rescale, then the ties sign election and disjoint mean (no trim)",
    params=(KEEP, SEED),
    paper="2311.03099",
)
def dare_ties(deltas, weights, ctx):
    return elect_and_mean(weighted_in_place(dropped(deltas, ctx), weights), weights)
