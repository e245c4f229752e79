"""Shared pieces of the SVD methods (``tsv_m``, ``iso_c``, ``iso_cts``).

They work on each weight matrix whole: a "2-D tensor" is one with two dimensions
whose name no glob of the method's ``exclude`` parameter matches; every other
tensor (biases, norms, scalars, excluded matrices) is merged as the mean of the
``d_i = w_i t_i``, streamed in chunks like an elementwise method.

Each function takes the SVD it uses as an argument (``svd``, default ``thin_svd``):
the results do not depend on the signs of singular vectors, and the tests check
that by handing in an SVD whose signs are flipped.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch

from mlflow_taskvec.engine.methods import ParamSpec
from mlflow_taskvec.engine.methods.linear import weighted_sum

SVD = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

EXCLUDE = ParamSpec(
    "exclude", list, default=[], searchable=False, description="globs of 2-D tensor names merged as the mean of d_i instead of by SVD"
)


def thin_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, Vh`` with ``x = U diag(S) Vh``, U m x r, Vh r x n, r = min(m, n)."""
    return torch.linalg.svd(x, full_matrices=False)


def polar_factor(x: torch.Tensor, svd: SVD = thin_svd) -> torch.Tensor:
    """``P Q^T`` where ``x = P Sigma Q^T`` is a thin SVD: the nearest matrix with orthonormal columns (or rows)."""
    p, _, qh = svd(x)
    return p @ qh


def gram_polar_and_mean(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(P Q^T, mean(Sigma))`` for ``x = P Sigma Q^T`` without an SVD: from the eigendecomposition
    ``G = W diag(lambda) W^T`` of the float64 Gram matrix of x's smaller side (``x^T x`` for a tall x),
    ``sigma = sqrt(lambda)`` and ``P Q^T = x W diag(1/sigma) W^T``, all in float64, rounded to x's dtype.

    Error: eigh is backward stable, so each lambda is off by at most about ``n eps64 sigma_1^2``;
    the polar factor is off by about ``n eps64 kappa^2`` (kappa = sigma_1 / sigma_min), below 1e-6 for
    kappa up to 1e3 at n = 4096 (then the rounding to float32 dominates). Directions with sigma <= max(m, n) eps(x.dtype) sigma_1 (numerically
    zero: where the SVD's factors are not determined either) get 0 instead of an arbitrary unit vector.
    """
    tall = x.shape[0] >= x.shape[1]
    a = (x if tall else x.T).double()
    lam, w = torch.linalg.eigh(a.T @ a)
    sigma = lam.clamp_(min=0).sqrt_()
    cutoff = float(sigma.max()) * max(x.shape) * torch.finfo(x.dtype).eps
    inverse = torch.where(sigma > cutoff, 1 / sigma.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    polar = a @ ((w * inverse) @ w.T)
    return (polar if tall else polar.T).to(x.dtype), float(sigma.mean())


def is_svd_tensor(name: str, shape: tuple[int, ...], params: dict) -> bool:
    """Whether an SVD method merges tensor ``name`` by SVD (else: the mean of the d_i)."""
    return len(shape) == 2 and not any(fnmatch.fnmatchcase(name, glob) for glob in params["exclude"])


def weighted(deltas: list[torch.Tensor], weights: list[float]) -> list[torch.Tensor]:
    """``d_i = w_i t_i`` as new tensors where a weight is not 1 (the inputs may be read-only views)."""
    return [d if w == 1 else d * w for d, w in zip(deltas, weights)]


def mean_of_deltas(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``(1/T) sum_i w_i t_i``: how the SVD methods merge every tensor that is not a 2-D tensor."""
    return weighted_sum(deltas, weights).div_(len(deltas))


def low_rank(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``U diag(S) V^T`` (V given as n x r)."""
    return (u * s) @ v.T
