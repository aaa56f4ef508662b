"""Each registered benchmark case and implementation as a pytest-benchmark test.

Timed call = the implementation on the next input set, then ``torch.cuda.synchronize()``
on a GPU, so the time covers the kernels and not only their launch. Cases with
``repeats`` (a training step) run that many rounds after two warm-up rounds; the rest
let pytest-benchmark calibrate. ``extra_info`` carries the suite's record (GB/s,
TFLOP/s, % of peak, MFU/HFU for the model) computed from the median.
"""
from __future__ import annotations

import torch

from palm_fast.benchmarks import harness


def test_case(benchmark, bench_item, bench_peaks):
    ctx, case, impl = bench_item
    benchmark.group = f"{case.name} {harness.dtype_name(case.dtype)}"
    call = harness.cycling(case.impls[impl], harness.input_sets(case, ctx))

    def timed():
        out = call()
        if ctx.device == "cuda":
            torch.cuda.synchronize()
        return out

    try:
        if case.repeats is not None:
            benchmark.pedantic(timed, rounds=case.repeats, warmup_rounds=2, iterations=1)
        else:
            benchmark(timed)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # None under --benchmark-disable
            s = stats.stats
            t = harness.Timing(s.median * 1e3, s.min * 1e3, s.max * 1e3, s.rounds)
            rec = harness.make_record(case, ctx, impl, t, bench_peaks)
            benchmark.extra_info.update({k: v for k, v in rec.items()
                                         if isinstance(v, (int, float, str, dict, type(None)))})
    finally:
        if case.teardown is not None:
            case.teardown()
