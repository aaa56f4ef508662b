"""GPU probe 4: LN forward looped variants at N=18432; host cost of the fwd+bwd path by part."""
import sys, time, traceback
import torch
from triton.testing import do_bench
from palm_fast.fusion import expanders
from palm_fast.fusion.codegen import CompiledGraph
from palm_fast.ops import layer_norm
from palm_fast.ops import layer_norm as ln_mod_fn
import palm_fast.ops.layer_norm as lnmod

def log(*a):
    print(*a, flush=True)

def bench(fn):
    return do_bench(fn, warmup=10, rep=60)

dev, M, dt = "cuda", 16384, torch.bfloat16
which = sys.argv[1:] or ["fwd", "bwd", "host"]
if "fwd" in which:
    N = 18432
    x = torch.randn(M, N, device=dev, dtype=dt); w = torch.randn(N, device=dev, dtype=dt)
    gb = 2 * M * N * 2 / 1e9
    variants = [("default", {})]
    for lb in (1024, 2048, 4096, 8192):
        for nw in (4, 8, 16):
            variants.append((f"looped{lb}-w{nw}", dict(max_block=16384, max_tiled=0, loop_block=lb, num_warps=nw)))
    for name, opts in variants:
        cg = CompiledGraph(expanders.layer_norm_fwd(False), "full", **opts)
        t = bench(lambda: cg(x=x, weight=w, eps=1e-5))
        log(f"LN fwd N={N} {name} {cg.variant(cg.schedule.groups[0], N)}: {t:.4f} ms {gb/t*1e3:.0f} GB/s")
    del x
if "bwd" in which:
    N = 18432
    x = torch.randn(M, N, device=dev, dtype=dt); w = torch.randn(N, device=dev, dtype=dt)
    dy = torch.randn_like(x)
    mean = x.float().mean(1); rstd = torch.rsqrt(x.float().var(1, unbiased=False) + 1e-5)
    gb = 3 * M * N * 2 / 1e9
    variants = [("default", {})]
    for lb in (1024, 2048):
        for nw in (4, 8, 16):
            for pps in (2, 4):
                variants.append((f"looped{lb}-w{nw}-pps{pps}", dict(loop_block=lb, num_warps=nw, partials_per_sm=pps)))
    variants.append(("tile2048-w16-pps2", dict(tile=2048, num_warps=16, max_tiled_partial=32768)))
    variants.append(("tile4096-w16-pps2", dict(tile=4096, num_warps=16, max_tiled_partial=32768)))
    for name, opts in variants:
        cg = CompiledGraph(expanders.layer_norm_bwd(False), "full", **opts)
        t = bench(lambda: cg(dy=dy, x=x, weight=w, mean=mean, rstd=rstd))
        log(f"LN bwd N={N} {name} {cg.variant(cg.schedule.groups[0], N)}: {t:.4f} ms {gb/t*1e3:.0f} GB/s")
    del x, dy
if "host" in which:
    N = 4096
    x = torch.randn(M, N, device=dev, dtype=dt, requires_grad=True); dy = torch.randn(M, N, device=dev, dtype=dt)
    w = torch.randn(N, device=dev, dtype=dt, requires_grad=True)
    f = lambda: torch.autograd.grad(layer_norm(x, w, None, 1e-5), (x, w), dy)
    f(); torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(2)
    try:
        f()
        log("sync debug: no synchronizing call in fwd+bwd")
    except Exception:
        log("sync debug: SYNC FOUND\n" + traceback.format_exc()[-3000:])
    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    y = layer_norm(x, w, None, 1e-5)
    xd, wd = x.detach(), w.detach()
    yy, mean, rstd = lnmod._layer_norm_fwd_cuda(xd.view(-1, N), wd, None, 1e-5)
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        zb = torch.zeros(N, device=dev, dtype=dt)
        liger = lambda: torch.autograd.grad(LigerLayerNormFunction.apply(x, w, zb, 1e-5), (x, w), dy)
    except ImportError:
        liger = None
    parts = {
        "fwdbwd": f,
        "torch_fwdbwd": lambda: torch.autograd.grad(torch.nn.functional.layer_norm(x, (N,), w, None, 1e-5), (x, w), dy),
        "bwd_only_autograd": lambda: torch.autograd.grad(y, (x, w), dy, retain_graph=True),
        "bwd_impl_direct": lambda: lnmod._layer_norm_bwd_cuda(dy, xd, wd, mean, rstd, False),
        "fwd_grad": lambda: layer_norm(x, w, None, 1e-5),
        "fwd_impl_direct": lambda: lnmod._layer_norm_fwd_cuda(xd, wd, None, 1e-5),
    }
    if liger is not None:
        parts["liger_fwdbwd"] = liger
    for name, g in parts.items():
        for _ in range(5): g()
        torch.cuda.synchronize()
        t = bench(g)
        n = 200
        t0 = time.perf_counter()
        for _ in range(n): g()
        th = (time.perf_counter() - t0) / n * 1e3
        torch.cuda.synchronize()
        tt = (time.perf_counter() - t0) / n * 1e3
        log(f"host {name}: do_bench {t:.4f} ms | host {th:.4f} ms/call | with final sync {tt:.4f} ms/call")
    # the same loop with a short GPU problem: pure host cost
    xs = torch.randn(64, N, device=dev, dtype=dt, requires_grad=True); dys = torch.randn(64, N, device=dev, dtype=dt)
    for name, g in {"small_fwdbwd": lambda: torch.autograd.grad(layer_norm(xs, w, None, 1e-5), (xs, w), dys),
                    "small_torch_fwdbwd": lambda: torch.autograd.grad(torch.nn.functional.layer_norm(xs, (N,), w, None, 1e-5), (xs, w), dys)}.items():
        for _ in range(5): g()
        torch.cuda.synchronize()
        n = 300
        t0 = time.perf_counter()
        for _ in range(n): g()
        torch.cuda.synchronize()
        log(f"host {name}: {(time.perf_counter() - t0) / n * 1e3:.4f} ms/call")
