"""SwiGLU everywhere it lives: C++ kernels, Triton launchers, custom ops, modules."""
from __future__ import annotations

import pytest
import torch
from conftest import (
    DTYPES,
    HAS_CUDA,
    TRITON_DEVICE,
    assert_close_by_rule,
    poison_like,
    randn,
    requires_cuda,
)

import palm_fast.ops as ops
from palm_fast._ext import cpp
from palm_fast.kernels import swiglu as tk
from palm_fast.nn import SwiGLU, SwiGLUMLP
from palm_fast.reference import functional

DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def reference(x: torch.Tensor, grad: torch.Tensor | None = None):
    """(out, grad_x) of the reference autograd in x's dtype."""
    xr = x.detach().clone().requires_grad_(grad is not None)
    out = functional.swiglu(xr)
    if grad is None:
        return out.detach(), None
    (gx,) = torch.autograd.grad(out, xr, grad)
    return out.detach(), gx


def check_fwd_bwd(fwd, bwd, x: torch.Tensor, grad: torch.Tensor) -> None:
    out = fwd(x)
    gx = bwd(grad, x)
    ref_out, ref_gx = reference(x.double(), grad.double())
    eager_out, eager_gx = reference(x, grad)
    assert out.is_contiguous() and gx.is_contiguous()
    assert_close_by_rule(out.cpu(), ref_out.cpu(), eager_out.cpu(), name="out")
    assert_close_by_rule(gx.cpu(), ref_gx.cpu(), eager_gx.cpu(), name="grad_x")


# (leading shape, F): 1-D/2-D/3-D leading dims, batch 1, F = 1, odd F, F not a
# multiple of any vector width or block, large F.
CPP_SHAPES = [((), 1), ((1,), 11), ((17,), 64), ((1000,), 1000), ((2, 3, 5), 4100),
              ((1, 7), 4096), ((3,), 16384),
              ((2048,), 1024)]  # outputs >= 8 MiB: the huge-page-advised allocation
# The interpreter runs each program in Python: few rows, but all tile regimes
# (BLOCK_F = 1 / 16 / 1024 / 4096 with several column blocks / row masking).
TRITON_SHAPES = [((), 1), ((1,), 11), ((17,), 64), ((3,), 1000), ((2, 3), 1), ((1, 2), 4100)]
CUDA_SHAPES = CPP_SHAPES + [((2048,), 11008)]


def _shape_id(s):
    return f"{'x'.join(map(str, s[0])) or 'vec'}-F{s[1]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("shape", CPP_SHAPES, ids=_shape_id)
def test_cpp_parity(shape, dtype):
    lead, F = shape
    x = randn(*lead, 2 * F, dtype=dtype)
    grad = randn(*lead, F, dtype=dtype)
    check_fwd_bwd(cpp().swiglu_fwd, cpp().swiglu_bwd, x, grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("shape", CUDA_SHAPES + TRITON_SHAPES if HAS_CUDA else TRITON_SHAPES, ids=_shape_id)
def test_triton_parity(shape, dtype):
    lead, F = shape
    x = randn(*lead, 2 * F, dtype=dtype, device=TRITON_DEVICE)
    grad = randn(*lead, F, dtype=dtype, device=TRITON_DEVICE)
    check_fwd_bwd(tk.swiglu_fwd, tk.swiglu_bwd, x, grad)


def test_tile_config_regimes():
    """The fixed tiling heuristic: every regime the parity tests exercise."""
    assert tk.tile_config(1, 1) == (1, 1, 4)
    assert tk.tile_config(1000, 1) == (1024, 1, 4)       # tall, thin: many rows per program
    assert tk.tile_config(3, 1000) == (4, 1024, 8)       # one masked column block
    assert tk.tile_config(2, 4100) == (1, 4096, 8)       # 2 column blocks, last one partial
    assert tk.tile_config(16384, 8192) == (1, 4096, 8)   # the H100 benchmark shape (tuned there)
    for rows, F in [(1, 11), (17, 64), (6, 1), (7, 16384)]:
        br, bf, _ = tk.tile_config(rows, F)
        assert bf >= 1 and br >= 1 and br * bf <= 4096


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=_shape_id)
def test_custom_op_cuda(shape, dtype):
    lead, F = shape
    x = randn(*lead, 2 * F, dtype=dtype, device="cuda").requires_grad_()
    grad = randn(*lead, F, dtype=dtype, device="cuda")
    out = ops.swiglu(x)
    (gx,) = torch.autograd.grad(out, x, grad)
    check_fwd_bwd(lambda _x: out.detach(), lambda _g, _x: gx, x.detach(), grad)


@pytest.mark.parametrize("device", sorted({"cpu", TRITON_DEVICE}))
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_custom_op_autograd(dtype, device):
    """The public op: forward and backward through autograd on both backends."""
    # On CPU tensors the op dispatches to C++; the CUDA case (if any) to Triton.
    x = randn(4, 5, 2 * 96, dtype=dtype, device=device).requires_grad_()
    grad = randn(4, 5, 96, dtype=dtype, device=device)
    out = ops.swiglu(x)
    (gx,) = torch.autograd.grad(out, x, grad)
    check_fwd_bwd(lambda _x: out.detach(), lambda _g, _x: gx, x.detach(), grad)


def _wide_projection(lead, F, dtype, device, extra_left=24, extra_right=40):
    """x = proj[..., a:a + 2F] of a wider fused projection output (q | k | v | ff | ...)."""
    proj = randn(*lead, extra_left + 2 * F + extra_right, dtype=dtype, device=device)
    return proj, proj[..., extra_left:extra_left + 2 * F]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_strided_slice_no_copy(backend, dtype):
    device = "cpu" if backend == "cpp" else TRITON_DEVICE
    fwd, bwd = ((cpp().swiglu_fwd, cpp().swiglu_bwd) if backend == "cpp"
                else (tk.swiglu_fwd, tk.swiglu_bwd))
    F = 37
    proj, x = _wide_projection((2, 3), F, dtype, device)
    assert not x.is_contiguous()
    # The row view the kernels use aliases the projection: no copy.
    rows = tk.as_rows(x)
    assert rows.data_ptr() == x.data_ptr() and rows.stride() == (proj.shape[-1], 1)
    # grad_out may be row-strided too (a slice of a wider buffer).
    gbuf = randn(2, 3, F + 5, dtype=dtype, device=device)
    grad = gbuf[..., 5:]
    before = proj.clone()
    check_fwd_bwd(fwd, bwd, x, grad)
    assert torch.equal(proj, before)  # input untouched


def _aten_ops_called(fn, *args):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(*args)
    return {e.name for e in prof.events()}


def test_cpp_no_copy_on_fast_path():
    """C++: a row-strided slice is read in place; a non-mergeable layout is copied."""
    copies = {"aten::clone", "aten::copy_", "aten::contiguous"}
    _, x = _wide_projection((4, 8), 64, torch.float32, "cpu")
    grad = randn(4, 8, 64)
    assert not (_aten_ops_called(cpp().swiglu_fwd, x) & copies)
    assert not (_aten_ops_called(cpp().swiglu_bwd, grad, x) & copies)
    # Leading dims that cannot merge into one stride (transposed) do get copied.
    xt = x.transpose(0, 1)
    assert _aten_ops_called(cpp().swiglu_fwd, xt) & copies
    ref_out, _ = reference(xt.double())
    assert_close_by_rule(cpp().swiglu_fwd(xt), ref_out, functional.swiglu(xt))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_non_mergeable_and_non_unit_last_stride(backend):
    device = "cpu" if backend == "cpp" else TRITON_DEVICE
    fwd, bwd = ((cpp().swiglu_fwd, cpp().swiglu_bwd) if backend == "cpp"
                else (tk.swiglu_fwd, tk.swiglu_bwd))
    base = randn(6, 3, 2 * 20, device=device)
    x = base.transpose(0, 1)  # [3, 6, 40]: leading dims do not merge
    grad = randn(6, 3, 20, device=device).transpose(0, 1)
    check_fwd_bwd(fwd, bwd, x, grad)
    x2 = randn(2 * 20, 5, device=device).t()  # last dim stride 5
    check_fwd_bwd(fwd, bwd, x2, randn(5, 20, device=device))
    # grad_out with stride 0 everywhere (the gradient of .sum()).
    g0 = torch.ones((), device=device).expand(3, 6, 20)
    check_fwd_bwd(fwd, bwd, x, g0)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_outputs_fully_written(backend, monkeypatch):
    """Poison the buffers the kernels allocate: every element must be overwritten."""
    device = "cpu" if backend == "cpp" else TRITON_DEVICE
    fwd, bwd = ((cpp().swiglu_fwd, cpp().swiglu_bwd) if backend == "cpp"
                else (tk.swiglu_fwd, tk.swiglu_bwd))
    if backend == "triton":
        real_empty = torch.empty
        monkeypatch.setattr(tk.torch, "empty", lambda *a, **k: poison_like(real_empty(*a, **k)))
    else:
        # The C++ allocator cannot be poisoned from Python: poison the heap
        # instead by freeing a NaN buffer of the same size right before.
        poison_like(torch.empty(17, 2 * 1000))
    x = randn(17, 2 * 1000, device=device)
    grad = randn(17, 1000, device=device)
    out, gx = fwd(x), bwd(grad, x)
    assert torch.isfinite(out).all() and torch.isfinite(gx).all()
    check_fwd_bwd(fwd, bwd, x, grad)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_IDS.get)
def test_deterministic(backend, dtype):
    device = "cpu" if backend == "cpp" else TRITON_DEVICE
    fwd, bwd = ((cpp().swiglu_fwd, cpp().swiglu_bwd) if backend == "cpp"
                else (tk.swiglu_fwd, tk.swiglu_bwd))
    rows = 300 if backend == "cpp" else 5
    x = randn(rows, 2 * 1000, dtype=dtype, device=device)
    grad = randn(rows, 1000, dtype=dtype, device=device)
    assert torch.equal(fwd(x), fwd(x))
    assert torch.equal(bwd(grad, x), bwd(grad, x))


def test_cpp_extreme_gates():
    """Saturated sigmoid (|gate| large) and exact zeros stay finite and exact-ish."""
    F = 40
    value = randn(3, F)
    gate = torch.tensor([-1e4, -200.0, -90.0, -30.0, 0.0, 30.0, 90.0, 200.0, 1e4, 0.5] * 4).expand(3, F)
    x = torch.cat([value, gate], dim=-1)
    grad = randn(3, F)
    out, gx = cpp().swiglu_fwd(x), cpp().swiglu_bwd(grad, x)
    assert torch.isfinite(out).all() and torch.isfinite(gx).all()
    check_fwd_bwd(cpp().swiglu_fwd, cpp().swiglu_bwd, x, grad)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_gate_gradient_accurate_for_large_positive_gates(backend):
    """d_gate = g v s (1 + gate (1 - s)): with s one rounding below 1, gate * (1 - s) grew
    with the gate (1e-6 relative at gate 20, 6e-4 at 1e4). 1 - s is now exp(-gate) * s."""
    device = "cpu" if backend == "cpp" else TRITON_DEVICE
    bwd = cpp().swiglu_bwd if backend == "cpp" else tk.swiglu_bwd
    gate = torch.tensor([5.0, 12.0, 20.0, 40.0, 90.0, 300.0, 1e4, 3e4])
    F = gate.numel()
    x = torch.cat([torch.ones(1, F), gate[None]], dim=-1).to(device)
    grad = torch.ones(1, F, device=device)
    d_gate = bwd(grad, x)[0, F:].cpu().double()
    g = gate.double()
    s = torch.sigmoid(g)
    want = s * (1 + g * torch.sigmoid(-g))
    assert ((d_gate - want).abs() / want).max() < 1e-6


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_nan_propagates(backend):
    device = "cpu" if backend == "cpp" else TRITON_DEVICE
    fwd, bwd = ((cpp().swiglu_fwd, cpp().swiglu_bwd) if backend == "cpp"
                else (tk.swiglu_fwd, tk.swiglu_bwd))
    F = 20
    x = randn(2, 2 * F, device=device)
    x[0, 3] = float("nan")       # a value
    x[1, F + 5] = float("nan")   # a gate
    grad = randn(2, F, device=device)
    out, gx = fwd(x), bwd(grad, x)
    expect_out = torch.isnan(functional.swiglu(x))
    assert torch.equal(torch.isnan(out), expect_out)
    _, ref_gx = reference(x, grad)
    assert torch.equal(torch.isnan(gx), torch.isnan(ref_gx))


def test_gradcheck_fp64_cpu():
    """torch.autograd.gradcheck of the custom op (C++ supports fp64 for this)."""
    x = randn(3, 2, 2 * 13, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(torch.ops.palm_fast.swiglu, (x,))
    # and against the reference autograd
    grad = randn(3, 2, 13, dtype=torch.float64)
    (gx,) = torch.autograd.grad(torch.ops.palm_fast.swiglu(x), x, grad)
    _, ref_gx = reference(x.detach(), grad)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", sorted({"cpu", "cuda"} if HAS_CUDA else {"cpu"}))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_IDS.get)
def test_opcheck(device, dtype):
    samples = [randn(5, 2 * 24, dtype=dtype, device=device),
               randn(2, 3, 2 * 7, dtype=dtype, device=device),
               _wide_projection((2, 4), 16, dtype, device)[1]]
    for x in samples:
        torch.library.opcheck(torch.ops.palm_fast.swiglu.default, (x.clone().requires_grad_(),))
        torch.library.opcheck(torch.ops.palm_fast.swiglu.default, (x,))
        grad = randn(*x.shape[:-1], x.shape[-1] // 2, dtype=dtype, device=device)
        torch.library.opcheck(torch.ops.palm_fast.swiglu_bwd.default, (grad, x))


def test_fake_strides_match_real():
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, x = _wide_projection((2, 3), 8, torch.float32, "cpu")
    real = torch.ops.palm_fast.swiglu(x)
    real_b = torch.ops.palm_fast.swiglu_bwd(real, x)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fake = torch.ops.palm_fast.swiglu(fx)
        fake_b = torch.ops.palm_fast.swiglu_bwd(fake, fx)
    assert fake.shape == real.shape and fake.stride() == real.stride()
    assert fake_b.shape == real_b.shape and fake_b.stride() == real_b.stride()


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(proj):
        return ops.swiglu(proj[..., 8:8 + 2 * 32]).sum(-1)

    compiled = torch.compile(f, fullgraph=True)
    proj = randn(2, 5, 8 + 2 * 32 + 4).requires_grad_()
    out = compiled(proj)
    out.sum().backward()
    ref = proj.detach().clone().requires_grad_()
    ref_out = functional.swiglu(ref[..., 8:8 + 2 * 32]).sum(-1)
    ref_out.sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj.grad, ref.grad, rtol=1e-5, atol=1e-5)


def test_modules():
    torch.manual_seed(1)
    mlp = SwiGLUMLP(16, 24)
    assert set(mlp.state_dict()) == {"w_in.weight", "w_out.weight"}
    assert mlp.w_in.weight.shape == (48, 16) and mlp.w_out.weight.shape == (16, 24)
    assert mlp.w_in.bias is None and mlp.w_out.bias is None
    x = randn(2, 3, 16).requires_grad_()
    y = mlp(x)
    expect = mlp.w_out(functional.swiglu(mlp.w_in(x)))
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(SwiGLU()(x[..., :16]), functional.swiglu(x[..., :16]))


def test_modules_match_reference_state_dict():
    layers = pytest.importorskip("palm_fast.reference.layers")
    if not hasattr(layers, "SwiGLUMLP") or not hasattr(layers, "SwiGLU"):
        pytest.skip("palm_fast.reference.layers has no SwiGLU / SwiGLUMLP yet")
    ref = layers.SwiGLUMLP(16, 24)
    fast = SwiGLUMLP(16, 24)
    fast.load_state_dict(ref.state_dict())
    x = randn(2, 3, 16)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layers.SwiGLU()(x), SwiGLU()(x))


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        ([1.0, 2.0], TypeError, r"x: expected a torch\.Tensor"),
        (torch.ones(4, 8, dtype=torch.int32), TypeError, r"x: expected dtype .*got torch\.int32"),
        (torch.ones(4, 8, dtype=torch.float64), TypeError, r"x: expected dtype .*got torch\.float64"),
        (torch.tensor(1.0), ValueError, r"x: expected at least 1 dims, got shape \(\)"),
        (torch.ones(4, 7), ValueError, r"x: expected an even, positive last dim.*got shape \(4, 7\)"),
        (torch.ones(4, 0), ValueError, r"x: expected an even, positive last dim.*last dim 0"),
        (torch.ones(4, 8, device="meta"), ValueError, r"x: expected a cpu or cuda tensor, got device meta"),
    ],
    ids=["list", "int", "fp64", "0-dim", "odd", "zero", "meta"],
)
def test_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        ops.swiglu(bad)


def test_empty_rows():
    x = torch.ones(0, 3, 8)
    assert ops.swiglu(x).shape == (0, 3, 4)
    assert cpp().swiglu_bwd(torch.ones(0, 3, 4), x).shape == (0, 3, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extreme_gates_cpu(dtype):
    """Very negative gates: sigmoid must reach 0 (it stopped at 2^-100, so gate * sigmoid
    came out -0.79 at -1e30 and -7.9e7 at -1e38); -inf gives NaN as in torch; forward and
    backward, across vector widths (F = 20: a vector body and a scalar tail)."""
    F = 20
    gates = torch.tensor([-1e30, -1e38, -float("inf"), -100.0, -1e5, -3e29, 1e30, float("inf"),
                          -88.0, -89.0, 0.0, 3.0] * 2, dtype=dtype)[:F]
    x = torch.ones(2, 2 * F, dtype=dtype)
    x[:, F:] = gates
    xr = x.double().requires_grad_()
    want = torch.nn.functional.silu(xr[..., F:]) * xr[..., :F]
    want.sum().backward()
    xg = x.clone().requires_grad_()
    got = ops.swiglu(xg)
    got.sum().backward()
    tol = dict(rtol=1e-5, atol=1e-30) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-30)
    torch.testing.assert_close(got.double(), want.detach().to(dtype).double(), equal_nan=True, **tol)
    torch.testing.assert_close(xg.grad.double(), xr.grad.to(dtype).double(), equal_nan=True, **tol)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_sigmoid_of_very_negative_gates_is_not_cut_off(backend):
    """sigmoid(gate) for gate in [-86, -60] is a normal fp32 number (down to 1e-38): the C++
    kernel returned 0 below -69.3 (a reciprocal cut off at 2^100), so with a large value the
    output was off by the whole product (-27.8 at gate -70, value 1e30). It now forms
    sigmoid(-|g|) as exp(-|g|) / (1 + exp(-|g|)). Forward, d_value and d_gate; F = 20 lanes
    run the vector body and the tail."""
    device = "cpu" if backend == "cpp" else TRITON_DEVICE
    fwd = cpp().swiglu_fwd if backend == "cpp" else tk.swiglu_fwd
    bwd = cpp().swiglu_bwd if backend == "cpp" else tk.swiglu_bwd
    gate = torch.linspace(-86.0, -60.0, 20)
    F = gate.numel()
    value = torch.full((F,), 1e30)
    x = torch.cat([value, gate])[None].to(device)
    grad = torch.ones(1, F, device=device)
    out = fwd(x)[0].cpu().double()
    gx = bwd(grad, x)[0].cpu().double()
    g, v = gate.double(), value.double()
    s = torch.sigmoid(g)
    want = {"out": g * s * v, "d_value": g * s, "d_gate": s * v * (1 + g * torch.sigmoid(-g))}
    for name, got in (("out", out), ("d_value", gx[:F]), ("d_gate", gx[F:])):
        rel = ((got - want[name]).abs() / want[name].abs()).max().item()
        assert rel < 1e-5, (name, rel)
