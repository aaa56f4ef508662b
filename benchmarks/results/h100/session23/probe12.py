"""GPU probe 12 (twenty-third session): two follow-ups of probes 10 / 11, in one process.

1. layer_norm.bwd at 16384 x 4096 bf16 read 0.241 ms in this session's bench (55.7% of
   copy; 0.175 in the nineteenth session's) with 0.170 ms of kernels (probe 10): host-bound?
   Host time per call (no sync) and do_bench of the backward through the custom op (what
   the bench times), through the eager path (what autograd's backward calls outside
   torch.compile), and of the generated kernels' runner alone.
2. The shared-prefix decode (64 x 48 x 256, 4096 + 128, pages of 256), CUDA-graph replays:
   shared vs unshared after the suffix pass's splits were fitted to its span (1 split; was
   4 over the capacity), and the suffix pass alone with the new default, 1 and 4 splits.
Run: python benchmarks/results/h100/session23/probe12.py
"""
import importlib
import time

import torch
from triton.testing import do_bench

from palm_fast.benchmarks.bench_decode import _Graphed, shared_prefix_cache
from palm_fast.fusion import layer_norm as fln
from palm_fast.kernels import mqa_decode as tk
from palm_fast.ops import mqa_decode

oln = importlib.import_module("palm_fast.ops.layer_norm")   # (palm_fast.ops.layer_norm is also a function)


def log(*a):
    print(*a, flush=True)


def host_us(fn, n=300):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


M, N, dt = 16384, 4096, torch.bfloat16
x = torch.randn(M, N, device="cuda", dtype=dt)
dy = torch.randn_like(x)
w = torch.randn(N, device="cuda", dtype=dt)
xf = x.float()
mean = xf.mean(1)
rstd = torch.rsqrt(xf.var(1, unbiased=False) + 1e-5)
small = [t[:64].contiguous() for t in (dy, x)] + [mean[:64].contiguous(), rstd[:64].contiguous()]
paths = {
    "custom op": lambda a: oln.layer_norm_bwd(a[0], a[1], w, a[2], a[3], False),
    "eager path (call_impl)": lambda a: oln.call_impl(oln._LN_BWD_IMPLS, a[0], a[1], w, a[2], a[3], False),
    "runner (fusion.layer_norm_bwd, checked)": lambda a: fln.layer_norm_bwd(a[0], a[1], w, a[2], a[3], False,
                                                                           checked=True),
    "torch native": lambda a: torch.ops.aten.native_layer_norm_backward(
        a[0], a[1], [a[1].shape[1]], a[2][:, None], a[3][:, None], w, None, [True, True, False]),
}
big = (dy, x, mean, rstd)
for name, fn in paths.items():
    h_small = host_us(lambda fn=fn: fn(small))
    t = do_bench(lambda fn=fn: fn(big), warmup=25, rep=200)
    log(f"LN bwd {name}: host {h_small:.1f} us/call (64 rows), do_bench {t * 1e3:.1f} us at {M} x {N}")

n_seq, H, hd, prefix, suffix, page = 64, 48, 256, 4096, 128, 256
cache = shared_prefix_cache(n_seq, prefix, suffix, hd, dt, "cuda", page)
q = torch.randn(n_seq, H, hd, device="cuda", dtype=dt)


def graphed(fn):
    g = _Graphed(lambda _: fn())
    return lambda: g(q)


for _ in range(2):
    t_un = do_bench(graphed(lambda: mqa_decode(q, cache, 0, cache.lengths, shared_prefix=False)), rep=200)
    t_sh = do_bench(graphed(lambda: mqa_decode(q, cache, 0, cache.lengths, shared_prefix=True)), rep=200)
    log(f"shared prefix, graph: unshared {t_un * 1e3:.1f} us, shared {t_sh * 1e3:.1f} us "
        f"({t_un / t_sh:.2f}x)")
_, group_len, rows, starts, slot = cache.decode_meta()
span = cache.blocks_per_seq * page - prefix
for name, kw in (("new default (span)", dict(span=span)), ("span, 2 splits", dict(span=span, n_splits=2)),
                 ("capacity, 1 split", dict(n_splits=1)), ("capacity, default (4)", {})):
    t = do_bench(graphed(lambda kw=kw: tk.mqa_decode(q, cache.k, cache.v, cache.page_table, starts,
                                                     cache.lengths, 0, hd ** -0.5, True, **kw)), rep=200)
    log(f"suffix pass {name}: {t * 1e3:.1f} us")
