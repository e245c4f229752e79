"""The reference-scheme table: turning references into local checkpoints.

A reference is a local path (file or HF-style directory) or a URI ``scheme:...``
whose scheme is in the table. Local paths (and ``file:`` URIs) are built in;
other schemes come from the entry-point group ``mlflow_taskvec.references``
(this package's own: ``models`` and ``runs``, in the MLflow layer), loaded only
when a reference of that scheme is met, or from ``add_scheme`` at run time.
An entry point names a callable ``resolve(ref) -> Path`` of the local checkpoint.

Everything that must tell a local reference from a remote one (recipe paths,
lineage, verification, registration) asks ``is_local`` here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import unquote, urlparse

from mlflow_taskvec.engine.checkpoint import Checkpoint, open_checkpoint
from mlflow_taskvec.engine.checkpoint import is_adapter
from mlflow_taskvec.engine.lora import open_adapter
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.errors import TaskVecError

ENTRY_POINT_GROUP = "mlflow_taskvec.references"
SchemeResolver = Callable[[str], Path]
_SCHEMES: dict[str, SchemeResolver] = {}
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):")


def add_scheme(scheme: str, resolver: SchemeResolver) -> None:
    """Make ``scheme:...`` references resolve to a local path through ``resolver``."""
    _SCHEMES[scheme.lower()] = resolver


def scheme_of(ref: "str | os.PathLike") -> str | None:
    """The URI scheme of ``ref`` (lower case), or None for a plain path."""
    m = _SCHEME.match(os.fspath(ref))
    return m.group(1).lower() if m else None


def is_local(ref: "str | os.PathLike") -> bool:
    """True for a path on this machine (or a ``file:`` URI); False for any other scheme."""
    return scheme_of(ref) in (None, "file")


def absolute(ref: "str | os.PathLike", relative_to: Path | None) -> str:
    """``ref`` with a relative local path made absolute against ``relative_to``; URIs unchanged."""
    text = os.fspath(ref)
    if not is_local(text) or relative_to is None or scheme_of(text) == "file":
        return text
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else relative_to / path)


def _resolver(scheme: str) -> SchemeResolver | None:
    """The scheme's resolver: added at run time, else loaded from its entry point; None when unknown."""
    if scheme not in _SCHEMES:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name.lower() == scheme:
                try:
                    _SCHEMES[scheme] = ep.load()
                except ImportError as exc:
                    raise TaskVecError(f"the {scheme}: reference scheme cannot be loaded ({exc})") from None
                break
    return _SCHEMES.get(scheme)


def resolve_path(ref: "str | os.PathLike", relative_to: Path | None = None) -> Path:
    """The local path behind a reference; raises TaskVecError when there is none."""
    text = os.fspath(ref)
    scheme = scheme_of(text)
    if scheme == "file":
        path = Path(unquote(urlparse(text).path))
    elif scheme is not None:
        resolver = _resolver(scheme)
        if resolver is None:
            raise TaskVecError(f"{text}: unsupported reference scheme {scheme!r} (use a local path)")
        return resolver(text)
    else:
        path = Path(absolute(text, relative_to))
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
    if is_local(ref):
        return open_checkpoint(path)
    try:
        ckpt = open_checkpoint(path)
    except TaskVecError as exc:  # name what the user gave, not the download cache's folder
        raise TaskVecError(str(exc).replace(str(path), os.fspath(ref))) from None
    ckpt.source = os.fspath(ref)  # and so do later messages about it
    return ckpt


def load_vector(ref, relative_to: Path | None = None, base=None) -> TaskVector:
    """Open the task vector a reference points at (lazily); ``base`` for a LoRA adapter."""
    return TaskVector.load(open_reference(ref, relative_to, base))
