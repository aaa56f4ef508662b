"""Plain PyTorch definitions of palm_fast's elementwise ops.

These functions are the math every fast path is tested against. They favour
clarity over speed and compute in the input dtype unless stated otherwise
(call them on fp64 copies to get a high-precision reference).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rope_inv_freq(rotary_dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, in fp32.

    ``inv_freq[i] = 1 / base ** (2 i / rotary_dim)`` for ``i < rotary_dim / 2``
    (the PaLM-pytorch / GPT-NeoX definition). Shape ``[rotary_dim // 2]``.
    """
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim: expected a positive even integer, got {rotary_dim}")
    if isinstance(base, bool) or not 0 < base < float("inf"):   # NaN fails too
        raise ValueError(f"base: expected a finite float > 0, got {base!r}")
    exponent = torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim
    return 1.0 / (base ** exponent)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotation angles ``theta[..., i] = position * inv_freq[i]`` in fp32.

    positions: integer tensor of any shape ``[...]``; returns ``[..., rotary_dim // 2]``.
    """
    return positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim (split in two halves)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *,
               interleaved: bool = False, inverse: bool = False) -> torch.Tensor:
    """Rotary position embedding of ``x`` (the reference for ``palm_fast.ops.rope``).

    x:         ``[B, T, H, D]`` (any number of heads H)
    positions: ``[B, T]`` integer positions of each token
    inv_freq:  ``[R // 2]`` fp32 inverse frequencies; the first R = rotary_dim
               features are rotated, the remaining ``D - R`` pass through.

    With ``theta = positions * inv_freq`` (fp32) and c = cos(theta), s = sin(theta):
      rotate-half (default): pairs are (x[i], x[i + R/2]):
        out[i] = x[i] c_i - x[i + R/2] s_i;  out[i + R/2] = x[i + R/2] c_i + x[i] s_i
      interleaved: pairs are (x[2i], x[2i + 1]) with the same rotation.
    ``inverse=True`` rotates by ``-theta`` (the transpose; this is the backward).
    The angles are computed in fp32; the rotation in fp32 for half inputs
    (fp64 for fp64 inputs), and the result is cast back to x's dtype.
    """
    R = 2 * inv_freq.numel()
    D = x.shape[-1]
    if R > D:
        raise ValueError(f"rotary dim {R} exceeds head dim {D}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    theta = rope_angles(positions, inv_freq).to(compute)[:, :, None, :]  # [B, T, 1, R/2]
    cos, sin = theta.cos(), theta.sin()
    if inverse:
        sin = -sin
    xr, xp = x[..., :R].to(compute), x[..., R:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        rot = torch.stack((o1, o2), dim=-1).flatten(-2)
    else:
        cos2, sin2 = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        rot = xr * cos2 + rotate_half(xr) * sin2
    return torch.cat((rot.to(x.dtype), xp), dim=-1)


def positions_from_offsets(offsets: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``positions[b, t] = offsets[b] + t`` for a ``[B]`` tensor of start offsets."""
    return offsets[:, None].to(torch.int64) + torch.arange(seq_len, device=offsets.device)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU of a fused projection output (the reference for ``palm_fast.ops.swiglu``).

    x: ``[..., 2F]`` laid out as ``value | gate`` (PaLM-pytorch order:
    ``x, gate = ff.chunk(2, dim=-1)``). Returns ``silu(gate) * value``, ``[..., F]``.
    """
    value, gate = x.chunk(2, dim=-1)
    return F.silu(gate) * value
