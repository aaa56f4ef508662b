"""The benchmark harness and ``palm-fast bench``: records, JSON, errors, and a smoke run of
every registered case (each implementation executed once on its own inputs)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from palm_fast import cli
from palm_fast.benchmarks import harness

RECORD_KEYS = {"name", "impl", "device", "dtype", "shape", "ms", "ms_min", "ms_max", "gbps",
               "tflops", "pct_of_peak"}


def _toy_family(fail: bool):
    def gen(ctx):
        n = 1 << 16

        def setup():
            return torch.randn(n, dtype=ctx.dtype)

        def boom(x):
            raise RuntimeError("deliberate failure")

        impls = {"palm_fast": lambda x: x * 2, "eager": lambda x: x + x}
        if fail:
            impls["broken"] = boom
        yield harness.Case(name="toy.fwd", shape={"n": n}, dtype=ctx.dtype, bytes=2 * n * 4,
                           flops=n, setup=setup, impls=impls)
    return gen


@pytest.fixture
def toy_registry(monkeypatch):
    reg = dict(harness.load_all())
    reg["_toy"] = _toy_family(False)
    reg["_toy_fail"] = _toy_family(True)
    monkeypatch.setattr(harness, "REGISTRY", reg)
    monkeypatch.setattr(harness, "load_all", lambda: reg)
    monkeypatch.setattr(harness, "measure_peaks",
                        lambda device, quick=False: {"copy_gbps": 10.0, "matmul_tflops": 0.1,
                                                     "matmul_shape": [1, 1, 1], "matmul_dtype": "float32"})
    return reg


def test_cli_writes_records_per_design(toy_registry, tmp_path, capsys):
    path = tmp_path / "out.json"
    rc = cli.main(["bench", "--only", "_toy", "--device", "cpu", "--dtype", "fp32", "--quick",
                   "--json", str(path)])
    assert rc == 0
    doc = json.loads(path.read_text())
    assert set(doc) == {"meta", "records"}
    meta = doc["meta"]
    for key in ("git_commit", "torch", "triton", "device_name", "peaks", "command"):
        assert key in meta
    assert meta["command"].startswith("palm-fast bench")
    recs = doc["records"]
    assert [r["impl"] for r in recs] == ["palm_fast", "eager"]
    for r in recs:
        assert RECORD_KEYS <= set(r)
        assert r["name"] == "toy.fwd" and r["dtype"] == "float32" and r["device"] == "cpu"
        assert r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert r["gbps"] == pytest.approx(2 * (1 << 16) * 4 / (r["ms"] * 1e-3) / 1e9)
        assert r["pct_of_peak"] == pytest.approx(100 * r["gbps"] / 10.0)
    eager = recs[1]
    assert eager["speedup_vs_eager"] == pytest.approx(1.0)
    assert "toy.fwd" in capsys.readouterr().out


def test_failing_setup_is_reported_and_the_run_goes_on(toy_registry, tmp_path):
    """A case whose inputs cannot be built (out of memory, say) aborted the whole run: no
    JSON, the cases already measured lost. Its implementations are reported as failed."""
    def bad_setup(ctx):
        for case in _toy_family(False)(ctx):
            def setup():
                raise RuntimeError("no memory for the inputs")
            yield dataclasses.replace(case, name="toy_bad.fwd", setup=setup)

    toy_registry["_toy_bad"] = bad_setup
    path = tmp_path / "out.json"
    rc = cli.main(["bench", "--only", "_toy_bad,_toy", "--device", "cpu", "--dtype", "fp32", "--quick",
                   "--json", str(path)])
    assert rc == 1
    recs = json.loads(path.read_text())["records"]
    bad = [r for r in recs if r["name"] == "toy_bad.fwd"]
    assert [r["impl"] for r in bad] == ["palm_fast", "eager"]
    assert all(r["ms"] is None and "setup: RuntimeError: no memory" in r["error"] for r in bad)
    assert all(r["ms"] > 0 for r in recs if r["name"] == "toy.fwd")


def test_failing_implementation_is_reported_not_hidden(toy_registry, tmp_path):
    path = tmp_path / "out.json"
    rc = cli.main(["bench", "--only", "_toy_fail", "--device", "cpu", "--dtype", "fp32", "--quick",
                   "--json", str(path)])
    assert rc == 1
    recs = {r["impl"]: r for r in json.loads(path.read_text())["records"]}
    assert recs["broken"]["ms"] is None and "deliberate failure" in recs["broken"]["error"]
    assert recs["palm_fast"]["ms"] > 0


def test_unknown_family_and_dtype_are_rejected(toy_registry):
    with pytest.raises(SystemExit, match="--only: unknown benchmark family"):
        cli.main(["bench", "--only", "nope", "--device", "cpu", "--quick"])
    with pytest.raises(SystemExit, match="--dtype"):
        cli.main(["bench", "--only", "_toy", "--device", "cpu", "--dtype", "int8"])


def test_cli_bad_files_and_threshold_give_one_line_errors(tmp_path, capsys):
    """A missing or malformed results file, or a bad --threshold: an exit with a message,
    not a traceback."""
    missing, text, other = tmp_path / "none.json", tmp_path / "a.txt", tmp_path / "b.json"
    text.write_text("not json")
    other.write_text('{"rows": []}')
    with pytest.raises(SystemExit, match="cannot read .*none.json"):
        cli.main(["compare", str(missing), str(missing)])
    with pytest.raises(SystemExit, match="a.txt is not JSON"):
        cli.main(["compare", str(text), str(text)])
    with pytest.raises(SystemExit, match="expected a palm-fast bench JSON"):
        cli.main(["plot", str(other), "--out", str(tmp_path / "x.png")])
    for bad in ("-1", "nan", "inf", "x"):
        with pytest.raises(SystemExit):
            cli.main(["compare", str(other), str(other), "--threshold", bad])
        assert "--threshold" in capsys.readouterr().err


def test_rotation_count_and_timer():
    assert harness.n_rotations(0, "cpu") == 1
    assert harness.n_rotations(1 << 40, "cpu") == 1
    assert harness.n_rotations(1024, "cpu") == 64
    assert harness.n_rotations(1024, "cpu", max_sets=8) == 8
    # a 2 MiB set (the CPU decode case) must total at least twice the last-level cache
    llc = harness.cache_bytes("cpu")
    n = harness.n_rotations(2 * 2**20, "cpu")
    assert n * 2 * 2**20 >= min(2 * llc, 64 * 2 * 2**20)
    t = harness.time_fn(lambda: torch.ones(10).sum(), "cpu", quick=True)
    assert 0 < t.ms_min <= t.ms <= t.ms_max and t.n >= 5


def test_rotation_counts_the_inputs_only():
    """Input sets rotate until the INPUTS total twice the cache (outputs are written fresh,
    so counting them, as case.bytes does, left the inputs at about one cache's size); a
    KV cache in a set counts its tensors' views (not a huge-page-rounded storage)."""
    from palm_fast.kv_cache import KVCache

    cache = KVCache(1, 2, 1024, 128)
    assert harness.input_bytes((torch.zeros(10), cache, [torch.zeros(5)])) == \
        4 * 15 + 2 * (2 * 1024 * 128 * 4) + 2 * 4
    llc = harness.cache_bytes("cpu")
    made = []
    case = harness.Case(name="x.fwd", shape={}, dtype=torch.float32, bytes=4 * llc,
                        setup=lambda: made.append(1) or torch.zeros(2**20 // 4), impls={})
    sets = harness.input_sets(case, harness.BenchContext(device="cpu", dtype=torch.float32))
    assert len(sets) == len(made) == harness.n_rotations(2**20, "cpu") > 1


def test_rotation_sized_on_what_the_op_reads():
    """A set holding tensors only other implementations read (the decode case: a paged copy
    of the cache and a multi-head cache next to the 2 MiB cache ours reads) rotates on the
    op's bytes: sized on the 20 MiB set, ours cycled through 8 MiB, inside the L3."""
    made = []
    case = harness.Case(name="x.fwd", shape={}, dtype=torch.float32, bytes=2**20,
                        setup=lambda: made.append(1) or (torch.zeros(2**20 // 4), torch.zeros(2**22)),
                        impls={})
    sets = harness.input_sets(case, harness.BenchContext(device="cpu", dtype=torch.float32))
    assert len(sets) == harness.n_rotations(2**20, "cpu") > harness.n_rotations(2**20 + 2**24, "cpu")


def test_percent_of_peak_only_against_the_same_dtype():
    peaks = {"copy_gbps": 10.0, "matmul_tflops": 1.0, "matmul_dtype": "float32"}
    case = harness.Case(name="x.fwd", shape={}, dtype=torch.bfloat16, bytes=1e6, flops=1e9,
                        bound="compute", setup=lambda: None, impls={})
    assert harness.figures(case, 1.0, peaks)["pct_of_peak"] is None
    case.dtype = torch.float32
    assert harness.figures(case, 1.0, peaks)["pct_of_peak"] == pytest.approx(100.0)


def test_compare_warns_when_the_machine_pace_changed():
    from palm_fast.benchmarks import compare

    old = {"meta": {"peaks": {"copy_gbps": 32.0, "matmul_tflops": 0.19}, "git_dirty": False}}
    new = {"meta": {"peaks": {"copy_gbps": 25.7, "matmul_tflops": 0.18}, "git_dirty": True}}
    w = compare.warnings_for(old, new)
    assert any("copy bandwidth differs by -20%" in x for x in w)
    assert not any("matmul" in x for x in w)   # 5%: within the threshold
    assert any("new run had uncommitted changes" in x for x in w)
    assert compare.warnings_for(old, old) == []
    assert not compare.warnings_for(old, dict(old, meta=dict(new["meta"], git_dirty=False)), threshold=0.5)
    # the table's warnings follow --threshold (they used the default 10%)
    import io

    from rich.console import Console

    for threshold, shown in ((0.1, True), (0.5, False)):
        out = io.StringIO()
        compare.print_comparison([], old, dict(new, meta=dict(new["meta"], git_dirty=False)),
                                 console=Console(file=out, width=200), threshold=threshold)
        assert ("copy bandwidth differs" in out.getvalue()) == shown, threshold


def test_measure_peaks_cpu_quick():
    peaks = harness.measure_peaks("cpu", quick=True)
    assert peaks["copy_gbps"] > 0 and peaks["matmul_tflops"] > 0


# The smoke run of every registered case lives in tests/test_suite.py (harness smoke mode).


def test_interleaved_case_times_round_robin():
    """A case with ``interleave``: two warm-up rounds, then ``repeats`` rounds calling every
    implementation once in order; medians per implementation; a failure is reported and
    drops only that implementation."""
    order = []

    def impl(name, fail_at=None):
        def fn(_):
            order.append(name)
            if fail_at is not None and order.count(name) == fail_at:
                raise RuntimeError("deliberate failure")
        return fn

    case = harness.Case(name="toy.train", shape={}, dtype=torch.float32, bytes=0, flops=1e6,
                        bound="compute", setup=lambda: None, rotate=False, repeats=3,
                        interleave=True,
                        impls={"palm_fast": impl("a"), "broken": impl("b", fail_at=3),
                               "eager": impl("e")})
    ctx = harness.BenchContext(device="cpu", dtype=torch.float32)
    peaks = {"copy_gbps": 10.0, "matmul_tflops": 0.1}
    recs = {r["impl"]: r for r in harness.run_case(case, ctx, peaks)}
    assert order[:6] == ["a", "b", "e"] * 2                       # warm-up rounds
    assert order[6:9] == ["a", "b", "e"] and order[9:] == ["a", "e", "a", "e"]
    assert recs["palm_fast"]["n_timed"] == recs["eager"]["n_timed"] == 3
    assert recs["broken"]["ms"] is None and "deliberate failure" in recs["broken"]["error"]
    assert recs["eager"]["speedup_vs_eager"] == pytest.approx(1.0)
    for name in ("palm_fast", "eager"):
        r = recs[name]
        assert 0 < r["ms_min"] <= r["ms"] <= r["ms_max"]


def test_record_figures_are_exact():
    """The published figures of a record from a known time (a mutation review found every
    one of them unchecked): median time, GB/s, TFLOP/s, % of the bound's peak (none for a
    compute case in another dtype than the measured matmul peak), tokens/s, speedup."""
    peaks = {"copy_gbps": 20.0, "matmul_tflops": 0.5, "matmul_dtype": "float32"}
    ctx = harness.BenchContext(device="cpu", dtype=torch.float32)
    t = harness.Timing.of([300.0, 200.0, 1000.0])
    assert (t.ms, t.ms_min, t.ms_max, t.n) == (300.0, 200.0, 1000.0, 3)
    mem = harness.Case(name="x.fwd", shape={}, dtype=torch.float32, bytes=4e9, flops=2e9, tokens=100,
                       setup=lambda: None, impls={})
    rec = harness.make_record(mem, ctx, "palm_fast", t, peaks)
    assert rec["gbps"] == pytest.approx(4e9 / 0.3 / 1e9) and rec["tflops"] == pytest.approx(2e9 / 0.3 / 1e12)
    assert rec["pct_of_peak"] == pytest.approx(100 * rec["gbps"] / 20.0)
    assert rec["tokens_per_s"] == pytest.approx(100 / 0.3)
    for dtype, pct in ((torch.float32, 100 * 2e9 / 0.3 / 1e12 / 0.5), (torch.bfloat16, None)):
        comp = harness.Case(name="x.fwd", shape={}, dtype=dtype, bytes=4e9, flops=2e9, bound="compute",
                            setup=lambda: None, impls={})
        got = harness.make_record(comp, ctx, "palm_fast", t, peaks)["pct_of_peak"]
        assert got == (pytest.approx(pct) if pct else None)
    import time as _time

    impls = {"eager": lambda _: _time.sleep(0.004), "palm_fast": lambda _: _time.sleep(0.001)}
    case = harness.Case(name="x.fwd", shape={}, dtype=torch.float32, bytes=1e6, setup=lambda: None,
                        impls=impls)
    smoke = harness.BenchContext("cpu", torch.float32, smoke=True)
    recs = {r["impl"]: r for r in harness.run_case(case, smoke, peaks)}
    ours, eager = recs["palm_fast"], recs["eager"]
    assert ours["speedup_vs_eager"] == pytest.approx(eager["ms"] / ours["ms"])


def test_measure_peaks_counts_read_plus_write_and_2n3_flops(monkeypatch):
    """The copy peak counts the bytes read and the bytes written (2x the buffer), the matmul
    peak 2 n^3 FLOPs; on the CPU both use the fastest call (``ms_min``)."""
    calls = []

    def fake_time(fn, device, quick=False, **kw):
        calls.append(fn)
        return harness.Timing(ms=4.0, ms_min=2.0, ms_max=9.0, n=5)

    monkeypatch.setattr(harness, "time_fn", fake_time)
    peaks = harness.measure_peaks("cpu", quick=True)
    assert len(calls) == 2
    n_bytes, mm_n = 64 * 2**20, 1024
    assert peaks["copy_gbps"] == pytest.approx(2 * n_bytes / 2e-3 / 1e9)
    assert peaks["matmul_tflops"] == pytest.approx(2 * mm_n**3 / 2e-3 / 1e12)
    assert peaks["matmul_shape"] == [mm_n] * 3 and peaks["matmul_dtype"] == "float32"


def _doc(tmp_path, name, records, meta=None):
    path = tmp_path / name
    path.write_text(json.dumps({"meta": {} if meta is None else meta, "records": records}))
    return str(path)


def _rec(ms, **kw):
    return dict(name="a.fwd", impl="palm_fast", device="cpu", dtype="float32", shape={"n": 1},
                ms=ms, ms_min=ms, ms_max=ms, **kw)


def test_compare_flags_non_finite_times_and_new_failures(tmp_path, capsys):
    """A NaN time compared as "same" (every comparison False) and a negative one as an
    improvement; a case the old run timed that fails in the new one exited 0 under
    --fail-on-regression."""
    from palm_fast.benchmarks import compare as cmp

    old = _doc(tmp_path, "old.json", [_rec(1.0)])
    for i, bad in enumerate((float("nan"), -1.0, float("inf"), None)):
        new = _doc(tmp_path, f"new{i}.json", [_rec(bad, error="boom") if bad is None else _rec(bad)])
        rows = cmp.compare(cmp.load(old), cmp.load(new))
        assert [r.status for r in rows] == ["error"], bad
        assert cli.main(["compare", old, new, "--fail-on-regression"]) == 2
        assert cli.main(["compare", old, new]) == 0
    # a case that failed before and still fails is not a new failure
    both = _doc(tmp_path, "both.json", [_rec(None, error="boom")])
    assert cli.main(["compare", both, both, "--fail-on-regression"]) == 0
    capsys.readouterr()


def test_malformed_results_files_and_plot_errors_are_one_line(tmp_path):
    good = _doc(tmp_path, "good.json", [_rec(1.0)])
    cases = {
        "rec_empty.json": ({"meta": {}, "records": [{}]}, "record 0: expected string 'name'"),
        "rec_int.json": ({"meta": {}, "records": [3]}, "record 0: expected an object"),
        "records_null.json": ({"meta": {}, "records": None}, "expected a palm-fast bench JSON"),
        "shape_list.json": ({"meta": {}, "records": [dict(_rec(1.0), shape=[1, 2])]}, "'shape' must"),
        "ms_str.json": ({"meta": {}, "records": [dict(_rec(1.0), ms="1.0")]}, "'ms' must be a number"),
        "meta_null.json": ({"meta": None, "records": []}, "'meta' must be an object"),
        "peaks_null.json": ({"meta": {"peaks": None}, "records": [_rec(1.0)]}, "'meta.peaks' must"),
    }
    for name, (doc, msg) in cases.items():
        path = tmp_path / name
        path.write_text(json.dumps(doc))
        with pytest.raises(SystemExit, match=msg):
            cli.main(["compare", good, str(path)])
    pytest.importorskip("matplotlib")
    empty = _doc(tmp_path, "empty.json", [])
    with pytest.raises(SystemExit, match="no timed records"):
        cli.main(["plot", empty, "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="No such file or directory"):
        cli.main(["plot", good, "--out", str(tmp_path / "none" / "x.png")])


def test_bench_checks_output_paths_threads_and_dedupes_dtypes(toy_registry, tmp_path, capsys):
    """An unwritable --json / --plot path was found after all the measuring (results lost);
    --threads -1 raised a RuntimeError traceback and 0 was ignored; --dtype fp32,float32 ran
    every case twice."""
    for flag in ("--json", "--plot"):
        with pytest.raises(SystemExit, match=f"{flag}: the directory .* does not exist"):
            cli.main(["bench", "--only", "_toy", "--device", "cpu", "--quick", flag,
                      str(tmp_path / "none" / "x")])
        with pytest.raises(SystemExit, match=f"{flag}: .* is a directory"):
            cli.main(["bench", "--only", "_toy", "--device", "cpu", "--quick", flag, str(tmp_path)])
    for bad in ("-1", "0", "x"):
        with pytest.raises(SystemExit):
            cli.main(["bench", "--only", "_toy", "--device", "cpu", "--quick", "--threads", bad])
        assert "--threads" in capsys.readouterr().err
    path = tmp_path / "out.json"
    assert cli.main(["bench", "--only", "_toy", "--device", "cpu", "--quick", "--dtype", "fp32,float32",
                     "--json", str(path)]) == 0
    assert len(json.loads(path.read_text())["records"]) == 2


def test_bench_plot_failure_still_compares(toy_registry, tmp_path, capsys):
    """Every implementation failing (no timed record): --plot raised before the --compare
    table and the --fail-on-regression decision."""
    pytest.importorskip("matplotlib")
    old = _doc(tmp_path, "old.json", [dict(_rec(1.0), name="toy.fwd", impl="broken",
                                           shape={"n": 1 << 16})])
    toy_registry["_toy_allfail"] = lambda ctx: (
        dataclasses.replace(c, impls={"broken": c.impls["broken"]}) for c in _toy_family(True)(ctx))
    rc = cli.main(["bench", "--only", "_toy_allfail", "--device", "cpu", "--dtype", "fp32", "--quick",
                   "--plot", str(tmp_path / "x.png"), "--compare", old, "--fail-on-regression"])
    out = capsys.readouterr()
    assert rc == 1 and "no timed records" in out.err and "old ms" in out.out


def test_bench_empty_only_and_gate_without_compare_are_refused(toy_registry):
    """--only "" ran every family; --fail-on-regression without --compare could never fail."""
    with pytest.raises(SystemExit, match="--only: expected comma-separated"):
        cli.main(["bench", "--only", " , ", "--device", "cpu", "--quick"])
    with pytest.raises(SystemExit, match="--fail-on-regression: needs --compare"):
        cli.main(["bench", "--only", "_toy", "--device", "cpu", "--quick", "--fail-on-regression"])
