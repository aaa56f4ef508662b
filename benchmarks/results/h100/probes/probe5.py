"""GPU probe 5: LN forward at N=18432: tiled with several rows per step; the looped variant."""
import torch
from triton.testing import do_bench
from palm_fast.fusion import expanders
from palm_fast.fusion.codegen import CompiledGraph
def log(*a): print(*a, flush=True)
M, N, dt = 16384, 18432, torch.bfloat16
x = torch.randn(M, N, device="cuda", dtype=dt); w = torch.randn(N, device="cuda", dtype=dt)
a = torch.randn_like(x); m = torch.randn_like(x)
gb = 2 * M * N * 2 / 1e9
variants = [("default", {})]
for tile in (2048, 4096):
    for rs in (1, 2, 3):
        for nw in (16, 32):
            variants.append((f"tile{tile}-rows{rs}-w{nw}", dict(tile=tile, row_step=rs, num_warps=nw)))
for lb in (2048, 4096):
    for nw in (8, 16):
        variants.append((f"looped{lb}-w{nw}", dict(max_block=8192, max_tiled=0, loop_block=lb, num_warps=nw)))
for name, opts in variants:
    cg = CompiledGraph(expanders.layer_norm_fwd(False), "full", **opts)
    t = do_bench(lambda: cg(x=x, weight=w, eps=1e-5), warmup=10, rep=60)
    grp = cg.schedule.groups[0]
    log(f"LN fwd N={N} {name} {cg.variant(grp, N)} rows={cg._rows(grp, cg.variant(grp, N)[2])}: {t:.4f} ms {gb/t*1e3:.0f} GB/s")
for name, opts in (("default", {}), ("rows1", dict(row_step=1))):
    cg = CompiledGraph(expanders.add_layer_norm_fwd(True, False), "full", **opts)
    t = do_bench(lambda: cg(x=x, a=a, m=m, weight=w, eps=1e-5), warmup=10, rep=60)
    log(f"addLN N={N} {name}: {t:.4f} ms {5*M*N*2/1e9/t*1e3:.0f} GB/s")
