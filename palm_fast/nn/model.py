"""Fast PaLM: the reference model (``palm_fast.reference.PaLM``) with fused blocks and the fast
final LayerNorm. Same parameters, state_dict, initialisation (for the same seed), tied
embeddings, z-loss ``loss()`` and ``generate()``. ``loss()`` runs the fused tied head +
cross-entropy + z-loss (``palm_fast.ops.lm_loss``): the logits are never returned there, so
no ``[tokens, vocab]`` gradient is materialised."""
from __future__ import annotations

import torch
import torch.nn as nn

from palm_fast.config import PaLMConfig
from palm_fast.ops._dispatch import autocast_changes_dtype, forward_replaced, parts_hooked
from palm_fast.ops.lm_loss import GradLink, embed_tokens, tied_lm_loss
from palm_fast.reference import model as _reference

from .block import RECOMPUTE, ParallelBlock
from .layer_norm import LayerNorm

__all__ = ["PaLM"]


def _plain_embedding(e: nn.Module) -> bool:
    """An ``nn.Embedding`` whose lookup is a plain gather: no hooks (the fused lookup does not
    call the module) and none of the options that change the lookup or its gradient."""
    return (type(e) is nn.Embedding and e.padding_idx is None and e.max_norm is None
            and not e.scale_grad_by_freq and not e.sparse
            and not parts_hooked(e))


class PaLM(_reference.PaLM):
    """Decoder-only PaLM ``tokens [B, T] -> logits [B, T, V]`` on the fast block.

    ``recompute``: "none" | "attention" (recompute every block's attention forward in the
    backward) | "full" (recompute each whole block): ``torch.utils.checkpoint`` in training
    (grad enabled, no KV cache), gradients unchanged. The fast attention keeps no T x T
    tensor (its backward recomputes the probabilities from a [B, T, H] log-sum-exp), and its
    output is saved for the output GEMM anyway: "attention" frees only that log-sum-exp
    while running the attention forward twice (attention-only rematerialisation, 6N + 16LHQT
    hardware FLOPs in ``palm_fast.flops``: Table 22's policy for 8B / 62B, not 540B's 7.5N);
    to save activation memory, use "full".
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

    @property
    def recompute(self) -> str:
        return self.blocks[0].recompute if len(self.blocks) else "none"

    @recompute.setter
    def recompute(self, value: str) -> None:
        for b in self.blocks:
            b.recompute = value

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """Next-token loss ``(total, ce, z)`` as the reference's (same math and checks), with
        the head, cross-entropy and z-loss fused (``tied_lm_loss``) on the CPU. On other devices
        the reference's loss runs (over the fast blocks): the fused loss has been measured on
        the CPU only, and the committed GPU figures were taken with the reference's loss.
        The reference's loss also runs when the model's own call would do more than the fused
        path: hooks on the model (or on every module), or a ``forward`` of a subclass or one
        set on the instance; and under an autocast region whose dtype is not the weights'
        (its head GEMM is then autocast's, as in the reference)."""
        if not isinstance(tokens, torch.Tensor) or tokens.device.type != "cpu" \
                or forward_replaced(self, PaLM) or parts_hooked(self) \
                or autocast_changes_dtype(self.embed.weight):
            return super().loss(tokens, targets)   # (which also names a bad argument)
        tokens, targets = self._loss_inputs(tokens, targets)
        self._check_tokens(tokens)   # (this path has no forward call to check them)
        c = self.config
        if tokens.shape[1] > c.max_seq_len:
            raise ValueError(f"tokens: 0 cached + {tokens.shape[1]} new tokens exceeds max_seq_len "
                             f"{c.max_seq_len}")
        if tokens.numel() == 0:
            raise ValueError(f"tokens: expected at least one token to predict, got inputs of shape "
                             f"{list(tokens.shape)}")
        w = self.embed.weight
        link = None if not _plain_embedding(self.embed) else GradLink()   # (ignored when traced)
        h = embed_tokens(w, tokens, link) if link is not None else self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        scale = c.d_model ** -0.5 if c.scale_logits else 1.0
        return tied_lm_loss(h.flatten(0, 1), w, targets.flatten(), scale=scale, z_coef=c.z_loss,
                            link=link)
