"""SwiGLU Triton kernels (the CUDA backend of ``palm_fast::swiglu``).

Math (x = value | gate over the last dim, F = x.shape[-1] // 2, s = sigmoid(gate)):

    forward:   out     = silu(gate) * value = gate * s * value                 [..., F]
    backward:  d_value = g * gate * s                                          [..., 2F]
               d_gate  = g * value * s * (1 + gate * (1 - s))

The sigmoid is recomputed in the backward, never stored. Every load is upcast to
fp32 right away (the interpreter stores bf16 as raw bits), the math is fp32 and
results are cast to the input dtype on store.

Layout: the leading dims of x are collapsed to ``n_rows`` rows with ONE row
stride when torch can express them so (``reshape`` returns a view), so
``proj[..., a:a + 2F]`` sliced out of a wider fused projection output is read in
place without a copy. Only when the leading dims cannot be merged into one
stride, or the last dim is not unit-stride, is x first copied to a contiguous
tensor. Outputs (``out`` and ``grad_x``) are contiguous.

Tiling: a 2-D grid ``(cdiv(n_rows, BLOCK_R), cdiv(F, BLOCK_F))``; each program
handles a ``BLOCK_R x BLOCK_F`` tile of value columns together with the matching
gate columns (``+F``), masked on both axes, so any F works (F = 1, F not a
multiple of the block, F = 16384). The op is purely memory bound (fwd moves
3F elements per row, bwd 5F), so the tile is sized for bandwidth: ``BLOCK_F`` up
to 1024 columns (contiguous 16-byte vector accesses per thread), and enough
rows that a program moves ~4096 elements per tensor, which keeps an H100's
132 SMs saturated with plenty of loads in flight. A fixed heuristic rather than
autotuning: no config goes untested and the choice is deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, check_float_dtype, check_launch_device, next_pow2, on_tensor_device
from .rope import libdevice, precise_trig

# Elements per program (BLOCK_R * BLOCK_F), and the widest column block. Swept on an H100
# (bf16, 16384 x 8192 and 4096 x 4096): 4096 x 4096 gave 97-98% of copy bandwidth
# forward and backward, vs 94-95% for 1024-wide blocks.
_TILE_ELEMS = 4096
_MAX_BLOCK_F = 4096


def precise_exp(out: torch.Tensor) -> bool:
    """Whether the sigmoid of a kernel writing ``out`` takes libdevice's exp: fp32 outputs on
    the GPU. ``tl.exp`` is ``ex2.approx`` of the fp32-rounded ``x * log2(e)``: about 5e-8 * |x|
    relative error (4e-6 at gate -80, an fp32 output off by 1e-4 at value 1e30, where torch's
    expf is within 2 ulp); far below a bf16 / fp16 output's rounding, which keeps tl.exp."""
    return out.dtype == torch.float32 and precise_trig(out.device)


@triton.jit
def sigmoid_exp(x, PRECISE_EXP: tl.constexpr):
    """exp(x) for the SwiGLU sigmoid: libdevice's when PRECISE_EXP (see precise_exp)."""
    if PRECISE_EXP:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _sigmoid_silu(gate, PRECISE_EXP: tl.constexpr):
    """fp32 ``(sigmoid(gate), silu(gate))``; exp overflows to inf for very negative gate -> s = 0."""
    sig = 1.0 / (1.0 + sigmoid_exp(-gate, PRECISE_EXP))
    return sig, gate * sig


@triton.jit
def _swiglu_fwd(
    x_ptr,          # input [n_rows, 2F] (value | gate); column stride 1, row stride stride_x_row
    out_ptr,        # output [n_rows, F], contiguous; silu(gate) * value
    n_rows,         # number of rows (product of x's leading dims)
    F,              # columns of value / gate / out
    stride_x_row,   # elements between consecutive rows of x (>= 2F for a slice of a wider tensor)
    stride_out_row,  # elements between consecutive rows of out (= F)
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_F: tl.constexpr,  # columns per program (power of two)
    PRECISE_EXP: tl.constexpr,  # libdevice exp in the sigmoid (fp32 on the GPU)
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < F)
    rows = rows.to(tl.int64)  # row offsets can exceed 2**31 elements
    x_tile = x_ptr + rows[:, None] * stride_x_row + cols[None, :]
    value = tl.load(x_tile, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(x_tile + F, mask=mask, other=0.0).to(tl.float32)
    _, silu = _sigmoid_silu(gate, PRECISE_EXP)
    out = silu * value
    tl.store(out_ptr + rows[:, None] * stride_out_row + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(
    grad_out_ptr,   # incoming gradient [n_rows, F]; column stride 1, row stride stride_g_row
    x_ptr,          # forward input [n_rows, 2F] (value | gate); column stride 1, row stride stride_x_row
    grad_x_ptr,     # output [n_rows, 2F], contiguous: d_value | d_gate
    n_rows,         # number of rows
    F,              # columns of value / gate / grad_out
    stride_g_row,   # elements between consecutive rows of grad_out
    stride_x_row,   # elements between consecutive rows of x
    stride_gx_row,  # elements between consecutive rows of grad_x (= 2F)
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_F: tl.constexpr,  # columns per program (power of two)
    PRECISE_EXP: tl.constexpr,  # libdevice exp in the sigmoid (fp32 on the GPU)
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < F)
    rows = rows.to(tl.int64)
    g = tl.load(grad_out_ptr + rows[:, None] * stride_g_row + cols[None, :],
                mask=mask, other=0.0).to(tl.float32)
    x_tile = x_ptr + rows[:, None] * stride_x_row + cols[None, :]
    value = tl.load(x_tile, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(x_tile + F, mask=mask, other=0.0).to(tl.float32)
    sig, silu = _sigmoid_silu(gate, PRECISE_EXP)
    d_value = g * silu
    # 1 - s = sigmoid(-gate) = exp(-gate) * s: for gate >= 0 (s near 1) without the
    # cancellation of 1 - s; for gate < 0 exp(-gate) may overflow, and 1 - s has none
    one_minus = tl.where(gate >= 0.0, sigmoid_exp(-gate, PRECISE_EXP) * sig, 1.0 - sig)
    d_gate = g * value * sig * (1.0 + gate * one_minus)
    gx_tile = grad_x_ptr + rows[:, None] * stride_gx_row + cols[None, :]
    tl.store(gx_tile, d_value.to(grad_x_ptr.dtype.element_ty), mask=mask)
    tl.store(gx_tile + F, d_gate.to(grad_x_ptr.dtype.element_ty), mask=mask)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., K] -> [rows, K]`` with unit column stride and one row stride.

    A view (no copy) whenever torch can merge the leading dims into one stride,
    e.g. a column slice of a wider contiguous tensor; a contiguous copy
    otherwise (or when the last dim is not unit-stride).
    """
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def tile_config(n_rows: int, F: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_F, num_warps)`` for an ``n_rows x F`` problem."""
    block_f = min(next_pow2(F), _MAX_BLOCK_F)
    block_r = min(max(1, _TILE_ELEMS // block_f), next_pow2(max(n_rows, 1)))
    num_warps = 8 if block_r * block_f >= 4096 else 4
    return block_r, block_f, num_warps


def _check_x(x: torch.Tensor) -> int:
    check_launch_device(x)
    check_float_dtype("x", x)
    if x.dim() < 1 or x.shape[-1] == 0 or x.shape[-1] % 2:
        raise ValueError(f"x: expected shape [..., 2F] with F > 0, got {tuple(x.shape)}")
    return x.shape[-1] // 2


@on_tensor_device
def swiglu_fwd(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * value`` of ``x = value | gate`` ``[..., 2F]`` -> contiguous ``[..., F]``."""
    F = _check_x(x)
    out = torch.empty(*x.shape[:-1], F, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    x2 = as_rows(x)
    n_rows = x2.shape[0]
    block_r, block_f, num_warps = tile_config(n_rows, F)
    grid = (cdiv(n_rows, block_r), cdiv(F, block_f))
    _swiglu_fwd[grid](x2, out, n_rows, F, x2.stride(0), F,
                      BLOCK_R=block_r, BLOCK_F=block_f, PRECISE_EXP=precise_exp(out),
                      num_warps=num_warps)
    return out


@on_tensor_device
def swiglu_bwd(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. ``x`` ``[..., 2F]`` (contiguous, ``d_value | d_gate``) given ``grad_out`` ``[..., F]``."""
    F = _check_x(x)
    if grad_out.shape != (*x.shape[:-1], F):
        raise ValueError(f"grad_out: expected shape {(*x.shape[:-1], F)}, got {tuple(grad_out.shape)}")
    if grad_out.dtype != x.dtype or grad_out.device != x.device:
        raise ValueError(f"grad_out: expected {x.dtype} on {x.device}, got {grad_out.dtype} on "
                         f"{grad_out.device}")
    grad_x = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if grad_x.numel() == 0:
        return grad_x
    x2 = as_rows(x)
    g2 = as_rows(grad_out)
    n_rows = x2.shape[0]
    block_r, block_f, num_warps = tile_config(n_rows, F)
    grid = (cdiv(n_rows, block_r), cdiv(F, block_f))
    _swiglu_bwd[grid](g2, x2, grad_x, n_rows, F, g2.stride(0), x2.stride(0), 2 * F,
                      BLOCK_R=block_r, BLOCK_F=block_f, PRECISE_EXP=precise_exp(grad_x),
                      num_warps=num_warps)
    return grad_x
