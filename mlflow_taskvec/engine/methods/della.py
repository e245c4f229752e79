"""DELLA (Deep et al., arXiv 2406.11617): drop entries at random with a probability
that falls with their magnitude's rank, rescale the rest, then merge.

Per row of a 2-D tensor (the whole tensor otherwise), ``|t_i|`` is ranked ascending
(ties by position, the earlier entry lower) and ``rank_norm = rank / (n - 1)`` lies in
[0, 1] (a single entry has 1/2). Each entry is kept with probability
``p = density - epsilon + 2 * epsilon * rank_norm`` and divided by its p when kept, so
the expected result is t_i; ``della`` then takes the ties sign election and disjoint
mean, ``della_linear`` the weighted sum. The masks are DARE's order-independent ones
(``streaming.keep_mask`` with one probability per entry): the same seed gives the same
result whatever the chunking, threads or tensor order.

Ranks need whole rows and nothing wider, so a matrix reaches this method in chunks of
whole rows (``row_chunks``): its inputs are never held whole. Other tensors (ranked over
all their entries) reach it whole. Either way it works a block of rows at a time.
"""

from __future__ import annotations

import torch

from mlflow_taskvec.engine.methods import ParamSpec, merge_method
from mlflow_taskvec.engine.methods.dare import SEED
from mlflow_taskvec.engine.methods.linear import weighted_sum
from mlflow_taskvec.engine.methods.ties import elect_and_mean, weighted_in_place
from mlflow_taskvec.engine.streaming import RANDOM_BLOCK
from mlflow_taskvec.errors import TaskVecError

DENSITY = ParamSpec("density", float, low=0.0, high=1.0, low_open=True, high_open=True, description="mean keep probability of each entry")
EPSILON = ParamSpec(
    "epsilon", float, default=0.1, low=0.0, high=0.5, high_open=True,
    description="keep probabilities spread over density +- epsilon, by magnitude rank",
)


def check_probabilities(params: dict) -> None:
    density, epsilon = params["density"], params["epsilon"]
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise TaskVecError(
            f"params.epsilon: {epsilon:g} with density {density:g} gives keep probabilities from {density - epsilon:g} "
            f"to {density + epsilon:g}, not inside (0, 1) (need epsilon < min(density, 1 - density))"
        )


def rank_norm(magnitude: torch.Tensor) -> torch.Tensor:
    """Each entry's ascending rank along the last dimension, divided by (n - 1): values in [0, 1]."""
    n = magnitude.shape[-1]
    if n == 1:
        return torch.full_like(magnitude, 0.5)
    order = torch.argsort(magnitude, dim=-1, stable=True)
    ranks = torch.empty_like(magnitude)
    ranks.scatter_(-1, order, torch.arange(n, dtype=magnitude.dtype).expand_as(magnitude))
    return ranks.div_(n - 1)


def keep_probabilities(t: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p per entry of ``t``: ranked per row of a 2-D tensor, over the whole tensor otherwise."""
    rows = t if t.dim() == 2 else t.reshape(1, -1)
    return rank_norm(rows.abs()).mul_(2 * epsilon).add_(density - epsilon).reshape(t.shape)


def della_merge(deltas: list[torch.Tensor], weights: list[float], ctx, combine) -> torch.Tensor:
    """Drop, rescale and ``combine(dropped, weights)`` a block of rows at a time (about a random
    block's worth of entries), so the temporaries stay block-sized whatever the tensor's size.

    ``deltas`` are a matrix whole, a chunk of whole rows of one (flat, ``ctx.shape`` 2-D), or
    another tensor whole (ranked as one row)."""
    density, epsilon = ctx.params["density"], ctx.params["epsilon"]
    if deltas[0].dim() == 2:
        rows = deltas
    elif len(ctx.shape) == 2:
        rows = [d.reshape(-1, ctx.shape[1]) for d in deltas]
    else:
        rows = [d.reshape(1, -1) for d in deltas]
    count, width = rows[0].shape
    step = count if len(ctx.shape) != 2 and deltas[0].dim() != 2 else max(1, RANDOM_BLOCK // max(1, width))
    merged = torch.empty_like(rows[0])
    for top in range(0, count, step):
        bottom = min(count, top + step)
        dropped = []
        for i, t in enumerate(rows):
            block = t[top:bottom]
            p = keep_probabilities(block, density, epsilon)
            keep = ctx.keep_mask(i, block.numel(), p.reshape(-1), offset=top * width).reshape(block.shape)
            dropped.append(torch.div(block, p, out=p).mul_(keep))  # t / p where kept, else 0, in p's buffer
        merged[top:bottom] = combine(dropped, weights)
    return merged.reshape(deltas[0].shape)


def _ties(dropped, weights):
    return elect_and_mean(weighted_in_place(dropped, weights), weights)


@merge_method(
    "della",
    "keep each entry with probability density +- epsilon by its magnitude rank (per row), rescale by 1/p, then the ties election and disjoint mean",
    params=(DENSITY, EPSILON, SEED),
    whole_tensor=lambda name, shape, params: len(shape) != 2,
    row_chunks=True,
    check=check_probabilities,
    paper="2406.11617",
)
def della(deltas, weights, ctx):
    return della_merge(deltas, weights, ctx, _ties)


@merge_method(
    "della_linear",
    "the della drop and rescale, then task arithmetic",
    params=(DENSITY, EPSILON, SEED),
    whole_tensor=lambda name, shape, params: len(shape) != 2,
    row_chunks=True,
    check=check_probabilities,
    paper="2406.11617",
)
def della_linear(deltas, weights, ctx):
    return della_merge(deltas, weights, ctx, weighted_sum)
