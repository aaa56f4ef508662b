"""A/B of builds of palm_fast._C in ONE process, timed round-robin (ROUNDS rounds x 20 calls,
default 40) on the raw C++ decode entry. Each DIR holds a _C*.so (e.g. from build_variant.sh);
they are loaded under distinct package names (loading two as "_C" returns the first module
twice).
Usage: [DT=fp32|bf16|fp16] [PAGED=1] [ROUNDS=N] python decode_ab.py THREADS "(B, H, hd, T)" N_INPUT_SETS DIR1 DIR2 ...
(8 input sets or more: DRAM-resident; 1: cache-resident; PAGED=1: pages of 64; DT: the cache
dtype, fp32 by default.) Prints per build the median call, the ratio to DIR1, the K/V GB/s and
whether its output on the first input set equals DIR1's bit for bit."""
import importlib.util
import os
import statistics
import sys
import time

import torch

from palm_fast.benchmarks.bench_decode import _filled_cache


def load(d):
    spec = importlib.util.spec_from_file_location(d.strip("/").replace("/", "_") + "._C",
                                                  f"{d}/_C.cpython-311-x86_64-linux-gnu.so")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def call(m, q, c):
    return m.mqa_decode_cpu(q, c.k, c.v, c.page_table, None, c.lengths, 0, 0.1, False)


def main():
    torch.set_num_threads(int(sys.argv[1]))
    B, H, hd, T = eval(sys.argv[2])
    nrot = int(sys.argv[3])
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[os.environ.get("DT", "fp32")]
    mods = {d: load(d) for d in sys.argv[4:]}
    paged = "PAGED" in os.environ
    sets = []
    for _ in range(nrot):
        c = _filled_cache(B, T, hd, dt, "cpu", page_size=64 if paged else None)
        sets.append((torch.randn(B, H, hd).to(dt), c))

    ts = {k: [] for k in mods}
    i = 0
    for rnd in range(int(os.environ.get("ROUNDS", 40))):
        for k, m in mods.items():
            for _ in range(20):
                q, c = sets[i % nrot]
                i += 1
                t0 = time.perf_counter()
                call(m, q, c)
                ts[k].append(time.perf_counter() - t0)
    first = sys.argv[4]
    out0 = call(mods[first], *sets[0])
    base = statistics.median(ts[first])
    for k, v in ts.items():
        same = all(torch.equal(a, b) for a, b in zip(call(mods[k], *sets[0]), out0))
        print(f"{k:20s} {statistics.median(v)*1e6:7.1f} us  {statistics.median(v)/base:.3f}  "
              f"GB/s {2*B*T*hd*dt.itemsize/statistics.median(v)/1e9:.2f}  bitwise={same}")


if __name__ == "__main__":
    main()
