"""Merge methods: small pure functions over the tensors of one parameter name.

A method receives, for one chunk of one parameter (flattened), the task vectors'
entries ``deltas[i]`` (in the compute dtype; never modify them), their weights
``w_i``, and a ``MergeContext``; it returns the merged delta. The executor adds
it to the base: ``output = base + scale * merged``.

Each method declares its parameters as ``ParamSpec`` rows (name, type, default,
range); the recipe, ``validate_params``, ``mlflow-taskvec methods`` and
``search`` read them from there, and the executor never names a parameter.
A method that needs something computed over the *whole* tensor of each input
before its chunks are merged (the trim thresholds of ``ties``) declares a
``prepare`` pre-pass; its result, a list with one entry per input computed from that
input alone (the executor calls it for one input at a time, inputs in parallel),
reaches every chunk as ``ctx.prepared``.
A method that cannot work chunk by chunk at all (an SVD of a weight matrix)
declares ``whole_tensor``: ``True``, or a predicate ``(name, shape, params) -> bool``
choosing the tensors it needs whole; those reach it unflattened, in their shape,
one tensor at a time (the executor holds the T inputs of that tensor, never the model).
A method that needs whole rows of a matrix, and nothing wider (ranks per row), declares
``row_chunks``: the chunks of its 2-D tensors are cut at row boundaries (about
``CHUNK_ELEMENTS`` entries, whole rows), flat as usual, with ``ctx.shape`` the matrix's.
A method whose parameters constrain each other declares ``check(params)``,
called by ``validate_params`` after each parameter passed its own range; a method
that takes a fixed number of inputs declares ``inputs``.

Adding a method: one module in this package that defines it with ``@merge_method``
(every module here is imported when the package is), and a row in
``tests/test_methods.py``'s table.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from mlflow_taskvec.engine.streaming import CHUNK_ELEMENTS, keep_mask
from mlflow_taskvec.errors import TaskVecError

REQUIRED = object()  # a ParamSpec default: the parameter must be given


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a merge method: its type, default and valid range.

    ``low``/``high`` bound numbers (``low_open``/``high_open`` exclude the bound);
    ``searchable`` says whether ``search`` may sample it from that range.
    """

    name: str
    type: type
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    description: str = ""
    searchable: bool = True

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def search_bounds(self) -> tuple[float, float]:
        """The closed interval ``search`` samples from: the declared range, an open bound moved
        inward to the nearest float (so every sample is a valid value)."""
        low = math.nextafter(self.low, self.high) if self.low_open else self.low
        high = math.nextafter(self.high, self.low) if self.high_open else self.high
        return low, high

    def describe_range(self) -> str:
        if self.low is None and self.high is None:
            return ""
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{left}{low}, {high}{right}"

    def check(self, value: Any) -> Any:
        """``value`` converted to this parameter's type; raises TaskVecError naming it when invalid."""
        where = f"params.{self.name}"
        if self.type is list:
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TaskVecError(f"{where}: {value!r} must be a list of glob strings")
            return list(value)
        if self.type is float:
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
            kind = "a number"
        else:
            ok = not isinstance(value, bool) and isinstance(value, int)
            kind = "an integer"
        if not ok or not self._contains(value):
            raise TaskVecError(f"{where}: {value!r} must be {kind}{self._in_range()}")
        return float(value) if self.type is float else value

    def _in_range(self) -> str:
        text = self.describe_range()
        return f" in {text}" if text else ""

    def _contains(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True


@dataclass
class MergeContext:
    name: str
    start: int  # offset of this chunk in the flattened tensor
    numel: int  # size of the whole tensor
    params: dict
    prepared: Any = None  # what the method's ``prepare`` computed over the whole tensor
    shape: tuple[int, ...] = ()  # the whole tensor's shape
    whole_tensor: bool = False  # the deltas are whole tensors in ``shape`` (else flat chunks)
    base: torch.Tensor | None = None  # the base's entries matching the deltas, in the compute dtype
    device: torch.device | None = None  # where the chunk's tensors are

    def keep_mask(self, input_index: int, length: int, keep_probability, offset: int = 0) -> torch.Tensor:
        """Bernoulli(keep_probability) mask for entries [start + offset, start + offset + length) of
        input ``input_index`` (the seed is ``params['seed']``; see ``streaming.keep_mask``)."""
        seed = int(self.params.get("seed", 0))
        if isinstance(keep_probability, torch.Tensor):
            keep_probability = keep_probability.cpu()  # masks are drawn on the CPU
        mask = keep_mask(seed, input_index, self.name, self.start + offset, length, self.numel, keep_probability)
        return mask if self.device is None else mask.to(self.device)  # drawn on the CPU: the same masks everywhere


MethodFn = Callable[[list[torch.Tensor], list[float], MergeContext], torch.Tensor]
# prepare(name, numel, params, inputs, dtype): inputs[i]() yields (start, chunk) of input i, afresh, in order.
PrepareFn = Callable[[str, int, dict, list[Callable[[], Iterable[tuple[int, torch.Tensor]]]], torch.dtype], Any]
# whole_tensor(name, shape, params): whether the method needs tensor ``name`` whole.
WholeTensorFn = Callable[[str, tuple[int, ...], dict], bool]
# check(params): raise TaskVecError naming the parameters that do not fit together.
CheckFn = Callable[[dict], None]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn
    summary: str
    params: tuple[ParamSpec, ...] = ()
    prepare: PrepareFn | None = None  # a whole-tensor pre-pass over each input
    # base + scale * sum_i w_i t_i: the executor accumulates it term by term in one
    # buffer, with no per-vector temporaries.
    linear: bool = False
    paper: str | None = None  # arXiv id
    whole_tensor: bool | WholeTensorFn = False
    check: CheckFn | None = None  # a cross-parameter check, after each parameter's own
    inputs: int | None = None  # the exact number of task vectors it takes, when fixed
    search_scale: tuple[float, float] = (0.0, 1.0)  # the scale range ``search`` tries by default
    row_chunks: bool = False  # the chunks of a 2-D tensor hold whole rows

    def chunk_elements(self, shape: tuple[int, ...]) -> int:
        """How many entries one chunk of a tensor of ``shape`` holds (the last chunk may hold fewer):
        ``CHUNK_ELEMENTS``, or for ``row_chunks`` and a matrix the most whole rows within it (one row at least)."""
        if self.row_chunks and len(shape) == 2 and shape[1] > 0:
            return max(1, CHUNK_ELEMENTS // shape[1]) * shape[1]
        return CHUNK_ELEMENTS

    def takes_whole_tensor(self, name: str, shape: tuple[int, ...], params: dict) -> bool:
        if callable(self.whole_tensor):
            return bool(self.whole_tensor(name, tuple(shape), params))
        return bool(self.whole_tensor)

    def check_input_count(self, count: int) -> None:
        if self.inputs is not None and count != self.inputs:
            raise TaskVecError(f"method {self.name!r} merges exactly {self.inputs} task vectors, got {count}")

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def searchable_params(self) -> list[ParamSpec]:
        return [p for p in self.params if p.searchable and p.type in (float, int) and p.low is not None and p.high is not None]


METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    summary: str,
    params: Iterable[ParamSpec] = (),
    prepare: PrepareFn | None = None,
    linear: bool = False,
    paper: str | None = None,
    whole_tensor: bool | WholeTensorFn = False,
    check: CheckFn | None = None,
    inputs: int | None = None,
    search_scale: tuple[float, float] = (0.0, 1.0),
    row_chunks: bool = False,
):
    """Add the decorated function to the method catalogue under ``name``."""

    def deco(fn: MethodFn) -> MethodFn:
        METHODS[name] = MergeMethod(name, fn, summary, tuple(params), prepare, linear, paper, whole_tensor, check, inputs, search_scale, row_chunks)
        return fn

    return deco


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise TaskVecError(f"unknown merge method {name!r} (known: {', '.join(sorted(METHODS))})") from None


def validate_params(method: MergeMethod, params: dict) -> dict:
    """Check a method's parameters against its ``ParamSpec`` rows; returns them with defaults filled in."""
    names = method.param_names
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise TaskVecError(f"method {method.name!r} takes no parameter {unknown[0]!r} (accepted: {', '.join(sorted(names)) or 'none'})")
    out = {}
    for spec in method.params:
        if spec.name in params:
            out[spec.name] = spec.check(params[spec.name])
        elif spec.required:
            raise TaskVecError(f"method {method.name!r} needs parameter {spec.name!r}")
        else:
            out[spec.name] = spec.default
    if method.check is not None:
        method.check(out)
    return out


def _load_catalogue() -> None:
    """Import every module of this package: each adds its methods to ``METHODS``."""
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{module.name}")


_load_catalogue()
