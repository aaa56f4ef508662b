"""The eager path of the public ops (a plain autograd.Function over the device
implementations) against the ``palm_fast::`` custom ops used under torch.compile: both must
give bitwise-equal outputs and gradients, on the CPU (C++) and on CUDA when present."""
from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, randn

from palm_fast import ops

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
DTYPES = [torch.float32, torch.bfloat16]


def _grads(outs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    outs = [o for o in (outs if isinstance(outs, (tuple, list)) else (outs,)) if o.requires_grad]
    cot = [torch.randn(o.shape, generator=g).to(o) for o in outs]
    return torch.autograd.grad(outs, inputs, cot)


def _same(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_eager_equals_custom_op(device, dtype):
    x = randn(3, 5, 2 * 96, dtype=dtype, device=device).requires_grad_()
    a, b = ops.swiglu(x), torch.ops.palm_fast.swiglu(x)
    _same([a], [b])
    _same(_grads(a, [x]), _grads(b, [x]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_eager_equals_custom_op(device, dtype):
    from palm_fast.reference.functional import rope_inv_freq

    q = randn(2, 7, 4, 64, dtype=dtype, device=device).requires_grad_()
    k = randn(2, 7, 1, 64, dtype=dtype, device=device).requires_grad_()
    offsets = torch.tensor([3, 11], device=device)
    inv_freq = rope_inv_freq(64).to(device)
    a = ops.rope(q, k, offsets=offsets, inv_freq=inv_freq)
    b = torch.ops.palm_fast.rope(q, k, inv_freq, offsets, True, False, False)
    _same(a, b)
    _same(_grads(a, [q, k]), _grads(b, [q, k]))
    # the in-place variant's eager path writes the same values
    q2, k2 = q.detach().clone(), k.detach().clone()
    ops.rope_(q2, k2, offsets=offsets, inv_freq=inv_freq)
    _same([q2, k2], [t.detach() for t in b])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_eager_equals_custom_op(device, dtype):
    x = randn(37, 200, dtype=dtype, device=device).requires_grad_()
    w = randn(200, dtype=dtype, device=device).requires_grad_()
    b = randn(200, dtype=dtype, device=device).requires_grad_()
    y1 = ops.layer_norm(x, w, b)
    y2 = torch.ops.palm_fast.layer_norm_fwd(x, w, b, 1e-5)[0]
    _same([y1], [y2])
    _same(_grads(y1, [x, w, b]), _grads(y2, [x, w, b]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_layer_norm_eager_equals_custom_op(device, dtype):
    x, a, m = (randn(9, 130, dtype=dtype, device=device).requires_grad_() for _ in range(3))
    w = randn(130, dtype=dtype, device=device).requires_grad_()
    s1, o1 = ops.add_layer_norm(x, a, m, weight=w)
    s2, o2, _, _ = torch.ops.palm_fast.add_layer_norm_fwd(x, a, m, w, None, 1e-5)
    _same([s1, o1], [s2, o2])
    _same(_grads((s1, o1), [x, a, m, w]), _grads((s2, o2), [x, a, m, w]))


@pytest.mark.parametrize("device", DEVICES)
def test_rope_double_backward_on_eager_path(device):
    """The backward of RoPE is RoPE by -theta; with create_graph it stays differentiable:
    g = R^T gq, so d(sum g)/d gq = R 1."""
    q = randn(1, 5, 3, 32, device=device).requires_grad_()
    k = randn(1, 5, 1, 32, device=device).requires_grad_()
    gq = randn(1, 5, 3, 32, device=device).requires_grad_()
    qo, _ = ops.rope(q, k)
    (g,) = torch.autograd.grad(qo, q, gq, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), gq)
    expect, _ = ops.rope(torch.ones_like(q), torch.ones_like(k))
    torch.testing.assert_close(gg, expect)


def test_host_launch_arithmetic_matches_triton():
    """The launchers' host-side cdiv / next_pow2 (plain Python: triton's are constexpr
    functions, microseconds per host call) give triton's values."""
    import triton

    from palm_fast.kernels._common import cdiv, next_pow2

    for n in [1, 2, 3, 15, 16, 17, 100, 127, 128, 129, 4095, 4096, 4097, 32768, 10**9]:
        assert next_pow2(n) == triton.next_power_of_2(n)
        for d in (1, 3, 16, 64, 128, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d)
    assert cdiv(0, 64) == 0 and next_pow2(0) == 1


def _penalty_cases():
    """(name, fn of the leaves, leaves): ops whose backward is not itself differentiable."""
    from palm_fast import get_config
    from palm_fast import nn as fnn

    x, w = randn(3, 16).requires_grad_(), randn(16).requires_grad_()
    yield "layer_norm", lambda x, w: ops.layer_norm(x, w), (x, w)
    yield "add_layer_norm", lambda x, w: ops.add_layer_norm(x, x * 2, weight=w)[1], (x, w)
    yield "swiglu", lambda x: ops.swiglu(x), (randn(4, 8).requires_grad_(),)
    h, emb = randn(6, 16).requires_grad_(), randn(32, 16).requires_grad_()
    t = torch.randint(0, 32, (6,))
    yield "tied_lm_loss", lambda h, e: ops.tied_lm_loss(h, e, t)[0], (h, emb)
    model = fnn.PaLM(get_config("palm-tiny", n_layers=1))
    tok = torch.randint(0, 256, (1, 8))
    yield "model", lambda *ps: model.loss(tok)[0], tuple(model.parameters())


@pytest.mark.parametrize("case", list(range(5)))
def test_double_backward_raises_instead_of_dropping_terms(case):
    """A gradient penalty through an op whose backward is not differentiable must raise,
    also when the weighting of the outputs is a constant (torch's once_differentiable then
    adds no error node, and the second-order terms silently vanished)."""
    name, fn, leaves = list(_penalty_cases())[case]
    out = fn(*leaves)
    weight = torch.linspace(-1, 1, out.numel()).view(out.shape)   # does not require grad
    grads = torch.autograd.grad((out * weight).sum(), leaves, create_graph=True)
    penalty = sum((g * g).sum() for g in grads)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(penalty, leaves, allow_unused=True)
    # first-order gradients taken with create_graph=True are unchanged
    plain = torch.autograd.grad((fn(*leaves) * weight).sum(), leaves)
    for a, b in zip(grads, plain):
        torch.testing.assert_close(a.detach(), b)


def test_instance_override_and_methods_replaced():
    """The checks patch and generate use to refuse code they would bypass."""
    import functools

    from palm_fast.ops._dispatch import instance_override, methods_replaced

    def deco(f):
        @functools.wraps(f)
        def g(*a):
            return f(*a)
        return g

    class Base(torch.nn.Module):
        def helper(self):
            return 1

        def forward(self, x):
            return x

    class Sub(Base):
        helper = 3            # redefined as a plain attribute: not a method any more

        @staticmethod
        def stat():
            return 2

        @deco                 # functools.wraps keeps the name: not a replacement
        def forward(self, x):
            return x

    outer = torch.nn.Sequential(Sub(), torch.nn.Linear(2, 2))
    assert instance_override(outer) is None and methods_replaced(Sub) == []
    outer[0].helper = 4                       # not a method of Sub
    outer[0].tag = "x"                        # nor any other plain attribute
    assert instance_override(outer) is None
    outer[0].stat = lambda: 5
    assert instance_override(outer) == ("0", "stat")
    assert instance_override(outer[1]) is None
    outer[1].forward = lambda x: 2 * x
    assert instance_override(outer[1]) == ("", "forward")

    class Fresh(Base):
        pass

    Fresh.forward = lambda self, x: 2 * x     # a class-level monkeypatch
    assert methods_replaced(Fresh) == ["Fresh.forward"]
    assert methods_replaced(Base) == []

    class Partial(Base):
        pass

    # any callable but a function (it was missed: a GeGLU made with partialmethod went through)
    Partial.forward = functools.partialmethod(lambda self, x, c: c * x, c=2)
    Partial.helper = functools.partial(lambda x: x, 1)
    assert sorted(methods_replaced(Partial)) == ["Partial.forward", "Partial.helper"]
    wrapped = torch.compile(torch.nn.Linear(2, 2))   # the wrapper's own forward: looked through
    assert instance_override(wrapped) is None and instance_override(wrapped, recurse=False) is None


def test_forward_ad_and_torch_func_transforms_raise():
    """A dual tensor's tangent was silently dropped by the kernels (a fast model's jvp was 49.6
    off finite differences, the layer_norm tangent None); vmap failed deep in the C++ kernel
    on a storage-less tensor. Both raise a palm_fast error now."""
    import torch.autograd.forward_ad as fwAD

    import palm_fast

    x, w = torch.randn(2, 8), torch.ones(8)
    with fwAD.dual_level():
        d = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            ops.layer_norm(d, w)
        blk = palm_fast.nn.ParallelBlock(8, 2, 4, 16)
        with torch.no_grad(), pytest.raises(RuntimeError, match="forward-mode AD"):
            blk(fwAD.make_dual(torch.randn(1, 3, 8), torch.randn(1, 3, 8)))
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.vmap(lambda t: ops.layer_norm(t, w))(torch.randn(3, 2, 8))
    assert torch.equal(ops.layer_norm(x, w), ops.layer_norm(x, w))   # no state left behind


def test_decorated_methods_are_not_taken_for_replacements():
    """functools.lru_cache (any functools.wraps decorator) on a method in the class body is
    the class's own code; a callable from elsewhere is not."""
    import functools

    from palm_fast.ops._dispatch import methods_replaced

    class WithCache(torch.nn.Module):
        @functools.lru_cache(maxsize=2)   # noqa: B019
        def mask(self, n):
            return n

    assert methods_replaced(WithCache) == []
    WithCache.other = functools.lru_cache(maxsize=2)(lambda self: 1)
    assert methods_replaced(WithCache) == ["WithCache.other"]


def test_in_place_and_decode_ops_refuse_dual_tensors():
    """rope_ rotated the primal and left the tangent; mqa_decode returned no tangent."""
    import torch.autograd.forward_ad as fwAD

    from palm_fast.kv_cache import KVCache

    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8)
    cache = KVCache(1, 1, 8, 8)
    cache.append(0, torch.randn(1, 3, 8), torch.randn(1, 3, 8))
    cache.advance(3)
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            ops.rope_(fwAD.make_dual(q, torch.randn_like(q)), k)
        dq = fwAD.make_dual(torch.randn(1, 2, 8), torch.randn(1, 2, 8))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            ops.mqa_decode(dq, cache, 0, torch.tensor([3], dtype=torch.int32))


def test_instance_override_sees_a_class_attribute_rebound_to_a_method():
    """The method names are kept per class; the cache key was the namespaces' sizes, so a
    class attribute rebound to a function (same count) was missed afterwards."""
    from palm_fast.ops._dispatch import instance_override

    class A(torch.nn.Module):
        scale_fn = None

        def forward(self, x):
            return x

    a = A()
    assert instance_override(a) is None
    A.scale_fn = lambda self, x: x * 2
    a.scale_fn = lambda x: x * 3
    assert instance_override(a) == ("", "scale_fn")


def _store_cast_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def store_cast(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        tl.store(y_ptr + offs, x.to(y_ptr.dtype.element_ty), mask=mask)

    return store_cast


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU interpreter's rounding (conftest)")
def test_interpreter_rounds_bf16_like_the_gpu():
    """Under the interpreter, fp32 -> bf16 in a kernel rounds to nearest even as the GPU and
    torch do (conftest patches the interpreter, which truncated)."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    x[:4] = torch.tensor([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -9, -(1.0 + 2.0 ** -8), 3.0e38])
    y = torch.empty(4096, dtype=torch.bfloat16)
    _store_cast_kernel()[(1,)](x, y, 4096, BLOCK=4096)
    assert torch.equal(y, x.to(torch.bfloat16))
    x = x.clamp(-6e4, 6e4)            # (fp16 range)
    h = torch.empty(4096, dtype=torch.float16)
    _store_cast_kernel()[(1,)](x, h, 4096, BLOCK=4096)
    assert torch.equal(h, x.to(torch.float16))
