"""Fast ``RotaryEmbedding``: the reference module (constructor, persistent fp32 buffer
``inv_freq`` kept fp32 through ``.to(dtype)``, state_dict) with its forward on the fused
``palm_fast.ops.rope`` (one kernel for q and k)."""
from __future__ import annotations

import torch

from palm_fast.ops._checks import as_fp32
from palm_fast.ops.rope import rope
from palm_fast.reference import layers as _reference

__all__ = ["RotaryEmbedding"]


class RotaryEmbedding(_reference.RotaryEmbedding):
    """Rotary position embedding of q ``[B, T, H, D]`` and k ``[B, T, Hk, D]``.

    ``RotaryEmbedding(rotary_dim, base=10000.0, interleaved=False)``; ``rotary_dim`` may be
    smaller than the head dim (the rest passes through). ``forward(q, k, positions=None,
    offsets=None) -> (q_rot, k_rot)``.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None,
                offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # (.float(): a checkpoint loaded with assign=True may hold the buffer in another
        # dtype; the reference computes its angles in fp32 from whatever it holds)
        return rope(q, k, positions=positions, offsets=offsets, inv_freq=as_fp32(self.inv_freq),
                    interleaved=self.interleaved)
