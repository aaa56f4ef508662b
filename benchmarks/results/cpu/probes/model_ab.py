"""Interleaved training steps of two or more model.train implementations (the bench's
_Trainer), one step each per round: ratios of medians that survive the VM's changes of pace.
Usage: python model_ab.py palm_fast,eager [ROUNDS]; AB_NO_T=1 disables the transposed CPU loss."""
import torch, sys, time, statistics
sys.path.insert(0,'/work/main')
from benchmarks.bench_model import _Trainer
from palm_fast.config import get_config
import os, importlib
if os.environ.get("AB_NO_T"):
    importlib.import_module("palm_fast.ops.lm_loss")._cpu_transposed = lambda *a: False
cfg=get_config('palm-small')
impls=sys.argv[1].split(',') if len(sys.argv)>1 else ['palm_fast','eager']
rounds=int(sys.argv[2]) if len(sys.argv)>2 else 20
trs={i:_Trainer(i,cfg,'cpu',torch.float32,'none') for i in impls}
tok=torch.randint(0,cfg.vocab_size,(2,129))
for tr in trs.values():
    for _ in range(3): tr.step(tok)
ts={i:[] for i in impls}
for r in range(rounds):
    for i,tr in trs.items():
        t0=time.perf_counter(); tr.step(tok); ts[i].append((time.perf_counter()-t0)*1e3)
med={i:statistics.median(v) for i,v in ts.items()}
for i in impls: print(f"{i:12s} median {med[i]:.1f} ms  min {min(ts[i]):.1f}")
base=impls[-1]
for i in impls[:-1]:
    print(f"{i} vs {base}: {med[base]/med[i]:.3f}x (median), {min(ts[base])/min(ts[i]):.3f}x (min); per-round median ratio {statistics.median([b/a for a,b in zip(ts[i],ts[base])]):.3f}")
