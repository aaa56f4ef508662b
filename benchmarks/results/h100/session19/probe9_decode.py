"""GPU probe 9 (nineteenth session): the decode split kernel's tiles and split counts at the
issue-5 shapes, every call replayed from a CUDA graph (no host time), bf16.

For each (heads x head dim, B, T): the heuristic's config, then a sweep of n_splits (x1/2 ..
x8 of the heuristic's), BLOCK_N, num_warps and num_stages; prints the default and the five
best with % of the copy bandwidth measured here. Contiguous cache (the issue's target), then
a paged cache (pages of 256) at a few shapes. Stops sweeping at the time budget (argv[1] s).
Run: python benchmarks/results/h100/session19/probe9_decode.py 240
"""
import sys
import time

import torch
from triton.testing import do_bench

from palm_fast.kernels import mqa_decode as tk

BUDGET = float(sys.argv[1]) if len(sys.argv) > 1 else 240.0
T0 = time.time()
dt = torch.bfloat16


def log(*a):
    print(*a, flush=True)


def copy_bw():
    a = torch.empty(2 ** 28, device="cuda", dtype=torch.uint8)
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a), warmup=25, rep=100)
    return 2 * a.numel() / t / 1e6


def graphed(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def bench(fn):
    return do_bench(graphed(fn), warmup=10, rep=40)


bw = copy_bw()
log(f"copy bandwidth {bw:.0f} GB/s; SMs {torch.cuda.get_device_properties(0).multi_processor_count}")


def sweep(H, hd, B, T, paged, full):
    scale = hd ** -0.5
    q = torch.randn(B, H, hd, device="cuda", dtype=dt)
    if paged:
        P = 256
        nb = T // P
        k = torch.randn(1, B * nb, P, hd, device="cuda", dtype=dt)
        v = torch.randn_like(k)
        table = torch.randperm(B * nb, device="cuda", dtype=torch.int32).view(B, nb)
    else:
        k = torch.randn(1, B, T, hd, device="cuda", dtype=dt)
        v = torch.randn_like(k)
        table = None
    ends = torch.full((B,), T, device="cuda", dtype=torch.int32)
    gb = (2 * B * T * hd + 2 * B * H * hd) * 2 / 1e9

    def run(**kw):
        return lambda: tk.mqa_decode(q, k, v, table, None, ends, 0, scale, False, **kw)

    cfg = tk.decode_config(B, H, hd, T, tk.sm_count(q.device), 2, tk.smem_per_block(q.device))
    t0 = bench(run())
    tag = f"{'paged' if paged else 'contig'} H={H} hd={hd} B={B} T={T}"
    log(f"{tag} default S={cfg['n_splits']} BN={cfg['BLOCK_N']} w={cfg['num_warps']} st={cfg['num_stages']}: "
        f"{t0 * 1e3:.1f} us {gb / t0 * 1e3 / bw * 100:.1f}%")
    S0 = cfg["n_splits"]
    res = []
    splits = sorted({max(1, S0 // 2), S0, 2 * S0, 4 * S0, 8 * S0}) if full else sorted({S0, 2 * S0, 4 * S0})
    bns = ((16, 32, 64) if hd == 256 else (32, 64, 128)) if full else ((32, 64) if hd == 256 else (64, 128))
    for S in splits:
        for BN in bns:
            for nw in (4, 8):
                for ns in ((2, 3, 4) if full else (2, 3)):
                    if time.time() - T0 > BUDGET:
                        log("  (time budget reached)")
                        break
                    try:
                        t = bench(run(n_splits=S, tiles=dict(BLOCK_N=BN, num_warps=nw, num_stages=ns)))
                    except Exception as e:  # e.g. out of shared memory
                        log(f"  S={S} BN={BN} w={nw} st={ns}: {type(e).__name__} {str(e)[:80]}")
                        continue
                    res.append((t, S, BN, nw, ns))
    res.sort()
    for t, S, BN, nw, ns in res[:5]:
        log(f"  S={S} BN={BN} w={nw} st={ns}: {t * 1e3:.1f} us {gb / t * 1e3 / bw * 100:.1f}% ({t0 / t:.3f}x default)")
    del q, k, v


for H, hd in ((48, 256), (16, 128)):
    for B in (1, 8, 64):
        for T in (4096, 32768):
            sweep(H, hd, B, T, False, True)
for H, hd, B, T in ((48, 256, 8, 32768), (48, 256, 64, 32768), (16, 128, 64, 32768), (48, 256, 64, 4096)):
    sweep(H, hd, B, T, True, False)
log(f"done in {time.time() - T0:.0f} s")
