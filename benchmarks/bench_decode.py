"""Decode-attention benchmark (family ``decode``): one new query token per sequence
attending over a multi-query KV cache.

Cases
* ``decode.attn``: ``palm_fast.ops.mqa_decode`` on a contiguous and on a paged cache vs
  the eager reference (``reference.layers.attention``: expands K/V to all heads, then
  attends), ``scaled_dot_product_attention`` (GQA form where torch has it) and
  FlashAttention's ``flash_attn_with_kvcache`` when importable (CUDA).
* ``decode.attn_mha``: the same width with a multi-head cache (H K/V heads, SDPA): the
  bytes MQA saves.
* ``decode.shared_prefix``: sequences sharing one prompt (``KVCache.fork``): the decode
  reading the shared pages once (``palm_fast``) vs per sequence (``palm_fast_unshared``).

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


def _shapes(ctx: BenchContext):
    """(B, H, hd, T) per case."""
    if ctx.device == "cuda":
        if ctx.quick:
            return [(1, 48, 256, 4096), (8, 16, 128, 4096)]
        return [(B, H, hd, T) for (H, hd) in ((48, 256), (16, 128)) for B in (1, 8, 64)
                for T in (4096, 32768)]
    return [(4, 8, 128, 2048)] if ctx.quick else [(4, 8, 128, 4096)]


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

        def setup(B=B, H=H, hd=hd, T=T, page=page):
            cache = _filled_cache(B, T, hd, dtype, dev)
            paged = _filled_cache(B, T, hd, dtype, dev, page_size=page)
            q = torch.randn(B, H, hd, device=dev, dtype=dtype)
            return q, cache, paged

        impls = {
            "palm_fast": lambda x: mqa_decode(x[0], x[1], 0, x[1].lengths),
            "palm_fast_paged": lambda x: mqa_decode(x[0], x[2], 0, x[2].lengths),
            "sdpa": lambda x: _sdpa(x[0], x[1].k[0][:, :, None], x[1].v[0][:, :, None]),
        }
        if expanded <= (2**31 if dev == "cpu" else 16 * 2**30):
            impls["eager"] = lambda x: attention(x[0][:, None], x[1].k[0][:, :, None],
                                                 x[1].v[0][:, :, None], causal=False)[:, 0]
        if flash is not None:
            impls["flash_attn"] = lambda x: flash(x[0][:, None], x[1].k[0][:, :, None],
                                                  x[1].v[0][:, :, None],
                                                  cache_seqlens=x[1].lengths)[:, 0]
        shape = {"B": B, "H": H, "hd": hd, "T": T, "page_size": page}
        yield Case(name="decode.attn", shape=shape, dtype=dtype, bytes=kv_bytes + qo_bytes,
                   flops=4 * B * H * T * hd, setup=setup,
                   impls={k: impls[k] for k in ("palm_fast", "palm_fast_paged", "eager", "sdpa",
                                                "flash_attn") if k in impls})
        if dev == "cpu" and dtype != torch.float32:
            continue  # CPU budget: the MHA and shared-prefix comparisons run in fp32 only
        mha_bytes = kv_bytes * H
        if mha_bytes <= (2**30 if dev == "cpu" else 32 * 2**30):
            def setup_mha(B=B, H=H, hd=hd, T=T):
                k = torch.randn(B, T, H, hd, device=dev, dtype=dtype)
                v = torch.randn(B, T, H, hd, device=dev, dtype=dtype)
                return torch.randn(B, H, hd, device=dev, dtype=dtype), k, v

            yield Case(name="decode.attn_mha", shape=shape | {"kv_heads": H}, dtype=dtype,
                       bytes=mha_bytes + qo_bytes, flops=4 * B * H * T * hd, setup=setup_mha,
                       impls={"sdpa": lambda x: _sdpa(*x)},
                       extra={"note": "multi-head cache of the same width (H K/V heads)"})
    yield from _shared_prefix_cases(ctx, elem)


def _shared_prefix_cases(ctx: BenchContext, elem: int):
    from palm_fast.kv_cache import KVCache
    from palm_fast.ops import mqa_decode

    dev, dtype = ctx.device, ctx.dtype
    if dev == "cpu" and dtype != torch.float32:
        return
    if dev == "cuda":
        n_seq, H, hd, prefix, suffix, page = 64, 48, 256, 4096, 128, 256
    else:
        n_seq, H, hd, prefix, suffix, page = 16, 8, 128, 2048, 64, 64

    def setup():
        cache = KVCache(1, n_seq, prefix + suffix, hd, dtype=dtype, device=dev, page_size=page)
        n0 = torch.zeros(n_seq, dtype=torch.int32, device=dev)
        n0[0] = prefix
        cache.reserve(n0)
        cache.advance(n0)
        cache.fork(0, list(range(1, n_seq)))
        cache.reserve(suffix)
        cache.advance(suffix)
        cache.k.normal_()
        cache.v.normal_()
        return torch.randn(n_seq, H, hd, device=dev, dtype=dtype), cache

    yield Case(
        name="decode.shared_prefix",
        shape={"n_seq": n_seq, "H": H, "hd": hd, "prefix": prefix, "suffix": suffix, "page_size": page},
        dtype=dtype, bytes=2 * (prefix + n_seq * suffix) * hd * elem + 2 * n_seq * H * hd * elem,
        flops=4 * n_seq * H * (prefix + suffix) * hd, setup=setup,
        impls={"palm_fast": lambda x: mqa_decode(x[0], x[1], 0, x[1].lengths),
               "palm_fast_unshared": lambda x: mqa_decode(x[0], x[1], 0, x[1].lengths,
                                                          shared_prefix=False)},
        extra={"note": "bytes count the shared prefix once"})
