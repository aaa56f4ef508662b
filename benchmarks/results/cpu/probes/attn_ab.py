"""A/B of builds of palm_fast._C (build dirs as for decode_ab2.py) on the C++ training
attention, forward + backward, round-robin; prints the median, the ratio to the first build
and whether all four outputs are bitwise the first build's (twelfth session).
Usage: python attn_ab.py "(B, T, H, D)" DIR1 DIR2 ..."""
import torch, time, sys, statistics, importlib.util, os
def load(d):
    spec = importlib.util.spec_from_file_location(os.path.basename(d) + "._C", f"{d}/_C.cpython-311-x86_64-linux-gnu.so")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m
torch.set_num_threads(2)
B,T,H,D = eval(sys.argv[1]); mods={d: load(d) for d in sys.argv[2:]}
sets=[(torch.randn(B,T,H,D), torch.randn(B,T,D), torch.randn(B,T,D), torch.randn(B,T,H,D)) for _ in range(4)]
ts={k:[] for k in mods}; outs={}
for rnd in range(20):
    for k,m in mods.items():
        for i in range(10):
            q,kk,v,g=sets[i%4]
            t0=time.perf_counter(); o,lse=m.mqa_attn_fwd(q,kk,v,D**-0.5); dq,dk,dv=m.mqa_attn_bwd(g,q,kk,v,o,lse,D**-0.5); ts[k].append(time.perf_counter()-t0)
        q,kk,v,g=sets[0]; o,lse=m.mqa_attn_fwd(q,kk,v,D**-0.5); outs[k]=(o,)+tuple(m.mqa_attn_bwd(g,q,kk,v,o,lse,D**-0.5))
base=statistics.median(ts[sys.argv[2]]); ref=outs[sys.argv[2]]
for k,v in ts.items(): print(os.path.basename(k), f"{statistics.median(v)*1e6:.0f} us {statistics.median(v)/base:.3f}", all(torch.equal(a,b) for a,b in zip(outs[k],ref)))
