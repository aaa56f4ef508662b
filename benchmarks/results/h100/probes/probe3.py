"""GPU probe 3: LayerNorm long-row variants (tiled vs single vs looped), and the host cost
of the op's forward+backward path."""
import cProfile, io, os, pstats, sys, time
import torch
from triton.testing import do_bench
from palm_fast.fusion import expanders
from palm_fast.fusion.codegen import CompiledGraph
from palm_fast.ops import layer_norm

def log(*a):
    print(*a, flush=True)

def bench(fn):
    return do_bench(fn, warmup=10, rep=60)

dev = "cuda"
M = 16384
dt = torch.bfloat16
which = sys.argv[1:] or ["fwd", "bwd", "host"]

if "fwd" in which:
    for N in (4096, 8192, 18432):
        x = torch.randn(M, N, device=dev, dtype=dt); w = torch.randn(N, device=dev, dtype=dt)
        gb = 2 * M * N * 2 / 1e9
        variants = [("default", {})]
        if N == 18432:
            variants.append(("single32768-w16", dict(max_tiled=0)))
            variants.append(("single32768-w32", dict(max_tiled=0, num_warps=32)))
            for tile in (1024, 2048, 4096):
                for nw in (8, 16, 32):
                    variants.append((f"tile{tile}-w{nw}", dict(tile=tile, num_warps=nw)))
        for name, opts in variants:
            cg = CompiledGraph(expanders.layer_norm_fwd(False), "full", **opts)
            f = lambda: cg(x=x, weight=w, eps=1e-5)
            try:
                t = bench(f)
            except Exception as e:
                log("ERR", N, name, repr(e)[:300]); continue
            log(f"LN fwd N={N} {name} {cg.variant(cg.schedule.groups[0], N)}: {t:.4f} ms {gb/t*1e3:.0f} GB/s")
        tt = bench(lambda: torch.nn.functional.layer_norm(x, (N,), w))
        log(f"LN fwd N={N} torch {tt:.4f} ms {gb/tt*1e3:.0f} GB/s")
        # add + LN
        a = torch.randn_like(x); m = torch.randn_like(x)
        gba = 5 * M * N * 2 / 1e9
        for name, opts in ([("default", {}), ("old", dict(max_tiled=0))] if N == 18432 else [("default", {})]) + \
                ([("tile2048-w32", dict(num_warps=32))] if N == 18432 else []):
            cg = CompiledGraph(expanders.add_layer_norm_fwd(True, False), "full", **opts)
            t = bench(lambda: cg(x=x, a=a, m=m, weight=w, eps=1e-5))
            log(f"addLN fwd N={N} {name}: {t:.4f} ms {gba/t*1e3:.0f} GB/s")
        del x, a, m

if "bwd" in which:
    for N in (8192, 16384, 18432):
        x = torch.randn(M, N, device=dev, dtype=dt); w = torch.randn(N, device=dev, dtype=dt)
        dy = torch.randn_like(x)
        mean = x.float().mean(1); rstd = torch.rsqrt(x.float().var(1, unbiased=False) + 1e-5)
        gb = 3 * M * N * 2 / 1e9
        tn = bench(lambda: torch.ops.aten.native_layer_norm_backward(dy, x, [N], mean.view(M, 1), rstd.view(M, 1), w, None, [True, True, False]))
        log(f"LN bwd N={N} aten {tn:.4f} ms {gb/tn*1e3:.0f} GB/s")
        variants = [("default", {}), ("looped", dict(max_tiled_partial=0))]
        for tile in (1024, 2048):
            for nw in (16, 32):
                for pps in (1, 2):
                    variants.append((f"tile{tile}-w{nw}-pps{pps}", dict(tile=tile, num_warps=nw, partials_per_sm=pps,
                                                                       tile_min=4096, max_tiled_partial=32768)))
        for name, opts in variants:
            cg = CompiledGraph(expanders.layer_norm_bwd(False), "full", **opts)
            f = lambda: cg(dy=dy, x=x, weight=w, mean=mean, rstd=rstd)
            try:
                t = bench(f)
            except Exception as e:
                log("ERR", N, name, repr(e)[:300]); continue
            log(f"LN bwd N={N} {name} {cg.variant(cg.schedule.groups[0], N)}: {t:.4f} ms {gb/t*1e3:.0f} GB/s")
        del x, dy

if "host" in which:
    N = 4096
    x = torch.randn(M, N, device=dev, dtype=dt, requires_grad=True); dy = torch.randn(M, N, device=dev, dtype=dt)
    w = torch.randn(N, device=dev, dtype=dt, requires_grad=True)
    fns = {
        "palm_fast_fwdbwd": lambda: torch.autograd.grad(layer_norm(x, w, None, 1e-5), (x, w), dy),
        "torch_fwdbwd": lambda: torch.autograd.grad(torch.nn.functional.layer_norm(x, (N,), w, None, 1e-5), (x, w), dy),
        "palm_fast_fwd_nograd": lambda: layer_norm(x.detach(), w.detach(), None, 1e-5),
        "palm_fast_fwd_grad": lambda: layer_norm(x, w, None, 1e-5),
    }
    for name, f in fns.items():
        for _ in range(5): f()
        torch.cuda.synchronize()
        t = bench(f)
        n = 200
        t0 = time.perf_counter()
        for _ in range(n): f()
        th = (time.perf_counter() - t0) / n * 1e3
        torch.cuda.synchronize()
        tt = (time.perf_counter() - t0) / n * 1e3
        log(f"host {name}: do_bench {t:.4f} ms | host enqueue {th:.4f} ms/call | loop incl sync {tt:.4f} ms/call")
    pr = cProfile.Profile()
    f = fns["palm_fast_fwdbwd"]
    pr.enable()
    for _ in range(200): f()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    log(s.getvalue())
    # Triton launch alone
    cg = CompiledGraph(expanders.layer_norm_fwd(False), "full")
    xx = x.detach()
    ww = w.detach()
    cg(x=xx, weight=ww, eps=1e-5)
    plan = next(iter(cg._plans.values()))
    fn, grid, spec, kw = plan.launches[0]
    vals = {}
    out = cg(x=xx, weight=ww, eps=1e-5)
    t0 = time.perf_counter()
    for _ in range(1000): cg(x=xx, weight=ww, eps=1e-5)
    log(f"host CompiledGraph call {(time.perf_counter() - t0):.4f} ms/call (1000 calls)")
    torch.cuda.synchronize()
