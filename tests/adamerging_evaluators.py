"""Evaluators for the AdaMerging tests, on the digits example's tasks.

``guarded`` hands out a split's inputs freely, but its labels only for the test
split: reading any other split's labels raises, and every read is recorded in
``LABEL_READS``, so a test can prove that learning never looked at a label.
"""

from __future__ import annotations

import digits_tasks
import torch

LABEL_READS: list[tuple[str, str]] = []


class LabelsTouched(RuntimeError):
    pass


def labels(task: str, split: str) -> torch.Tensor:
    LABEL_READS.append((task, split))
    if split != "test":
        raise LabelsTouched(f"the {split} labels of {task} were read")
    return digits_tasks.load_task(task, split)[1]


def inputs(task: str, split: str) -> torch.Tensor:
    return digits_tasks.load_task(task, split)[0]


@torch.no_grad()
def guarded(model, task: str, split: str) -> dict[str, float]:
    x = inputs(task, split)
    model.eval()
    return {"accuracy": float((model(x, task).argmax(1) == labels(task, split)).float().mean())}


def _unlabeled(task: str, split: str):
    yield (inputs(task, split), task)


guarded.unlabeled = _unlabeled


def no_batches(model, task: str, split: str) -> dict[str, float]:
    return digits_tasks.evaluate(model, task, split)


no_batches.unlabeled = lambda task, split: iter(())
