"""Round-robin A/B of `palm_fast.generate` on the CPU between two builds of palm_fast._C (as
decode_ab.py): the `*_cpu` functions of the loaded extension are swapped before each call.
Usage: python generate_ab.py fp32|bf16 CONFIG B PROMPT_LEN NEW_TOKENS DIR_A DIR_B [ROUNDS]
(a reference PaLM with seed-0 weights; random prompts). Prints each build's median and fastest
call, tokens/s, the ratio B/A and whether both generated the same tokens."""
import statistics
import sys
import time

import torch

import palm_fast
from decode_ab import load  # noqa: E402  (run from this folder)
from palm_fast._ext import cpp
from palm_fast.config import get_config
from palm_fast.reference import PaLM

dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[1]]
cfg = get_config(sys.argv[2])
B, T, new = map(int, sys.argv[3:6])
mods = {d: load(d) for d in sys.argv[6:8]}
names = [n for n in dir(cpp()) if n.endswith("_cpu")]
torch.manual_seed(0)
model = PaLM(cfg).to(dt).eval()
prompts = [torch.randint(0, cfg.vocab_size, (T,)) for _ in range(B)]


def use(m):
    for n in names:
        setattr(cpp(), n, getattr(m, n))


outs = {}
for d, m in mods.items():
    use(m)
    outs[d] = palm_fast.generate(model, prompts, new)
same = all(torch.equal(a, b) for a, b in zip(*outs.values()))
ts = {d: [] for d in mods}
for r in range(int(sys.argv[8]) if len(sys.argv) > 8 else 10):
    for d, m in mods.items():
        use(m)
        t0 = time.perf_counter()
        palm_fast.generate(model, prompts, new)
        ts[d].append(time.perf_counter() - t0)
a, b = (statistics.median(v) for v in ts.values())
for d, v in ts.items():
    print(f"{d:10s} median {statistics.median(v)*1e3:8.2f} ms  min {min(v)*1e3:8.2f} ms  "
          f"tokens/s {B*new/statistics.median(v):8.1f}")
print(f"B/A {b/a:.3f} (per-round {statistics.median([y/x for x, y in zip(*ts.values())]):.3f}); "
      f"same tokens: {same}")
