"""The reference PaLM model: embedding, parallel blocks, final LayerNorm, tied output.

``logits = norm(h_L) @ embed.weight^T (* 1/sqrt(d) when config.scale_logits)`` with
``h_0 = embed(tokens)`` and ``h_{l+1} = block_l(h_l)``. Init: embedding N(0, 1),
every dense kernel N(0, 1/sqrt(n_in)), LayerNorm weights 1.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import PaLMConfig
from .layers import KVCache, LayerNorm, ParallelBlock

__all__ = ["PaLM"]


class PaLM(nn.Module):
    """Decoder-only PaLM: ``tokens [B, T] -> logits [B, T, V]``."""

    def __init__(self, config: PaLMConfig):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(
            ParallelBlock(c.d_model, c.n_heads, c.head_dim, c.d_ff, c.n_kv_heads, c.eps, c.rotary_dim,
                          c.rope_base)
            for _ in range(c.n_layers))
        self.norm = LayerNorm(c.d_model, c.eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Embedding N(0, 1); dense kernels N(0, std = n_in^-0.5); LayerNorm weights 1 (also
        palm_fast's fast LayerNorms, which ``palm_fast.patch`` puts in a reference model)."""
        from palm_fast.nn.layer_norm import LayerNorm as FastLayerNorm  # (no import cycle)

        nn.init.normal_(self.embed.weight, 0.0, 1.0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, m.in_features ** -0.5)
            elif isinstance(m, (LayerNorm, FastLayerNorm)):
                m.weight.fill_(1.0)

    def num_params(self) -> int:
        """Number of parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def new_caches(self, batch: int, max_len: int | None = None) -> list[KVCache]:
        """One empty KVCache per block, in the parameters' dtype and device."""
        c, w = self.config, self.embed.weight
        return [KVCache(batch, max_len or c.max_seq_len, c.n_kv_heads, c.head_dim, w.dtype, w.device)
                for _ in self.blocks]

    def _check_tokens(self, tokens: torch.Tensor, name: str = "tokens", values: bool = True) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            got = list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"{name}: expected an integer tensor of shape [B, T], got {got}")
        if tokens.dtype not in (torch.int32, torch.int64):   # (what nn.Embedding takes)
            raise TypeError(f"{name}: expected dtype int32 or int64, got {tokens.dtype}")
        V = self.config.vocab_size
        # The range check reads values (a host sync); skipped while torch.compile traces,
        # under a dispatch mode (make_fx, FakeTensorMode: the values may not exist) and while
        # a CUDA graph is captured (a host read there is an error).
        if not values or torch.compiler.is_compiling() or tokens.numel() == 0 or (
                torch._C._len_torch_dispatch_stack() > 0) or (
                torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()):
            return
        if int(tokens.min()) < 0 or int(tokens.max()) >= V:
            raise ValueError(f"{name}: token ids must lie in [0, {V}), got range "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                caches: list[KVCache] | None = None) -> torch.Tensor:
        """tokens ``[B, T]`` (int) -> logits ``[B, T, V]`` in the parameters' dtype.

        positions ``[B, T]`` (default: cache length + t); caches: one KVCache per block
        (new keys/values are appended, queries see everything cached).
        """
        self._check_tokens(tokens)
        T = tokens.shape[1]
        start = caches[0].length if caches else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"tokens: {start} cached + {T} new tokens exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"caches: expected {len(self.blocks)} (one per block), got {len(caches)}")
        h = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            h = block(h, positions, caches[i] if caches is not None else None)
        logits = self.norm(h) @ self.embed.weight.t()
        if self.config.scale_logits:
            logits = logits * self.config.d_model ** -0.5
        return logits

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """Next-token loss: returns ``(total, ce, z)`` with ``total = ce + z``.

        ``ce`` = mean cross-entropy of fp32 logits; ``z = z_loss * mean(logZ^2)`` with
        ``logZ = logsumexp(logits)`` per token. Without targets, the model reads
        ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``.
        """
        tokens, targets = self._loss_inputs(tokens, targets)
        logits = self(tokens).float()
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten().long())
        z = self.config.z_loss * torch.logsumexp(logits, dim=-1).square().mean()
        return ce + z, ce, z

    def _loss_inputs(self, tokens: torch.Tensor, targets: torch.Tensor | None):
        """``(tokens, targets)`` of a loss call: without targets, the model reads
        ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``. Targets checked here, the tokens'
        type and shape too (their values: by the forward, one host read each)."""
        self._check_tokens(tokens, values=False)
        if targets is None:
            if tokens.shape[1] < 2:
                raise ValueError(f"tokens: expected at least 2 tokens per sequence (inputs and the "
                                 f"next-token targets), got shape {list(tokens.shape)}")
            tokens, targets = tokens[:, :-1], tokens[:, 1:]
        self._check_tokens(targets, "targets")
        if targets.shape != tokens.shape:
            raise ValueError(f"targets: expected shape {list(tokens.shape)}, got {list(targets.shape)}")
        return tokens, targets

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Autoregressive decoding with a KV cache: prompt ``[B, T0]`` -> ``[B, T0 + n]``.

        The prompt is prefilled in one forward, then one token per step. temperature 0
        is greedy (argmax); otherwise sample from ``softmax(logits / temperature)``
        restricted to the ``top_k`` largest logits when given.
        """
        self._check_tokens(prompt, "prompt")
        if prompt.shape[1] == 0:
            raise ValueError("prompt: expected at least one token per sequence, "
                             f"got shape {list(prompt.shape)}")
        for name, v in (("max_new_tokens", max_new_tokens), ("top_k", top_k)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"temperature: expected a float, got {type(temperature).__name__}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
        if not 0 <= temperature < math.inf:   # (NaN fails too)
            raise ValueError(f"temperature: expected a finite float >= 0, got {temperature}")
        if top_k is not None and not 1 <= top_k <= self.config.vocab_size:
            raise ValueError(f"top_k: expected in [1, {self.config.vocab_size}], got {top_k}")
        B, T0 = prompt.shape
        total = T0 + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(f"prompt: {T0} + {max_new_tokens} new tokens exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        out = prompt
        if max_new_tokens == 0:
            return out
        caches = self.new_caches(B, total)
        logits = self(prompt, caches=caches)[:, -1]
        for step in range(max_new_tokens):
            nxt = _sample(logits.float(), temperature, top_k, generator)      # [B, 1]
            out = torch.cat((out, nxt.to(prompt.dtype)), dim=1)
            if step + 1 < max_new_tokens:
                logits = self(nxt, caches=caches)[:, -1]
        return out


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None,
            generator: torch.Generator | None) -> torch.Tensor:
    """logits ``[B, V]`` -> token ids ``[B, 1]`` (greedy when temperature == 0)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # minus the row max: the same softmax, finite however small the temperature
    tiny = torch.finfo(torch.float32).tiny
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, tiny)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
