"""Tests of the fused RoPE op everywhere it lives: the C++ kernel (CPU), the Triton
launcher (interpreter on CPU, CUDA when present), the custom ops, the public functions
and the fast RotaryEmbedding module. The reference is functional.apply_rope in fp64."""
from __future__ import annotations

import importlib

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

from palm_fast._ext import cpp
from palm_fast.nn import RotaryEmbedding
from palm_fast.ops import rope, rope_
from palm_fast.reference.functional import apply_rope, positions_from_offsets, rope_inv_freq


# ----------------------------------------------------------------------------- helpers
def make_inputs(B, T, H, D, dtype, device="cpu", *, Hk=1, rotary_dim=None, pos_kind="offsets",
                big=False, pos_dtype=torch.int64):
    """q, k, inv_freq, pos tensor (offsets [B] or positions [B, T]) and the [B, T] positions."""
    q = randn(B, T, H, D, dtype=dtype, device=device)
    k = randn(B, T, Hk, D, dtype=dtype, device=device)
    inv_freq = rope_inv_freq(rotary_dim or D, device=device)
    hi = 30000 if big else 50
    if pos_kind == "offsets":
        pos = torch.randint(0, hi, (B,), dtype=pos_dtype, device=device)
        positions = positions_from_offsets(pos, T)
    else:
        pos = torch.randint(0, hi + T, (B, T), dtype=pos_dtype, device=device)
        positions = pos
    return q, k, inv_freq, pos, positions


def references(x, positions, inv_freq, interleaved, inverse=False):
    """(fp64 reference, eager reference in x's dtype)."""
    ref64 = apply_rope(x.double().cpu(), positions.cpu(), inv_freq.cpu(), interleaved=interleaved,
                       inverse=inverse)
    eager = apply_rope(x.cpu(), positions.cpu(), inv_freq.cpu(), interleaved=interleaved, inverse=inverse)
    return ref64, eager


def check_parity(qo, ko, q, k, positions, inv_freq, interleaved, inverse=False):
    rq, eq = references(q, positions, inv_freq, interleaved, inverse)
    rk, ek = references(k, positions, inv_freq, interleaved, inverse)
    assert_close_by_rule(qo.cpu(), rq, eq, name="q_out")
    assert_close_by_rule(ko.cpu(), rk, ek, name="k_out")


def run_cpp(q, k, inv_freq, pos, pos_is_offset, interleaved, inverse=False, q_out=None, k_out=None):
    q_out = poison_like(q) if q_out is None else q_out
    k_out = poison_like(k) if k_out is None else k_out
    cpp().rope_cpu(q, k, q_out, k_out, inv_freq, pos, pos_is_offset, interleaved, inverse)
    return q_out, k_out


def run_triton(q, k, inv_freq, pos, pos_is_offset, interleaved, inverse=False, q_out=None, k_out=None):
    from palm_fast.kernels.rope import rope as rope_triton

    q_out = poison_like(q) if q_out is None else q_out
    k_out = poison_like(k) if k_out is None else k_out
    return rope_triton(q, k, inv_freq, pos, pos_is_offset=pos_is_offset, interleaved=interleaved,
                       inverse=inverse, q_out=q_out, k_out=k_out)


def fused_views(B, T, H, D, dtype, device="cpu"):
    """q [B,T,H,D] and k [B,T,1,D] as strided views of a fused projection [B, T, (H+2)*D + 24]."""
    fused = randn(B, T, (H + 2) * D + 24, dtype=dtype, device=device)
    q = fused[..., : H * D].view(B, T, H, D)
    k = fused[..., H * D: (H + 1) * D].view(B, T, 1, D)
    assert not q.is_contiguous() and not k.is_contiguous()
    return fused, q, k


# ----------------------------------------------------------------------------- C++ kernel
CPP_SHAPES = [  # B, T, H, D, rotary_dim
    (1, 1, 1, 64, None),
    (2, 17, 12, 80, None),
    (1, 17, 48, 256, None),
    (2, 17, 5, 96, 32),       # partial rotary, H odd
    (1, 1000, 3, 128, 64),    # long sequence, partial rotary
    (2, 17, 16, 128, 18),     # rotary dim not a multiple of the vector width
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("shape", CPP_SHAPES, ids=str)
def test_cpp_parity(dtype, interleaved, shape):
    B, T, H, D, rdim = shape
    pos_kind = "positions" if T == 17 and H == 12 else "offsets"
    q, k, inv_freq, pos, positions = make_inputs(B, T, H, D, dtype, rotary_dim=rdim, pos_kind=pos_kind,
                                                 pos_dtype=torch.int32 if D == 96 else torch.int64)
    qo, ko = run_cpp(q, k, inv_freq, pos, pos_kind == "offsets", interleaved)
    check_parity(qo, ko, q, k, positions, inv_freq, interleaved)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_cpp_inverse_multi_kv_large_positions(dtype, interleaved):
    q, k, inv_freq, pos, positions = make_inputs(2, 9, 7, 128, dtype, Hk=3, pos_kind="positions", big=True)
    qo, ko = run_cpp(q, k, inv_freq, pos, False, interleaved, inverse=True)
    check_parity(qo, ko, q, k, positions, inv_freq, interleaved, inverse=True)


# ----------------------------------------------------------------------------- Triton launcher
# Small grids: under the interpreter every program runs in Python.
TRITON_SHAPES = [  # B, T, H, D, rotary_dim, Hk
    (1, 1, 1, 64, None, 1),
    (2, 3, 12, 80, None, 1),
    (1, 2, 48, 256, None, 1),   # several head tiles (BLOCK_H = 16 for D = 256)
    (2, 2, 5, 96, 32, 3),       # partial rotary, multi kv heads
    (1, 3, 3, 128, 18, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
def test_triton_parity(dtype, interleaved, shape):
    B, T, H, D, rdim, Hk = shape
    pos_kind = "positions" if H in (12, 3) else "offsets"
    q, k, inv_freq, pos, positions = make_inputs(B, T, H, D, dtype, TRITON_DEVICE, Hk=Hk, rotary_dim=rdim,
                                                 pos_kind=pos_kind, big=(H == 12),
                                                 pos_dtype=torch.int32 if H == 5 else torch.int64)
    qo, ko = run_triton(q, k, inv_freq, pos, pos_kind == "offsets", interleaved)
    check_parity(qo, ko, q, k, positions, inv_freq, interleaved)
    qi, ki = run_triton(q, k, inv_freq, pos, pos_kind == "offsets", interleaved, inverse=True)
    check_parity(qi, ki, q, k, positions, inv_freq, interleaved, inverse=True)


def test_triton_launch_config_tiles():
    """The block sizes the launcher picks: one tile per token for H=16, D=128; several
    head tiles for H=48, D=256 (both exercised in test_triton_parity shapes)."""
    from palm_fast.kernels.rope import launch_config

    assert launch_config(16, 1, 64, 128) == dict(BLOCK_H=16, BLOCK_HK=1, BLOCK_HALF=64, BLOCK_PASS=1)
    cfg = launch_config(48, 1, 128, 256)
    assert cfg["BLOCK_H"] == 16 and cfg["BLOCK_HALF"] == 128


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_strided_views_and_in_place(backend):
    """q, k as views of a fused projection output, rotated out of place and in place,
    without touching the rest of the fused buffer."""
    device = "cpu" if backend == "cpp" else TRITON_DEVICE
    run = run_cpp if backend == "cpp" else run_triton
    B, T, H, D = (2, 17, 12, 64) if backend == "cpp" else (2, 3, 12, 64)
    for interleaved in (False, True):
        fused, q, k = fused_views(B, T, H, D, torch.bfloat16, device)
        inv_freq = rope_inv_freq(48, device=device)
        offs = torch.tensor([3, 1000], device=device)
        positions = positions_from_offsets(offs, T)
        qo, ko = run(q, k, inv_freq, offs, True, interleaved)
        check_parity(qo, ko, q, k, positions, inv_freq, interleaved)
        before = fused.clone()
        run(q, k, inv_freq, offs, True, interleaved, q_out=q, k_out=k)
        assert torch.equal(q, qo) and torch.equal(k, ko)
        assert torch.equal(fused[..., (H + 1) * D:], before[..., (H + 1) * D:])  # v and the rest untouched


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_determinism(backend):
    device = "cpu" if backend == "cpp" else TRITON_DEVICE
    run = run_cpp if backend == "cpp" else run_triton
    q, k, inv_freq, pos, _ = make_inputs(2, 5, 12, 96, torch.bfloat16, device, rotary_dim=64)
    a = run(q, k, inv_freq, pos, True, False)
    b = run(q, k, inv_freq, pos, True, False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- custom ops, autograd
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_gradients_vs_reference(dtype, interleaved):
    B, T, H, D = 2, 17, 6, 80
    _, q0, k0 = fused_views(B, T, H, D, dtype)  # non-contiguous inputs
    positions = torch.randint(0, 3000, (B, T))
    inv_freq = rope_inv_freq(64)
    gq, gk = randn(B, T, H, D, dtype=dtype), randn(B, T, 1, D, dtype=dtype)
    q, k = q0.detach().requires_grad_(), k0.detach().requires_grad_()
    qo, ko = rope(q, k, positions=positions, rotary_dim=64, interleaved=interleaved)
    torch.autograd.backward((qo, ko), (gq, gk))

    def ref(dt):
        qr = q0.detach().to(dt).requires_grad_()
        kr = k0.detach().to(dt).requires_grad_()
        outs = (apply_rope(qr, positions, inv_freq, interleaved=interleaved),
                apply_rope(kr, positions, inv_freq, interleaved=interleaved))
        torch.autograd.backward(outs, (gq.to(dt), gk.to(dt)))
        return outs, qr.grad, kr.grad

    (rq, rk), rgq, rgk = ref(torch.float64)
    (eq, ek), egq, egk = ref(dtype)
    assert_close_by_rule(qo, rq, eq, name="q_out")
    assert_close_by_rule(ko, rk, ek, name="k_out")
    assert_close_by_rule(q.grad, rgq, egq, name="grad q")
    assert_close_by_rule(k.grad, rgk, egk, name="grad k")


@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")
def test_gradcheck_fp32():
    """gradcheck in fp32 (the op takes fp32/fp16/bf16 only) with loose tolerances."""
    q = randn(1, 3, 2, 8).requires_grad_()
    k = randn(1, 3, 1, 8).requires_grad_()
    f = lambda a, b: rope(a, b, offsets=torch.tensor([5]), rotary_dim=6)
    assert torch.autograd.gradcheck(f, (q, k), eps=1e-2, atol=1e-3, rtol=1e-3)


def test_expanded_grad():
    """Autograd hands the backward zero-stride grads (e.g. from .sum()): must still work."""
    q = randn(1, 4, 3, 64).requires_grad_()
    k = randn(1, 4, 1, 64).requires_grad_()
    qo, ko = rope(q, k)
    (qo.sum() + ko.sum()).backward()
    pos = torch.arange(4)[None]
    inv = rope_inv_freq(64)
    expect = apply_rope(torch.ones(1, 4, 3, 64, dtype=torch.float64), pos, inv, inverse=True)
    torch.testing.assert_close(q.grad.double(), expect, atol=1e-5, rtol=1e-5)


def test_grad_after_inference_mode_call():
    """The first call may come from inference mode (generate): cached defaults it creates
    must still work in a later training step (inference tensors cannot be saved for backward)."""
    rope_mod = importlib.import_module("palm_fast.ops.rope")
    rope_mod._cached_zero_offsets.cache_clear()
    rope_mod._cached_inv_freq.cache_clear()
    with torch.inference_mode():
        rope(randn(1, 4, 3, 48), randn(1, 4, 1, 48))
    q = randn(1, 4, 3, 48).requires_grad_()
    k = randn(1, 4, 1, 48).requires_grad_()
    qo, ko = rope(q, k)
    (qo.square().sum() + ko.sum()).backward()
    assert q.grad is not None and k.grad is not None


@pytest.mark.parametrize("op_name", ["rope", "rope_"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_opcheck(op_name, device):
    op = getattr(torch.ops.palm_fast, op_name).default
    for pos_is_offset, interleaved in [(True, False), (False, True)]:
        q, k, inv_freq, pos, _ = make_inputs(2, 3, 4, 64, torch.float32, device, rotary_dim=32,
                                             pos_kind="offsets" if pos_is_offset else "positions")
        if op_name == "rope":
            q.requires_grad_()
            k.requires_grad_()
        torch.library.opcheck(op, (q, k, inv_freq, pos, pos_is_offset, interleaved, False))


def test_torch_compile_fullgraph():
    q, k, inv_freq, pos, _ = make_inputs(2, 5, 4, 64, torch.float32, rotary_dim=32)

    def f(a, b):
        qo, ko = rope(a, b, offsets=pos, inv_freq=inv_freq)
        return (qo * 2).sum() + ko.sum()

    q.requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k)
    out.backward()
    q2 = q.detach().requires_grad_()
    f(q2, k).backward()
    torch.testing.assert_close(out, f(q.detach(), k))
    torch.testing.assert_close(q.grad, q2.grad)


def test_public_rope_and_in_place_match_reference():
    for dtype in DTYPES:
        q, k, _, _, _ = make_inputs(2, 5, 12, 128, dtype)
        for kw, positions in [({}, torch.arange(5).expand(2, 5)),
                              ({"offsets": torch.tensor([7, 29990], dtype=torch.int32)},
                               positions_from_offsets(torch.tensor([7, 29990]), 5))]:
            qo, ko = rope(q, k, rotary_dim=96, interleaved=True, **kw)
            check_parity(qo, ko, q, k, positions, rope_inv_freq(96), True)
            qi, ki = q.clone(), k.clone()
            r = rope_(qi, ki, rotary_dim=96, interleaved=True, **kw)
            assert r[0] is qi and r[1] is ki
            assert torch.equal(qi, qo) and torch.equal(ki, ko)


def test_in_place_refuses_autograd():
    q = randn(1, 2, 2, 64).requires_grad_()
    k = randn(1, 2, 1, 64)
    with pytest.raises(RuntimeError, match="requires grad"):
        rope_(q, k)
    with torch.no_grad():
        rope_(q, k)


def test_in_place_bumps_the_version_counter():
    """A tensor autograd saved before rope_ rotated it must make that backward raise (as any
    in-place op does), not silently use the rotated values."""
    q, k = randn(1, 3, 2, 16), randn(1, 3, 1, 16)
    w = torch.ones_like(q, requires_grad=True)
    y = (q * w).sum()   # saves q for w's gradient
    v = q._version, k._version
    rope_(q, k)
    assert q._version > v[0] and k._version > v[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_in_place_on_inference_tensors():
    with torch.inference_mode():
        q, k = randn(1, 3, 2, 16), randn(1, 3, 1, 16)
        want = rope(q, k)
        rope_(q, k)   # allowed inside inference mode
        assert torch.equal(q, want[0]) and torch.equal(k, want[1])
    with pytest.raises(RuntimeError, match="inference tensor"):
        rope_(q, k)   # as torch refuses an in-place op on one outside it


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_custom_op_cuda(dtype):
    for H, D, rdim in [(12, 128, None), (48, 256, None), (5, 80, 64)]:
        _, q, k = fused_views(2, 33, H, D, dtype, "cuda")
        positions = torch.randint(0, 30000, (2, 33), device="cuda")
        qo, ko = rope(q, k, positions=positions, rotary_dim=rdim)
        check_parity(qo, ko, q, k, positions, rope_inv_freq(rdim or D), False)
        q2, k2 = q.clone(), k.clone()
        rope_(q2, k2, positions=positions, rotary_dim=rdim)
        assert torch.equal(q2, qo) and torch.equal(k2, ko)


# ----------------------------------------------------------------------------- module
def test_module_matches_reference_and_state_dict():
    m = RotaryEmbedding(64, base=500.0, interleaved=True)
    assert m.inv_freq.dtype == torch.float32 and m.inv_freq.shape == (32,)
    assert list(m.state_dict()) == ["inv_freq"]
    q, k, _, pos, positions = make_inputs(2, 5, 4, 96, torch.float32, rotary_dim=64)
    qo, ko = m(q, k, offsets=pos)
    check_parity(qo, ko, q, k, positions, rope_inv_freq(64, 500.0), True)
    try:
        from palm_fast.reference.layers import RotaryEmbedding as RefRotary
    except ImportError:
        pytest.skip("palm_fast.reference.layers not available in this checkout")
    ref = RefRotary(64, base=500.0, interleaved=True)
    m2 = RotaryEmbedding(64)
    m2.load_state_dict(ref.state_dict())
    ref.load_state_dict(m.state_dict())
    rq, rk = ref(q, k, offsets=pos)
    torch.testing.assert_close(qo, rq)
    torch.testing.assert_close(ko, rk)


# ----------------------------------------------------------------------------- bad input
def _bad_cases():
    q, k = randn(2, 3, 4, 64), randn(2, 3, 1, 64)
    return [
        (dict(q=q.double()), TypeError, "q: expected dtype"),
        (dict(k=k.half()), TypeError, "k: expected dtype torch.float32"),
        (dict(q=q[0]), ValueError, "q: expected 4 dims"),
        (dict(q=[1.0]), TypeError, "q: expected a torch.Tensor"),
        (dict(k=randn(2, 4, 1, 64)), ValueError, r"k: expected shape \[2, 3, Hk, 64\]"),
        (dict(k=randn(2, 3, 1, 32)), ValueError, r"k: expected shape"),
        (dict(q=randn(2, 3, 64, 4).transpose(-1, -2)), ValueError, "q: expected a unit stride"),
        (dict(rotary_dim=33), ValueError, "rotary_dim: expected a positive even integer"),
        (dict(rotary_dim=128), ValueError, "rotary_dim: .*<= head dim 64, got 128"),
        (dict(inv_freq=torch.ones(8, dtype=torch.float64)), TypeError, "inv_freq: expected dtype"),
        (dict(inv_freq=torch.ones(33)), ValueError, "inv_freq: expected 1 <= len"),
        (dict(inv_freq=torch.ones(8), rotary_dim=32), ValueError, "rotary_dim: expected 16"),
        (dict(positions=torch.zeros(2, 4, dtype=torch.long)), ValueError,
         r"positions: expected shape \(2, 3\)"),
        (dict(positions=torch.zeros(2, 3)), TypeError, "positions: expected dtype"),
        (dict(offsets=torch.zeros(3, dtype=torch.long)), ValueError, r"offsets: expected shape \(2,\)"),
        (dict(offsets=torch.zeros(2, 1, dtype=torch.long)), ValueError, "offsets: expected 1 dims"),
        (dict(positions=torch.zeros(2, 3, dtype=torch.long), offsets=torch.zeros(2, dtype=torch.long)),
         ValueError, "positions, offsets: expected at most one"),
        (dict(base=0.0), ValueError, "base: expected a finite float > 0"),
        (dict(base=float("nan")), ValueError, "base: expected a finite float > 0"),
        (dict(base=-10.0), ValueError, "base: expected a finite float > 0"),
        (dict(q=randn(2, 3, 4, 63), k=randn(2, 3, 1, 63)), ValueError, "q: the head dim 63 is odd"),
    ], q, k


@pytest.mark.parametrize("fn", [rope, rope_], ids=["rope", "rope_"])
def test_bad_inputs(fn):
    cases, q, k = _bad_cases()
    for kw, exc, msg in cases:
        args = dict(q=q.clone(), k=k.clone())
        args.update(kw)
        qq, kk = args.pop("q"), args.pop("k")
        with pytest.raises(exc, match=msg):
            fn(qq, kk, **args)


def test_in_place_refuses_overlapping_tensors():
    """An element reached twice would be rotated twice: a broadcast k, k a view of q's
    heads; views of one fused projection buffer are fine."""
    q, k0 = randn(2, 5, 4, 32), randn(2, 5, 1, 32)
    before = q.clone()
    with pytest.raises(ValueError, match="k: .*share memory"):
        rope_(q, k0.expand(2, 5, 2, 32))
    for qq, kk in ((q, q[:, :, :1]), (q[:, :, 1:], q[:, :, :2]), (q, q)):
        with pytest.raises(ValueError, match="k: .*shares memory with q"):
            rope_(qq, kk)
    assert torch.equal(q, before)  # rejected before anything was rotated
    proj = randn(2, 5, 6 * 32)
    q, k = proj[..., :4 * 32].view(2, 5, 4, 32), proj[..., 4 * 32:5 * 32].view(2, 5, 1, 32)
    want = rope(q, k)
    rope_(q, k)
    assert torch.equal(q, want[0]) and torch.equal(k, want[1])


def test_in_place_refuses_partial_overlaps_of_strided_views():
    """Rows of one [B * T, W] buffer: k straddling a head boundary of q, or running into the
    next row's q, is caught (the cheap checks alone missed both); disjoint views pass."""
    flat = randn(2 * 5 * 192 + 64)
    q = flat.as_strided((2, 5, 4, 32), (5 * 192, 192, 32, 1))          # [0, 128) of each row
    before = flat.clone()

    def k_at(offset):
        return flat.as_strided((2, 5, 1, 32), (5 * 192, 192, 32, 1), offset)

    for off in (100, 182, 127, 0, 96):   # inside a head, into the next row, last element ...
        with pytest.raises(ValueError, match="k: .*shares memory with q"):
            rope_(q, k_at(off))
    assert torch.equal(flat, before)
    for off in (128, 150, 160):          # after q in the same row, before the next row's q
        k = k_at(off)
        want = rope(q, k)
        rope_(q, k)
        assert torch.equal(q, want[0]) and torch.equal(k, want[1])
        flat.copy_(before)


def test_in_place_single_row_and_packed_layouts():
    """B = T = 1 (a decode step) and T = 1: size-1 dims' strides are ignored; q and k packed
    one after the other in one allocation pass; an overlap across a head boundary of a
    single row is caught."""
    x = randn(1, 1, 48)
    q, k = x[..., :32].view(1, 1, 4, 8), x[..., 32:40].view(1, 1, 1, 8)
    want = rope(q, k, offsets=torch.tensor([3]))
    rope_(q, k, offsets=torch.tensor([3]))
    assert torch.equal(q, want[0]) and torch.equal(k, want[1])
    n = 2 * 3 * 4 * 8
    buf = randn(n + 2 * 3 * 8)
    q, k = buf[:n].view(2, 3, 4, 8), buf[n:].view(2, 3, 1, 8)
    want = rope(q, k)
    rope_(q, k)
    assert torch.equal(q, want[0]) and torch.equal(k, want[1])
    x = randn(1, 1, 64)
    before = x.clone()
    with pytest.raises(ValueError, match="k: .*shares memory with q"):
        rope_(x.view(1, 1, 8, 8)[:, :, ::2], x[..., 4:12].view(1, 1, 1, 8), offsets=torch.tensor([5]))
    tm = randn(1, 2, 64)   # time-major [T=1, B=2, W] seen as [B, T, ...]
    with pytest.raises(ValueError, match="k: .*shares memory with q"):
        rope_(tm.transpose(0, 1).reshape(2, 1, 64)[..., :64].view(2, 1, 8, 8)[:, :, ::2],
              tm.transpose(0, 1)[..., 4:12].view(2, 1, 1, 8))
    assert torch.equal(x, before)


def test_row_overlap_check_is_exact():
    """_rows_overlap against the element sets, on random views of one row-major buffer."""
    from palm_fast.ops.rope import _rows_overlap

    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(400):
        B, T = (int(torch.randint(1, 4, (1,), generator=g)) for _ in range(2))
        W = int(torch.randint(4, 24, (1,), generator=g))
        H, Hk = (int(torch.randint(1, 4, (1,), generator=g)) for _ in range(2))
        D = int(torch.randint(1, 5, (1,), generator=g))
        s2q, s2k = (int(torch.randint(D, D + 3, (1,), generator=g)) for _ in range(2))
        n = B * T * W + 64
        oq, ok = (int(torch.randint(0, 40, (1,), generator=g)) for _ in range(2))
        buf = torch.zeros(n)
        seq_major = bool(torch.randint(0, 2, (1,), generator=g))  # a transposed [T, B, W]
        rows = [W, B * W] if seq_major else [T * W, W]
        sq, sk = [*rows, s2q, 1], [*rows, s2k, 1]
        for st in (sq, sk):   # a size-1 dim's stride is arbitrary
            for dim, size in enumerate((B, T)):
                if size == 1 and int(torch.randint(0, 2, (1,), generator=g)):
                    st[dim] = int(torch.randint(1, 50, (1,), generator=g))
        try:
            q = buf.as_strided((B, T, H, D), sq, oq)
            k = buf.as_strided((B, T, Hk, D), sk, ok)
        except RuntimeError:
            continue
        got = _rows_overlap(q, k)
        if got is None:
            continue
        idx = torch.arange(n, dtype=torch.float32)
        eq = set(idx.as_strided(q.shape, q.stride(), oq).flatten().tolist())
        ek = set(idx.as_strided(k.shape, k.stride(), ok).flatten().tolist())
        assert got == bool(eq & ek), (B, T, W, H, Hk, D, s2q, s2k, oq, ok)
        checked += 1
    assert checked > 200


def test_self_overlap_check():
    """_self_overlap (q or k rotated in place with elements that share memory): never a false
    alarm, and exact where rows are a fixed stride apart; rope_ refuses such a q (windows
    of one buffer were rotated twice) and k a B / T-permuted view of q's heads."""
    from palm_fast.ops.rope import _row_stride, _self_overlap

    g = torch.Generator().manual_seed(1)
    decided = 0
    for _ in range(400):
        B, T, H, D = (int(torch.randint(1, 4, (1,), generator=g)) for _ in range(4))
        st = [int(torch.randint(0, 30, (1,), generator=g)) for _ in range(3)] + [1]
        t = torch.zeros(4000).as_strided((B, T, H, D), st)
        idx = torch.arange(4000, dtype=torch.float32).as_strided((B, T, H, D), st).flatten()
        truth = len(set(idx.tolist())) < idx.numel()
        got = _self_overlap(t)
        assert not got or truth, (B, T, H, D, st)
        if _row_stride(t) is not None:
            assert got == truth, (B, T, H, D, st)
            decided += 1
    assert decided > 200
    base = randn(64)
    q = base.as_strided((1, 3, 1, 8), (0, 4, 8, 1))       # rows 4 apart, 8 long
    before = base.clone()
    with pytest.raises(ValueError, match="q: .*share memory"):
        rope_(q, randn(1, 3, 1, 8))
    buf = randn(2, 2, 3, 8)
    with pytest.raises(ValueError, match="k: .*shares memory with q"):
        rope_(buf, buf.permute(1, 0, 2, 3)[:, :, :1])      # head 0 of q, B and T swapped
    assert torch.equal(base, before)
    proj = randn(5, 2, 6 * 32).transpose(0, 1)            # sequence-major projection views
    q, k = proj[..., :4 * 32].unflatten(-1, (4, 32)), proj[..., 4 * 32:5 * 32].unflatten(-1, (1, 32))
    want = rope(q, k)
    rope_(q, k)
    assert torch.equal(q, want[0]) and torch.equal(k, want[1])


@pytest.mark.parametrize("shape", [(0, 8, 4, 64, 1), (2, 8, 0, 64, 1), (2, 8, 4, 64, 0), (2, 0, 4, 64, 1)])
def test_empty_forward_and_backward(shape):
    B, T, H, D, Hk = shape
    q = randn(B, T, H, D).requires_grad_()
    k = randn(B, T, Hk, D).requires_grad_()
    a, b = rope(q, k)
    (a.sum() + b.sum()).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


@pytest.mark.skipif(HAS_CUDA is False, reason="needs a CUDA device for the mixed-device case")
def test_bad_device():
    with pytest.raises(ValueError, match="k: expected device"):
        rope(randn(1, 2, 2, 64, device="cuda"), randn(1, 2, 1, 64))



def test_module_cast_keeps_fp32_frequencies():
    """model.to(bf16) must not turn inv_freq into bf16 (the op needs fp32 frequencies)."""
    m = RotaryEmbedding(32).to(torch.bfloat16)
    assert m.inv_freq.dtype == torch.float32
    q, k = randn(1, 4, 2, 32, dtype=torch.bfloat16), randn(1, 4, 1, 32, dtype=torch.bfloat16)
    qo, ko = m(q, k)
    ref = RotaryEmbedding(32)
    rq, rk = ref(q, k)
    assert torch.equal(qo, rq) and torch.equal(ko, rk)


def test_in_place_overlap_refused_under_compile():
    """Tracing cannot see storage, so the check ran only in eager mode: compiled, k = a head
    of q was rotated twice without an error. The op now checks the real tensors."""
    q = randn(1, 3, 4, 8)

    @torch.compile(fullgraph=True)
    def f(q):
        return rope_(q, q[:, :, :1])

    with pytest.raises(Exception, match="shares memory with q"):
        f(q.clone())


def test_a_call_under_fake_tensor_mode_does_not_poison_the_constant_caches():
    """A call under FakeTensorMode (make_fx(tracing_mode="fake"), a bare mode) cached fake
    default frequencies: every later real rope / rope_append call in the process raised."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    rope_mod = importlib.import_module("palm_fast.ops.rope")
    rope_mod._cached_zero_offsets.cache_clear()
    rope_mod._cached_inv_freq.cache_clear()
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)
    with FakeTensorMode() as mode:
        try:
            rope(mode.from_tensor(q), mode.from_tensor(k))
        except Exception:   # (whatever the eager path does with fake tensors)
            pass
    got = rope(q, k)
    pos = torch.arange(4).expand(1, 4)
    inv = rope_inv_freq(8, 10000.0)
    assert torch.allclose(got[0], apply_rope(q, pos, inv), atol=1e-6)
    assert torch.allclose(got[1], apply_rope(k, pos, inv), atol=1e-6)


def test_constants_read_during_a_cuda_graph_capture_outlive_their_lru_eviction(monkeypatch):
    """A CUDA graph holds the addresses of the cached default frequencies it read, not the
    tensors: evicted from the LRU (more than 32 (rotary dim, base) pairs in the process), the
    memory was freed while replays still read it. A tensor handed out during a capture is
    pinned. (The capture query is faked: CI has no GPU.)"""
    import weakref

    dispatch = importlib.import_module("palm_fast.ops._dispatch")
    rope_mod = importlib.import_module("palm_fast.ops.rope")
    rope_mod._cached_inv_freq.cache_clear()
    monkeypatch.setattr(dispatch, "_PINNED", {}, raising=False)
    monkeypatch.setattr(dispatch, "cuda_capturing", lambda: True, raising=False)
    captured = weakref.ref(rope_mod._cached_inv_freq(8, 123.0, torch.device("cpu")))
    monkeypatch.setattr(dispatch, "cuda_capturing", lambda: False)
    for base in range(40):   # evicts the captured entry
        rope_mod._cached_inv_freq(8, 1000.0 + base, torch.device("cpu"))
    assert rope_mod._cached_inv_freq.cache_info().currsize == 32
    assert captured() is not None
    assert torch.equal(captured(), rope_inv_freq(8, 123.0))
    # outside a capture nothing is pinned
    free = weakref.ref(rope_mod._cached_inv_freq(8, 7.0, torch.device("cpu")))
    for base in range(40):
        rope_mod._cached_inv_freq(8, 2000.0 + base, torch.device("cpu"))
    assert free() is None


def test_rope_under_another_default_device():
    """torch.set_default_device (here "meta", standing in for "cuda") does not move the
    op's own tensors: the default frequencies were computed on the default device (the
    cache's comment promises the CPU's pow()) and the fast module then failed with
    "rope_cpu: expected 4-dim CPU tensors"; the in-place overlap check of a head-major
    view built its interval tensors there; a traced call (make_fx) moved meta frequencies."""
    from torch.fx.experimental.proxy_tensor import make_fx

    rope_mod = importlib.import_module("palm_fast.ops.rope")
    rope_mod._cached_inv_freq.cache_clear()
    B, T, H, D = 1, 5, 2, 8
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, 1, D)
    pos = torch.arange(T).expand(B, T)
    inv = rope_inv_freq(D, 10000.0)
    want = (apply_rope(q, pos, inv), apply_rope(k, pos, inv))
    head_major = torch.randn(B, H, T, D)      # q a [B, T, H, D] view of head-major rows
    module = RotaryEmbedding(D)
    torch.set_default_device("meta")
    try:
        freq = rope_mod._cached_inv_freq(D, 10000.0, torch.device("cpu"))
        got = rope(q, k)
        got_mod = module(q, k)
        q_hm = head_major.clone().transpose(1, 2)
        got_inplace = rope_(q_hm, k.clone())
        traced = make_fx(lambda a, b: rope(a, b))(q, k)
    finally:
        torch.set_default_device(None)
    assert freq.device.type == "cpu" and torch.equal(freq, inv)
    for g in (got, got_mod, traced(q, k)):
        assert torch.allclose(g[0], want[0], atol=1e-6) and torch.allclose(g[1], want[1], atol=1e-6)
    assert torch.allclose(got_inplace[0], apply_rope(head_major.transpose(1, 2), pos, inv), atol=1e-6)
