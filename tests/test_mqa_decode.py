"""rope_append and mqa_decode everywhere they live: the public ops (CPU -> C++), the Triton
launchers (interpreter on CPU, CUDA when present), shared prefixes, bad input."""
from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, assert_close_by_rule, randn

import palm_fast.ops as ops
from palm_fast.kv_cache import KVCache
from palm_fast.reference.layers import RotaryEmbedding, attention

DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def fill_cache(B, lens, hd, dtype, page_size=None, n_layers=1, layer=0, device="cpu", num_pages=None):
    """A cache whose ``layer`` holds random K/V of ``lens[b]`` tokens per sequence, written in
    two ragged appends; returns (cache, [K_b], [V_b]) with the per-sequence truth."""
    max_len = max(lens) + 3
    cache = KVCache(n_layers, B, max_len, hd, dtype=dtype, page_size=page_size, device=device,
                    num_pages=num_pages)
    T = max(lens)
    k, v = randn(B, T, hd, dtype=dtype, device=device), randn(B, T, hd, dtype=dtype, device=device)
    first = torch.tensor([n // 2 for n in lens], device=device)
    second = torch.tensor([n - n // 2 for n in lens], device=device)
    cache.append(layer, k, v, first)
    cache.advance(first)
    T2 = int(second.max())
    idx = (first[:, None] + torch.arange(T2, device=device)).clamp(max=T - 1)
    k2 = torch.gather(k, 1, idx[..., None].expand(B, T2, hd))
    v2 = torch.gather(v, 1, idx[..., None].expand(B, T2, hd))
    cache.append(layer, k2, v2, second)
    cache.advance(second)
    return cache, [k[b, :n] for b, n in enumerate(lens)], [v[b, :n] for b, n in enumerate(lens)]


def ref_decode(q, Ks, Vs, dtype=None):
    """reference.layers.attention per sequence: q [B, H, hd] -> [B, H, hd] (in ``dtype``)."""
    dtype = dtype or q.dtype
    outs = []
    for b in range(q.shape[0]):
        outs.append(attention(q[b][None, None].to(dtype), Ks[b][None, :, None].to(dtype),
                              Vs[b][None, :, None].to(dtype), causal=False)[0, 0])
    return torch.stack(outs)


def check_decode(o, q, Ks, Vs):
    ref64 = ref_decode(q.double(), [k.double() for k in Ks], [v.double() for v in Vs])
    eager = ref_decode(q, Ks, Vs)
    assert_close_by_rule(o.cpu(), ref64.cpu(), eager.cpu(), name="o")


# ------------------------------------------------------------------ public ops (CPU)
CASES = [  # (B, H, hd, lens, page_size)
    (1, 8, 64, [1], None),
    (3, 8, 64, [17, 1, 5], 16),
    (2, 16, 128, [1000, 17], None),
    (2, 12, 128, [1000, 333], 64),
    (1, 48, 256, [4097], 256),
    (2, 16, 64, [4097, 30], 32),
    (4, 10, 256, [5, 17, 64, 100], 16),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}d{c[2]}T{max(c[3])}p{c[4]}")
def test_decode_parity(case, dtype):
    B, H, hd, lens, page_size = case
    cache, Ks, Vs = fill_cache(B, lens, hd, dtype, page_size)
    q = randn(B, H, hd, dtype=dtype)
    o = ops.mqa_decode(q, cache, 0, cache.lengths)
    assert o.dtype == dtype and o.shape == (B, H, hd)
    check_decode(o, q, Ks, Vs)


@pytest.mark.parametrize("page_size", [None, 4])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_append_matches_reference(page_size, interleaved):
    B, T, H, hd, rdim = 3, 4, 6, 16, 8
    cache = KVCache(2, B, 20, hd, page_size=page_size)
    cache.advance(torch.tensor([0, 3, 7]))  # ragged start offsets (pages reserved by advance)
    q, k, v = randn(B, T, H, hd), randn(B, T, hd), randn(B, T, hd)
    n_new = torch.tensor([4, 2, 3])
    q_rot = ops.rope_append(q, k, v, cache, 1, rotary_dim=rdim, interleaved=interleaved, n_new=n_new)
    rot = RotaryEmbedding(rdim, interleaved=interleaved)
    q_ref, k_ref = rot(q, k[:, :, None], offsets=cache.lengths.long())
    assert torch.allclose(q_rot, q_ref, atol=1e-6, rtol=1e-5)
    for b in range(B):
        start = cache.host_lengths()[b]
        idx = torch.arange(start, start + int(n_new[b]))
        if page_size is None:
            kb, vb = cache.k[1, b, idx], cache.v[1, b, idx]
        else:
            pages = cache.page_table[b].long()[idx // page_size]
            kb, vb = cache.k[1, pages, idx % page_size], cache.v[1, pages, idx % page_size]
        assert torch.allclose(kb, k_ref[b, :len(idx), 0], atol=1e-6, rtol=1e-5)
        assert torch.equal(vb, v[b, :len(idx)])
    # explicit positions
    pos = torch.randint(0, 1000, (B, T))
    q_rot = ops.rope_append(q, k, v, cache, 0, pos, rotary_dim=rdim, interleaved=interleaved)
    q_ref, _ = rot(q, k[:, :, None], positions=pos)
    assert torch.allclose(q_rot, q_ref, atol=1e-5, rtol=1e-5)


def test_decode_step_matches_reference_block_attention():
    """rope_append + mqa_decode over several steps == the reference attention with RoPE."""
    B, H, hd, steps = 2, 4, 16, 5
    cache = KVCache(1, B, 16, hd, page_size=4)
    rot = RotaryEmbedding(hd)
    qs, ks, vs = randn(B, steps, H, hd), randn(B, steps, hd), randn(B, steps, hd)
    q_all, k_all = rot(qs, ks[:, :, None])
    for t in range(steps):
        q_rot = ops.rope_append(qs[:, t:t + 1], ks[:, t:t + 1], vs[:, t:t + 1], cache, 0)
        o = ops.mqa_decode(q_rot[:, 0].contiguous(), cache, 0, cache.lengths + 1)
        cache.advance(1)
        ref = attention(q_all[:, t:t + 1], k_all[:, :t + 1], vs[:, :t + 1, None], causal=False)[:, 0]
        assert torch.allclose(o, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("page_size", [16, 5])
def test_shared_prefix_matches_unshared(page_size, dtype):
    B, H, hd, prefix = 4, 8, 32, 70
    cache = KVCache(1, B, 128, hd, dtype=dtype, page_size=page_size)
    k, v = randn(B, prefix, hd, dtype=dtype), randn(B, prefix, hd, dtype=dtype)
    n0 = torch.tensor([prefix, 0, 0, 0])
    cache.append(0, k, v, n0)
    cache.advance(n0)
    cache.fork(0, [1, 3])  # sequences 0, 1, 3 share the prompt; 2 is on its own
    suffix = torch.tensor([9, 1, 40, 0])
    ks, vs = randn(B, 40, hd, dtype=dtype), randn(B, 40, hd, dtype=dtype)
    cache.append(0, ks, vs, suffix)
    cache.advance(suffix)
    assert len(cache.prefix_groups()) == 1
    q = randn(B, H, hd, dtype=dtype)
    shared = ops.mqa_decode(q, cache, 0, cache.lengths)
    unshared = ops.mqa_decode(q, cache, 0, cache.lengths, shared_prefix=False)
    Ks = [torch.cat([k[0], ks[b, :int(suffix[b])]]) if b != 2 else ks[2, :40] for b in range(B)]
    Vs = [torch.cat([v[0], vs[b, :int(suffix[b])]]) if b != 2 else vs[2, :40] for b in range(B)]
    check_decode(unshared, q, Ks, Vs)
    check_decode(shared, q, Ks, Vs)


def test_deterministic():
    cache, _, _ = fill_cache(2, [1000, 513], 64, torch.float32, 32)
    q = randn(2, 8, 64)
    a = ops.mqa_decode(q, cache, 0, cache.lengths)
    b = ops.mqa_decode(q, cache, 0, cache.lengths)
    assert torch.equal(a, b)


# ------------------------------------------------------------------ bad input
def test_decode_bad_input():
    cache, _, _ = fill_cache(2, [10, 5], 16, torch.float32, 4)
    q = randn(2, 4, 16)
    good = cache.lengths
    bad = [
        (dict(q=randn(3, 4, 16)), ValueError, "q: expected shape"),
        (dict(q=randn(2, 4, 8)), ValueError, "q: expected shape"),
        (dict(q=randn(2, 4, 16, dtype=torch.float16)), TypeError, "q: expected dtype"),
        (dict(q=randn(2, 16, 4).transpose(1, 2)), ValueError, "contiguous"),
        (dict(layer=1), ValueError, "layer"),
        (dict(seq_lens=good.long()), TypeError, "seq_lens"),
        (dict(seq_lens=torch.tensor([10, 14], dtype=torch.int32)), ValueError, "seq_lens"),
        (dict(seq_lens=torch.tensor([0, 1], dtype=torch.int32)), ValueError, "seq_lens"),
        (dict(seq_lens=torch.tensor([13, 5], dtype=torch.int32)), ValueError, "page_table"),  # no page
        (dict(seq_lens=good[:1]), ValueError, "seq_lens"),
    ]
    for kw, err, match in bad:
        args = dict(q=q, layer=0, seq_lens=good) | kw
        with pytest.raises(err, match=match):
            ops.mqa_decode(args["q"], cache, args["layer"], args["seq_lens"])
    with pytest.raises(TypeError, match="cache"):
        ops.mqa_decode(q, object(), 0, good)
    with pytest.raises(RuntimeError, match="inference only"):
        ops.mqa_decode(q.requires_grad_(), cache, 0, good)
    cache.page_table[1, 0] = 99  # corrupt the table
    with pytest.raises(ValueError, match="page_table"):
        ops.mqa_decode(q.detach(), cache, 0, good)


@pytest.mark.parametrize("page_size", [None, 4])
def test_rope_append_rejections_leave_cache_unchanged(page_size):
    from test_kv_cache import assert_same, snapshot

    cache, _, _ = fill_cache(2, [10, 5], 16, torch.float32, page_size)
    B, T, H, hd = 2, 2, 4, 16
    q, k, v = randn(B, T, H, hd), randn(B, T, hd), randn(B, T, hd)
    before = snapshot(cache)
    bad = [
        (lambda: ops.rope_append(randn(B, 4, H, hd), randn(B, 4, hd), randn(B, 4, hd), cache, 0),
         ValueError, "overflow"),
        (lambda: ops.rope_append(q[:1], k[:1], v[:1], cache, 0), ValueError, "q: expected shape"),
        (lambda: ops.rope_append(q, k[:, :1], v, cache, 0), ValueError, "k: expected"),
        (lambda: ops.rope_append(q, k, v[..., :8], cache, 0), ValueError, "v: expected shape"),
        (lambda: ops.rope_append(q.half(), k, v, cache, 0), TypeError, "q: expected dtype"),
        (lambda: ops.rope_append(q, k, v, cache, 2), ValueError, "layer"),
        (lambda: ops.rope_append(q, k, v, cache, 0, torch.zeros(B, T + 1, dtype=torch.long)),
         ValueError, "positions"),
        (lambda: ops.rope_append(q, k, v, cache, 0, -torch.ones(B, T, dtype=torch.long)),
         ValueError, "positions"),
        (lambda: ops.rope_append(q, k, v, cache, 0, rotary_dim=5), ValueError, "rotary_dim"),
        (lambda: ops.rope_append(q.requires_grad_(), k, v, cache, 0), RuntimeError, "inference only"),
    ]
    for call, err, match in bad:
        with pytest.raises(err, match=match):
            call()
        assert_same(snapshot(cache), before)
