"""A/B of builds of palm_fast._C (as decode_ab.py) on the decode step's GEMM,
`small_mm_cpu(x [M, K], w [N, K])`, timed round-robin (15 rounds x 10 calls).
Usage: [DT=bf16|fp16|fp32] python small_mm_ab.py THREADS "(M, K, N, N_INPUT_SETS)" DIR1 DIR2 ...
Prints per build the median call, the ratio to DIR1, the weight GB/s and whether its output
equals DIR1's bit for bit."""
import os
import statistics
import sys
import time

import torch

from decode_ab import load  # noqa: E402  (run from this folder)

torch.set_num_threads(int(sys.argv[1]))
M, K, N, nrot = eval(sys.argv[2])
dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[os.environ.get("DT", "bf16")]
mods = {d: load(d) for d in sys.argv[3:]}
sets = [(torch.randn(M, K).to(dt), torch.randn(N, K).to(dt)) for _ in range(nrot)]
ts = {k: [] for k in mods}
i = 0
for rnd in range(15):
    for k, m in mods.items():
        for _ in range(10):
            x, w = sets[i % nrot]
            i += 1
            t0 = time.perf_counter()
            m.small_mm_cpu(x, w, None)
            ts[k].append(time.perf_counter() - t0)
first = sys.argv[3]
out0 = mods[first].small_mm_cpu(*sets[0], None)
base = statistics.median(ts[first])
for k, v in ts.items():
    same = torch.equal(mods[k].small_mm_cpu(*sets[0], None), out0)
    print(f"{k:12s} {statistics.median(v)*1e6:8.1f} us  {statistics.median(v)/base:.3f}  "
          f"GB/s {N*K*dt.itemsize/statistics.median(v)/1e9:.2f}  bitwise={same}")
