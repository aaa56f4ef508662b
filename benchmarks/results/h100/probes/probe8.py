"""GPU probe 8: LayerNorm forward with streaming cache hints (evict_first row loads, .cs row
stores) at N=4096 / 8192, against native, in one process."""
import torch
from triton.testing import do_bench
import palm_fast.fusion.codegen as cgm
from palm_fast.fusion import expanders
def log(*a): print(*a, flush=True)
def bench(f): return do_bench(f, warmup=25, rep=200)
M, dt = 16384, torch.bfloat16
plain_load, plain_store = cgm._load, cgm._store
def s_load(i, space):
    r = plain_load(i, space)
    return r.replace("other=0.0)", "other=0.0, eviction_policy='evict_first')") if space == "row" else r
def s_store(L, i, space, val):
    n = len(L); plain_store(L, i, space, val)
    if space == "row":
        L[n] = L[n][:-1] + ", cache_modifier='.cs')"
for N in (4096, 8192):
    x = torch.randn(M, N, device="cuda", dtype=dt); w = torch.randn(N, device="cuda", dtype=dt)
    gb = 2 * M * N * 2 / 1e9
    for rep in range(2):
        t0 = bench(lambda: torch.nn.functional.layer_norm(x, (N,), w, None, 1e-5))
        log(f"fwd {N} native {t0:.4f} ms {gb/t0*1e3:.0f} GB/s")
        for mode in ("plain", "evict", "cs", "both"):
            cgm._load = s_load if mode in ("evict", "both") else plain_load
            cgm._store = s_store if mode in ("cs", "both") else plain_store
            for nw in (4, 8):
                cg = cgm.CompiledGraph(expanders.layer_norm_fwd(False), "full", num_warps=nw)
                t = bench(lambda: cg(x=x, weight=w, eps=1e-5))
                log(f"fwd {N} {mode} w{nw}: {t:.4f} ms {gb/t*1e3:.0f} GB/s {t0/t:.3f}x native")
