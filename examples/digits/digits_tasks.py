"""A small image model and a family of tasks on scikit-learn's bundled digits.

As in the task-arithmetic paper, the classification heads are frozen and only
the encoder is fine-tuned, so task vectors live in the encoder's weights:
- ``digits``: the 8x8 digits as they are (pre-training task of the base);
- ``rotate``, ``flip``, ``invert``: transformed digits, the same ten labels;
- ``parity``: odd or even, through a head of its own (frozen at its random init);
- ``flip_invert``: flipped and inverted (the analogy's "B");
- ``rotate_invert``: rotated and inverted, never trained on: the analogy's target,
  reached by ``rotate + (flip_invert - flip)``.

Everything is deterministic given the seed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

TASKS = ("digits", "rotate", "flip", "invert", "parity", "flip_invert", "rotate_invert")
HIDDEN = 128


def _transform(images: np.ndarray, task: str) -> np.ndarray:
    if task in ("rotate", "rotate_invert"):
        images = np.rot90(images, k=1, axes=(1, 2))
    if task in ("flip", "flip_invert"):
        images = images[:, :, ::-1]
    if task in ("invert", "rotate_invert", "flip_invert"):
        images = 1.0 - images
    return np.ascontiguousarray(images)


def load_task(task: str, split: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of ``task`` for ``split`` in train / validation / test (60/20/20)."""
    from sklearn.datasets import load_digits

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    data = load_digits()
    images = data.images.astype(np.float32) / 16.0
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n = len(order)
    bounds = {"train": (0, int(0.6 * n)), "validation": (int(0.6 * n), int(0.8 * n)), "test": (int(0.8 * n), n)}
    if split not in bounds:
        raise ValueError(f"unknown split {split!r}")
    lo, hi = bounds[split]
    idx = order[lo:hi]
    x = _transform(images[idx], task).reshape(len(idx), 64)
    y = labels[idx] % 2 if task == "parity" else labels[idx]
    return torch.from_numpy(x), torch.from_numpy(y)


def head_of(task: str) -> str:
    return "parity" if task == "parity" else "digits"


class DigitsNet(nn.Module):
    """An MLP encoder with one frozen linear head per label space."""

    def __init__(self, hidden: int = HIDDEN):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleDict({"digits": nn.Linear(hidden, 10), "parity": nn.Linear(hidden, 2)})

    def forward(self, x: torch.Tensor, task: str = "digits") -> torch.Tensor:
        return self.heads[head_of(task)](self.encoder(x.reshape(len(x), 64)))


def build_model(seed: int = 0, hidden: int = HIDDEN) -> DigitsNet:
    """The architecture's factory (what a checkpoint-kind model names to rebuild it)."""
    torch.manual_seed(seed)
    return DigitsNet(hidden)


def train(model: DigitsNet, task: str, steps: int = 300, lr: float = 1e-3, encoder_only: bool = True, seed: int = 0) -> DigitsNet:
    """Full-batch Adam on the task's training split; heads frozen when ``encoder_only``."""
    torch.manual_seed(seed)
    x, y = load_task(task, "train", seed)
    params = model.encoder.parameters() if encoder_only else model.parameters()
    opt = torch.optim.Adam(params, lr=lr)
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


def load_weights(state_dict: dict[str, torch.Tensor], hidden: int = HIDDEN) -> DigitsNet:
    model = DigitsNet(hidden)
    model.load_state_dict(state_dict)
    return model.eval()
