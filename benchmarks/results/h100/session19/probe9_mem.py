"""GPU probe 9 (nineteenth session): what `palm_fast.nn.set_weight_cache(model, False)` saves
and costs on palm-1b in bf16: peak memory and time of `palm_fast.generate` (8 prompts x 128,
64 new, CUDA graph) and of a forward + backward at B=4, T=2048, with the re-laid-out in_proj
copy kept (default) and not kept.
Run: python benchmarks/results/h100/session19/probe9_mem.py
"""
import time

import torch

import palm_fast
from palm_fast import get_config


def log(*a):
    print(*a, flush=True)


cfg = get_config("palm-1b")
torch.manual_seed(0)
model = palm_fast.nn.PaLM(cfg).to(device="cuda", dtype=torch.bfloat16)
params = sum(p.numel() * p.element_size() for p in model.parameters())
log(f"palm-1b bf16 parameters: {params / 2**30:.2f} GiB")
prompts = torch.randint(0, cfg.vocab_size, (8, 128), device="cuda")
tokens = torch.randint(0, cfg.vocab_size, (4, 2048), device="cuda")


def timed(fn, n):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def fwd_bwd():
    model.zero_grad(set_to_none=True)
    logits = model(tokens)
    logits.float().square().mean().backward()


for enabled in (True, False, True):
    palm_fast.nn.set_weight_cache(model, enabled)
    model.eval()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tg = timed(lambda: palm_fast.generate(model, prompts, 64), 3)
    peak_g = torch.cuda.max_memory_allocated() - base
    held = torch.cuda.memory_allocated() - base
    model.train()
    torch.cuda.reset_peak_memory_stats()
    tt = timed(fwd_bwd, 5)
    peak_t = torch.cuda.max_memory_allocated() - base
    model.zero_grad(set_to_none=True)
    log(f"weight cache {enabled}: generate {tg * 1e3:.1f} ms ({8 * 64 / tg:.0f} tok/s), peak +{peak_g / 2**30:.2f} GiB, "
        f"held after +{held / 2**30:.2f} GiB; fwd+bwd B=4 T=2048 {tt * 1e3:.1f} ms, peak +{peak_t / 2**30:.2f} GiB")
