"""A/B of two builds of palm_fast._C in ONE process: /tmp/so_old and /tmp/so_new each hold a
_C*.so, loaded under distinct package names (loading both as "_C" returns the first module
twice), then timed interleaved (60 rounds x 20 calls each) on the raw C++ decode entry.
Usage: python decode_ab.py THREADS ["(B, H, hd, T)"] [N_INPUT_SETS]  (12 sets: DRAM-resident)."""
import torch, time, sys, importlib.util, statistics
sys.path.insert(0, '/work/main')
from benchmarks.bench_decode import _filled_cache
def load(d):
    spec = importlib.util.spec_from_file_location(d.replace("/tmp/","") + "._C", f"{d}/_C.cpython-311-x86_64-linux-gnu.so")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m
mods = {"old": load("/tmp/so_old"), "new": load("/tmp/so_new")}
torch.set_num_threads(int(sys.argv[1]))
shape = eval(sys.argv[2]) if len(sys.argv) > 2 else (2,8,128,1024)
B,H,hd,T = shape
nrot = int(sys.argv[3]) if len(sys.argv) > 3 else 1
sets=[]
for _ in range(nrot):
    c=_filled_cache(B,T,hd,torch.float32,'cpu'); sets.append((torch.randn(B,H,hd),c))
ts={k:[] for k in mods}
i=0
for rnd in range(60):
    for k,m in mods.items():
        for _ in range(20):
            q,c=sets[i%nrot]; i+=1
            t0=time.perf_counter(); m.mqa_decode_cpu(q,c.k,c.v,None,None,c.lengths,0,0.1,False); ts[k].append(time.perf_counter()-t0)
for k,v in ts.items(): print(k, f"{statistics.median(v)*1e6:.1f} us")
print("new/old", statistics.median(ts['new'])/statistics.median(ts['old']))
