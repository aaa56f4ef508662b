"""Compare two benchmark result files (``{"meta", "records"}``) case by case.

Records match on (name, impl, device, dtype, shape). For each pair the ratio is
``old ms / new ms`` (above 1: the new run is faster). A pair is flagged only when the
change exceeds the noise of both runs:

    tolerance = max(threshold, spread(old) + spread(new)),  spread(r) = (ms - ms_min) / ms

(how far the median sits above the fastest call: the jitter of that series, robust to one
slow outlier, which ``ms_max`` is not). ``regression``: new ms > old ms x (1 + tolerance);
``improvement``: old ms > new ms x (1 + tolerance); otherwise ``same``. Records found in
one file only are ``new`` / ``missing``; a failed implementation is ``error``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

DEFAULT_THRESHOLD = 0.10


def record_key(r: dict) -> tuple:
    return (r["name"], r["impl"], r.get("device"), r.get("dtype"),
            json.dumps(r.get("shape", {}), sort_keys=True))


def timed(ms) -> bool:
    """Whether ``ms`` is a usable time: a finite number > 0 (a NaN time compared as "same"
    and a negative one as an improvement)."""
    return isinstance(ms, (int, float)) and not isinstance(ms, bool) and math.isfinite(ms) and ms > 0


def _spread(r: dict) -> float:
    ms, lo = r.get("ms"), r.get("ms_min")
    if not timed(ms) or not timed(lo):
        return 0.0
    return max(0.0, (ms - lo) / ms)


@dataclass
class Row:
    key: tuple
    old_ms: float | None
    new_ms: float | None
    ratio: float | None        # old ms / new ms (> 1: faster now)
    tolerance: float | None    # the relative change that counts as beyond noise
    status: str                # regression | improvement | same | new | missing | error

    @property
    def label(self) -> str:
        name, impl, _device, dtype, _shape = self.key
        return f"{name} {dtype} [{impl}] {self.shape}"

    @property
    def shape(self) -> str:
        return ",".join(f"{k}={v}" for k, v in json.loads(self.key[4]).items())


def compare(old: dict, new: dict, threshold: float = DEFAULT_THRESHOLD) -> list[Row]:
    """One Row per record of either document, in the new document's order."""
    if threshold < 0:
        raise ValueError(f"threshold: expected a non-negative fraction, got {threshold}")
    old_recs = {record_key(r): r for r in old["records"]}
    rows, seen = [], set()
    for r in new["records"]:
        key = record_key(r)
        seen.add(key)
        o = old_recs.get(key)
        if o is None:
            rows.append(Row(key, None, r.get("ms"), None, None, "new"))
            continue
        if not timed(o.get("ms")) or not timed(r.get("ms")):
            rows.append(Row(key, o.get("ms"), r.get("ms"), None, None, "error"))
            continue
        tol = max(threshold, _spread(o) + _spread(r))
        if r["ms"] > o["ms"] * (1 + tol):
            status = "regression"
        elif o["ms"] > r["ms"] * (1 + tol):
            status = "improvement"
        else:
            status = "same"
        rows.append(Row(key, o["ms"], r["ms"], o["ms"] / r["ms"], tol, status))
    for key, o in old_recs.items():
        if key not in seen:
            rows.append(Row(key, o.get("ms"), None, None, None, "missing"))
    return rows


def warnings_for(old: dict, new: dict, threshold: float = DEFAULT_THRESHOLD) -> list[str]:
    """Differences in the runs' setting that make the ratios less meaningful: device,
    versions, uncommitted changes, and the machine's measured peaks (on a shared VM the
    pace moves between runs; a ratio beyond noise may be the machine, not the code)."""
    out = []
    om, nm = old.get("meta", {}), new.get("meta", {})
    for field in ("device_name", "torch", "triton"):
        if om.get(field) != nm.get(field):
            out.append(f"{field} differs: {om.get(field)!r} (old) vs {nm.get(field)!r} (new)")
    for tag, m in (("old", om), ("new", nm)):
        if m.get("git_dirty"):
            out.append(f"the {tag} run had uncommitted changes (git_commit is not the whole code)")
    op, np_ = om.get("peaks") or {}, nm.get("peaks") or {}
    for key, label in (("copy_gbps", "copy bandwidth"), ("matmul_tflops", "matmul throughput")):
        a, b = op.get(key), np_.get(key)
        if a and b and abs(b / a - 1) > threshold:
            out.append(f"the measured {label} differs by {100 * (b / a - 1):+.0f}% ({a:.3g} old, "
                       f"{b:.3g} new): the machine's pace changed between the runs, so ratios "
                       "beyond noise may not be the code's")
    return out


def print_comparison(rows: list[Row], old: dict, new: dict, console=None,
                     threshold: float = DEFAULT_THRESHOLD) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)
    style = {"regression": "red", "improvement": "green", "error": "yellow"}
    table = Table(title=(f"old: {old.get('meta', {}).get('date')} {old.get('meta', {}).get('git_commit')}"
                         f"  ->  new: {new.get('meta', {}).get('date')} "
                         f"{new.get('meta', {}).get('git_commit')}"), title_justify="left")
    for col, justify in [("case", "left"), ("dtype", "left"), ("impl", "left"), ("shape", "left"),
                         ("old ms", "right"), ("new ms", "right"), ("old/new", "right"),
                         ("noise tol", "right"), ("status", "left")]:
        table.add_column(col, justify=justify)
    for row in rows:
        fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
        st = row.status
        name, impl, _device, dtype, _shape = row.key
        table.add_row(name, dtype, impl, row.shape, fmt(row.old_ms, ".4f"), fmt(row.new_ms, ".4f"),
                      "-" if row.ratio is None else f"{row.ratio:.2f}x",
                      "-" if row.tolerance is None else f"{100 * row.tolerance:.0f}%",
                      f"[{style[st]}]{st}[/{style[st]}]" if st in style else st)
    console.print(table)
    for w in warnings_for(old, new, threshold):
        console.print(f"[yellow]warning: {w}[/yellow]")
    counts = {s: sum(r.status == s for r in rows) for s in
              ("regression", "improvement", "same", "new", "missing", "error")}
    console.print(", ".join(f"{n} {s}" for s, n in counts.items() if n))


def load(path: str) -> dict:
    """A results file, checked for what compare and plot read (ValueError naming the file
    and the record: a malformed file raised KeyError / TypeError / AttributeError deep in
    the comparison)."""
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
        raise ValueError(f"{path}: expected a palm-fast bench JSON file ({{'meta', 'records'}})")
    if not isinstance(doc.get("meta", {}), dict):
        raise ValueError(f"{path}: 'meta' must be an object, got {type(doc['meta']).__name__}")
    if not isinstance(doc.get("meta", {}).get("peaks", {}), dict):
        raise ValueError(f"{path}: 'meta.peaks' must be an object")
    for i, r in enumerate(doc["records"]):
        bad = None
        if not isinstance(r, dict):
            bad = f"expected an object, got {type(r).__name__}"
        elif not isinstance(r.get("name"), str) or not isinstance(r.get("impl"), str):
            bad = "expected string 'name' and 'impl'"
        elif not isinstance(r.get("shape", {}), dict):
            bad = "'shape' must be an object"
        else:
            for k in ("ms", "ms_min", "ms_max"):
                v = r.get(k)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    bad = f"'{k}' must be a number or null, got {v!r}"
                    break
        if bad:
            raise ValueError(f"{path}: record {i}: {bad}")
    return doc
