"""Isotropic merging (Marczak et al., ICML 2025, arXiv 2502.04959): flatten the spectrum.

``iso_c``: per 2-D tensor, ``M = sum_i d_i = U S V^T``; every singular value is
replaced by their mean: ``mean(S) U V^T``. ``iso_cts`` adds task-specific directions:
the top c triplets of M form a common space, each input contributes the top s
triplets of its part outside that space, the r = c + T s directions are
orthogonalized by their polar factors and all get the mean singular value.
Every other tensor: the mean of the d_i. The paper's scale is about 1.3-1.5.
"""

from __future__ import annotations

import torch

from mlflow_taskvec.engine.methods import ParamSpec, merge_method
from mlflow_taskvec.engine.methods.linear import weighted_sum
from mlflow_taskvec.engine.methods.spectral import (
    EXCLUDE,
    SVD,
    gram_polar_and_mean,
    is_svd_tensor,
    low_rank,
    mean_of_deltas,
    polar_factor,
    thin_svd,
    weighted,
)

COMMON_FRACTION = ParamSpec(
    "common_fraction", float, default=0.8, low=0.0, high=1.0, low_open=True, high_open=True,
    description="share of the r = min(m, n) directions taken from the common space of sum_i d_i",
)

GRAM = ParamSpec(
    "gram", int, default=0, low=0, high=1, searchable=False,
    description="1: U V^T and mean(S) from an eigendecomposition of the float64 Gram matrix instead of an SVD (opt-in: other bits)",
)


def iso_c_merge(deltas: list[torch.Tensor], svd: SVD = thin_svd) -> torch.Tensor:
    """Iso-C of the weighted deltas: ``mean(S) U V^T`` for ``sum_i d_i = U S V^T``."""
    u, s, vh = svd(weighted_sum(deltas, [1.0] * len(deltas)))
    return (u @ vh).mul_(s.mean())


def iso_c_merge_gram(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Iso-C with the polar factor and the mean singular value of the sum from its float64 Gram matrix
    (``spectral.gram_polar_and_mean``): no SVD; the same formula, other rounding."""
    polar, mean = gram_polar_and_mean(weighted_sum(deltas, [1.0] * len(deltas)))
    return polar.mul_(mean)


def iso_cts_split(r: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """(c, s): c common directions and s per task, c + tasks * s = r.

    ``c = int(r * common_fraction)``, then ``c = r - round((r - c) / T) * T`` so that the
    task-specific rest divides evenly. Where rounding up would leave c below 0 (tiny
    matrices, many tasks), c is ``r mod T``: the most task-specific directions that fit.
    """
    c = int(r * common_fraction)
    c = r - round((r - c) / tasks) * tasks
    if c < 0:
        c = r % tasks
    return c, (r - c) // tasks


def iso_cts_merge(deltas: list[torch.Tensor], common_fraction: float, svd: SVD = thin_svd) -> torch.Tensor:
    """Iso-CTS of the weighted deltas (each m x n)."""
    m, n = deltas[0].shape
    c, s = iso_cts_split(min(m, n), len(deltas), common_fraction)
    u, sv, vh = svd(weighted_sum(deltas, [1.0] * len(deltas)))
    # copies of the c common triplets: the sum's whole U and Vh are freed here, not held to the end
    common_u, common_s, common_v = u[:, :c].clone(), sv[:c].clone(), vh[:c].T.clone()
    del u, sv, vh
    us, ss, vs = [], [], []
    if s > 0:
        for d in deltas:
            specific = d - common_u @ (common_u.T @ d)
            du, ds, dvh = svd(specific)
            del specific
            us.append(du[:, :s].clone())
            ss.append(ds[:s].clone())
            vs.append(dvh[:s].T.clone())
            del du, ds, dvh
    u = torch.cat(us + [common_u], dim=1)
    sv = torch.cat(ss + [common_s])
    v = torch.cat(vs + [common_v], dim=1)
    return low_rank(polar_factor(u, svd), torch.full_like(sv, float(sv.mean())), polar_factor(v, svd))


@merge_method(
    "iso_c",
    "per matrix, the SVD of sum_i d_i with every singular value replaced by their mean; other tensors: the mean",
    params=(EXCLUDE, GRAM),
    whole_tensor=is_svd_tensor,
    paper="2502.04959",
    search_scale=(0.0, 2.0),  # the paper's scale is about 1.3-1.5
)
def iso_c(deltas, weights, ctx):
    if not ctx.whole_tensor:
        return mean_of_deltas(deltas, weights)
    if ctx.params.get("gram", 0):
        return iso_c_merge_gram(weighted(deltas, weights))
    return iso_c_merge(weighted(deltas, weights))


@merge_method(
    "iso_cts",
    "iso_c over a common subspace of sum_i d_i plus each d_i's own top directions outside it; other tensors: the mean",
    params=(COMMON_FRACTION, EXCLUDE),
    whole_tensor=is_svd_tensor,
    paper="2502.04959",
    search_scale=(0.0, 2.0),
)
def iso_cts(deltas, weights, ctx):
    if not ctx.whole_tensor:
        return mean_of_deltas(deltas, weights)
    return iso_cts_merge(weighted(deltas, weights), ctx.params["common_fraction"])
