"""Reading YAML that a user wrote: bounded before it is built, and numbers as people write them.

``yaml.safe_load`` never runs code, but it still builds whatever the document
describes: a few lines of nested aliases (a "billion laughs" document) are a small
graph for PyYAML and billions of values for anything that walks it (validation,
JSON, the digest). So the document is checked on PyYAML's event stream first, which
costs nothing to build: its size, its nesting depth, and the number of values it
expands to once every alias is followed. Only then is it loaded.

YAML 1.1 (PyYAML's dialect) reads ``1e-3`` as a string because it wants a dot in
a float; YAML 1.2 and every user read it as a number, and so do we.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from mlflow_taskvec.errors import TaskVecError

MAX_BYTES = 1 << 20
MAX_DEPTH = 50
MAX_VALUES = 100_000


class _Loader(yaml.SafeLoader):
    """SafeLoader, plus floats in exponent notation without a dot (``1e-3``, ``2E+6``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_limited(path: Path) -> str:
    """The text of a YAML file, refused past ``MAX_BYTES`` without reading it all."""
    with open(path, "rb") as fh:
        data = fh.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise TaskVecError(f"{path}: larger than {MAX_BYTES // 1024} KiB, which no recipe needs; refused unread")
    return data.decode("utf-8")


def _check_shape(text: str, source: str) -> None:
    """Refuse a document nested deeper than ``MAX_DEPTH`` or expanding to more than ``MAX_VALUES`` values."""
    expanded: dict[str, int] = {}  # anchor -> how many values it stands for
    open_anchors: set[str] = set()
    stack: list[list] = [[None, 0]]  # [anchor, values so far] per open collection; the root at the bottom

    def add(count: int) -> None:
        stack[-1][1] += count
        if stack[-1][1] > MAX_VALUES:
            raise TaskVecError(
                f"{source}: the YAML expands to more than {MAX_VALUES} values through its aliases (*name), which no recipe needs; refused before loading"
            )

    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(stack) > MAX_DEPTH:
                raise TaskVecError(f"{source}: the YAML is nested more than {MAX_DEPTH} levels deep, which no recipe needs; refused before loading")
            stack.append([event.anchor, 1])
            if event.anchor:
                open_anchors.add(event.anchor)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, count = stack.pop()
            if anchor:
                expanded[anchor] = count
                open_anchors.discard(anchor)
            add(count)
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor:
                expanded[event.anchor] = 1
            add(1)
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor in open_anchors:
                raise TaskVecError(f"{source}: the alias *{event.anchor} refers to a collection that contains it; a recipe cannot be recursive")
            add(expanded.get(event.anchor, 1))


def load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` once the document is known to be of a reasonable size.

    Raises TaskVecError for a document past the limits, ``yaml.YAMLError`` for one that is not YAML.
    """
    if len(text) > MAX_BYTES:
        raise TaskVecError(f"{source}: larger than {MAX_BYTES // 1024} KiB, which no recipe needs; refused unread")
    _check_shape(text, source)
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
