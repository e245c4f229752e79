"""The table every stored layout writes, and the checks its readers share.

A file in a stored layout (``taskvec.layout`` in its metadata: ``lowrank``,
``sparse``, ``bitdelta``) lists in ``taskvec.layout_tensors`` every tensor of the
vector it stands for: ``{name: {"dtype": "F32", "shape": [m, n], "encoding": ...,
...}}``; its stored tensors are named ``<tensor>/<part>``. A reader checks the
table and every part's dtype and shape before any value is used, and refuses a
stored tensor that no entry claims, so a tampered file ends in one line naming
what is wrong, never in wrong weights.
"""

from __future__ import annotations

import json
import math

from mlflow_taskvec.engine import metadata as meta_keys
from mlflow_taskvec.engine.checkpoint import SafetensorsCheckpoint
from mlflow_taskvec.engine.io import DTYPE_BY_CODE, TensorSpec
from mlflow_taskvec.errors import TaskVecError

# A dense tensor of more entries than this (8 TB of float64) is a corrupt table, not a model.
MAX_ENTRIES = 2**40


def part_name(name: str, part: str) -> str:
    return f"{name}/{part}"


def layout_table(ckpt: SafetensorsCheckpoint, key: str = meta_keys.LAYOUT_TENSORS) -> dict[str, dict]:
    """The JSON object under metadata ``key``; raises one line when it is missing or not an object of objects."""
    try:
        table = json.loads(ckpt.metadata()[key])
    except (KeyError, json.JSONDecodeError):
        raise TaskVecError(f"{ckpt.source}: corrupt {layout_name(ckpt)} task vector: its {key} metadata is missing or not JSON") from None
    if not isinstance(table, dict) or not all(isinstance(e, dict) for e in table.values()):
        raise TaskVecError(f"{ckpt.source}: corrupt {layout_name(ckpt)} task vector: its {key} metadata is not an object of objects")
    return table


def layout_name(ckpt: SafetensorsCheckpoint) -> str:
    return ckpt.metadata().get(meta_keys.LAYOUT, "dense")


def corrupt(ckpt: SafetensorsCheckpoint, name: str, problem: str) -> TaskVecError:
    return TaskVecError(f"{ckpt.source}: corrupt {layout_name(ckpt)} task vector: tensor {name!r} {problem}")


def entry_shape(ckpt: SafetensorsCheckpoint, name: str, entry: dict) -> tuple[int, ...]:
    """The entry's ``shape``: a list of whole numbers >= 0 with a plausible number of entries."""
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise corrupt(ckpt, name, f"has shape {shape!r}, not a list of whole numbers >= 0")
    if math.prod(shape) > MAX_ENTRIES:
        raise corrupt(ckpt, name, f"has shape {shape}, {math.prod(shape):.3g} entries (more than {MAX_ENTRIES:.3g})")
    return tuple(shape)


def entry_spec(ckpt: SafetensorsCheckpoint, name: str, entry: dict) -> TensorSpec:
    """The dense tensor an entry stands for: its ``dtype`` (a floating-point safetensors code) and shape."""
    code = entry.get("dtype")
    dtype = DTYPE_BY_CODE.get(code) if isinstance(code, str) else None
    if dtype is None or not dtype.is_floating_point:
        raise corrupt(ckpt, name, f"has dtype {code!r}, not a floating-point safetensors dtype")
    return TensorSpec(dtype, entry_shape(ckpt, name, entry))


def entry_int(ckpt: SafetensorsCheckpoint, name: str, entry: dict, key: str, low: int, high: int) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise corrupt(ckpt, name, f"has {key} {value!r}, not a whole number in [{low}, {high}]")
    return value


def entry_number(ckpt: SafetensorsCheckpoint, name: str, entry: dict, key: str) -> float:
    value = entry.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise corrupt(ckpt, name, f"has {key} {value!r}, not a finite number")
    return float(value)


def check_part(ckpt: SafetensorsCheckpoint, name: str, part: str, shape: tuple[int, ...], dtypes) -> str:
    """The stored part ``<name>/<part>``, checked to exist with exactly ``shape`` and one of ``dtypes``."""
    key = part_name(name, part)
    if key not in ckpt:
        raise corrupt(ckpt, name, f"lacks its stored part {part!r}")
    got = ckpt.spec(key)
    if got.shape != tuple(shape) or got.dtype not in dtypes:
        want = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise corrupt(
            ckpt, name, f"has part {part!r} of shape {list(got.shape)} ({str(got.dtype).removeprefix('torch.')}), expected {list(shape)} ({want})"
        )
    return key


def refuse_unclaimed(ckpt: SafetensorsCheckpoint, claimed: set[str]) -> None:
    """Refuse stored tensors that no entry of the table accounts for."""
    extra = sorted(set(ckpt.keys()) - claimed)
    if extra:
        raise TaskVecError(
            f"{ckpt.source}: corrupt {layout_name(ckpt)} task vector: stored tensor {extra[0]!r} belongs to no entry of its {meta_keys.LAYOUT_TENSORS}"
        )
