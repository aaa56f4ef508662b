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
    # Smoke mode (the CI test of every registered case): implies ``quick`` and, unless a
    # config is named, the tiny model preset (SMOKE_CONFIG) for families that take
    # ``config``; families may shrink further on ``smoke``. run_case calls each
    # implementation once to warm up and times one more call, skips the implementations
    # in SMOKE_SKIP_IMPLS and does not rotate inputs. A new family gets smoke coverage
    # without doing anything.
    smoke: bool = False

    def __post_init__(self):
        if self.smoke:
            self.quick = True
            if self.config is None:
                self.config = SMOKE_CONFIG


SMOKE_CONFIG = "palm-tiny"
# Implementations a smoke run leaves out: compilation costs seconds to a minute per case
# on a CPU, and torch.compile itself is tested by the op tests (fullgraph=True).
SMOKE_SKIP_IMPLS = frozenset({"compile"})


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
    extra: dict = field(default_factory=dict)  # case-specific figures copied into every record
    impl_extra: dict[str, dict] = field(default_factory=dict)  # impl -> figures for its record only
                                                                # (e.g. {"palm_fast": {"kernels": 1}})
    tokens: float = 0.0             # tokens produced per call: records tokens_per_s (0: none)
    # For expensive cases (a whole training step): the number of timed calls after two
    # warm-up calls, on CPU and CUDA alike, instead of the harness's time budget.
    repeats: int | None = None
    # With ``repeats``: time the implementations round-robin (two warm-up rounds, then
    # ``repeats`` rounds of one call each, medians), so that a machine that slows down or
    # speeds up mid-case (a shared VM) moves every implementation alike and their ratios
    # hold. Needs every implementation's state alive at once.
    interleave: bool = False
    rotate: bool = True             # False: one input set (e.g. inputs that hold a model)
    # False: no pct_of_peak (e.g. a memory roofline over data the cache holds between calls)
    report_pct: bool = True
    # (record, peaks) -> more figures for that record, computed after timing
    # (e.g. tokens/s and MFU of a training step).
    derive: Callable[[dict, dict], dict] | None = None
    teardown: Callable[[], None] | None = None  # called once all implementations ran (free memory)


CaseGenerator = Callable[[BenchContext], Iterable[Case]]
REGISTRY: dict[str, CaseGenerator] = {}
# family -> {device: dtypes} it runs in when the user names no --dtype (default: every
# default dtype of the device). The whole-model step in bf16 on a CPU without bf16
# matmul units takes seconds, so the model family runs fp32 there unless asked.
DEFAULT_DTYPES: dict[str, dict[str, tuple[torch.dtype, ...]]] = {}


def register(family: str, default_dtypes: dict[str, tuple[torch.dtype, ...]] | None = None
             ) -> Callable[[CaseGenerator], CaseGenerator]:
    """Register a case generator under an op family name (used by ``--only``).

    ``default_dtypes`` optionally narrows, per device, the dtypes the family runs in
    when no ``--dtype`` is given (an explicit ``--dtype`` always runs).
    """
    def deco(fn: CaseGenerator) -> CaseGenerator:
        if family in REGISTRY and REGISTRY[family] is not fn:
            raise ValueError(f"benchmark family {family!r} registered twice")
        REGISTRY[family] = fn
        if default_dtypes is not None:
            DEFAULT_DTYPES[family] = dict(default_dtypes)
        return fn
    return deco


def load_all() -> dict[str, CaseGenerator]:
    """Import every ``bench_*`` module of this package so their cases register."""
    import palm_fast.benchmarks as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("bench_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    return REGISTRY


# --------------------------------------------------------------------------- timing

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def roofline_note(device: str, resident_bytes: float) -> tuple[bool, dict]:
    """``(report_pct, extra)`` for a case whose bytes count the same ``resident_bytes``
    (model weights) read again on every step: on a CPU whose last-level cache is more than
    half that (the rotation rule: data is read from DRAM once it totals twice the cache),
    the reads partly hit the cache and a % of the DRAM copy bandwidth would be no roofline."""
    if device == "cpu" and resident_bytes < 2 * cache_bytes(device):
        return False, {"note": f"weights ({resident_bytes / 2**20:.1f} MiB) under twice the "
                               f"{cache_bytes(device) // 2**20} MiB last-level cache: no % of the "
                               "DRAM copy peak"}
    return True, {}


def cache_bytes(device: str) -> int:
    """Last-level cache size used to decide how many input sets to rotate."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20)
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            txt = f.read().strip()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(txt[-1], 1)
        return int(txt.rstrip("KMG")) * mult
    except (OSError, ValueError):
        return 32 * 2**20


def n_rotations(set_bytes: float, device: str, max_sets: int | None = None) -> int:
    """Enough input sets that their total exceeds twice the cache (bounded).

    CPU: up to 64 sets, so that a 2 MiB set (the decode case's K/V cache) still totals
    twice a 32 MiB L3 and is read from DRAM, as the % of copy bandwidth assumes; with
    the earlier bound of 8 such a case cycled through 16 MiB, which the L3 can hold.
    CUDA: up to 8; ``do_bench`` also flushes the L2 before every timed call.
    """
    if set_bytes <= 0:
        return 1
    if max_sets is None:
        max_sets = 8 if device == "cuda" else 64
    return int(max(1, min(max_sets, math.ceil(2 * cache_bytes(device) / set_bytes))))


@dataclass
class Timing:
    ms: float
    ms_min: float
    ms_max: float
    n: int

    @classmethod
    def of(cls, times: list[float]) -> Timing:
        """The median, fastest and slowest of ``times`` (ms)."""
        return cls(statistics.median(times), min(times), max(times), len(times))


def time_fn(fn: Callable[[], Any], device: str, *, quick: bool = False, repeats: int | None = None,
            smoke: bool = False) -> Timing:
    """Median time of ``fn()`` in milliseconds.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls).
    CPU: warm-up, then repeated ``perf_counter`` measurements, median.
    ``repeats`` (expensive calls such as a training step): two warm-up calls, then that
    many timed calls, each synchronised (CUDA) on both devices. ``smoke``: one warm-up
    call and one timed call.
    """
    if smoke or repeats is not None:
        n = 1 if smoke else max(1, int(repeats))
        for _ in range(1 if smoke else 2):
            fn()
        _sync(device)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        return Timing.of(times)
    if device == "cuda":
        import triton.testing

        warmup, rep = (10, 40) if quick else (25, 200)
        times = triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="all")
        times = list(times)
        return Timing.of(times)
    # CPU
    fn()  # first call: compilation, allocation

    def probe() -> float:
        t0 = time.perf_counter()
        fn()
        return max(time.perf_counter() - t0, 1e-6)

    once = probe()
    if once >= 0.1:  # one slow call (a hiccup of the machine) must not shorten the series
        once = min(once, probe())
    # Seconds per measurement series: the whole default suite must finish in about two
    # minutes on a 2-core CPU, so a series is short (0.3 s); the median of >= 5 calls holds.
    budget = 0.15 if quick else 0.3
    if once >= 0.1:
        # A slow call (a whole generation, a training step): the two calls above warmed it
        # up; three timed calls bound the series at about five calls in all.
        n, warmup = max(3, int(budget / once)), 0
    else:
        n = int(min(200, max(5, budget / once)))
        warmup = min(3, n)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing.of(times)


# --------------------------------------------------------------------------- peaks

def measure_peaks(device: str, quick: bool = False) -> dict:
    """Measure the copy bandwidth and matmul throughput of ``device`` in this run.

    Copy: ``dst.copy_(src)`` into a preallocated buffer, counting bytes read plus
    bytes written. Matmul: a large square product (bf16 on CUDA, fp32 on CPU) on
    random data. CUDA: the median call; CPU: the fastest call (a peak; on a shared VM
    the median mixes the machine's paces, and a case timed at a faster pace than the
    peak's median read above 100% of it).
    """
    if device == "cuda":
        n_bytes = (256 if quick else 1024) * 2**20
        mm_n, mm_dtype = (4096 if quick else 8192), torch.bfloat16
    else:
        n_bytes = (64 if quick else 256) * 2**20
        mm_n, mm_dtype = (1024 if quick else 2048), torch.float32
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    def best(t: Timing) -> float:
        return t.ms if device == "cuda" else t.ms_min

    t = time_fn(lambda: dst.copy_(src), device, quick=quick)
    copy_gbps = 2 * n_bytes / (best(t) * 1e-3) / 1e9
    a = torch.randn(mm_n, mm_n, device=device, dtype=mm_dtype)
    b = torch.randn(mm_n, mm_n, device=device, dtype=mm_dtype)
    t = time_fn(lambda: torch.mm(a, b), device, quick=quick)
    mm_tflops = 2 * mm_n**3 / (best(t) * 1e-3) / 1e12
    return {"copy_gbps": copy_gbps, "matmul_tflops": mm_tflops,
            "matmul_shape": [mm_n, mm_n, mm_n], "matmul_dtype": str(mm_dtype).replace("torch.", "")}


# --------------------------------------------------------------------------- records

def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _git(*args: str) -> str | None:
    """``git args`` in this package's checkout (None outside one: e.g. a non-editable
    install, whose directory may sit inside some other repository)."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here,
                             capture_output=True, text=True, timeout=5)
        root = top.stdout.strip()
        if top.returncode != 0 or not os.path.isfile(os.path.join(root, "benchmarks", "harness.py")) \
                or not os.path.samefile(os.path.join(root, "benchmarks"), here):
            return None
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _git_commit() -> str | None:
    """The checkout's commit; ``PALM_FAST_GIT_COMMIT`` names it where there is no .git
    (a copied working tree, as on our GPU machines)."""
    import os

    if os.environ.get("PALM_FAST_GIT_COMMIT"):
        return os.environ["PALM_FAST_GIT_COMMIT"]
    commit = (_git("rev-parse", "HEAD") or "").strip()
    return commit if len(commit) == 40 else None


def _git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (None: unknown)."""
    import os

    if os.environ.get("PALM_FAST_GIT_COMMIT"):
        return None
    out = _git("status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out.strip())


def meta(device: str, peaks: dict, argv: list[str] | None = None) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": device,
        "device_name": device_name(device),
        "peaks": peaks,
        "command": " ".join(argv if argv is not None else sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def run_case(case: Case, ctx: BenchContext, peaks: dict,
             on_impl: Callable[[str], None] | None = None) -> list[dict]:
    """Time every implementation of ``case`` on the same rotated inputs."""
    try:
        return _run_case(case, ctx, peaks, on_impl)
    finally:
        if case.teardown is not None:
            case.teardown()


def figures(case: Case, ms: float, peaks: dict) -> dict:
    """GB/s, TFLOP/s and % of the run's measured peak (the case's bound) for a time."""
    sec = ms * 1e-3
    gbps = case.bytes / sec / 1e9 if case.bytes else None
    tflops = case.flops / sec / 1e12 if case.flops else None
    if case.bound == "compute" and tflops is not None:
        # against the matmul peak of the case's own dtype only (the run measures one: bf16
        # on CUDA, fp32 on a CPU, where ATen's bf16 matmul runs far below the fp32 peak)
        same = peaks.get("matmul_dtype", dtype_name(case.dtype)) == dtype_name(case.dtype)
        pct = 100.0 * tflops / peaks["matmul_tflops"] if same else None
    elif gbps is not None:
        pct = 100.0 * gbps / peaks["copy_gbps"]
    else:
        pct = None
    return {"gbps": gbps, "tflops": tflops, "pct_of_peak": pct if case.report_pct else None}


def input_bytes(inputs: Any) -> int:
    """Bytes of the tensors in one input set (tuples, lists, dicts, and the tensor
    attributes of other objects such as a KV cache; each tensor counted once)."""
    seen, total = set(), 0

    def visit(x, depth=0):
        nonlocal total
        if isinstance(x, torch.Tensor):
            key = (x.data_ptr(), x.numel(), x.dtype, x.device)
            if key not in seen:
                seen.add(key)
                total += x.numel() * x.element_size()
        elif isinstance(x, (tuple, list)):
            for y in x:
                visit(y, depth)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y, depth)
        elif depth == 0 and hasattr(x, "__dict__") and not isinstance(x, torch.nn.Module):
            for y in vars(x).values():
                visit(y, depth + 1)

    visit(inputs)
    return total


def input_sets(case: Case, ctx: BenchContext) -> list:
    """The input sets an implementation cycles through: enough that the inputs (the data
    that rotates; outputs are written fresh) total twice the last-level cache when they
    are small; one in smoke mode or for a case that asks not to rotate. Sized on the
    smaller of a set's bytes and the bytes the op moves (``case.bytes``): a set can hold
    tensors only some implementations read (the decode case's paged copy and multi-head
    cache), and sized on the whole set, ours cycled through 8 MiB, which the L3 holds."""
    if ctx.smoke or not case.rotate:
        return [case.setup()]
    first = case.setup()
    sizes = [b for b in (input_bytes(first), case.bytes) if b > 0]
    n = n_rotations(min(sizes) if sizes else 0, ctx.device)
    return [first] + [case.setup() for _ in range(n - 1)]


def cycling(fn: Callable[[Any], Any], sets: list) -> Callable[[], Any]:
    """``fn`` as a zero-argument call that takes the next input set each time."""
    counter = [0]

    def call():
        inputs = sets[counter[0] % len(sets)]
        counter[0] += 1
        return fn(inputs)

    return call


def make_record(case: Case, ctx: BenchContext, impl: str, t: Timing | None, peaks: dict,
                error: str | None = None) -> dict:
    """The record of one (case, implementation) per DESIGN.md, from its timing (None and
    ``error`` for an implementation that failed)."""
    rec = {
        "name": case.name, "impl": impl, "device": ctx.device,
        "dtype": dtype_name(case.dtype), "shape": dict(case.shape),
    }
    if t is None:
        rec.update({"ms": None, "ms_min": None, "ms_max": None, "gbps": None, "tflops": None,
                    "pct_of_peak": None, "error": error})
        return rec
    rec.update({"ms": t.ms, "ms_min": t.ms_min, "ms_max": t.ms_max, "n_timed": t.n})
    rec.update(figures(case, t.ms, peaks))
    rec.update({"bytes": case.bytes, "flops": case.flops, "bound": case.bound})
    rec.update(case.extra)
    rec.update(case.impl_extra.get(impl, {}))
    if case.tokens:
        rec["tokens_per_s"] = case.tokens / (t.ms * 1e-3)
    if case.derive is not None:
        rec.update(case.derive(rec, peaks))
    return rec


def _interleaved(case: Case, ctx: BenchContext, sets: list, peaks: dict,
                 on_impl: Callable[[str], None] | None) -> list[dict]:
    """Round-robin timing of ``case.impls`` (see ``Case.interleave``)."""
    calls = {impl: cycling(fn, sets) for impl, fn in case.impls.items()}
    times: dict[str, list[float]] = {impl: [] for impl in calls}
    failed: dict[str, str] = {}
    for rnd in range(2 + case.repeats):
        for impl, call in calls.items():
            if impl in failed:
                continue
            if on_impl is not None and rnd == 0:
                on_impl(impl)
            try:
                t0 = time.perf_counter()
                call()
                _sync(ctx.device)
            except Exception as e:  # reported, not hidden
                failed[impl] = f"{type(e).__name__}: {e}"[:500]
                continue
            if rnd >= 2:
                times[impl].append((time.perf_counter() - t0) * 1e3)
    return [make_record(case, ctx, impl, None, peaks, failed[impl]) if impl in failed
            else make_record(case, ctx, impl, Timing.of(times[impl]), peaks) for impl in calls]


def _run_case(case: Case, ctx: BenchContext, peaks: dict,
              on_impl: Callable[[str], None] | None) -> list[dict]:
    # torch.compile keeps its compiled graphs per Python function: a case wrapping the same
    # function as an earlier case at another shape would get a recompiled dynamic-shape
    # graph (measured 2.5-3.2x slower than a static one for RoPE on the CPU). Every case
    # starts from a clean state, so its compile baseline is specialised to its shape.
    torch._dynamo.reset()
    try:
        sets = input_sets(case, ctx)
    except Exception as e:  # (e.g. out of memory building the inputs): every impl reported, the
        # run goes on with the next case (an exception here aborted the run and its JSON)
        err = f"setup: {type(e).__name__}: {e}"[:500]
        return [dict(make_record(case, ctx, impl, None, peaks, err), speedup_vs_eager=None)
                for impl in case.impls]
    if case.interleave and case.repeats is not None and not ctx.smoke:
        records = _interleaved(case, ctx, sets, peaks, on_impl)
    else:
        records = _one_by_one(case, ctx, sets, peaks, on_impl)
    eager = next((r for r in records if r["impl"] == "eager" and r.get("ms")), None)
    for r in records:
        r["speedup_vs_eager"] = (eager["ms"] / r["ms"]) if (eager and r.get("ms")) else None
    return records


def _one_by_one(case: Case, ctx: BenchContext, sets: list, peaks: dict,
                on_impl: Callable[[str], None] | None) -> list[dict]:
    """Each implementation's series in turn (``time_fn``)."""
    records = []
    for impl, fn in case.impls.items():
        if ctx.smoke and impl in SMOKE_SKIP_IMPLS:
            continue
        if on_impl is not None:
            on_impl(impl)
        try:
            t = time_fn(cycling(fn, sets), ctx.device, quick=ctx.quick, repeats=case.repeats,
                        smoke=ctx.smoke)
        except Exception as e:  # an implementation that fails is reported, not hidden
            records.append(make_record(case, ctx, impl, None, peaks, f"{type(e).__name__}: {e}"[:500]))
            continue
        records.append(make_record(case, ctx, impl, t, peaks))
    return records


def collect_cases(ctx: BenchContext, only: list[str] | None = None,
                  default_dtypes: bool = False) -> list[Case]:
    """Every case of every registered family (or of the families in ``only``).

    ``default_dtypes``: the user named no dtype, so skip families whose
    ``DEFAULT_DTYPES`` for this device leave ``ctx.dtype`` out.
    """
    reg = load_all()
    unknown = [o for o in (only or []) if o not in reg]
    if unknown:
        raise ValueError(f"--only: unknown benchmark family {unknown}; known: {sorted(reg)}")
    cases = []
    for family, gen in sorted(reg.items()):
        if only and family not in only:
            continue
        wanted = DEFAULT_DTYPES.get(family, {}).get(ctx.device)
        if default_dtypes and wanted is not None and ctx.dtype not in wanted:
            continue
        cases.extend(gen(ctx))
    return cases


def result_doc(meta_: dict, records: list[dict]) -> dict:
    return {"meta": meta_, "records": records}


def as_jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, torch.dtype):
        return dtype_name(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
