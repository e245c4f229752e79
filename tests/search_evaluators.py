"""Evaluators whose best coefficients are known in closed form (for the search tests).

A composite of one task vector is ``base + s * w * tau``. These evaluators read
the coefficient ``c = <weights - base, tau> / <tau, tau>`` back from the model's
weights and score it, so the test knows which candidate must win.
``TASKVEC_TEST_BASE`` and ``TASKVEC_TEST_DIRECTION`` name safetensors files of the
base's and the vector's tensors.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

# peaked: accuracy is 1 - (c - peak)^2, with its peak elsewhere on each split.
PEAKS = {"validation": 0.35, "test": 0.5}


def coefficient(model: torch.nn.Module) -> float:
    base = load_file(os.environ["TASKVEC_TEST_BASE"])
    direction = load_file(os.environ["TASKVEC_TEST_DIRECTION"])
    state = model.state_dict()
    num = sum(float(((state[n].double() - base[n].double()) * d.double()).sum()) for n, d in direction.items())
    den = sum(float((d.double() ** 2).sum()) for d in direction.values())
    return num / den


def peaked(model, task: str, split: str) -> dict[str, float]:
    return {"accuracy": 1.0 - (coefficient(model) - PEAKS[split]) ** 2}


def forgetting(model, task: str, split: str) -> dict[str, float]:
    """``target`` loses accuracy as ``c`` goes negative; ``control`` holds until c = -0.62, then falls."""
    c = coefficient(model)
    if task == "target":
        return {"accuracy": min(1.0, max(0.0, 0.9 + c))}
    if task == "control":
        return {"accuracy": 1.0 - max(0.0, -c - 0.62)}
    raise ValueError(f"unknown task {task!r}")


def lifting(model, task: str, split: str) -> dict[str, float]:
    """``target`` gains 0.5 per unit of ``c`` from 0.3; ``control`` holds until c = 0.62, then falls."""
    c = coefficient(model)
    if task == "target":
        return {"accuracy": min(1.0, max(0.0, 0.3 + 0.5 * c))}
    if task == "control":
        return {"accuracy": 1.0 - max(0.0, c - 0.62)}
    raise ValueError(f"unknown task {task!r}")


def broken(model, task: str, split: str) -> dict[str, float]:
    raise RuntimeError("the evaluation data is missing")


def stops_itself(model, task: str, split: str) -> dict[str, float]:
    """Sends its own process SIGTERM (what ``kill`` or a CI timeout does), deterministically mid-trial."""
    import signal

    os.kill(os.getpid(), signal.SIGTERM)
    return {"accuracy": 0.0}


def weight_norm(model, task: str, split: str) -> dict[str, float]:
    """Scores a model by its weights alone, no data: for tests that need a search to run, not its figures."""
    squares = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters())
    return {"accuracy": 1.0 / (1.0 + squares)}
