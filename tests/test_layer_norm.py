"""LayerNorm product tests: the C++ kernels, the palm_fast:: custom ops (opcheck, compile,
autograd), the CUDA glue (on CUDA; its launchers also run here under the interpreter), the
modules (parity and state_dict with the reference and with torch.nn.LayerNorm), determinism
and bad input. The generated kernels themselves are tested in test_fusion.py."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from conftest import DTYPES, HAS_CUDA, TRITON_DEVICE, assert_close_by_rule, randn, requires_cuda

from palm_fast import reference
from palm_fast.nn import LayerNorm
from palm_fast.ops import add_layer_norm, layer_norm

# the module (palm_fast.ops.layer_norm is the function of the same name)
ln_ops = importlib.import_module("palm_fast.ops.layer_norm")


def ref_ln(x, weight, bias, eps=1e-5):
    """The reference LayerNorm (palm_fast.reference) with the given parameters."""
    mod = reference.LayerNorm(x.shape[-1], eps=eps, bias=bias is not None)
    with torch.no_grad():
        mod.weight.data = weight.detach().clone()
        if bias is not None:
            mod.bias.data = bias.detach().clone()
    return mod(x)


def grads(fn, inputs, dy):
    """(output, grads of every input) of fn(*inputs) for the cotangent dy."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    torch.autograd.backward(out, dy)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def check_ln_fwd_bwd(M, N, dtype, has_bias, fn=layer_norm, device="cpu"):
    x = randn(M, N, dtype=dtype, device=device, scale=2.0) + 0.5
    w = randn(N, dtype=dtype, device=device)
    b = randn(N, dtype=dtype, device=device) if has_bias else None
    dy = randn(M, N, dtype=dtype, device=device)
    inputs = (x, w, b)
    out, g = grads(lambda x, w, b: fn(x, w, b), inputs, dy)
    out64, g64 = grads(ref_ln, [t.double() if t is not None else None for t in inputs], dy.double())
    eager, ge = grads(ref_ln, inputs, dy)
    assert_close_by_rule(out, out64, eager, name="y")
    for name, a, r, e in zip(("dx", "dweight", "dbias"), g, g64, ge):
        if r is not None:
            assert_close_by_rule(a, r, e, name=name)


# ------------------------------------------------------------------ C++ path (CPU)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N", [(1, 1), (17, 17), (1000, 17), (17, 1000), (1, 4096), (17, 4096),
                                 (3, 18432), (2, 40000)])
def test_cpu_matches_reference(M, N, dtype):
    check_ln_fwd_bwd(M, N, dtype, has_bias=(N % 2 == 1))


@pytest.mark.parametrize("has_bias", [False, True])
def test_cpu_many_rows_fp32(has_bias):
    check_ln_fwd_bwd(1000, 1000, torch.float32, has_bias)  # several backward chunks


def test_cpu_fp32_weight_with_bf16_input():
    """Weights kept in fp32 (module not cast) with bf16 activations: y bf16, dweight fp32."""
    check_ln_fwd_bwd(33, 257, torch.bfloat16, has_bias=False,
                     fn=lambda x, w, b: layer_norm(x, w.float(), b))
    x = randn(5, 64, dtype=torch.bfloat16)
    w = randn(64).requires_grad_()
    b = randn(64).requires_grad_()
    y = layer_norm(x, w, b)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


def test_cpu_outputs_fully_written():
    """Outputs come from fresh allocations (huge-page path for large ones): no NaN left over."""
    for M, N in ((2049, 4096), (3, 5)):  # > 32 MiB outputs (huge-page allocation) and tiny ones
        x, w, dy = randn(M, N), randn(N), randn(M, N)
        y, mean, rstd = ln_ops.layer_norm_fwd(x, w, None, 1e-5)
        dx, dw, db = ln_ops.layer_norm_bwd(dy, x, w, mean, rstd, False)
        ys, out, _, _ = ln_ops.add_layer_norm_fwd(x, dy, None, w, None, 1e-5)
        for t in (y, mean, rstd, dx, dw, ys, out):
            assert torch.isfinite(t).all()
        assert db.shape == (0,)
        torch.testing.assert_close(ys, x + dy)


@pytest.mark.parametrize("dtype,M,N", [(torch.float32, 1100, 4100), (torch.bfloat16, 2100, 4104)])
def test_cpu_streamed_outputs_match_cached_stores(dtype, M, N):
    """Outputs of 16 MiB and more are written with streaming stores (rows that start 32-byte
    aligned: every other row at N=4100 fp32; N=4104 bf16 rows are 8208 bytes, so one row in
    two is aligned). Every row equals the same row computed in a small call (ordinary stores),
    bit for bit, for the forward, the backward's dx and both add + LN outputs."""
    x, a, dy = randn(M, N, dtype=dtype), randn(M, N, dtype=dtype), randn(M, N, dtype=dtype)
    w, b = randn(N, dtype=dtype), randn(N, dtype=dtype)
    assert M * N * x.element_size() >= 16 << 20
    y, mean, rstd = ln_ops.layer_norm_fwd(x, w, b, 1e-5)
    dx, _, _ = ln_ops.layer_norm_bwd(dy, x, w, mean, rstd, True)
    ys, out, _, _ = ln_ops.add_layer_norm_fwd(x, a, None, w, b, 1e-5)
    for r0 in (0, 1, M - 3):
        rows = slice(r0, r0 + 3)
        y_s, mean_s, rstd_s = ln_ops.layer_norm_fwd(x[rows], w, b, 1e-5)
        assert torch.equal(y[rows], y_s) and torch.equal(mean[rows], mean_s)
        dx_s, _, _ = ln_ops.layer_norm_bwd(dy[rows], x[rows], w, mean_s, rstd_s, True)
        assert torch.equal(dx[rows], dx_s)
        ys_s, out_s, _, _ = ln_ops.add_layer_norm_fwd(x[rows], a[rows], None, w, b, 1e-5)
        assert torch.equal(ys[rows], ys_s) and torch.equal(out[rows], out_s)


def test_cpu_non_contiguous_and_3d():
    base = randn(4, 9, 2 * 48)
    x = base[..., ::2]  # last-dim stride 2
    w, b = randn(48), randn(48)
    assert torch.equal(layer_norm(x, w, b), layer_norm(x.contiguous(), w, b))
    xt = randn(48, 6).t()  # [6, 48] with strides (1, 6)
    assert torch.equal(layer_norm(xt, w), layer_norm(xt.contiguous(), w))
    assert layer_norm(base, randn(96)).shape == base.shape


def test_cpu_zero_rows():
    x = randn(0, 8)
    assert layer_norm(x, randn(8)).shape == (0, 8)


def test_cpu_stats():
    x = randn(7, 300, scale=3.0)
    _, mean, rstd = ln_ops.layer_norm_fwd(x, randn(300), None, 1e-5)
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd.double(), (xd.var(-1, unbiased=False) + 1e-5).rsqrt(),
                               atol=1e-5, rtol=1e-5)
    assert mean.dtype == rstd.dtype == torch.float32


@pytest.mark.filterwarnings("ignore:Input #\\d requires gradient:UserWarning")
def test_gradcheck_fp32():
    x = randn(3, 10, dtype=torch.float32, scale=2.0).requires_grad_()
    w = randn(10).requires_grad_()
    b = randn(10).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: layer_norm(x, w, b), (x, w, b), eps=1e-2,
                                    atol=2e-2, rtol=2e-2, fast_mode=True)


# ------------------------------------------------------------------ fused add + LayerNorm

def ref_add_ln(x, a, m, w, b):
    y = x + a if m is None else x + a + m
    return y, ref_ln(y, w, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_m,has_bias", [(True, False), (False, True)])
def test_add_layer_norm(dtype, has_m, has_bias):
    M, N = 19, 333
    x, a = randn(2, M, N, dtype=dtype), randn(2, M, N, dtype=dtype)
    m = randn(2, M, N, dtype=dtype) if has_m else None
    w = randn(N, dtype=dtype)
    b = randn(N, dtype=dtype) if has_bias else None
    d_sum, d_out = randn(2, M, N, dtype=dtype), randn(2, M, N, dtype=dtype)

    def run(fn, tensors, cast=None):
        leaves = [None if t is None else (t if cast is None else t.to(cast)).detach().clone()
                  .requires_grad_() for t in tensors]
        y_sum, out = fn(*leaves)
        torch.autograd.backward((y_sum, out), (d_sum.to(y_sum.dtype), d_out.to(out.dtype)))
        return (y_sum.detach(), out.detach()), [None if t is None else t.grad for t in leaves]

    inputs = (x, a, m, w, b)
    (ys, out), g = run(lambda x, a, m, w, b: add_layer_norm(x, a, m, weight=w, bias=b), inputs)
    (ys64, out64), g64 = run(ref_add_ln, inputs, torch.float64)
    (yse, oute), ge = run(ref_add_ln, inputs)
    assert_close_by_rule(ys, ys64, yse, name="y_sum")
    assert_close_by_rule(out, out64, oute, name="out")
    for name, a_, r, e in zip(("dx", "da", "dm", "dweight", "dbias"), g, g64, ge):
        if r is not None:
            assert_close_by_rule(a_, r, e, name=name)
    assert torch.equal(g[0], g[1])


def test_add_layer_norm_normalises_the_stored_sum():
    """fp16 / bf16: out is the LayerNorm of y_sum as returned (the sum rounded once), which
    is what the backward gets; at N = 1 (rstd = 1 / sqrt(eps)) a mismatch there gave large
    wrong gradients where the true ones are 0."""
    for dtype in (torch.bfloat16, torch.float16):
        x, a = randn(64, 300, dtype=dtype), randn(64, 300, dtype=dtype)
        w = randn(300, dtype=dtype)
        ys, out = add_layer_norm(x, a, weight=w)
        torch.testing.assert_close(ys, (x.float() + a.float()).to(dtype), rtol=0, atol=0)
        ref = torch.nn.functional.layer_norm(ys.float(), (300,), w.float()).to(dtype)
        torch.testing.assert_close(out, ref, rtol=2 ** -7, atol=1e-2)
        x, a = randn(4, 1, dtype=dtype).requires_grad_(), randn(4, 1, dtype=dtype).requires_grad_()
        w = torch.ones(1, dtype=dtype, requires_grad=True)
        _, out = add_layer_norm(x, a, weight=w)
        out.sum().backward()
        assert torch.equal(out, torch.zeros_like(out))
        for t in (x.grad, a.grad, w.grad):
            assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("shape", [(3, 16), (2, 3, 16)])
@pytest.mark.parametrize("compiled", [False, True])
def test_add_layer_norm_leaf_gradients_are_separate_tensors(shape, compiled):
    """x, a and m receive the same gradient: as leaves they must still get separate .grad
    tensors, or the next backward accumulates into all of them at once."""
    w = randn(16)

    def f(x, a, m):
        return add_layer_norm(x, a, m, weight=w)[0]

    fn = torch.compile(f, fullgraph=True, backend="aot_eager") if compiled else f
    leaves = [randn(*shape).requires_grad_() for _ in range(3)]
    for _ in range(2):
        fn(*leaves).sum().backward()
    ptrs = {t.grad.data_ptr() for t in leaves}
    assert len(ptrs) == 3
    for t in leaves:
        assert torch.equal(t.grad, torch.full(shape, 2.0))


def test_add_layer_norm_leaf_gradients_separate_when_the_reshape_copies():
    """Leaves whose layout reshape(-1, N) cannot view (it copies): the gradient reaches each
    leaf through the copy's backward as a view of one tensor, which was shared."""
    w = randn(16)
    leaves = [randn(2, 4, 16)[:, :3].detach().requires_grad_() for _ in range(3)]
    for _ in range(2):
        add_layer_norm(*leaves, weight=w)[0].sum().backward()
    assert len({t.grad.untyped_storage().data_ptr() for t in leaves}) == 3
    for t in leaves:
        assert torch.equal(t.grad, torch.full((2, 3, 16), 2.0))


@pytest.mark.parametrize("route", ["add", "expand_as", "sub_zero"])
def test_add_layer_norm_gradients_separate_through_pass_through_nodes(route):
    """x and a reaching leaves through nodes that hand a gradient on unchanged (p1 + p2,
    expand_as, x - 0): two leaves' .grad were views of one buffer, so a second backward
    (1.45 off) or clip_grad_norm_ wrote into both."""
    torch.manual_seed(0)
    w = randn(8)
    ps = [randn(2, 3, 8).requires_grad_() for _ in range(4)]

    def inputs(p1, p2, q1, q2):
        if route == "add":
            return p1 + p2, q1 + q2
        if route == "expand_as":
            return p2.expand_as(p1), q2.expand_as(q1)
        return p2 - 0, q2 - 0

    G = randn(2, 3, 8)
    ref = [p.detach().clone().requires_grad_() for p in ps]
    for _ in range(2):
        add_layer_norm(*inputs(*ps), weight=w)[1].mul(G).sum().backward()
        x, a = inputs(*ref)
        s = x + a
        torch.nn.functional.layer_norm(s, (8,), w).mul(G).sum().backward()
    used = [i for i in range(4) if ps[i].grad is not None]
    assert len({ps[i].grad.untyped_storage().data_ptr() for i in used}) == len(used)
    for i in used:
        torch.testing.assert_close(ps[i].grad, ref[i].grad, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ determinism

def test_backward_bitwise_deterministic_across_threads():
    M, N = 777, 300  # many rows: several chunks of column partials
    x, w, b, dy = randn(M, N), randn(N), randn(N), randn(M, N)
    _, mean, rstd = ln_ops.layer_norm_fwd(x, w, b, 1e-5)
    old = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            runs.append((ln_ops.layer_norm_fwd(x, w, b, 1e-5),
                         ln_ops.layer_norm_bwd(dy, x, w, mean, rstd, True)))
    finally:
        torch.set_num_threads(old)
    for fwd, bwd in runs[1:]:
        assert all(torch.equal(p, q) for p, q in zip(runs[0][0], fwd)), "forward differs"
        assert all(torch.equal(p, q) for p, q in zip(runs[0][1], bwd)), "backward differs"


# ------------------------------------------------------------------ custom ops

def _sample_inputs():
    x, dy = randn(9, 40), randn(9, 40)
    w, b = randn(40), randn(40)
    xh = randn(9, 40, dtype=torch.bfloat16)
    _, mean, rstd = ln_ops.layer_norm_fwd(x, w, b, 1e-5)
    return [
        (ln_ops.layer_norm_fwd, (x.requires_grad_(), w.requires_grad_(), b, 1e-5)),
        (ln_ops.layer_norm_fwd, (randn(9, 40).requires_grad_(), randn(40).requires_grad_(), None, 1e-3)),
        (ln_ops.layer_norm_fwd, (xh, randn(40), None, 1e-5)),  # fp32 weight, bf16 x
        (ln_ops.layer_norm_bwd, (dy, x.detach(), w.detach(), mean, rstd, True)),
        (ln_ops.layer_norm_bwd, (dy, x.detach(), w.detach(), mean, rstd, False)),
        (ln_ops.layer_norm_bwd, (dy, x.detach(), w.detach(), mean, rstd, True, False)),  # frozen
        (ln_ops.add_layer_norm_fwd, (randn(9, 40).requires_grad_(), randn(9, 40).requires_grad_(),
                                     randn(9, 40).requires_grad_(), randn(40).requires_grad_(),
                                     randn(40).requires_grad_(), 1e-5)),
        (ln_ops.add_layer_norm_fwd, (randn(9, 40), randn(9, 40), None, randn(40), None, 1e-5)),
    ]


@pytest.mark.parametrize("i", range(8))
def test_opcheck(i):
    op, args = _sample_inputs()[i]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    mod = LayerNorm(64, bias=True)

    def f(x, a, m):
        y_sum, out = add_layer_norm(x, a, m, weight=mod.weight, bias=mod.bias)
        return y_sum + mod(out)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, a, m = (randn(4, 64).requires_grad_() for _ in range(3))
    out = compiled(x, a, m)
    out.sum().backward()
    x2, a2, m2 = (t.detach().clone().requires_grad_() for t in (x, a, m))
    ref = f(x2, a2, m2)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)


def test_torch_compile_dynamic_shapes():
    """``dynamic=True``: the argument checks trace (no math.isfinite on a traced float)."""
    mod = LayerNorm(32)

    def f(x, a):
        y_sum, out = add_layer_norm(x, a, weight=mod.weight)
        return layer_norm(y_sum, mod.weight) + mod(out)

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for M in (4, 7):
        x, a = randn(M, 32), randn(M, 32)
        torch.testing.assert_close(compiled(x, a), f(x, a))


def test_cuda_glue_under_interpreter_or_cuda():
    """The CUDA kernels registered for the custom ops (fusion launchers + glue) on
    TRITON_DEVICE: CUDA when present, else CPU tensors under the Triton interpreter."""
    dev = TRITON_DEVICE
    M, N = 5, 33
    x, w, b, dy = (randn(M, N, device=dev), randn(N, device=dev), randn(N, device=dev),
                   randn(M, N, device=dev))
    y, mean, rstd = ln_ops._layer_norm_fwd_cuda(x, w, b, 1e-5)
    y_c, mean_c, rstd_c = ln_ops.layer_norm_fwd(x.cpu(), w.cpu(), b.cpu(), 1e-5)
    torch.testing.assert_close(y.cpu(), y_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd.cpu(), rstd_c, atol=1e-5, rtol=1e-5)
    for has_bias in (True, False):
        dx, dw, db = ln_ops._layer_norm_bwd_cuda(dy, x, w, mean, rstd, has_bias)
        dx_c, dw_c, db_c = ln_ops.layer_norm_bwd(dy.cpu(), x.cpu(), w.cpu(), mean_c, rstd_c, has_bias)
        torch.testing.assert_close(dx.cpu(), dx_c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dw.cpu(), dw_c, atol=1e-4, rtol=1e-5)
        assert db.shape == db_c.shape == ((N,) if has_bias else (0,))
        torch.testing.assert_close(db.cpu(), db_c, atol=1e-4, rtol=1e-5)
    # rows sliced from a wider buffer are read in place (the kernels take a row stride)
    wide = randn(M, N + 7, device=dev)
    xs, dys = wide[:, 3:3 + N], randn(M, N + 7, device=dev)[:, :N]
    ys_, mean_s, rstd_s = ln_ops._layer_norm_fwd_cuda(xs, w, b, 1e-5)
    torch.testing.assert_close(ys_.cpu(), ln_ops.layer_norm_fwd(xs.cpu().contiguous(), w.cpu(), b.cpu(),
                                                                1e-5)[0], atol=1e-5, rtol=1e-5)
    dxs, dws, _ = ln_ops._layer_norm_bwd_cuda(dys, xs, w, mean_s, rstd_s, True)
    dxs_c, dws_c, _ = ln_ops.layer_norm_bwd(dys.cpu().contiguous(), xs.cpu().contiguous(), w.cpu(),
                                            mean_s.cpu(), rstd_s.cpu(), True)
    torch.testing.assert_close(dxs.cpu(), dxs_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dws.cpu(), dws_c, atol=1e-4, rtol=1e-5)
    a, m = randn(M, N, device=dev), randn(M, N, device=dev)
    ys, out, _, _ = ln_ops._add_layer_norm_fwd_cuda(x, a, m, w, None, 1e-5)
    ys_c, out_c, _, _ = ln_ops.add_layer_norm_fwd(x.cpu(), a.cpu(), m.cpu(), w.cpu(), None, 1e-5)
    torch.testing.assert_close(ys.cpu(), ys_c)
    torch.testing.assert_close(out.cpu(), out_c, atol=1e-5, rtol=1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N", [(17, 1000), (4, 18432), (2, 40000)])
def test_cuda_matches_reference(M, N, dtype):
    check_ln_fwd_bwd(M, N, dtype, has_bias=True, device="cuda")
    check_ln_fwd_bwd(M, N, dtype, has_bias=False, device="cuda")


@requires_cuda
def test_cuda_opcheck_and_add():
    x, a, w = randn(9, 40, device="cuda"), randn(9, 40, device="cuda"), randn(40, device="cuda")
    torch.library.opcheck(ln_ops.layer_norm_fwd, (x.requires_grad_(), w.requires_grad_(), None, 1e-5))
    torch.library.opcheck(ln_ops.add_layer_norm_fwd, (x, a, None, w, None, 1e-5))
    ys, out = add_layer_norm(x, a, weight=w)
    torch.testing.assert_close(out, ref_ln(x + a, w, None), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ modules

@pytest.mark.parametrize("bias", [False, True])
def test_module_matches_reference_and_state_dict(bias):
    ref = reference.LayerNorm(48, bias=bias)
    with torch.no_grad():
        ref.weight.normal_()
        if bias:
            ref.bias.normal_()
    fast = LayerNorm(48, bias=bias)
    assert fast.state_dict().keys() == ref.state_dict().keys()
    fast.load_state_dict(ref.state_dict())
    ref.load_state_dict(fast.state_dict())
    x = randn(2, 5, 48)
    torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)
    xb = x.bfloat16()  # fp32 parameters with bf16 activations, as the reference allows
    torch.testing.assert_close(fast(xb).float(), ref(xb).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("bias", [False, True])
def test_module_drop_in_for_torch_layer_norm(bias):
    tln = torch.nn.LayerNorm((48,), eps=1e-6, bias=bias)
    with torch.no_grad():
        tln.weight.normal_()
        if bias:
            tln.bias.normal_()
    fast = LayerNorm.from_torch(tln)
    assert fast.weight is tln.weight and fast.bias is tln.bias and fast.eps == 1e-6
    x = randn(3, 48)
    torch.testing.assert_close(fast(x), tln(x), atol=1e-5, rtol=1e-5)
    fast(x).sum().backward()
    assert tln.weight.grad is not None  # shared Parameter
    # built with torch.nn.LayerNorm's arguments and loaded from its state_dict
    fresh = LayerNorm((48,), eps=1e-6, bias=bias)
    assert fresh.state_dict().keys() == tln.state_dict().keys()
    fresh.load_state_dict(tln.state_dict())
    tln.load_state_dict(fresh.state_dict())
    torch.testing.assert_close(fresh(x), tln(x), atol=1e-5, rtol=1e-5)


def test_module_constructor_checks():
    with pytest.raises(ValueError, match="eps"):
        LayerNorm(8, eps=-1.0)
    with pytest.raises(TypeError, match="dtype"):
        LayerNorm(8, dtype=torch.float64)
    with pytest.raises(ValueError, match="elementwise_affine"):
        LayerNorm(8, elementwise_affine=False)
    with pytest.raises(TypeError, match="bias"):
        LayerNorm(8, 1e-5, "yes")
    assert LayerNorm((8,), eps=1e-6, elementwise_affine=True, bias=True).bias.shape == (8,)


def test_module_from_torch_rejects_unsupported():
    with pytest.raises(ValueError, match="elementwise_affine"):
        LayerNorm.from_torch(torch.nn.LayerNorm(8, elementwise_affine=False))
    with pytest.raises(ValueError, match="dim"):
        LayerNorm.from_torch(torch.nn.LayerNorm((4, 8)))
    with pytest.raises(TypeError, match="ln"):
        LayerNorm.from_torch(reference.LayerNorm(8))


# ------------------------------------------------------------------ bad input

def test_bad_inputs():
    x, w = randn(4, 8), randn(8)
    with pytest.raises(TypeError, match="x"):
        layer_norm(x.double(), w)
    with pytest.raises(TypeError, match="x"):
        layer_norm([1.0], w)
    with pytest.raises(ValueError, match="x"):
        layer_norm(randn(4, 0), randn(0))
    with pytest.raises(ValueError, match="weight"):
        layer_norm(x, randn(9))
    with pytest.raises(ValueError, match="weight"):
        layer_norm(x, randn(2, 4))
    with pytest.raises(TypeError, match="weight"):
        layer_norm(x.half(), w.bfloat16())
    with pytest.raises(TypeError, match="weight"):
        layer_norm(x, w.half())  # fp16 weight with fp32 x: only x's dtype or fp32
    with pytest.raises(TypeError, match="bias"):
        layer_norm(x, w, randn(8).half())
    with pytest.raises(ValueError, match="bias"):
        layer_norm(x, w, randn(7))
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, w, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, w, eps=float("nan"))
    with pytest.raises(TypeError, match="eps"):
        layer_norm(x, w, eps=torch.tensor(1e-5))
    with pytest.raises(TypeError, match="eps"):
        layer_norm(x, w, eps=True)
    torch.testing.assert_close(layer_norm(x, w, eps=np.float32(1e-3)), layer_norm(x, w, eps=1e-3),
                               rtol=1e-6, atol=1e-6)  # a numpy scalar is a float
    with pytest.raises(TypeError, match=r"weight: expected dtype torch.float32 \(same as x\), got"):
        layer_norm(x, w.bfloat16())
    with pytest.raises(TypeError, match="a"):
        add_layer_norm(x, x.half(), weight=w)
    with pytest.raises(ValueError, match="m"):
        add_layer_norm(x, x, randn(4, 9), weight=w)
    with pytest.raises(ValueError, match="a"):
        add_layer_norm(x, randn(8), weight=w)
    if HAS_CUDA:
        with pytest.raises(ValueError, match="weight"):
            layer_norm(x, w.cuda())


@pytest.mark.parametrize("fn", ["layer_norm", "add_layer_norm"])
def test_no_grad_call_skips_autograd_with_the_same_bits(fn, monkeypatch):
    """Without anything to differentiate, the public functions call the device
    implementation directly (no autograd.Function); the outputs are the autograd path's
    bits, and the output carries no graph."""
    from palm_fast import ops

    x, a, w = randn(6, 40), randn(6, 40), randn(40)
    if fn == "layer_norm":
        def run(x, w):
            return ops.layer_norm(x, w, None, 1e-5)
    else:
        def run(x, w):
            return ops.add_layer_norm(x, a, weight=w)[1]
    calls = []
    eager = ln_ops._LayerNormEager if fn == "layer_norm" else ln_ops._AddLayerNormEager
    orig = eager.apply
    monkeypatch.setattr(eager, "apply", lambda *args: calls.append(1) or orig(*args))
    fast = run(x, w)
    assert not calls and fast.grad_fn is None
    with torch.no_grad():
        assert torch.equal(run(x.requires_grad_(), w), fast) and not calls
    graded = run(x.requires_grad_(), w)
    assert calls and graded.grad_fn is not None
    assert torch.equal(graded.detach(), fast)


@pytest.fixture(params=["cpp", "triton"])
def ln_backend(request, monkeypatch):
    """``(backend, device)`` the LayerNorm ops run on: the C++ kernels (CPU), or the generated
    Triton kernels (CUDA; without a GPU, the CUDA glue on CPU tensors under the interpreter)."""
    if request.param == "cpp":
        return "cpp", "cpu"
    if TRITON_DEVICE == "cpu":
        monkeypatch.setitem(ln_ops._LN_FWD_IMPLS, "cpu", ln_ops._layer_norm_fwd_cuda)
        monkeypatch.setitem(ln_ops._ADD_LN_FWD_IMPLS, "cpu", ln_ops._add_layer_norm_fwd_cuda)
        monkeypatch.setitem(ln_ops._LN_BWD_IMPLS, "cpu", ln_ops._layer_norm_bwd_cuda)
    return "triton", TRITON_DEVICE


@pytest.fixture
def ln_device(ln_backend):
    return ln_backend[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_constant_rows_normalise_to_zero(dtype, ln_device):
    """Rows of equal values have variance 0: LayerNorm gives exactly 0 (plus the bias), as
    torch does. The mean as a rounded sum times a rounded 1/N left x - mean != 0, which
    rstd = eps^-1/2 amplified (|y| up to 0.3 for a row of 10000.0)."""
    rows = []
    for n in (1, 7, 15, 17, 64, 1000):
        for c in (7.0, 0.1, 10000.0, -3.3, 1e6):
            rows.append((n, c))
    for n, c in rows:
        x = torch.full((3, n), c, dtype=dtype, device=ln_device)
        w = torch.rand(n, dtype=torch.float32).to(ln_device) + 0.5
        assert torch.equal(layer_norm(x, w), torch.zeros_like(x)), (n, c)
        b = torch.randn(n).to(ln_device)
        assert torch.equal(layer_norm(x, w, b).float(), b.to(dtype).float().expand(3, n)), (n, c)
        y_sum, out = add_layer_norm(x, torch.zeros_like(x), weight=w)
        assert torch.equal(out, torch.zeros_like(x)), (n, c)


@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_one_wide_rows_have_zero_dx(eps, ln_device):
    """A row of one feature normalises to 0 whatever x: dx is exactly 0, as torch gives. The
    backward's dy * w was rounded in its first pass (the mean of g) and contracted into an
    FMA, unrounded, in the second (GCC's -ffp-contract=fast; Triton's default FP fusion in
    the generated GPU kernels): the difference times rstd = eps^-1/2 left dx up to 2e-5
    (eps 1e-5) and 0.04-0.11 (eps 1e-12). (Under the interpreter the Triton case cannot show
    the contraction: tests/test_lowering.py checks the compiled kernels have no FMA.)"""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(64, 1, generator=g).to(dtype).to(ln_device).requires_grad_()
        dy = torch.randn(64, 1, generator=g).to(dtype).to(ln_device)
        w = torch.tensor([1.1], device=ln_device)
        layer_norm(x, w, eps=eps).backward(dy)
        assert torch.equal(x.grad, torch.zeros_like(x)), (dtype, x.grad.abs().max())
        want = torch.nn.functional.layer_norm(x.detach().float().requires_grad_(), (1,), w, eps=eps)
        assert torch.equal(want, torch.zeros_like(want))


def test_overflowing_variance_gives_nan_not_garbage(ln_device):
    """Deviations whose squares overflow fp32 (inf - inf in the corrected variance: NaN). The
    C++ kernel clamped the variance with std::max(0.f, var), which turns NaN into 0: rstd =
    eps^-1/2 and |y| ~ 1e33, finite garbage. torch and the generated kernels give NaN."""
    x = torch.tensor([[3e30, -1e30, 1e30, 2e30, -2.5e30, 7e29, 1.1e30, -3e30],
                      [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]], device=ln_device)
    w = torch.ones(8, device=ln_device)
    want = torch.nn.functional.layer_norm(x.cpu(), (8,), w.cpu())
    assert want[0].isnan().all()
    for y in (layer_norm(x, w), add_layer_norm(x, torch.zeros_like(x), weight=w)[1]):
        y = y.cpu()
        assert y[0].isnan().all(), y[0]
        torch.testing.assert_close(y[1], want[1], atol=1e-5, rtol=1e-5)


def test_large_offset_rows_accuracy_cpu():
    """Rows far from zero (offset 1e4, spread 1): error vs float64 within a few times
    torch's own fp32 error (it was 10-400x)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 777, generator=g) + 1e4
    w = torch.ones(777)
    want = torch.nn.functional.layer_norm(x.double(), (777,))
    ours = (layer_norm(x, w).double() - want).abs().max()
    theirs = (torch.nn.functional.layer_norm(x, (777,)).double() - want).abs().max()
    assert ours <= 4 * theirs + 1e-6


@pytest.mark.parametrize("frozen", ["weight", "bias", "both"])
@pytest.mark.parametrize("fused_add", [False, True])
def test_frozen_affine_skips_the_column_reductions(ln_backend, frozen, fused_add, monkeypatch):
    """A frozen weight and bias (LoRA / adapter training, a frozen LayerNorm): the backward
    still summed dweight and dbias over all rows. Both frozen: dx only (the C++ kernel without
    its column partials, the generated dx-only kernel); dx is unchanged and the frozen
    parameters get no gradient. One of them trainable: computed as before."""
    backend, dev = ln_backend
    flags = []
    real = ln_ops._LN_BWD_IMPLS[dev]
    monkeypatch.setitem(ln_ops._LN_BWD_IMPLS, dev, lambda *a: flags.append(a[6]) or real(*a))
    M, N = 37, 96
    x, a, w, b, dy = (randn(*s).to(dev) for s in ((M, N), (M, N), (N,), (N,), (M, N)))

    def run(w_grad, b_grad):
        xl = x.clone().requires_grad_()
        wl, bl = w.clone().requires_grad_(w_grad), b.clone().requires_grad_(b_grad)
        y = add_layer_norm(xl, a, weight=wl, bias=bl)[1] if fused_add else layer_norm(xl, wl, bl)
        y.backward(dy)
        return xl.grad, wl.grad, bl.grad

    dx, dw, db = run(True, True)
    fdx, fdw, fdb = run(frozen == "bias", frozen == "weight")
    assert flags == [True, frozen != "both"]
    if backend == "cpp":
        assert torch.equal(fdx, dx)
    else:   # (another generated kernel: the same math, its own tiling)
        torch.testing.assert_close(fdx, dx, atol=1e-6, rtol=1e-6)
    assert (fdw is None) == (frozen != "bias") and (fdb is None) == (frozen != "weight")
    if fdw is not None:
        assert torch.equal(fdw, dw)
    if fdb is not None:
        assert torch.equal(fdb, db)


@pytest.mark.parametrize("used", ["out", "sum", "both"])
def test_backward_materialises_no_zero_gradients(used):
    """mean / rstd (and an unused y_sum of add + LN) get no gradient: autograd materialised a
    zero tensor for each per backward ([M] twice, and [M, N] plus an add for y_sum when
    only out was used). The gradients stay those of the reference, whichever outputs are
    used."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default):
                self.shapes.append(tuple(out.shape))
            return out

    M, N = 6, 32
    x, a, w, dy = randn(M, N), randn(M, N), randn(N), randn(M, N)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = layer_norm(xl, wl)
    with Log() as log:
        torch.autograd.grad(y, (xl, wl), dy)
    assert not [s for s in log.shapes if s in ((M,), (M, N))], log.shapes

    xl, al, wl = x.clone().requires_grad_(), a.clone().requires_grad_(), w.clone().requires_grad_()
    y_sum, out = add_layer_norm(xl, al, weight=wl)
    loss = {"out": (out * dy).sum(), "sum": (y_sum * dy).sum(),
            "both": (out * dy).sum() + (y_sum * dy).sum()}[used]
    with Log() as log:
        got = torch.autograd.grad(loss, (xl, al, wl), allow_unused=True)
    assert not [s for s in log.shapes if s in ((M,), (M, N))], log.shapes
    xr, ar, wr = (t.double().requires_grad_() for t in (x, a, w))
    sr = xr + ar
    outr = torch.nn.functional.layer_norm(sr, (N,), wr)
    lr = {"out": (outr * dy.double()).sum(), "sum": (sr * dy.double()).sum(),
          "both": (outr * dy.double()).sum() + (sr * dy.double()).sum()}[used]
    want = torch.autograd.grad(lr, (xr, ar, wr), allow_unused=True)
    for g, r in zip(got, want):
        if r is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5)
