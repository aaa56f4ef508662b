"""Parallel-block benchmark: the fused block against the eager reference, the serial block
(same weights) and ``torch.compile`` of the reference.

Cases:

* ``block.fwd`` / ``block.fwdbwd``: one block on ``x [B, T, d]`` (fwdbwd: gradients of x and
  every weight). Implementations ``palm_fast`` (``palm_fast.nn.ParallelBlock``), ``eager``
  (``palm_fast.reference.ParallelBlock``), ``serial`` (``SerialBlock.from_parallel``, same
  weights: PaLM's ~15% parallel-vs-serial claim), ``compile`` (``torch.compile`` of the
  reference; CUDA only: compiling it on our 2-core CPU costs about a minute). On CPU the
  default run times fwdbwd in fp32 only (the reference's half-precision GEMMs without CPU
  matrix units take seconds per call there).
* ``block.out_proj``: the output GEMM over ``[o | h]`` with the residual epilogue
  (``palm_fast``) against two accumulating ``addmm`` (cuBLAS on CUDA: the alternative backend)
  and the plain ``matmul`` of the concatenated shape.
* ``block.in_proj``: the input GEMM with its RoPE + SwiGLU epilogue (``palm_fast``; CUDA:
  the Triton epilogue GEMM for the SwiGLU columns and, as the block runs it, a library GEMM +
  the RoPE kernel for q / k / v; CPU: ATen GEMM + C++ epilogues) against the plain ``matmul``
  of the same shape (``xn @ W_in^T``, no epilogue); on CUDA also ``palm_fast_fused_rope``,
  the epilogue GEMM's own RoPE region for q / k / v.
* ``block.attention.fwdbwd`` (CPU only): causal MQA attention forward + backward at head dim
  16 (B=2, T=256, H=8), where the CPU path is our C++ kernel (``palm_fast::mqa_attention``),
  against ATen's SDPA with the broadcast k/v head and the eager reference ``attention``.

FLOPs are model FLOPs as PaLM counts them (Appendix B): per token ``2 N_block + 4 H hd T``
forward (the full T x T score matrix), three times that for forward + backward; the
attention case likewise (``12 B H T^2 hd``: a causal kernel executes about half). TFLOP/s
is reported against the matmul peak measured in the same run (``pct_of_peak``).

Shapes: CUDA d=2048, H=16, hd=128, F=8192, B=8 x T=2048 (16384 tokens); CPU the palm-small
block (d=256, H=4, hd=64, F=1024) on 1 x 64 tokens (32 with ``--quick``).
"""
from __future__ import annotations

import torch

from palm_fast.benchmarks.harness import BenchContext, Case, register


def _shape(ctx: BenchContext) -> dict:
    if ctx.device == "cuda":
        B, T = (2, 2048) if ctx.quick else (8, 2048)
        s = dict(B=B, T=T, d=2048, H=16, Hk=1, hd=128, F=8192)
    else:
        s = dict(B=1, T=32 if ctx.quick else 64, d=256, H=4, Hk=1, hd=64, F=1024)
    if ctx.config:   # --config PRESET: that model's block, at the default token count
        from palm_fast import get_config

        c = get_config(ctx.config)
        T = min(s["T"], c.max_seq_len)
        s = dict(B=s["B"] * s["T"] // T, T=T, d=c.d_model, H=c.n_heads, Hk=c.n_kv_heads,
                 hd=c.head_dim, F=c.d_ff)
    return s


def _block_flops(s: dict) -> float:
    """Forward model FLOPs of one block (PaLM Appendix B, attention over the full T x T)."""
    d, H, Hk, hd, F = s["d"], s["H"], s["Hk"], s["hd"], s["F"]
    n_block = d * (H * hd + 2 * Hk * hd) + H * hd * d + 3 * d * F
    tokens = s["B"] * s["T"]
    return tokens * (2 * n_block + 4 * H * hd * s["T"])


@register("block")
def block_cases(ctx: BenchContext):
    from palm_fast.nn import ParallelBlock
    from palm_fast.reference import ParallelBlock as RefBlock
    from palm_fast.reference import SerialBlock

    s = _shape(ctx)
    B, T, d, H, Hk, hd, F = (s[k] for k in ("B", "T", "d", "H", "Hk", "hd", "F"))
    dev, dt = ctx.device, ctx.dtype
    torch.manual_seed(0)
    ref = RefBlock(d, H, hd, F, Hk).to(device=dev, dtype=dt)
    fast = ParallelBlock(d, H, hd, F, Hk).to(device=dev, dtype=dt)
    fast.load_state_dict(ref.state_dict())
    serial = SerialBlock.from_parallel(ref)
    blocks = {"palm_fast": fast, "eager": ref, "serial": serial}
    if dev == "cuda":   # compiling the block on a 2-core CPU takes about a minute
        blocks["compile"] = torch.compile(ref, dynamic=False)
    elem = torch.empty((), dtype=dt).element_size()
    flops = _block_flops(s)
    params = sum(p.numel() for p in ref.parameters())

    def setup_fwd():
        return torch.randn(B, T, d, device=dev, dtype=dt)

    def fwd(block):
        def run(x):
            with torch.no_grad():
                return block(x)
        return run

    yield Case(name="block.fwd", shape=s, dtype=dt, bytes=(2 * B * T * d + params) * elem,
               flops=flops, bound="compute", setup=setup_fwd,
               impls={name: fwd(b) for name, b in blocks.items()})

    def setup_fwdbwd():
        x = torch.randn(B, T, d, device=dev, dtype=dt, requires_grad=True)
        return x, torch.randn(B, T, d, device=dev, dtype=dt)

    def fwdbwd(block):
        weights = list(block.parameters())

        def run(inputs):
            x, g = inputs
            return torch.autograd.grad(block(x), [x, *weights], g)
        return run

    if dev == "cpu" and dt != torch.float32 and not ctx.quick:
        # The eager reference's half-precision GEMMs on a CPU without bf16/fp16 matrix units
        # take seconds per block backward (ATen's fallback): too slow for the default suite.
        yield from _in_proj_case(ctx, s, fast)
        yield from _out_proj_case(ctx, s, fast)
        return
    yield Case(name="block.fwdbwd", shape=s, dtype=dt, bytes=(4 * B * T * d + 3 * params) * elem,
               flops=3 * flops, bound="compute", setup=setup_fwdbwd,
               impls={name: fwdbwd(b) for name, b in blocks.items()})

    yield from _in_proj_case(ctx, s, fast)
    yield from _out_proj_case(ctx, s, fast)
    if dev == "cpu":
        yield from _cpu_attention_case(ctx)


def _cpu_attention_case(ctx: BenchContext):
    """CPU causal MQA attention forward + backward where ``causal_mqa_attention`` runs our
    C++ kernel (``palm_fast::mqa_attention``, T * hd <= ``CPU_MQA_MAX_KV``): PaLM-pytorch's
    dim_head 16 (``bench_patch``) and the palm-small training shape (hd 64, 4 heads), vs
    ``sdpa`` (ATen's SDPA with the k/v head broadcast as a stride-0 view: what the block
    uses past the bound) and the eager reference ``attention``."""
    from palm_fast.ops import block as ob

    shapes = [(1, 128, 8, 16)] if ctx.quick else [(2, 256, 8, 16), (2, 128, 4, 64)]
    for B, T, H, hd in shapes:
        assert T * hd <= ob.CPU_MQA_MAX_KV
        yield _cpu_attention_shape(ctx, B, T, H, hd)


def _cpu_attention_shape(ctx: BenchContext, B: int, T: int, H: int, hd: int):
    import torch.nn.functional as F

    from palm_fast.ops import causal_mqa_attention
    from palm_fast.reference import attention

    dt = ctx.dtype
    elem = torch.empty((), dtype=dt).element_size()

    def setup():
        q = torch.randn(B, T, H, hd, dtype=dt, requires_grad=True)
        k = torch.randn(B, T, 1, hd, dtype=dt, requires_grad=True)
        v = torch.randn(B, T, 1, hd, dtype=dt, requires_grad=True)
        return q, k, v, torch.randn(B, T, H, hd, dtype=dt)

    def sdpa(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k.expand(B, T, H, hd), v.expand(B, T, H, hd)))
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)

    def fwdbwd(fn):
        def run(inputs):
            q, k, v, g = inputs
            return torch.autograd.grad(fn(q, k, v), (q, k, v), g)
        return run

    return Case(name="block.attention.fwdbwd", shape=dict(B=B, T=T, H=H, hd=hd), dtype=dt,
               bytes=(4 * B * T * H * hd + 4 * B * T * hd) * elem,
               flops=3 * 4 * B * H * T * T * hd, bound="compute", setup=setup,
               impls={"palm_fast": fwdbwd(causal_mqa_attention), "sdpa": fwdbwd(sdpa),
                      "eager": fwdbwd(lambda q, k, v: attention(q, k, v))})


def _in_proj_case(ctx: BenchContext, s: dict, fast):
    """The input GEMM with its epilogue vs the plain matmul of the same shape."""
    from palm_fast.kernels import projection as kp
    from palm_fast.ops import block as ob

    B, T, d, H, Hk, hd, F = (s[k] for k in ("B", "T", "d", "H", "Hk", "hd", "F"))
    dev, dt = ctx.device, ctx.dtype
    elem = torch.empty((), dtype=dt).element_size()
    M = B * T
    w_in = fast.in_proj.weight.detach()
    n_in = w_in.shape[0]
    inv_freq = fast.rotary.inv_freq

    def setup_in():
        return (torch.randn(M, d, device=dev, dtype=dt),
                torch.arange(T, device=dev).repeat(B))

    if dev == "cuda":
        packed = fast._packed_in_proj()
        # what the block runs (ops.block._in_proj_triton): q / k / v through a library GEMM
        # + the RoPE kernel when kp.QKV_VIA_GEMM, else the epilogue GEMM's RoPE region
        qkv = (dict(qkv_weight=w_in[:(H + 2 * Hk) * hd], inv_freq=inv_freq,
                    interleaved=fast.rotary.interleaved) if kp.QKV_VIA_GEMM else {})

        def epilogue(inputs):
            xn, pos = inputs
            return kp.in_proj(xn, packed, pos, H, Hk, hd, F, store_ff=False, **qkv)

        def epilogue_fused_rope(inputs):
            xn, pos = inputs
            return kp.in_proj(xn, packed, pos, H, Hk, hd, F, store_ff=False)
        extra = {"palm_fast_fused_rope": epilogue_fused_rope} if qkv else {}
    else:
        def epilogue(inputs):
            xn, pos = inputs
            return ob.in_proj_epilogue_aten(xn, w_in, inv_freq, pos, H, Hk, hd, F, False)
        extra = {}

    def matmul(inputs):
        return torch.mm(inputs[0], w_in.t())

    yield Case(name="block.in_proj", shape=dict(M=M, K=d, N=n_in), dtype=dt,
               bytes=(M * d + n_in * d + M * (H * hd + 2 * Hk * hd + F)) * elem,
               flops=2 * M * d * n_in, bound="compute", setup=setup_in,
               impls={"palm_fast": epilogue, **extra, "matmul": matmul})


def _out_proj_case(ctx: BenchContext, s: dict, fast):
    """The output GEMM with its residual epilogue (``palm_fast``: Triton on CUDA, two
    accumulating ATen addmm on CPU) vs ``addmm`` (two cuBLAS/ATen addmm into the residual:
    the alternative backend) vs the plain ``matmul`` of the concatenated shape."""
    from palm_fast.ops import block as ob

    B, T, d, H, hd, F = (s[k] for k in ("B", "T", "d", "H", "hd", "F"))
    dev, dt = ctx.device, ctx.dtype
    elem = torch.empty((), dtype=dt).element_size()
    M, K = B * T, H * hd + F
    wo, wf = fast.attn_out.weight.detach(), fast.ff_out.weight.detach()
    w_cat = torch.cat((wo, wf), dim=1)

    def setup():
        oh = torch.randn(M, K, device=dev, dtype=dt)
        return oh, torch.randn(M, d, device=dev, dtype=dt)

    impl = ob._OUT_IMPLS[dev]

    def ours(inputs):
        oh, x = inputs
        return impl(oh[:, :H * hd], oh[:, H * hd:], x, wo, wf)

    def addmm(inputs):
        oh, x = inputs
        return torch.addmm(x, oh[:, :H * hd], wo.t()).addmm_(oh[:, H * hd:], wf.t())

    def matmul(inputs):
        return torch.mm(inputs[0], w_cat.t())

    yield Case(name="block.out_proj", shape=dict(M=M, K=K, N=d), dtype=dt,
               bytes=(M * K + d * K + 2 * M * d) * elem, flops=2 * M * K * d, bound="compute",
               setup=setup, impls={"palm_fast": ours, "addmm": addmm, "matmul": matmul})
