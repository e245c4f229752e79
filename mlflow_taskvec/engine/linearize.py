"""A module's first-order Taylor model around its base weights (Ortiz-Jimenez et al.,
"Task Arithmetic in the Tangent Space", NeurIPS 2023, arXiv 2305.12827):

    f_lin(x; w) = f(x; b) + J_f(x; b) (w - b)

Fine-tuning ``f_lin`` instead of ``f`` ("linearized fine-tuning") moves the weights only
in the tangent space at the base, which the paper shows makes task vectors more
weight-disentangled: their sum predicts, on each task, what that task's vector alone
does. The product ``J_f(b) (w - b)`` is one forward-mode pass (``torch.func.jvp``), never
the Jacobian itself.

``linearize(module)`` returns a ``Linearized`` module that wraps ``module``: its weights
``w`` stay ``module``'s own parameters (what an optimizer trains, what a checkpoint of
``linearized.model`` saves, under the module's own names), and the base ``b`` is the
weights ``module`` had when it was linearized, kept as one detached tensor per
parameter. A task vector of a linearized fine-tune is ``w - b`` like any other; a
composite of such vectors is ``b + sum_i a_i t_i``, evaluated in the linearized model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

MODEL_PREFIX = "model."  # the wrapped module's names inside a Linearized's state dict


class Linearized(nn.Module):
    """``f(x; b) + J_f(x; b) (w - b)``, with ``w`` the parameters of ``self.model``."""

    def __init__(self, model: nn.Module, base: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.model = model
        params = dict(model.named_parameters())
        source = base if base is not None else {n: p for n, p in params.items()}
        missing = [n for n in params if n not in source]
        if missing:
            raise ValueError(f"the base weights have no tensor {missing[0]!r} of the module")
        # b: a detached copy of each parameter (w starts equal to it); not in the state dict
        self._base = {n: source[n].detach().to(params[n].dtype).clone() for n in params}

    @property
    def base(self) -> dict[str, torch.Tensor]:
        """The weights the model is linearized around."""
        return dict(self._base)

    def _apply(self, fn, recurse=True):  # .to(device) / .double() move the base along
        super()._apply(fn, recurse)
        self._base = {n: fn(t) for n, t in self._base.items()}
        return self

    def forward(self, *args, **kwargs):
        names = list(self._base)
        weights = dict(self.model.named_parameters())
        primals = tuple(self._base[n] for n in names)
        tangents = tuple(weights[n] - self._base[n] for n in names)

        def at(*values):
            return torch.func.functional_call(self.model, dict(zip(names, values)), args, kwargs)

        out, change = torch.func.jvp(at, primals, tangents)
        return _add(out, change)


def _add(out, change):
    """``out + change`` for a tensor, or each tensor of a tuple, list or dict output."""
    if isinstance(out, torch.Tensor):
        return out + change if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_add(o, c) for o, c in zip(out, change))
    if isinstance(out, dict):
        return type(out)({k: _add(v, change[k]) for k, v in out.items()})
    return out


def linearize(module: nn.Module, base: Mapping[str, torch.Tensor] | None = None) -> Linearized:
    """The first-order Taylor model of ``module`` around ``base`` (default: its current weights).

    ``module`` is wrapped, not copied: its parameters are the linearized model's weights
    ``w`` (set them to ``base`` first when ``base`` is given and they differ, or train them)."""
    return Linearized(module, base)
