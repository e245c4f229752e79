"""TIES-merging (Yadav et al., arXiv 2306.01708): trim, elect a sign, disjoint mean; and
magnitude pruning (the trim step alone, then task arithmetic)."""

from __future__ import annotations

import torch

from mlflow_taskvec.engine.methods import ParamSpec, merge_method
from mlflow_taskvec.engine.methods.linear import weighted_sum
from mlflow_taskvec.engine.methods.trim import TrimThreshold, top_k_rule, trim_count

DENSITY = ParamSpec("density", float, low=0.0, high=1.0, low_open=True, description="fraction of each t_i's entries kept, by magnitude")


def prepare_trim(name, numel, params, inputs, dtype) -> list[TrimThreshold]:
    """Each input's exact top-k magnitude rule over the whole tensor, k = max(1, int(density * numel))."""
    k = trim_count(params["density"], numel)
    return [top_k_rule(chunks, k, dtype) for chunks in inputs]


def trimmed(deltas: list[torch.Tensor], ctx) -> list[torch.Tensor]:
    return [rule.apply(d, ctx.start) for d, rule in zip(deltas, ctx.prepared)]


def elect_and_mean(scaled: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES sign election and disjoint mean over already weighted deltas ``d_i = w_i t_i``.

    With ``P = sum_i max(d_i, 0)`` and ``N = sum_i min(d_i, 0)``, the elected sign is
    ``+`` where ``P + N >= 0``, and the agreeing entries sum to ``P`` there, ``N``
    elsewhere; the divisor likewise sums ``|w_i|`` over the positive or the negative
    entries. The divisor uses ``|w_i|``: with positive weights this is the paper's
    weighted disjoint mean, and a negative weight still negates (dividing by ``w_i``
    itself would cancel the sign it put on ``d_i``). Everything is float arithmetic:
    on CPU that is several times faster than boolean masks and ``torch.where``.
    """
    pos_sum = torch.zeros_like(scaled[0])
    neg_sum = torch.zeros_like(scaled[0])
    pos_weight = torch.zeros_like(scaled[0])
    neg_weight = torch.zeros_like(scaled[0])
    for d, w in zip(scaled, weights):
        pos_sum.add_(d.clamp(min=0))
        neg_sum.add_(d.clamp(max=0))
        sign = torch.sign(d)  # zeros have sign 0: they count on neither side
        pos_weight.add_(sign.clamp(min=0), alpha=abs(w))
        neg_weight.sub_(sign.clamp_(max=0), alpha=abs(w))
    # 1 where the elected sign is + (P + N >= 0), else 0
    plus = torch.add(pos_sum, neg_sum).sign_().add_(1).clamp_(max=1)
    numerator = pos_sum.sub_(neg_sum).mul_(plus).add_(neg_sum)
    divisor = pos_weight.sub_(neg_weight).mul_(plus).add_(neg_weight)
    # no agreeing entry: the numerator is 0 too, and 0 / tiny = 0 (a zero divisor counts as 1)
    return numerator.div_(divisor.clamp_(min=torch.finfo(divisor.dtype).tiny))


def weighted_in_place(tensors: list[torch.Tensor], weights: list[float]) -> list[torch.Tensor]:
    """``w_i t_i`` for tensors the caller owns (multiplied in place)."""
    return [t.mul_(w) if w != 1 else t for t, w in zip(tensors, weights)]


@merge_method(
    "ties",
    "trim each t_i to its top density fraction by magnitude, elect a sign per entry, average the agreeing entries",
    params=(DENSITY,),
    prepare=prepare_trim,
    paper="2306.01708",
)
def ties(deltas, weights, ctx):
    return elect_and_mean(weighted_in_place(trimmed(deltas, ctx), weights), weights)


@merge_method("magnitude_prune", "the ties trim step, then task arithmetic", params=(DENSITY,), prepare=prepare_trim, paper="2306.01708")
def magnitude_prune(deltas, weights, ctx):
    return weighted_sum(trimmed(deltas, ctx), weights)
