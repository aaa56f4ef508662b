"""Fused rotary position embedding (RoPE) of queries and the shared key head(s).

Math (the definition is ``palm_fast.reference.functional.apply_rope``)
----------------------------------------------------------------------
For a token at integer position ``p`` and ``R/2 = len(inv_freq)`` frequencies::

    theta_i = float32(p) * inv_freq[i]          (fp32, i < R/2)
    c_i, s_i = cos(theta_i), sin(theta_i)       (fp32; s_i = -sin(theta_i) when INVERSE)

every head vector ``x`` (length D >= R) of q and of k is rotated pairwise::

    (x1, x2) -> (x1 c_i - x2 s_i,  x2 c_i + x1 s_i)

with pairs ``(x[i], x[i + R/2])`` (rotate-half, the GPT-NeoX / PaLM-pytorch layout) or
``(x[2i], x[2i + 1])`` (interleaved, the GPT-J layout). Features ``R..D-1`` pass through.
The rotation is orthogonal, so the backward of the op is the same op with INVERSE
flipped (rotation by ``-theta`` is the transpose).

Tiling
------
One program per token (grid ``B * T``). The program loads the token's position, computes
``cos``/``sin`` once for the ``R/2`` frequencies (a ``[BLOCK_HALF]`` vector) and applies
them to all H query heads and all Hk key heads (the shared MQA head), walking the heads
in ``[BLOCK_H, BLOCK_HALF]`` tiles: one tile load of the ``x1`` halves, one of the ``x2``
halves, two tile stores, plus a ``[BLOCK_H, BLOCK_PASS]`` copy of the pass-through
features when the output is not written in place. Each element of q and k is read once
and written once, so the op moves the minimum ``2 * (H + Hk) * D`` elements per token.
Loads are upcast to fp32 (the interpreter cannot do bf16 arithmetic) and stores cast
to the output's dtype. Inputs may have any strides in B, T and H (for instance views
of a fused projection output); the last dim must be unit-stride.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    check_float_dtypes,
    check_launch_device,
    gpu_launch,
    interpreting,
    next_pow2,
    on_tensor_device,
)

try:  # precise cos/sin on the GPU (the hardware approximations lose accuracy far from 0)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - old triton
    libdevice = None


def precise_trig(device: torch.device) -> bool:
    """Whether kernels on ``device`` take libdevice's cos/sin (CUDA; not the interpreter)."""
    return libdevice is not None and not interpreting() and gpu_launch(device)


@triton.jit
def rope_cos_sin(theta, PRECISE_TRIG: tl.constexpr):
    """cos and sin of fp32 rotary angles, shared by every kernel that rotates (rope,
    the fused input projection, rope + cache append): libdevice's accurate versions on the
    GPU (angles reach the largest position in radians), tl.cos / tl.sin otherwise."""
    if PRECISE_TRIG:
        return libdevice.cos(theta), libdevice.sin(theta)
    else:
        return tl.cos(theta), tl.sin(theta)


@triton.jit
def _rope_rotate_heads(
    x_row,            # pointer to head 0, feature 0 of this token's input rows
    o_row,            # pointer to head 0, feature 0 of this token's output rows
    stride_xh,        # elements between consecutive heads of the input
    stride_oh,        # elements between consecutive heads of the output
    n_heads,          # number of heads to rotate (H for q, Hk for k)
    cos,              # [BLOCK_HALF] fp32 cos(theta_i) of this token
    sin,              # [BLOCK_HALF] fp32 sin(theta_i) (negated for the inverse rotation)
    HALF: tl.constexpr,        # R / 2: number of rotated pairs
    HEAD_DIM: tl.constexpr,    # D: features per head
    BLOCK_H: tl.constexpr,     # heads per tile (power of two)
    BLOCK_HALF: tl.constexpr,  # next power of two >= HALF
    BLOCK_PASS: tl.constexpr,  # next power of two >= D - R (pass-through features)
    INTERLEAVED: tl.constexpr,  # pairs (2i, 2i+1) instead of (i, i + R/2)
    COPY_PASS: tl.constexpr,   # copy features R..D-1 (False when D == R or in place)
):
    """Rotate ``n_heads`` head vectors of one token by the given cos/sin (shared math of
    the forward and the inverse rotation)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, BLOCK_HALF)
    mask_i = offs_i < HALF
    if INTERLEAVED:
        col1 = 2 * offs_i
        col2 = col1 + 1
    else:
        col1 = offs_i
        col2 = offs_i + HALF
    c = cos[None, :]
    s = sin[None, :]
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + offs_h
        mask_h = heads < n_heads
        mask = mask_h[:, None] & mask_i[None, :]
        x_ptrs = x_row + heads[:, None].to(tl.int64) * stride_xh
        o_ptrs = o_row + heads[:, None].to(tl.int64) * stride_oh
        x1 = tl.load(x_ptrs + col1[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptrs + col2[None, :], mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        tl.store(o_ptrs + col1[None, :], o1.to(o_row.dtype.element_ty), mask=mask)
        tl.store(o_ptrs + col2[None, :], o2.to(o_row.dtype.element_ty), mask=mask)
        if COPY_PASS:
            offs_p = 2 * HALF + tl.arange(0, BLOCK_PASS)
            mask_p = mask_h[:, None] & (offs_p < HEAD_DIM)[None, :]
            xp = tl.load(x_ptrs + offs_p[None, :], mask=mask_p, other=0.0).to(tl.float32)
            tl.store(o_ptrs + offs_p[None, :], xp.to(o_row.dtype.element_ty), mask=mask_p)


@triton.jit
def _rope_kernel(
    q_ptr,            # [B, T, H, D] queries (any strides in B, T, H; unit stride in D)
    k_ptr,            # [B, T, Hk, D] keys (Hk = 1 for multi-query attention)
    qo_ptr,           # [B, T, H, D] rotated queries (may be q_ptr: in place)
    ko_ptr,           # [B, T, Hk, D] rotated keys (may be k_ptr: in place)
    inv_freq_ptr,     # [R/2] fp32 inverse frequencies
    pos_ptr,          # [B] int offsets (POS_IS_OFFSET) or [B, T] int positions
    T,                # tokens per sequence
    H,                # query heads
    HK,               # key heads
    stride_qb, stride_qt, stride_qh,      # q strides (elements) of B, T, H
    stride_kb, stride_kt, stride_kh,      # k strides of B, T, Hk
    stride_qob, stride_qot, stride_qoh,   # q_out strides of B, T, H
    stride_kob, stride_kot, stride_koh,   # k_out strides of B, T, Hk
    stride_pb, stride_pt,                 # positions strides of B, T (stride_pt unused for offsets)
    HALF: tl.constexpr,        # R / 2 = len(inv_freq)
    HEAD_DIM: tl.constexpr,    # D
    BLOCK_H: tl.constexpr,     # query heads per tile
    BLOCK_HK: tl.constexpr,    # key heads per tile
    BLOCK_HALF: tl.constexpr,  # next power of two >= R / 2
    BLOCK_PASS: tl.constexpr,  # next power of two >= D - R (1 when D == R)
    POS_IS_OFFSET: tl.constexpr,  # position = pos[b] + t instead of pos[b, t]
    INTERLEAVED: tl.constexpr,    # interleaved pairs instead of rotate-half
    INVERSE: tl.constexpr,        # rotate by -theta (the backward)
    COPY_PASS_Q: tl.constexpr,    # copy q's D - R pass-through features (not when in place)
    COPY_PASS_K: tl.constexpr,    # copy k's D - R pass-through features (not when in place)
    PRECISE_TRIG: tl.constexpr,   # libdevice cos/sin (GPU) instead of tl.cos/tl.sin (interpreter)
):
    """Rotate all query heads and all key heads of one token (program id = b * T + t)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid - b * T
    if POS_IS_OFFSET:
        pos = tl.load(pos_ptr + b * stride_pb).to(tl.int64) + t
    else:
        pos = tl.load(pos_ptr + b * stride_pb + t * stride_pt).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_HALF)
    inv_freq = tl.load(inv_freq_ptr + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)
    theta = pos.to(tl.float32) * inv_freq
    cos, sin = rope_cos_sin(theta, PRECISE_TRIG)
    if INVERSE:
        sin = -sin
    _rope_rotate_heads(q_ptr + b * stride_qb + t * stride_qt, qo_ptr + b * stride_qob + t * stride_qot,
                       stride_qh, stride_qoh, H, cos, sin,
                       HALF, HEAD_DIM, BLOCK_H, BLOCK_HALF, BLOCK_PASS, INTERLEAVED, COPY_PASS_Q)
    _rope_rotate_heads(k_ptr + b * stride_kb + t * stride_kt, ko_ptr + b * stride_kob + t * stride_kot,
                       stride_kh, stride_koh, HK, cos, sin,
                       HALF, HEAD_DIM, BLOCK_HK, BLOCK_HALF, BLOCK_PASS, INTERLEAVED, COPY_PASS_K)


# Elements of one [BLOCK_H, BLOCK_HALF] half-tile: 2048 fp32 values per half over 128
# threads keeps ~16 registers per half-tile and gives each program >= 8 KB in flight
# (bf16, rotate-half, D = 128, H = 16: the whole token in one tile).
_TILE_ELEMS = 2048
_NUM_WARPS = 4


def launch_config(n_heads: int, n_kv_heads: int, half: int, head_dim: int) -> dict:
    """Block sizes of ``_rope_kernel`` for a shape (exposed so tests can see them)."""
    block_half = next_pow2(max(half, 1))
    max_h = max(1, _TILE_ELEMS // block_half)
    return dict(
        BLOCK_H=min(next_pow2(n_heads), max_h),
        BLOCK_HK=min(next_pow2(n_kv_heads), max_h),
        BLOCK_HALF=block_half,
        BLOCK_PASS=next_pow2(max(head_dim - 2 * half, 1)),
    )


@on_tensor_device
def rope(q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor, pos: torch.Tensor, *,
         pos_is_offset: bool, interleaved: bool = False, inverse: bool = False,
         q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None):
    """Rotate q ``[B, T, H, D]`` and k ``[B, T, Hk, D]`` in one launch.

    pos: ``[B]`` int32/int64 offsets (``pos_is_offset=True``, position = pos[b] + t) or
    ``[B, T]`` int32/int64 positions. inv_freq: ``[R/2]`` fp32 with ``R <= D``.
    Outputs are new contiguous tensors unless ``q_out``/``k_out`` are given (pass
    ``q_out=q, k_out=k`` to rotate in place). Returns ``(q_out, k_out)``.
    Arguments are assumed valid (``palm_fast.ops.rope`` checks them).
    """
    check_launch_device(q)
    check_float_dtypes("q, k", q, k)
    B, T, H, D = q.shape
    HK = k.shape[2]
    half = inv_freq.numel()
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "q and k need a unit stride in the last dim"
    assert 2 * half <= D, f"rotary dim {2 * half} exceeds head dim {D}"
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if k_out is None:
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    assert q_out.stride(-1) == 1 and k_out.stride(-1) == 1
    n_tokens = B * T
    if n_tokens == 0:
        return q_out, k_out
    inv_freq = inv_freq.contiguous()
    if pos_is_offset:
        stride_pb, stride_pt = pos.stride(0), 0
    else:
        stride_pb, stride_pt = pos.stride(0), pos.stride(1)
    cfg = launch_config(H, HK, half, D)
    _rope_kernel[(n_tokens,)](
        q, k, q_out, k_out, inv_freq, pos,
        T, H, HK,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        stride_pb, stride_pt,
        HALF=half, HEAD_DIM=D,
        POS_IS_OFFSET=bool(pos_is_offset), INTERLEAVED=bool(interleaved), INVERSE=bool(inverse),
        COPY_PASS_Q=(2 * half < D) and q_out.data_ptr() != q.data_ptr(),
        COPY_PASS_K=(2 * half < D) and k_out.data_ptr() != k.data_ptr(),
        PRECISE_TRIG=precise_trig(q.device),
        num_warps=_NUM_WARPS,
        **cfg,
    )
    return q_out, k_out
