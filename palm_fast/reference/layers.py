"""Reference PaLM layers in plain PyTorch: the definitions fast modules are tested against.

Layouts: activations ``[B, T, dim]``; q ``[B, T, H, D]``; k and v ``[B, S, Hk, D]``
(Hk = n_kv_heads, 1 = multi-query; query head h reads kv head ``h // (H // Hk)``);
positions ``[B, T]`` integers. No dense layer or LayerNorm has a bias (PaLM).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import functional as Fn

__all__ = ["LayerNorm", "RotaryEmbedding", "SwiGLU", "SwiGLUMLP", "KVCache", "attention",
           "MultiQueryAttention", "ParallelBlock", "SerialBlock"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (high-precision references); everything else computes in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class LayerNorm(nn.Module):
    """``y = (x - mean(x)) / sqrt(var(x) + eps) * weight (+ bias)`` over the last dim.

    x ``[..., dim]`` -> y ``[..., dim]`` in x's dtype; statistics (biased variance)
    and the normalisation are computed in fp32 (fp64 for fp64 x). ``weight`` is ones; PaLM
    uses no bias (``bias=True`` adds a zero-initialised ``bias`` parameter).
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(_compute_dtype(x))
        mean = xf.mean(dim=-1, keepdim=True)
        var = (xf - mean).square().mean(dim=-1, keepdim=True)
        y = (xf - mean) * torch.rsqrt(var + self.eps) * self.weight.to(xf.dtype)
        if self.bias is not None:
            y = y + self.bias.to(xf.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"


class RotaryEmbedding(nn.Module):
    """Rotary position embedding of q and k (``functional.apply_rope``).

    Buffer ``inv_freq = rope_inv_freq(rotary_dim, base)`` (fp32, ``[rotary_dim / 2]``).
    ``forward(q [B, T, H, D], k [B, T, Hk, D], positions [B, T] | None, offsets [B] | None)``
    rotates the first ``rotary_dim`` features of every head by ``position * inv_freq``
    (rotate-half pairs, or adjacent pairs when ``interleaved``); the rest pass through.
    Positions default to ``offsets[b] + t``, or ``t`` when neither is given.
    """

    def __init__(self, rotary_dim: int, base: float = 10000.0, interleaved: bool = False):
        super().__init__()
        self.rotary_dim, self.base, self.interleaved = rotary_dim, base, interleaved
        self.register_buffer("inv_freq", Fn.rope_inv_freq(rotary_dim, base), persistent=True)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None,
                offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = q.shape[:2]
        if positions is not None and offsets is not None:
            raise ValueError("positions and offsets: pass at most one of them")
        if positions is None:
            if offsets is None:
                offsets = torch.zeros(B, dtype=torch.int64, device=q.device)
            positions = Fn.positions_from_offsets(offsets, T)
        if tuple(positions.shape) != (B, T):
            raise ValueError(f"positions: expected shape {(B, T)}, got {tuple(positions.shape)}")
        return (Fn.apply_rope(q, positions, self.inv_freq, interleaved=self.interleaved),
                Fn.apply_rope(k, positions, self.inv_freq, interleaved=self.interleaved))

    def _apply(self, fn, recurse=True):
        # Keep inv_freq in fp32 through module.to(dtype) / .half(): only its device follows.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if inv_freq.is_meta and not self.inv_freq.is_meta:
            # to_empty() of a model built on the meta device: no values to move; the table
            # is a function of (rotary_dim, base)
            self.inv_freq = Fn.rope_inv_freq(self.rotary_dim, self.base).to(self.inv_freq.device)
        else:
            self.inv_freq = inv_freq.to(device=self.inv_freq.device)
        return self

    def extra_repr(self) -> str:
        return f"{self.rotary_dim}, base={self.base}, interleaved={self.interleaved}"


class SwiGLU(nn.Module):
    """``x [..., 2F]`` laid out ``value | gate`` -> ``silu(gate) * value`` ``[..., F]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Fn.swiglu(x)


class SwiGLUMLP(nn.Module):
    """``y = w_out(silu(x Wg) * (x Wv))``: ``w_in`` (dim -> 2 hidden, value | gate),
    ``act`` = SwiGLU, ``w_out`` (hidden -> dim), no biases. ``[..., dim] -> [..., dim]``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.act = SwiGLU()
        self.w_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(self.act(self.w_in(x)))


class KVCache:
    """A contiguous per-layer key/value cache for decoding.

    Buffers ``k``, ``v``: ``[B, max_len, Hk, D]``; ``length`` tokens are filled
    (the same for every sequence of the batch). ``append(k_new, v_new)`` with
    ``[B, t, Hk, D]`` writes them at ``length`` and returns views of everything
    cached so far, ``[B, length + t, Hk, D]`` each.
    """

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        shape = (batch, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, Hk, D = self.k.shape
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if t.dim() != 4 or (t.shape[0], t.shape[2], t.shape[3]) != (B, Hk, D):
                raise ValueError(f"{name}: expected shape [{B}, t, {Hk}, {D}], got {list(t.shape)}")
        if k_new.shape[1] != v_new.shape[1]:
            raise ValueError(f"k_new and v_new: token counts differ ({k_new.shape[1]} vs {v_new.shape[1]})")
        end = self.length + k_new.shape[1]
        if end > self.max_len:
            raise RuntimeError(f"KVCache overflow: {self.length} cached + {k_new.shape[1]} new tokens "
                               f"exceeds max_len {self.max_len}")
        self.k[:, self.length:end] = k_new
        self.v[:, self.length:end] = v_new
        self.length = end
        return self.k[:, :end], self.v[:, :end]

    def reset(self) -> None:
        self.length = 0


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              q_offset: int = 0) -> torch.Tensor:
    """Softmax attention with shared kv heads (the readable definition).

    q ``[B, T, H, D]``, k and v ``[B, S, Hk, D]`` with ``H % Hk == 0``; query head h
    uses kv head ``h // (H // Hk)``. Query i sits at absolute index ``q_offset + i``
    among the S keys; with ``causal`` it sees keys ``j <= q_offset + i``:
      ``o[b, i, h] = softmax_j(q[b, i, h] . k[b, j, g] / sqrt(D) + mask) @ v[b, :, g]``.
    Computed in fp32 (fp64 for fp64 inputs); returns ``[B, T, H, D]`` in q's dtype.
    """
    B, T, H, D = q.shape
    S, Hk = k.shape[1], k.shape[2]
    if k.shape != (B, S, Hk, D) or v.shape != k.shape:
        raise ValueError(f"k, v: expected shape [{B}, S, Hk, {D}] each, got {list(k.shape)} and "
                         f"{list(v.shape)}")
    if H % Hk:
        raise ValueError(f"k: number of kv heads {Hk} must divide the query heads {H}")
    if q_offset < 0:
        raise ValueError(f"q_offset: expected >= 0, got {q_offset}")
    cd = _compute_dtype(q)
    k = k.to(cd).repeat_interleave(H // Hk, dim=2)                        # [B, S, H, D]
    v = v.to(cd).repeat_interleave(H // Hk, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q.to(cd), k) * D ** -0.5    # [B, H, T, S]
    if causal:
        i = torch.arange(T, device=q.device)[:, None] + q_offset
        j = torch.arange(S, device=q.device)[None, :]
        scores = scores.masked_fill(j > i, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhij,bjhd->bihd", probs, v).to(q.dtype)


def _rope_cache_attend(rotary: RotaryEmbedding, q, k, v, positions, cache: KVCache | None):
    """Shared by both attention layers: rope on q, k; append to the cache; causal attention.

    Without positions, token t of this call sits at position ``cache.length + t``
    (``t`` without a cache). The causal mask is by cache index, the rope by position.
    """
    start = cache.length if cache is not None else 0
    if positions is None:
        B, T = q.shape[:2]
        positions = (start + torch.arange(T, device=q.device)).expand(B, T)
    q, k = rotary(q, k, positions)
    if cache is not None:
        k, v = cache.append(k, v)
    return attention(q, k, v, causal=True, q_offset=start)


class MultiQueryAttention(nn.Module):
    """Causal multi-query (Hk = 1) / grouped-query attention with rotary q and k.

    ``q = x wq [B, T, H, D]``; ``k | v = x wkv`` (each ``[B, T, Hk, D]``);
    ``y = wo(attention(rope(q), rope(k), v))``. ``[B, T, dim] -> [B, T, dim]``, no biases.
    """

    def __init__(self, dim: int, n_heads: int, head_dim: int, n_kv_heads: int = 1,
                 rotary_dim: int | None = None, rope_base: float = 10000.0, interleaved: bool = False):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads: expected a divisor of n_heads={n_heads}, got {n_kv_heads}")
        self.n_heads, self.head_dim, self.n_kv_heads = n_heads, head_dim, n_kv_heads
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.rotary = RotaryEmbedding(rotary_dim or head_dim, rope_base, interleaved)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hk, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.wq(x).view(B, T, H, D)
        k, v = self.wkv(x).view(B, T, 2, Hk, D).unbind(dim=2)
        o = _rope_cache_attend(self.rotary, q, k, v, positions, cache)
        return self.wo(o.reshape(B, T, H * D))


class ParallelBlock(nn.Module):
    """The PaLM block: ``y = x + attn_out(Attn(h)) + ff_out(swiglu(h Wff))``, ``h = norm(x)``.

    One LayerNorm ``norm`` and one fused projection ``in_proj`` (dim -> H D + 2 Hk D + 2 F,
    no bias) split as ``q | k | v | ff`` with ``ff = value | gate``; ``rotary`` on q and k;
    causal attention; ``attn_out`` (H D -> dim), ``ff_out`` (F -> dim).
    ``x [B, T, dim] -> [B, T, dim]``. With a cache the new keys/values are appended and
    the queries attend to everything cached (positions default to cache length + t).
    """

    def __init__(self, dim: int, n_heads: int, head_dim: int, d_ff: int, n_kv_heads: int = 1,
                 eps: float = 1e-5, rotary_dim: int | None = None, rope_base: float = 10000.0,
                 interleaved: bool = False):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads: expected a divisor of n_heads={n_heads}, got {n_kv_heads}")
        self.dim, self.n_heads, self.head_dim = dim, n_heads, head_dim
        self.n_kv_heads, self.d_ff, self.eps = n_kv_heads, d_ff, eps
        self.split_sizes = (n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim, 2 * d_ff)
        self.norm = LayerNorm(dim, eps)
        self.in_proj = nn.Linear(dim, sum(self.split_sizes), bias=False)
        self.rotary = RotaryEmbedding(rotary_dim or head_dim, rope_base, interleaved)
        self.act = SwiGLU()
        self.attn_out = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.ff_out = nn.Linear(d_ff, dim, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hk, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v, ff = self.in_proj(self.norm(x)).split(self.split_sizes, dim=-1)
        o = _rope_cache_attend(self.rotary, q.view(B, T, H, D), k.view(B, T, Hk, D),
                               v.view(B, T, Hk, D), positions, cache)
        return x + self.attn_out(o.reshape(B, T, H * D)) + self.ff_out(self.act(ff))


class SerialBlock(nn.Module):
    """The standard (serial) block: ``h = x + attn(norm1(x)); y = h + mlp(norm2(h))``.

    ``attn`` is a MultiQueryAttention and ``mlp`` a SwiGLUMLP; ``[B, T, dim] -> [B, T, dim]``.
    ``SerialBlock.from_parallel(block)`` copies a ParallelBlock's weights (in_proj rows
    q -> attn.wq, k | v -> attn.wkv, ff -> mlp.w_in; attn_out -> attn.wo; ff_out ->
    mlp.w_out; norm -> norm1 and norm2) to compare the two formulations.
    """

    def __init__(self, dim: int, n_heads: int, head_dim: int, d_ff: int, n_kv_heads: int = 1,
                 eps: float = 1e-5, rotary_dim: int | None = None, rope_base: float = 10000.0,
                 interleaved: bool = False):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps)
        self.attn = MultiQueryAttention(dim, n_heads, head_dim, n_kv_heads, rotary_dim, rope_base,
                                        interleaved)
        self.norm2 = LayerNorm(dim, eps)
        self.mlp = SwiGLUMLP(dim, d_ff)

    @classmethod
    def from_parallel(cls, block: ParallelBlock) -> SerialBlock:
        rot = block.rotary
        w = block.in_proj.weight
        new = cls(block.dim, block.n_heads, block.head_dim, block.d_ff, block.n_kv_heads, block.eps,
                  rot.rotary_dim, rot.base, rot.interleaved).to(device=w.device, dtype=w.dtype)
        q_rows, k_rows, v_rows, _ = block.split_sizes
        with torch.no_grad():
            new.attn.wq.weight.copy_(w[:q_rows])
            new.attn.wkv.weight.copy_(w[q_rows:q_rows + k_rows + v_rows])
            new.mlp.w_in.weight.copy_(w[q_rows + k_rows + v_rows:])
            new.attn.wo.weight.copy_(block.attn_out.weight)
            new.mlp.w_out.weight.copy_(block.ff_out.weight)
            new.norm1.weight.copy_(block.norm.weight)
            new.norm2.weight.copy_(block.norm.weight)
            new.attn.rotary.inv_freq.copy_(rot.inv_freq)
        return new

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        h = x + self.attn(self.norm1(x), positions, cache)
        return h + self.mlp(self.norm2(h))
