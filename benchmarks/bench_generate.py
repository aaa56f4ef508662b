"""End-to-end generation benchmark: ``palm_fast.generate`` vs the reference model's
``generate()`` (case ``generate.e2e``).

One call generates ``new`` tokens after each of ``B`` prompts of ``T`` tokens (prefill
included), greedy, no stop tokens: ``tokens_per_s = B * new / time``. CPU: the
``palm-small`` preset in fp32 (other CPU dtypes are skipped to keep the family short).
GPU: ``palm-1b``, with the decode step captured in a CUDA graph (``palm_fast``) and
without (``palm_fast_nograph``). ``palm_fast`` runs ``palm_fast.nn.PaLM`` loaded with the
reference model's weights.

Bytes: a decode step must read every weight once (the tied embedding as the output head)
and the cached K/V of every layer, so one call moves at least
``new * weight_bytes + sum over steps of 2 * L * B * (T + step) * hd * elem``;
``pct_of_peak`` is that against the copy bandwidth measured in the run (the roofline of
memory-bound decoding); none where the weights are under twice a CPU's last-level cache
(they are then partly read from it, not from DRAM: palm-small in fp32 is 24 MB). FLOPs:
``2 B ((N - V d) T + V d + N (new - 1))``: a prefill of T tokens, whose output head (the
tied ``[V, d]`` embedding) runs for the last prompt token only, and new - 1 decode steps
(the attention's FLOPs left out: under 1% at the CPU and ``--quick`` shapes, 1.3-1.4% at
the default GPU shape, palm-1b with 128 + 256 tokens). (Before the twenty-second session the
prefill was counted as 2 N per prompt token: the committed JSON records read 20.8% too many
FLOPs for palm-small and 4.5% for palm-1b where they counted T + new - 1 tokens, 24.7% and
5.0% where they counted T + new: ``cpu/bench.json``, ``h100/generate_quick.json``.)
"""
from __future__ import annotations

import torch

import palm_fast
from palm_fast import get_config
from palm_fast.benchmarks.harness import BenchContext, Case, register, roofline_note
from palm_fast.reference import PaLM


def _shape(ctx: BenchContext) -> tuple[str, int, int, int]:
    """(preset, batch, prompt length, new tokens)."""
    if ctx.device == "cuda":
        return ("palm-1b", 8, 128, 64) if ctx.quick else ("palm-1b", 8, 128, 256)
    return ("palm-small", 2, 8, 8) if ctx.quick else ("palm-small", 4, 16, 16)


# CPU default: fp32 only (a whole generate() per timed call; keeps the family ~15 s);
# an explicit --dtype still runs it.
@register("generate", default_dtypes={"cpu": (torch.float32,)})
def generate_cases(ctx: BenchContext):
    preset, B, T, new = _shape(ctx)
    cfg = get_config(ctx.config or preset)
    torch.manual_seed(0)
    model = PaLM(cfg).to(device=ctx.device, dtype=ctx.dtype).eval()
    elem = torch.empty((), dtype=ctx.dtype).element_size()
    n_params, head = model.num_params(), cfg.vocab_size * cfg.d_model   # (head: the tied embedding)
    weight_bytes = n_params * elem
    kv_bytes = sum(2 * cfg.n_layers * B * (T + s) * cfg.head_dim * elem for s in range(new - 1))

    def setup():
        return torch.randint(0, cfg.vocab_size, (B, T), device=ctx.device)

    # palm_fast.generate runs the fast model (same weights): its prefill uses the fused block
    fast = palm_fast.nn.PaLM(cfg).to(device=ctx.device, dtype=ctx.dtype).eval()
    fast.load_state_dict(model.state_dict())
    impls = {"palm_fast": lambda p: palm_fast.generate(fast, p, new)}
    if ctx.device == "cuda":
        impls["palm_fast_nograph"] = lambda p: palm_fast.generate(fast, p, new, cuda_graph=False)
    impls["eager"] = lambda p: model.generate(p, new)
    report_pct, note = roofline_note(ctx.device, weight_bytes)
    yield Case(
        name="generate.e2e", shape={"config": cfg.name, "B": B, "T": T, "new": new},
        dtype=ctx.dtype, bytes=new * weight_bytes + kv_bytes, setup=setup, impls=impls,
        # a prefill of T tokens (the head on the last one only), then new - 1 decode steps
        # (the last token is not fed back)
        flops=2 * B * ((n_params - head) * T + head + n_params * (new - 1)), tokens=B * new,
        report_pct=report_pct, extra=note,
        impl_extra={"palm_fast": {"cuda_graph": ctx.device == "cuda"}},
        # On the GPU the reference's generate runs seconds: a fixed count, not do_bench's
        # estimate-then-fill (which would call it about 7 times).
        repeats=3 if ctx.device == "cuda" else None,
    )
