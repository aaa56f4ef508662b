"""RoPE of q and the shared key head: palm_fast (one fused kernel for q and k) vs the eager
reference (functional.apply_rope on q and on k) vs torch.compile of that reference
(vs Liger's rotary kernel when liger_kernel is importable)."""
from __future__ import annotations

import importlib.util

import torch

from palm_fast.benchmarks.harness import BenchContext, Case, register
from palm_fast.ops import rope
from palm_fast.reference.functional import apply_rope, positions_from_offsets, rope_inv_freq


def _eager(q, k, positions, inv_freq):
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)


def _shapes(ctx: BenchContext):
    if ctx.device == "cuda":
        if ctx.quick:
            return [dict(B=2, T=1024, H=16, Hk=1, D=128), dict(B=2, T=1024, H=48, Hk=1, D=256)]
        return [dict(B=8, T=4096, H=16, Hk=1, D=128), dict(B=8, T=4096, H=48, Hk=1, D=256)]
    return [dict(B=4, T=256 if ctx.quick else 1024, H=16, Hk=1, D=128)]


def _liger_impl():
    """Liger's rotary kernel (q, k as [B, H, T, D]; cos/sin [1, T, D] precomputed), or None."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.ops.rope import LigerRopeFunction

    def run(inp):
        return LigerRopeFunction.apply(inp["q"].transpose(1, 2), inp["k"].transpose(1, 2),
                                       inp["cos"], inp["sin"])
    return run


def _case(ctx: BenchContext, s: dict, mode: str) -> Case:
    dev, dtype, grad = ctx.device, ctx.dtype, mode == "fwdbwd"
    B, T, H, Hk, D = s["B"], s["T"], s["H"], s["Hk"], s["D"]
    es = torch.empty((), dtype=dtype).element_size()
    inv_freq = rope_inv_freq(D, device=dev)
    # Offsets [B] (position = offset + t): palm_fast reads B ints; the references get
    # the equivalent [B, T] positions tensor.
    offsets = torch.zeros(B, dtype=torch.int64, device=dev)
    positions = positions_from_offsets(offsets, T)
    theta = positions[:1].float()[..., None] * inv_freq                  # [1, T, D/2]
    cos = torch.cat((theta.cos(), theta.cos()), -1).to(dtype)            # liger layout [1, T, D]
    sin = torch.cat((theta.sin(), theta.sin()), -1).to(dtype)

    def setup():
        inp = dict(q=torch.randn(B, T, H, D, device=dev, dtype=dtype, requires_grad=grad),
                   k=torch.randn(B, T, Hk, D, device=dev, dtype=dtype, requires_grad=grad),
                   cos=cos, sin=sin)
        if grad:
            inp["gq"] = torch.randn(B, T, H, D, device=dev, dtype=dtype)
            inp["gk"] = torch.randn(B, T, Hk, D, device=dev, dtype=dtype)
        return inp

    def wrap(fn):
        def run(inp):
            outs = fn(inp)
            if grad:
                # autograd.grad, not backward: no accumulation into q.grad between calls
                return torch.autograd.grad(outs, (inp["q"], inp["k"]), (inp["gq"], inp["gk"]))
            return outs
        return run

    compiled = torch.compile(_eager, dynamic=False)   # one compiled function per case
    impls = {
        "palm_fast": wrap(lambda inp: rope(inp["q"], inp["k"], offsets=offsets, inv_freq=inv_freq)),
        "eager": wrap(lambda inp: _eager(inp["q"], inp["k"], positions, inv_freq)),
        "compile": wrap(lambda inp: compiled(inp["q"], inp["k"], positions, inv_freq)),
    }
    liger = _liger_impl() if dev == "cuda" else None   # Liger's kernels are GPU-only
    if liger is not None:
        impls["liger"] = wrap(liger)
    # Read q, k once and write q_out, k_out once, plus the offsets; the backward moves
    # the same bytes again (read grads, write input grads).
    one_pass = 2 * B * T * (H + Hk) * D * es + offsets.numel() * offsets.element_size()
    return Case(name=f"rope.{mode}", shape=dict(s), dtype=dtype, bytes=(2 if grad else 1) * one_pass,
                setup=setup, impls=impls, flops=0, bound="memory")


@register("rope")
def rope_cases(ctx: BenchContext):
    for s in _shapes(ctx):
        for mode in ("fwd", "fwdbwd"):
            yield _case(ctx, s, mode)
