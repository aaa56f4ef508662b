"""GPU probe 13 (twenty-third session): launch variants of the product's LayerNorm forward
(the mean-corrected graph, bf16, 16384 rows) against torch.compile of the reference module
and torch's native kernel, in one process, two interleaved rounds (median of each).
The bench of this session (session23/layer_norm.log) measured the default at 0.0949 /
0.1834 / 0.4251 ms for N = 4096 / 8192 / 18432, compile at 0.1001 / 0.1812 / 0.4168.
Variants: the tiled kernel (tile columns, row_step row loads per step) at each N, and its
warps; at 4096 / 8192 also the single-block kernel's warps.
Run: python benchmarks/results/h100/session23/probe13.py
"""
import statistics

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from palm_fast import reference
from palm_fast.fusion import compile_graph, expanders

M, dt, eps = 16384, torch.bfloat16, 1e-5
graph = expanders.layer_norm_fwd(False, mean_correction=True)


def log(*a):
    print(*a, flush=True)


def copy_gbs(nbytes):
    src = torch.empty(nbytes // 2, dtype=dt, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / do_bench(lambda: dst.copy_(src), warmup=25, rep=200) / 1e6


VARIANTS = {
    4096: [{}, {"num_warps": 4}, {"num_warps": 16},
           {"tile_min": 2048, "tile": 1024, "row_step": 3}, {"tile_min": 2048, "tile": 2048, "row_step": 3},
           {"tile_min": 2048, "tile": 2048, "row_step": 2, "num_warps": 8}],
    8192: [{}, {"num_warps": 16},
           {"tile_min": 4096, "tile": 2048, "row_step": 3}, {"tile_min": 4096, "tile": 2048, "row_step": 2},
           {"tile_min": 4096, "tile": 4096, "row_step": 3},
           {"tile_min": 4096, "tile": 2048, "row_step": 3, "num_warps": 8}],
    18432: [{}, {"row_step": 2}, {"row_step": 4}, {"row_step": 6}, {"num_warps": 8},
            {"row_step": 4, "num_warps": 8}, {"tile": 1024}, {"tile": 1024, "num_warps": 8}, {"tile": 4096},
            {"tile": 4096, "row_step": 4}],
}


def run(N, variants):
    x = torch.randn(M, N, device="cuda", dtype=dt)
    ref = reference.LayerNorm(N).cuda()
    with torch.no_grad():
        ref.weight.normal_()
    w = ref.weight.detach().to(dt)
    compiled = torch.compile(ref, dynamic=False)
    peak = copy_gbs(M * N * 2)
    fns = {"compile": lambda: compiled(x), "native": lambda: F.layer_norm(x, (N,), w, None, eps)}
    want = None
    for opts in variants:
        cg = compile_graph(graph, "full", **opts)
        y = cg(x=x, weight=w, eps=eps)["y"]
        if want is None:
            want = y
        elif not torch.equal(y, want):
            log(f"N={N} {opts}: output differs from the default's "
                f"(max {(y.float() - want.float()).abs().max():.2e})")
        fns[str(opts)] = lambda cg=cg: cg(x=x, weight=w, eps=eps)
    times = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(2):
            for k, f in fns.items():
                times[k].append(do_bench(f, warmup=25, rep=150))
    med = {k: statistics.median(v) for k, v in times.items()}
    log(f"N={N}: copy {peak:.0f} GB/s")
    for k, t in sorted(med.items(), key=lambda kv: kv[1]):
        log(f"  {k}: {t * 1e3:.1f} us, {2 * M * N * 2 / t / 1e6 / peak * 100:.1f}% of copy, "
            f"{med['compile'] / t:.3f}x compile, {med['native'] / t:.3f}x native")


for N, variants in VARIANTS.items():
    run(N, variants)
