"""pytest-benchmark over the registered cases: ``pytest benchmarks/ --benchmark-only``.

Every (case, implementation) that ``palm-fast bench`` would run becomes one test of
``benchmarks/test_cases.py``, with the same sizes and inputs. Options (all optional):

  --bench-device auto|cpu|cuda   (default auto: cuda when present)
  --bench-dtype  fp32,bf16       (default: the device's defaults, as palm-fast bench)
  --bench-only   rope,model      (benchmark families)
  --bench-config palm-small      (model preset for block / model cases)
  --bench-quick                  (smaller shapes)

The default test command (``python -m pytest`` from the repository root) collects only
``tests/`` (pyproject testpaths), where tests/test_suite.py smoke-runs every case.
"""
from __future__ import annotations

import pytest
import torch

from palm_fast import cli
from palm_fast.benchmarks import harness


def pytest_addoption(parser):
    g = parser.getgroup("palm_fast benchmarks")
    g.addoption("--bench-device", choices=["auto", "cpu", "cuda"], default="auto")
    g.addoption("--bench-dtype", default=None, help="comma-separated dtypes")
    g.addoption("--bench-only", default=None, help="comma-separated benchmark families")
    g.addoption("--bench-config", default=None, help="model preset for block/model cases")
    g.addoption("--bench-quick", action="store_true", help="smaller shapes")


def _device(config) -> str:
    device = config.getoption("--bench-device")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pytest_generate_tests(metafunc):
    if "bench_item" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    device = _device(cfg)
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: no CUDA device is available")
    text = cfg.getoption("--bench-dtype")
    only = cfg.getoption("--bench-only")
    only = [s.strip() for s in only.split(",")] if only else None
    params, ids = [], []
    for dtype in cli._parse_dtypes(text, device):
        ctx = harness.BenchContext(device=device, dtype=dtype, quick=cfg.getoption("--bench-quick"),
                                   config=cfg.getoption("--bench-config"))
        for case in harness.collect_cases(ctx, only, default_dtypes=not text):
            shape = ",".join(f"{k}={v}" for k, v in case.shape.items())
            for impl in case.impls:
                params.append((ctx, case, impl))
                ids.append(f"{case.name}-{harness.dtype_name(case.dtype)}-{shape}-{impl}")
    metafunc.parametrize("bench_item", params, ids=ids)


@pytest.fixture(scope="session")
def bench_peaks(request):
    """The device's copy and matmul peaks, measured once per session (for % of peak)."""
    return harness.measure_peaks(_device(request.config), quick=request.config.getoption("--bench-quick"))
