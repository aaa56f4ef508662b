"""The one benchmark harness (DESIGN.md, "Benchmarks and results").

A benchmark file registers a *case generator*::

    from palm_fast.benchmarks.harness import Case, register

    @register("rope")
    def rope_cases(ctx):            # ctx: BenchContext (device, dtype, quick)
        yield Case(
            name="rope.fwd", shape={"B": 4, ...}, dtype=ctx.dtype,
            bytes=...,              # fewest bytes the op must move
            flops=0,                # useful FLOPs (0 for memory-bound ops)
            setup=make_inputs,      # () -> one input set (called several times to rotate)
            impls={"palm_fast": f, "eager": g, "compile": h},  # name -> fn(inputs)
        )

The harness times every implementation of every case in one run, with the same
inputs, and derives GB/s, TFLOP/s and % of the peaks it measured in that run.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class BenchContext:
    device: str            # "cpu" or "cuda"
    dtype: torch.dtype
    quick: bool = False    # smaller shapes / fewer repeats
    config: str | None = None  # model preset for block / model cases


@dataclass
class Case:
    name: str                       # "<op>.<fwd|bwd|fwdbwd>", e.g. "rope.fwd"
    shape: dict                     # the case's dimensions, recorded as-is
    dtype: torch.dtype
    bytes: float                    # fewest bytes moved (each input read once, each output written once)
    setup: Callable[[], Any]        # builds one fresh (random) input set
    impls: dict[str, Callable[[Any], Any]]  # implementation name -> fn(inputs)
    flops: float = 0.0              # useful floating-point operations
    bound: str = "memory"           # "memory" or "compute": which peak pct_of_peak uses
    extra: dict = field(default_factory=dict)  # case-specific figures copied into records


CaseGenerator = Callable[[BenchContext], Iterable[Case]]
REGISTRY: dict[str, CaseGenerator] = {}


def register(family: str) -> Callable[[CaseGenerator], CaseGenerator]:
    """Register a case generator under an op family name (used by ``--only``)."""
    def deco(fn: CaseGenerator) -> CaseGenerator:
        if family in REGISTRY and REGISTRY[family] is not fn:
            raise ValueError(f"benchmark family {family!r} registered twice")
        REGISTRY[family] = fn
        return fn
    return deco


def load_all() -> dict[str, CaseGenerator]:
    """Import every ``bench_*`` module of this package so their cases register."""
    import palm_fast.benchmarks as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("bench_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    return REGISTRY
