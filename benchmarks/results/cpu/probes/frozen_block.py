"""Backward of one block with trainable vs frozen projection weights, fast vs reference
(sixteenth session: frozen weights skip their gradient GEMMs).

    python benchmarks/results/cpu/probes/frozen_block.py

Prints the minimum of 4 timed backwards (after one warm-up) per case, in ms, on 1 thread.
"""
import time

import torch

from palm_fast.nn import ParallelBlock as FastBlock
from palm_fast.reference import ParallelBlock as RefBlock

torch.set_num_threads(1)
torch.manual_seed(0)
B, T, d, H, hd, F = 4, 128, 512, 8, 64, 1024
ref = RefBlock(d, H, hd, F)
fast = FastBlock(d, H, hd, F)
fast.load_state_dict(ref.state_dict())
x = torch.randn(B, T, d)


def backward_ms(block, frozen: bool) -> float:
    for p in block.parameters():
        p.requires_grad_(not frozen)
    times = []
    for _ in range(5):
        xx = x.clone().requires_grad_()
        y = block(xx)
        g = torch.randn_like(y)
        t0 = time.perf_counter()
        y.backward(g)
        times.append(time.perf_counter() - t0)
    return min(times[1:]) * 1e3


for frozen in (False, True):
    print(f"weights frozen={frozen}: backward reference {backward_ms(ref, frozen):.1f} ms, "
          f"fast {backward_ms(fast, frozen):.1f} ms")
