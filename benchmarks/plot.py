"""A PNG figure of one benchmark run: per case, the speedup of every implementation over
the eager reference (left, log scale) and its % of the device's peak measured in the
same run (right: copy bandwidth for memory-bound cases, matmul throughput for
compute-bound ones, i.e. MFU against the measured peak for the model step).

Needs matplotlib (``pip install palm_fast[bench]``).
"""
from __future__ import annotations

import json

# One colour per implementation, stable across figures.
_COLOURS = {"palm_fast": "#1f77b4", "eager": "#7f7f7f", "compile": "#ff7f0e", "torch": "#2ca02c",
            "liger": "#9467bd", "flash_attn": "#8c564b", "separate": "#17becf"}
_EXTRA = ["#d62728", "#e377c2", "#bcbd22", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5"]


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib "
                           "(or pip install 'palm_fast[bench]')") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def case_label(r: dict, with_shape: bool) -> str:
    label = f"{r['name']} {r['dtype']}"
    if with_shape:
        label += " " + ",".join(f"{k}={v}" for k, v in r["shape"].items())
    return label


def plot(doc: dict, path: str) -> str:
    """Write the figure of ``doc`` (``{"meta", "records"}``) to ``path``; returns path."""
    plt = _require_matplotlib()
    from palm_fast.benchmarks.compare import timed

    records = [r for r in doc["records"] if timed(r.get("ms"))]
    if not records:
        raise ValueError("plot: no timed records to draw")
    # A case is (name, dtype, shape); show the shape only where a name/dtype has several.
    shapes: dict[tuple, set] = {}
    for r in records:
        shapes.setdefault((r["name"], r["dtype"]), set()).add(json.dumps(r["shape"], sort_keys=True))
    cases: list[str] = []
    by_case: dict[str, dict[str, dict]] = {}
    for r in records:
        label = case_label(r, len(shapes[(r["name"], r["dtype"])]) > 1)
        if label not in by_case:
            cases.append(label)
            by_case[label] = {}
        by_case[label][r["impl"]] = r
    impls: list[str] = []
    for r in records:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    colours, extra = {}, iter(_EXTRA * 4)
    for impl in impls:
        colours[impl] = _COLOURS.get(impl) or next(extra)

    n = len(cases)
    n_bars = sum(len(by_case[c]) for c in cases)
    fig, (ax_s, ax_p) = plt.subplots(1, 2, figsize=(15, 1.5 + 0.16 * n_bars + 0.1 * n), sharey=True)
    drawn: set[str] = set()
    for i, c in enumerate(cases):
        present = [impl for impl in impls if impl in by_case[c]]  # each case's bars fill its row
        height = 0.8 / len(present)
        for j, impl in enumerate(present):
            r = by_case[c][impl]
            y = i - 0.4 + (j + 0.5) * height
            label = impl if impl not in drawn else None
            drawn.add(impl)
            speed = r.get("speedup_vs_eager")
            pct = r.get("pct_of_peak")
            if speed:
                ax_s.barh(y, speed, height=height, color=colours[impl], label=label)
            if pct is not None:
                ax_p.barh(y, pct, height=height, color=colours[impl], label=label)
    ax_s.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    ax_s.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax_s.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax_s.axvline(1.0, color="black", linewidth=0.8)
    ax_s.set_xlabel("speedup over the eager reference (x, log scale)")
    ax_p.set_xlabel("% of the peak measured in this run")
    ax_s.set_yticks(range(n), cases, fontsize=8)
    ax_s.invert_yaxis()
    for ax in (ax_s, ax_p):
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[i]) for i in impls]
    ax_p.legend(handles, impls, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                title="implementation")
    m = doc.get("meta") or {}
    peaks = m.get("peaks") or {}
    commit = (m.get("git_commit") or "")[:10]
    fig.suptitle(f"palm_fast bench | {m.get('device_name')} | torch {m.get('torch')} | "
                 f"{m.get('date')} {commit}\nmeasured peaks: copy {peaks.get('copy_gbps', 0):.0f} GB/s, "
                 f"matmul {peaks.get('matmul_tflops', 0):.3g} TFLOP/s ({peaks.get('matmul_dtype')})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
