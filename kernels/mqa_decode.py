"""Multi-query decode attention and the fused RoPE + KV-cache append: Triton kernels (the
CUDA backends of ``palm_fast::mqa_decode`` and ``palm_fast::rope_append``).

Decode math: sequence b has R query rows ``q[b, r]`` (its H heads, or the heads of all
members of a shared-prefix group) and ONE key/value head (MQA), keys ``[start_b, end_b)``::

    s_j = scale * q[b, r] . K_b[j];   lse = log sum_j exp(s_j);   o = sum_j exp(s_j - lse) V_b[j]

Tiling of ``_mqa_decode_split`` (grid ``(row blocks, splits, B)``): the R rows of a
sequence are packed into the M dimension of ``tl.dot`` (``BLOCK_R`` >= 16, so the H heads
of a step are one MMA tile: every K/V tile is loaded ONCE for all heads), the keys of a
sequence are cut into ``n_splits`` contiguous splits of ``split_len`` keys (split-KV), and
each program runs an online softmax over its split in blocks of ``BLOCK_N`` keys, writing
an fp32 partial output and its log-sum-exp. ``_mqa_decode_combine`` (one program per
(sequence, row)) merges the splits by log-sum-exp; in a shared-prefix decode's suffix pass
it also merges the prefix pass's output as one more partial (``prefix=``). Both kernels are
deterministic (no atomics, a fixed merge order).

CUDA graphs: the grid depends on B, R and the cache capacity (``max_len``), never on the
lengths, which are read on the device; a program whose split lies past its sequence's end
writes only its lse = -inf (the combine kernel does not read its output) and exits.

Paged caches: the page of every key is looked up in the page table per block
(``page_table[b, j // P]``, a vector gather), so any page size works (16..256 and more).

Split heuristic: enough programs to fill the GPU at batch 1, in whole waves: ``n_splits``
is the largest count with ``B * row_blocks * n_splits <= programs`` (SM count: a fixed
default under the interpreter), splits of at least 128 keys. ``programs`` is one per SM,
two per SM for an fp16 / bf16 paged cache on a GPU with >= 200 KiB of shared memory per
block (see ``decode_config``). On an H100 (bf16, CUDA graph replay) one per SM beat two per
SM for contiguous caches at every measured shape but one (48 x 256 heads, B=1, T=4096: 17.6
vs 16.9 us): B=64, T=32768: 705 vs 775 us; B=1, T=32768: 36 vs 53 us.

Under ``TRITON_INTERPRET=1`` (CPU tensors) every load is upcast to fp32 (the interpreter
keeps bf16 as raw bits); on the GPU the ``tl.dot`` operands stay fp16/bf16 (fp32 caches
use IEEE fp32 dots) with fp32 accumulation.

``_rope_append`` (grid ``(B * T,)``): rotates the H heads of q and the k row of one token
by ``theta_i = position * inv_freq[i]`` (rotate-half or interleaved pairs; features past
the rotary dim pass through), writes rotated q to ``q_out`` and, for ``t < n_new[b]``,
rotated k and v to cache index ``lengths[b] + t``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    cdiv,
    check_float_dtypes,
    check_launch_device,
    gpu_launch,
    interpreting,
    next_pow2,
    on_tensor_device,
    smem_per_block,
)
from .rope import precise_trig, rope_cos_sin

_INTERPRETER_SMS = 4  # the "SM count" used for the split heuristic under the interpreter
_MIN_SPLIT = 128      # fewest keys per split
# fewest keys per split when the keys read past the starts are bounded by a span (the
# shared-prefix decode's suffix pass). H100, bf16, 64 sequences x 48 x 256, 128-token
# suffixes in a 4352-token capacity (benchmarks/results/h100/session23/probe10.log, kernel
# times per call): 1 split 14.8 us, 2 splits 19.0, 4 (the capacity's count) 32.8, 8 39.8.
# An empty split still costs its program and the combine's pass over its lse.
_MIN_SPAN_SPLIT = 256


@triton.jit
def _mqa_decode_split(
    q_ptr,          # [B, R, hd] contiguous query rows (already rotated)
    k_ptr,          # key cache [L, N, P, hd] contiguous (contiguous: N = batch; paged: N = pages)
    v_ptr,          # value cache, same layout as k
    table_ptr,      # [B, n_blocks] int32 page table (PAGED), else unused
    starts_ptr,     # [B] int32 first key per sequence (HAS_STARTS), else 0
    ends_ptr,       # [B] int32 one past the last key per sequence
    o_part_ptr,     # out: [B, n_splits, R, hd] fp32 normalised partial outputs
    lse_part_ptr,   # out: [B, n_splits, R] fp32 partial log-sum-exp (-inf for an empty split)
    R,              # query rows per sequence
    hd,             # head dim
    layer_off,      # element offset of the layer in k / v (layer * N * P * hd)
    P,              # tokens per page (contiguous: max_len)
    n_blocks,       # page-table columns
    n_splits,       # splits per sequence (grid axis 1)
    split_len,      # keys per split (a multiple of BLOCK_N)
    qk_scale,       # scale * log2(e): scores are kept in base 2
    BLOCK_R: tl.constexpr,  # query rows per program (>= 16: the M of tl.dot)
    BLOCK_N: tl.constexpr,  # keys per inner block (the N of the first dot)
    BLOCK_D: tl.constexpr,  # head dim, padded to a power of two
    PAGED: tl.constexpr,    # look keys up through the page table
    HAS_STARTS: tl.constexpr,  # per-sequence start offsets given
    UPCAST: tl.constexpr,   # interpreter: compute in fp32 after every load
    IEEE_FP32: tl.constexpr,  # fp32 cache on GPU: exact fp32 dots (no tf32)
):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2)
    start = 0
    if HAS_STARTS:
        start = tl.maximum(tl.load(starts_ptr + b), 0)
    # (clamped to the cache: the host checks of the lengths are skipped under torch.compile,
    # and a bad length must not read outside the cache or the page table)
    end = tl.minimum(tl.load(ends_ptr + b), n_blocks * P if PAGED else P)
    j0 = start + pid_s * split_len
    j1 = tl.minimum(end, j0 + split_len)

    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    row_mask = rows < R
    d_mask = d < hd
    b64 = b.to(tl.int64)
    has_keys = (rows * 0 + j0) < j1  # (a vector: the interpreter rejects a scalar & vector mask)
    q = tl.load(q_ptr + (b64 * R + rows[:, None]) * hd + d[None, :],
                mask=(row_mask & has_keys)[:, None] & d_mask[None, :], other=0.0)  # (none if empty)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for jb in range(j0, j1, BLOCK_N):
        toks = jb + tl.arange(0, BLOCK_N)
        t_mask = toks < j1
        if PAGED:
            page = tl.load(table_ptr + b64 * n_blocks + toks // P, mask=t_mask, other=0)
            # (an unallocated entry is -1: never read before the cache, whatever the length)
            kv_row = tl.maximum(page, 0).to(tl.int64) * P + toks % P
        else:
            kv_row = b64 * P + toks
        kv_off = layer_off + kv_row[:, None] * hd + d[None, :]
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE_FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(t_mask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE_FP32:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # l_i is 0 only for a row without keys; a NaN score (NaN or inf in q / k) leaves l_i NaN,
    # which "!= 0" keeps: the row's output is NaN, as the reference's, not an empty row's 0
    # (a GPU max can drop NaN operands, so m_i alone would not show it).
    nonempty = l_i != 0.0
    o = tl.where(nonempty[:, None], acc / tl.where(nonempty, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    part = (b64 * n_splits + pid_s) * R + rows
    # An empty split (past its sequence's end) writes only its lse = -inf: the combine
    # kernel does not read the outputs of such splits (o = 0 there, weight 0), which saves
    # an R x hd fp32 write and read per empty split (a short sequence in a long cache; the
    # shared-prefix suffix pass when its splits cover more than its span)
    tl.store(o_part_ptr + part[:, None] * hd + d[None, :], o,
             mask=(row_mask & has_keys)[:, None] & d_mask[None, :])
    tl.store(lse_part_ptr + part, lse, mask=row_mask)


@triton.jit
def _mqa_decode_combine(
    o_part_ptr,     # [B, n_splits, R, hd] fp32 partial outputs
    lse_part_ptr,   # [B, n_splits, R] fp32 partial log-sum-exp
    o_ptr,          # out: [B, R, hd] (fp32 or the query dtype)
    lse_ptr,        # out: [B, R] fp32 log-sum-exp over all splits
    pre_o_ptr,      # HAS_PREFIX: [*, R, hd] fp32 normalised prefix outputs (row slot[b] * R + r)
    pre_lse_ptr,    # HAS_PREFIX: [*, R] fp32 their log-sum-exp
    slot_ptr,       # HAS_PREFIX: [B] int32 prefix slot per sequence (-1: none)
    R,              # query rows per sequence
    hd,             # head dim
    n_splits,       # splits per sequence
    BLOCK_S: tl.constexpr,  # n_splits padded to a power of two (the lse vector)
    CHUNK_S: tl.constexpr,  # splits whose partial outputs are merged per step
    BLOCK_D: tl.constexpr,  # head dim padded to a power of two
    HAS_PREFIX: tl.constexpr,  # merge a shared-prefix pass's output as one more partial
):
    row = tl.program_id(0).to(tl.int64)  # b * R + r
    b = row // R
    r = row % R
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_part_ptr + (b * n_splits + sp) * R + r, mask=sp < n_splits, other=float("-inf"))
    m = tl.max(lse, axis=0)
    if HAS_PREFIX:
        slot = tl.load(slot_ptr + b)
        member = slot >= 0
        prow = tl.maximum(slot, 0).to(tl.int64) * R + r
        lse_p = tl.where(member, tl.load(pre_lse_ptr + prow), float("-inf"))  # row slot 0 exists
        m = tl.maximum(m, lse_p)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.sum(tl.exp(lse - m_safe), axis=0)  # empty splits weigh 0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_PREFIX:
        w_p = tl.exp(lse_p - m_safe)  # 0 outside groups
        den += w_p
        o_p = tl.load(pre_o_ptr + prow * hd + d, mask=d < hd, other=0.0)
        acc += w_p * tl.where(member, o_p, 0.0)  # not 0 * another group's row (NaN stays out)
    for s0 in range(0, n_splits, CHUNK_S):  # a fixed order: deterministic
        sc = s0 + tl.arange(0, CHUNK_S)
        part = (b * n_splits + sc) * R + r
        lse_c = tl.load(lse_part_ptr + part, mask=sc < n_splits, other=float("-inf"))
        w = tl.exp(lse_c - m_safe)
        # (an empty split's output is not written: lse -inf, read as o = 0, as it would be)
        o = tl.load(o_part_ptr + part[:, None] * hd + d[None, :],
                    mask=((sc < n_splits) & (lse_c != float("-inf")))[:, None] & (d < hd)[None, :], other=0.0)
        acc += tl.sum(o * w[:, None], axis=0)
    keys = den != 0.0  # False only without keys: a NaN partial stays NaN (see the split kernel)
    out = tl.where(keys, acc / tl.where(keys, den, 1.0), 0.0)
    tl.store(o_ptr + row * hd + d, out.to(o_ptr.dtype.element_ty), mask=d < hd)
    tl.store(lse_ptr + row, tl.where(keys, m_safe + tl.log(tl.where(keys, den, 1.0)), float("-inf")))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a fixed default under the interpreter."""
    if not gpu_launch(device):
        return _INTERPRETER_SMS
    return _common.sm_count(device)


def _fit_splits(capacity: int, n_splits: int, block_n: int) -> tuple[int, int]:
    """(split count, keys per split) for about ``n_splits`` splits of whole ``block_n`` blocks
    covering ``capacity`` keys."""
    split_len = max(block_n, cdiv(cdiv(capacity, n_splits), block_n) * block_n)
    return max(1, cdiv(capacity, split_len)), split_len


def decode_config(B: int, R: int, hd: int, capacity: int, n_sms: int, elem_bytes: int = 2,
                  smem: int = 232448, paged: bool = False, span: int | None = None) -> dict:
    """Tile sizes and the split count (a function of shapes and the cache capacity only,
    never of the lengths: the grid stays fixed for CUDA graphs). ``elem_bytes``: the cache's
    element size; ``smem``: shared memory per block (``smem_per_block``; default an H100's);
    ``paged``: keys are looked up through a page table; ``span``: at most this many keys
    past each sequence's start are read (the splits cover the span, not the capacity)."""
    block_d = max(16, next_pow2(hd))  # tl.dot needs K >= 16
    # All H <= 64 heads of a sequence in one M tile (PaLM: 48 heads -> 64 rows), so each K/V
    # tile is loaded once per split; more rows (shared-prefix groups) take several tiles.
    block_r = min(max(16, next_pow2(R)), 64)
    block_n = 64 if block_d <= 128 else 32
    num_stages = 3
    if elem_bytes * block_d >= 512 and smem < 140 * 1024:
        # GPUs with 99 KiB per block (sm_86 / sm_89 / sm_120), compiled for sm_89: bf16 at
        # head dim 256 took 102,400 bytes (contiguous cache; 2 stages: 69,632); fp32 at 128
        # with 48 heads 114,944; fp32 at 256 139,648 (fewer stages do not shrink it, half the
        # rows per tile and 16 keys per step do: 67,712)
        num_stages, block_r = 2, min(block_r, 32)
        if elem_bytes * block_d >= 1024:
            block_n = 16
    # 4 warps (fp16 / bf16): measured on an H100 (bf16) faster than 8 at head dim 256 (775
    # vs 917 us at B=64, T=32768, 48 heads) and equal at 128
    num_warps = 4
    if elem_bytes == 4:
        # fp32 caches: exact fp32 dots run on the FMA units, from registers. Compiled for
        # sm_90 (Triton 3.6, cuobjdump), the bf16 tiles spilled 700 to 12,400 bytes per
        # thread (48 x 256: 64 rows x 32 keys, 4 warps: 12,416; 16 x 128: 16 x 64: 704;
        # 12 x 80: 680); 8 warps with at most 32 rows and 16 keys per step (head dim > 128)
        # or 32 (<= 128) spill none (76-108 registers; 64 x 32 with 8 warps still spilled 48)
        num_warps, block_r = 8, min(block_r, 32)
        block_n = 16 if block_d > 128 else 32
    if R > 64 and block_d == 256 and elem_bytes == 2 and smem >= 200 * 1024:
        # More than one 64-row tile per sequence (a shared-prefix pass: all members' rows
        # over the prefix, compute-bound; also a decode with more than 64 heads) at head dims
        # 129-256. H100, bf16, 64 sequences x 48 heads over a 4096-token prefix
        # (benchmarks/results/h100/session19/shared_prefix_tiles.log): 128 rows x 64 keys, 8
        # warps, 5 splits (the sweep kept the paged heuristic's count; that log's "default
        # tiles" line printed the contiguous one, 2: NOTES.md, nineteenth section) 73.1 us
        # (176 TFLOP/s) against 86.9 us with the decode tiles; 4 splits 78.7, 8 splits 90.1.
        # One program per SM gives those 5 splits here. Only head dim 256 was measured.
        block_r, block_n, num_warps = 128, 64, 8
    row_blocks = cdiv(R, block_r)
    # Splits of at least _MIN_SPLIT keys: each split writes an fp32 partial of R x hd, which
    # must stay small next to the K/V bytes it reads.
    keys, min_split = capacity, _MIN_SPLIT
    if span is not None and span < capacity:
        keys, min_split = max(1, span), _MIN_SPAN_SPLIT
    max_splits = max(1, cdiv(keys, max(min_split, block_n)))
    # Programs per wave (H100, bf16; benchmarks/results/h100/session19/probe9_decode.py):
    # - contiguous: one per SM (more cost partials and did not read faster);
    # - paged, fp16 / bf16 on GPUs with >= 200 KiB of shared memory per block (H100): two
    #   per SM. Each block's page-table gather comes before its K/V loads, and a second
    #   resident program hides it (same tiles; T=32768, the bench's eager calls): 48 x 256:
    #   B=64 919 -> 745 us (96% of copy), B=8 139 -> 118 us; 16 x 128, B=64: 510 -> 377 us
    #   (95%); 16 x 128, B=64, T=4096: 145 -> 69 us. Two such programs fit on an SM (the paged
    #   48 x 256 split plans 96 KiB); an fp32 one plans up to 140 KiB (one per SM: a second
    #   wave), and the 99 KiB GPUs were not measured;
    # - 128-row tiles (the shared-prefix pass above): one per SM, as measured.
    two = paged and elem_bytes == 2 and smem >= 200 * 1024 and block_r <= 64
    programs = n_sms * (2 if two else 1)
    n_splits, split_len = _fit_splits(keys, min(max_splits, max(1, programs // (B * row_blocks))),
                                      block_n)
    return dict(BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d, row_blocks=row_blocks,
                n_splits=n_splits, split_len=split_len, num_warps=num_warps, num_stages=num_stages)


_TILE_KEYS = ("BLOCK_R", "BLOCK_N", "num_warps", "num_stages")


def _override(cfg: dict, B: int, R: int, capacity: int, n_splits: int | None, tiles: dict | None) -> dict:
    """``cfg`` with the tile sizes of ``tiles`` and the split count ``n_splits`` imposed (tests
    and tuning probes); the split length is refitted to whole ``BLOCK_N`` blocks."""
    cfg = dict(cfg)
    for key, val in (tiles or {}).items():
        if key not in _TILE_KEYS:
            raise ValueError(f"tiles: unknown key {key!r}; expected some of {_TILE_KEYS}")
        low = 16 if key.startswith("BLOCK") else 1
        if isinstance(val, bool) or not isinstance(val, int) or val < low or (key != "num_stages"
                                                                             and val & (val - 1)):
            raise ValueError(f"tiles[{key!r}]: expected a power of two >= {low}, got {val!r}")
        cfg[key] = val
    cfg["row_blocks"] = cdiv(R, cfg["BLOCK_R"])
    if n_splits is None and tiles and ("BLOCK_R" in tiles or "BLOCK_N" in tiles):
        n_splits = cfg["n_splits"]  # keep the heuristic's count, refitted to the new blocks
    if n_splits is not None:
        if isinstance(n_splits, bool) or not isinstance(n_splits, int) or n_splits < 1:
            raise ValueError(f"n_splits: expected an int >= 1, got {n_splits!r}")
        cfg["n_splits"], cfg["split_len"] = _fit_splits(capacity, n_splits, cfg["BLOCK_N"])
    return cfg


_GRID_Z_MAX = 65535   # CUDA's largest grid extent on the y and z axes


@on_tensor_device
def mqa_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               page_table: torch.Tensor | None, starts: torch.Tensor | None, ends: torch.Tensor,
               layer: int, scale: float, fp32_out: bool, *, prefix: tuple | None = None,
               n_splits: int | None = None, tiles: dict | None = None,
               span: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[B, R, hd]`` over keys ``[starts[b], ends[b])`` of ``layer`` of the cache ``[L, N, P,
    hd]`` -> (o ``[B, R, hd]`` fp32 or q's dtype, lse ``[B, R]`` fp32).
    ``prefix = (o_pre, lse_pre, slot)``: a shared-prefix pass's fp32 outputs (rows ``slot[b] *
    R + r``; ``slot`` int32 ``[B]``, -1 for none) merged in by log-sum-exp by the combine
    kernel, so that the shared-prefix decode needs no separate merge. The slots are not read
    on the host (graph capture): they must index rows of ``o_pre`` (``KVCache.decode_meta``
    builds them so). ``span``: no sequence reads more than ``span`` keys past its start
    (``ends[b] - starts[b] <= span``; the shared-prefix suffix pass: the capacity minus the
    shortest prefix, known on the host): the splits cover the span, not the whole capacity.
    Keys past ``starts[b] + span`` would not be read: the caller guarantees the bound.
    ``n_splits`` and
    ``tiles`` (some of ``BLOCK_R``, ``BLOCK_N``, ``num_warps``, ``num_stages``) override the
    heuristic: for tests and tuning probes (e.g. ``benchmarks/results/h100/probes/
    shared_prefix_tiles.py``)."""
    check_launch_device(q)
    check_float_dtypes("q, k_cache, v_cache", q, k_cache, v_cache)
    B, R, hd = q.shape
    L, N, P, _ = k_cache.shape
    if not (q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("q, k_cache, v_cache: expected contiguous tensors")
    if B > _GRID_Z_MAX:   # (B is the grid's z axis)
        raise ValueError(f"q: expected at most {_GRID_Z_MAX} sequences per decode call (CUDA's grid "
                         f"limit on the axis that holds them), got batch {B}; split the batch")
    paged = page_table is not None
    capacity = page_table.shape[1] * P if paged else P
    if span is not None and (isinstance(span, bool) or not isinstance(span, int) or span < 1):
        raise ValueError(f"span: expected None or an int >= 1, got {span!r}")
    cfg = decode_config(B, R, hd, capacity, sm_count(q.device), q.element_size(),
                        smem_per_block(q.device) if gpu_launch(q.device) else 232448, paged, span)
    if n_splits is not None or tiles:
        cfg = _override(cfg, B, R, capacity if span is None else min(span, capacity), n_splits, tiles)
    S = cfg["n_splits"]
    if S > _GRID_Z_MAX:   # (only an override can ask for that many: the grid's y axis)
        raise ValueError(f"n_splits: expected at most {_GRID_Z_MAX}, got {S}")
    o_part = torch.empty(B, S, R, hd, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, S, R, dtype=torch.float32, device=q.device)
    o = torch.empty(B, R, hd, dtype=torch.float32 if fp32_out else q.dtype, device=q.device)
    lse = torch.empty(B, R, dtype=torch.float32, device=q.device)
    if B == 0 or R == 0:
        return o, lse
    LOG2E = 1.4426950408889634
    upcast = interpreting()
    _mqa_decode_split[(cfg["row_blocks"], S, B)](
        q, k_cache, v_cache, page_table if paged else ends, starts if starts is not None else ends, ends,
        o_part, lse_part, R, hd, layer * N * P * hd, P, page_table.shape[1] if paged else 0, S,
        cfg["split_len"], scale * LOG2E,
        BLOCK_R=cfg["BLOCK_R"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], PAGED=paged,
        HAS_STARTS=starts is not None, UPCAST=upcast,
        IEEE_FP32=(q.dtype == torch.float32 and not upcast), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    if prefix is not None:
        o_pre, lse_pre, slot = prefix
        if not (o_pre.dtype == lse_pre.dtype == torch.float32 and slot.dtype == torch.int32
                and o_pre.is_contiguous() and lse_pre.is_contiguous() and slot.is_contiguous()
                and o_pre.shape[-1] == hd and o_pre.numel() == lse_pre.numel() * hd
                and lse_pre.numel() % R == 0 and slot.shape == (B,)):
            raise ValueError(f"prefix: expected contiguous fp32 o_pre [*, {R}, {hd}] and lse_pre [*, {R}] "
                             f"and an int32 slot [{B}]")
    else:
        o_pre, lse_pre, slot = o_part, lse_part, ends  # unused (HAS_PREFIX=False)
    _mqa_decode_combine[(B * R,)](o_part, lse_part, o, lse, o_pre, lse_pre, slot, R, hd, S,
                                  BLOCK_S=next_pow2(S), CHUNK_S=min(16, next_pow2(S)),
                                  BLOCK_D=cfg["BLOCK_D"], HAS_PREFIX=prefix is not None,
                                  num_warps=4 if cfg["BLOCK_D"] <= 128 else 8)
    return o, lse


# ------------------------------------------------------------------ rope + append
@triton.jit
def _rope_rotate(x_ptr, out_ptr, idx1, idx2, mask, c, s):
    """Rotate the pairs (x[idx1], x[idx2]) by (c, s) from x_ptr into out_ptr (fp32 math)."""
    x1 = tl.load(x_ptr + idx1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + idx2, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx1, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + idx2, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_append(
    q_ptr,          # [B, T, H, hd] new queries (strides below; unit last stride)
    k_ptr,          # [B, T, hd] new keys (unit last stride)
    v_ptr,          # [B, T, hd] new values (unit last stride)
    q_out_ptr,      # out: [B, T, H, hd] contiguous rotated queries
    k_cache_ptr,    # key cache [L, N, P, hd] contiguous (written)
    v_cache_ptr,    # value cache, same layout (written)
    table_ptr,      # [B, n_blocks] int32 page table (PAGED)
    lengths_ptr,    # [B] int32 tokens cached: token t is written at lengths[b] + t
    n_new_ptr,      # [B] int32: tokens t < n_new[b] are written
    pos_ptr,        # [B, T] int32/int64 positions (HAS_POS), else lengths[b] + t
    inv_freq_ptr,   # [half] fp32 inverse frequencies (half = rotary dim / 2; 0: plain append)
    T, H, hd, half,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_vb, stride_vt,
    layer_off,      # element offset of the layer in the caches
    P,              # tokens per page (contiguous: max_len)
    n_blocks,       # page-table columns
    BLOCK_H: tl.constexpr,     # heads, padded to a power of two
    BLOCK_HALF: tl.constexpr,  # half, padded to a power of two (>= 1)
    BLOCK_D: tl.constexpr,     # head dim, padded to a power of two
    PAGED: tl.constexpr,
    HAS_POS: tl.constexpr,
    INTERLEAVED: tl.constexpr,  # pairs (2i, 2i+1) instead of (i, i + half)
    PRECISE_TRIG: tl.constexpr,  # libdevice cos/sin (GPU), as kernels/rope.py
):
    tok = tl.program_id(0)
    b = tok // T
    t = tok % T
    length = tl.load(lengths_ptr + b)
    if HAS_POS:
        pos = tl.load(pos_ptr + tok).to(tl.float32)
    else:
        pos = (length + t).to(tl.float32)
    f = tl.arange(0, BLOCK_HALF)
    f_mask = f < half
    theta = pos * tl.load(inv_freq_ptr + f, mask=f_mask, other=0.0)
    c, s = rope_cos_sin(theta, PRECISE_TRIG)
    if INTERLEAVED:
        i1 = 2 * f
        i2 = 2 * f + 1
    else:
        i1 = f
        i2 = f + half
    d = tl.arange(0, BLOCK_D)
    rest = (d >= 2 * half) & (d < hd)  # features past the rotary dim pass through
    b64 = b.to(tl.int64)
    t64 = t.to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    h_mask = h < H
    q_row = q_ptr + b64 * stride_qb + t64 * stride_qt + h[:, None].to(tl.int64) * stride_qh
    qo_row = q_out_ptr + ((b64 * T + t64) * H + h[:, None]) * hd
    qm = h_mask[:, None] & f_mask[None, :]
    _rope_rotate(q_row, qo_row, i1[None, :], i2[None, :], qm, c[None, :], s[None, :])
    qr = tl.load(q_row + d[None, :], mask=h_mask[:, None] & rest[None, :], other=0.0)
    tl.store(qo_row + d[None, :], qr, mask=h_mask[:, None] & rest[None, :])

    if t < tl.load(n_new_ptr + b):
        idx = length + t
        if PAGED:
            page = tl.load(table_ptr + b64 * n_blocks + idx // P).to(tl.int64)
            row = page * P + idx % P
        else:
            row = b64 * P + idx
        dst = layer_off + row * hd
        k_row = k_ptr + b64 * stride_kb + t64 * stride_kt
        _rope_rotate(k_row, k_cache_ptr + dst, i1, i2, f_mask, c, s)
        kr = tl.load(k_row + d, mask=rest, other=0.0)
        tl.store(k_cache_ptr + dst + d, kr, mask=rest)
        vr = tl.load(v_ptr + b64 * stride_vb + t64 * stride_vt + d, mask=d < hd, other=0.0)
        tl.store(v_cache_ptr + dst + d, vr, mask=d < hd)


@on_tensor_device
def rope_append(q, k, v, k_cache, v_cache, page_table, lengths, n_new, positions, inv_freq, layer,
                interleaved) -> torch.Tensor:
    """Rotated q ``[B, T, H, hd]`` (contiguous); rotated k and v written into the cache at
    ``lengths[b] + t`` for ``t < n_new[b]`` (see the module docstring)."""
    check_launch_device(k)
    check_float_dtypes("q, k, v, k_cache, v_cache", q, k, v, k_cache, v_cache)
    B, T, H, hd = q.shape
    L, N, P, _ = k_cache.shape
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if B * T == 0:
        return q_out
    half = inv_freq.numel()
    paged = page_table is not None
    if positions is not None:
        positions = positions.contiguous()
    # Zero-size tensors (a plain append: no q heads, no frequencies) may have no storage:
    # pass a real tensor in their place (never read: every access is masked off).
    q_arg, qo_arg = (q, q_out) if H else (k, k)
    _rope_append[(B * T,)](
        q_arg, k, v, qo_arg, k_cache, v_cache, page_table if paged else lengths, lengths, n_new,
        positions if positions is not None else lengths, inv_freq if half else lengths, T, H, hd, half,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        layer * N * P * hd, P, page_table.shape[1] if paged else 0,
        BLOCK_H=next_pow2(max(H, 1)), BLOCK_HALF=next_pow2(max(half, 1)),
        BLOCK_D=next_pow2(hd), PAGED=paged, HAS_POS=positions is not None,
        INTERLEAVED=bool(interleaved), PRECISE_TRIG=precise_trig(q.device), num_warps=4)
    return q_out
