"""Fast ``RotaryEmbedding``: the reference module's constructor, buffer and forward on top
of the fused ``palm_fast.ops.rope`` (one kernel for q and k)."""
from __future__ import annotations

import torch
from torch import nn

from palm_fast.ops.rope import rope
from palm_fast.reference.functional import rope_inv_freq


class RotaryEmbedding(nn.Module):
    """Rotary position embedding of q ``[B, T, H, D]`` and k ``[B, T, Hk, D]``.

    Same constructor and persistent buffer ``inv_freq`` (fp32, ``[rotary_dim / 2]``) as
    ``palm_fast.reference.layers.RotaryEmbedding``, so state_dicts load either way.
    ``rotary_dim`` may be smaller than the head dim (the rest passes through).
    """

    def __init__(self, rotary_dim: int, base: float = 10000.0, interleaved: bool = False):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.base = base
        self.interleaved = interleaved
        self.register_buffer("inv_freq", rope_inv_freq(rotary_dim, base), persistent=True)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None,
                offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return rope(q, k, positions=positions, offsets=offsets, inv_freq=self.inv_freq,
                    interleaved=self.interleaved)

    def extra_repr(self) -> str:
        return f"rotary_dim={self.rotary_dim}, base={self.base}, interleaved={self.interleaved}"
