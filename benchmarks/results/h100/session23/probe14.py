"""GPU probe 14 (twenty-third session): probe 13 found the tiled LayerNorm forward at
N = 18432 faster with 1024-column tiles and 8 warps (410.6 us, 1.018x torch.compile) than
with the default 2048 and 16 (427.8 us, 0.977x). This measures that setting (the new
``tiled_warps`` option) across the tiled range, N in (16384, 32768], bf16, 16384 rows, with
and without a bias, against torch.compile of the reference module; two interleaved rounds.
Run: python benchmarks/results/h100/session23/probe14.py
"""
import statistics

import torch
from triton.testing import do_bench

from palm_fast import reference
from palm_fast.fusion import compile_graph, expanders

M, dt, eps = 16384, torch.bfloat16, 1e-5
CANDIDATES = {"default": {}, "tile 1024, 8 warps": {"tile": 1024, "tiled_warps": 8},
              "tile 2048, 8 warps": {"tiled_warps": 8},
              "tile 1024, 8 warps, 2 rows": {"tile": 1024, "tiled_warps": 8, "row_step": 2}}


def log(*a):
    print(*a, flush=True)


def copy_gbs(nbytes):
    src = torch.empty(nbytes // 2, dtype=dt, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / do_bench(lambda: dst.copy_(src), warmup=25, rep=200) / 1e6


def run(N, bias):
    x = torch.randn(M, N, device="cuda", dtype=dt)
    w = torch.randn(N, device="cuda", dtype=dt)
    b = torch.randn(N, device="cuda", dtype=dt) if bias else None
    graph = expanders.layer_norm_fwd(bias, mean_correction=True)
    inputs = dict(x=x, weight=w, eps=eps, **({"bias": b} if bias else {}))
    fns = {}
    if not bias:
        ref = reference.LayerNorm(N).cuda()
        with torch.no_grad():
            ref.weight.copy_(w.float())
        compiled = torch.compile(ref, dynamic=False)
        fns["compile"] = lambda: compiled(x)
    for name, opts in CANDIDATES.items():
        cg = compile_graph(graph, "full", **opts)
        cg(**inputs)
        fns[name] = lambda cg=cg: cg(**inputs)
    peak = copy_gbs(M * N * 2)
    times = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(2):
            for k, f in fns.items():
                times[k].append(do_bench(f, warmup=25, rep=150))
    med = {k: statistics.median(v) for k, v in times.items()}
    log(f"N={N} bias={bias}: copy {peak:.0f} GB/s")
    for k, t in sorted(med.items(), key=lambda kv: kv[1]):
        vs = f", {med['compile'] / t:.3f}x compile" if "compile" in med else ""
        log(f"  {k}: {t * 1e3:.1f} us, {2 * M * N * 2 / t / 1e6 / peak * 100:.1f}% of copy, "
            f"{med['default'] / t:.3f}x default{vs}")


for N in (18432, 16896, 20480, 24576, 32768):
    run(N, False)
run(18432, True)
