"""``palm_fast.patch`` on a PaLM-pytorch 0.2.2 model: unpatched ("eager") vs patched ("palm_fast").

Cases (skipped when palm_pytorch is not installed):

* ``patch.train``: one training step, forward + backward of the next-token cross-entropy
  (fp32 loss); FLOPs are PaLM's model FLOPs ``6 N + 12 L H Q T`` per token (Appendix B).
* ``patch.generate``: greedy decoding of ``new`` tokens after a prompt. Unpatched: the loop
  PaLM-pytorch itself offers (``AutoregressiveWrapper.generate``: the full sequence is re-run
  for every token, it has no KV cache). Patched: ``palm_fast.generate`` (multi-query KV cache)
  when this build has it, else the same loop on the patched model.

The CPU harness times the implementations one after the other: on a loaded machine compare
ratios from one run only (and prefer ``OMP_NUM_THREADS=1`` there: with busy cores, OpenMP worker
threads of these small ops spin and get descheduled).

Shapes: CUDA dim 2048, depth 8, heads 16, dim_head 128, seq 2048 (bf16 by default); CPU a small
model (dim 128, depth 2, heads 8, dim_head 16, seq 256; seq 128 in bf16 or --quick) so the
family stays within ~15 s.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from palm_fast.benchmarks.harness import BenchContext, Case, register, roofline_note


def _shape(ctx: BenchContext) -> dict:
    if ctx.device == "cuda":
        return dict(dim=2048, depth=8, heads=16, dim_head=128, seq=2048, batch=2, vocab=32768,
                    prompt=128, new=64 if not ctx.quick else 16, gen_batch=4)
    # CPU: heads x dim_head = dim as in PaLM; bf16 matmuls are slow on CPUs without native
    # bf16, so bf16 (and --quick) use a shorter sequence to keep the family near 15 s.
    small = ctx.quick or ctx.dtype != torch.float32
    return dict(dim=128, depth=2, heads=8, dim_head=16, seq=128 if small else 256,
                batch=1 if small else 2, vocab=512, prompt=32, new=8 if small else 16, gen_batch=1)


def _model_flops_per_token(s: dict, n_params: int) -> float:
    return 6 * n_params + 12 * s["depth"] * s["heads"] * s["dim_head"] * s["seq"]


def _plain_greedy(model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """PaLM-pytorch's own way to decode (AutoregressiveWrapper.generate, greedy): no cache."""
    out = prompt
    for _ in range(new):
        nxt = model(out)[:, -1].argmax(dim=-1, keepdim=True)
        out = torch.cat((out, nxt), dim=1)
    return out


def _fast_generate():
    """palm_fast.generate when this build has it (None otherwise)."""
    import palm_fast

    return getattr(palm_fast, "generate", None)


@register("patch")
def patch_cases(ctx: BenchContext):
    try:
        from palm_pytorch import PaLM
    except ImportError:
        return
    import palm_fast

    s = _shape(ctx)
    torch.manual_seed(0)
    base = PaLM(dim=s["dim"], num_tokens=s["vocab"], depth=s["depth"], dim_head=s["dim_head"],
                heads=s["heads"]).to(device=ctx.device, dtype=ctx.dtype)
    fast = palm_fast.patch(copy.deepcopy(base))
    models = {"eager": base, "palm_fast": fast}
    n_params = sum(p.numel() for p in base.parameters())
    shape = {k: s[k] for k in ("dim", "depth", "heads", "dim_head", "seq", "batch", "vocab")}
    elem = torch.empty((), dtype=ctx.dtype).element_size()

    def setup_train():
        return torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1), device=ctx.device)

    def train_step(model):
        def run(tokens):
            model.zero_grad(set_to_none=True)
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            return loss
        return run

    tokens = s["batch"] * s["seq"]
    yield Case(
        name="patch.train", shape=shape, dtype=ctx.dtype, bytes=3 * n_params * elem,
        flops=tokens * _model_flops_per_token(s, n_params), bound="compute", setup=setup_train,
        impls={name: train_step(m) for name, m in models.items()},
        extra={"tokens": tokens, "n_params": n_params},
    )

    gen = _fast_generate()

    def setup_gen():
        return torch.randint(0, s["vocab"], (s["gen_batch"], s["prompt"]), device=ctx.device)

    def plain(model):
        @torch.no_grad()
        def run(prompt):
            return _plain_greedy(model, prompt, s["new"])
        return run

    def cached(model):
        def run(prompt):
            return gen(model, list(prompt), s["new"])
        return run

    impls = {"eager": plain(base), "palm_fast": cached(fast) if gen is not None else plain(fast)}
    new_tokens = s["gen_batch"] * s["new"]
    report_pct, note = roofline_note(ctx.device, n_params * elem)
    yield Case(
        name="patch.generate", shape={**shape, "prompt": s["prompt"], "new": s["new"],
                                      "gen_batch": s["gen_batch"]},
        dtype=ctx.dtype, bytes=s["new"] * n_params * elem, setup=setup_gen, impls=impls,
        extra={"new_tokens": new_tokens, **note}, report_pct=report_pct,
        impl_extra={"palm_fast": {"decoding": "palm_fast.generate (KV cache)" if gen is not None
                                  else "full re-run per token (palm_fast.generate not in this build)"},
                    "eager": {"decoding": "full re-run per token (PaLM-pytorch's own loop)"}},
    )
