"""Training-loss benchmark (family ``lm_loss``): the tied-embedding head + cross-entropy +
z-loss, forward and backward.

Case ``lm_loss.fwdbwd`` on the final hidden states ``h [tokens, d]`` of a preset (CPU:
palm-small, 2 x 128 tokens, as ``model.train`` runs it; CUDA: palm-1b, 4 x 2048 tokens)
and the tied embedding ``W [V, d]``:

* ``palm_fast``: ``palm_fast.ops.tied_lm_loss`` (one logits GEMM, softmax in place, no
  ``[tokens, V]`` gradient; see ``palm_fast/ops/lm_loss.py``);
* ``eager``: the reference model's loss math (``logits = h W^T * d^-1/2`` upcast to fp32,
  ``cross_entropy`` + ``z_loss * mean(logsumexp^2)``) under autograd;
* ``compile``: ``torch.compile`` of that function.

Compute-bound: three GEMMs of ``tokens x d x V`` (logits, dh, dW), ``6 tokens d V`` FLOPs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from palm_fast.benchmarks.harness import BenchContext, Case, register
from palm_fast.config import get_config


def reference_loss(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, scale: float,
                   z_coef: float) -> torch.Tensor:
    """The reference ``PaLM.loss`` after its final LayerNorm (total = ce + z)."""
    logits = (h @ w.t()) * scale
    logits = logits.float()
    ce = F.cross_entropy(logits, targets)
    return ce + z_coef * torch.logsumexp(logits, dim=-1).square().mean()


def _sizes(ctx: BenchContext):
    if ctx.device == "cuda":
        cfg = get_config(ctx.config or "palm-1b")
        tokens = 2 * 2048 if ctx.quick else 4 * 2048
    else:
        cfg = get_config(ctx.config or "palm-small")
        tokens = 2 * 64 if ctx.quick else 2 * 128
    return cfg, tokens


@register("lm_loss", default_dtypes={"cpu": (torch.float32,)})
def lm_loss_cases(ctx: BenchContext):
    from palm_fast.ops import tied_lm_loss

    cfg, M = _sizes(ctx)
    d, V = cfg.d_model, cfg.vocab_size
    scale = d ** -0.5 if cfg.scale_logits else 1.0
    z = cfg.z_loss
    compiled = torch.compile(reference_loss, dynamic=False)

    def setup():
        h = torch.randn(M, d, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
        w = (torch.randn(V, d, device=ctx.device, dtype=ctx.dtype) * 0.02).requires_grad_()
        t = torch.randint(0, V, (M,), device=ctx.device)
        return h, w, t

    def fwdbwd(f):
        def run(inputs):
            h, w, t = inputs
            return torch.autograd.grad(f(h, w, t), (h, w))
        return run

    def fast(h, w, t):
        return tied_lm_loss(h, w, t, scale=scale, z_coef=z)[0]

    elem = torch.empty((), dtype=ctx.dtype).element_size()
    yield Case(
        name="lm_loss.fwdbwd", shape={"config": cfg.name, "tokens": M, "d": d, "V": V},
        dtype=ctx.dtype, bytes=(2 * M * d + 2 * V * d) * elem, flops=6.0 * M * d * V,
        bound="compute", setup=setup,
        impls={"palm_fast": fwdbwd(fast),
               "eager": fwdbwd(lambda h, w, t: reference_loss(h, w, t, scale, z)),
               "compile": fwdbwd(lambda h, w, t: compiled(h, w, t, scale, z))},
    )
