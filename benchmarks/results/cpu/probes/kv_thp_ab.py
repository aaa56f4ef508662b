"""KVCache storage with and without transparent huge pages, round-robin in one process
(twelfth session): ops.mqa_decode over N_SETS caches built by palm_fast.kv_cache._zeros_kv
("huge") or by two torch.zeros ("plain").
Usage: python kv_thp_ab.py THREADS "(B, H, hd, T)" N_SETS   (PAGED=1: pages of 64)"""
import torch, time, sys, statistics, os
import palm_fast.kv_cache as kvm
from palm_fast.ops import mqa_decode
torch.set_num_threads(int(sys.argv[1])); B,H,hd,T = eval(sys.argv[2]); nrot=int(sys.argv[3])
paged = "PAGED" in os.environ
orig = kvm._zeros_kv
plain = lambda shape, dtype, device: (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
def make(fn):
    kvm._zeros_kv = fn
    out=[]
    for _ in range(nrot):
        c = kvm.KVCache(1, B, T, hd, page_size=64 if paged else None); c.reserve(T); c.advance(T); c.k.normal_(); c.v.normal_()
        out.append((torch.randn(B,H,hd), c))
    return out
sets = {"huge": make(orig), "plain": make(plain)}
ts = {k: [] for k in sets}; i=0
for rnd in range(30):
    for k, ss in sets.items():
        for _ in range(20):
            q, c = ss[i % nrot]; i += 1
            t0=time.perf_counter(); mqa_decode(q, c, 0, c.lengths); ts[k].append(time.perf_counter()-t0)
for k,v in ts.items(): print(k, f"{statistics.median(v)*1e6:.1f} us", f"{2*B*T*hd*4/statistics.median(v)/1e9:.2f} GB/s")
print(open('/proc/self/smaps_rollup').read().split('AnonHugePages:')[1].split()[0], "kB huge")
