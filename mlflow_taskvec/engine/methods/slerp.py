"""Spherical linear interpolation of two fine-tunes (Shoemake 1985; mergekit's most used method).

Per tensor, with ``v_1 = base + w_1 t_1`` and ``v_2 = base + w_2 t_2`` (the fine-tuned
weights when the weights are 1) flattened: the angle ``theta = arccos(cos)`` between
``v_1 / |v_1|`` and ``v_2 / |v_2|``; the result is
``sin((1 - t) theta) / sin(theta) * v_1 + sin(t theta) / sin(theta) * v_2``, or the
linear ``(1 - t) v_1 + t v_2`` when they are nearly parallel (``|cos| > 0.9995``) or
one is zero. The merged delta is that minus the base (so ``scale`` 1 gives it exactly).
The angle is over the whole tensor, so tensors reach this method whole.
"""

from __future__ import annotations

import math

import torch

from mlflow_taskvec.engine.methods import ParamSpec, merge_method

T = ParamSpec("t", float, low=0.0, high=1.0, description="0 gives the first input's fine-tune, 1 the second's")
PARALLEL_COSINE = 0.9995


def slerp_vectors(v1: torch.Tensor, v2: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two tensors of the same shape (a new tensor)."""
    n1, n2 = float(torch.linalg.vector_norm(v1)), float(torch.linalg.vector_norm(v2))
    cos = float(torch.dot(v1.reshape(-1), v2.reshape(-1))) / (n1 * n2) if n1 > 0 and n2 > 0 else 1.0
    cos = max(-1.0, min(1.0, cos))
    if abs(cos) > PARALLEL_COSINE:
        return torch.lerp(v1, v2, t)
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return torch.add(v1 * (math.sin((1 - t) * theta) / sin_theta), v2, alpha=math.sin(t * theta) / sin_theta)


@merge_method(
    "slerp",
    "spherical interpolation between the two fine-tunes base + t_1 and base + t_2 at t (exactly two inputs)",
    params=(T,),
    whole_tensor=True,
    inputs=2,
)
def slerp(deltas, weights, ctx):
    v1 = torch.add(ctx.base, deltas[0], alpha=weights[0])
    v2 = torch.add(ctx.base, deltas[1], alpha=weights[1])
    return slerp_vectors(v1, v2, ctx.params["t"]).sub_(ctx.base)
