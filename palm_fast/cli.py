"""The ``palm-fast`` command line.

``palm-fast bench`` runs every registered benchmark case (ours vs the eager
reference vs ``torch.compile`` of it, vs Liger-Kernel when importable) on the GPU
if there is one, else the CPU, prints a table and optionally writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _parse_dtypes(text: str | None, device: str) -> list[torch.dtype]:
    if not text:
        return [torch.bfloat16] if device == "cuda" else [torch.float32, torch.bfloat16]
    out = []
    for part in text.split(","):
        part = part.strip()
        if part not in DTYPES:
            raise SystemExit(f"--dtype: expected one of {sorted(DTYPES)}, got {part!r}")
        if DTYPES[part] not in out:   # (fp32,float32 ran every case twice: duplicate records)
            out.append(DTYPES[part])
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def _check_writable(flag: str, path: str | None) -> None:
    """Exit now if ``path`` cannot be written (it was found only after all the measuring,
    with the results lost)."""
    if not path:
        return
    import os

    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise SystemExit(f"{flag}: {path} is a directory")
    if not os.path.isdir(parent):
        raise SystemExit(f"{flag}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise SystemExit(f"{flag}: {path} is not writable")


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _print_table(records: list[dict], meta: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    peaks = meta["peaks"]
    title = (f"palm_fast bench on {meta['device_name']} | torch {meta['torch']} | "
             f"triton {meta['triton']} | measured peaks: copy {peaks['copy_gbps']:.0f} GB/s, "
             f"matmul {peaks['matmul_tflops']:.3g} TFLOP/s ({peaks['matmul_dtype']})")
    table = Table(title=title, title_justify="left")
    for col, justify in [("case", "left"), ("dtype", "left"), ("shape", "left"), ("impl", "left"),
                         ("ms", "right"), ("GB/s", "right"), ("TFLOP/s", "right"),
                         ("% peak", "right"), ("vs eager", "right")]:
        table.add_column(col, justify=justify)
    prev = None
    for r in records:
        key = (r["name"], r["dtype"], json.dumps(r["shape"], sort_keys=True))
        first = key != prev
        prev = key
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        speed = r.get("speedup_vs_eager")
        table.add_row(
            r["name"] if first else "", r["dtype"] if first else "", shape if first else "",
            r["impl"], _fmt(r["ms"], ".4f") if r.get("ms") is not None else "[red]error[/red]",
            _fmt(r.get("gbps"), ".1f"), _fmt(r.get("tflops"), ".3g"),
            _fmt(r.get("pct_of_peak"), ".1f"), "-" if speed is None else f"{speed:.2f}x",
            end_section=False,
        )
    console = Console()
    if not console.is_terminal:  # logs and CI: do not squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table)
    _print_throughput_table(records, console)
    errors = [r for r in records if r.get("error")]
    for r in errors:
        Console(stderr=True).print(f"[red]{r['name']} / {r['impl']}: {r['error']}[/red]")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _print_throughput_table(records: list[dict], console) -> None:
    """Tokens/s, and MFU / HFU (PaLM Appendix B) where a case reports them."""
    from rich.table import Table

    rows = [r for r in records if r.get("tokens_per_s") is not None]
    if not rows:
        return
    table = Table(title="throughput; MFU / HFU per PaLM Appendix B (vs datasheet peak | vs matmul "
                        "peak measured in this run)", title_justify="left")
    for col in ("case", "dtype", "impl", "recompute", "tokens/s", "MFU", "HFU", "MFU meas.",
                "HFU meas.", "vs eager"):
        table.add_column(col, justify="left" if col in ("case", "dtype", "impl", "recompute") else "right")
    for r in rows:
        speed = r.get("speedup_vs_eager")
        table.add_row(r["name"], r["dtype"], r["impl"], r.get("recompute") or "-",
                      f"{r['tokens_per_s']:,.0f}", _pct(r.get("mfu")), _pct(r.get("hfu")),
                      _pct(r.get("mfu_measured_peak")), _pct(r.get("hfu_measured_peak")),
                      "-" if speed is None else f"{speed:.2f}x")
    console.print(table)


def _load_results(path: str) -> dict:
    """A results file, or exit with a one-line message (missing file, not JSON, not ours)."""
    from palm_fast.benchmarks import compare as cmp

    try:
        return cmp.load(path)
    except OSError as e:
        raise SystemExit(f"palm-fast: cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"palm-fast: {path} is not JSON ({e})") from None
    except ValueError as e:
        raise SystemExit(f"palm-fast: {e}") from None


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from palm_fast.benchmarks import harness

    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
        if device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    _check_writable("--json", args.json)
    _check_writable("--plot", args.plot)
    dtypes = _parse_dtypes(args.dtype, device)
    only = None
    if args.only is not None:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        if not only:   # (an empty --only ran every family)
            raise SystemExit("--only: expected comma-separated benchmark family names, got none")
    if args.fail_on_regression and not args.compare:
        raise SystemExit("--fail-on-regression: needs --compare OLD_JSON (nothing to compare with)")

    if args.config:
        from palm_fast.config import get_config

        try:
            get_config(args.config)
        except ValueError as e:
            raise SystemExit(f"--config: {e}") from None
    if args.compare:  # read it before spending minutes measuring
        from palm_fast.benchmarks import compare as cmp

        old_doc = _load_results(args.compare)
    if args.plot:
        from palm_fast.benchmarks import plot as plot_mod

        plot_mod._require_matplotlib()

    contexts = [harness.BenchContext(device=device, dtype=dt, quick=args.quick, config=args.config)
                for dt in dtypes]
    try:
        plan = [(ctx, case) for ctx in contexts
                for case in harness.collect_cases(ctx, only, default_dtypes=not args.dtype)]
    except ValueError as e:   # an unknown --only family
        raise SystemExit(f"palm-fast: {e}") from None
    if not plan:
        raise SystemExit("no benchmark cases selected")
    records: list[dict] = []
    t_start = time.perf_counter()
    case_wall: dict[str, float] = {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  transient=True) as progress:
        task = progress.add_task("measuring peaks", total=len(plan) + 1)
        peaks = harness.measure_peaks(device, quick=args.quick)
        progress.advance(task)
        while plan:
            ctx, case = plan.pop(0)  # dropped once run: its inputs and models can be freed
            label = f"{case.name} {harness.dtype_name(case.dtype)}"
            progress.update(task, description=label)
            t0 = time.perf_counter()
            records += harness.run_case(
                case, ctx, peaks,
                on_impl=lambda impl, label=label: progress.update(task, description=f"{label} [{impl}]"))
            case_wall[label] = case_wall.get(label, 0.0) + time.perf_counter() - t0
            progress.advance(task)
    meta = harness.meta(device, peaks, argv=["palm-fast"] + list(args.argv))
    meta["wall_s"] = time.perf_counter() - t_start
    meta["case_wall_s"] = case_wall
    _print_table(records, meta)
    print(f"{len(records)} records in {meta['wall_s']:.0f} s")
    doc = harness.result_doc(meta, records)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=harness.as_jsonable)
        print(f"wrote {args.json}")
    rc = 1 if any(r.get("error") for r in records) else 0
    if args.plot:
        try:
            jdoc = json.loads(json.dumps(doc, default=harness.as_jsonable))
            print(f"wrote {plot_mod.plot(jdoc, args.plot)}")
        except (ValueError, OSError) as e:   # (no timed record: the comparison still runs)
            print(f"palm-fast: --plot: {e}", file=sys.stderr)
            rc = 1
    if args.compare:
        rows = cmp.compare(old_doc, doc, threshold=args.threshold)
        cmp.print_comparison(rows, old_doc, doc, threshold=args.threshold)
        if args.fail_on_regression and _regressed(rows):
            rc = rc or 2
    return rc


def cmd_compare(args: argparse.Namespace) -> int:
    from palm_fast.benchmarks import compare as cmp

    old, new = _load_results(args.old), _load_results(args.new)
    rows = cmp.compare(old, new, threshold=args.threshold)
    cmp.print_comparison(rows, old, new, threshold=args.threshold)
    return 2 if args.fail_on_regression and _regressed(rows) else 0


def _regressed(rows) -> bool:
    """A case slower beyond noise, or one timed in the old run that failed in the new one
    (an error row exited 0: a newly broken kernel passed the gate)."""
    from palm_fast.benchmarks.compare import timed

    return any(r.status == "regression" or (r.status == "error" and timed(r.old_ms)) for r in rows)


def cmd_plot(args: argparse.Namespace) -> int:
    from palm_fast.benchmarks import plot as plot_mod

    doc = _load_results(args.results)
    try:
        print(f"wrote {plot_mod.plot(doc, args.out)}")
    except (ValueError, OSError) as e:
        raise SystemExit(f"palm-fast: {e}") from None
    return 0


def _add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold", type=_threshold, default=0.10,
                   help="smallest relative change flagged (default 0.10); the noise of both "
                        "runs widens it per case")
    p.add_argument("--fail-on-regression", action="store_true",
                   help="exit with status 2 when a case regressed beyond noise, or failed where "
                        "the old run timed it")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="palm-fast", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run the benchmark suite")
    b.add_argument("--only", help="comma-separated benchmark families (e.g. rope,swiglu)")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    b.add_argument("--dtype", help="comma-separated dtypes (default: bf16 on GPU, fp32,bf16 on CPU; "
                                   "model, lm_loss and generate: fp32 only on CPU)")
    b.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    b.add_argument("--config", help="model preset for block/model cases (e.g. palm-small)")
    b.add_argument("--json", metavar="PATH", help="write {meta, records} JSON here")
    b.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--plot", metavar="PATH", help="write a PNG figure (speedup over eager and "
                                                   "%% of peak per case; needs matplotlib)")
    b.add_argument("--compare", metavar="OLD_JSON",
                   help="print per-case ratios against an earlier results file and flag "
                        "regressions beyond noise")
    _add_compare_args(b)
    b.set_defaults(func=cmd_bench)
    c = sub.add_parser("compare", help="compare two results files (old, new) case by case")
    c.add_argument("old")
    c.add_argument("new")
    _add_compare_args(c)
    c.set_defaults(func=cmd_compare)
    pl = sub.add_parser("plot", help="draw the PNG figure of a results file")
    pl.add_argument("results")
    pl.add_argument("--out", required=True, metavar="PATH")
    pl.set_defaults(func=cmd_plot)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
