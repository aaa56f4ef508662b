"""The C++ causal multi-query attention (csrc/mqa_attention.cpp, palm_fast::mqa_attention):
forward and backward against the reference attention in fp64 (tolerance rule per dtype),
odd shapes, determinism, opcheck, and the CPU path of causal_mqa_attention using it."""
from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, assert_close_by_rule, randn

from palm_fast._ext import cpp
from palm_fast.ops import block as ob
from palm_fast.ops import causal_mqa_attention
from palm_fast.reference.layers import attention as ref_attention

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(1, 1, 1, 8), (2, 37, 3, 24), (1, 64, 4, 64), (2, 33, 8, 16), (1, 9, 2, 5),
          (1, 17, 5, 80), (1, 100, 6, 96), (1, 20, 3, 256), (1, 1000, 2, 48)]


def _fwd_bwd(fn, q, k, v, g):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), g)
    return o.detach(), dq, dk, dv


def _ours(q, k, v):
    return ob._cpu_mqa(q, k, v, None)      # the C++ kernel at any head dim


def _ref(q, k, v):
    return ref_attention(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,D", SHAPES)
def test_matches_reference(dtype, B, T, H, D):
    q, k, v = randn(B, T, H, D, dtype=dtype), randn(B, T, 1, D, dtype=dtype), randn(B, T, 1, D, dtype=dtype)
    g = randn(B, T, H, D, dtype=dtype)
    ours = _fwd_bwd(_ours, q, k, v, g)
    ref = _fwd_bwd(_ref, q.double(), k.double(), v.double(), g.double())
    eager = _fwd_bwd(_ref, q, k, v, g)
    for name, a, r, e in zip(("o", "dq", "dk", "dv"), ours, ref, eager):
        assert a.dtype == dtype
        assert_close_by_rule(a, r.to(dtype), e, name=name)


def test_fp32_tight_and_deterministic():
    q, k, v = randn(2, 50, 4, 32), randn(2, 50, 32), randn(2, 50, 32)
    g = randn(2, 50, 4, 32)
    a = _fwd_bwd(_ours, q, k, v, g)
    b = _fwd_bwd(_ours, q, k, v, g)
    r = _fwd_bwd(_ref, q.double(), k.double()[:, :, None], v.double()[:, :, None], g.double())
    for x, y, z in zip(a, b, r):
        assert torch.equal(x, y)
        torch.testing.assert_close(x.double(), z.reshape(x.shape), rtol=1e-5, atol=2e-6)


def test_same_bits_for_any_thread_count():
    """Tasks and the backward's dk / dv partial sums depend on the shape only: 1 and 2
    threads give bitwise the same forward and backward."""
    q, k, v = randn(2, 70, 3, 40), randn(2, 70, 40), randn(2, 70, 40)
    g = randn(2, 70, 3, 40)
    runs = []
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(_fwd_bwd(_ours, q, k, v, g))
    finally:
        torch.set_num_threads(prev)
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_kernel_direct_and_lse():
    q, k, v = randn(1, 7, 2, 8), randn(1, 7, 8), randn(1, 7, 8)
    o, lse = cpp().mqa_attn_fwd(q, k, v, 0.5)
    s = torch.einsum("bthd,bjd->bthj", q.double(), k.double()) * 0.5
    mask = torch.arange(7)[None, :] > torch.arange(7)[:, None]
    s = s.masked_fill(mask[None, :, None, :], float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o.double(), torch.einsum("bthj,bjd->bthd", s.softmax(-1), v.double()),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="k, v: expected shape"):
        cpp().mqa_attn_fwd(q, k[:, :5], v, 0.5)
    with pytest.raises(RuntimeError, match="expected a contiguous tensor"):
        cpp().mqa_attn_fwd(q.transpose(1, 2), k, v, 0.5)


def test_opcheck():
    q, k, v = randn(1, 5, 2, 8), randn(1, 5, 8), randn(1, 5, 8)
    torch.library.opcheck(ob.mqa_attention_op, (q.requires_grad_(True), k.requires_grad_(True),
                                                v.requires_grad_(True), 0.35))
    o, lse = ob.mqa_attention_op(q, k, v, 0.35)
    torch.library.opcheck(ob.mqa_attention_bwd_op, (randn(1, 5, 2, 8), q.detach(), k.detach(),
                                                    v.detach(), o.detach(), lse.detach(), 0.35))


def test_custom_op_path_matches_eager_path():
    """The custom op (used under torch.compile) and the eager autograd.Function agree bitwise."""
    q, k, v = randn(2, 11, 3, 16), randn(2, 11, 16), randn(2, 11, 16)
    g = randn(2, 11, 3, 16)
    a = _fwd_bwd(lambda q, k, v: ob.mqa_attention_op(q, k, v, 0.25)[0], q, k, v, g)
    b = _fwd_bwd(lambda q, k, v: ob._MQAEager.apply(q, k, v, 0.25)[0], q, k, v, g)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The shapes of q the C++ forward kernel is called with, through causal_mqa_attention."""
    from palm_fast._ext import cpp

    calls = []
    real = cpp().mqa_attn_fwd

    class _Spy:   # palm_fast._C is an extension module: wrap the cached module object
        def __getattr__(self, name):
            return getattr(cpp.__wrapped__(), name)

        def mqa_attn_fwd(self, *a):
            calls.append(a[0].shape)
            return real(*a)

    monkeypatch.setattr(ob, "cpp", lambda: _Spy())
    return calls


def _check_route(calls, T, H, D, want):
    """causal_mqa_attention at [1, T, H, D]: the reference result, from the C++ kernel
    exactly ``want`` times (0: SDPA)."""
    calls.clear()
    q, k, v = randn(1, T, H, D), randn(1, T, D), randn(1, T, D)
    g = randn(1, T, H, D)
    a = _fwd_bwd(causal_mqa_attention, q, k, v, g)
    assert len(calls) == want, (T, H, D, calls)
    r = _fwd_bwd(_ref, q.double(), k.double()[:, :, None], v.double()[:, :, None], g.double())
    for x, z in zip(a, r):
        torch.testing.assert_close(x.double(), z.reshape(x.shape), rtol=1e-5, atol=2e-6)


def test_causal_mqa_attention_routes_by_size(monkeypatch, kernel_calls):
    """causal_mqa_attention runs the C++ kernel on CPU while T * hd <= CPU_MQA_MAX_KV (ATen's
    CPU flash attention above, chosen inside the op): both give the reference result, and
    the C++ kernel runs exactly when expected."""
    assert 128 * 64 <= ob.CPU_MQA_MAX_KV     # the palm-small training shape takes the kernel
    monkeypatch.setattr(ob, "CPU_MQA_MAX_KV", 12 * 24)
    for D, want in ((24, 1), (32, 0)):
        _check_route(kernel_calls, 12, 2, D, want)


def test_bad_arguments():
    q, k, v = randn(1, 3, 2, 8), randn(1, 3, 8), randn(1, 3, 8)
    for scale, err in ((float("inf"), ValueError), (float("nan"), ValueError), (0.0, ValueError),
                       (True, TypeError), ("0.1", TypeError)):
        with pytest.raises(err, match="scale"):
            causal_mqa_attention(q, k, v, scale=scale)
    with pytest.raises(ValueError, match="q: expected a head dim >= 1"):
        causal_mqa_attention(randn(1, 3, 2, 0), randn(1, 3, 0), randn(1, 3, 0))
    with pytest.raises(TypeError, match="k: expected dtype"):
        causal_mqa_attention(q, k.double(), v)


def test_no_query_heads_gives_zero_kv_gradients():
    q = randn(2, 8, 0, 16).requires_grad_()
    k, v = randn(2, 8, 16).requires_grad_(), randn(2, 8, 16).requires_grad_()
    causal_mqa_attention(q, k, v).sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))


def test_many_heads_tiny_head_dim_routes_to_aten_flash(monkeypatch, kernel_calls):
    """The C++ backward holds a token block x H x T floats of scores per thread: with many
    heads and a tiny head dim inside CPU_MQA_MAX_KV (head dim 1, 64 heads, T = 49152) that
    was 19 GB per buffer. Such shapes now take ATen's flash attention (the bound lowered
    here to keep the case small); PaLM-like shapes keep the kernel."""
    assert ob._cpu_mqa_scratch(49152, 64) > ob.CPU_MQA_MAX_SCRATCH
    for T, H in ((384, 48), (768, 16), (128, 8)):   # head dims 128, 64, 256 at their T bound
        assert ob._cpu_mqa_scratch(T, H) <= ob.CPU_MQA_MAX_SCRATCH // 8
    monkeypatch.setattr(ob, "CPU_MQA_MAX_SCRATCH", ob._cpu_mqa_scratch(64, 8))
    for T, want in ((64, 1), (128, 0)):
        _check_route(kernel_calls, T, 8, 2, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_op_above_the_kernel_bound(monkeypatch, kernel_calls, dtype):
    """palm_fast::mqa_attention past the C++ kernel's bound (lowered here) runs ATen's flash
    attention inside the op, forward and backward, through the custom op (torch.compile /
    export) and the eager Function alike: the same bits from both, the reference result, the
    same lse as the C++ kernel's (natural log-sum-exp of the scaled scores, [B, T, H] fp32)
    and no C++ call."""
    B, T, H, D = 2, 23, 3, 16
    s = D ** -0.5
    q, k, v = randn(B, T, H, D, dtype=dtype), randn(B, T, D, dtype=dtype), randn(B, T, D, dtype=dtype)
    g = randn(B, T, H, D, dtype=dtype)
    lse_c = ob.mqa_attention_op(q, k, v, s)[1]
    monkeypatch.setattr(ob, "CPU_MQA_MAX_KV", T * D - 1)
    kernel_calls.clear()
    a = _fwd_bwd(lambda q, k, v: ob.mqa_attention_op(q, k, v, s)[0], q, k, v, g)
    b = _fwd_bwd(lambda q, k, v: ob._MQAEager.apply(q, k, v, s)[0], q, k, v, g)
    assert kernel_calls == []
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    o_f, lse_f = ob.mqa_attention_op(q, k, v, s)
    assert lse_f.shape == (B, T, H) and lse_f.dtype == torch.float32 and o_f.is_contiguous()
    torch.testing.assert_close(lse_f, lse_c, rtol=1e-4, atol=1e-4)

    def ref(q, k, v):
        return _ref(q, k[:, :, None], v[:, :, None])

    r = _fwd_bwd(ref, q.double(), k.double(), v.double(), g.double())
    e = _fwd_bwd(ref, q, k, v, g)
    for name, x, rr, ee in zip(("o", "dq", "dk", "dv"), a, r, e):
        assert_close_by_rule(x, rr.to(dtype), ee, name=name)


def test_no_query_heads_past_the_kernel_bound():
    """H = 0 with T * hd past the C++ kernel's bound: ATen's flash kernel divides by zero
    there (the process died of SIGFPE); empty inputs stay on the C++ kernel."""
    q = randn(1, 1000, 0, 64).requires_grad_()
    k, v = randn(1, 1000, 64).requires_grad_(), randn(1, 1000, 64).requires_grad_()
    assert 1000 * 64 > ob.CPU_MQA_MAX_KV
    o = causal_mqa_attention(q, k, v)
    assert o.shape == (1, 1000, 0, 64)
    o.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))
