"""Decode-attention benchmark (family ``decode``): one new query token per sequence
attending over a multi-query KV cache.

Cases
* ``decode.fwd``: ``palm_fast.ops.mqa_decode`` on a contiguous and on a paged cache vs
  the eager reference (``reference.layers.attention``: expands K/V to all heads, then
  attends), ``scaled_dot_product_attention`` (GQA form where torch has it) and
  FlashAttention's ``flash_attn_with_kvcache`` when importable (CUDA); plus
  ``sdpa_mha_cache``: the same attention over a multi-head cache of the same width
  (H K/V heads), to show what MQA saves (its ``kv_bytes_read`` field); on CUDA also
  ``palm_fast_graph``: the same call replayed from a CUDA graph, as ``generate`` runs it
  (the kernels' time without the host's per-call cost).
* ``decode_shared_prefix.fwd``: sequences sharing one prompt (``KVCache.fork``): the decode
  reading the shared pages once (``palm_fast``) vs per sequence (``palm_fast_unshared``)
  vs the eager reference on each sequence's gathered K/V; on CUDA both palm_fast paths also
  replayed from CUDA graphs (``palm_fast_graph``, ``palm_fast_unshared_graph``).

Bytes (the fewest the op must move): every cached K and V row read once + q read + o
written; the shared-prefix case counts the prefix once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from palm_fast.benchmarks.harness import BenchContext, Case, register
from palm_fast.reference.layers import attention


def _flash_attn():
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache


def _sdpa(q, k, v):
    """q [B, H, hd], k/v [B, T, Hk, hd] -> [B, H, hd] with SDPA (GQA when Hk < H)."""
    qs = q[:, :, None]                      # [B, H, 1, hd]
    ks, vs = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hk, T, hd]
    if ks.shape[1] != qs.shape[1]:
        try:
            return F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)[:, :, 0]
        except TypeError:  # torch without enable_gqa: expand
            ks = ks.expand(-1, qs.shape[1], -1, -1)
            vs = vs.expand(-1, qs.shape[1], -1, -1)
    return F.scaled_dot_product_attention(qs, ks, vs)[:, :, 0]


class _Graphed:
    """A decode call captured as a CUDA graph once per input set, then replayed: what
    ``palm_fast.generate`` does each step, so the host's per-call cost (argument checks,
    allocations, two launches) drops out and the kernels' own time shows."""

    def __init__(self, fn):
        self.fn = fn
        self.graphs = {}

    def __call__(self, x):
        hit = self.graphs.get(id(x))
        if hit is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up (compile, allocate) outside the capture
                self.fn(x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.fn(x)
            hit = self.graphs[id(x)] = (graph, x, out)  # keeps x (and its id) alive
        hit[0].replay()
        return hit[2]


def _shapes(ctx: BenchContext):
    """(B, H, hd, T) per case."""
    if ctx.device == "cuda":
        if ctx.quick:
            return [(1, 48, 256, 4096), (8, 16, 128, 4096)]
        return [(B, H, hd, T) for (H, hd) in ((48, 256), (16, 128)) for B in (1, 8, 64)
                for T in (4096, 32768)]
    return [(2, 8, 128, 1024)]  # small: the CPU budget of the whole suite


def _filled_cache(B, T, hd, dtype, device, page_size=None):
    from palm_fast.kv_cache import KVCache

    cache = KVCache(1, B, T, hd, dtype=dtype, device=device, page_size=page_size)
    cache.reserve(T)
    cache.advance(T)
    cache.k.normal_()
    cache.v.normal_()
    return cache


@register("decode")
def decode_cases(ctx: BenchContext):
    from palm_fast.ops import mqa_decode

    dev, dtype = ctx.device, ctx.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    flash = _flash_attn() if dev == "cuda" else None
    for B, H, hd, T in _shapes(ctx):
        kv_bytes = 2 * B * T * hd * elem
        qo_bytes = 2 * B * H * hd * elem
        expanded = 2 * B * T * H * hd * 4  # the eager reference's fp32 expanded K/V
        page = 64 if dev == "cpu" else 256

        impls = {
            "palm_fast": lambda x: mqa_decode(x[0], x[1], 0, x[1].lengths),
            "palm_fast_paged": lambda x: mqa_decode(x[0], x[2], 0, x[2].lengths),
            "sdpa": lambda x: _sdpa(x[0], x[1].k[0][:, :, None], x[1].v[0][:, :, None]),
        }
        if dev == "cuda":
            impls["palm_fast_graph"] = _Graphed(impls["palm_fast"])
        if expanded <= (2**31 if dev == "cpu" else 16 * 2**30):
            impls["eager"] = lambda x: attention(x[0][:, None], x[1].k[0][:, :, None],
                                                 x[1].v[0][:, :, None], causal=False)[:, 0]
        if flash is not None:
            impls["flash_attn"] = lambda x: flash(x[0][:, None], x[1].k[0][:, :, None],
                                                  x[1].v[0][:, :, None],
                                                  cache_seqlens=x[1].lengths)[:, 0]
        shape = {"B": B, "H": H, "hd": hd, "T": T, "page_size": page}
        impl_extra = {}
        mha_bytes = kv_bytes * H
        cpu_fp32_only = dev == "cpu" and dtype != torch.float32  # CPU time budget
        if mha_bytes <= (2**30 if dev == "cpu" else 24 * 2**30) and not cpu_fp32_only:
            # What MQA saves: the same attention over a multi-head cache of the same width
            # (H K/V heads), read by SDPA. Its record's GB/s still count the MQA bytes;
            # kv_bytes_read says what it really reads.
            impls["sdpa_mha_cache"] = lambda x: _sdpa(x[0], x[3], x[4])
            impl_extra["sdpa_mha_cache"] = {"kv_bytes_read": mha_bytes + qo_bytes,
                                            "note": "multi-head cache, H K/V heads"}

        def setup(B=B, H=H, hd=hd, T=T, page=page, mha="sdpa_mha_cache" in impls):
            cache = _filled_cache(B, T, hd, dtype, dev)
            paged = _filled_cache(B, T, hd, dtype, dev, page_size=page)
            q = torch.randn(B, H, hd, device=dev, dtype=dtype)
            if not mha:
                return q, cache, paged
            k = torch.randn(B, T, H, hd, device=dev, dtype=dtype)
            v = torch.randn(B, T, H, hd, device=dev, dtype=dtype)
            return q, cache, paged, k, v

        if cpu_fp32_only:
            del impls["palm_fast_paged"]
        yield Case(name="decode.fwd", shape=shape, dtype=dtype, bytes=kv_bytes + qo_bytes,
                   flops=4 * B * H * T * hd, setup=setup, impl_extra=impl_extra,
                   impls={k: impls[k] for k in ("palm_fast", "palm_fast_graph", "palm_fast_paged", "eager",
                                                "sdpa", "flash_attn", "sdpa_mha_cache") if k in impls})
    yield from _shared_prefix_cases(ctx, elem)


def shared_prefix_cache(n_seq: int, prefix: int, suffix: int, hd: int, dtype, device, page_size: int):
    """A paged cache (one layer, random K/V) where sequence 0's ``prefix`` tokens are forked to
    all ``n_seq`` sequences, each of which then holds ``suffix`` tokens of its own (the
    shared-prefix case; also used by ``results/h100/probes/shared_prefix_tiles.py``)."""
    from palm_fast.kv_cache import KVCache

    cache = KVCache(1, n_seq, prefix + suffix, hd, dtype=dtype, device=device, page_size=page_size)
    n0 = torch.zeros(n_seq, dtype=torch.int32, device=device)
    n0[0] = prefix
    cache.reserve(n0)
    cache.advance(n0)
    cache.fork(0, list(range(1, n_seq)))
    cache.reserve(suffix)
    cache.advance(suffix)
    cache.k.normal_()
    cache.v.normal_()
    return cache


def _shared_prefix_cases(ctx: BenchContext, elem: int):
    from palm_fast.ops import mqa_decode

    dev, dtype = ctx.device, ctx.dtype
    if dev == "cpu" and dtype != torch.float32:
        return
    if dev == "cuda":
        n_seq, H, hd, prefix, suffix, page = 64, 48, 256, 4096, 128, 256
    else:
        n_seq, H, hd, prefix, suffix, page = 8, 8, 128, 512, 32, 64

    def setup():
        cache = shared_prefix_cache(n_seq, prefix, suffix, hd, dtype, dev, page)
        # The per-sequence K/V gathered contiguously for the eager reference.
        idx = torch.arange(prefix + suffix, device=dev)
        pages = cache.page_table.long()[:, idx // page]
        k = cache.k[0][pages, idx % page][:, :, None]
        v = cache.v[0][pages, idx % page][:, :, None]
        return torch.randn(n_seq, H, hd, device=dev, dtype=dtype), cache, k, v

    impls = {"palm_fast": lambda x: mqa_decode(x[0], x[1], 0, x[1].lengths, shared_prefix=True),
             "palm_fast_unshared": lambda x: mqa_decode(x[0], x[1], 0, x[1].lengths, shared_prefix=False)}
    if dev == "cuda":
        # The kernels' own times: the shared path's host cost (index gathers, three passes,
        # the merge) hides them in eager calls.
        impls["palm_fast_graph"] = _Graphed(impls["palm_fast"])
        impls["palm_fast_unshared_graph"] = _Graphed(impls["palm_fast_unshared"])
    impls["eager"] = lambda x: attention(x[0][:, None], x[2], x[3], causal=False)[:, 0]
    yield Case(
        name="decode_shared_prefix.fwd",
        shape={"n_seq": n_seq, "H": H, "hd": hd, "prefix": prefix, "suffix": suffix, "page_size": page},
        dtype=dtype, bytes=2 * (prefix + n_seq * suffix) * hd * elem + 2 * n_seq * H * hd * elem,
        flops=4 * n_seq * H * (prefix + suffix) * hd, setup=setup, impls=impls,
        extra={"note": "bytes count the shared prefix once"})
