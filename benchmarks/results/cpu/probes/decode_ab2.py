"""A/B of builds of palm_fast._C in ONE process (twelfth session; decode_ab.py with an output
check): round-robin, 30 rounds x 20 calls of the raw C++ decode entry. Each DIR holds a
_C*.so (build_variant.sh). Prints per build the median call, the ratio to DIR1, the K/V GB/s
and whether its output is bitwise DIR1's.
Usage: python decode_ab2.py THREADS "(B, H, hd, T)" N_INPUT_SETS DIR1 DIR2 ...
N_INPUT_SETS: 32 or more puts 2 MiB caches in DRAM on a 32 MiB L3; 1 keeps one in cache.
Environment: PAGED=1 (pages of 64), DT=bfloat16, ROUNDS=n. Run from the repository root."""
import torch, time, sys, importlib.util, statistics, os
from benchmarks.bench_decode import _filled_cache
def load(d):
    spec = importlib.util.spec_from_file_location(os.path.basename(d) + "._C", f"{d}/_C.cpython-311-x86_64-linux-gnu.so")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m
torch.set_num_threads(int(sys.argv[1]))
B, H, hd, T = eval(sys.argv[2]); nrot = int(sys.argv[3])
mods = {d: load(d) for d in sys.argv[4:]}
paged = "PAGED" in os.environ
dt = getattr(torch, os.environ.get("DT", "float32"))
sets = []
for _ in range(nrot):
    c = _filled_cache(B, T, hd, dt, 'cpu', page_size=64 if paged else None); sets.append((torch.randn(B, H, hd, dtype=dt), c))
ts = {k: [] for k in mods}
outs = {}
i = 0
rounds = int(os.environ.get("ROUNDS", 30))
for rnd in range(rounds):
    for k, m in mods.items():
        for _ in range(20):
            q, c = sets[i % nrot]; i += 1
            t0 = time.perf_counter(); o = m.mqa_decode_cpu(q, c.k, c.v, c.page_table, None, c.lengths, 0, 0.1, False); ts[k].append(time.perf_counter() - t0)
        if rnd == 0:
            q, c = sets[0]; outs[k] = m.mqa_decode_cpu(q, c.k, c.v, c.page_table, None, c.lengths, 0, 0.1, False)[0]
base = statistics.median(ts[sys.argv[4]])
ref = outs[sys.argv[4]]
esz = torch.empty((), dtype=dt).element_size()
for k, v in ts.items():
    med = statistics.median(v)
    print(f"{os.path.basename(k):14s} {med*1e6:7.1f} us  {med/base:.3f}  GB/s {2*B*T*hd*esz/med/1e9:.2f}  same={torch.equal(outs[k], ref)} maxdiff={(outs[k].float()-ref.float()).abs().max().item():.2e}")
