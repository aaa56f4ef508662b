"""GPU probe 10 (written in the nineteenth session, not yet run): the three leads that
session left, in one process (about a minute on an H100).

1. Host time of the LayerNorm fwd+bwd through autograd (0.5-0.9 ms per call against 0.27
   ms of kernels at 16384 x 4096): host enqueue per call of a bare Python autograd.Function
   with no kernels on CUDA vs CPU tensors (the autograd device thread), of palm_fast's and
   torch's layer_norm fwd+bwd, the same with sys.setswitchinterval(1e-5) (GIL hand-offs),
   and a profiler table of the host-side ops of one palm_fast call.
2. The shared-prefix decode's suffix pass (42 us for 8 MB of K/V): its two kernels' device
   times from the profiler, and the pass over split counts and key blocks.
3. SwiGLU fwd+bwd (median 0.821 ms, fastest 0.728 in the session-19 run): do_bench median
   and min three times, and the profiler's kernel sum per call.
Run: python benchmarks/results/h100/probes/probe10.py
"""
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from palm_fast.benchmarks.bench_decode import shared_prefix_cache
from palm_fast.kernels import mqa_decode as tk
from palm_fast.ops import layer_norm, swiglu


def log(*a):
    print(*a, flush=True)


def host_per_call(fn, n=200):
    """Wall time per call of n back-to-back calls, and per call including the final sync."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e3, (t2 - t0) / n * 1e3


def kernel_us_per_call(fn, n=20):
    """Sum of CUDA kernel times per call (profiler), and the kernels by name."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    per = {}
    for e in prof.key_averages():
        dev = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if dev and e.key and not e.key.startswith(("cudaLaunch", "cuLaunch")):
            per[e.key] = dev / n
    return sum(per.values()), per


class Bare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def layer_norm_host():
    """1. LayerNorm host time."""
    M, N, dt = 16384, 4096, torch.bfloat16
    for dev in ("cpu", "cuda"):
        xb = torch.randn(8, 8, device=dev, requires_grad=True)
        gb = torch.ones(8, 8, device=dev)
        t_enq, _ = host_per_call(lambda xb=xb, gb=gb: torch.autograd.grad(Bare.apply(xb), (xb,), gb), 500)
        log(f"bare autograd.Function + grad on {dev}: host {t_enq * 1e3:.1f} us/call")
    x = torch.randn(M, N, device="cuda", dtype=dt, requires_grad=True)
    w = torch.randn(N, device="cuda", dtype=dt, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=dt)
    cases = {
        "palm_fast fwd+bwd": lambda: torch.autograd.grad(layer_norm(x, w), (x, w), dy),
        "torch fwd+bwd": lambda: torch.autograd.grad(torch.nn.functional.layer_norm(x, (N,), w), (x, w), dy),
        "palm_fast fwd (grad on)": lambda: layer_norm(x, w),
    }
    for name, fn in cases.items():
        t_enq, t_all = host_per_call(fn)
        k_us, _ = kernel_us_per_call(fn)
        log(f"{name}: host enqueue {t_enq:.3f} ms/call, with sync {t_all:.3f} ms/call, "
            f"kernels {k_us / 1e3:.3f} ms, do_bench {do_bench(fn, warmup=10, rep=100):.3f} ms")
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    t_enq, t_all = host_per_call(cases["palm_fast fwd+bwd"])
    log(f"palm_fast fwd+bwd with switchinterval 1e-5: host {t_enq:.3f} ms/call, with sync {t_all:.3f}")
    sys.setswitchinterval(old)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            cases["palm_fast fwd+bwd"]()
        torch.cuda.synchronize()
    log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def suffix_pass():
    """2. The shared-prefix decode's suffix pass."""
    n_seq, H, hd, prefix, suffix, page = 64, 48, 256, 4096, 128, 256
    cache = shared_prefix_cache(n_seq, prefix, suffix, hd, torch.bfloat16, "cuda", page)
    q = torch.randn(n_seq, H, hd, device="cuda", dtype=torch.bfloat16)
    lens = cache.lengths
    _group_seq, _group_len, _rows, starts, _slot = cache.decode_meta()
    log(f"suffix pass: capacity {cache.page_table.shape[1] * page}, starts {sorted(set(starts.tolist()))}, "
        f"lengths {sorted(set(lens.tolist()))}")

    def run(**kw):
        return tk.mqa_decode(q, cache.k, cache.v, cache.page_table, starts, lens, 0, hd ** -0.5, True, **kw)

    variants = ({}, {"n_splits": 1}, {"n_splits": 2}, {"n_splits": 8},
                {"n_splits": 1, "tiles": {"BLOCK_N": 64}})
    for kw in variants:
        k_us, per = kernel_us_per_call(lambda kw=kw: run(**kw))
        names = ", ".join(f"{k[:40]} {v:.1f} us" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))
        t = do_bench(lambda kw=kw: run(**kw), warmup=10, rep=100)
        log(f"suffix pass {kw}: kernels {k_us:.1f} us per call ({names}); do_bench {t * 1e3:.1f} us")


def swiglu_fwdbwd():
    """3. SwiGLU fwd+bwd."""
    dt = torch.bfloat16
    x = torch.randn(16384, 2 * 8192, device="cuda", dtype=dt, requires_grad=True)  # [value | gate]
    dh = torch.randn(16384, 8192, device="cuda", dtype=dt)

    def sw():
        return torch.autograd.grad(swiglu(x), (x,), dh)

    for rnd in range(3):
        ts = do_bench(sw, warmup=10, rep=200, return_mode="all")
        log(f"swiglu fwd+bwd round {rnd}: median {statistics.median(ts):.3f} ms, min {min(ts):.3f}, "
            f"max {max(ts):.3f} ({len(ts)} calls)")
    k_us, per = kernel_us_per_call(sw)
    t_enq, _ = host_per_call(sw, 100)
    kernels = ", ".join(f"{k[:30]} {v:.0f} us" for k, v in per.items())
    log(f"swiglu fwd+bwd: kernels {k_us / 1e3:.3f} ms per call ({kernels}); host enqueue {t_enq:.3f} ms/call")


layer_norm_host()
suffix_pass()
swiglu_fwdbwd()
