"""Triton GEMMs with epilogues for the PaLM parallel block (the CUDA backend of
``palm_fast::block_in_proj`` / ``palm_fast::block_out_proj``).

Input projection with RoPE + SwiGLU epilogue
--------------------------------------------
The reference block computes ``proj = xn @ W^T`` with ``W = in_proj.weight [Nin, d]`` laid
out ``q | k | v | value | gate`` (``H hd | Hk hd | Hk hd | F | F`` rows), then rotates q and
k, and ``h = silu(gate) * value``. Every output needs exactly one *partner* column:

* a rotary pair of a q or k head: ``(c, c + R/2)`` (rotate-half) or ``(c, c + 1)``
  (interleaved), rotated by ``theta = position * inv_freq[i]``:
  ``(a, b) -> (a cos - b sin, b cos + a sin)``;
* a pass-through pair of a head (features ``R..hd-1``) or of v: ``(c, c + 1)``, rotated by
  ``theta = 0`` (``freq = 0``: cos = 1, sin = 0 exactly, a plain copy);
* a SwiGLU pair ``(value f, gate f)``: ``h[f] = silu(b) * a``.

``pack_in_proj`` enumerates these P = (H + 2 Hk) hd / 2 + F pairs once and gathers the
weight rows into one ``[P, 2, d]`` buffer whose even / odd rows are ``w_a [P, d]`` (first
member) and ``w_b [P, d]`` (partner) as views, with the destination columns ``dst_a``,
``dst_b`` (in the reference ``proj`` numbering) and the frequency ``freq`` of every pair.
That re-layout is config-independent and is cached by the module
(``palm_fast.nn.ParallelBlock``); its ``state_dict`` keeps the reference layout.

``_in_proj_fwd`` runs as two launches over the pairs (``REGION``): the q / k / v pairs
(RoPE epilogue) and the SwiGLU pairs, so the SwiGLU tiles' kernel carries none of the RoPE
epilogue's registers (one kernel for both spilled ~4 KB per thread at every config). Per
``[BLOCK_M, BLOCK_N]`` tile of pairs it accumulates ``acc_a = xn @ w_a^T`` and
``acc_b = xn @ w_b^T`` in fp32: with the interleaved buffer (``INTERLEAVED``) as ONE dot
per K step against a ``[BK, 2 BLOCK_N]`` weight tile, split into the two members after the
loop; with separate ``w_a`` / ``w_b`` tensors as two dots sharing the A tile. The epilogue
writes q ``[M, H hd]``, k ``[M, Hk hd]``, v ``[M, Hk hd]`` (the layouts attention reads as
``[B, T, heads, hd]`` views) and ``h [M, F]``. The 2F-wide pre-activation reaches memory
only when ``STORE_FF`` (training: the SwiGLU backward needs it), as ``ff [M, 2F]``
(value | gate).

Given ``qkv_weight`` (what the block passes while ``QKV_VIA_GEMM``), the q / k / v columns
skip the RoPE region: a library GEMM writes them to a ``[M, (H + 2 Hk) hd]`` buffer and the
RoPE kernel rotates q and k out of it. On an H100 (bf16, 16384 x 2048 -> 2304 columns) that
took 0.28 ms against 0.86 ms for the fused RoPE region at its best config
(``benchmarks/results/h100/NOTES.md``).

On Hopper and newer GPUs (Triton with host TMA descriptors, bf16 / fp16, 16-byte aligned
rows, at least ``TMA_MIN_ROWS`` rows) the SwiGLU pairs run as ``_swiglu_tma`` instead: a
persistent GEMM (one program per SM, grouped tile order, the tile loop flattened with the K
loop) whose operand tiles arrive by TMA from the interleaved ``[2F, d]`` slice of the pair
buffer, with the same epilogue; h and the value / gate halves of ``ff`` are stored through
descriptors that clip at M and F. On an H100 it brought the whole input projection from
0.84x to 0.97x of one cuBLAS GEMM of the same shape (``benchmarks/results/h100/NOTES.md``).

Output projection with residual epilogue
----------------------------------------
``y = x + o @ W_attn_out^T + h @ W_ff_out^T`` is ONE GEMM with K = H hd + F: the K loop
walks the ``o`` segment (against ``W_attn_out [d, H hd]``) and then the ``h`` segment
(against ``W_ff_out [d, F]``) into one fp32 accumulator, and the epilogue adds the
residual ``x``. The A operand is the virtual concatenation ``[o | h]`` and B the virtual
concatenation ``[W_attn_out ; W_ff_out]``: neither activations nor weights are copied
into a concatenated buffer.

Tiling and numerics
-------------------
Grouped ("super-row") program order for L2 reuse; rows and pair columns are wrapped
(``% M``, ``% P``) for loads so only the K tail is masked, stores are masked. Operands are
bf16/fp16 on the GPU (tensor cores) with fp32 accumulation; under ``TRITON_INTERPRET=1``
(``UPCAST``) every loaded tile is upcast to fp32 because the interpreter cannot multiply
bf16. Autotune lists are short (``IN_PROJ_CONFIGS``,
``OUT_PROJ_CONFIGS``, each fits an H100's shared memory; each region of the input GEMM is
tuned on its own) and the tests run every config under the interpreter.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (
    capability,
    cdiv,
    check_launch_device,
    gpu_launch,
    interpreting,
    next_pow2,
    on_tensor_device,
    sm_count,
    smem_per_block,
)
from .rope import precise_trig, rope_cos_sin
from .swiglu import precise_exp, sigmoid_exp


def _cfg(bm, bn, bk, group, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


# Input projection: BLOCK_N counts pairs, so the tile covers 2 * BLOCK_N weight rows.
# Shared memory per stage (bf16): (BM + 2 BN) * BK * 2 bytes -> 48 / 48 / 32 / 32 / 16 KiB.
IN_PROJ_CONFIGS = [
    _cfg(128, 128, 64, 8, 8, 3),
    _cfg(128, 128, 64, 8, 8, 4),  # best for the SwiGLU region on an H100 (bf16, d=2048)
    _cfg(128, 64, 64, 8, 8, 4),   # best for the RoPE region (its epilogue needs registers)
    _cfg(128, 64, 64, 8, 4, 4),
    _cfg(64, 64, 32, 8, 4, 4),    # small M (decode, short prompts)
]
# Output projection: (BM + BN) * BK * 2 bytes per stage -> 48 / 32 / 32 / 8 KiB.
OUT_PROJ_CONFIGS = [
    _cfg(128, 256, 64, 8, 8, 3),
    _cfg(128, 128, 64, 8, 8, 4),
    _cfg(128, 128, 64, 8, 4, 4),
    _cfg(64, 64, 32, 8, 4, 4),
]
# Shared memory a config leaves free on the device beyond its pipeline buffers (barriers;
# the epilogue's layout conversions reuse the buffers: compiled kernels' shared memory
# equals their buffers' size on sm_80 / sm_89 / sm_90).
SMEM_RESERVE = 1024
H100_PIPELINE = (232448, (9, 0))   # (shared memory per block, capability) without a GPU


def pipeline_target(device: torch.device) -> tuple[int, tuple[int, int]]:
    """(shared memory per block, capability) the GEMM configs are fitted to: the GPU's (or the
    compile-only target's); an H100's under the interpreter (which has no limit)."""
    if gpu_launch(device):
        return smem_per_block(device), capability(device)
    return H100_PIPELINE


def fit_config(config: triton.Config, elem_bytes: int, b_rows: int = 1,
               target: tuple[int, tuple[int, int]] = H100_PIPELINE) -> triton.Config:
    """``config`` with fewer stages (then a shorter BLOCK_K) until its pipeline buffers fit
    the shared memory of ``target`` (see ``pipeline_target``) for operands of
    ``elem_bytes`` (fp32 tiles take twice bf16's space). ``b_rows`` is how many weight
    tiles of BLOCK_N rows each stage holds (2: the pairs). Triton's pipeliner keeps one
    buffer per stage on sm_90+ (wgmma), one fewer before (cp.async): measured by compiling
    for sm_80 / sm_89 / sm_90 (``tests/lower_for_gpu.py``)."""
    smem, cap = target
    budget = smem - SMEM_RESERVE
    kw = dict(config.kwargs)
    stages = config.num_stages
    spare = 0 if cap >= (9, 0) else 1

    def need():
        return max(stages - spare, 1) * (kw["BLOCK_M"] + b_rows * kw["BLOCK_N"]) * kw["BLOCK_K"] * elem_bytes

    while need() > budget and stages > 2:
        stages -= 1
    while need() > budget and kw["BLOCK_K"] > 16:
        kw["BLOCK_K"] //= 2
    return triton.Config(kw, num_warps=config.num_warps, num_stages=stages)


# The q / k / v columns of the input projection: a library GEMM + the RoPE kernel (True)
# or the epilogue GEMM's RoPE region (False). On an H100 (bf16, 16384 x 2048 -> 2304
# columns) the pair took 0.28 ms and the fused region 0.86 ms at its best config: its
# scattered q / k / v stores and per-element rotation keep it far from the GEMM's speed.
QKV_VIA_GEMM = True

def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 operands follow torch's TF32 switch for matmuls
    (off by default: IEEE fp32 products, as ``torch.mm`` gives), half types are exact."""
    if dtype != torch.float32:
        return "tf32"   # tl.dot's default; unused for bf16 / fp16 operands
    return "tf32" if not interpreting() and torch.backends.cuda.matmul.allow_tf32 else "ieee"


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ("super-row") order: (pid_m, pid_n) of tile ``pid``."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _load_k_tiles(a_ptrs, w_ptrs, k_left, offs_k, UPCAST: tl.constexpr, EVEN_K: tl.constexpr):
    """A tile ``[BM, BK]`` and W^T tile ``[BK, BN]`` with the K tail masked (zeros);
    unmasked when BLOCK_K divides K (``EVEN_K``)."""
    if EVEN_K:
        a = tl.load(a_ptrs)
        w = tl.load(w_ptrs)
    else:
        kmask = offs_k < k_left
        a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=kmask[:, None], other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
        w = w.to(tl.float32)
    return a, w


@triton.jit
def _in_proj_fwd(
    x_ptr,        # LayerNorm output xn [M, K]; unit column stride, row stride stride_xm
    wa_ptr,       # packed weight rows, first member of each pair [P, K] contiguous
    wb_ptr,       # packed weight rows, partner of each pair [P, K] contiguous
    dst_a_ptr,    # int32 [P]: column of the first member in the reference proj numbering
    dst_b_ptr,    # int32 [P]: column of the partner
    freq_ptr,     # fp32 [P]: rotation frequency of the pair (0 for pass-through / v / ff)
    pos_ptr,      # int32/int64 [M]: position of each row (token)
    q_ptr,        # out [M, HQ] (HQ = H hd), contiguous
    k_ptr,        # out [M, HKV] (HKV = Hk hd), contiguous
    v_ptr,        # out [M, HKV], contiguous
    h_ptr,        # out [M, F] = silu(gate) * value, contiguous
    ff_ptr,       # out [M, 2F] pre-activation value | gate (written when STORE_FF), contiguous
    M, K, P,      # rows, reduction size (d), number of pairs
    PAIR0, P_END,  # the pairs this launch covers: [PAIR0, P_END)
    M_BUCKET,     # next power of two >= M: the autotune key (unused by the kernel)
    P_QKV,        # pairs before the SwiGLU ones: (H + 2 Hk) hd / 2
    HQ, HKV, F,   # widths of q, of k (= of v), of h
    stride_xm,    # elements between rows of xn
    STORE_FF: tl.constexpr,    # also write the pre-activation (training)
    UPCAST: tl.constexpr,      # fp32 dot operands (interpreter)
    PRECISE_TRIG: tl.constexpr,  # libdevice cos/sin (GPU)
    PRECISE_EXP: tl.constexpr,   # libdevice exp in the SwiGLU sigmoid (fp32 on the GPU)
    DOT_PREC: tl.constexpr,    # tl.dot input precision ("ieee" / "tf32")
    EVEN_K: tl.constexpr,      # BLOCK_K divides K: no K-tail masks
    INTERLEAVED: tl.constexpr,  # w_a / w_b interleaved rows of one buffer (one dot per K step)
    REGION: tl.constexpr,      # 1: q / k / v pairs (RoPE epilogue), 2: SwiGLU pairs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, P_END - PAIR0, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_start = PAIR0 + pid_n * BLOCK_N
    pairs = n_start + tl.arange(0, BLOCK_N)
    rows_ld = (rows % M).to(tl.int64)          # wrapped for loads; stores are masked
    pairs_ld = (pairs % P).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + rows_ld[:, None] * stride_xm + offs_k[None, :]
    if INTERLEAVED:
        # w_a / w_b are the even / odd rows of one [2P, K] buffer: ONE [BK, 2 BN] weight
        # tile and ONE dot per K step (a 2 BN-wide accumulator, split into the pair
        # members after the loop: column 2j holds member a of pair j, 2j + 1 member b).
        wrows = ((2 * n_start + tl.arange(0, 2 * BLOCK_N)) % (2 * P)).to(tl.int64)
        w_ptrs = wa_ptr + wrows[None, :] * K + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a, w = _load_k_tiles(a_ptrs, w_ptrs, K - k0, offs_k, UPCAST, EVEN_K)
            acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc_a, acc_b = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
    else:
        wa_ptrs = wa_ptr + pairs_ld[None, :] * K + offs_k[:, None]
        wb_ptrs = wb_ptr + pairs_ld[None, :] * K + offs_k[:, None]
        acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a, wa = _load_k_tiles(a_ptrs, wa_ptrs, K - k0, offs_k, UPCAST, EVEN_K)
            if EVEN_K:
                wb = tl.load(wb_ptrs)
            else:
                wb = tl.load(wb_ptrs, mask=(offs_k < K - k0)[:, None], other=0.0)
            if UPCAST:
                wb = wb.to(tl.float32)
            acc_a = tl.dot(a, wa, acc_a, input_precision=DOT_PREC)
            acc_b = tl.dot(a, wb, acc_b, input_precision=DOT_PREC)
            a_ptrs += BLOCK_K
            wa_ptrs += BLOCK_K
            wb_ptrs += BLOCK_K

    # ---- epilogue: one region per launch, so the SwiGLU tiles' kernel carries none of the
    # RoPE epilogue's registers (its per-element trig and scattered q / k / v stores)
    row_ok = rows < M
    pair_ok = pairs < P_END
    rows64 = rows.to(tl.int64)
    if REGION == 1:
        # q / k / v pairs: rotate (by 0 for pass-through features and v: a plain copy)
        dst_a = tl.load(dst_a_ptr + pairs_ld)
        dst_b = tl.load(dst_b_ptr + pairs_ld)
        freq = tl.load(freq_ptr + pairs_ld)
        pos = tl.load(pos_ptr + rows_ld).to(tl.float32)
        theta = pos[:, None] * freq[None, :]
        cos, sin = rope_cos_sin(theta, PRECISE_TRIG)
        out_a = acc_a * cos - acc_b * sin
        out_b = acc_b * cos + acc_a * sin
        qkv_ok = row_ok[:, None] & pair_ok[None, :]
        _store_qkv(q_ptr, k_ptr, v_ptr, rows64, dst_a, out_a, qkv_ok, HQ, HKV)
        _store_qkv(q_ptr, k_ptr, v_ptr, rows64, dst_b, out_b, qkv_ok, HQ, HKV)
    else:
        # SwiGLU pairs: a = value, b = gate
        ff_ok = row_ok[:, None] & pair_ok[None, :]
        f = pairs - P_QKV
        h = acc_b / (1.0 + sigmoid_exp(-acc_b, PRECISE_EXP)) * acc_a
        tl.store(h_ptr + rows64[:, None] * F + f[None, :], h.to(h_ptr.dtype.element_ty), mask=ff_ok)
        if STORE_FF:
            ff_row = ff_ptr + rows64[:, None] * (2 * F) + f[None, :]
            tl.store(ff_row, acc_a.to(ff_ptr.dtype.element_ty), mask=ff_ok)
            tl.store(ff_row + F, acc_b.to(ff_ptr.dtype.element_ty), mask=ff_ok)


@triton.jit
def _store_qkv(q_ptr, k_ptr, v_ptr, rows64, col, val, mask, HQ, HKV):
    """Store ``val [BM, BN]`` at reference column ``col [BN]`` of q | k | v: one store
    through per-column base pointers and row strides (a [BN] select, not three masked
    [BM, BN] stores: the RoPE epilogue is register-bound)."""
    is_q = col < HQ
    is_k = col < HQ + HKV
    base = tl.where(is_q, q_ptr + col, tl.where(is_k, k_ptr + (col - HQ), v_ptr + (col - HQ - HKV)))
    stride = tl.where(is_q, HQ, HKV).to(tl.int64)
    tl.store(base[None, :] + rows64[:, None] * stride[None, :], val.to(q_ptr.dtype.element_ty), mask=mask)


try:  # host-side TMA descriptors (Triton >= 3.4); older Triton keeps the pointer kernel
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None


def _range_flattens() -> bool:
    """Whether ``tl.range`` takes ``flatten`` (newer Triton; the TMA kernel needs it)."""
    import inspect

    try:
        params = inspect.signature(tl.range.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return "flatten" in params


TMA_SUPPORTED = TensorDescriptor is not None and _range_flattens()
# The SwiGLU region through TMA as one persistent program per SM (``_swiglu_tma``). H100,
# bf16, 16384 x 2048 -> 8192 pairs: 1.52 ms (722 TFLOP/s, 0.93x cuBLAS's plain GEMM of the
# same 16384 columns) against 1.64-1.66 ms for the pointer kernel at its best config
# (probe 6); GROUP_M 16 1.53 ms against 1.63 ms with 8 (probe 7; both in
# benchmarks/results/h100/probes). Rows below TMA_MIN_ROWS (decode, short
# prompts) keep the pointer kernel and its small-tile configs.
TMA_CONFIG = dict(BM=128, BN=128, BK=64, GROUP_M=16, num_warps=8, num_stages=3)
TMA_MIN_ROWS = 1024
# Shared memory TMA_CONFIG's kernel takes, compiled for sm_90: 180,248 bytes (its three
# stages of [BM + 2 BN, BK] operand tiles, 144 KiB, and the epilogue). GPUs with less per
# block (sm_120: 99 KiB, where it compiles to 131,088 bytes) take the pointer kernel.
TMA_SMEM = 180248


@triton.jit
def _swiglu_tma(
    a_desc,       # xn [M, K], block [BM, BK]
    w_desc,       # the SwiGLU pairs' interleaved weight rows [2F, K] (2j value, 2j + 1 gate), block [2 BN, BK]
    h_desc,       # out h [M, F], block [BM, BN]
    val_desc,     # out ff[:, :F] (value pre-activation; written when STORE_FF), block [BM, BN]
    gate_desc,    # out ff[:, F:] (gate pre-activation), block [BM, BN]
    M, K, F,
    NUM_PROGS: tl.constexpr,   # programs launched (<= tiles): each walks tiles NUM_PROGS apart
    STORE_FF: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``h = silu(xn @ w_gate^T) * (xn @ w_value^T)``: a persistent grouped-order GEMM whose
    operand tiles arrive by TMA (no address arithmetic or masks in the K loop; out-of-range
    rows and columns read as zeros and are not stored); the tile loop is flattened with the
    K loop so one tile's epilogue overlaps the next tile's loads."""
    k_tiles = tl.cdiv(K, BK)
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BM) * tl.cdiv(F, BN), NUM_PROGS, flatten=True):
        pid_m, pid_n = _tile_ids(tile, M, F, BM, BN, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
        for kt in range(k_tiles):
            a = a_desc.load([off_m, kt * BK])
            w = w_desc.load([2 * off_n, kt * BK])
            if UPCAST:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w.T, acc)
        value, gate = tl.split(tl.reshape(acc, (BM, BN, 2)))
        h = gate / (1.0 + tl.exp(-gate)) * value
        h_desc.store([off_m, off_n], h.to(h_desc.dtype))
        if STORE_FF:
            val_desc.store([off_m, off_n], value.to(val_desc.dtype))
            gate_desc.store([off_m, off_n], gate.to(gate_desc.dtype))


def _tma_usable(xn: torch.Tensor, w_ff: torch.Tensor, h: torch.Tensor, force: bool | None) -> bool:
    """The TMA path's conditions: Triton with host descriptors, bf16 / fp16 operands, 16-byte
    aligned bases and row strides; on a GPU also compute capability >= 9.0 and enough rows.
    ``force`` True / False overrides the choice (tests); True still requires the layout."""
    if not TMA_SUPPORTED or xn.dtype not in (torch.bfloat16, torch.float16):
        return False
    eb = xn.element_size()
    for t in (xn, w_ff, h):
        if t.data_ptr() % 16 or (t.stride(0) * eb) % 16 or t.stride(-1) != 1:
            return False
    if force is not None:
        return force
    if interpreting() or not gpu_launch(xn.device):
        return False
    return (capability(xn.device)[0] >= 9 and xn.shape[0] >= TMA_MIN_ROWS
            and smem_per_block(xn.device) >= TMA_SMEM)


@on_tensor_device
def _swiglu_tma_launch(xn, w_ff, h, ff, store_ff: bool, config: dict | None = None):
    cfg = dict(TMA_CONFIG, **(config or {}))
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    M, K = xn.shape
    F = h.shape[1]
    a_desc = TensorDescriptor.from_tensor(xn, [BM, BK])
    w_desc = TensorDescriptor.from_tensor(w_ff, [2 * BN, BK])
    h_desc = TensorDescriptor.from_tensor(h, [BM, BN])
    # value and gate halves as two [M, F] descriptors: each clips its stores at F
    val_desc = TensorDescriptor.from_tensor(ff[:, :F] if store_ff else h, [BM, BN])
    gate_desc = TensorDescriptor.from_tensor(ff[:, F:] if store_ff else h, [BM, BN])
    tiles = cdiv(M, BM) * cdiv(F, BN)
    if gpu_launch(xn.device) and not interpreting():
        progs = min(tiles, sm_count(xn.device))
    else:
        progs = min(tiles, 3)  # the interpreter: a few programs, each walking several tiles
    _swiglu_tma[(progs,)](a_desc, w_desc, h_desc, val_desc, gate_desc, M, K, F, NUM_PROGS=progs,
                          STORE_FF=bool(store_ff), UPCAST=interpreting(), BM=BM, BN=BN, BK=BK,
                          GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"],
                          num_stages=cfg["num_stages"])


@triton.jit
def _mm_segment(acc, a_ptr, stride_am, w_ptr, stride_wn, rows_ld, cols_ld, K,
                UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_K: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """``acc += A[rows, :K] @ W[cols, :K]^T`` (W row-major ``[N, K]``, row stride stride_wn)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_ld[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + cols_ld[None, :] * stride_wn + offs_k[:, None]
    for k0 in range(0, K, BLOCK_K):
        a, w = _load_k_tiles(a_ptrs, w_ptrs, K - k0, offs_k, UPCAST, EVEN_K)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _out_proj_fwd(
    o_ptr,        # attention output [M, K1] (K1 = H hd); unit column stride, row stride stride_om
    h_ptr,        # SwiGLU output [M, K2] (K2 = F); unit column stride, row stride stride_hm
    wo_ptr,       # attn_out.weight [N, K1]; row stride stride_wo
    wf_ptr,       # ff_out.weight [N, K2]; row stride stride_wf
    res_ptr,      # residual x [M, N]; row stride stride_rm
    y_ptr,        # out [M, N] = x + o wo^T + h wf^T, contiguous
    M, N, K1, K2,
    M_BUCKET,     # next power of two >= M: the autotune key (unused by the kernel)
    stride_om, stride_hm, stride_wo, stride_wf, stride_rm,
    UPCAST: tl.constexpr,   # fp32 dot operands (interpreter)
    DOT_PREC: tl.constexpr,  # tl.dot input precision ("ieee" / "tf32")
    EVEN_K: tl.constexpr,    # BLOCK_K divides K1 and K2: no K-tail masks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ld = (rows % M).to(tl.int64)
    cols_ld = (cols % N).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _mm_segment(acc, o_ptr, stride_om, wo_ptr, stride_wo, rows_ld, cols_ld, K1,
                      UPCAST, DOT_PREC, EVEN_K, BLOCK_K)
    acc = _mm_segment(acc, h_ptr, stride_hm, wf_ptr, stride_wf, rows_ld, cols_ld, K2,
                      UPCAST, DOT_PREC, EVEN_K, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)
    res = tl.load(res_ptr + rows64[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
    y = acc + res.to(tl.float32)
    tl.store(y_ptr + rows64[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _in_even_k(meta):
    return meta["K"] % meta["BLOCK_K"] == 0


def _out_even_k(meta):
    return meta["K1"] % meta["BLOCK_K"] == 0 and meta["K2"] % meta["BLOCK_K"] == 0


# Autotuned launchers per operand size (fp32 configs are fitted to shared memory). The key
# holds M rounded up to a power of two, not M: prefill sees a new M for every prompt length,
# and tuning each one (compiling and timing every config) would cost seconds per new length.
# Built on first use: Triton 3.2's Autotuner asks the active GPU driver for its benchmarker
# when it is created, which fails on a machine without a GPU (this module is imported there).
@functools.cache
def _in_proj_tuned(eb: int, target: tuple[int, tuple[int, int]]):
    return triton.autotune([fit_config(c, eb, 2, target) for c in IN_PROJ_CONFIGS],
                           key=["M_BUCKET", "K", "PAIR0", "P_END", "STORE_FF", "DOT_PREC", "INTERLEAVED", "REGION"])(
        triton.heuristics({"EVEN_K": _in_even_k})(_in_proj_fwd))


@functools.cache
def _out_proj_tuned(eb: int, target: tuple[int, tuple[int, int]]):
    return triton.autotune([fit_config(c, eb, 1, target) for c in OUT_PROJ_CONFIGS],
                           key=["M_BUCKET", "N", "K1", "K2", "DOT_PREC"])(
        triton.heuristics({"EVEN_K": _out_even_k})(_out_proj_fwd))


# --------------------------------------------------------------------------- packing

@dataclass
class PackedInProj:
    """The input projection re-laid out in partner pairs (see the module docstring)."""

    w_a: torch.Tensor     # [P, d] weight rows of the first member of each pair
    w_b: torch.Tensor     # [P, d] weight rows of the partner
    dst_a: torch.Tensor   # int32 [P] reference column of the first member
    dst_b: torch.Tensor   # int32 [P] reference column of the partner
    freq: torch.Tensor    # fp32 [P] rotation frequency (0: no rotation)
    p_qkv: int            # number of q / k / v pairs (the rest are SwiGLU pairs)


def qkv_pairs(n_heads: int, n_kv_heads: int, head_dim: int) -> int:
    """Pairs of q / k / v columns in the packed layout, before the SwiGLU pairs: none for an
    odd head dim, whose pass-through features do not pair within a head (its q / k / v
    columns then take the library GEMM + RoPE kernel path alone, ``QKV_VIA_GEMM``)."""
    return 0 if head_dim % 2 else (n_heads + 2 * n_kv_heads) * head_dim // 2


def pair_columns(n_heads: int, n_kv_heads: int, head_dim: int, d_ff: int, rotary_half: int,
                 interleaved: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(col_a, col_b, freq_index)`` int64 ``[P]`` of every pair (freq_index -1: no rotation);
    the first ``qkv_pairs(...)`` are q / k / v pairs (none for an odd head dim)."""
    hd, R2 = head_dim, rotary_half
    if not 0 < R2 <= hd // 2:
        raise ValueError(f"head_dim {hd} / rotary dim {2 * R2}: expected an even rotary dim <= head dim")
    col_a, col_b, fidx = [], [], []
    n_rot_heads = n_heads + n_kv_heads
    v0 = n_rot_heads * hd
    if hd % 2 == 0:   # (an odd head dim: the SwiGLU pairs only, see qkv_pairs)
        i = torch.arange(R2)
        if interleaved:
            rot_a, rot_b = 2 * i, 2 * i + 1
        else:
            rot_a, rot_b = i, i + R2
        pas = torch.arange(2 * R2, hd, 2)                      # pass-through pairs (c, c + 1)
        head_a = torch.cat((rot_a, pas))
        head_b = torch.cat((rot_b, pas + 1))
        head_f = torch.cat((i, torch.full((pas.numel(),), -1)))
        base = (torch.arange(n_rot_heads) * hd)[:, None]
        col_a.append((base + head_a).flatten())
        col_b.append((base + head_b).flatten())
        fidx.append(head_f.repeat(n_rot_heads))
        vc = v0 + torch.arange(0, n_kv_heads * hd, 2)
        col_a.append(vc)
        col_b.append(vc + 1)
        fidx.append(torch.full((vc.numel(),), -1))
    f0 = v0 + n_kv_heads * hd
    fc = f0 + torch.arange(d_ff)
    col_a.append(fc)
    col_b.append(fc + d_ff)
    fidx.append(torch.full((d_ff,), -1))
    return torch.cat(col_a), torch.cat(col_b), torch.cat(fidx)


def is_interleaved(w_a: torch.Tensor, w_b: torch.Tensor) -> bool:
    """True when ``w_a`` / ``w_b`` are the even / odd rows of one contiguous ``[2P, d]``
    buffer (what ``pack_in_proj`` builds), so one weight tile holds both pair members."""
    if w_a.dim() != 2 or w_a.shape != w_b.shape or w_a.dtype != w_b.dtype:
        return False
    P, K = w_a.shape
    if P == 0 or K == 0:
        return False
    return (w_a.stride() == (2 * K, 1) and w_b.stride() == (2 * K, 1)
            and w_b.data_ptr() == w_a.data_ptr() + K * w_a.element_size())


def _pair_indices(n_heads: int, n_kv_heads: int, head_dim: int, d_ff: int, rotary_half: int,
                  interleaved: bool, device: torch.device):
    """``(rows [2P] int64, dst_a, dst_b int32 [P], freq_index [P] int64)`` of ``pair_columns``
    on ``device``: built on the host and copied over, so they are kept in eager mode by
    ``palm_fast``'s ``cached_constant`` (which also keeps those a CUDA graph captured: its
    replays re-lay out the weight with them, and a host copy is not allowed while a graph is
    captured). Traced (torch.compile), built in the graph."""
    key = (n_heads, n_kv_heads, head_dim, d_ff, rotary_half, interleaved, device)
    if torch.compiler.is_compiling():
        return _build_pair_indices(*key)
    return _cached_pair_indices()(*key)


def _build_pair_indices(n_heads, n_kv_heads, head_dim, d_ff, rotary_half, interleaved, device):
    col_a, col_b, fidx = pair_columns(n_heads, n_kv_heads, head_dim, d_ff, rotary_half, interleaved)
    rows = torch.stack((col_a, col_b), 1).flatten()
    return (rows.to(device), col_a.to(device=device, dtype=torch.int32),
            col_b.to(device=device, dtype=torch.int32), fidx.to(device))


@functools.cache
def _cached_pair_indices():
    from palm_fast.ops._dispatch import cached_constant  # (kernels/ imports no palm_fast at import)

    return cached_constant(maxsize=64)(_build_pair_indices)


def pack_in_proj(w_in: torch.Tensor, inv_freq: torch.Tensor, n_heads: int, n_kv_heads: int,
                 head_dim: int, d_ff: int, interleaved: bool) -> PackedInProj:
    """Gather ``in_proj.weight [Nin, d]`` into the pair layout (a copy; no autograd). Device
    ops only once the indices are kept (see ``_pair_indices``): it can be captured in a CUDA
    graph, so that the replay re-lays out the live weight."""
    dev = w_in.device
    rows, dst_a, dst_b, fidx = _pair_indices(n_heads, n_kv_heads, head_dim, d_ff, inv_freq.numel(),
                                             interleaved, dev)
    # (gathered on the weight's device: a copy of inv_freq to the host waited for the GPU,
    # once per block and call under torch.compile, which re-lays out in the graph)
    inv = inv_freq.detach().to(device=dev, dtype=torch.float32)
    freq = torch.where(fidx >= 0, inv[fidx.clamp(min=0)], torch.zeros((), device=dev))
    w = w_in.detach()
    # One [P, 2, d] buffer: w_a / w_b are its even / odd rows (views), so the kernel loads
    # both members of BLOCK_N pairs as one [2 BLOCK_N, d] tile (see ``is_interleaved``).
    w_ab = w.index_select(0, rows).view(-1, 2, w.shape[1])
    return PackedInProj(
        w_a=w_ab[:, 0],
        w_b=w_ab[:, 1],
        dst_a=dst_a,
        dst_b=dst_b,
        freq=freq,
        p_qkv=qkv_pairs(n_heads, n_kv_heads, head_dim),
    )


# --------------------------------------------------------------------------- launchers

def _meta(config: triton.Config | None, elem_bytes: int, b_rows: int,
          target: tuple[int, tuple[int, int]] = H100_PIPELINE) -> dict | None:
    """Explicit launch meta-parameters (fitted to ``target``'s shared memory), or None to
    autotune (GPU only)."""
    if config is None and interpreting():
        config = IN_PROJ_CONFIGS[-1]  # the smallest tile: fastest under the interpreter
    if config is None:
        return None
    config = fit_config(config, elem_bytes, b_rows, target)
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


@on_tensor_device
def in_proj(xn: torch.Tensor, packed: PackedInProj, pos: torch.Tensor, n_heads: int,
            n_kv_heads: int, head_dim: int, d_ff: int, *, store_ff: bool,
            config: triton.Config | None = None, qkv_weight: torch.Tensor | None = None,
            inv_freq: torch.Tensor | None = None, interleaved: bool = False,
            tma: bool | None = None, tma_config: dict | None = None):
    """``xn [M, d]`` -> ``(q [M, H hd], k [M, Hk hd], v [M, Hk hd], h [M, F], ff)``.

    q and k rotated by ``pos [M]`` (one position per row); ``ff [M, 2F]`` (value | gate
    pre-activation) when ``store_ff``, else an empty ``[0]`` tensor. ``config`` forces
    one of ``IN_PROJ_CONFIGS`` (tests); default: autotuned on the GPU.

    ``qkv_weight`` (the reference-layout rows ``q | k | v`` of the input weight,
    ``[(H + 2 Hk) hd, d]``, with ``inv_freq`` and ``interleaved``): the q / k / v columns
    are then a library GEMM followed by the RoPE kernel (``kernels.rope``) instead of the
    epilogue GEMM's RoPE region, which measured 3x slower than that pair on an H100 (see
    ``QKV_VIA_GEMM``); the SwiGLU columns always take the epilogue GEMM.

    The SwiGLU columns run as the persistent TMA kernel (``_swiglu_tma``) where it applies
    (see ``_tma_usable``; ``tma`` True / False forces it on or off, ``tma_config`` overrides
    ``TMA_CONFIG`` entries: tests), else as the pointer kernel's SwiGLU region.
    """
    check_launch_device(xn)
    pos = pos.contiguous()   # (the kernels index it densely)
    M, K = xn.shape
    if xn.stride(-1) != 1 or packed.w_a.shape[1] != K or packed.w_b.shape != packed.w_a.shape:
        raise ValueError(f"in_proj: expected xn [M, {K}] with a unit last stride and packed "
                         f"weights [P, {K}], got xn strides {xn.stride()}, weights "
                         f"{tuple(packed.w_a.shape)} / {tuple(packed.w_b.shape)}")
    w_interleaved = is_interleaved(packed.w_a, packed.w_b)
    if not w_interleaved and not (packed.w_a.is_contiguous() and packed.w_b.is_contiguous()):
        # Separate tensors, each read as a contiguous [P, K]. (torch.compile's inductor hands
        # the two views of pack_in_proj's buffer over as separate buffers that keep the views'
        # strides: a bare assert failed here, and under python -O rows were read with the
        # wrong stride.)
        packed = dataclasses.replace(packed, w_a=packed.w_a.contiguous(), w_b=packed.w_b.contiguous())
    HQ, HKV, F = n_heads * head_dim, n_kv_heads * head_dim, d_ff
    P = packed.w_a.shape[0]
    if qkv_weight is None and head_dim % 2 and HQ + 2 * HKV > 0:
        raise ValueError(f"head_dim: the epilogue GEMM's RoPE region needs q / k / v column pairs (an "
                         f"even head dim), got {head_dim}; pass qkv_weight (the library GEMM + RoPE "
                         f"kernel path)")
    dev, dt = xn.device, xn.dtype
    q = torch.empty(M, HQ, device=dev, dtype=dt)
    k = torch.empty(M, HKV, device=dev, dtype=dt)
    v = torch.empty(M, HKV, device=dev, dtype=dt)
    h = torch.empty(M, F, device=dev, dtype=dt)
    ff = torch.empty((M, 2 * F) if store_ff else (0,), device=dev, dtype=dt)
    if M == 0:
        return q, k, v, h, ff
    flags = dict(STORE_FF=bool(store_ff), UPCAST=interpreting(),
                 PRECISE_TRIG=precise_trig(xn.device), PRECISE_EXP=precise_exp(h), DOT_PREC=dot_precision(dt),
                 INTERLEAVED=w_interleaved)
    eb = 4 if dt == torch.float32 else 2
    target = pipeline_target(dev)
    meta = _meta(config, eb, 2, target)
    # Two launches: the q / k / v pairs (RoPE epilogue) and the SwiGLU pairs, each tuned on
    # its own (the RoPE epilogue needs many more registers than the SwiGLU one); or the
    # q / k / v columns through a library GEMM and the RoPE kernel.
    if qkv_weight is not None:
        _qkv_gemm_rope(xn, qkv_weight, inv_freq, pos, interleaved, q, k, v, n_heads, n_kv_heads,
                       head_dim)
    # the SwiGLU pairs' rows of the interleaved [2P, K] buffer, as one [2F, K] matrix
    w_ff = packed.w_a.as_strided((2 * (P - packed.p_qkv), K), (K, 1),
                                 packed.w_a.storage_offset() + 2 * packed.p_qkv * K) if w_interleaved else None
    # an explicit pointer-kernel ``config`` (tests) keeps the pointer kernel unless tma=True
    use_tma = (F > 0 and w_ff is not None and (config is None or bool(tma))
               and _tma_usable(xn, w_ff, h, tma))
    if use_tma:
        _swiglu_tma_launch(xn, w_ff, h, ff, store_ff, tma_config)
    for region, (p0, p1) in ((1, (0, packed.p_qkv)), (2, (packed.p_qkv, P))):
        if p1 <= p0 or (region == 1 and qkv_weight is not None) or (region == 2 and use_tma):
            continue
        args = (xn, packed.w_a, packed.w_b, packed.dst_a, packed.dst_b, packed.freq, pos,
                q, k, v, h, ff if store_ff else h, M, K, P, p0, p1, next_pow2(M),
                packed.p_qkv, HQ, HKV, F, xn.stride(0))
        if meta is None:
            grid = lambda m, n=p1 - p0: (cdiv(M, m["BLOCK_M"]) * cdiv(n, m["BLOCK_N"]),)  # noqa: E731
            _in_proj_tuned(eb, target)[grid](*args, **flags, REGION=region)
        else:
            grid = (cdiv(M, meta["BLOCK_M"]) * cdiv(p1 - p0, meta["BLOCK_N"]),)
            _in_proj_fwd[grid](*args, **flags, REGION=region, EVEN_K=K % meta["BLOCK_K"] == 0, **meta)
    return q, k, v, h, ff


def _qkv_gemm_rope(xn, qkv_weight, inv_freq, pos, interleaved, q, k, v, H, Hk, hd):
    """q / k / v of the input projection as ``xn @ qkv_weight^T`` (one library GEMM into a
    ``[M, (H + 2 Hk) hd]`` buffer, rounded to xn's dtype as the reference's projection is),
    then one RoPE launch that reads q and k in place in that buffer and writes the rotated
    q and k, and a copy of v."""
    from .rope import rope

    M = xn.shape[0]
    HQ, HKV = H * hd, Hk * hd
    assert qkv_weight.shape == (HQ + 2 * HKV, xn.shape[1]) and inv_freq is not None
    proj = xn @ qkv_weight.t()
    rope(proj[:, :HQ].view(1, M, H, hd), proj[:, HQ:HQ + HKV].view(1, M, Hk, hd), inv_freq,
         pos.view(1, M), pos_is_offset=False, interleaved=interleaved,
         q_out=q.view(1, M, H, hd), k_out=k.view(1, M, Hk, hd))
    v.copy_(proj[:, HQ + HKV:])


@on_tensor_device
def out_proj(o: torch.Tensor, h: torch.Tensor, x: torch.Tensor, w_attn_out: torch.Tensor,
             w_ff_out: torch.Tensor, *, config: triton.Config | None = None) -> torch.Tensor:
    """``y = x + o @ w_attn_out^T + h @ w_ff_out^T`` as one GEMM (K = H hd + F).

    o ``[M, H hd]``, h ``[M, F]``, x ``[M, d]`` (any row strides, unit column stride);
    weights ``[d, H hd]``, ``[d, F]``. Returns a contiguous ``[M, d]``.
    """
    check_launch_device(o)
    M, K1 = o.shape
    K2 = h.shape[1]
    N = x.shape[1]
    for name, t in (("o", o), ("h", h), ("x", x), ("w_attn_out", w_attn_out), ("w_ff_out", w_ff_out)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name}: expected a unit stride in the last dim (rows of any "
                             f"stride), got strides {tuple(t.stride())}")
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    args = (o, h, w_attn_out, w_ff_out, x, y, M, N, K1, K2, next_pow2(M),
            o.stride(0), h.stride(0), w_attn_out.stride(0), w_ff_out.stride(0), x.stride(0))
    eb = 4 if x.dtype == torch.float32 else 2
    target = pipeline_target(x.device)
    meta = _meta(config if config is not None or not interpreting() else OUT_PROJ_CONFIGS[-1], eb, 1, target)
    flags = dict(UPCAST=interpreting(), DOT_PREC=dot_precision(x.dtype))
    if meta is None:
        grid = lambda m: (cdiv(M, m["BLOCK_M"]) * cdiv(N, m["BLOCK_N"]),)  # noqa: E731
        _out_proj_tuned(eb, target)[grid](*args, **flags)
    else:
        grid = (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
        even = K1 % meta["BLOCK_K"] == 0 and K2 % meta["BLOCK_K"] == 0
        _out_proj_fwd[grid](*args, **flags, EVEN_K=even, **meta)
    return y
