"""A small image model and a family of tasks on scikit-learn's bundled digits.

As in the task-arithmetic paper, the classification heads are frozen and only
the encoder is fine-tuned, so task vectors live in the encoder's weights. Here
the heads are never trained at all: each label space has a fixed random head
(rows of one random orthonormal matrix, centred, so different heads read
orthogonal directions of the embedding when ``hidden`` is at least 19). The
encoder ends in a linear layer, like CLIP's projection: the embedding is not
clipped by a ReLU.

A task is a label space, optionally on transformed images, named
``[transform_]labels`` with transforms ``rotate``, ``flip``, ``invert`` and
labels ``digits`` (0-9), ``parity`` (odd), ``large`` (>= 5), ``mod3`` and
``loop`` (0, 6, 8, 9: digits with a closed loop). ``digits`` may be left out:
``rotate`` is ``rotate_digits``. Examples:
- ``digits``: the base's pre-training task;
- ``parity``, ``large``, ``mod3``, ``loop``: new label spaces on plain digits
  (the addition result);
- ``flip_parity``: parity of flipped digits; with ``rotate`` and ``flip`` it
  gives ``rotate_parity`` with no training data of its own:
  ``rotate + (flip_parity - flip)`` (the analogy result).

Everything is deterministic given the seed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

TRANSFORMS = ("rotate", "flip", "invert")
LOOPED = (0, 6, 8, 9)
LABELS = {"digits": 10, "parity": 2, "large": 2, "mod3": 3, "loop": 2}
HIDDEN = 256
HEAD_GAIN = 3.0
SPLITS = {"train": (0.0, 0.6), "validation": (0.6, 0.8), "test": (0.8, 1.0)}


def parse_task(task: str) -> tuple[str | None, str]:
    """``(transform or None, labels)`` of a task name; ``ValueError`` on an unknown one."""
    transform, underscore, labels = task.rpartition("_")
    if not underscore and labels in TRANSFORMS:
        transform, labels = labels, "digits"
    if (underscore and transform not in TRANSFORMS) or labels not in LABELS:
        raise ValueError(
            f"unknown task {task!r}: expected [transform_]labels with transform in {', '.join(TRANSFORMS)}"
            f" and labels in {', '.join(LABELS)}"
        )
    return transform or None, labels


def _transform(images: np.ndarray, transform: str | None) -> np.ndarray:
    if transform == "rotate":
        images = np.rot90(images, k=1, axes=(1, 2))
    elif transform == "flip":
        images = images[:, :, ::-1]
    elif transform == "invert":
        images = 1.0 - images
    return np.ascontiguousarray(images)


def _labels(digits: np.ndarray, labels: str) -> np.ndarray:
    if labels == "parity":
        return digits % 2
    if labels == "large":
        return (digits >= 5).astype(np.int64)
    if labels == "mod3":
        return digits % 3
    if labels == "loop":
        return np.isin(digits, LOOPED).astype(np.int64)
    return digits


def load_task(task: str, split: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of ``task`` for ``split`` in train / validation / test (60/20/20)."""
    from sklearn.datasets import load_digits

    transform, labels = parse_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    data = load_digits()
    images = data.images.astype(np.float32) / 16.0
    order = np.random.default_rng(seed).permutation(len(data.target))
    lo, hi = (int(f * len(order)) for f in SPLITS[split])
    idx = order[lo:hi]
    x = _transform(images[idx], transform).reshape(len(idx), 64)
    return torch.from_numpy(x), torch.from_numpy(_labels(data.target[idx].astype(np.int64), labels))


def head_of(task: str) -> str:
    return parse_task(task)[1]


def _random_heads(hidden: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One ``(classes, hidden)`` weight per label space: disjoint rows of a random
    orthogonal matrix, centred over the classes, times ``HEAD_GAIN``."""
    size = max(hidden, sum(LABELS.values()))
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator))
    heads, start = {}, 0
    for name, classes in LABELS.items():
        w = q[:hidden, start : start + classes].T
        heads[name] = (w - w.mean(0, keepdim=True)) * HEAD_GAIN
        start += classes
    return heads


class DigitsNet(nn.Module):
    """A two-layer MLP encoder (ReLU, then a linear embedding) and one frozen head per label space."""

    def __init__(self, hidden: int = HIDDEN, seed: int = 0):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.heads = nn.ModuleDict()
        for name, weight in _random_heads(hidden, torch.Generator().manual_seed(seed)).items():
            head = nn.Linear(hidden, len(weight))
            with torch.no_grad():
                head.weight.copy_(weight)
                head.bias.zero_()
            self.heads[name] = head.requires_grad_(False)

    def forward(self, x: torch.Tensor, task: str = "digits") -> torch.Tensor:
        return self.heads[head_of(task)](self.encoder(x.reshape(len(x), 64)))


def build_model(seed: int = 0, hidden: int = HIDDEN) -> DigitsNet:
    """The architecture's factory (what a checkpoint-kind model names to rebuild it)."""
    torch.manual_seed(seed)
    return DigitsNet(hidden, seed)


def train(model: DigitsNet, task: str, steps: int = 100, lr: float = 1e-3, seed: int = 0) -> DigitsNet:
    """Full-batch Adam on the task's training split; only the encoder learns.

    ``seed`` drives torch's randomness only: the train/validation/test split is
    always the one ``evaluate`` reads."""
    torch.manual_seed(seed)
    x, y = load_task(task, "train")
    opt = torch.optim.Adam(model.encoder.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x, task), y)
        loss.backward()
        opt.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: DigitsNet, task: str, split: str = "test", seed: int = 0) -> float:
    x, y = load_task(task, split, seed)
    model.eval()
    return float((model(x, task).argmax(1) == y).float().mean())


def evaluate(model: DigitsNet, task: str, split: str = "test") -> dict[str, float]:
    """The evaluator protocol: ``(model, task, split) -> {metric: value}``."""
    return {"accuracy": accuracy(model, task, split)}


def unlabeled(task: str, split: str = "validation"):
    """The evaluator's unlabeled inputs (what ``search`` strategy ``adamerging`` learns from):
    one batch, the arguments of the model's forward, ``(images, task)``; the labels stay here."""
    x, _ = load_task(task, split)
    yield (x, task)


evaluate.unlabeled = unlabeled


def load_weights(state_dict: dict[str, torch.Tensor], hidden: int = HIDDEN) -> DigitsNet:
    model = DigitsNet(hidden)
    model.load_state_dict(state_dict)
    return model.eval()
