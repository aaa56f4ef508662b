"""The ``palm-fast`` command line.

``palm-fast bench`` runs every registered benchmark case (ours vs the eager
reference vs ``torch.compile`` of it, vs Liger-Kernel when importable) on the GPU
if there is one, else the CPU, prints a table and optionally writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys

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
        out.append(DTYPES[part])
    return out


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
    errors = [r for r in records if r.get("error")]
    for r in errors:
        Console(stderr=True).print(f"[red]{r['name']} / {r['impl']}: {r['error']}[/red]")


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from palm_fast.benchmarks import harness

    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
        if device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = _parse_dtypes(args.dtype, device)
    only = [s.strip() for s in args.only.split(",")] if args.only else None

    contexts = [harness.BenchContext(device=device, dtype=dt, quick=args.quick, config=args.config)
                for dt in dtypes]
    plan = [(ctx, case) for ctx in contexts for case in harness.collect_cases(ctx, only)]
    if not plan:
        raise SystemExit("no benchmark cases selected")
    records: list[dict] = []
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  transient=True) as progress:
        task = progress.add_task("measuring peaks", total=len(plan) + 1)
        peaks = harness.measure_peaks(device, quick=args.quick)
        progress.advance(task)
        for ctx, case in plan:
            label = f"{case.name} {harness.dtype_name(case.dtype)}"
            progress.update(task, description=label)
            records += harness.run_case(
                case, ctx, peaks,
                on_impl=lambda impl, label=label: progress.update(task, description=f"{label} [{impl}]"))
            progress.advance(task)
    meta = harness.meta(device, peaks, argv=["palm-fast"] + list(args.argv))
    _print_table(records, meta)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(harness.result_doc(meta, records), f, indent=1, default=harness.as_jsonable)
        print(f"wrote {args.json}")
    return 1 if any(r.get("error") for r in records) else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="palm-fast", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run the benchmark suite")
    b.add_argument("--only", help="comma-separated benchmark families (e.g. rope,swiglu)")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    b.add_argument("--dtype", help="comma-separated dtypes (default: bf16 on GPU, fp32,bf16 on CPU)")
    b.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    b.add_argument("--config", help="model preset for block/model cases (e.g. palm-small)")
    b.add_argument("--json", metavar="PATH", help="write {meta, records} JSON here")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
