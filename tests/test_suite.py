"""The benchmark suite: a smoke run of every registered case (each family gets it without
writing a test), the model training-step figures (MFU/HFU per PaLM Appendix B), result
comparison, the figure, and the CLI around them."""
from __future__ import annotations

import json
import math
import sys
import time

import pytest
import torch

from palm_fast import cli
from palm_fast.benchmarks import bench_model, harness
from palm_fast.benchmarks import compare as cmp
from palm_fast.config import get_config
from palm_fast.reference import PaLM as RefPaLM

RECORD_KEYS = {"name", "impl", "device", "dtype", "shape", "ms", "ms_min", "ms_max", "gbps",
               "tflops", "pct_of_peak", "speedup_vs_eager"}
FAKE_PEAKS = {"copy_gbps": 10.0, "matmul_tflops": 0.05, "matmul_shape": [1, 1, 1],
              "matmul_dtype": "float32"}


def _best_ms(fn) -> float:
    return harness.time_fn(fn, "cpu", quick=True).ms_min


def _ceilings() -> dict:
    """The best copy bandwidth of a DRAM-sized and of a cache-sized buffer (a small case may
    run from cache) and the best matmul throughput, measured now."""
    ceiling_gbps = 0.0
    for n_bytes in (64 * 2**20, 2**20):
        src = torch.randn(n_bytes // 4)
        dst = torch.empty_like(src)
        ms = _best_ms(lambda dst=dst, src=src: dst.copy_(src))
        ceiling_gbps = max(ceiling_gbps, 2 * n_bytes / (ms * 1e-3) / 1e9)
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    return {"gbps": ceiling_gbps, "tflops": 2 * n**3 / (_best_ms(lambda: a @ b) * 1e-3) / 1e12}


class _Ceiling(dict):
    """Ceilings for the sanity bound: a case above 1.2x its ceiling declares more bytes or
    FLOPs than it can have moved or done. On a shared machine the first measurement may
    have run while another job held a core: a case above it gets the ceilings measured
    again (kept at their best) before the bound fails."""

    def check(self, key: str, value: float) -> bool:
        for _ in range(3):
            if value <= 1.2 * self[key]:
                return True
            fresh = _ceilings()
            for k in self:
                self[k] = max(self[k], fresh[k])
        return value <= 1.2 * self[key]


@pytest.fixture(scope="module")
def peaks():
    """The run's peaks (as ``palm-fast bench --quick`` measures them), plus the ceilings of
    the sanity bound (``_Ceiling``)."""
    p = harness.measure_peaks("cpu", quick=True)
    c = _ceilings()
    return p, _Ceiling(gbps=max(c["gbps"], p["copy_gbps"]), tflops=max(c["tflops"], p["matmul_tflops"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_registered_case_smoke(dtype, peaks):
    """Every case of every registered family runs in smoke mode (tiny sizes, one warm-up
    and one timed call, no torch.compile) and produces a sane record per implementation."""
    run_peaks, ceiling = peaks
    ctx = harness.BenchContext(device="cpu", dtype=dtype, smoke=True)
    assert ctx.quick
    cases = harness.collect_cases(ctx)
    families = {c.name.split(".")[0] for c in cases}
    assert {"rope", "swiglu", "layer_norm", "block", "decode", "generate", "model"} <= families
    for case in cases:
        assert case.impls, f"{case.name}: no implementation"
        assert case.bound in ("memory", "compute")
        assert case.bytes > 0 or case.flops > 0, f"{case.name} declares neither bytes nor FLOPs"
        recs = harness.run_case(case, ctx, run_peaks)
        impls = [i for i in case.impls if i not in harness.SMOKE_SKIP_IMPLS]
        assert [r["impl"] for r in recs] == impls
        for r in recs:
            where = f"{case.name}/{r['impl']} {r['dtype']}"
            assert "error" not in r, f"{where}: {r.get('error')}"
            assert RECORD_KEYS <= set(r), where
            assert r["name"] == case.name and r["device"] == "cpu" and r["n_timed"] == 1
            assert 0 < r["ms_min"] <= r["ms"] <= r["ms_max"], where
            if case.bytes:
                assert math.isfinite(r["gbps"]) and 0 < r["gbps"], where
                assert ceiling.check("gbps", r["gbps"]), (where, r["gbps"], dict(ceiling))
            if case.flops:
                assert math.isfinite(r["tflops"]) and 0 < r["tflops"], where
                assert ceiling.check("tflops", r["tflops"]), (where, r["tflops"], dict(ceiling))
            pct = r["pct_of_peak"]
            if not case.report_pct:
                assert pct is None, where   # (e.g. weights the last-level cache holds)
            elif case.bound == "compute" and r["dtype"] != run_peaks.get("matmul_dtype", r["dtype"]):
                assert pct is None, where   # no peak measured for this dtype
            else:
                assert pct is not None and math.isfinite(pct) and pct > 0, where
                peak = run_peaks["matmul_tflops"] if case.bound == "compute" else run_peaks["copy_gbps"]
                figure = r["tflops"] if case.bound == "compute" else r["gbps"]
                assert pct == pytest.approx(100 * figure / peak), where
            if "eager" in case.impls:
                assert r["speedup_vs_eager"] > 0, where
        json.dumps(recs)  # the records are JSON as they are


def _model_records():
    ctx = harness.BenchContext(device="cpu", dtype=torch.float32, smoke=True)
    (case,) = list(bench_model.model_cases(ctx))
    return case, harness.run_case(case, ctx, FAKE_PEAKS)


def test_model_train_figures_follow_palm_appendix_b():
    case, recs = _model_records()
    cfg = get_config("palm-tiny")
    B, T = case.shape["B"], case.shape["T"]
    # Written out from the paper, not through palm_fast.flops.
    N = cfg.param_count()
    LHQT = cfg.n_layers * cfg.n_heads * cfg.head_dim * T
    # hardware FLOPs by the model's recompute argument: its "full" checkpoints every block,
    # not the embedding / head (V d) or the final norm (d): 6N + 2 N_blocks + 16 LHQT
    n_blocks = N - cfg.vocab_size * cfg.d_model - cfg.d_model
    hw = {"none": 6 * N + 12 * LHQT, "attention": 6 * N + 16 * LHQT,
          "full": 6 * N + 2 * n_blocks + 16 * LHQT}
    assert case.flops == (6 * N + 12 * LHQT) * B * T and case.bound == "compute"
    assert case.shape["N"] == N == RefPaLM(cfg).num_params()
    by_impl = {r["impl"]: r for r in recs}
    assert "eager" in by_impl
    for r in recs:
        tps = B * T / (r["ms"] * 1e-3)
        assert r["tokens_per_s"] == pytest.approx(tps)
        assert r["mfu_measured_peak"] == pytest.approx(tps * (6 * N + 12 * LHQT) / 0.05e12)
        assert r["hfu_measured_peak"] == pytest.approx(tps * hw[r["recompute"]] / 0.05e12)
        assert r["pct_of_peak"] == pytest.approx(100 * r["mfu_measured_peak"])
        assert r["mfu"] is None and r["hfu"] is None  # no datasheet peak for a CPU
        assert r["peak_measured_tflops"] == 0.05
        assert math.isfinite(r["first_loss"]) and r["first_loss"] > 0
    # Same seed, same tokens: every implementation starts from the same loss.
    for r in recs:
        assert r["first_loss"] == pytest.approx(by_impl["eager"]["first_loss"], rel=1e-4), r["impl"]
    if bench_model.fast_model_class() is not None:
        assert by_impl["palm_fast"]["recompute"] == "none"
        full = by_impl["palm_fast_recompute_full"]
        assert full["recompute"] == "full" and full["hfu_policy"] == "blocks"
        assert full["hfu_measured_peak"] / full["mfu_measured_peak"] == pytest.approx(
            hw["full"] / (6 * N + 12 * LHQT))


def test_model_train_mfu_only_against_the_same_dtype_peak():
    """A bf16 run on a CPU measures the fp32 matmul peak: pct_of_peak was withheld but
    mfu / hfu_measured_peak were still divided by that fp32 peak."""
    peaks = dict(FAKE_PEAKS, matmul_dtype="float32")
    rec = {"impl": "eager", "ms": 10.0, "recompute": "none"}
    for dtype, has in ((torch.bfloat16, False), (torch.float32, True)):
        ctx = harness.BenchContext(device="cpu", dtype=dtype, smoke=True)
        (case,) = list(bench_model.model_cases(ctx))
        got = case.derive(rec, peaks)
        assert (got["mfu_measured_peak"] is not None) == has == (got["hfu_measured_peak"] is not None)
        assert got["tokens_per_s"] > 0


def test_model_case_sizes_and_gpu_batch():
    ctx = harness.BenchContext(device="cpu", dtype=torch.float32)
    cfg, B, T = bench_model.sizes(ctx)
    assert cfg.name == "palm-small" and (B, T) == (2, 128)
    cfg, B, T = bench_model.sizes(harness.BenchContext("cpu", torch.float32, config="palm-tiny"))
    assert cfg.name == "palm-tiny" and T <= cfg.max_seq_len
    big = get_config("palm-1b")
    for mem_gib in (24, 80, 141):
        mem = mem_gib * 2**30
        b = bench_model.gpu_batch(big, 2048, torch.bfloat16, mem)
        assert b in (1, 2, 4, 8)
        assert b == 1 or bench_model.estimate_train_bytes(big, b, 2048, torch.bfloat16) <= 0.85 * mem
        assert b == 8 or bench_model.estimate_train_bytes(big, 2 * b, 2048, torch.bfloat16) > 0.85 * mem
    # The reference's fp32 T x T scores dominate: B = 4 on an 80 GB H100.
    assert bench_model.gpu_batch(big, 2048, torch.bfloat16, 80 * 2**30) == 4


def test_model_family_runs_fp32_by_default_on_cpu():
    harness.load_all()
    assert harness.DEFAULT_DTYPES["model"]["cpu"] == (torch.float32,)
    bf16 = harness.BenchContext("cpu", torch.bfloat16, quick=True)
    names = {c.name for c in harness.collect_cases(bf16, ["model"], default_dtypes=True)}
    assert names == set()
    names = {c.name for c in harness.collect_cases(bf16, ["model"], default_dtypes=False)}
    assert names == {"model.train"}


# --------------------------------------------------------------------------- compare

def _doc(rows, date="d", device="cpu-x"):
    recs = [{"name": n, "impl": i, "device": "cpu", "dtype": "float32", "shape": {"n": 1},
             "ms": ms, "ms_min": lo, "ms_max": hi} for n, i, ms, lo, hi in rows]
    return {"meta": {"date": date, "device_name": device, "torch": "t", "triton": "tr"},
            "records": recs}


def test_compare_flags_only_changes_beyond_noise():
    old = _doc([("a.fwd", "palm_fast", 10.0, 9.9, 10.5),    # tight series
                ("b.fwd", "palm_fast", 10.0, 7.0, 30.0),    # noisy: 30% spread
                ("c.fwd", "palm_fast", 10.0, 9.9, 10.1),
                ("d.fwd", "palm_fast", 10.0, 9.9, 10.1),
                ("gone.fwd", "eager", 1.0, 1.0, 1.0),
                ("e.fwd", "palm_fast", 10.0, 9.9, 10.1)])
    new = _doc([("a.fwd", "palm_fast", 12.0, 11.9, 12.2),   # +20% on a tight series
                ("b.fwd", "palm_fast", 12.0, 11.9, 12.2),   # +20% within old noise
                ("c.fwd", "palm_fast", 8.0, 7.9, 8.1),      # faster
                ("d.fwd", "palm_fast", 10.5, 10.4, 10.6),   # +5%: under the threshold
                ("e.fwd", "palm_fast", None, None, None),   # failed
                ("new.fwd", "palm_fast", 1.0, 1.0, 1.0)])
    rows = {r.key[0]: r for r in cmp.compare(old, new, threshold=0.10)}
    assert rows["a.fwd"].status == "regression" and rows["a.fwd"].ratio == pytest.approx(10 / 12)
    assert rows["b.fwd"].status == "same" and rows["b.fwd"].tolerance == pytest.approx(0.3 + 0.1 / 12)
    assert rows["c.fwd"].status == "improvement" and rows["c.fwd"].ratio == pytest.approx(1.25)
    assert rows["d.fwd"].status == "same"
    assert rows["e.fwd"].status == "error"
    assert rows["new.fwd"].status == "new" and rows["gone.fwd"].status == "missing"
    assert cmp.compare(old, new, threshold=0.25)[0].status == "same"
    with pytest.raises(ValueError, match="threshold"):
        cmp.compare(old, new, threshold=-1)
    # Records match on the shape too: a different shape is a different case.
    other = _doc([("a.fwd", "palm_fast", 12.0, 11.9, 12.2)])
    other["records"][0]["shape"] = {"n": 2}
    assert {r.status for r in cmp.compare(old, other)} == {"new", "missing"}


def test_compare_cli_exit_codes(tmp_path, capsys):
    old = _doc([("a.fwd", "palm_fast", 10.0, 9.9, 10.1)])
    new = _doc([("a.fwd", "palm_fast", 20.0, 19.9, 20.1)], device="cpu-y")
    po, pn = tmp_path / "old.json", tmp_path / "new.json"
    po.write_text(json.dumps(old))
    pn.write_text(json.dumps(new))
    assert cli.main(["compare", str(po), str(pn)]) == 0
    out = capsys.readouterr().out
    assert "regression" in out and "0.50x" in out and "device_name differs" in out
    assert cli.main(["compare", str(po), str(pn), "--fail-on-regression"]) == 2
    assert cli.main(["compare", str(po), str(po), "--fail-on-regression"]) == 0
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(SystemExit, match="bench JSON"):
        cli.main(["compare", str(po), str(tmp_path / "bad.json")])


# --------------------------------------------------------------------------- CLI: bench

def _toy_family(ctx):
    n = 1 << 14
    yield harness.Case(name="toy.fwd", shape={"n": n}, dtype=ctx.dtype, bytes=2 * n * 4, flops=n,
                       setup=lambda: torch.randn(n, dtype=ctx.dtype),
                       impls={"palm_fast": lambda x: x * 2, "eager": lambda x: x + x,
                              "compile": lambda x: x.mul(2)})


@pytest.fixture
def toy_registry(monkeypatch):
    reg = {"_toy": _toy_family}
    monkeypatch.setattr(harness, "REGISTRY", reg)
    monkeypatch.setattr(harness, "DEFAULT_DTYPES", {"_toy": {"cpu": (torch.float32,)}})
    monkeypatch.setattr(harness, "load_all", lambda: reg)
    monkeypatch.setattr(harness, "measure_peaks", lambda device, quick=False: dict(FAKE_PEAKS))
    return reg


def test_bench_plot_compare_and_default_dtypes(toy_registry, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, png = tmp_path / "run.json", tmp_path / "run.png"
    rc = cli.main(["bench", "--only", "_toy", "--device", "cpu", "--quick", "--json", str(path),
                   "--plot", str(png)])
    assert rc == 0
    doc = json.loads(path.read_text())
    # No --dtype: the family's default dtypes on this device (fp32 only), not fp32 + bf16.
    assert {r["dtype"] for r in doc["records"]} == {"float32"}
    assert doc["meta"]["wall_s"] > 0 and "toy.fwd float32" in doc["meta"]["case_wall_s"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # An explicit --dtype runs whatever it names.
    rc = cli.main(["bench", "--only", "_toy", "--device", "cpu", "--quick", "--dtype", "bf16",
                   "--json", str(tmp_path / "bf16.json")])
    assert {r["dtype"] for r in json.loads((tmp_path / "bf16.json").read_text())["records"]} == {"bfloat16"}
    # Compare against a doctored "old" run in which everything was 10x faster.
    old = json.loads(path.read_text())
    for r in old["records"]:
        r["ms"], r["ms_min"], r["ms_max"] = r["ms"] / 10, r["ms_min"] / 10, r["ms_max"] / 10
    (tmp_path / "old.json").write_text(json.dumps(old))
    capsys.readouterr()
    args = ["bench", "--only", "_toy", "--device", "cpu", "--quick", "--compare", str(tmp_path / "old.json")]
    assert cli.main(args) == 0
    assert "regression" in capsys.readouterr().out
    assert cli.main(args + ["--fail-on-regression"]) == 2
    # The plot subcommand draws a committed results file.
    assert cli.main(["plot", str(path), "--out", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 10_000


def test_plot_without_matplotlib_says_how_to_get_it(toy_registry, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        cli.main(["bench", "--only", "_toy", "--device", "cpu", "--quick", "--plot",
                  str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


def test_bench_rejects_unknown_config(toy_registry):
    with pytest.raises(SystemExit, match="--config"):
        cli.main(["bench", "--only", "_toy", "--device", "cpu", "--config", "palm-7"])


def test_timer_call_counts():
    """Smoke: one warm-up and one timed call; ``repeats``: two warm-ups and that many timed;
    a slow CPU call (>= 0.1 s): six calls in all (a second probe confirms the first is not
    a hiccup), three of them timed; one slow probe of a fast call keeps the long series."""
    calls = []

    def fn():
        calls.append(1)

    t = harness.time_fn(fn, "cpu", smoke=True)
    assert (len(calls), t.n) == (2, 1)
    calls.clear()
    t = harness.time_fn(fn, "cpu", repeats=4)
    assert (len(calls), t.n) == (6, 4) and 0 < t.ms_min <= t.ms <= t.ms_max
    calls.clear()

    def slow():
        calls.append(1)
        time.sleep(0.1)

    t = harness.time_fn(slow, "cpu")
    assert (len(calls), t.n) == (6, 3) and t.ms_min >= 100
    calls.clear()

    def hiccup():   # the first probe (second call) is slow, then fast
        calls.append(1)
        if len(calls) == 2:
            time.sleep(0.12)

    t = harness.time_fn(hiccup, "cpu")
    assert t.n >= 5 and t.ms < 50
