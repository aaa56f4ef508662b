"""Fast SwiGLU modules, state_dict-compatible with ``palm_fast.reference.layers``."""
from __future__ import annotations

import torch
from torch import nn

from palm_fast.ops.swiglu import swiglu

__all__ = ["SwiGLU", "SwiGLUMLP"]


class SwiGLU(nn.Module):
    """SwiGLU activation: ``x [..., 2F]`` (value | gate) -> ``silu(gate) * value`` ``[..., F]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x)


class SwiGLUMLP(nn.Module):
    """PaLM's MLP: ``w_out(SwiGLU(w_in(x)))`` with bias-free ``w_in: dim -> 2 hidden``
    (value | gate) and ``w_out: hidden -> dim``; same parameters as the reference."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.act = SwiGLU()
        self.w_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(self.act(self.w_in(x)))
