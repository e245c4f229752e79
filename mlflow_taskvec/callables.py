"""``"package.module:function"`` specs: the one parser and importer for evaluators and factories."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from mlflow_taskvec.errors import TaskVecError


def check_spec(spec: str, what: str) -> tuple[str, str]:
    """``(module, attribute)`` of ``spec``; raises naming ``what`` (e.g. "evaluator") when it is malformed."""
    module, _, attr = str(spec).partition(":")
    if not module or not attr:
        raise TaskVecError(f"{what} {spec!r} must look like 'package.module:function'")
    return module, attr


def import_callable(spec: str, what: str) -> Callable:
    """The callable ``spec`` names, imported; raises one line naming ``what`` when it cannot be."""
    module, attr = check_spec(spec, what)
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise TaskVecError(f"{what} {spec!r} cannot be imported ({exc})") from None
    if not callable(fn):
        raise TaskVecError(f"{what} {spec!r} is not callable")
    return fn
