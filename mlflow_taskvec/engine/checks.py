"""The finite-number check every layer applies to weights, scales and coefficients."""

from __future__ import annotations

import math

from mlflow_taskvec.errors import TaskVecError


def finite_number(value, what: str | None = None) -> float:
    """``value`` as a float; raises ``"<what>: 'x' is not a number"`` (or "not a finite number")."""
    prefix = f"{what}: " if what else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TaskVecError(f"{prefix}{value!r} is not a number")
    if not math.isfinite(value):
        raise TaskVecError(f"{prefix}{value!r} is not a finite number")
    return float(value)
