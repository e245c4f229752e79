"""Tiny real checkpoints shared by the CLI and recipe tests: a Llama-like layout
with an integer buffer, and seeded fine-tunes of it."""

from __future__ import annotations

import torch

SHAPES = {
    "model.embed.weight": (8, 4),
    "model.layers.0.attn.weight": (4, 4),
    "model.layers.0.mlp.weight": (6, 4),
    "model.layers.1.attn.weight": (4, 4),
    "model.layers.1.mlp.weight": (6, 4),
    "model.norm.weight": (4,),
}
INT_BUFFER = "model.position_ids"


def base_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    state[INT_BUFFER] = torch.arange(8, dtype=torch.int64).reshape(1, 8)
    return state


def finetune_state(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: t + 0.1 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t.clone()
        for name, t in base.items()
    }
