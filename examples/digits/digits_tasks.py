"""A small image model and a family of tasks on scikit-learn's bundled digits.

As in the task-arithmetic paper, the classification heads are frozen and only
the encoder is fine-tuned, so task vectors live in the encoder's weights. Here
the heads are never trained at all: each label space has a fixed random head
(rows of one random orthonormal matrix, centred, so different heads read
orthogonal directions of the embedding when ``hidden`` is at least 49). As in
CLIP, the logits are cosine similarities: the encoder's embedding (a linear
layer, not clipped by a ReLU) is normalized to unit length and scaled by
``LOGIT_SCALE`` before the head reads it, so a model cannot grow confident by
growing its embedding (what AdaMerging's entropy objective would otherwise
reward).

A task is a label space, optionally on transformed images, named
``[transform_]labels`` with transforms ``rotate``, ``flip``, ``invert`` and
labels ``digits`` (0-9), ``parity`` (odd), ``large`` (>= 5), ``mod3`` and
``loop`` (0, 6, 8, 9: digits with a closed loop). ``digits`` may be left out:
``rotate`` is ``rotate_digits``. The ten digits of a transformed image are a
label space of their own (``rotate``, ``flip``, ``invert``: a head each, like
the separate datasets of the field's benchmark); the other label spaces share
one head across transforms. Examples:
- ``digits``: the base's pre-training task;
- ``parity``, ``large``, ``mod3``, ``loop``: new label spaces on plain digits
  (the addition result);
- ``flip_parity``: parity of flipped digits; with ``rotate`` and ``flip`` it
  gives ``rotate_parity`` with no training data of its own:
  ``rotate + (flip_parity - flip)`` (the analogy result);
- ``rotate_mod3``: the eighth task of the leaderboard.

Everything is deterministic given the seed.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from mlflow_taskvec.engine.linearize import linearize

TRANSFORMS = ("rotate", "flip", "invert")
LOOPED = (0, 6, 8, 9)
LABELS = {"digits": 10, "parity": 2, "large": 2, "mod3": 3, "loop": 2}
# the heads, in the order their rows are drawn: the label spaces, then the transformed digits
HEADS = {**LABELS, **{t: 10 for t in TRANSFORMS}}
HIDDEN = 256
LOGIT_SCALE = 10.0
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


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (images in [0, 1], labels), read once per process (a search
    evaluates every candidate on every task)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images, target = data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)
    images.flags.writeable = target.flags.writeable = False
    return images, target


def load_task(task: str, split: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of ``task`` for ``split`` in train / validation / test (60/20/20)."""
    transform, labels = parse_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    images, target = _digits()
    order = np.random.default_rng(seed).permutation(len(target))
    lo, hi = (int(f * len(order)) for f in SPLITS[split])
    idx = order[lo:hi]
    x = _transform(images[idx], transform).reshape(len(idx), 64)
    return torch.from_numpy(x), torch.from_numpy(_labels(target[idx], labels))


def head_of(task: str) -> str:
    """The head a task reads: its label space, or its transform for the digits of transformed images."""
    transform, labels = parse_task(task)
    return transform if transform and labels == "digits" else labels


def _random_heads(hidden: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One ``(classes, hidden)`` weight per head: disjoint rows of a random
    orthogonal matrix, centred over the classes."""
    size = max(hidden, sum(HEADS.values()))
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator))
    heads, start = {}, 0
    for name, classes in HEADS.items():
        w = q[:hidden, start : start + classes].T
        heads[name] = w - w.mean(0, keepdim=True)
        start += classes
    return heads


@functools.lru_cache(maxsize=8)
def _heads(hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """``_random_heads`` of a seed, drawn once per process (a search builds a model per candidate)."""
    return _random_heads(hidden, torch.Generator().manual_seed(seed))


class DigitsNet(nn.Module):
    """A two-layer MLP encoder (ReLU, then a linear embedding) and one frozen head per label space,
    reading the unit-length embedding times ``LOGIT_SCALE``."""

    def __init__(self, hidden: int = HIDDEN, seed: int = 0):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.heads = nn.ModuleDict()
        for name, weight in _heads(hidden, seed).items():
            head = nn.Linear(hidden, len(weight))
            with torch.no_grad():
                head.weight.copy_(weight)
                head.bias.zero_()
            self.heads[name] = head.requires_grad_(False)

    def forward(self, x: torch.Tensor, task: str = "digits") -> torch.Tensor:
        embedding = nn.functional.normalize(self.encoder(x.reshape(len(x), 64)), dim=1)
        return self.heads[head_of(task)](embedding * LOGIT_SCALE)


def build_model(seed: int = 0, hidden: int = HIDDEN) -> DigitsNet:
    """The architecture's factory (what a checkpoint-kind model names to rebuild it)."""
    torch.manual_seed(seed)
    return DigitsNet(hidden, seed)


OPTIMIZERS = ("adam", "sgd")
MODES = ("standard", "linear")


def train(model: DigitsNet, task: str, steps: int = 100, lr: float = 1e-3, seed: int = 0, optimizer: str = "adam",
          mode: str = "standard") -> DigitsNet:
    """Full-batch training on the task's training split; only the encoder learns.

    ``mode``: ``standard``, or ``linear``: the loss is the first-order Taylor model's around
    the weights ``model`` starts from (``mlflow_taskvec.linearize``: ``f(x; b) + J(b)(w - b)``),
    as the tangent-space fine-tunes of arXiv 2305.12827; the weights ``w`` it learns are
    ``model``'s, and are meant for that linearized model (``linearized``).

    ``optimizer``: ``adam`` (pre-training) or ``sgd`` (with momentum 0.9: the
    example's fine-tunes, whose updates stay in the few directions the task's
    gradients span, as fine-tuning a large model's does). ``seed`` drives torch's
    randomness only: the train/validation/test split is always the one
    ``evaluate`` reads."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r} (known: {', '.join(OPTIMIZERS)})")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    torch.manual_seed(seed)
    x, y = load_task(task, "train")
    forward = linearize(model) if mode == "linear" else model
    params = list(model.encoder.parameters())
    step = torch.optim.Adam(params, lr=lr).step if optimizer == "adam" else _momentum_sgd(params, lr)
    model.train()
    for _ in range(steps):
        for p in params:
            p.grad = None
        loss = nn.functional.cross_entropy(forward(x, task), y)
        loss.backward()
        step()
    model.eval()
    return model


def linearized(model: DigitsNet, base: DigitsNet) -> nn.Module:
    """A linear fine-tune ``model`` as it was trained: linearized around ``base``'s weights."""
    return linearize(model, dict(base.named_parameters())).eval()


def _momentum_sgd(params: list[torch.Tensor], lr: float, momentum: float = 0.9):
    """``torch.optim.SGD(params, lr, momentum)``'s update, the same arithmetic in the same order,
    written out: constructing a torch optimizer imports torch's compiler (seconds per process)."""
    buffers: list[torch.Tensor | None] = [None] * len(params)

    @torch.no_grad()
    def step() -> None:
        for i, p in enumerate(params):
            buffers[i] = p.grad.clone() if buffers[i] is None else buffers[i].mul_(momentum).add_(p.grad)
            p.add_(buffers[i], alpha=-lr)

    return step


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
