"""A/B of the C++ SwiGLU and LM-softmax kernels against another build (fifteenth session).

Run once per build, alternating, e.g. with an old build in a git worktree at /tmp/pf_old:

    for i in 1 2 3; do PYTHONPATH=/tmp/pf_old python kernel_ab.py; python kernel_ab.py; done

Prints the minimum and median of repeated calls (ms): SwiGLU forward / backward at
4096 x 4096 (fp32, bf16) and the LM softmax statistics of an [8192, 256] logit block
(timed with a fresh copy of the block: the kernel overwrites it).
"""
import time

import torch

import palm_fast
from palm_fast._ext import cpp


def timed(fn, n):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[0] * 1e3, ts[n // 2] * 1e3


torch.manual_seed(0)
print("build:", palm_fast.__file__)
for dt in (torch.float32, torch.bfloat16):
    x = torch.randn(4096, 8192).to(dt)
    g = torch.randn(4096, 4096).to(dt)
    for name, fn in (("swiglu fwd", lambda: cpp().swiglu_fwd(x)), ("swiglu bwd", lambda: cpp().swiglu_bwd(g, x))):
        print(dt, name, "min %.2f med %.2f ms" % timed(fn, 15))
base = torch.randn(8192, 256)
t = torch.randint(0, 8192, (256,))
print("lm_softmax_cols min %.3f med %.3f ms" % timed(lambda: cpp().lm_softmax_cols_cpu(base.clone(), t), 30))
