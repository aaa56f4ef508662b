"""GPU probe 6: LayerNorm backward with the re-reading tiled form (N=18432) and the single
block (4096 / 8192 / 16384), held vs re-read, warps, tiles; forward at N=4096 variants;
native and compiled baselines in the same process."""
import torch
from triton.testing import do_bench
from palm_fast.fusion import expanders
from palm_fast.fusion.codegen import CompiledGraph
def log(*a): print(*a, flush=True)
M, dt = 16384, torch.bfloat16
def bench(f): return do_bench(f, warmup=25, rep=100)
def copy_bw():
    a = torch.empty(2 ** 28, device="cuda", dtype=torch.uint8); b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a)); return 2 * a.numel() / t / 1e6
bw = copy_bw(); log(f"copy bandwidth {bw:.0f} GB/s")
def ref_bwd(dy, x, w, mean, rstd):
    xhat = (x.float() - mean[:, None]) * rstd[:, None]
    g = dy.float() * w.float()
    c1 = (xhat * g).mean(1, keepdim=True); c2 = g.mean(1, keepdim=True)
    dx = ((g - xhat * c1 - c2) * rstd[:, None]).to(x.dtype)
    return dx, (dy.float() * xhat).sum(0).to(w.dtype)
cref = torch.compile(ref_bwd)
for N in (4096, 8192, 16384, 18432):
    x = torch.randn(M, N, device="cuda", dtype=dt); w = torch.randn(N, device="cuda", dtype=dt)
    dy = torch.randn_like(x)
    y, mean, rstd = torch.ops.aten.native_layer_norm(x, [N], w, None, 1e-5)
    mean, rstd = mean.view(M), rstd.view(M)
    gb = 3 * M * N * 2 / 1e9
    t = bench(lambda: torch.ops.aten.native_layer_norm_backward(dy, x, [N], mean.view(M, 1), rstd.view(M, 1), w, None, [True, True, False]))
    log(f"bwd N={N} native: {t:.4f} ms {gb/t*1e3:.0f} GB/s {gb/t*1e3/bw*100:.1f}%")
    t = bench(lambda: cref(dy, x, w, mean, rstd))
    log(f"bwd N={N} compile: {t:.4f} ms {gb/t*1e3:.0f} GB/s {gb/t*1e3/bw*100:.1f}%")
    variants = [("default", {})]
    for rl in (False, True):
        for nw in (8, 16, 32):
            if N > 16384:
                for tile in (2048, 4096):
                    variants.append((f"rl{rl}-w{nw}-t{tile}", dict(reload=rl, num_warps=nw, tile=tile)))
            else:
                variants.append((f"rl{rl}-w{nw}", dict(reload=rl, num_warps=nw)))
    if N == 16384:
        for nw in (8, 16):
            variants.append((f"tiled-rlTrue-w{nw}-t2048", dict(reload=True, num_warps=nw, tile_min=8192)))
    for name, opts in variants:
        for pps in (2,) if name != "default" else (1, 2, 4):
            cg = CompiledGraph(expanders.layer_norm_bwd(False), "full", partials_per_sm=pps, **opts)
            try:
                t = bench(lambda: cg(dy=dy, x=x, weight=w, mean=mean, rstd=rstd))
            except Exception as e:
                log(f"bwd N={N} {name}: FAILED {type(e).__name__}: {str(e)[:200]}"); continue
            grp = cg.schedule.groups[0]
            log(f"bwd N={N} {name} pps{pps} {cg.variant(grp, N)} reload={cg._reload(grp, False, cg.variant(grp, N)[2])}: {t:.4f} ms {gb/t*1e3:.0f} GB/s {gb/t*1e3/bw*100:.1f}%")
    del x, dy, y
# forward at 4096 (and 8192) vs native
for N in (4096, 8192):
    x = torch.randn(M, N, device="cuda", dtype=dt); w = torch.randn(N, device="cuda", dtype=dt)
    gb = 2 * M * N * 2 / 1e9
    t = bench(lambda: torch.nn.functional.layer_norm(x, (N,), w, None, 1e-5))
    log(f"fwd N={N} native: {t:.4f} ms {gb/t*1e3:.0f} GB/s {gb/t*1e3/bw*100:.1f}%")
    variants = [("default", {})]
    for nw in (4, 8, 16):
        variants.append((f"single-w{nw}", dict(num_warps=nw)))
    for rs in (2, 3, 4):
        for nw in (4, 8, 16):
            variants.append((f"single-rows{rs}-w{nw}", dict(single_rows=rs, num_warps=nw)))
    for rs in (1, 2, 3):
        for nw in (4, 8, 16):
            variants.append((f"tiled-t{N//2}-rows{rs}-w{nw}", dict(tile=N // 2, tile_min=N // 4, row_step=rs, num_warps=nw)))
    for name, opts in variants:
        cg = CompiledGraph(expanders.layer_norm_fwd(False), "full", **opts)
        t = bench(lambda: cg(x=x, weight=w, eps=1e-5))
        grp = cg.schedule.groups[0]
        log(f"fwd N={N} {name} {cg.variant(grp, N)} rows={cg._rows(grp, cg.variant(grp, N)[2])}: {t:.4f} ms {gb/t*1e3:.0f} GB/s {gb/t*1e3/bw*100:.1f}%")
