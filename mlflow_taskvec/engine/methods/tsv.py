"""Task Singular Vectors: Merge (TSV-M; Gargiulo et al., CVPR 2025, arXiv 2412.00081).

Per 2-D tensor (m x n, r = min(m, n), T inputs): keep the top k = max(1, floor(r / T))
singular triplets of each ``d_i = w_i t_i``, concatenate them into U (m x Tk), S (Tk)
and V (n x Tk), replace U and V by their polar factors (removing the interference
between the tasks' subspaces), and return ``U' diag(S) V'^T``. Every other tensor:
the mean of the d_i.
"""

from __future__ import annotations

import torch

from mlflow_taskvec.engine.methods import merge_method
from mlflow_taskvec.engine.methods.spectral import EXCLUDE, SVD, is_svd_tensor, low_rank, mean_of_deltas, polar_factor, thin_svd, weighted


def tsv_merge(deltas: list[torch.Tensor], svd: SVD = thin_svd) -> torch.Tensor:
    """TSV-M of the weighted deltas ``d_i`` (each m x n)."""
    m, n = deltas[0].shape
    k = max(1, min(m, n) // len(deltas))
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = svd(d)
        # copies of the k kept triplets, so that each input's whole U and Vh are freed at once
        us.append(u[:, :k].clone())
        ss.append(s[:k].clone())
        vs.append(vh[:k].T.clone())
        del u, s, vh
    u, s, v = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=1)
    return low_rank(polar_factor(u, svd), s, polar_factor(v, svd))


@merge_method(
    "tsv_m",
    "per matrix, each d_i's top min(m,n)/T singular vectors, concatenated and orthogonalized (polar factors); other tensors: the mean",
    params=(EXCLUDE,),
    whole_tensor=is_svd_tensor,
    paper="2412.00081",
)
def tsv_m(deltas, weights, ctx):
    if not ctx.whole_tensor:
        return mean_of_deltas(deltas, weights)
    return tsv_merge(weighted(deltas, weights))
