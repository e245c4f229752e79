"""Per-layer coefficients: a weight or scale that is one number, or a number per tensor name.

A coefficient is either a number (every tensor) or a mapping from tensor-name
globs to numbers, e.g. ``{"*.layers.0.*": 0.2, "*": 0.8}``: the first glob (in
the mapping's order) that matches a tensor's name gives its value, and ``"*"``
is the default wherever it appears. Every merged tensor must get a value.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Union

from mlflow_taskvec.engine.checks import finite_number
from mlflow_taskvec.errors import TaskVecError

Coefficient = Union[float, dict[str, float]]
DEFAULT_GLOB = "*"


def check_coefficient(value, what: str) -> Coefficient:
    """``value`` as a float, or as a dict of glob -> float (order kept); raises naming ``what``."""
    if isinstance(value, Mapping):
        if not value:
            raise TaskVecError(f"{what}: an empty mapping gives no tensor a value (give globs -> numbers, '*' the default)")
        out = {}
        for glob, number in value.items():
            if not isinstance(glob, str) or not glob:
                raise TaskVecError(f"{what}: key {glob!r} is not a tensor-name glob")
            out[glob] = finite_number(number, f"{what}[{glob!r}]")
        return out
    return finite_number(value, what)


def coefficient_for(value: Coefficient, name: str, what: str) -> float:
    """The value of coefficient ``value`` for tensor ``name``: the first matching glob, else ``"*"``."""
    if not isinstance(value, dict):
        return value
    for glob, number in value.items():
        if glob != DEFAULT_GLOB and fnmatch.fnmatchcase(name, glob):
            return number
    if DEFAULT_GLOB in value:
        return value[DEFAULT_GLOB]
    raise TaskVecError(f"{what}: no glob of {list(value)} matches tensor {name!r} (add a '*' default)")


def values_of(value: Coefficient) -> list[float]:
    """Every number a coefficient can give (one, or one per glob)."""
    return list(value.values()) if isinstance(value, dict) else [value]


def describe(value: Coefficient) -> str:
    """Short text for logs and tables: ``0.8`` or ``{*.layers.0.*: 0.2, *: 0.8}``."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{glob}: {number:g}" for glob, number in value.items()) + "}"
    return f"{value:g}"
