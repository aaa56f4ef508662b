"""A/B of builds of palm_fast._C in ONE process, timed round-robin (40 rounds x 20 calls) on the
raw C++ decode entry. Each DIR holds a _C*.so (e.g. from build_variant.sh); they are loaded
under distinct package names (loading two as "_C" returns the first module twice).
Usage: python decode_ab.py THREADS "(B, H, hd, T)" N_INPUT_SETS DIR1 DIR2 ...
(8 input sets: DRAM-resident; 1: cache-resident; PAGED=1 in the environment: pages of 64.)
Prints per build the median call, the ratio to DIR1 and the K/V GB/s."""
import torch, time, sys, importlib.util, statistics
from palm_fast.benchmarks.bench_decode import _filled_cache
def load(d):
    spec = importlib.util.spec_from_file_location(d.replace("/tmp/","") + "._C", f"{d}/_C.cpython-311-x86_64-linux-gnu.so")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m
torch.set_num_threads(int(sys.argv[1]))
B,H,hd,T = eval(sys.argv[2]); nrot=int(sys.argv[3])
mods = {d: load(d) for d in sys.argv[4:]}
paged = "PAGED" in __import__("os").environ
sets=[]
for _ in range(nrot):
    c=_filled_cache(B,T,hd,torch.float32,'cpu', page_size=64 if paged else None); sets.append((torch.randn(B,H,hd),c))
ts={k:[] for k in mods}
i=0
for rnd in range(40):
    for k,m in mods.items():
        for _ in range(20):
            q,c=sets[i%nrot]; i+=1
            t0=time.perf_counter(); m.mqa_decode_cpu(q,c.k,c.v,c.page_table,None,c.lengths,0,0.1,False); ts[k].append(time.perf_counter()-t0)
base=statistics.median(ts[sys.argv[4]])
for k,v in ts.items(): print(f"{k:20s} {statistics.median(v)*1e6:7.1f} us  {statistics.median(v)/base:.3f}  GB/s {2*B*T*hd*4/statistics.median(v)/1e9:.2f}")
