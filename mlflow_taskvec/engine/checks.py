"""The number checks every layer applies: finite numbers (weights, scales, coefficients),
positive whole numbers (ranks, counts) and fractions (densities, energies).

Each raises ``ParameterError(what, problem)``: the message is ``"<what>: <problem>"``, and a
front end may name ``what`` its own way (the CLI prints its option).
"""

from __future__ import annotations

import math

from mlflow_taskvec.errors import ParameterError, TaskVecError


def finite_number(value, what: str | None = None) -> float:
    """``value`` as a float; raises ``"<what>: 'x' is not a number"`` (or "not a finite number")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _refuse(what, f"{value!r} is not a number")
    if not math.isfinite(value):
        _refuse(what, f"{value!r} is not a finite number")
    return float(value)


def positive_int(value, what: str) -> int:
    """``value`` if it is a whole number >= 1 (not a bool); raises ``"<what>: 0 must be a positive whole number"``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _refuse(what, f"{value!r} must be a positive whole number")
    return value


def fraction(value, what: str) -> float:
    """``value`` as a float in (0, 1]; raises ``"<what>: 1.5 must be a number in (0, 1]"``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        _refuse(what, f"{value!r} must be a number in (0, 1]")
    return float(value)


def _refuse(what: str | None, problem: str):
    if what:
        raise ParameterError(what, problem)
    raise TaskVecError(problem)
