"""Fast SwiGLU modules, state_dict-compatible with ``palm_fast.reference.layers``."""
from __future__ import annotations

import torch
from torch import nn

from palm_fast.ops.swiglu import swiglu
from palm_fast.reference import layers as _reference

__all__ = ["SwiGLU", "SwiGLUMLP"]


class SwiGLU(nn.Module):
    """SwiGLU activation: ``x [..., 2F]`` (value | gate) -> ``silu(gate) * value`` ``[..., F]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x)


class SwiGLUMLP(_reference.SwiGLUMLP):
    """PaLM's MLP: ``w_out(SwiGLU(w_in(x)))`` with bias-free ``w_in: dim -> 2 hidden``
    (value | gate) and ``w_out: hidden -> dim``. The reference module with the fast
    activation: same parameters and state_dict."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(dim, hidden)
        self.act = SwiGLU()
