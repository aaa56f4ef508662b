"""Whole-model training step: palm_fast.nn.PaLM vs the eager reference vs torch.compile of it.

Case ``model.train``: one optimizer step on ``tokens [B, T + 1]`` = forward, next-token
loss with z-loss (``model.loss``: cross-entropy + 1e-4 mean(log Z)^2), backward, AdamW
step, zero_grad. Implementations (each builds its own model from the same seed and
trains on the same tokens; one model is alive at a time):

* ``palm_fast``                       fast model, no activation recomputation
* ``palm_fast_recompute_<policy>``    fast model recomputing activations in the backward
                                      ("full" everywhere; "attention" too on a GPU)
* ``eager``                           the reference model (palm_fast.reference.PaLM)
* ``compile``                         ``torch.compile`` of the reference's ``loss``
                                      (forward + loss, and so the backward, compiled)

Figures per PaLM Appendix B (palm_fast.flops), with N all parameters, L layers, H query
heads, Q head dim, T sequence length:
  tokens/s = B T / step time;
  MFU = tokens/s (6 N + 12 L H Q T) / peak;
  HFU = tokens/s (a N + b L H Q T) / peak, (a, b) by the recompute policy the
        implementation actually ran (``recompute`` in the record; flops.RECOMPUTE).
Each against the datasheet peak of the device (``mfu``, ``hfu``; null where there is none,
e.g. a CPU) and against the matmul peak measured in the same run (``mfu_measured_peak``,
``hfu_measured_peak``; ``pct_of_peak`` = 100 x ``mfu_measured_peak``; None when the run's
dtype is not the measured peak's).

Sizes: ``--config`` picks the preset (default palm-small on CPU, palm-1b on GPU). CPU:
T = 128, B = 2 (quick: T = 64); GPU: bf16, T = 2048, B the largest power of two (<= 8)
whose estimated memory for the eager reference (the hungriest: fp32 T x T scores) fits.
Smoke runs use palm-tiny at T = 32.
"""
from __future__ import annotations

import gc
import warnings

import torch

from palm_fast import flops
from palm_fast.benchmarks.harness import BenchContext, Case, dtype_name, register
from palm_fast.config import PaLMConfig, get_config


def fast_model_class():
    """``palm_fast.nn.PaLM`` (the fast model), or None where this checkout lacks it."""
    try:
        from palm_fast.nn import PaLM
    except ImportError:
        return None
    return PaLM


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_train_bytes(cfg: PaLMConfig, batch: int, seq_len: int, dtype: torch.dtype) -> float:
    """Rough peak memory of one eager-reference training step (the hungriest implementation).

    Parameters, gradients and two AdamW moments in ``dtype``; per sequence and layer the
    fp32 attention scores the reference keeps (about 1.5 T x T x H x 4 bytes with the
    transients of the backward), the activations saved in ``dtype`` (input, norm output,
    projection, SwiGLU output: T (d + proj + F)) and those saved in fp32 (LayerNorm
    internals, rotated and attended q/k/v, SwiGLU internals: about 4 T (4 d + 3 H Q + 2 F));
    the fp32 logits with their softmax and gradients (4 x T x V x 4 bytes).
    """
    e = _elem(dtype)
    n = cfg.param_count()
    static = 4 * n * e
    d, hq, F = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.d_ff
    proj = hq + 2 * cfg.n_kv_heads * cfg.head_dim + 2 * F
    per_layer = (1.5 * cfg.n_heads * seq_len * seq_len * 4
                 + seq_len * (e * (d + proj + F) + 4 * (4 * d + 3 * hq + 2 * F)))
    per_seq = cfg.n_layers * per_layer + 16 * seq_len * cfg.vocab_size
    return static + batch * per_seq


def gpu_batch(cfg: PaLMConfig, seq_len: int, dtype: torch.dtype, device_bytes: float,
              max_batch: int = 8) -> int:
    """Largest power of two <= max_batch whose estimated step fits in 85% of the device."""
    b = max_batch
    while b > 1 and estimate_train_bytes(cfg, b, seq_len, dtype) > 0.85 * device_bytes:
        b //= 2
    return b


def sizes(ctx: BenchContext) -> tuple[PaLMConfig, int, int]:
    """(config, batch, seq_len) for this run."""
    if ctx.smoke:
        cfg = get_config(ctx.config or "palm-tiny")  # smoke contexts default to palm-tiny
        return cfg, 2, min(32, cfg.max_seq_len)
    if ctx.device == "cuda":
        cfg = get_config(ctx.config or "palm-1b")
        T = min(2048, cfg.max_seq_len)
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return cfg, gpu_batch(cfg, T, ctx.dtype, total), T
    cfg = get_config(ctx.config or "palm-small")
    return cfg, 2, min(64 if ctx.quick else 128, cfg.max_seq_len)


def _adamw(params, device: str):
    # The same optimizer for every implementation: fused AdamW where torch has it.
    try:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)


class _Trainer:
    """One implementation's model, optimizer and loss function."""

    def __init__(self, impl: str, cfg: PaLMConfig, device: str, dtype: torch.dtype, recompute: str):
        from palm_fast.reference import PaLM as RefPaLM

        torch.manual_seed(0)  # every implementation starts from the same weights
        # Built (and initialised) on the device: a 1B model initialised on the host first
        # would cost seconds per implementation.
        with torch.device(device):
            if impl.startswith("palm_fast"):
                cls = fast_model_class()
                if cls is None:
                    raise RuntimeError("palm_fast.nn.PaLM is not in this checkout (it comes with the "
                                       "fast block, issue 4); the fast-model rows need it")
                model = cls(cfg, recompute=recompute)
            else:
                model = RefPaLM(cfg)
        self.model = model.to(device=device, dtype=dtype)
        self.opt = _adamw(self.model.parameters(), device)
        self.loss_fn = torch.compile(self.model.loss, dynamic=False) if impl == "compile" else self.model.loss
        self.first_loss: float | None = None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        loss, _, _ = self.loss_fn(tokens)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.first_loss is None:  # same weights, same tokens: a cross-implementation check
            self.first_loss = float(loss.detach())
        return loss


# The model's recompute argument -> the HFU accounting of what it recomputes (its "full"
# checkpoints every block, not the embedding / head: flops' "blocks").
_HFU_POLICY = {"none": "none", "attention": "attention", "full": "blocks"}


def _impls_and_policies(device: str) -> dict[str, str]:
    """Implementation name -> the recompute policy it runs."""
    impls = {"palm_fast": "none", "palm_fast_recompute_full": "full"}
    if device == "cuda":
        impls["palm_fast_recompute_attention"] = "attention"
    impls.update({"eager": "none", "compile": "none"})
    return impls


@register("model", default_dtypes={"cpu": (torch.float32,), "cuda": (torch.bfloat16,)})
def model_cases(ctx: BenchContext):
    cfg, B, T = sizes(ctx)
    policies = _impls_and_policies(ctx.device)
    note = None
    if fast_model_class() is None:
        note = ("palm_fast.nn.PaLM is not in this checkout (it comes with the fast block, "
                "issue 4): the fast-model rows are left out")
        warnings.warn(f"model.train: {note}", stacklevel=2)
        policies = {k: v for k, v in policies.items() if not k.startswith("palm_fast")}
    # impl -> _Trainer. CPU: all alive at once (the small config), timed round-robin so the
    # ratios survive a shared machine's changes of pace; CUDA (1B): at most one alive.
    interleave = ctx.device == "cpu"
    state: dict = {}

    def trainer(impl: str) -> _Trainer:
        if impl not in state:
            if not interleave:
                state.clear()
            gc.collect()
            if ctx.device == "cuda":
                torch.cuda.empty_cache()
            state[impl] = _Trainer(impl, cfg, ctx.device, ctx.dtype, policies[impl])
        return state[impl]

    def setup():
        g = torch.Generator().manual_seed(1)
        return torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(ctx.device)

    def run(impl):
        return lambda tokens: trainer(impl).step(tokens)

    model_fpt = flops.model_flops_per_token(cfg, T)
    datasheet = (flops.datasheet_peak_flops(torch.cuda.get_device_name())
                 if ctx.device == "cuda" and ctx.dtype in (torch.bfloat16, torch.float16) else None)

    def derive(rec: dict, peaks: dict) -> dict:
        policy = _HFU_POLICY[rec["recompute"]]
        tps = B * T / (rec["ms"] * 1e-3)
        # against the measured matmul peak of the run's own dtype only (as pct_of_peak):
        # a bf16 run on a CPU measures the fp32 peak
        same = peaks.get("matmul_dtype", dtype_name(ctx.dtype)) == dtype_name(ctx.dtype)
        measured = peaks["matmul_tflops"] * 1e12 if same else None
        t = state.get(rec["impl"])
        out = {
            "tokens_per_s": tps,
            "model_flops_per_token": model_fpt,
            "hardware_flops_per_token": flops.hardware_flops_per_token(cfg, T, policy),
            "hfu_policy": policy,
            "peak_measured_tflops": peaks["matmul_tflops"],
            "peak_measured_dtype": peaks.get("matmul_dtype"),
            "peak_datasheet_tflops": datasheet / 1e12 if datasheet else None,
            "mfu_measured_peak": flops.mfu(tps, cfg, T, peak_flops_per_device=measured) if same else None,
            "hfu_measured_peak": (flops.hfu(tps, cfg, T, peak_flops_per_device=measured, recompute=policy)
                                  if same else None),
            "mfu": flops.mfu(tps, cfg, T, peak_flops_per_device=datasheet) if datasheet else None,
            "hfu": (flops.hfu(tps, cfg, T, peak_flops_per_device=datasheet, recompute=policy)
                    if datasheet else None),
            "first_loss": t.first_loss if t is not None else None,
        }
        return out

    yield Case(
        name="model.train",
        shape={"config": cfg.name, "B": B, "T": T, "N": cfg.param_count()},
        dtype=ctx.dtype,
        bytes=0,
        flops=model_fpt * B * T,   # model FLOPs of the step: pct_of_peak is MFU vs measured peak
        bound="compute",
        setup=setup,
        impls={impl: run(impl) for impl in policies},
        extra={"optimizer": "AdamW", "loss": "cross_entropy + z_loss",
               **({"note": note} if note else {})},
        impl_extra={impl: {"recompute": p} for impl, p in policies.items()},
        repeats=7 if ctx.device == "cpu" else 10,
        interleave=interleave,
        rotate=False,
        derive=derive,
        teardown=state.clear,
    )
