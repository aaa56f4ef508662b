"""SwiGLU benchmark: palm_fast vs the eager reference vs torch.compile of it (vs Liger).

Cases ``swiglu.fwd`` and ``swiglu.fwdbwd`` on ``x [tokens, 2F]`` (value | gate).
Minimal traffic per row: forward reads 2F and writes F elements; the backward
reads grad_out (F) and x (2F) and writes grad_x (2F), so fwd+bwd moves 8F.
"""
from __future__ import annotations

import torch

from palm_fast.benchmarks.harness import BenchContext, Case, register
from palm_fast.reference import functional


def _liger_swiglu():
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return None

    def fn(x):
        # Liger takes separate gate / value tensors and makes them contiguous
        # itself (ensure_contiguous): that copy is its real cost when fed from
        # a fused [..., 2F] projection, so it is timed.
        value, gate = x.chunk(2, dim=-1)
        return LigerSiLUMulFunction.apply(gate, value)

    return fn


def _shape(ctx: BenchContext) -> tuple[int, int]:
    if ctx.device == "cuda":
        return (4096, 4096) if ctx.quick else (16384, 8192)
    return (1024, 4096) if ctx.quick else (4096, 4096)


@register("swiglu")
def swiglu_cases(ctx: BenchContext):
    from palm_fast.ops import swiglu

    tokens, F = _shape(ctx)
    elem = torch.empty((), dtype=ctx.dtype).element_size()
    shape = {"tokens": tokens, "F": F}
    fns = {"palm_fast": swiglu, "eager": functional.swiglu,
           "compile": torch.compile(functional.swiglu, dynamic=False)}
    liger = _liger_swiglu() if ctx.device == "cuda" else None
    if liger is not None:
        fns["liger"] = liger

    def setup_fwd():
        return torch.randn(tokens, 2 * F, device=ctx.device, dtype=ctx.dtype)

    yield Case(
        name="swiglu.fwd", shape=shape, dtype=ctx.dtype, bytes=3 * tokens * F * elem,
        setup=setup_fwd, impls={name: (lambda x, f=f: f(x)) for name, f in fns.items()},
    )

    def setup_fwdbwd():
        x = torch.randn(tokens, 2 * F, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
        grad = torch.randn(tokens, F, device=ctx.device, dtype=ctx.dtype)
        return x, grad

    def fwdbwd(f):
        def run(inputs):
            x, grad = inputs
            return torch.autograd.grad(f(x), x, grad)
        return run

    yield Case(
        name="swiglu.fwdbwd", shape=shape, dtype=ctx.dtype, bytes=8 * tokens * F * elem,
        setup=setup_fwdbwd, impls={name: fwdbwd(f) for name, f in fns.items()},
    )
