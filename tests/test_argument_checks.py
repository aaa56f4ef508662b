"""Argument checks found missing or misleading by a review of the public API: each case was
silently wrong, or raised an error naming another argument (or none). Every op keeps
the rule: bad input raises TypeError / ValueError naming the argument; a rejected call
changes nothing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randn

import palm_fast
from palm_fast import get_config, ops
from palm_fast.kv_cache import KVCache
from palm_fast.nn import LayerNorm
from palm_fast.nn import ParallelBlock as FastBlock
from palm_fast.ops.lm_loss import embed_tokens, tied_lm_loss
from palm_fast.reference import KVCache as RefCache
from palm_fast.reference import PaLM
from palm_fast.reference import ParallelBlock as RefBlock
from palm_fast.reference.functional import rope_inv_freq


def _block(dtype=torch.float32):
    torch.manual_seed(0)
    ref = RefBlock(16, 2, 8, 24).to(dtype)
    fast = FastBlock(16, 2, 8, 24).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def test_inv_freq_requiring_grad_is_refused():
    """The ops give inv_freq no gradient: its .grad stayed None where the reference's RoPE
    gives one."""
    q, k = randn(1, 3, 2, 8), randn(1, 3, 1, 8)
    inv = rope_inv_freq(8).requires_grad_()
    with pytest.raises(ValueError, match="inv_freq: .*requires grad"):
        ops.rope(q, k, inv_freq=inv)
    ops.rope(q, k, inv_freq=inv.detach())
    with torch.no_grad():
        ops.rope(q, k, inv_freq=inv)         # (no gradient asked for)
    _, fast = _block()
    x = randn(1, 3, 16)
    with pytest.raises(ValueError, match="inv_freq: .*requires grad"):
        ops.parallel_block(x, fast.norm.weight, fast.in_proj.weight, fast.attn_out.weight,
                           fast.ff_out.weight, inv, n_heads=2, head_dim=8, d_ff=24)


def test_flags_must_be_bools():
    """interleaved="False" ran the interleaved layout (any truthy object was True)."""
    q, k = randn(1, 3, 2, 8), randn(1, 3, 1, 8)
    for call in (lambda: ops.rope(q, k, interleaved="False"),
                 lambda: ops.rope_(q, k, interleaved=1)):
        with pytest.raises(TypeError, match="interleaved: expected a bool"):
            call()
    assert torch.equal(ops.rope(q, k, interleaved=np.bool_(True))[0], ops.rope(q, k, interleaved=True)[0])
    _, fast = _block()
    with pytest.raises(TypeError, match="interleaved: expected a bool"):
        ops.parallel_block(randn(1, 3, 16), fast.norm.weight, fast.in_proj.weight, fast.attn_out.weight,
                           fast.ff_out.weight, fast.rotary.inv_freq, n_heads=2, head_dim=8, d_ff=24,
                           interleaved="no")
    cache = KVCache(1, 1, 8, 8)
    with pytest.raises(TypeError, match="interleaved: expected a bool"):
        ops.rope_append(randn(1, 1, 2, 8), randn(1, 1, 8), randn(1, 1, 8), cache, 0, interleaved="x")
    assert int(cache.lengths[0]) == 0 and not cache.k.any()
    model = PaLM(get_config("palm-tiny"))
    with pytest.raises(TypeError, match="block: expected a bool"):
        palm_fast.patch(model, block="False")
    assert not palm_fast.patching.is_patched(model)


def test_positive_scalars_must_be_positive_in_fp32():
    """eps = 1e-50 is 0 in fp32: a constant row gave NaN. mqa_decode took scale <= 0 where
    the other attention ops refuse it."""
    x = torch.ones(2, 8)
    for eps in (1e-50, 1e-40):
        with pytest.raises(ValueError, match="eps: expected a finite float > 0"):
            ops.layer_norm(x, torch.ones(8), eps=eps)
    assert ops.layer_norm(x, torch.ones(8), eps=1.2e-38).eq(0).all()
    cache = KVCache(1, 1, 8, 8)
    cache.append(0, randn(1, 2, 8), randn(1, 2, 8))
    cache.advance(2)
    for scale in (0.0, -1.0):
        with pytest.raises(ValueError, match="scale: expected a finite float > 0"):
            ops.mqa_decode(randn(1, 2, 8), cache, 0, cache.lengths, scale=scale)


def test_numpy_integers_are_ints_everywhere():
    """numpy ints were refused by some int arguments (layer, batch, rotary_dim, n_heads) and
    accepted by others."""
    cache = KVCache(np.int64(1), np.int64(2), np.int64(8), np.int64(8))
    cache.append(np.int64(0), randn(2, 3, 8), randn(2, 3, 8), np.int64(3))
    cache.advance(np.int32(3))
    q = randn(2, 2, 8)
    assert torch.equal(ops.mqa_decode(q, cache, np.int64(0), cache.lengths),
                       ops.mqa_decode(q, cache, 0, cache.lengths))
    # the sequence indices of fork / reset too (an int, or an array of them)
    paged = KVCache(1, 4, 16, 8, page_size=4)
    paged.append(0, randn(4, 6, 8), randn(4, 6, 8), torch.tensor([6, 0, 0, 0]))
    paged.advance(torch.tensor([6, 0, 0, 0]))
    paged.fork(np.int64(0), np.int64(1))
    paged.fork(0, np.array([2, 3]), np.int32(4))
    assert paged.lengths.tolist() == [6, 6, 4, 4]
    paged.reset(np.int64(1))
    paged.reset(np.array([[2], [3]]))
    assert paged.lengths.tolist() == [6, 0, 0, 0]
    with pytest.raises(TypeError, match="dst: expected an int or a list of ints, got float"):
        paged.fork(0, 1.0)
    with pytest.raises(TypeError, match="seqs: expected an int, got float"):
        paged.reset(np.array([1.0]))
    qq, kk = randn(1, 3, 2, 8), randn(1, 3, 1, 8)
    assert torch.equal(ops.rope(qq, kk, rotary_dim=np.int64(4))[0], ops.rope(qq, kk, rotary_dim=4)[0])
    _, fast = _block()
    x = randn(1, 3, 16)
    args = (x, fast.norm.weight, fast.in_proj.weight, fast.attn_out.weight, fast.ff_out.weight,
            fast.rotary.inv_freq)
    assert torch.equal(ops.parallel_block(*args, n_heads=np.int64(2), head_dim=8, d_ff=24),
                       ops.parallel_block(*args, n_heads=2, head_dim=8, d_ff=24))
    with pytest.raises(TypeError, match="n_heads: expected an int"):
        ops.parallel_block(*args, n_heads=2.0, head_dim=8, d_ff=24)


def test_kv_cache_arguments():
    """Lengths live in int32 device tensors: a max_len of 2**31 or more would wrap them; a
    bad device string gave torch's parse error without the argument's name."""
    with pytest.raises(ValueError, match=r"max_len: expected at most 2\*\*31 - 1"):
        KVCache(1, 1, 2 ** 31, 1, page_size=2 ** 30, num_pages=1)
    # paged: whole pages past 2**31 - 1 wrapped the Triton decode's key range (n_blocks * page
    # size in int32: every split empty, the output zeros)
    with pytest.raises(ValueError, match=r"max_len: with page_size=256 .* expected max_len <= 2147483392"):
        KVCache(1, 1, 2 ** 31 - 1, 1, page_size=256, num_pages=1)
    assert KVCache(1, 1, 2 ** 31 - 256, 1, page_size=256, num_pages=1).blocks_per_seq == 2 ** 23 - 1
    with pytest.raises(ValueError, match="device: expected a torch.device or a device string, got 'gpu'"):
        KVCache(1, 1, 8, 8, device="gpu")


def test_block_errors_name_the_argument_the_caller_passed():
    """A mismatched x named ln_weight (with a garbled 'torch.float32 or torch.float32'); an
    nn.LayerNorm given x of another width named its weight."""
    _, fast = _block(torch.bfloat16)
    with pytest.raises(TypeError, match=r"x: expected dtype torch.bfloat16 \(the block weights'\)"):
        fast(randn(1, 3, 16))
    _, fast = _block()
    with pytest.raises(ValueError, match="x: expected last dim 16"):
        fast(randn(1, 3, 15))
    with pytest.raises(TypeError, match=r"ln_weight: expected dtype torch.float32 \(same as x\), got "):
        ops.parallel_block(randn(1, 3, 16), fast.norm.weight.half(), fast.in_proj.weight,
                           fast.attn_out.weight, fast.ff_out.weight, fast.rotary.inv_freq,
                           n_heads=2, head_dim=8, d_ff=24)
    with pytest.raises(ValueError, match=r"x: expected last dim 8 \(this LayerNorm's\)"):
        LayerNorm(8)(randn(2, 4))


def test_block_cache_is_checked_before_it_is_written():
    """The block's cache: any other object raised AttributeError 'length'; a batch mismatch
    named an argument of the reference cache (k_new); a bf16 reference cache (which the
    reference block takes) raised a C++ dtype error after its keys were appended."""
    ref, fast = _block()
    x = randn(2, 5, 16)
    for bad, exc, match in ((object(), TypeError, "cache: expected None or a palm_fast.reference"),
                            (KVCache(1, 2, 8, 8), TypeError, "cache: expected None or a palm_fast.reference"),
                            (RefCache(3, 16, 1, 8), ValueError, r"cache: expected .* \(2, 1, 8\)"),
                            (RefCache(2, 3, 1, 8), RuntimeError, "KVCache overflow: 0 cached \\+ 5 new")):
        with pytest.raises(exc, match=match):
            fast(x, cache=bad)
        if isinstance(bad, RefCache):
            assert bad.length == 0 and not bad.k.any()
    class Duck:   # the reference cache's interface, another class: its own checks apply
        def __init__(self):
            self.inner = RefCache(2, 16, 1, 8)

        @property
        def length(self):
            return self.inner.length

        def append(self, k, v):
            return self.inner.append(k, v)

    with torch.no_grad():
        torch.testing.assert_close(fast(x, cache=Duck()), ref(x, cache=RefCache(2, 16, 1, 8)),
                                   rtol=1e-5, atol=1e-5)
        c_ref, c_fast = (RefCache(2, 16, 1, 8, dtype=torch.bfloat16) for _ in range(2))
        for step in (x[:, :3], x[:, 3:]):
            want, got = ref(step, cache=c_ref), fast(step, cache=c_fast)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert c_fast.length == 5 and torch.equal(c_fast.k, c_ref.k)


def test_loss_token_checks_and_lm_loss_link():
    """nn.PaLM.loss with 1-D tokens raised IndexError, with a list AttributeError, and named
    targets for bad tokens; tied_lm_loss took any object as link and failed in backward."""
    model = palm_fast.nn.PaLM(get_config("palm-tiny"))
    ref = PaLM(get_config("palm-tiny"))
    for m in (model, ref):
        with pytest.raises(ValueError, match=r"tokens: expected an integer tensor of shape \[B, T\]"):
            m.loss(torch.tensor([1, 2, 3]))
        with pytest.raises(ValueError, match="tokens: expected an integer tensor"):
            m.loss([[1, 2, 3]])
        with pytest.raises(TypeError, match="tokens: expected dtype int32 or int64"):
            m.loss(torch.ones(2, 4))
        with pytest.raises(ValueError, match=r"targets: token ids must lie in \[0, 256\)"):
            m.loss(torch.tensor([[1, 2, 256]]))
        with pytest.raises(ValueError, match=r"tokens: token ids must lie in \[0, 256\)"):
            m.loss(torch.tensor([[256, 1, 2]]), torch.tensor([[1, 2, 3]]))
    h, w = randn(4, 8).requires_grad_(), randn(10, 8).requires_grad_()
    with pytest.raises(TypeError, match="link: expected None or a GradLink"):
        tied_lm_loss(h, w, torch.randint(0, 10, (4,)), link=object())
    with pytest.raises(TypeError, match="link: expected None or a GradLink"):
        embed_tokens(w, torch.tensor([1, 2]), link=object())


def test_cache_count_and_fork_refusals_change_nothing():
    """n_new beyond the T tokens given (the kernel would read past k), a fork onto the same
    destination twice (pages counted twice, never freed), an odd rotary_dim: refused, the
    cache unchanged (gaps a mutation review found untested)."""
    cache = KVCache(1, 3, 16, 8, page_size=4)
    cache.append(0, randn(3, 6, 8), randn(3, 6, 8), torch.tensor([6, 0, 0]))
    cache.advance(torch.tensor([6, 0, 0]))

    def snapshot():
        return [t.clone() for t in (cache.k, cache.v, cache.page_table, cache.lengths)]

    before = snapshot()
    k, v = randn(3, 2, 8), randn(3, 2, 8)
    for n_new in (3, torch.tensor([0, 3, 1])):
        with pytest.raises(ValueError, match="n_new"):
            cache.append(0, k, v, n_new)
    with pytest.raises(ValueError, match="dst"):
        cache.fork(0, [1, 1])
    assert all(torch.equal(a, b) for a, b in zip(snapshot(), before))
    cache.fork(0, [1, 2])   # (the same fork, once per destination, is fine)
    assert cache.lengths.tolist() == [6, 6, 6]
    with pytest.raises(ValueError, match="rotary_dim"):
        ops.rope(randn(1, 2, 2, 8), randn(1, 2, 1, 8), rotary_dim=3)


def test_fork_edge_cases():
    """Three fork paths a mutation audit found untested: too few free pages for the
    partly filled last page of several destinations (refused, nothing changed), a
    destination holding reserved pages (refused: its pages would leak), and a second fork of
    the same source with a longer prefix (a new group, not merged into the shorter one:
    the shared-prefix decode must equal the per-sequence one)."""
    cache = KVCache(1, 4, 8, 8, page_size=4, num_pages=3)
    cache.append(0, randn(4, 6, 8), randn(4, 6, 8), torch.tensor([6, 0, 0, 0]))
    cache.advance(torch.tensor([6, 0, 0, 0]))

    def snapshot(c):
        return [t.clone() for t in (c.k, c.v, c.page_table, c.lengths)] + [c.free_pages()]

    before = snapshot(cache)
    with pytest.raises(ValueError, match="out of pages"):
        cache.fork(0, [1, 2])                      # 2 partial-page copies, 1 free page
    assert all(a == b if isinstance(a, int) else torch.equal(a, b) for a, b in zip(snapshot(cache), before))

    cache = KVCache(1, 4, 16, 8, page_size=4)
    cache.append(0, randn(4, 10, 8), randn(4, 10, 8), torch.tensor([10, 0, 0, 0]))
    cache.advance(torch.tensor([10, 0, 0, 0]))
    cache.reserve(torch.tensor([0, 3, 0, 0]))      # seq 1: length 0, one page reserved
    free = cache.free_pages()
    with pytest.raises(ValueError, match="reserved pages"):
        cache.fork(0, 1)
    assert cache.free_pages() == free
    cache.fork(0, 2, n_tokens=4)                   # one shared page
    cache.fork(0, 3, n_tokens=8)                   # two shared pages: another group
    groups = {(g.members, g.n_tokens) for g in cache.prefix_groups()}
    assert groups == {((0, 3), 8)}, groups
    q = randn(4, 2, 8)
    torch.testing.assert_close(ops.mqa_decode(q, cache, 0, cache.lengths, shared_prefix=True),
                               ops.mqa_decode(q, cache, 0, cache.lengths, shared_prefix=False))


# ------------------------------------------------------------------ twenty-second session review

def test_sparse_and_other_layouts_are_refused_naming_the_argument():
    """Sparse inputs raised torch's internal errors (naming no argument); tied_lm_loss took a
    sparse CSR h silently."""
    x, w = randn(3, 8), torch.ones(8)
    calls = {
        "x": lambda: ops.swiglu(x.to_sparse()),
        "weight": lambda: ops.layer_norm(x, w.to_sparse()),
        "a": lambda: ops.add_layer_norm(x, x.to_sparse(), weight=w),
        "q": lambda: ops.causal_mqa_attention(randn(1, 3, 2, 4).to_sparse(), randn(1, 3, 4), randn(1, 3, 4)),
        "h": lambda: tied_lm_loss(x.to_sparse_csr(), randn(5, 8), torch.tensor([0, 1, 2])),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"^{name}: expected a dense \(torch.strided\) tensor"):
            call()


def test_kv_cache_numpy_int32_sizes_are_python_ints(monkeypatch):
    """numpy int32 sizes reached the byte count of the cache buffer, which wrapped at 2**32
    (a 4 GiB + 2 MiB cache was counted as 2 MiB; construction then failed)."""
    import palm_fast.kv_cache as kv

    shapes = []
    real = kv._zeros_kv
    monkeypatch.setattr(kv, "_zeros_kv", lambda shape, *a: shapes.append(shape) or real(shape, *a))
    i32 = np.int32
    for ps in (None, i32(4)):
        cache = KVCache(i32(2), i32(3), i32(10), i32(8), page_size=ps,
                        num_pages=None if ps is None else i32(9))
        assert all(type(n) is int for n in shapes[-1]), shapes[-1]
        assert all(type(getattr(cache, a)) is int for a in ("n_layers", "batch", "max_len", "head_dim"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable CUDA device")
def test_kv_cache_on_an_unavailable_cuda_device():
    with pytest.raises(ValueError, match="^device: cuda is not available"):
        KVCache(1, 1, 4, 8, device="cuda")


def test_direct_writes_to_lengths_or_page_table_are_refused_before_an_append():
    """The kernels write at lengths[b] + t through page_table: a value written there directly
    (the module docstring says not to) sent the Triton append out of bounds (memory
    corruption; heap errors and a segfault under the interpreter) and made the C++ one
    raise RuntimeError. Now a ValueError, and the cache is unchanged."""
    for ps in (None, 4):
        for what in ("lengths", "page_table"):
            if what == "page_table" and ps is None:
                continue
            cache = KVCache(1, 2, 32, 8, page_size=ps)
            cache.append(0, randn(2, 2, 8), randn(2, 2, 8))
            cache.advance(2)
            if what == "lengths":
                cache.lengths[0] = 10**6
            else:
                cache.page_table[0, 0] = -1
            before = [t.clone() for t in (cache.k, cache.v)]
            for call in (lambda c: c.append(0, randn(2, 1, 8), randn(2, 1, 8)),
                         lambda c: ops.rope_append(randn(2, 1, 2, 8), randn(2, 1, 8), randn(2, 1, 8), c, 0)):
                with pytest.raises(ValueError, match=f"^{what}: changed outside the KVCache methods"):
                    call(cache)
            assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])
            # written back to what the cache holds: accepted again
            if what == "lengths":
                cache.lengths[0] = 2
            else:
                cache.page_table[0, 0] = cache._host_table[0][0]
            cache.append(0, randn(2, 1, 8), randn(2, 1, 8))
    # the cache's own methods never trip the check
    cache = KVCache(1, 3, 16, 8, page_size=4)
    for _ in range(3):
        cache.append(0, randn(3, 3, 8), randn(3, 3, 8))
        cache.advance(3)
    cache.reset([1])
    cache.fork(0, 1)
    cache.reserve(2)
    cache.append(0, randn(3, 1, 8), randn(3, 1, 8))


def test_generate_token_ids_beyond_int64_and_tiny_top_p():
    """A prompt id of 2**70 raised numpy/torch's "Overflow when unpacking long long" (no
    argument named). A top_p below fp32's smallest subnormal compared as 0.0 and dropped
    every token: multinomial raised on the all-NaN probabilities; now it samples greedily
    (the most likely token is always kept), as top_p=1e-9 did."""
    from palm_fast.generation import sample

    model = PaLM(get_config("palm-tiny", n_layers=1)).eval()
    with pytest.raises(ValueError, match=rf"^prompts\[1\]: token ids must lie in \[0, 256\), got {2**70}$"):
        palm_fast.generate(model, [[1, 2], [3, 2**70]], 2)
    logits = randn(4, 50)
    for top_p in (1e-46, 1e-300, 1e-9):
        g = torch.Generator().manual_seed(0)
        assert torch.equal(sample(logits, 1.0, top_p=top_p, generator=g), logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    out = palm_fast.generate(model, [[1, 2, 3]], 4, temperature=1.0, top_p=1e-300, generator=g)
    want = palm_fast.generate(model, [[1, 2, 3]], 4)
    assert torch.equal(out[0], want[0])


def test_layer_norm_module_takes_torchs_keyword_and_numpy_sizes():
    """nn.LayerNorm(normalized_shape=8) raised TypeError, a numpy size ValueError, and the
    module had no normalized_shape attribute (torch.nn.LayerNorm's)."""
    for m in (LayerNorm(normalized_shape=8), LayerNorm(np.int64(8)), LayerNorm((np.int32(8),)),
              LayerNorm(normalized_shape=torch.Size([8]), bias=True),
              LayerNorm.from_torch(torch.nn.LayerNorm(8))):
        assert m.dim == 8 and type(m.dim) is int and m.normalized_shape == (8,)
        assert m.weight.shape == (8,)
    with pytest.raises(TypeError, match="^dim: expected the feature size"):
        LayerNorm(8, normalized_shape=8)
    with pytest.raises(TypeError, match="^dim: expected the feature size"):
        LayerNorm()


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64])
def test_triton_rope_and_swiglu_launchers_refuse_other_dtypes(dtype):
    """The raw ops (``torch.ops.palm_fast.rope`` / ``swiglu``) reach the Triton launchers
    without the public functions' checks: an int32 input was computed silently and an fp64
    one in fp32 (the C++ kernels refuse the former and compute the latter in fp64)."""
    from conftest import TRITON_DEVICE

    from palm_fast.kernels import rope as kr
    from palm_fast.kernels import swiglu as ks

    dev = TRITON_DEVICE
    q = torch.ones(1, 2, 2, 4, dtype=dtype, device=dev)
    k = torch.ones(1, 2, 1, 4, dtype=dtype, device=dev)
    inv = torch.ones(2, device=dev)
    with pytest.raises(TypeError, match="^q: expected dtype torch.float32, torch.float16 or torch.bfloat16"):
        kr.rope(q, k, inv, torch.zeros(1, dtype=torch.int32, device=dev), pos_is_offset=True)
    with pytest.raises(TypeError, match="^x: expected dtype torch.float32, torch.float16 or torch.bfloat16"):
        ks.swiglu_fwd(torch.ones(3, 4, dtype=dtype, device=dev))
    with pytest.raises(TypeError, match="^x: expected dtype"):
        ks.swiglu_bwd(torch.ones(3, 2, dtype=dtype, device=dev), torch.ones(3, 4, dtype=dtype, device=dev))


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64])
def test_raw_cpu_ops_refuse_dtypes_their_kernels_do_not_compute(dtype):
    """The raw CPU ops whose C++ kernels compute in fp32 (rope, mqa_attention and its
    backward, rope_append, mqa_decode) refuse other dtypes by name: an fp64 input was
    computed in fp32 and returned as fp64 (|error| ~2e-7 against fp64). The C++ SwiGLU
    computes fp64 in fp64 (its gradcheck) and keeps it."""
    P = torch.ops.palm_fast
    B, T, H, D = 1, 3, 2, 8
    t = lambda *s: torch.ones(*s, dtype=dtype)  # noqa: E731
    inv, pos = torch.ones(D // 2), torch.zeros(B, dtype=torch.int32)
    ends = torch.tensor([2], dtype=torch.int32)
    calls = {
        "rope": lambda: P.rope(t(B, T, H, D), t(B, T, 1, D), inv, pos, True, False, False),
        "rope_": lambda: P.rope_(t(B, T, H, D), t(B, T, 1, D), inv, pos, True, False, False),
        "mqa_attention": lambda: P.mqa_attention(t(B, T, H, D), t(B, T, D), t(B, T, D), 0.5),
        "mqa_attention_bwd": lambda: P.mqa_attention_bwd(t(B, T, H, D), t(B, T, H, D), t(B, T, D),
                                                         t(B, T, D), t(B, T, H, D),
                                                         torch.zeros(B, T, H), 0.5),
        "mqa_decode": lambda: P.mqa_decode(t(B, H, D), t(1, B, 4, D), t(1, B, 4, D), None, None, ends,
                                           0, 0.5, False),
    }
    k_cache, v_cache = t(1, B, 4, D), t(1, B, 4, D)
    k_before = k_cache.clone()
    calls["rope_append"] = lambda: P.rope_append(t(B, 1, H, D), t(B, 1, D), t(B, 1, D), k_cache, v_cache,
                                                 None, ends, torch.ones(B, dtype=torch.int32), None, inv,
                                                 0, False)
    for call in calls.values():
        with pytest.raises(TypeError, match="^q: expected dtype torch.float32, torch.float16 or "
                                            f"torch.bfloat16, got {dtype}"):
            call()
    assert torch.equal(k_cache, k_before)
    # a cache of another dtype than q: named (the decode and append launchers check it too)
    q = torch.ones(B, H, D)
    with pytest.raises(TypeError, match=r"^v_cache: expected dtype torch.float32 \(same as q\), got"):
        P.mqa_decode(q, torch.ones(1, B, 4, D), torch.ones(1, B, 4, D, dtype=torch.bfloat16), None, None,
                     ends, 0, 0.5, False)


def test_triton_decode_launchers_refuse_other_dtypes():
    """The Triton decode and append launchers (the raw ops' CUDA kernels) check dtypes as
    the CPU ones do."""
    from conftest import TRITON_DEVICE

    from palm_fast.kernels import mqa_decode as kd

    dev, B, H, D = TRITON_DEVICE, 1, 2, 16
    ends = torch.tensor([2], dtype=torch.int32, device=dev)
    cache = torch.ones(1, B, 4, D, device=dev)
    with pytest.raises(TypeError, match="^q: expected dtype torch.float32, torch.float16 or torch.bfloat16"):
        kd.mqa_decode(torch.ones(B, H, D, dtype=torch.float64, device=dev), cache, cache, None, None,
                      ends, 0, 0.5, False)
    with pytest.raises(TypeError, match=r"^k_cache: expected dtype torch.bfloat16 \(same as q\)"):
        kd.mqa_decode(torch.ones(B, H, D, dtype=torch.bfloat16, device=dev), cache, cache, None, None,
                      ends, 0, 0.5, False)
    before = cache.clone()
    with pytest.raises(TypeError, match=r"^v: expected dtype torch.float32 \(same as q\), got torch.float16"):
        kd.rope_append(torch.ones(B, 1, H, D, device=dev), torch.ones(B, 1, D, device=dev),
                       torch.ones(B, 1, D, dtype=torch.float16, device=dev), cache, cache, None, ends,
                       torch.ones(B, dtype=torch.int32, device=dev), None, torch.ones(D // 2, device=dev),
                       0, False)
    assert torch.equal(cache, before)
