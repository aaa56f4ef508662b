"""Multi-query decoding against a ``palm_fast.kv_cache.KVCache``: ``rope_append`` (RoPE on
the new q and k, k and v written into the cache) and ``mqa_decode`` (one new query token
per sequence attending over its cached keys).

Math (reference: ``palm_fast.reference.layers.attention`` / ``RotaryEmbedding``). For
sequence b with keys ``K_b[j]``, values ``V_b[j]``, ``j in [start_b, end_b)``, and each of
the R query rows ``q[b, r]``::

    s_j = scale * q[b, r] . K_b[j];   lse = log sum_j exp(s_j);   o = sum_j exp(s_j - lse) V_b[j]

Custom ops (CPU -> C++ ``palm_fast._C``, CUDA -> Triton ``palm_fast.kernels.mqa_decode``):

* ``palm_fast::rope_append(q, k, v, k_cache!, v_cache!, page_table?, lengths, n_new,
  positions?, inv_freq, layer, interleaved) -> q_rot``: rotates q ``[B, T, H, hd]`` and
  k ``[B, T, hd]`` at positions ``positions[b, t]`` (default ``lengths[b] + t``) and writes
  rotated k and v at cache index ``lengths[b] + t`` for ``t < n_new[b]``. An empty
  ``inv_freq`` (and q with 0 heads) is a plain append (``KVCache.append``).
* ``palm_fast::mqa_decode(q, k_cache, v_cache, page_table?, starts?, ends, layer, scale,
  fp32_out) -> (o, lse)``: q ``[B, R, hd]`` (R query rows, e.g. the H heads) over the keys
  ``[starts[b], ends[b])`` of ``layer``; o ``[B, R, hd]`` (fp32 or q's dtype), lse
  ``[B, R]`` fp32 (``-inf`` with o = 0 for an empty range).

Shared prefixes (``KVCache.fork``): the decode of a prefix group runs the same op once over
the group's shared pages with all members' query rows stacked (``n_members * H`` rows),
then per sequence over the rest, and merges the two by log-sum-exp.

Inference only: no autograd; the public functions raise when grad is required.
"""
from __future__ import annotations

import math
import weakref

import torch

from palm_fast._ext import cpp
from palm_fast.kernels._common import check_float_dtypes
from palm_fast.kv_cache import KVCache
from palm_fast.reference.functional import rope_inv_freq

from ._checks import check_bool, check_float, check_int
from ._dispatch import cached_constant, check_traced, compiling, cuda_capturing
from .rope import _cached_inv_freq

__all__ = ["rope_append", "mqa_decode", "append_kv"]

_INT_DTYPES = (torch.int32, torch.int64)


def _triton():
    from palm_fast.kernels import mqa_decode as kernels

    return kernels


# ---------------------------------------------------------------- custom ops
@torch.library.custom_op("palm_fast::rope_append", mutates_args=("k_cache", "v_cache"))
def rope_append_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, page_table: torch.Tensor | None, lengths: torch.Tensor,
                   n_new: torch.Tensor, positions: torch.Tensor | None, inv_freq: torch.Tensor,
                   layer: int, interleaved: bool) -> torch.Tensor:
    raise NotImplementedError(f"palm_fast::rope_append: no kernel for device {q.device} (cpu or cuda)")


def _rope_append_cpu(q, k, v, k_cache, v_cache, page_table, lengths, n_new, positions, inv_freq,
                     layer, interleaved):
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format)   # (not a torch.Size: 1.5 us)
    if positions is not None:
        positions = positions.contiguous()
    cpp().rope_append_cpu(q, k, v, k_cache, v_cache, page_table, lengths, n_new, positions,
                          inv_freq, q_out, layer, interleaved)
    return q_out


@rope_append_op.register_kernel("cpu")
def _rope_append_cpu_op(*args):
    """The raw op's CPU kernel: the dtype check the public functions make before they call
    ``_rope_append_cpu`` (the C++ kernel computes an fp64 cache in fp32)."""
    check_float_dtypes("q, k, v, k_cache, v_cache", *args[:5])
    return _rope_append_cpu(*args)


@rope_append_op.register_kernel("cuda")
def _rope_append_cuda(q, k, v, k_cache, v_cache, page_table, lengths, n_new, positions, inv_freq,
                      layer, interleaved):
    return _triton().rope_append(q, k, v, k_cache, v_cache, page_table, lengths, n_new, positions,
                                 inv_freq, layer, interleaved)


@rope_append_op.register_fake
def _(q, k, v, k_cache, v_cache, page_table, lengths, n_new, positions, inv_freq, layer, interleaved):
    return q.new_empty(q.shape)


@torch.library.custom_op("palm_fast::mqa_decode", mutates_args=())
def mqa_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  page_table: torch.Tensor | None, starts: torch.Tensor | None, ends: torch.Tensor,
                  layer: int, scale: float, fp32_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    raise NotImplementedError(f"palm_fast::mqa_decode: no kernel for device {q.device} (cpu or cuda)")


def _mqa_decode_cpu(q, k_cache, v_cache, page_table, starts, ends, layer, scale, fp32_out):
    o, lse = cpp().mqa_decode_cpu(q, k_cache, v_cache, page_table, starts, ends, layer, scale, fp32_out)
    return o, lse


@mqa_decode_op.register_kernel("cpu")
def _mqa_decode_cpu_op(*args):
    """The raw op's CPU kernel (as ``_rope_append_cpu_op``)."""
    check_float_dtypes("q, k_cache, v_cache", *args[:3])
    return _mqa_decode_cpu(*args)


@mqa_decode_op.register_kernel("cuda")
def _mqa_decode_cuda(q, k_cache, v_cache, page_table, starts, ends, layer, scale, fp32_out):
    return _triton().mqa_decode(q, k_cache, v_cache, page_table, starts, ends, layer, scale, fp32_out)


@mqa_decode_op.register_fake
def _(q, k_cache, v_cache, page_table, starts, ends, layer, scale, fp32_out):
    o = q.new_empty(q.shape, dtype=torch.float32 if fp32_out else q.dtype)
    return o, q.new_empty(q.shape[:2], dtype=torch.float32)


_ROPE_APPEND = {"cpu": _rope_append_cpu, "cuda": _rope_append_cuda}
_DECODE = {"cpu": _mqa_decode_cpu, "cuda": _mqa_decode_cuda}


# ---------------------------------------------------------------- checks
def _no_grad_check(name: str, **tensors) -> None:
    if torch.is_grad_enabled():
        for arg, t in tensors.items():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise RuntimeError(f"{name}: inference only (no autograd), but {arg} requires grad; "
                                   "run under torch.no_grad() / torch.inference_mode() or detach it")


def _can_read_device(device: torch.device | None = None) -> bool:
    """Value checks read tensors on the host: skipped while torch.compile traces or while a
    CUDA graph is being captured (the eager call before capture does them). A CPU
    ``device`` is never being captured (no CUDA query: it costs microseconds per call)."""
    if compiling():
        return False
    if device is not None and device.type == "cpu":
        return True
    return not cuda_capturing()


def _check_cache(cache) -> None:
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected a palm_fast.kv_cache.KVCache, got {type(cache).__name__}")
    cache.check_not_exported()


@cached_constant(maxsize=8)
def _empty_f32(device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.float32, device=device)


# ---------------------------------------------------------------- public functions
def append_kv(cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor, n_new=None) -> None:
    """``KVCache.append``: k, v ``[B, T, hd]`` written at ``lengths[b] + t`` for ``t < n_new[b]``."""
    _check_cache(cache)
    _no_grad_check("append", k=k, v=v)
    n_dev, _ = cache.prepare_write(layer, k, v, n_new)
    B, T, hd = k.shape
    q = k.new_empty((B, T, 0, hd))
    args = (q, k, v, cache.k, cache.v, cache.page_table, cache.lengths, n_dev, None,
            _empty_f32(k.device), layer, False)
    if compiling():
        rope_append_op(*args)
    else:
        _ROPE_APPEND[k.device.type](*args)


def rope_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
                positions: torch.Tensor | None = None, *, rotary_dim: int | None = None,
                base: float = 10000.0, interleaved: bool = False, n_new=None) -> torch.Tensor:
    """RoPE of the new q ``[B, T, H, hd]`` and k ``[B, T, hd]`` and their append to the cache.

    Rotates the first ``rotary_dim`` (default hd) features of q and k at ``positions``
    ``[B, T]`` (int; default ``cache.lengths[b] + t``), writes rotated k and v ``[B, T, hd]``
    into ``layer`` at index ``lengths[b] + t`` for ``t < n_new[b]`` (int or int tensor
    ``[B]``, default T), like ``KVCache.append`` (``lengths`` unchanged; call
    ``cache.advance``). Returns the rotated q ``[B, T, H, hd]`` (contiguous, all T tokens).
    q, k, v may be strided views (unit last stride). Inference only.
    Raises TypeError/ValueError naming the argument; a rejected call changes nothing.
    """
    tracing = compiling()
    check_traced(q, k, v)
    _check_cache(cache)
    _no_grad_check("rope_append", q=q, k=k, v=v)
    layer = cache.check_layer(layer)
    cache.check_like("q", q, 4)
    B, T, H, hd = q.shape
    if B != cache.batch or hd != cache.head_dim or H == 0:
        raise ValueError(f"q: expected shape [{cache.batch}, T, H >= 1, {cache.head_dim}] (the cache's "
                         f"batch and head_dim), got {list(q.shape)}")
    if hd > 1 and q.stride(3) != 1:
        raise ValueError(f"q: expected a unit stride in the last dim, got strides {tuple(q.stride())}")
    if isinstance(k, torch.Tensor) and k.dim() == 3 and k.shape[1] != T:
        raise ValueError(f"k: expected {T} tokens (q's T), got shape {list(k.shape)}")
    rdim = hd if rotary_dim is None else check_int("rotary_dim", rotary_dim)
    interleaved = check_bool("interleaved", interleaved)
    if rdim <= 0 or rdim % 2 or rdim > hd:
        raise ValueError(f"rotary_dim: expected a positive even integer <= head dim {hd}, got {rdim}")
    if positions is not None:
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"positions: expected an int tensor [{B}, {T}], got {type(positions).__name__}")
        if positions.dtype not in _INT_DTYPES:
            raise TypeError(f"positions: expected dtype int32 or int64, got {positions.dtype}")
        if tuple(positions.shape) != (B, T):
            raise ValueError(f"positions: expected shape ({B}, {T}), got {tuple(positions.shape)}")
        if positions.device != cache.device:
            raise ValueError(f"positions: expected device {cache.device}, got {positions.device}")
        if not tracing and _can_read_device() and positions.numel() and int(positions.min()) < 0:
            raise ValueError(f"positions: expected values >= 0, got {int(positions.min())}")
    base = check_float("base", base, positive=True)
    inv_freq = (rope_inv_freq(rdim, base, device="cpu").to(q.device) if tracing
                else _cached_inv_freq(rdim, base, q.device))
    n_dev, _ = cache.prepare_write(layer, k, v, n_new)  # last: it may allocate pages
    args = (q, k, v, cache.k, cache.v, cache.page_table, cache.lengths, n_dev, positions, inv_freq,
            layer, interleaved)
    if tracing:
        return rope_append_op(*args)
    return _ROPE_APPEND[q.device.type](*args)


def _values_key(seq_lens: torch.Tensor, table, starts_host) -> tuple:
    """Identity of the values one check covered: the tensor objects (weak references, so a
    new tensor at a recycled address never matches), their in-place version counters, and
    the cache's prefix layout. A decode step passes the same seq_lens to every layer: with
    this it is checked (and the device synchronised) once per step, not once per layer."""
    return (weakref.ref(seq_lens), seq_lens._version,
            None if table is None else weakref.ref(table), None if table is None else table._version,
            None if starts_host is None else tuple(starts_host))


def _same_values(old: tuple | None, seq_lens: torch.Tensor, table, starts_host) -> bool:
    """Whether ``old`` (a :func:`_values_key`) covers these tensors, unmodified, and prefix
    layout. Tensors compared by identity (weakref == would compare them elementwise); runs
    on every decode call, so without building a new key."""
    if old is None or old[0]() is not seq_lens or old[1] != seq_lens._version:
        return False
    if table is None:
        if old[2] is not None:
            return False
    elif old[2] is None or old[2]() is not table or old[3] != table._version:
        return False
    return old[4] == (None if starts_host is None else tuple(starts_host))


def _values_bad(cache: KVCache, seq_lens: torch.Tensor, table, starts_host) -> bool:
    """Whether any seq_lens value or any page-table entry it reads is out of range, computed
    on the tensors' device with one host read."""
    lens = seq_lens.long()
    bad = ((lens < 0) | (lens > cache.max_len)).any()
    if starts_host is not None:
        bad = bad | (lens < torch.tensor(starts_host, device=lens.device)).any()
    if table is not None:
        if (not isinstance(table, torch.Tensor) or table.dtype != torch.int32
                or tuple(table.shape) != (cache.batch, cache.blocks_per_seq) or not table.is_contiguous()):
            return True
        cols = torch.arange(table.shape[1], device=table.device)
        used = cols[None, :] < ((lens + cache.page_size - 1) // cache.page_size)[:, None]
        bad = bad | (used & ((table < 0) | (table >= cache.num_pages))).any()
    return bool(bad)


def _check_seq_lens(cache: KVCache, seq_lens, starts_host: list[int] | None, tracing: bool) -> None:
    old = cache._checked_values
    if old is not None and old[0]() is seq_lens and not tracing and _same_values(
            old, seq_lens, cache.page_table if cache.paged else None, starts_host):
        # These exact tensors (same objects, unmodified: dtype, shape, device and strides
        # change only with in-place ops, which bump the version counter) passed every check
        # below for an earlier call, e.g. the step's earlier layers.
        return
    if not isinstance(seq_lens, torch.Tensor):
        raise TypeError(f"seq_lens: expected an int32 tensor [{cache.batch}], got {type(seq_lens).__name__}")
    if seq_lens.dtype != torch.int32:
        raise TypeError(f"seq_lens: expected dtype torch.int32, got {seq_lens.dtype}")
    if tuple(seq_lens.shape) != (cache.batch,):
        raise ValueError(f"seq_lens: expected shape ({cache.batch},), got {tuple(seq_lens.shape)}")
    if seq_lens.device != cache.device:
        raise ValueError(f"seq_lens: expected device {cache.device} (the cache's), got {seq_lens.device}")
    if not seq_lens.is_contiguous():
        raise ValueError(f"seq_lens: expected a contiguous tensor, got strides {tuple(seq_lens.stride())}")
    if tracing or not _can_read_device(seq_lens.device):
        return
    table = cache.page_table if cache.paged else None
    # Inference tensors have no version counter: those are checked on every call.
    versioned = not seq_lens.is_inference() and (table is None or not table.is_inference())
    key = _values_key(seq_lens, table, starts_host) if versioned else None
    # A contiguous CPU cache's check needs only B ints on the host: a Python loop over them
    # costs less than the tensor ops (for inference tensors, checked on every call).
    on_host = seq_lens.is_cpu and table is None
    if not on_host and not _values_bad(cache, seq_lens, table, starts_host):
        cache._checked_values = key
        return
    # On the host (or something is out of range: find it and say what).
    lens = seq_lens.tolist()
    for b, n in enumerate(lens):
        if not 0 <= n <= cache.max_len:
            raise ValueError(f"seq_lens: expected values in [0, {cache.max_len}] (max_len), got {n} for "
                             f"sequence {b}")
        if starts_host is not None and n < starts_host[b]:
            raise ValueError(f"seq_lens: sequence {b} shares a {starts_host[b]}-token prefix, got "
                             f"seq_lens {n} < {starts_host[b]}")
    if cache.paged:
        table = cache.page_table
        if (not isinstance(table, torch.Tensor) or table.dtype != torch.int32
                or tuple(table.shape) != (cache.batch, cache.blocks_per_seq) or not table.is_contiguous()):
            raise ValueError(f"cache.page_table: expected a contiguous int32 tensor "
                             f"[{cache.batch}, {cache.blocks_per_seq}], got "
                             f"{getattr(table, 'dtype', None)} {list(getattr(table, 'shape', []))}")
        rows = table.tolist()
        for b, n in enumerate(lens):
            used = rows[b][:math.ceil(n / cache.page_size)]
            bad = [p for p in used if not 0 <= p < cache.num_pages]
            if bad and all(p == -1 for p in bad) and used[:len(used) - len(bad)] == [
                    p for p in used if p != -1]:
                # only unallocated pages past the allocated ones: the length is what is wrong
                held = (len(used) - len(bad)) * cache.page_size
                raise ValueError(f"seq_lens: sequence {b} reads {n} tokens, but the cache holds pages "
                                 f"for only {held} of its tokens (append or reserve first)")
            if bad:
                raise ValueError(f"cache.page_table: sequence {b} reads {n} tokens, but its pages {used} "
                                 f"include {bad[0]}, not in [0, {cache.num_pages})")
    if on_host:
        cache._checked_values = key


def mqa_decode(q: torch.Tensor, cache: KVCache, layer: int, seq_lens: torch.Tensor, *,
               scale: float | None = None, shared_prefix: bool | None = None) -> torch.Tensor:
    """One decode step of multi-query attention over the cache.

    q ``[B, H, hd]`` (one new, already rotated query token per sequence; contiguous) attends
    over cache indices ``[0, seq_lens[b])`` of ``layer`` (seq_lens: int32 ``[B]`` on the
    cache's device) with ``scale`` (default ``hd ** -0.5``). Returns o ``[B, H, hd]`` in q's
    dtype; a sequence with ``seq_lens[b] == 0`` (an empty batch slot) gets o = 0. The
    kernels' launch grid does not depend on the lengths (CUDA-graph safe).
    ``shared_prefix``: True reads each prefix group's shared pages once for all its members
    (paged caches with ``fork``); False reads them per sequence (the same attention up to
    rounding: the two merge the keys' partial sums in another order, a few fp32 ulps, one
    ulp of a bf16 output; not bit for bit); None (default)
    is False: the shared pass measured slower than reading per sequence on both backends
    so far (H100: 0.101 vs 0.094 ms at 64 sequences x 48 heads sharing 4096 tokens,
    CUDA-graph replays, ``benchmarks/results/h100/session23/decode.json``; CPU: 0.195 vs
    0.181 ms, ``benchmarks/results/cpu/bench.json``: sharing saves reads, not FLOPs).
    Inference only. Raises TypeError/ValueError naming the argument.
    """
    tracing = compiling()
    check_traced(q)
    _check_cache(cache)
    cache.check_like("q", q, 3)
    if q.requires_grad and torch.is_grad_enabled():
        _no_grad_check("mqa_decode", q=q)
    B, H, hd = q.shape
    if B != cache.batch or hd != cache.head_dim or H == 0:
        raise ValueError(f"q: expected shape [{cache.batch}, H >= 1, {cache.head_dim}] (the cache's batch "
                         f"and head_dim), got {list(q.shape)}")
    if not q.is_contiguous():
        raise ValueError(f"q: expected a contiguous tensor, got strides {tuple(q.stride())}")
    layer = cache.check_layer(layer)
    if scale is None:
        scale = hd ** -0.5
    scale = check_float("scale", scale, positive=True)
    if shared_prefix is not None and not isinstance(shared_prefix, bool):
        raise TypeError(f"shared_prefix: expected None or a bool, got {shared_prefix!r}")
    dev_type = "cpu" if q.is_cpu else q.device.type
    use_shared = bool(shared_prefix)   # None -> False (see the docstring)
    meta = cache.decode_meta() if use_shared else None
    starts_host = None
    if meta is not None:
        starts_host = [0] * cache.batch
        for g in cache.prefix_groups():
            for m in g.members:
                starts_host[m] = g.n_tokens
    _check_seq_lens(cache, seq_lens, starts_host, tracing)
    run = mqa_decode_op if tracing else _DECODE[dev_type]
    if meta is None:
        o, _ = run(q, cache.k, cache.v, cache.page_table, None, seq_lens, layer, float(scale), False)
        return o
    group_seq, group_len, rows, starts, slot = meta
    G, M = rows.shape
    # Prefix: all members' query rows of a group (M * H rows) over its shared pages, once.
    row_idx, seq_idx = cache.decode_index()
    q_pre = q.index_select(0, row_idx).view(G, M * H, hd)
    o_pre, lse_pre = run(q_pre, cache.k, cache.v, cache.page_table.index_select(0, seq_idx), None, group_len,
                         layer, float(scale), True)
    # Suffix: each sequence over its own tokens, merged with its group's prefix output.
    suffix_args = (q, cache.k, cache.v, cache.page_table, starts, seq_lens, layer, float(scale))
    if not tracing:
        # no sequence reads past its start more than the capacity less the shortest prefix
        span = cache.blocks_per_seq * cache.page_size - min(starts_host)
        return _SUFFIX_MERGE[dev_type](*suffix_args, o_pre, lse_pre, slot, span)
    o_suf, lse_suf = run(*suffix_args, True)
    return _prefix_merge(o_pre, lse_pre, slot, o_suf, lse_suf, q.dtype)


def _suffix_merge_cpu(q, k_cache, v_cache, page_table, starts, ends, layer, scale, o_pre, lse_pre, slot,
                      span):
    """The shared-prefix decode's suffix pass, then the merge with the prefix pass in one C++ pass
    (``span`` unused: the C++ kernel splits each sequence's own keys)."""
    o_suf, lse_suf = cpp().mqa_decode_cpu(q, k_cache, v_cache, page_table, starts, ends, layer, scale, True)
    return cpp().prefix_merge_cpu(o_pre, lse_pre, slot, o_suf, lse_suf, q.dtype)


def _suffix_merge_cuda(q, k_cache, v_cache, page_table, starts, ends, layer, scale, o_pre, lse_pre, slot,
                       span):
    """The suffix pass with the prefix output merged in by its combine kernel (no separate
    merge: fewer launches in eager calls and in a captured decode step), its splits over
    ``span`` keys past each start (the grid still depends on shapes and groups only)."""
    return _triton().mqa_decode(q, k_cache, v_cache, page_table, starts, ends, layer, scale, False,
                                prefix=(o_pre, lse_pre, slot), span=span)[0]


_SUFFIX_MERGE = {"cpu": _suffix_merge_cpu, "cuda": _suffix_merge_cuda}


def _prefix_merge(o_pre, lse_pre, slot, o_suf, lse_suf, dtype):
    """The shared-prefix decode's merge by log-sum-exp in torch ops (under torch.compile):
    sequence b takes prefix row ``slot[b]`` (none where -1) and its suffix pass."""
    B, H, hd = o_suf.shape
    member = (slot >= 0)[:, None]
    idx = slot.clamp(min=0).long()
    o_p = o_pre.reshape(-1, H, hd)[idx]
    lse_p = torch.where(member, lse_pre.reshape(-1, H)[idx], float("-inf"))
    m = torch.maximum(lse_p, lse_suf)
    m = torch.where(m == float("-inf"), 0.0, m)   # (an empty row: -inf - -inf would be NaN)
    w_p, w_s = torch.exp(lse_p - m), torch.exp(lse_suf - m)
    den = w_p + w_s
    o = (o_p * w_p[..., None] + o_suf * w_s[..., None]) / torch.where(den > 0, den, 1.0)[..., None]
    return o.to(dtype)   # an empty row: both weights 0, so o = 0 as the kernels give
