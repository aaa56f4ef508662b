"""The fused parallel block: epilogue GEMM kernels (interpreter), the functional pieces, the
block's forward/backward against the reference on the CPU (ATen + C++) path and on the
Triton path (under the interpreter here, on the GPU when there is one), the KV-cache path,
the weight re-layout cache, torch.compile, determinism and bad input."""
from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, TRITON_DEVICE, assert_close_by_rule, randn, requires_cuda

import palm_fast.ops.block as ob
from palm_fast.kernels import projection as kp
from palm_fast.nn import ParallelBlock
from palm_fast.ops import causal_mqa_attention, fused_output_projection
from palm_fast.reference import KVCache, attention, functional
from palm_fast.reference import ParallelBlock as RefBlock

DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes (see conftest)


# ----------------------------------------------------------------------------- kernels

def _in_proj_reference(xn, w, pos, H, Hk, hd, F, inv_freq, interleaved):
    """(q, k, v, h, ff) of the reference math in xn's dtype (pos [M])."""
    M = xn.shape[0]
    proj = xn @ w.t()
    q, k, v, ff = proj.split([H * hd, Hk * hd, Hk * hd, 2 * F], dim=-1)
    p = pos.view(1, M)
    q = functional.apply_rope(q.reshape(1, M, H, hd), p, inv_freq, interleaved=interleaved)
    k = functional.apply_rope(k.reshape(1, M, Hk, hd), p, inv_freq, interleaved=interleaved)
    return q.reshape(M, -1), k.reshape(M, -1), v, functional.swiglu(ff), ff


# (M, d, H, Hk, hd, F, rotary_dim, interleaved): M and F not multiples of any block,
# partial rotary (pass-through pairs), GQA, a K tail.
IN_SHAPES = [(37, 40, 3, 1, 16, 27, 16, False), (9, 24, 2, 2, 32, 40, 16, True)]


@pytest.mark.parametrize("config", range(len(kp.IN_PROJ_CONFIGS)))
@pytest.mark.parametrize("shape", IN_SHAPES, ids=lambda s: f"M{s[0]}-F{s[5]}-R{s[6]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT.get)
def test_in_proj_kernel(config, shape, dtype):
    """Every autotune config of the epilogue GEMM, with and without the stored pre-activation."""
    M, d, H, Hk, hd, F, R, inter = shape
    inv_freq = functional.rope_inv_freq(R)
    xn = randn(M, d, dtype=dtype, device=TRITON_DEVICE)
    w = randn(H * hd + 2 * Hk * hd + 2 * F, d, dtype=dtype, device=TRITON_DEVICE, scale=d ** -0.5)
    pos = torch.randint(0, 300, (M,), device=TRITON_DEVICE)
    packed = kp.pack_in_proj(w, inv_freq.to(TRITON_DEVICE), H, Hk, hd, F, inter)
    cfg = kp.IN_PROJ_CONFIGS[config]
    ref64 = _in_proj_reference(xn.double().cpu(), w.double().cpu(), pos.cpu(), H, Hk, hd, F, inv_freq, inter)
    eager = _in_proj_reference(xn.cpu(), w.cpu(), pos.cpu(), H, Hk, hd, F, inv_freq, inter)
    qkv = dict(qkv_weight=w[:(H + 2 * Hk) * hd], inv_freq=inv_freq.to(TRITON_DEVICE), interleaved=inter)
    for store_ff, via_gemm in ((True, False), (False, False), (True, True)):
        outs = kp.in_proj(xn, packed, pos, H, Hk, hd, F, store_ff=store_ff, config=cfg,
                          **(qkv if via_gemm else {}))
        names = ("q", "k", "v", "h", "ff") if store_ff else ("q", "k", "v", "h")
        for name, out, r, e in zip(names, outs, ref64, eager):
            assert out.is_contiguous()
            assert_close_by_rule(out.cpu(), r, e, name=name)
        if not store_ff:
            assert outs[4].numel() == 0


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_autotune_configs_give_the_same_bits(dtype):
    """The autotuner picks a config by timing, which can differ from one process to the
    next: run-to-run bitwise reproducibility (PaLM's promise) needs every config of a GEMM
    to give the same bits, in every dtype (fp32 configs are refitted to their operand size).
    (On the GPU only: under the interpreter numpy's dot sums each tile in its own order.)"""
    M, d, H, Hk, hd, F, R, inter = 256, 512, 4, 1, 64, 256, 64, False
    inv_freq = functional.rope_inv_freq(R).cuda()
    xn = randn(M, d, dtype=dtype, device="cuda")
    w = randn(H * hd + 2 * Hk * hd + 2 * F, d, dtype=dtype, device="cuda", scale=d ** -0.5)
    pos = torch.randint(0, 300, (M,), device="cuda")
    packed = kp.pack_in_proj(w, inv_freq, H, Hk, hd, F, inter)
    runs = [kp.in_proj(xn, packed, pos, H, Hk, hd, F, store_ff=True, config=c) for c in kp.IN_PROJ_CONFIGS]
    for i, other in enumerate(runs[1:], 1):
        for name, a, b in zip(("q", "k", "v", "h", "ff"), runs[0], other):
            assert torch.equal(a, b), (name, i)
    bf = dict(dtype=dtype, device="cuda")
    o, h, x = randn(M, 384, **bf), randn(M, 256, **bf), randn(M, 512, **bf)
    wo, wf = randn(512, 384, **bf), randn(512, 256, **bf)
    ys = [kp.out_proj(o, h, x, wo, wf, config=c) for c in kp.OUT_PROJ_CONFIGS]
    for i, y in enumerate(ys[1:], 1):
        assert torch.equal(ys[0], y), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT.get)
def test_in_proj_kernel_separate_weights(dtype):
    """``pack_in_proj`` interleaves the pair members in one buffer (one weight tile per K
    step); the kernel also takes them as two separate contiguous tensors (two dots)."""
    M, d, H, Hk, hd, F, R, inter = IN_SHAPES[0]
    inv_freq = functional.rope_inv_freq(R)
    xn = randn(M, d, dtype=dtype, device=TRITON_DEVICE)
    w = randn(H * hd + 2 * Hk * hd + 2 * F, d, dtype=dtype, device=TRITON_DEVICE, scale=d ** -0.5)
    pos = torch.randint(0, 300, (M,), device=TRITON_DEVICE)
    packed = kp.pack_in_proj(w, inv_freq.to(TRITON_DEVICE), H, Hk, hd, F, inter)
    assert kp.is_interleaved(packed.w_a, packed.w_b)
    sep = kp.PackedInProj(packed.w_a.contiguous(), packed.w_b.contiguous(), packed.dst_a,
                          packed.dst_b, packed.freq, packed.p_qkv)
    assert not kp.is_interleaved(sep.w_a, sep.w_b)
    # the two views in two buffers, strides kept (what torch.compile's inductor hands the op):
    # a bare assert failed, and under python -O the rows were read with the wrong stride
    twin = [torch.zeros_like(packed.w_a.unflatten(0, (-1, 1)).expand(-1, 2, -1).contiguous())
            for _ in range(2)]
    twin[0][:, 0], twin[1][:, 1] = packed.w_a, packed.w_b
    strided = kp.PackedInProj(twin[0][:, 0], twin[1][:, 1], packed.dst_a, packed.dst_b,
                              packed.freq, packed.p_qkv)
    assert not kp.is_interleaved(strided.w_a, strided.w_b) and not strided.w_a.is_contiguous()
    cfg = kp.IN_PROJ_CONFIGS[-1]
    a = kp.in_proj(xn, packed, pos, H, Hk, hd, F, store_ff=True, config=cfg)
    b = kp.in_proj(xn, sep, pos, H, Hk, hd, F, store_ff=True, config=cfg)
    c = kp.in_proj(xn, strided, pos, H, Hk, hd, F, store_ff=True, config=cfg)
    ref64 = _in_proj_reference(xn.double().cpu(), w.double().cpu(), pos.cpu(), H, Hk, hd, F, inv_freq, inter)
    eager = _in_proj_reference(xn.cpu(), w.cpu(), pos.cpu(), H, Hk, hd, F, inv_freq, inter)
    for name, x, y, z, r, e in zip(("q", "k", "v", "h", "ff"), a, b, c, ref64, eager):
        assert_close_by_rule(x.cpu(), r, e, name=name)
        assert_close_by_rule(y.cpu(), r, e, name=name)
        assert torch.equal(z, y), name


@pytest.mark.skipif(not kp.TMA_SUPPORTED, reason="this Triton has no host TMA descriptors")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DT.get)
def test_in_proj_swiglu_tma(dtype):
    """The SwiGLU columns through the persistent TMA kernel (forced on: on a GPU it applies
    from TMA_MIN_ROWS rows): F and M not multiples of its tiles (zero-filled loads, clipped
    stores), with and without the pre-activation, several tiles per program; same outputs as
    the pointer kernel and the reference. An unaligned h row (F * 2 bytes not a multiple of
    16) falls back to the pointer kernel."""
    M, d, H, Hk, hd, R, inter = 37, 48, 2, 1, 16, 16, False
    small = dict(BM=16, BN=16, BK=16, GROUP_M=2, num_warps=4, num_stages=2)
    inv_freq = functional.rope_inv_freq(R)
    for F in (40, 36):
        xn = randn(M, d, dtype=dtype, device=TRITON_DEVICE)
        w = randn(H * hd + 2 * Hk * hd + 2 * F, d, dtype=dtype, device=TRITON_DEVICE, scale=d ** -0.5)
        pos = torch.randint(0, 300, (M,), device=TRITON_DEVICE)
        packed = kp.pack_in_proj(w, inv_freq.to(TRITON_DEVICE), H, Hk, hd, F, inter)
        w_ff = w[(H + 2 * Hk) * hd:]
        h_probe = torch.empty(M, F, dtype=dtype, device=TRITON_DEVICE)
        assert kp._tma_usable(xn, w_ff, h_probe, True) is (F == 40)
        ref64 = _in_proj_reference(xn.double().cpu(), w.double().cpu(), pos.cpu(), H, Hk, hd, F,
                                   inv_freq, inter)
        eager = _in_proj_reference(xn.cpu(), w.cpu(), pos.cpu(), H, Hk, hd, F, inv_freq, inter)
        for store_ff in (True, False):
            a = kp.in_proj(xn, packed, pos, H, Hk, hd, F, store_ff=store_ff, tma=True, tma_config=small)
            b = kp.in_proj(xn, packed, pos, H, Hk, hd, F, store_ff=store_ff, tma=False,
                           config=kp.IN_PROJ_CONFIGS[-1])
            names = ("q", "k", "v", "h", "ff") if store_ff else ("q", "k", "v", "h")
            for name, x, y, r, e in zip(names, a, b, ref64, eager):
                assert_close_by_rule(x.cpu(), r, e, name=name)
                assert_close_by_rule(y.cpu(), r, e, name=name)


@pytest.mark.parametrize("config", range(len(kp.OUT_PROJ_CONFIGS)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT.get)
def test_out_proj_kernel(config, dtype):
    """Every autotune config of the residual-epilogue GEMM; o and h strided views, K tails."""
    M, N, K1, K2 = 37, 70, 48, 27
    buf = randn(M, K1 + K2 + 5, dtype=dtype, device=TRITON_DEVICE)
    o, h = buf[:, :K1], buf[:, K1 + 5:]          # row-strided views (no copy)
    x = randn(M, N, dtype=dtype, device=TRITON_DEVICE)
    wo = randn(N, K1, dtype=dtype, device=TRITON_DEVICE, scale=K1 ** -0.5)
    wf = randn(N, K2, dtype=dtype, device=TRITON_DEVICE, scale=K2 ** -0.5)
    y = kp.out_proj(o, h, x, wo, wf, config=kp.OUT_PROJ_CONFIGS[config])

    def ref(o, h, x, wo, wf):
        return x + o @ wo.t() + h @ wf.t()

    args = [t.cpu() for t in (o, h, x, wo, wf)]
    assert_close_by_rule(y.cpu(), ref(*[a.double() for a in args]), ref(*args), name="y")


def test_pair_columns_cover_every_column_once():
    """The re-layout is a permutation of the projection's columns (pairs a | b)."""
    for inter in (False, True):
        a, b, f = kp.pair_columns(4, 2, 32, 19, 8, inter)
        cols = torch.cat((a, b)).sort().values
        assert torch.equal(cols, torch.arange((4 + 4) * 32 + 38))
        assert int((f >= 0).sum()) == (4 + 2) * 8


# ----------------------------------------------------------------------------- block

# (B, T, dim, H, Hk, hd, F, extra kwargs): F not a multiple of any block size, head dim 256,
# T = 1, GQA, partial interleaved rotary.
BLOCK_CONFIGS = [
    (2, 7, 64, 4, 1, 16, 100, {}),
    (1, 5, 48, 2, 1, 256, 72, {}),
    (3, 1, 32, 4, 2, 8, 24, {}),
    (2, 9, 40, 3, 1, 32, 50, {"rotary_dim": 16, "interleaved": True}),
]


def _blocks(cfg, dtype, device="cpu"):
    B, T, d, H, Hk, hd, F, kw = cfg
    ref = RefBlock(d, H, hd, F, Hk, **kw)
    with torch.no_grad():   # non-trivial LayerNorm weight
        ref.norm.weight.add_(0.1 * torch.randn(d))
    fast = ParallelBlock(d, H, hd, F, Hk, **kw)
    fast.load_state_dict(ref.state_dict())
    return ref, fast.to(device=device, dtype=dtype)


def _fwd_bwd(block, x, g, positions=None):
    x = x.detach().clone().requires_grad_(True)
    y = block(x, positions)
    grads = torch.autograd.grad(y, [x, *block.parameters()], g)
    return [y.detach(), *grads]


NAMES = ["y", "dx", "d_norm.weight", "d_in_proj.weight", "d_attn_out.weight", "d_ff_out.weight"]


def _check_block(cfg, dtype, device, positions=None):
    B, T, d = cfg[:3]
    ref, fast = _blocks(cfg, dtype, device)
    x = randn(B, T, d, dtype=dtype, device=device)
    g = randn(B, T, d, dtype=dtype, device=device)
    pos = None if positions is None else positions.to(device)
    outs = _fwd_bwd(fast, x, g, pos)
    r64 = _fwd_bwd(ref.double(), x.double().cpu(), g.double().cpu(), positions)
    eager = _fwd_bwd(ref.to(dtype), x.cpu(), g.cpu(), positions)
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for name, o, r, e in zip(NAMES, outs, r64, eager):
        assert_close_by_rule(o.cpu(), r, e, name=name)


@pytest.mark.parametrize("dtype", list(DT), ids=DT.get)
@pytest.mark.parametrize("cfg", BLOCK_CONFIGS, ids=lambda c: f"T{c[1]}-hd{c[5]}-Hk{c[4]}-F{c[6]}")
def test_block_cpu(cfg, dtype):
    """ATen GEMMs + C++ epilogues vs the reference block, forward and every gradient."""
    _check_block(cfg, dtype, "cpu")


@pytest.fixture
def triton_backend(monkeypatch):
    """Run the block's Triton functions on this machine's device: CUDA, or CPU tensors
    under the interpreter (the "cpu" entries point at the Triton implementations)."""
    if not HAS_CUDA:
        monkeypatch.setitem(ob._IN_IMPLS, "cpu", ob._in_proj_triton)
        monkeypatch.setitem(ob._OUT_IMPLS, "cpu", ob._out_proj_triton)
    return TRITON_DEVICE


@pytest.mark.parametrize("cfg", [BLOCK_CONFIGS[0], BLOCK_CONFIGS[3]], ids=["rotate-half", "interleaved"])
def test_block_triton(cfg, triton_backend):
    """The Triton epilogue GEMMs + Triton RoPE / SwiGLU backward inside the whole block."""
    positions = torch.randint(0, 100, cfg[:2])
    _check_block(cfg, torch.float32, triton_backend, positions)


@pytest.mark.parametrize("cfg", [(2, 5, 12, 2, 1, 5, 5, {"rotary_dim": 4}),
                                 (1, 3, 16, 3, 3, 7, 9, {"rotary_dim": 2, "interleaved": True})],
                         ids=["hd5", "hd7-gqa-interleaved"])
def test_block_triton_odd_head_dim(cfg, triton_backend):
    """An odd head dim with an even rotary dim (the reference and the CPU path take it): the
    Triton path refused it while re-laying out the input weight in column pairs, which its
    q / k / v columns do not need (they take the library GEMM + RoPE kernel). Forward and
    every gradient against the reference; the epilogue GEMM's RoPE region (which needs the
    pairs) refuses it by name."""
    _check_block(cfg, torch.float32, triton_backend)
    B, T, d, H, Hk, hd, F, kw = cfg
    a, b, f = kp.pair_columns(H, Hk, hd, F, kw["rotary_dim"] // 2, kw.get("interleaved", False))
    f0 = (H + 2 * Hk) * hd   # (only the SwiGLU columns are paired)
    assert kp.qkv_pairs(H, Hk, hd) == 0
    assert torch.equal(torch.cat((a, b)).sort().values, torch.arange(f0, f0 + 2 * F))
    _, fast = _blocks(cfg, torch.float32, triton_backend)
    inv = fast.rotary.inv_freq
    packed = kp.pack_in_proj(fast.in_proj.weight, inv, H, Hk, hd, F, kw.get("interleaved", False))
    xn = randn(B * T, d, device=triton_backend)
    pos = torch.zeros(B * T, dtype=torch.int32, device=triton_backend)
    with pytest.raises(ValueError, match="^head_dim: the epilogue GEMM's RoPE region needs"):
        kp.in_proj(xn, packed, pos, H, Hk, hd, F, store_ff=False)


def test_block_triton_with_column_major_output_weights(triton_backend):
    """attn_out / ff_out weights stored transposed (W.t().contiguous().t()): the Triton
    output GEMM takes a row stride only and failed a bare assert (wrong numbers under
    python -O); they are copied to unit column stride first."""
    cfg = BLOCK_CONFIGS[0]
    ref, fast = _blocks(cfg, torch.float32, triton_backend)
    for lin in (fast.attn_out, fast.ff_out):
        lin.weight = torch.nn.Parameter(lin.weight.detach().t().contiguous().t())
        assert lin.weight.stride(-1) != 1
    x = randn(*cfg[:2], cfg[2], device=triton_backend)
    g = randn(*cfg[:2], cfg[2], device=triton_backend)
    got = _fwd_bwd(fast, x, g)
    want = _fwd_bwd(ref.to(triton_backend), x, g)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


@requires_cuda
@pytest.mark.parametrize("dtype", list(DT), ids=DT.get)
@pytest.mark.parametrize("cfg", BLOCK_CONFIGS, ids=lambda c: f"T{c[1]}-hd{c[5]}-Hk{c[4]}-F{c[6]}")
def test_block_cuda(cfg, dtype):
    _check_block(cfg, dtype, "cuda")


def test_packed_weight_cache(triton_backend):
    """The re-layout is built once, reused, rebuilt after an in-place weight update, and never
    appears in the state_dict."""
    ref, fast = _blocks(BLOCK_CONFIGS[0], torch.float32, triton_backend)
    x = randn(1, 3, 64, device=triton_backend)
    with torch.no_grad():
        fast(x)
        first = fast._packed
        fast(x)
        assert fast._packed is first
        fast.in_proj.weight.mul_(0.5)           # an optimizer-style in-place update
        y = fast(x)
        assert fast._packed is not first
        ref.in_proj.weight.mul_(0.5)
        torch.testing.assert_close(y.cpu(), ref(x.cpu()), rtol=1e-5, atol=1e-5)
    assert set(fast.state_dict()) == set(ref.state_dict())


def test_packed_weight_of_inference_tensors(triton_backend):
    """A block built under inference_mode holds inference tensors (no version counter): its
    re-layout is rebuilt per call, so an in-place weight update is still seen."""
    with torch.inference_mode():
        ref, fast = _blocks(BLOCK_CONFIGS[0], torch.float32, triton_backend)
        x = randn(1, 3, 64, device=triton_backend)
        fast(x)
        fast.in_proj.weight.mul_(0.5)
        ref.in_proj.weight.mul_(0.5)
        torch.testing.assert_close(fast(x).cpu(), ref(x.cpu()), rtol=1e-5, atol=1e-5)


def test_kv_cache_matches_reference():
    """Prefill then decode steps with a reference KVCache; default and explicit positions."""
    ref, fast = _blocks(BLOCK_CONFIGS[0], torch.float32)
    B, _, d = BLOCK_CONFIGS[0][:3]
    c_ref, c_fast = KVCache(B, 16, 1, 16), KVCache(B, 16, 1, 16)
    with torch.no_grad():
        for T in (5, 1, 3, 1):
            x = randn(B, T, d)
            torch.testing.assert_close(fast(x, cache=c_fast), ref(x, cache=c_ref), rtol=1e-5, atol=1e-5)
        assert c_fast.length == c_ref.length == 10
        torch.testing.assert_close(c_fast.k[:, :10], c_ref.k[:, :10])
        pos = torch.tensor([[3, 9], [0, 1]])
        x = randn(B, 2, d)
        torch.testing.assert_close(fast(x, pos), ref(x, pos), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT.get)
@pytest.mark.parametrize("Hk", [1, 2])
def test_causal_mqa_attention(dtype, Hk):
    B, T, H, hd = 2, 11, 4, 16
    q = randn(B, T, H, hd, dtype=dtype)
    k = randn(B, T, Hk, hd, dtype=dtype)
    v = randn(B, T, Hk, hd, dtype=dtype)
    g = randn(B, T, H, hd, dtype=dtype)

    def run(fn, *ts):
        ts = [t.detach().clone().requires_grad_(True) for t in ts]
        o = fn(*ts)
        return [o.detach(), *torch.autograd.grad(o, ts, g.to(o.dtype))]

    kk, vv = (k[:, :, 0], v[:, :, 0]) if Hk == 1 else (k, v)
    ours = run(causal_mqa_attention, q, kk, vv)
    r64 = run(attention, q.double(), k.double(), v.double())
    eager = run(attention, q, k, v)
    for name, o, r, e in zip(("o", "dq", "dk", "dv"), ours, r64, eager):
        assert_close_by_rule(o, r.reshape(o.shape), e.reshape(o.shape), name=name)
    # an explicit scale
    o2 = causal_mqa_attention(q, kk, vv, scale=0.5)
    o2_ref = attention(q.double() * (0.5 * hd ** 0.5), k.double(), v.double())
    assert_close_by_rule(o2, o2_ref, attention(q * (0.5 * hd ** 0.5), k, v).to(dtype), name="o(scale)")


def test_strided_input_int32_positions_and_empty_sequence():
    ref, fast = _blocks(BLOCK_CONFIGS[0], torch.float32)
    x = randn(64, 5, 2).permute(2, 1, 0)                 # non-contiguous x
    pos = torch.randint(0, 50, (2, 5), dtype=torch.int32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, pos), ref(x, pos), rtol=1e-5, atol=1e-5)
        assert fast(randn(2, 0, 64)).shape == (2, 0, 64)


def test_determinism():
    _, fast = _blocks(BLOCK_CONFIGS[0], torch.float32)
    x, g = randn(2, 7, 64), randn(2, 7, 64)
    a, b = _fwd_bwd(fast, x, g), _fwd_bwd(fast, x, g)
    assert all(torch.equal(u, w) for u, w in zip(a, b))


@pytest.mark.parametrize("backend,compiler", [("aten", "aot_eager"), ("triton", "aot_eager"),
                                              ("triton", "inductor")])
def test_torch_compile_block(backend, compiler, request):
    """fullgraph compile (the custom ops' fake kernels and autograd) matches eager, on the
    CPU path and on the Triton path (with its packed weight and pre-activation layout).
    Inductor hands the packed weight's two views over as separate buffers: the Triton input
    GEMM failed a bare assert (and read wrong rows under python -O)."""
    device = request.getfixturevalue("triton_backend") if backend == "triton" else "cpu"
    _, fast = _blocks(BLOCK_CONFIGS[0], torch.float32, device)
    x, g = randn(2, 7, 64, device=device), randn(2, 7, 64, device=device)
    eager = _fwd_bwd(fast, x, g)
    compiled = torch.compile(fast, fullgraph=True, backend=compiler)
    outs = _fwd_bwd(compiled, x, g)
    for name, o, e in zip(NAMES, outs, eager):
        torch.testing.assert_close(o, e, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("M", [3, 1, 0])
def test_opcheck_custom_ops(M):
    """M = 1 (a batch-1 decode step, one-token batch) and 0: v was a view of the returned
    projection (its slice is contiguous already), which the dispatcher refuses under
    torch.compile (outputs may not alias)."""
    from torch.library import opcheck

    d, H, Hk, hd, F = 16, 2, 1, 8, 12
    x = randn(M, d).requires_grad_()
    lnw = (1 + 0.1 * randn(d)).requires_grad_()
    w = randn((H + 2 * Hk) * hd + 2 * F, d).requires_grad_()
    e = torch.empty(0)
    inv = functional.rope_inv_freq(hd)
    pos = torch.arange(M)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor") if M == 0 else None
    opcheck(torch.ops.palm_fast.block_in_proj,
            (x, lnw, w, e, e, e, e, e, inv, pos, H, Hk, hd, F, 1e-5, False, True),
            **({"test_utils": tests} if tests else {}))
    if M == 0:
        return
    o, h = randn(M, H * hd).requires_grad_(), randn(M, F).requires_grad_()
    wo, wf = randn(d, H * hd).requires_grad_(), randn(d, F).requires_grad_()
    opcheck(torch.ops.palm_fast.block_out_proj, (o, h, randn(M, d).requires_grad_(), wo, wf))
    g = randn(M, d)
    for need in (True, False):   # the backward ops, a frozen weight's GEMM skipped
        opcheck(torch.ops.palm_fast.block_out_proj_bwd, (g, o, h, wo, wf, need, not need),
                test_utils=("test_schema", "test_faketensor"))
    Nin = w.shape[0]
    xn, mean, rstd = randn(M, d), randn(M), randn(M).abs() + 0.5
    ff = randn(M, Nin - (H + 2 * Hk) * hd)
    for need in (True, False):
        opcheck(torch.ops.palm_fast.block_in_proj_bwd,
                (randn(M, H * hd), randn(M, Hk * hd), randn(M, Hk * hd), randn(M, F), x.detach(),
                 lnw.detach(), w.detach(), xn, mean, rstd, ff, inv, pos, H, Hk, hd, F, False, need,
                 not need),
                test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("compiled", [False, True])
def test_frozen_weights_skip_their_gradient_gemms(monkeypatch, compiled):
    """Frozen projection weights (prompt tuning, training some layers): the backward still
    ran the three weight-gradient GEMMs, 1.5x slower than the reference block then. The
    other gradients are unchanged and the frozen weights get none."""
    cfg = BLOCK_CONFIGS[0]
    ref, fast = _blocks(cfg, torch.float32)
    x = randn(*cfg[:2], cfg[2])
    g = randn(*cfg[:2], cfg[2])
    calls = []
    real_mm = ob._mm
    monkeypatch.setattr(ob, "_mm", lambda a, b: calls.append(1) or real_mm(a, b))

    def backward_gemms(fn):   # GEMM calls of the backward only; returns (count, x.grad)
        xg = x.detach().clone().requires_grad_(True)
        y = fn(xg)
        calls.clear()
        torch.autograd.backward(y, g)
        return len(calls), xg.grad

    n_full, dx_full = backward_gemms(fast)
    dlnw_full = fast.norm.weight.grad.clone()
    fast.zero_grad(set_to_none=True)
    for lin in (fast.in_proj, fast.attn_out, fast.ff_out):
        lin.weight.requires_grad_(False)
    fn = torch.compile(fast, fullgraph=True, backend="aot_eager") if compiled else fast
    n_frozen, dx = backward_gemms(fn)
    if not compiled:   # (traced: the GEMM count is the compiled graph's business)
        assert (n_full, n_frozen) == (6, 3)   # frozen: dxn, do, dh only
    assert torch.equal(dx, dx_full)
    assert torch.equal(fast.norm.weight.grad, dlnw_full)
    assert all(lin.weight.grad is None for lin in (fast.in_proj, fast.attn_out, fast.ff_out))
    # the whole block frozen (LoRA-style): the LayerNorm's weight reduction is skipped too
    fast.zero_grad(set_to_none=True)
    fast.norm.weight.requires_grad_(False)
    ln_calls = []
    real_ln = ob._layer_norm_bwd_cpu
    monkeypatch.setattr(ob, "_layer_norm_bwd_cpu",
                        lambda *a: ln_calls.append(a[-1]) or real_ln(*a))
    fn = torch.compile(fast, fullgraph=True, backend="aot_eager") if compiled else fast
    _, dx = backward_gemms(fn)
    assert torch.equal(dx, dx_full)
    assert all(p.grad is None for p in fast.parameters())
    if not compiled:
        assert ln_calls == [False]


def test_preactivation_written_only_for_autograd(triton_backend, monkeypatch):
    """The epilogue GEMM writes the 2F pre-activation only when a backward will need it."""
    calls = []
    real = kp.in_proj

    def spy(*args, store_ff, **kw):
        calls.append(store_ff)
        return real(*args, store_ff=store_ff, **kw)

    monkeypatch.setattr(kp, "in_proj", spy)
    _, fast = _blocks(BLOCK_CONFIGS[2], torch.float32, triton_backend)
    x = randn(3, 1, 32, device=triton_backend)
    with torch.no_grad():
        fast(x)
    fast(x).sum().backward()
    fast.requires_grad_(False)
    fast(x)                      # grad mode on, but nothing requires grad
    assert calls == [False, True, False]


def test_bad_input():
    _, fast = _blocks(BLOCK_CONFIGS[0], torch.float32)
    with pytest.raises(ValueError, match="x: expected 3 dims"):
        fast(randn(7, 64))
    with pytest.raises(ValueError, match=r"x: expected last dim 64 \(the model width"):
        fast(randn(1, 2, 32))
    with pytest.raises(TypeError, match=r"x: expected dtype torch.float32 \(the block weights'\)"):
        fast(randn(1, 2, 64, dtype=torch.float16))
    with pytest.raises(TypeError, match="x: expected dtype in"):
        fast(torch.ones(1, 2, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"positions: expected shape \(1, 2\)"):
        fast(randn(1, 2, 64), torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="positions: expected dtype in"):
        fast(randn(1, 2, 64), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="recompute: expected one of"):
        ParallelBlock(64, 4, 16, 100, recompute="some")
    blk = fast
    args = (randn(1, 2, 64), blk.norm.weight, blk.in_proj.weight, blk.attn_out.weight,
            blk.ff_out.weight, blk.rotary.inv_freq)
    kw = dict(n_heads=blk.n_heads, head_dim=blk.head_dim, d_ff=blk.d_ff)
    with pytest.raises(ValueError, match="n_kv_heads: expected a divisor of n_heads"):
        ob.parallel_block(*args, **(kw | dict(n_kv_heads=3)))
    with pytest.raises(TypeError, match="n_heads: expected an int"):
        ob.parallel_block(*args, **(kw | dict(n_heads=float(blk.n_heads))))
    q = randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="k: expected shape"):
        causal_mqa_attention(q, randn(1, 5, 8), randn(1, 5, 8))
    with pytest.raises(ValueError, match="v: expected shape"):
        causal_mqa_attention(q, randn(1, 4, 8), randn(1, 4, 1, 8)[:, :3])
    with pytest.raises(TypeError, match="k: expected dtype torch.float32"):
        causal_mqa_attention(q, randn(1, 4, 8, dtype=torch.bfloat16), randn(1, 4, 8))
    with pytest.raises(ValueError, match="scale: expected a finite float > 0"):
        causal_mqa_attention(q, randn(1, 4, 8), randn(1, 4, 8), scale=-1.0)
    x = randn(1, 4, 16)
    with pytest.raises(ValueError, match=r"h: expected shape \(1, 4, 12\)"):
        fused_output_projection(randn(1, 4, 2, 8), randn(1, 4, 11), x, randn(16, 16), randn(16, 12))
    with pytest.raises(ValueError, match="o: expected shape"):
        fused_output_projection(randn(1, 4, 2, 4), randn(1, 4, 12), x, randn(16, 16), randn(16, 12))
    with pytest.raises(ValueError, match=r"w_attn_out, w_ff_out: expected 16 rows"):
        fused_output_projection(randn(1, 4, 2, 8), randn(1, 4, 12), x, randn(15, 16), randn(16, 12))
    with pytest.raises(TypeError, match="w_ff_out: expected dtype torch.float32"):
        fused_output_projection(randn(1, 4, 2, 8), randn(1, 4, 12), x, randn(16, 16),
                                randn(16, 12, dtype=torch.float16))
    # the whole block checks the output weights against its own sizes
    sizes = dict(n_heads=fast.n_heads, n_kv_heads=fast.n_kv_heads, head_dim=fast.head_dim,
                 d_ff=fast.d_ff)
    with pytest.raises(ValueError, match=r"w_attn_out, w_ff_out: expected shapes \(64, 64\)"):
        ob.parallel_block(randn(1, 2, 64), fast.norm.weight, fast.in_proj.weight,
                          fast.attn_out.weight[:, :-1], fast.ff_out.weight, fast.rotary.inv_freq,
                          **sizes)


def test_in_proj_launcher_takes_strided_positions():
    """The epilogue GEMM's own RoPE region read pos densely: a strided pos [M] (which the
    public ops never pass, but the launcher accepts) rotated with the wrong positions."""
    if TRITON_DEVICE != "cpu":
        pytest.skip("interpreter check (the CUDA tests cover the launcher on a GPU)")
    M, d, H, Hk, hd, F = 5, 16, 2, 1, 8, 4
    g = torch.Generator().manual_seed(0)
    inv = functional.rope_inv_freq(hd)
    xn, w = torch.randn(M, d, generator=g), torch.randn((H + 2 * Hk) * hd + 2 * F, d, generator=g)
    pos = torch.arange(0, 2 * M * 37, 37)[::2]
    packed = kp.pack_in_proj(w, inv, H, Hk, hd, F, False)
    cfg = kp.IN_PROJ_CONFIGS[-1]
    strided = kp.in_proj(xn, packed, pos, H, Hk, hd, F, store_ff=False, config=cfg)[0]
    dense = kp.in_proj(xn, packed, pos.contiguous(), H, Hk, hd, F, store_ff=False, config=cfg)[0]
    assert torch.equal(strided, dense)


_FRESH_WEIGHTS = r"""
import copy, os, sys
import torch
import palm_fast.ops.block as ob
from torch.func import functional_call
import palm_fast
dev = "cuda" if torch.cuda.is_available() else "cpu"
if dev == "cpu":   # the Triton path on CPU tensors (TRITON_INTERPRET=1 is set by the caller)
    ob._IN_IMPLS["cpu"], ob._OUT_IMPLS["cpu"] = ob._in_proj_triton, ob._out_proj_triton
torch.manual_seed(0)
ref = palm_fast.reference.ParallelBlock(dim=64, n_heads=4, head_dim=16, d_ff=256).to(dev)
fast = palm_fast.nn.ParallelBlock.from_reference(copy.deepcopy(ref))
x, w = torch.randn(1, 5, 64, device=dev), ref.in_proj.weight.detach()
worst = 0.0
with torch.no_grad():
    for s in (1.0, 2.0, -1.0, 0.5, 3.0, -2.0):
        got = functional_call(fast, {"in_proj.weight": w * s}, (x,))
        want = functional_call(ref, {"in_proj.weight": w * s}, (x,))
        worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
print(worst)
"""


def test_packed_weight_cache_sees_a_new_tensor_at_the_old_address():
    """A fresh weight per call (torch.func.functional_call: MAML inner loops, ensembles) can
    be allocated where the cached one was, with the same version (0): the cache keyed on
    address and version used the old re-layout (7 of 8 calls wrong). Run in a process whose
    allocator hands freed blocks back (MALLOC_MMAP_THRESHOLD_, as CUDA's caching allocator
    does by design)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4096")
    if not torch.cuda.is_available():   # (on CUDA the script runs the compiled kernels)
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", _FRESH_WEIGHTS], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


def test_cache_keys_compare_tensor_identity():
    t = torch.zeros(4)
    alias = t.detach()          # same address and version counter, another tensor object
    assert ob.same_key(ob.tensor_key(t), ob.tensor_key(t))
    assert not ob.same_key(ob.tensor_key(t), ob.tensor_key(alias))
    import copy
    import pickle

    k = ob.tensor_key(t)
    for c in (copy.deepcopy(k), pickle.loads(pickle.dumps(k))):   # a copied module rebuilds
        assert not ob.same_key(c, ob.tensor_key(t))


def test_compiled_block_on_one_token():
    """torch.compile of the fused block for B * T = 1 (a batch-1 decode step) and 0: it raised
    'may not alias any inputs ... or other returns'."""
    _, fast = _blocks(BLOCK_CONFIGS[0], torch.float32)
    compiled = torch.compile(fast, fullgraph=True, dynamic=False)
    for T in (1, 0):
        x = randn(1, T, BLOCK_CONFIGS[0][2])
        torch.testing.assert_close(compiled(x), fast(x), rtol=1e-5, atol=1e-5)


def test_attention_ignores_autocast():
    """The ops compute in their inputs' dtypes: under a bf16 autocast, SDPA (Hk > 1, or T x hd
    above the C++ kernel's limit) returned bf16 for fp32 inputs, and parallel_block then
    failed in its output GEMM."""
    q, k, v = randn(1, 4, 4, 8), randn(1, 4, 2, 8), randn(1, 4, 2, 8)
    want = causal_mqa_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = causal_mqa_attention(q, k, v)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_cpu_linear_is_one_path_for_every_shape():
    """oneDNN's linear (used until the sixteenth session) keeps a primitive per shape: a CPU
    loop over many sequence lengths grew the process to 9x the reference's memory, and a
    cap on it made results depend on the shapes run before. _linear is MKL's GEMM for every
    shape: bitwise torch.mm (oneDNN differed at e.g. 200 x 512 x 1000)."""
    w = randn(1000, 512)
    for m in (1, 3, 64, 200):
        a = randn(m, 512)
        assert torch.equal(ob._linear(a, w), torch.mm(a, w.t()))


class _LoRA(torch.nn.Module):
    """A hand-written LoRA wrapper of a Linear: no ``.weight`` of its own."""

    def __init__(self, base: torch.nn.Linear, r: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base = base
        self.A = torch.nn.Parameter(torch.randn(r, base.in_features, generator=g) * 0.1)
        self.B = torch.nn.Parameter(torch.randn(base.out_features, r, generator=g) * 0.1)

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t()


@pytest.mark.parametrize("kind", ["block", "model"])
def test_lora_without_a_weight_on_in_proj_runs_the_composed_block(kind):
    """A LoRA wrapper (no ``.weight``) on in_proj: the float64 check read
    ``in_proj.weight`` before the block saw its parts could not fuse, an AttributeError. The
    block runs its composed path: the reference's outputs and gradients, the LoRA's included;
    float64 x is still refused with the block's message."""
    import copy

    import palm_fast

    torch.manual_seed(0)
    if kind == "block":
        ref = RefBlock(dim=32, n_heads=4, head_dim=8, d_ff=64)
        fast = ParallelBlock.from_reference(copy.deepcopy(ref))
        x = randn(2, 7, 32)
    else:
        cfg = palm_fast.get_config("palm-tiny").replace(vocab_size=64, n_layers=2)
        fast = palm_fast.nn.PaLM(cfg)
        ref = palm_fast.reference.PaLM(cfg)
        ref.load_state_dict(fast.state_dict())
        x = torch.randint(0, 64, (2, 7))
    for m in (fast, ref):
        blk = m if kind == "block" else m.blocks[0]
        blk.in_proj = _LoRA(blk.in_proj)
    got, want = fast(x), ref(x)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    got.square().mean().backward()
    want.square().mean().backward()
    grads = dict(ref.named_parameters())
    assert {n for n, _ in fast.named_parameters()} == grads.keys()
    for n, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, rtol=2e-5, atol=2e-5, msg=n)
    assert (fast if kind == "block" else fast.blocks[0]).in_proj.A.grad.abs().max() > 0
    if kind == "block":
        with pytest.raises(TypeError, match="float64"):
            fast(x.double())


def test_block_output_is_not_a_view():
    """The fused block returned a view of the output projection's [B T, d] result. An
    in-place op on it (``y *= 0.5``) then made FSDP2 drop the block's pre-backward hook, so
    its sharded weights were not gathered again for the backward (which failed; FSDP2 also
    warned about the view). The reference block returns ``x + ...``, not a view; so does the
    fast one now, and the in-place op keeps the reference gradients."""
    torch.manual_seed(0)
    ref = RefBlock(dim=32, n_heads=4, head_dim=8, d_ff=64)
    fast = ParallelBlock.from_reference(ref)
    x = randn(2, 5, 32)
    grads = []
    for blk in (ref, fast):
        xi = x.clone().requires_grad_()
        y = blk(xi)
        assert not y._is_view()
        y *= 0.5
        y.square().sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in blk.parameters()])
        blk.zero_grad()
        with torch.no_grad():
            assert not blk(x)._is_view()
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
