"""Compile palm_fast's Triton launches for a GPU, without a GPU.

The launchers run on CPU tensors in compile-only mode (``palm_fast.kernels._common.
compile_only``): they choose their GPU configuration (tiles, warps, split counts for the
target's SM count, bf16 ``tl.dot`` operands, libdevice trig) and launch as usual, while this
script has Triton compile each launch for the target through ptxas instead of running it
(a stand-in driver reports the target; ``JITFunction.run`` is made a warm-up). The
interpreter tests check what the kernels compute; this checks that what a GPU would run
lowers at all, and within the target's shared memory.

Run without ``TRITON_INTERPRET``::

    python tests/lower_for_gpu.py [--cc 90] [--sms 132] [--family decode ...]

Prints one JSON object per compiled kernel (family, case, kernel name, shared memory bytes,
warps, wgmma and async-wait counts in its TTGIR, FMAs in its PTX, registers per thread and
stack bytes, i.e. register spills, from ``cuobjdump``), then a summary object. ``tests/
test_lowering.py`` runs it and checks the report.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("lower_for_gpu.py: unset TRITON_INTERPRET (kernels must compile for the GPU)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _TargetDriver:
    """What ``JITFunction.run`` asks of the active driver before it compiles."""

    def __init__(self, cc: int):
        self.target = GPUTarget("cuda", cc, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


def _cuobjdump() -> str | None:
    """Triton's bundled cuobjdump (else one on PATH); None without one."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.isfile(path) else shutil.which("cuobjdump")


_CUOBJDUMP = _cuobjdump()


def _resources(cubin: bytes | None) -> dict:
    """Registers per thread and stack bytes (register spills) of a compiled kernel, from
    ``cuobjdump --dump-resource-usage`` of its cubin; None each without cuobjdump."""
    if not (_CUOBJDUMP and cubin):
        return {"regs": None, "stack": None}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"regs": int(m.group(1)), "stack": int(m.group(2))} if m else {"regs": None, "stack": None}


_REPORT: list[dict] = []
_SEEN: set[int] = set()
_CASE = {"family": "", "case": ""}
_run = JITFunction.run


def _compile_instead(self, *args, grid, warmup, **kwargs):
    """``JITFunction.run`` as a warm-up: compile (or fetch from the cache) and record."""
    t0 = time.perf_counter()
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    if id(kernel) not in _SEEN:  # one record per distinct compiled kernel
        _SEEN.add(id(kernel))
        ir = kernel.asm.get("ttgir", "")
        _REPORT.append(dict(_CASE, kernel=self.fn.__name__, shared=kernel.metadata.shared,
                            num_warps=kernel.metadata.num_warps, wgmma=ir.count("warp_group_dot"),
                            async_wait=ir.count("async_wait"),
                            fma=kernel.asm.get("ptx", "").count("fma.rn.f32"),
                            **_resources(kernel.asm.get("cubin")),
                            seconds=round(time.perf_counter() - t0, 2)))
        print(json.dumps(_REPORT[-1]), flush=True)
    return kernel


def _case(family: str, case: str) -> None:
    _CASE.update(family=family, case=case)


def _empty(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype)


# ------------------------------------------------------------------------------ families

def decode() -> None:
    """Split-KV decode and its combine (the bench shapes, odd head dims, fp16 / fp32
    caches, the shared-prefix passes with the merge in the combine), RoPE + append."""
    from palm_fast.kernels import mqa_decode as kd

    page = 256
    for H, hd in ((48, 256), (16, 128), (8, 64), (12, 80)):  # (head dim 96 lowers as 80 does)
        for B, T in ((1, 4096), (1, 32768), (8, 4096), (8, 32768), (64, 4096), (64, 32768)):
            if hd not in (256, 128) and (B, T) != (8, 4096):
                continue
            for paged in (True, False) if hd in (256, 128) else (True,):
                _case("decode", f"bf16 H={H} hd={hd} B={B} T={T} paged={paged}")
                n_pages = T // page
                kc = _empty(1, B * n_pages if paged else B, page if paged else T, hd)
                pt = torch.arange(B * n_pages, dtype=torch.int32).view(B, n_pages) if paged else None
                ends = torch.full((B,), T - 3, dtype=torch.int32)
                kd.mqa_decode(_empty(B, H, hd), kc, kc, pt, None, ends, 0, hd ** -0.5, True)
    for dt in (torch.float16, torch.float32):
        _case("decode", f"{dt} H=16 hd=128 B=8 T=4096 paged")
        kc = _empty(2, 128, 256, 128, dtype=dt)
        pt = torch.arange(128, dtype=torch.int32).view(8, 16)
        ends = torch.full((8,), 4000, dtype=torch.int32)
        kd.mqa_decode(_empty(8, 16, 128, dtype=dt), kc, kc, pt, None, ends, 1, 0.088, dt == torch.float32)
    for hd, paged in ((256, True), (256, False), (128, True), (128, False)):
        # fp32 caches with 48 heads (64-row tiles): the largest tiles
        _case("decode", f"{torch.float32} H=48 hd={hd} B=8 T=4096 paged={paged}")
        kc = _empty(1, 128 if paged else 8, 256 if paged else 4096, hd, dtype=torch.float32)
        pt = torch.arange(128, dtype=torch.int32).view(8, 16) if paged else None
        ends = torch.full((8,), 4000, dtype=torch.int32)
        kd.mqa_decode(_empty(8, 48, hd, dtype=torch.float32), kc, kc, pt, None, ends, 0, hd ** -0.5, False)
    # shared prefix: 64 sequences over one 4096-token prefix (all their rows in one pass),
    # then each sequence's suffix with the prefix merged in by the combine kernel
    for H, hd in ((48, 256), (16, 128)):
        _case("decode", f"shared prefix H={H} hd={hd} 64 x (4096 + 128)")
        kc = _empty(1, 64 * 2 + 16, page, hd)
        pre_table = torch.arange(16, dtype=torch.int32).view(1, 16)
        starts = torch.zeros(1, dtype=torch.int32)
        o_pre, lse_pre = kd.mqa_decode(_empty(1, 64 * H, hd), kc, kc, pre_table, starts,
                                       torch.full((1,), 4096, dtype=torch.int32), 0, hd ** -0.5, True)
        table = torch.arange(16, 16 + 64 * 2, dtype=torch.int32).view(64, 2)
        kd.mqa_decode(_empty(64, H, hd), kc, kc, table, torch.zeros(64, dtype=torch.int32),
                      torch.full((64,), 129, dtype=torch.int32), 0, hd ** -0.5, False,
                      prefix=(o_pre.view(64, H, hd), lse_pre.view(64, H), torch.zeros(64, dtype=torch.int32)))
    for H, hd, paged, inter, pos in ((48, 256, True, False, False), (16, 128, False, True, True),
                                     (0, 128, True, False, False)):
        _case("decode", f"rope_append H={H} hd={hd} paged={paged} interleaved={inter} positions={pos}")
        B, T = 8, 1
        kc = _empty(2, 64 if paged else B, page if paged else 4096, hd)
        pt = torch.arange(64, dtype=torch.int32).view(B, 8) if paged else None
        kd.rope_append(_empty(B, T, H, hd), _empty(B, T, 1, hd), _empty(B, T, 1, hd), kc, kc, pt,
                       torch.full((B,), 100, dtype=torch.int32), torch.ones(B, dtype=torch.int32),
                       torch.full((B, T), 100, dtype=torch.int64) if pos else None,
                       torch.rand(hd // 2), 1, inter)


def rope() -> None:
    """The RoPE kernel: rotate-half and interleaved, partial rotary, inverse, in place."""
    from palm_fast.kernels import rope as kr

    for dt, H, Hk, D, half, inter, inverse in ((torch.bfloat16, 16, 1, 128, 64, False, False),
                                                (torch.bfloat16, 48, 1, 256, 128, True, True),
                                                (torch.float16, 8, 8, 96, 16, False, False),
                                                (torch.float32, 16, 1, 128, 64, False, False)):
        _case("rope", f"{dt} H={H} Hk={Hk} D={D} half={half} interleaved={inter} inverse={inverse}")
        q, k = _empty(4, 1024, H, D, dtype=dt), _empty(4, 1024, Hk, D, dtype=dt)
        kr.rope(q, k, torch.rand(half), torch.zeros(4, dtype=torch.int64), pos_is_offset=True,
                interleaved=inter, inverse=inverse)
        kr.rope(q, k, torch.rand(half), torch.zeros(4, 1024, dtype=torch.int32), pos_is_offset=False,
                interleaved=inter, q_out=q, k_out=k)


def swiglu() -> None:
    from palm_fast.kernels import swiglu as ks

    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for rows, F in ((16384, 8192), (1, 1000)):
            _case("swiglu", f"{dt} rows={rows} F={F}")
            x = _empty(rows, 2 * F, dtype=dt)
            ks.swiglu_fwd(x)
            ks.swiglu_bwd(_empty(rows, F, dtype=dt), x)


def projection() -> None:
    """Every config of both epilogue GEMMs (bf16; fp32 refitted to shared memory, with K
    tails masked), the separate-weights layout, the SwiGLU TMA kernel, and the q / k / v
    columns through a library GEMM + the RoPE kernel."""
    import dataclasses

    from palm_fast.kernels import projection as kp

    H, Hk, hd, F, M = 16, 1, 128, 8192, 4096
    inv_freq = torch.rand(hd // 2)
    for dt, d in ((torch.bfloat16, 2048), (torch.float32, 2000)):
        w_in = torch.zeros((H + 2 * Hk) * hd + 2 * F, d, dtype=dt)
        packed = kp.pack_in_proj(w_in, inv_freq, H, Hk, hd, F, interleaved=False)
        xn, pos = _empty(M, d, dtype=dt), torch.zeros(M, dtype=torch.int64)
        configs = kp.IN_PROJ_CONFIGS if dt == torch.bfloat16 else kp.IN_PROJ_CONFIGS[:1]
        for i, c in enumerate(configs):
            _case("projection", f"in_proj config {i} {dt} K={d}")
            kp.in_proj(xn, packed, pos, H, Hk, hd, F, store_ff=True, config=c, tma=False)
        if dt == torch.bfloat16:
            _case("projection", f"in_proj config 0 {dt} separate weights")
            sep = dataclasses.replace(packed, w_a=packed.w_a.contiguous(), w_b=packed.w_b.contiguous())
            kp.in_proj(xn, sep, pos, H, Hk, hd, F, store_ff=False, config=configs[0], tma=False)
        o, h, x = _empty(M, H * hd, dtype=dt), _empty(M, F, dtype=dt), _empty(M, d, dtype=dt)
        w_o, w_f = _empty(d, H * hd, dtype=dt), _empty(d, F, dtype=dt)
        for i, c in enumerate(kp.OUT_PROJ_CONFIGS if dt == torch.bfloat16 else kp.OUT_PROJ_CONFIGS[:1]):
            _case("projection", f"out_proj config {i} {dt}")
            kp.out_proj(o, h, x, w_o, w_f, config=c)
    # what the block runs on an H100: q / k / v by a library GEMM + RoPE, SwiGLU by TMA
    w_in = torch.zeros((H + 2 * Hk) * hd + 2 * F, 2048, dtype=torch.bfloat16)
    packed = kp.pack_in_proj(w_in, inv_freq, H, Hk, hd, F, interleaved=True)
    for store_ff in (True, False):
        _case("projection", f"in_proj as the block runs it, store_ff={store_ff}")
        kp.in_proj(_empty(M, 2048), packed, torch.zeros(M, dtype=torch.int64), H, Hk, hd, F,
                   store_ff=store_ff, config=kp.IN_PROJ_CONFIGS[0], qkv_weight=w_in[:(H + 2 * Hk) * hd],
                   inv_freq=inv_freq, interleaved=True, tma=True)


def layer_norm() -> None:
    """The fusion engine's kernels behind LayerNorm, add + LN and RMSNorm (``full`` mode):
    row lengths from 1 to 40000 (single block, tiled, looped), the backward's two stages,
    and the ``mindspore`` grouping the bench also runs."""
    from palm_fast.fusion import Graph, expanders
    from palm_fast.fusion import layer_norm as fl
    from palm_fast.fusion.codegen import compile_graph

    M = 4096
    for N in (1, 17, 1000, 2048, 4096, 6000, 8192, 18432, 40000):
        for dt in ((torch.bfloat16, torch.float16, torch.float32) if N == 4096 else (torch.bfloat16,)):
            for bias in ((False, True) if N in (17, 4096) else (False,)):
                _case("layer_norm", f"LayerNorm N={N} {dt} bias={bias}")
                x, w = _empty(M, N, dtype=dt), _empty(N, dtype=dt)
                b = _empty(N, dtype=dt) if bias else None
                y, mean, rstd = fl.layer_norm_fwd(x, w, b, 1e-5)
                fl.layer_norm_bwd(_empty(M, N, dtype=dt), x, w, mean, rstd, bias)
    for N, three in ((2048, True), (4096, False), (18432, True)):
        _case("layer_norm", f"add + LN N={N} three inputs={three}")
        x = _empty(M, N)
        fl.add_layer_norm_fwd(x, x, x if three else None, _empty(N), None, 1e-5)
    _case("layer_norm", "RMSNorm N=4096")
    x, w = _empty(M, 4096), _empty(4096)
    y, rstd = fl.rms_norm_fwd(x, w, 1e-6)
    fl.rms_norm_bwd(_empty(M, 4096), x, w, rstd)
    mean = rstd = torch.empty(M, dtype=torch.float32)
    _case("layer_norm", "LayerNorm backward N=18432, re-reading form")
    compile_graph(expanders.layer_norm_bwd(False), "full", reload=True)(
        dy=_empty(M, 18432), x=_empty(M, 18432), weight=_empty(18432), mean=mean, rstd=rstd)
    _case("layer_norm", "LayerNorm forward N=4096, mindspore grouping")
    compile_graph(expanders.layer_norm_fwd(False), "mindspore")(x=x, weight=w, eps=1e-5)
    # a generic graph: a column-space output of a row kernel, and scalar math the looped
    # variant's final pass (after its column partials) uses
    g = Graph("generic")
    xi, wi, eps = g.input("x", "row"), g.input("w", "col"), g.input("eps", "scalar")
    w2, e2 = g.mul(wi, g.const(2.0)), g.mul(eps, eps)
    yv = g.mul(g.mul(g.mul(xi, g.rsqrt(g.add(g.sum(g.mul(xi, xi)), e2))), e2), w2)
    g.output("y", yv, "x")
    g.output("w2", w2)
    g.output("cs", g.sum(yv, axis="col"))
    for N in (4096, 40000):
        _case("layer_norm", f"generic graph N={N}")
        compile_graph(g, "full")(x=_empty(M, N), w=_empty(N), eps=1e-5)
    # scalar casts / compares, an infinite constant, scalar math in two kernels
    g = Graph("scalars")
    xi, e = g.input("x", "row"), g.input("e", "scalar")
    s = g.mul(g.cast(e, "float16"), g.binary("gt", e, g.const(0.0)))
    g.output("m", g.max(g.where(g.binary("gt", xi, g.const(0.0)), xi, g.const(float("-inf")))))
    g.output("c", g.mul(g.sum(xi, "col"), s))
    g.output("y", g.mul(xi, s))
    # div / sqrt (round-to-nearest forms) between every pair of spaces
    sq = g.binary("div", g.unary("sqrt", g.add(g.unary("abs", xi), e)), g.add(g.sum(g.unary("abs", xi)), e))
    g.output("d", g.binary("div", sq, g.unary("sqrt", g.binary("div", e, g.const(3.0)))))
    g.output("dc", g.binary("div", g.sum(xi, "col"), e))
    for N in (4096, 40000):
        _case("layer_norm", f"scalar math N={N}")
        compile_graph(g, "full")(x=_empty(M, N), e=0.5)


FAMILIES = {f.__name__: f for f in (decode, rope, swiglu, projection, layer_norm)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cc", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    ap.add_argument("--sms", type=int, default=132, help="SM count the launchers plan grids for")
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES),
                    help="kernel families to compile (default: all); repeatable")
    args = ap.parse_args(argv)

    from palm_fast.kernels import _common

    _driver.set_active(_TargetDriver(args.cc))
    JITFunction.run = _compile_instead
    _common.compile_only((args.sms, divmod(args.cc, 10)))
    t0 = time.perf_counter()
    for name in args.family or list(FAMILIES):
        FAMILIES[name]()
    print(json.dumps({"summary": True, "kernels": len(_REPORT), "cc": args.cc, "sms": args.sms,
                      "triton": triton.__version__, "torch": torch.__version__,
                      "max_shared": max((r["shared"] for r in _REPORT), default=0),
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
