"""Fast PaLM: the reference model (``palm_fast.reference.PaLM``) with fused blocks and the fast
final LayerNorm. Same parameters, state_dict, initialisation (for the same seed), tied
embeddings, z-loss ``loss()`` and ``generate()``."""
from __future__ import annotations

import torch
import torch.nn as nn

from palm_fast.config import PaLMConfig
from palm_fast.reference import model as _reference

from .block import RECOMPUTE, ParallelBlock
from .layer_norm import LayerNorm

__all__ = ["PaLM"]


class PaLM(_reference.PaLM):
    """Decoder-only PaLM ``tokens [B, T] -> logits [B, T, V]`` on the fast block.

    ``recompute``: "none" | "attention" (recompute every block's attention forward in the
    backward) | "full" (recompute each whole block): ``torch.utils.checkpoint`` in training
    (grad enabled, no KV cache), gradients unchanged.
    """

    def __init__(self, config: PaLMConfig, recompute: str = "none"):
        if recompute not in RECOMPUTE:
            raise ValueError(f"recompute: expected one of {RECOMPUTE}, got {recompute!r}")
        super().__init__(config)   # builds and initialises the reference layers (same RNG use)
        self.blocks = nn.ModuleList(ParallelBlock.from_reference(b, recompute=recompute)
                                    for b in self.blocks)
        norm = LayerNorm(config.d_model, config.eps, device="meta")
        norm.weight = self.norm.weight
        self.norm = norm

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference init (embedding N(0, 1), dense N(0, n_in^-0.5)); LayerNorm weights 1,
        the fast LayerNorms included."""
        super().reset_parameters()
        for m in self.modules():
            if isinstance(m, LayerNorm):
                m.weight.fill_(1.0)

    @property
    def recompute(self) -> str:
        return self.blocks[0].recompute if len(self.blocks) else "none"

    @recompute.setter
    def recompute(self, value: str) -> None:
        for b in self.blocks:
            b.recompute = value
