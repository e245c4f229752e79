"""Turning references into checkpoints: the one resolver every front end calls.

A reference is a local path (file or HF-style directory) or a URI whose scheme
a resolver has been registered for. The MLflow layer registers ``models:/`` and
``runs:/``; the engine itself only ever sees local paths.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

from mlflow_taskvec.engine.checkpoint import Checkpoint, open_checkpoint
from mlflow_taskvec.engine.lora import is_adapter, open_adapter
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.errors import TaskVecError

SchemeResolver = Callable[[str], Path]
_RESOLVERS: dict[str, SchemeResolver] = {}
# Schemes whose resolver lives in a module that registers it when imported.
_PROVIDERS = {"models": "mlflow_taskvec.mlflow.downloads", "runs": "mlflow_taskvec.mlflow.downloads"}
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):")


def register_scheme(scheme: str, resolver: SchemeResolver) -> None:
    """Make ``scheme:...`` references resolve to a local path through ``resolver``."""
    _RESOLVERS[scheme] = resolver


def scheme_of(ref: str) -> str | None:
    m = _SCHEME.match(ref)
    return m.group(1).lower() if m else None


def resolve_path(ref: "str | os.PathLike", relative_to: Path | None = None) -> Path:
    """The local path behind a reference; raises TaskVecError when there is none."""
    text = os.fspath(ref)
    scheme = scheme_of(text)
    if scheme == "file":
        path = Path(unquote(urlparse(text).path))
    elif scheme is not None:
        if scheme not in _RESOLVERS and scheme in _PROVIDERS:
            try:
                importlib.import_module(_PROVIDERS[scheme])
            except ImportError:
                pass
        if scheme not in _RESOLVERS:
            raise TaskVecError(f"{text}: unsupported reference scheme {scheme!r} (use a local path)")
        return _RESOLVERS[scheme](text)
    else:
        path = Path(text).expanduser()
        if not path.is_absolute() and relative_to is not None:
            path = relative_to / path
    if not path.exists():
        raise TaskVecError(f"{path}: no such file or directory")
    return path


def open_reference(ref, relative_to: Path | None = None, base=None) -> Checkpoint:
    """Open the checkpoint a reference points at (lazily).

    A PEFT LoRA adapter opens as the (low-rank) task vector of ``base``.
    """
    if isinstance(ref, Checkpoint):
        return ref
    path = resolve_path(ref, relative_to)
    if is_adapter(path):
        return open_adapter(path, base)
    return open_checkpoint(path)


def load_vector(ref, relative_to: Path | None = None, base=None) -> TaskVector:
    """Open the task vector a reference points at (lazily); ``base`` for a LoRA adapter."""
    return TaskVector.load(open_reference(ref, relative_to, base))
