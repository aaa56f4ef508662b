"""Triton code generation for fused groups, the kernel cache, the runner and ``explain()``.

Two kernel shapes:

* **row kernel** (``Group.kind == "row"``): program ``p`` handles rows
  ``[p * ROWS_PER_PROG, (p + 1) * ROWS_PER_PROG)``. Every load is masked and upcast to fp32 at
  once (the interpreter stores bf16 as raw bits); all math is fp32; stores cast to the output
  pointer's dtype. Column partial sums (``col_partial``) accumulate over the program's rows
  and are written to row ``p`` of a ``[P, N]`` fp32 buffer.
  - *single-block* variant (``N <= max_block``): the whole row sits in one ``BLOCK_N`` block;
    each value is computed once; column-space inputs are loaded once per program.
  - *tiled* variant (long rows that still fit on chip, ``tile_min < N <= max_tiled``): the
    row is held as ``NT`` register tiles of ``BLOCK_N`` columns (NT fixed in the source);
    each value is computed per tile and a row reduction combines the tiles. x is read once
    and the padding of a power-of-two block is avoided (N=18432 is 9 tiles of 2048, where
    one block would be 32768 wide and spill).
  - *looped* variant (long rows): pass ``k`` loops over column blocks to compute the row
    reductions of depth ``k`` (a vector accumulator reduced at the end of the pass), and a
    final pass recomputes what the outputs need from the inputs and stores it. Reading x
    again instead of holding it trades bandwidth for not spilling; partial column sums are
    accumulated in the program's own row of the buffer (no atomics).
* **col kernel** (``"col"``): program ``q`` owns columns ``[q * BLOCK_N, (q + 1) * BLOCK_N)``,
  sums (or maxes) the ``P`` partial rows in a fixed order, applies column-space epilogues.

Kernels are written to ``$PALM_FAST_FUSION_CACHE`` (default ``~/.cache/palm_fast/fusion``),
one file per (graph hash, mode, group, variant, dtypes, block size) — ``triton.jit`` reads
its function's source file — imported, and cached in memory under the same key.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import numbers
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from palm_fast.kernels._common import gpu_launch, interpreting, launch_device, sm_count

from .ir import Graph, outside_fp32
from .passes import Group, Schedule, fuse

DEFAULT_MAX_BLOCK = 16384  # longest row held in one block (kernels with column partials)
DEFAULT_LOOP_BLOCK = 4096  # column block of the looped variant
COL_BLOCK = 128  # column block of the final column-reduction kernel
PART_TILE = 32  # partial rows the final column-reduction kernel loads at once
NO_PARTIAL_MAX_BLOCK = 32768  # groups without column partials hold rows up to this long
# The tiled variant: rows longer than DEFAULT_TILE_MIN (up to MAX_TILED) held as tiles of
# DEFAULT_TILE. Measured on an H100 (bf16, 16384 rows, N=18432): forward 0.49 ms (2464 GB/s)
# against 0.56 ms for one spilling 32768 block; backward 0.94 ms against 1.12 ms looped.
# Up to 16384 one power-of-two block is as fast or faster (backward at N=16384: 0.62 ms in
# one block, 0.78 ms as 8 tiles).
DEFAULT_TILE = 2048  # column tile of the tiled variant
DEFAULT_TILE_MIN = 16384  # rows longer than this (and within the tiled limit) run tiled
# Row loads issued together per loop step of a tiled kernel without column partials. H100,
# bf16, N=18432: the forward took 0.489 / 0.426 / 0.412 ms with 1 / 2 / 3 rows per step
# (2469 / 2826 / 2933 GB/s); add + LayerNorm (3 row inputs) 0.998 ms with one row, 1.40 ms
# with two.
DEFAULT_ROW_STEP = 3
MAX_TILED = 32768  # groups without column partials run tiled up to this row length
MAX_TILED_PARTIAL = 32768  # groups with column partials (more [N] values held) up to this
# Warps of a tiled kernel with column partials (it holds the row's tiles and the [N]
# accumulators). H100, bf16, LayerNorm backward, 16384 x 18432: 0.790 ms with 8 warps
# (2294 GB/s, 78% of copy bandwidth), 0.917 ms with 16, 1.015 ms with 32; the re-reading
# form (``reload=True``, no spills) 0.891 / 0.844 / 0.884 ms (probe 6).
PARTIAL_TILED_WARPS = 8

# sqrt and div round to nearest, as torch's: on a GPU ``tl.sqrt`` is sqrt.approx.ftz (a
# subnormal argument gives 0) and ``/`` div.full (2 ulp); the LayerNorm / RMSNorm graphs use
# neither (rsqrt, and products with 1/N).
_UNARY = {"neg": "-({0})", "exp": "tl.exp({0})", "log": "tl.log({0})", "sqrt": "tl.sqrt_rn({0})",
          "rsqrt": "tl.rsqrt({0})", "abs": "tl.abs({0})"}
_BINARY = {"add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} * {1}", "div": "tl.div_rn({0}, {1})",
           "max": "_nan_max({0}, {1})", "min": "_nan_min({0}, {1})",
           "gt": "({0} > {1}).to(tl.float32)", "lt": "({0} < {1}).to(tl.float32)"}
_NEUTRAL = {"sum": "0.0", "max": "float('-inf')"}
_REDUCE = {"sum": "tl.sum", "max": "_nan_max_reduce"}   # (see _NAN_HELPERS)


# fp32 -0.0 as its bit pattern: Triton 3.2-3.8 turn a -0.0 literal into +0.0 (tl.full takes
# a null value for any value == 0), in the interpreter and in compiled code (x / -0.0 came
# out with the wrong sign); the bits survive every version
def _neg_zero(shape: str = "[]") -> str:
    return f"tl.full({shape}, -2147483648, tl.int32).to(tl.float32, bitcast=True)"


_NEG_ZERO = _neg_zero()


def _const_expr(value: float, n_pow: int) -> str:
    value = float(value)
    expr = repr(value) if math.isfinite(value) else f"float('{value}')"  # inf / nan: not names
    if value == 0.0 and math.copysign(1.0, value) < 0:
        expr = _NEG_ZERO
    if n_pow > 0:
        expr += " * n_f" * n_pow
    elif n_pow < 0:
        expr += " / n_f" * (-n_pow)
    return f"({expr})"


@dataclass
class Kernel:
    """Generated source for one group plus what the launcher needs to know."""

    group: Group
    name: str
    source: str
    looped: bool
    args: list[tuple[str, int, str]]  # (role, node id, space): role in in/out/part/scalar
    row_loads: dict[int, int]  # row-space input -> number of times a program streams it
    scratch: int = 0  # K of an fp32 [M, K] scratch buffer the kernel needs (0: none)
    tiles: int = 1  # NT of the tiled variant (1: single-block or looped)
    rows: int = 1  # rows per loop step (their loads issued together; no column partials)
    reload: bool = False  # re-reads the row after each row reduction (``reload`` option)


class _Emitter:
    def __init__(self, graph: Graph, group: Group):
        self.g, self.group = graph, group
        self.scratch = 0  # K of the looped kernel's fp32 [M, K] row-value scratch (0: none)
        self.members = set(group.nodes)
        self.ext = set(group.inputs)

    def var(self, i: int) -> str:
        return f"v{i}"

    def op_expr(self, i: int, ins: list[str]) -> str:
        n = self.g.nodes[i]
        if n.space == "scalar":
            # constants are Python literals and the interpreter passes runtime scalars as
            # Python floats: as 0-d fp32 tensors, .to() (cast, compare) and tl.* apply. Made
            # by adding -0.0, the identity for every x (+0.0 + x turned a -0.0 into +0.0)
            ins = [f"({_NEG_ZERO} + {x})" for x in ins]
        if n.op in _UNARY:
            return _UNARY[n.op].format(*ins)
        if n.op == "cast":
            return f"{ins[0]}.to(tl.{n.attr('dtype')}).to(tl.float32)"
        if n.op in _BINARY:
            return _BINARY[n.op].format(*ins)
        if n.op == "where":
            return f"tl.where({ins[0]} != 0, {ins[1]}, {ins[2]})"
        if n.op == "broadcast":
            # (+ -0.0: the identity for every value; + 0.0 turned a -0.0 into +0.0)
            return f"{ins[0]} + {_neg_zero('[BLOCK_N]')}"
        raise NotImplementedError(n.op)


def _ptr(i: int, role: str) -> str:
    return {"in": f"in{i}", "out": f"out{i}", "part": f"part{i}"}[role]


def generate(schedule: Schedule, group: Group, *, looped: bool, tiles: int = 1, rows: int = 1,
             reload: bool = False) -> Kernel:
    """Triton source for one group (``looped`` selects the long-row variant of a row kernel;
    ``tiles > 1`` the tiled variant, the row held as that many ``BLOCK_N`` tiles; ``reload``
    its form that re-reads the row after each row reduction instead of holding it)."""
    g = schedule.graph
    em = _Emitter(g, group)
    if looped and (tiles > 1 or reload):
        raise ValueError("a kernel is either looped or tiled")
    tiles = tiles if group.kind == "row" else 1
    reload = reload and group.kind == "row"
    if reload and rows > 1:
        raise ValueError("reload: one row per loop step")
    name = f"fused_{g.name}_{schedule.mode}_g{group.index}" + ("_looped" if looped else "") + \
        (f"_t{tiles}" if tiles > 1 else "") + (f"_r{rows}" if rows > 1 else "") + ("_rl" if reload else "")
    args: list[tuple[str, int, str]] = []
    for i in group.inputs:
        n = g.nodes[i]
        space = n.space
        args.append(("scalar" if space == "scalar" else "in", i, space))
    for i in group.outputs:
        n = g.nodes[i]
        args.append(("part" if n.kind == "cpart" else "out", i, n.space))
    params = []
    for role, i, space in args:
        if role == "scalar":
            params.append(f"s{i},  # runtime scalar (node %{i})")
            continue
        shape = {"row": "[M, N]", "stat": "[M]", "col": "[N]", "partial": "[P, N] fp32"}[space]
        params.append(f"{_ptr(i, role)},  # {'output' if role != 'in' else 'input'} %{i} {shape}")
        if space == "row":
            params.append(f"{_ptr(i, role)}_rs,  # its row stride")
    if group.kind == "col":
        src, row_loads = _col_kernel(em, args)
        params += ["N,  # columns", "P,  # partial rows to reduce"]
    else:
        params += ["M,  # rows", "N,  # columns", "ROWS_PER_PROG,  # rows per program"]
        if reload:
            src, row_loads = _row_kernel_reload(em, args, tiles)
        elif tiles > 1 or rows > 1:
            src, row_loads = _row_kernel_tiled(em, args, tiles, rows)
        else:
            src, row_loads = (_row_kernel_looped if looped else _row_kernel_single)(em, args)
        if em.scratch:
            params.insert(len(params) - 3, f"scratch,  # fp32 [M, {em.scratch}] row values of the last pass")
    tile_note = f" (a row is {tiles} blocks)" if tiles > 1 else ""
    params.append("BLOCK_N: tl.constexpr,  # columns per block" + tile_note)
    if group.kind == "row":
        params.append("EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: no ragged column block")
    head = [f'"""Generated by palm_fast.fusion: graph {g.name} ({g.hash()}), mode {schedule.mode}, '
            f'group {group.index}: nodes {group.nodes}."""',
            "import triton", "import triton.language as tl", ""]
    if any("_nan_" in line for line in src):
        head += _NAN_HELPERS
    head += ["", "@triton.jit", f"def {name}("]
    head += ["    " + p for p in params]
    head.append("):")
    source = "\n".join(head + ["    " + line if line else "" for line in src]) + "\n"
    return Kernel(group, name, source, looped and group.kind == "row", args, row_loads, em.scratch, tiles,
                  rows, reload)


# max / min as torch computes them: a NaN operand gives NaN. Triton's tl.maximum /
# tl.minimum / tl.max return the other operand by default (PTX max.f32, numpy's fmax under
# the interpreter), which made a row max, a column max or max(x, 0) drop a NaN: the
# generated code calls these helpers instead (emitted into a kernel's module when used).
_NAN_HELPERS = [
    "", "@triton.jit", "def _nan_max(a, b):",
    "    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)",
    "", "", "@triton.jit", "def _nan_min(a, b):",
    "    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)",
    "", "", "@triton.jit", "def _nan_max_reduce(x, axis: tl.constexpr):",
    "    return tl.reduce(x, axis, _nan_max)", "",
]


def _scalar_names(em: _Emitter, args) -> dict[int, str]:
    names = {}
    for role, i, _ in args:
        if role == "scalar":
            names[i] = f"s{i}"
    for n in em.g.nodes:
        if n.op == "const":
            names[n.id] = _const_expr(n.attr("value"), n.attr("n_pow"))
    return names


def _col_kernel(em: _Emitter, args) -> tuple[list[str], dict]:
    g = em.g
    L = ["pid = tl.program_id(0)", "cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)",
         "cmask = cols < N", "n_f = N * 1.0"]
    avail = _scalar_names(em, args)
    for role, i, space in args:
        if role == "in" and space == "col":
            L.append(f"{em.var(i)} = tl.load(in{i} + cols, mask=cmask, other=0.0).to(tl.float32)")
            avail[i] = em.var(i)
    for i in em.group.nodes:
        n = g.nodes[i]
        if n.kind == "cfin":
            red, p = n.attr("red"), n.inputs[0]
            # [PART_TILE, BLOCK_N] tiles of partial rows, reduced over rows at the end (fixed order)
            L.append(f"acc{i} = tl.full([{PART_TILE}, BLOCK_N], {_NEUTRAL[red]}, dtype=tl.float32)")
            L.append(f"for p0 in range(0, P, {PART_TILE}):")
            L.append(f"    prow = p0 + tl.arange(0, {PART_TILE})")
            L.append("    pmask = (prow[:, None] < P) & cmask[None, :]")
            val = f"tl.load(in{p} + prow[:, None] * N + cols[None, :], mask=pmask, other={_NEUTRAL[red]})"
            L.append(f"    acc{i} = " + (f"acc{i} + {val}" if red == "sum" else f"_nan_max(acc{i}, {val})"))
            fn = _REDUCE[red]
            L.append(f"{em.var(i)} = {fn}(acc{i}, axis=0)")
        else:
            L.append(f"{em.var(i)} = " + em.op_expr(i, [avail[j] for j in n.inputs]))
        avail[i] = em.var(i)
    for role, i, _ in args:
        if role == "out":
            L.append(f"tl.store(out{i} + cols, {avail[i]}.to(out{i}.dtype.element_ty), mask=cmask)")
    return L, {}


def _cmask(name: str, cols: str) -> list[str]:
    """The column mask ``name``; constant true when ``EVEN_N`` (N a multiple of BLOCK_N, so
    no block is ragged): the compiler then drops the masking selects and the predicates
    (fewer registers held in the long-row kernels)."""
    return ["if EVEN_N:", f"    {name} = tl.full([BLOCK_N], 1, tl.int1)", "else:",
            f"    {name} = {cols} < N"]


def _row_prologue(L: list[str]) -> None:
    L += ["pid = tl.program_id(0)", "n_f = N * 1.0"]


def _store(L: list[str], i: int, space: str, val: str) -> None:
    cast = f"{val}.to(out{i}.dtype.element_ty)"
    if space == "row":
        L.append(f"tl.store(out{i} + row64 * out{i}_rs + cols, {cast}, mask=mask)")
    elif space == "stat":
        L.append(f"tl.store(out{i} + row, {cast}, mask=rmask)")
    elif space == "col":  # identical in every program: program 0 writes it (a vector
        # compare: the interpreter rejects a scalar & vector mask)
        L.append(f"tl.store(out{i} + cols, {cast}, mask=cmask & ((cols * 0 + pid) == 0))")
    else:
        raise NotImplementedError(space)


def _load(i: int, space: str) -> str:
    if space == "row":
        return f"tl.load(in{i} + row64 * in{i}_rs + cols, mask=mask, other=0.0).to(tl.float32)"
    if space == "stat":
        return f"tl.load(in{i} + row, mask=rmask, other=0.0).to(tl.float32)"
    return f"tl.load(in{i} + cols, mask=cmask, other=0.0).to(tl.float32)"


def _tiles_prologue(L: list[str], nt: int) -> None:
    """Program id, ``n_f`` and the ``nt`` column tiles ``cols_t`` with their masks."""
    _row_prologue(L)
    L.append("offs = tl.arange(0, BLOCK_N)")
    for t in range(nt):
        L += [f"cols_{t} = {t} * BLOCK_N + offs"] + _cmask(f"cmask_{t}", f"cols_{t}")


def _row_level(em: _Emitter, avail: dict[int, str], lines: list[str]) -> None:
    """Emit the group's stat- / scalar-space elementwise nodes whose operands are all in
    ``avail`` (per-row values), as ``v{i}``, and record them there."""
    for i in em.group.nodes:
        n = em.g.nodes[i]
        if i not in avail and n.kind == "ew" and n.space in ("stat", "scalar") and \
                all(j in avail for j in n.inputs):
            lines.append(f"{em.var(i)} = " + em.op_expr(i, [avail[j] for j in n.inputs]))
            avail[i] = em.var(i)


def _depths(em: _Emitter) -> dict[int, int]:
    """Depth of each node of the group: the number of row reductions on its longest path
    inside the group."""
    depth: dict[int, int] = {}
    for i in em.group.nodes:
        n = em.g.nodes[i]
        d = max([depth.get(j, 0) for j in n.inputs], default=0)
        depth[i] = d + 1 if n.kind == "rred" else d
    return depth


def _by_depth(em: _Emitter) -> list[int]:
    """The group's nodes in an order that is still topological but emits everything that
    does not wait for a row reduction first (depth 0, then 1, ...): a column partial of
    values known before the reductions (LayerNorm backward: dweight += dy * xhat) is
    accumulated before them in the source. The compiler schedules on its own: on sm_90 the
    LayerNorm backward at N=18432 used the same registers and spills either way (ptxas)."""
    depth = _depths(em)
    return sorted(em.group.nodes, key=lambda i: (depth[i], em.group.nodes.index(i)))


def _early_stores(em: _Emitter, args) -> dict[int, str]:
    """{node: space} of the row-space outputs that other nodes of the group consume (add +
    LayerNorm's y_sum): stored as soon as they are computed, so their values need not stay
    live to the end of the row's work beside what is computed from them (sm_90, three-input
    add + LayerNorm, Triton 3.6: 127 -> 103 registers at N=18432, 48 -> 40 at
    N=4096; 59 at 4096 with the d0 - c graph and the stores at the end). Other outputs
    are stored at the end, in argument order (a mid-kernel store of LayerNorm's mean gave
    its N=8192 forward 79 registers instead of 64)."""
    used = {j for i in em.group.nodes for j in em.g.nodes[i].inputs}
    return {i: s for role, i, s in args if role == "out" and s == "row" and i in used}


def _row_kernel_single(em: _Emitter, args) -> tuple[list[str], dict]:
    g, grp = em.g, em.group
    L: list[str] = []
    _row_prologue(L)
    L += ["cols = tl.arange(0, BLOCK_N)"] + _cmask("cmask", "cols")
    avail = _scalar_names(em, args)
    in_space = {i: s for r, i, s in args if r == "in"}
    # column-space inputs and column-only math, once per program
    for i, s in in_space.items():
        if s == "col":
            L.append(f"{em.var(i)} = {_load(i, s)}")
            avail[i] = em.var(i)
    body_nodes = []
    for i in _by_depth(em):
        n = g.nodes[i]
        if n.kind == "ew" and n.space in ("col", "scalar") and all(j in avail for j in n.inputs):
            L.append(f"{em.var(i)} = " + em.op_expr(i, [avail[j] for j in n.inputs]))
            avail[i] = em.var(i)
        else:
            body_nodes.append(i)
    parts = [i for i in grp.nodes if g.nodes[i].kind == "cpart"]
    for i in parts:
        L.append(f"acc{i} = tl.full([BLOCK_N], {_NEUTRAL[g.nodes[i].attr('red')]}, dtype=tl.float32)")
    L.append("for r in range(0, ROWS_PER_PROG):")
    # the row test is a vector compare: the interpreter rejects a scalar & vector mask
    B = ["row = pid * ROWS_PER_PROG + r", "rmask = row < M", "mask = cmask & ((cols * 0 + row) < M)",
         "row64 = row.to(tl.int64)"]
    for i, s in in_space.items():
        if s in ("row", "stat"):
            B.append(f"{em.var(i)} = {_load(i, s)}")
            avail[i] = em.var(i)
    early = _early_stores(em, args)
    for i in body_nodes:
        n = g.nodes[i]
        x = [avail[j] for j in n.inputs]
        if n.kind == "rred":
            red = n.op.split("_")[1]
            fn = _REDUCE[red]
            B.append(f"{em.var(i)} = {fn}(tl.where(cmask, {x[0]}, {_NEUTRAL[red]}), axis=0)")
        elif n.kind == "cpart":
            red = n.attr("red")
            val = f"tl.where(mask, {x[0]}, {_NEUTRAL[red]})"
            B.append(f"acc{i} = " + (f"acc{i} + {val}" if red == "sum" else f"_nan_max(acc{i}, {val})"))
            continue
        else:
            B.append(f"{em.var(i)} = " + em.op_expr(i, x))
        avail[i] = em.var(i)
        if i in early:
            _store(B, i, early[i], avail[i])
    for role, i, s in args:
        if role == "out" and i not in early:
            _store(B, i, s, avail[i])
    L += ["    " + b for b in B]
    for i in parts:
        L.append(f"tl.store(part{i} + pid * N + cols, acc{i}, mask=cmask)")
    loads = {i: 1 for i, s in in_space.items() if s == "row"}
    return L, loads


def _row_kernel_tiled(em: _Emitter, args, nt: int, rows: int = 1) -> tuple[list[str], dict]:
    """The row as ``nt`` register tiles ``cols_t = t * BLOCK_N + arange(BLOCK_N)``: every
    row- and column-space value ``v{i}`` becomes ``v{i}_0 .. v{i}_{nt-1}``; a row reduction
    combines the tiles elementwise, then reduces once (a fixed order: deterministic).
    ``rows > 1`` (groups without column partials): each loop step handles that many rows,
    all their loads first, so more bytes are in flight per program (suffix ``_r{u}``)."""
    g, grp = em.g, em.group
    T = range(nt)
    L: list[str] = []
    _tiles_prologue(L, nt)
    in_space = {i: s for r, i, s in args if r == "in"}
    parts = [i for i in grp.nodes if g.nodes[i].kind == "cpart"]
    if parts and rows > 1:
        raise ValueError("several rows per step: only for groups without column partials")
    consts = _scalar_names(em, args)
    # column-space inputs: once per program without partials; with partials they are
    # re-loaded per row (cache hits) so that the registers go to the row tiles and the
    # accumulators
    col_in_loop = bool(parts)
    hoisted: set[int] = set()  # column inputs loaded before the loop (no row suffix)
    if not col_in_loop:
        for i, s in in_space.items():
            if s == "col":
                L += [f"v{i}_{t} = tl.load(in{i} + cols_{t}, mask=cmask_{t}, other=0.0).to(tl.float32)"
                      for t in T]
                hoisted.add(i)
                consts[i] = f"v{i}"
    for i in parts:
        red = g.nodes[i].attr("red")
        L += [f"acc{i}_{t} = tl.full([BLOCK_N], {_NEUTRAL[red]}, dtype=tl.float32)" for t in T]

    def body(u: int, first: str) -> tuple[list[str], list[str]]:
        """(load lines, compute + store lines) of the row ``first + u``."""
        S = f"_r{u}" if rows > 1 else ""
        tiled = set(hoisted)  # nodes with per-tile names v{i}{S}_{t}
        avail = dict(consts)

        def ref(j: int, t: int) -> str:
            return f"{avail[j]}_{t}" if j in tiled else avail[j]

        H = [f"row{S} = {first} + {u}", f"rmask{S} = row{S} < M", f"row64{S} = row{S}.to(tl.int64)"]
        H += [f"mask{S}_{t} = cmask_{t} & ((cols_{t} * 0 + row{S}) < M)" for t in T]
        for i, s in in_space.items():
            if s == "row" or (s == "col" and col_in_loop):
                src = f"in{i} + row64{S} * in{i}_rs + cols_{{t}}" if s == "row" else f"in{i} + cols_{{t}}"
                msk = f"mask{S}_{{t}}" if s == "row" else "cmask_{t}"
                H += [f"v{i}{S}_{t} = tl.load({src.format(t=t)}, mask={msk.format(t=t)}, other=0.0)"
                      ".to(tl.float32)" for t in T]
                avail[i] = f"v{i}{S}"
                tiled.add(i)
            elif s == "stat":
                H.append(f"v{i}{S} = tl.load(in{i} + row{S}, mask=rmask{S}, other=0.0).to(tl.float32)")
                avail[i] = f"v{i}{S}"

        def store(i: int, s: str) -> list[str]:
            if s == "row":
                return [f"tl.store(out{i} + row64{S} * out{i}_rs + cols_{t}, "
                        f"{ref(i, t)}.to(out{i}.dtype.element_ty), mask=mask{S}_{t})" for t in T]
            if s == "stat":
                return [f"tl.store(out{i} + row{S}, {avail[i]}.to(out{i}.dtype.element_ty), mask=rmask{S})"]
            if s == "col":
                return [f"tl.store(out{i} + cols_{t}, {ref(i, t)}.to(out{i}.dtype.element_ty), "
                        f"mask=cmask_{t} & ((cols_{t} * 0 + pid) == 0))" for t in T]
            raise NotImplementedError(s)

        early = _early_stores(em, args)
        C: list[str] = []
        for i in _by_depth(em):
            n = g.nodes[i]
            if n.kind == "rred":
                red = n.op.split("_")[1]
                terms = [f"tl.where(cmask_{t}, {ref(n.inputs[0], t)}, {_NEUTRAL[red]})" for t in T]
                if red == "sum":
                    both = " + ".join(terms)
                else:
                    both = terms[0]
                    for term in terms[1:]:
                        both = f"_nan_max({both}, {term})"
                fn = _REDUCE[red]
                C.append(f"v{i}{S} = {fn}({both}, axis=0)")
                avail[i] = f"v{i}{S}"
            elif n.kind == "cpart":
                red = n.attr("red")
                for t in T:
                    val = f"tl.where(mask{S}_{t}, {ref(n.inputs[0], t)}, {_NEUTRAL[red]})"
                    C.append(f"acc{i}_{t} = " + (f"acc{i}_{t} + {val}" if red == "sum"
                                                 else f"_nan_max(acc{i}_{t}, {val})"))
            elif n.space in ("row", "col") or any(j in tiled for j in n.inputs):
                for t in T:
                    C.append(f"v{i}{S}_{t} = " + em.op_expr(i, [ref(j, t) for j in n.inputs]))
                avail[i] = f"v{i}{S}"
                tiled.add(i)
            else:  # stat / scalar math: once per row
                C.append(f"v{i}{S} = " + em.op_expr(i, [avail[j] for j in n.inputs]))
                avail[i] = f"v{i}{S}"
            if i in early:
                C += store(i, early[i])
        for role, i, s in args:
            if role == "out" and i not in early:
                C += store(i, s)
        return H, C

    L.append(f"for r in range(0, ROWS_PER_PROG, {rows}):")
    bodies = [body(u, "pid * ROWS_PER_PROG + r") for u in range(rows)]
    B = [line for H, _ in bodies for line in H] + [line for _, C in bodies for line in C]
    L += ["    " + b for b in B]
    for i in parts:
        L += [f"tl.store(part{i} + pid * N + cols_{t}, acc{i}_{t}, mask=cmask_{t})" for t in T]
    loads = {i: 1 for i, s in in_space.items() if s == "row"}
    return L, loads

def _row_kernel_reload(em: _Emitter, args, nt: int) -> tuple[list[str], dict]:
    """The tiled variant's re-reading form (one row per step; column partials allowed). Each
    row is processed in passes, one per row-reduction depth (as in the looped variant): a
    pass loads the row tiles it needs, computes its row reductions (combined over the tiles,
    then reduced once) and column partials, and the values of a later pass are recomputed
    from inputs loaded again (the row was just read: the re-read hits the cache, HBM traffic
    stays one read). Only the ``[BLOCK_N]`` column accumulators stay in registers across
    passes, so a long row with column partials does not spill (LayerNorm backward at
    N=18432: x, dy and dweight's partials held would need ~186 registers per thread at 16
    warps). The first pass loads with ``evict_last`` (keep for the re-read), later ones with
    ``evict_first``; the differing loads are also never merged by common-subexpression
    elimination."""
    g, grp = em.g, em.group
    T = range(nt)
    L: list[str] = []
    _tiles_prologue(L, nt)
    in_space = {i: s for r, i, s in args if r == "in"}
    parts = [i for i in grp.nodes if g.nodes[i].kind == "cpart"]
    for i in parts:
        L += [f"acc{i}_{t} = tl.full([BLOCK_N], {_NEUTRAL[g.nodes[i].attr('red')]}, dtype=tl.float32)"
              for t in T]
    depth = _depths(em)
    # pass k computes the row reductions of depth k + 1 (their inputs have depth k), the
    # column partials and row/col outputs of depth k
    level = {i: depth[i] - 1 if g.nodes[i].kind == "rred" else depth[i] for i in grp.nodes}
    levels = sorted({level[i] for i in grp.nodes})
    # re-reads of the row just read hit the cache: HBM reads each row input once
    loads = {i: 1 for i, s in in_space.items() if s == "row"}
    B = ["row = pid * ROWS_PER_PROG + r", "rmask = row < M", "row64 = row.to(tl.int64)"]
    B += [f"mask_{t} = cmask_{t} & ((cols_{t} * 0 + row) < M)" for t in T]
    avail = _scalar_names(em, args)  # row-level values (scalars, statistics)
    for i, s in in_space.items():
        if s == "stat":
            B.append(f"v{i} = tl.load(in{i} + row, mask=rmask, other=0.0).to(tl.float32)")
            avail[i] = f"v{i}"
    outs = [(i, s) for r, i, s in args if r == "out"]
    stored: set[int] = set()
    for p, lvl in enumerate(levels):
        memo: dict[tuple[int, int], str] = {}
        evict = "evict_last" if p == 0 and len(levels) > 1 else "evict_first"

        def val(j: int, t: int, lines: list[str], memo=memo, p=p, evict=evict) -> str:
            if j in avail:
                return avail[j]
            if (j, t) in memo:
                return memo[(j, t)]
            name = f"v{j}_{t}_p{p}"
            if j in in_space:
                s = in_space[j]
                if s == "row":
                    lines.append(f"{name} = tl.load(in{j} + row64 * in{j}_rs + cols_{t}, mask=mask_{t}, "
                                 f"other=0.0, eviction_policy='{evict}').to(tl.float32)")
                else:  # column vector: a cache hit after the first row
                    lines.append(f"{name} = tl.load(in{j} + cols_{t}, mask=cmask_{t}, other=0.0)"
                                 ".to(tl.float32)")
            else:
                n = g.nodes[j]
                if n.kind in ("rred", "cpart", "cfin") or n.space not in ("row", "col"):
                    raise AssertionError(f"node {j} ({n.op}) is not available in pass {p}")
                ins = [val(k, t, lines) for k in n.inputs]
                lines.append(f"{name} = " + em.op_expr(j, ins))
            memo[(j, t)] = name
            return name

        _row_level(em, avail, B)
        C: list[str] = []
        # tile by tile: the values a tile needs in this pass, its terms of the row reductions
        # (a vector combined over the tiles in tile order, reduced once after the last), its
        # column partials and its stores; a tile's values are then dead
        here = [i for i in grp.nodes if level[i] == lvl]
        for t in T:
            for i in here:
                n = g.nodes[i]
                if n.kind == "rred":
                    red = n.op.split("_")[1]
                    v = f"tl.where(cmask_{t}, {val(n.inputs[0], t, C)}, {_NEUTRAL[red]})"
                    C.append(f"red{i} = " + (v if t == 0 else (f"red{i} + {v}" if red == "sum"
                                                               else f"_nan_max(red{i}, {v})")))
                elif n.kind == "cpart":
                    red = n.attr("red")
                    v = f"tl.where(mask_{t}, {val(n.inputs[0], t, C)}, {_NEUTRAL[red]})"
                    C.append(f"acc{i}_{t} = " + (f"acc{i}_{t} + {v}" if red == "sum"
                                                 else f"_nan_max(acc{i}_{t}, {v})"))
            for i, s in outs:
                if s == "stat" or level[i] != lvl:
                    continue
                if s == "row":
                    C.append(f"tl.store(out{i} + row64 * out{i}_rs + cols_{t}, "
                             f"{val(i, t, C)}.to(out{i}.dtype.element_ty), mask=mask_{t})")
                elif s == "col":
                    C.append(f"tl.store(out{i} + cols_{t}, {val(i, t, C)}.to(out{i}.dtype.element_ty), "
                             f"mask=cmask_{t} & ((cols_{t} * 0 + pid) == 0))")
                else:
                    raise NotImplementedError(s)
        for i in here:
            if g.nodes[i].kind == "rred":
                C.append(f"v{i} = {_REDUCE[g.nodes[i].op.split('_')[1]]}(red{i}, axis=0)")
                avail[i] = f"v{i}"
        _row_level(em, avail, C)
        for i, s in outs:
            if s == "stat" and i in avail and i not in stored:
                C.append(f"tl.store(out{i} + row, {avail[i]}.to(out{i}.dtype.element_ty), mask=rmask)")
                stored.add(i)
        B += C
    L.append("for r in range(0, ROWS_PER_PROG):")
    L += ["    " + b for b in B]
    for i in parts:
        L += [f"tl.store(part{i} + pid * N + cols_{t}, acc{i}_{t}, mask=cmask_{t})" for t in T]
    return L, loads


def _row_kernel_looped(em: _Emitter, args) -> tuple[list[str], dict]:
    g, grp = em.g, em.group
    L: list[str] = []
    _row_prologue(L)
    L.append("offs = tl.arange(0, BLOCK_N)")
    base = _scalar_names(em, args)
    # scalar-space math once, before the loops: the final pass (a second loop nest when
    # there are column partials) uses it too, and a value defined in one loop body is not
    # visible in another on the GPU
    for i in grp.nodes:
        n = g.nodes[i]
        if n.kind == "ew" and n.space == "scalar" and i not in base and all(j in base for j in n.inputs):
            L.append(f"{em.var(i)} = " + em.op_expr(i, [base[j] for j in n.inputs]))
            base[i] = em.var(i)
    in_space = {i: s for r, i, s in args if r == "in"}
    loads = {i: 0 for i, s in in_space.items() if s == "row"}
    depth = _depths(em)
    levels = sorted({depth[i] for i in grp.nodes if g.nodes[i].kind == "rred"})
    L.append("for r in range(0, ROWS_PER_PROG):")
    B = ["row = pid * ROWS_PER_PROG + r", "rmask = row < M", "row64 = row.to(tl.int64)"]
    avail = dict(base)  # values live at row level (scalars, stats)
    for i, s in in_space.items():
        if s == "stat":
            B.append(f"{em.var(i)} = {_load(i, s)}")
            avail[i] = em.var(i)

    def emit_in_loop(i, memo, lines):
        if i in avail:
            return avail[i]
        if i in memo:
            return memo[i]
        n = g.nodes[i]
        if i in in_space:
            s = in_space[i]
            lines.append(f"b{i} = {_load(i, s)}")
            if s == "row":
                loads[i] += 1
        else:
            if n.kind in ("rred", "cpart", "cfin"):
                raise AssertionError(f"node {i} ({n.op}) needed before its pass")
            ins = [emit_in_loop(j, memo, lines) for j in n.inputs]
            lines.append(f"b{i} = " + em.op_expr(i, ins))
        memo[i] = f"b{i}"
        return memo[i]

    loop_head = ["for off in range(0, N, BLOCK_N):", "    cols = off + offs"] + \
        ["    " + x for x in _cmask("cmask", "cols")] + ["    mask = cmask & ((cols * 0 + row) < M)"]
    _row_level(em, avail, B)
    for lvl in levels:
        reds = [i for i in grp.nodes if g.nodes[i].kind == "rred" and depth[i] == lvl]
        for i in reds:
            B.append(f"acc{i} = tl.full([BLOCK_N], {_NEUTRAL[g.nodes[i].op.split('_')[1]]}, "
                     "dtype=tl.float32)")
        B += loop_head
        memo: dict[int, str] = {}
        inner: list[str] = []
        for i in reds:
            red = g.nodes[i].op.split("_")[1]
            v = emit_in_loop(g.nodes[i].inputs[0], memo, inner)
            val = f"tl.where(cmask, {v}, {_NEUTRAL[red]})"
            inner.append(f"acc{i} = " + (f"acc{i} + {val}" if red == "sum" else f"_nan_max(acc{i}, {val})"))
        B += ["    " + x for x in inner]
        for i in reds:
            fn = _REDUCE[g.nodes[i].op.split("_")[1]]
            B.append(f"{em.var(i)} = {fn}(acc{i}, axis=0)")
            avail[i] = em.var(i)
        _row_level(em, avail, B)
    # stat outputs, then the final pass for row / col outputs and column partials
    outs = [(i, s) for r, i, s in args if r == "out"]
    for i, s in outs:
        if s == "stat":
            _store(B, i, s, avail[i])
    finals = [(i, s) for i, s in outs if s in ("row", "col")]
    parts = [i for i in grp.nodes if g.nodes[i].kind == "cpart"]
    if parts:
        # column partials: keep the [BLOCK_N] accumulators in registers by looping over
        # column blocks outside and the program's rows inside; the per-row values the
        # final pass needs come from a small fp32 scratch [M, K] written here
        keep = [i for i in sorted(avail) if avail[i] == em.var(i) and g.nodes[i].space == "stat"]
        em.scratch = len(keep)
        for k, i in enumerate(keep):
            B.append(f"tl.store(scratch + row64 * {len(keep)} + {k}, {avail[i]}, mask=rmask)")
        L += ["    " + b for b in B]
        # the scratch values were stored by one thread each; every thread reads them below:
        # a block-wide barrier makes the global writes visible (CUDA orders them only so)
        if keep:
            L.append("tl.debug_barrier()")
        L += ["for off in range(0, N, BLOCK_N):", "    cols = off + offs"] + \
            ["    " + x for x in _cmask("cmask", "cols")]
        memo: dict[int, str] = {}
        pre: list[str] = []
        for i, s in in_space.items():
            if s == "col":
                emit_in_loop(i, memo, pre)
        for i in parts:
            pre.append(f"acc{i} = tl.full([BLOCK_N], {_NEUTRAL[g.nodes[i].attr('red')]}, dtype=tl.float32)")
        inner = ["row = pid * ROWS_PER_PROG + r", "rmask = row < M", "row64 = row.to(tl.int64)",
                 "mask = cmask & ((cols * 0 + row) < M)"]
        for k, i in enumerate(keep):
            inner.append(f"{avail[i]} = tl.load(scratch + row64 * {len(keep)} + {k}, mask=rmask, other=0.0)")
        for i, s in finals:
            _store(inner, i, s, emit_in_loop(i, memo, inner))
        for i in parts:
            red = g.nodes[i].attr("red")
            v = emit_in_loop(g.nodes[i].inputs[0], memo, inner)
            val = f"tl.where(mask, {v}, {_NEUTRAL[red]})"
            inner.append(f"acc{i} = " + (f"acc{i} + {val}" if red == "sum" else f"_nan_max(acc{i}, {val})"))
        L += ["    " + x for x in pre]
        L.append("    for r in range(0, ROWS_PER_PROG):")
        L += ["        " + x for x in inner]
        for i in parts:
            L.append(f"    tl.store(part{i} + pid * N + cols, acc{i}, mask=cmask)")
        return L, loads
    if finals:
        B += loop_head
        memo = {}
        inner = []
        for i, s in finals:
            _store(inner, i, s, emit_in_loop(i, memo, inner))
        B += ["    " + x for x in inner]
    L += ["    " + b for b in B]
    return L, loads


# ---------------------------------------------------------------------------------------
# kernel cache
# ---------------------------------------------------------------------------------------
_KERNELS: dict[tuple, object] = {}
POISON = False  # tests: fill every buffer the runner allocates with NaN first


def cache_dir() -> Path:
    """Where generated kernel sources are written (Triton compiles from a source file):
    ``$PALM_FAST_FUSION_CACHE``, else ``~/.cache/palm_fast/fusion``."""
    d = os.environ.get("PALM_FAST_FUSION_CACHE")
    return Path(d) if d else Path.home() / ".cache" / "palm_fast" / "fusion"


_FALLBACK_DIR: list[Path] = []   # this process's private directory, made on first need


def _fallback_dir() -> Path:
    """A directory only this process made (``mkdtemp``: mode 0700, a fresh name): a fixed
    name in the shared temporary directory could be another user's, who could swap the
    source between its check and its import."""
    if not _FALLBACK_DIR:
        _FALLBACK_DIR.append(Path(tempfile.mkdtemp(prefix="palm_fast_fusion_")))
    return _FALLBACK_DIR[0]


def _write_source(name: str, source: str) -> Path:
    """``source`` as ``<cache dir>/<name>.py`` (unchanged if it is there already). Without
    ``PALM_FAST_FUSION_CACHE``, an unwritable home (a read-only or missing ``$HOME`` in a
    container) falls back to a private temporary directory of this process."""
    dirs = [cache_dir()]
    if not os.environ.get("PALM_FAST_FUSION_CACHE"):
        dirs.append(None)   # (the fallback, made only if needed)
    errors = []
    for d in dirs:
        try:
            d = _fallback_dir() if d is None else d
            path = d / f"{name}.py"
            if not path.exists() or path.read_text() != source:
                d.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    f.write(source)
                os.replace(tmp, path)  # atomic: concurrent processes never see a partial file
            return path
        except OSError as e:
            errors.append(f"{d or 'a temporary directory'}: {e}")
    raise RuntimeError("palm_fast.fusion: cannot write the generated kernel source ("
                       + "; ".join(errors) + "); set PALM_FAST_FUSION_CACHE to a writable directory")


def load_kernel(kernel: Kernel, key: tuple):
    """The ``triton.jit`` function for ``kernel``: memory cache, else write + import its file."""
    fn = _KERNELS.get(key)
    if fn is not None:
        return fn
    digest = hashlib.sha256((repr(key) + kernel.source).encode()).hexdigest()[:20]
    mod_name = f"palm_fast_fusion_{digest}"
    path = _write_source(mod_name, kernel.source)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    fn = getattr(module, kernel.name)
    _KERNELS[key] = fn
    return fn


# ---------------------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------------------
_MISSING = object()
_MAX_PLANS = 256  # launch plans kept per compiled graph (one per input signature; LRU)
_PLANS_LOCK = threading.Lock()   # the plan tables' eviction and reordering


@dataclass
class _Plan:
    """What one call does for one input signature: how to take each input (``None``: as
    is, a shape: viewed as that, ``"scalar"``: as a float), the buffers to allocate
    ``(value id, shape, dtype, device, fill or None)``, the launches ``(kernel, grid,
    [(is_value, value id or int)], meta)``, the outputs ``(name, value id, cast)`` and the
    inputs' device."""

    inputs: list
    allocs: list
    launches: list
    outputs: list
    device: torch.device = torch.device("cpu")


def _num_partials(M: int, device: torch.device, per_sm: int) -> int:
    """Programs (and partial-sum rows) of a row kernel with column reductions."""
    if gpu_launch(device):
        target = per_sm * sm_count(device)
    else:
        target = 4  # the interpreter runs programs one by one
    return max(1, min(M, target))


def _check_options(**opts) -> None:
    """Integer options (bools refused), None where allowed; block sizes powers of two. A bad
    value crashed (loop_block=0: ZeroDivisionError), failed inside Triton (a block of 100,
    steps=1.5) or raised an error naming no option."""
    pow2 = ("max_block", "loop_block", "tile_min", "num_warps", "tiled_warps")   # (tile: >= 16, below)
    optional = ("num_warps", "tiled_warps", "max_tiled", "max_tiled_partial", "row_elems")
    for name, v in opts.items():
        if v is None and name in optional:
            continue
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            raise TypeError(f"{name}: expected an int, got {v!r}")
        if v < (0 if name in ("max_tiled", "max_tiled_partial") else 1):
            raise ValueError(f"{name}: expected a positive int, got {v}")
        if name in pow2 and v & (v - 1):
            raise ValueError(f"{name}: expected a power of two, got {v}")


class CompiledGraph:
    """A graph fused under ``mode``, runnable on torch tensors (CUDA, or CPU under
    ``TRITON_INTERPRET=1``): ``compiled(x=..., weight=..., eps=1e-5) -> {name: tensor}``.
    Intermediates between groups are fp32 tensors allocated per call."""

    def __init__(self, graph: Graph, mode: str = "full", *, max_block: int = DEFAULT_MAX_BLOCK,
                 loop_block: int = DEFAULT_LOOP_BLOCK, partials_per_sm: int = 2,
                 num_warps: int | None = None, tile: int = DEFAULT_TILE,
                 tile_min: int = DEFAULT_TILE_MIN, max_tiled: int | None = None,
                 max_tiled_partial: int | None = None, row_step: int = DEFAULT_ROW_STEP,
                 reload: bool = False, single_rows: int = 1, steps: int = 1,
                 tiled_warps: int | None = None, row_elems: int | None = None):
        if not isinstance(graph, Graph):
            raise TypeError(f"graph: expected a palm_fast.fusion.Graph, got {type(graph).__name__}")
        _check_options(max_block=max_block, loop_block=loop_block, partials_per_sm=partials_per_sm,
                       num_warps=num_warps, tile=tile, tile_min=tile_min, max_tiled=max_tiled,
                       max_tiled_partial=max_tiled_partial, row_step=row_step, single_rows=single_rows,
                       steps=steps, tiled_warps=tiled_warps, row_elems=row_elems)
        self.source_graph = graph
        self.schedule = fuse(graph, mode)
        self.graph = self.schedule.graph
        self.mode, self.max_block, self.loop_block = mode, max_block, loop_block
        self.hash = graph.hash()
        self.partials_per_sm = partials_per_sm
        # None: by row width held (4 up to 1024, 8 up to 4096 or whole 8192-column rows
        # without column partials, else 16)
        self.num_warps = num_warps
        # warps of tiled kernels without column partials (None: by row width, as above;
        # num_warps, when given, takes precedence)
        self.tiled_warps = tiled_warps
        # at most this many row elements (rows x tiled width) loaded per loop step of a
        # tiled kernel without column partials, but always one row (None: row_step alone
        # sets the rows)
        self.row_elems = row_elems
        if tile < 16 or tile & (tile - 1):
            raise ValueError(f"tile: expected a power of two >= 16, got {tile}")
        # the tiled variant: rows with tile_min < N <= max_tiled(_partial) held as tiles; the
        # defaults apply with the default max_block (a smaller max_block, as tests force the
        # looped variant with, turns tiling off unless asked for)
        default = max_block == DEFAULT_MAX_BLOCK
        self.tile, self.tile_min = tile, tile_min
        self.row_step = row_step  # rows per loop step of tiled kernels without column partials
        self.single_rows = single_rows  # rows per step of single-block kernels without partials
        self.steps = steps  # loop steps per program of kernels without partials
        # row kernels with column partials (single-block or tiled) re-read the row after
        # each row reduction instead of holding it (default False: measured slower, see
        # PARTIAL_TILED_WARPS)
        self.reload = bool(reload)
        self.max_tiled = max_tiled if max_tiled is not None else (MAX_TILED if default else 0)
        self.max_tiled_partial = (max_tiled_partial if max_tiled_partial is not None
                                  else (MAX_TILED_PARTIAL if default else 0))
        self._launch_cache: dict[tuple, tuple] = {}
        self._plans: dict[tuple, _Plan] = {}
        self._input_names = tuple(self.graph.inputs)
        # groups that write column partials ([N] accumulators held: shorter rows per block)
        self._partial_groups = {grp.index for grp in self.schedule.groups
                                if any(self.graph.nodes[i].kind == "cpart" for i in grp.nodes)}

    @property
    def kernel_count(self) -> int:
        return self.schedule.kernel_count

    def variant(self, group: Group, N: int) -> tuple[bool, int, int]:
        """(looped, BLOCK_N, tiles) for a group at row length N: single-block (tiles 1),
        tiled (``tiles`` blocks of ``BLOCK_N``) or looped."""
        if group.kind == "col":
            return False, min(COL_BLOCK, max(16, _next_pow2(N))), 1
        has_part = group.index in self._partial_groups
        if self.tile_min < N <= (self.max_tiled_partial if has_part else self.max_tiled):
            return False, self.tile, -(-N // self.tile)
        limit = self.max_block
        if self.max_block == DEFAULT_MAX_BLOCK and not has_part:
            limit = NO_PARTIAL_MAX_BLOCK  # no [BLOCK_N] column accumulators held: longer rows fit
        if N <= limit:
            return False, max(16, _next_pow2(N)), 1
        return True, self.loop_block, 1

    def _rows(self, group: Group, tiles: int) -> int:
        """Rows per loop step of a kernel without column partials: single-block kernels take
        ``single_rows``; tiled ones ``row_step`` row loads in flight per step, shared among
        the group's row-space inputs (a LayerNorm forward takes 3 rows per step; add +
        LayerNorm, with 2-3 row inputs, one)."""
        if group.index in self._partial_groups:
            return 1
        if tiles == 1:
            return self.single_rows
        row_inputs = sum(1 for i in group.inputs if self.graph.nodes[i].space == "row")
        rows = max(1, self.row_step // max(1, row_inputs))
        if self.row_elems:
            rows = max(1, min(rows, self.row_elems // (tiles * self.tile)))
        return rows

    def _reload(self, group: Group, looped: bool, tiles: int) -> bool:
        """Whether a row kernel re-reads its row after each row reduction (the ``reload``
        option; only row kernels with column partials, not looped)."""
        return (self.reload and not looped and group.kind == "row"
                and group.index in self._partial_groups)

    def kernel(self, group: Group, N: int, dtypes: tuple) -> tuple[Kernel, object, int, int]:
        """(generated kernel, its triton.jit function, BLOCK_N, tiles), cached by graph hash,
        mode, group, variant, block size and input dtypes."""
        looped, block, tiles = self.variant(group, N)
        rows = 1 if looped else self._rows(group, tiles)
        reload = self._reload(group, looped, tiles)
        key = (self.hash, self.mode, group.index, looped, block, tiles, rows, reload, dtypes)
        hit = self._launch_cache.get(key)
        if hit is None:
            k = generate(self.schedule, group, looped=looped, tiles=tiles, rows=rows, reload=reload)
            hit = self._launch_cache[key] = (k, load_kernel(k, key), block, tiles)
        return hit

    def sources(self, N: int) -> list[Kernel]:
        out = []
        for grp in self.schedule.groups:
            looped, _block, tiles = self.variant(grp, N)
            out.append(generate(self.schedule, grp, looped=looped, tiles=tiles,
                                rows=1 if looped else self._rows(grp, tiles),
                                reload=self._reload(grp, looped, tiles)))
        return out

    def __call__(self, /, **inputs) -> dict[str, torch.Tensor]:
        """Run the graph. The first call per input signature (shapes, strides, dtypes,
        devices) validates the inputs and records a launch plan; later calls with the same
        signature only allocate the outputs and launch (the Python cost per call matters:
        a 16384 x 4096 LayerNorm takes ~0.1 ms on an H100)."""
        key = self._signature(inputs)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(inputs)
            with _PLANS_LOCK:   # (graphs are shared by threads: DataParallel replicas, servers)
                if len(self._plans) >= _MAX_PLANS:
                    # evict the least recently used (a dict keeps insertion order; hits move to
                    # the end below): with many row counts (ragged batches), the shapes in use
                    # stay planned
                    self._plans.pop(next(iter(self._plans)), None)
                self._plans[key] = plan
        elif len(self._plans) > _MAX_PLANS // 2:   # (only order what eviction could reach)
            with _PLANS_LOCK:
                if self._plans.pop(key, None) is not None:
                    self._plans[key] = plan   # most recently used last
        return self._run(plan, inputs)

    def _signature(self, inputs: dict) -> tuple:
        key = [POISON]
        for name in self._input_names:
            t = inputs.get(name, _MISSING)
            if isinstance(t, torch.Tensor):
                key.append((t.shape, t.stride(), t.dtype, t.device))
            else:
                key.append(type(t))
        if len(inputs) != len(self._input_names):
            key.append(tuple(sorted(inputs)))  # unexpected names: the planner raises
        return tuple(key)

    @staticmethod
    def _run(plan: _Plan, inputs: dict) -> dict[str, torch.Tensor]:
        values: dict[int, object] = {}
        for name, nid, want in plan.inputs:
            t = inputs[name]
            values[nid] = float(t) if want == "scalar" else (t if want is None else t.view(want))
        for nid, shape, dtype, device, fill in plan.allocs:
            values[nid] = (torch.empty(shape, device=device, dtype=dtype) if fill is None
                           else torch.full(shape, fill, device=device, dtype=dtype))
        with launch_device(plan.device):   # (Triton launches on the current CUDA device)
            for fn, grid, spec, kw in plan.launches:
                fn[grid](*[values[x] if is_value else x for is_value, x in spec], **kw)
        result = {}
        for name, nid, cast in plan.outputs:
            v = values[nid]
            result[name] = v if cast is None else (v.clone() if cast == "copy" else v.to(cast))
        return result

    def _plan(self, inputs: dict) -> _Plan:
        """Validate ``inputs`` (clear errors naming the argument) and record the launches."""
        g = self.graph
        missing = set(g.inputs) - set(inputs)
        if missing:
            raise TypeError(f"{g.name}: missing inputs {sorted(missing)}")
        extra = set(inputs) - set(g.inputs)
        if extra:
            raise TypeError(f"{g.name}: unexpected inputs {sorted(extra)}")
        plan = _Plan([], [], [], [])
        dtype_of: dict[int, object] = {}   # value id -> torch dtype ("f" for a scalar)
        stride_of: dict[int, int] = {}     # row value id -> its row stride
        M = N = None
        device = None
        for name, nid in g.inputs.items():
            space, t = g.nodes[nid].space, inputs[name]
            if space == "scalar":
                if isinstance(t, (torch.Tensor, bool)) or not isinstance(t, (int, float)):
                    raise TypeError(f"{name}: expected a Python float, got {type(t).__name__}")
                # as Graph.const: a finite value that fp32 (the kernels' arithmetic) turns into
                # inf or 0 is refused (10**400 raised OverflowError, 1e300 became inf silently)
                if outside_fp32(t):
                    raise ValueError(f"{name}: {t!r} is outside float32's range (the kernels "
                                     f"compute in fp32)")
                dtype_of[nid] = "f"
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")
            if space == "row":
                if t.dim() != 2:
                    raise ValueError(f"{name}: expected a 2-D [M, N] tensor, got shape {tuple(t.shape)}")
                if t.size(1) > 1 and t.stride(1) != 1:
                    raise ValueError(f"{name}: expected a unit stride in the last dim, got strides "
                                     f"{tuple(t.stride())}")
                if M is None:
                    M, N = t.shape
                elif tuple(t.shape) != (M, N):
                    raise ValueError(f"{name}: expected shape {(M, N)}, got {tuple(t.shape)}")
                stride_of[nid] = t.stride(0)
            if device is None:
                device = t.device
            elif t.device != device:
                raise ValueError(f"{name}: expected device {device}, got {t.device}")
            dtype_of[nid] = t.dtype
        if M is None:
            raise ValueError(f"{g.name}: needs at least one row-space input")
        if N == 0:
            raise ValueError(f"{g.name}: rows of length 0 (N == 0) are not supported")
        plan.device = device
        if not gpu_launch(device) and not interpreting():
            raise RuntimeError(f"{g.name}: the generated Triton kernels need CUDA tensors (or CPU "
                               "tensors with TRITON_INTERPRET=1 set before triton is imported)")
        for name, nid in g.inputs.items():
            space = g.nodes[nid].space
            want = {"stat": (M,), "col": (N,)}.get(space)
            if space == "scalar":
                plan.inputs.append((name, nid, "scalar"))
                continue
            if want is not None:
                t = inputs[name]
                # [M] or [M, 1] for a stat, [N], [1, N] or [N, 1] for a col (a [2, 4] weight for
                # N = 8 was flattened silently)
                n = want[0]
                forms = [(n,), (n, 1)] if space == "stat" else [(n,), (1, n), (n, 1)]
                if tuple(t.shape) not in forms:
                    raise ValueError(f"{name}: expected shape {' or '.join(map(str, forms))} ({space} "
                                     f"vector), got {tuple(t.shape)}")
                if not t.is_contiguous():
                    raise ValueError(f"{name}: expected a contiguous tensor")
                if tuple(t.shape) == want:
                    want = None  # already [M] / [N]: no view needed
            plan.inputs.append((name, nid, want))
        def want(like):
            return torch.float32 if like == "float32" else inputs[like].dtype

        # A kernel writes a graph output in its dtype, unless another kernel reads the value
        # too: intermediates between kernels stay fp32, and the returned output is cast. A
        # node output twice in different dtypes is written in fp32 (each output is then
        # rounded once from it; written in the first one's half type, a later fp32 output
        # held only that precision).
        consumed = {i for grp in self.schedule.groups for i in grp.inputs}
        out_dtype = {}
        for nid, like in g.outputs.values():
            dt = torch.float32 if nid in consumed else want(like)
            out_dtype[nid] = dt if out_dtype.get(nid, dt) == dt else torch.float32
        P = _num_partials(M, device, self.partials_per_sm)
        rpp = -(-M // P)
        P = -(-M // rpp) if M else 1
        for grp in self.schedule.groups:
            dtypes = tuple(str(dtype_of[i]) if dtype_of[i] != "f" else "f" for i in grp.inputs)
            k, fn, block, tiles = self.kernel(grp, N, dtypes)
            has_part = grp.index in self._partial_groups
            for i in grp.outputs:
                n = g.nodes[i]
                if n.kind == "cpart":
                    # M == 0: no program runs a row, the partial sums are the neutral element
                    # (a column sum over no rows is 0, as torch's; a column max has no value,
                    # and torch's amax raises); else every program writes its own row of partials
                    if M == 0 and n.attr("red") == "max":
                        raise ValueError(f"{g.name}: a column max over 0 rows (M == 0) has no value")
                    fill = 0.0 if M == 0 else None
                    plan.allocs.append((i, (P, N), torch.float32, device, fill))
                    dtype_of[i] = torch.float32
                else:
                    shape = {"row": (M, N), "stat": (M,), "col": (N,)}[n.space]
                    dt = out_dtype.get(i, torch.float32)
                    plan.allocs.append((i, shape, dt, device, float("nan") if POISON else None))
                    dtype_of[i] = dt
                    if n.space == "row":
                        stride_of[i] = N
            spec = []
            for _role, i, space in k.args:
                spec.append((True, i))
                if space == "row":
                    spec.append((False, stride_of[i]))
            if k.scratch:
                sid = -1 - len(plan.allocs)  # a value id no graph node has
                plan.allocs.append((sid, (max(M, 1), k.scratch), torch.float32, device, None))
                spec.append((True, sid))
            if grp.kind == "col":
                spec += [(False, N), (False, P)]
                grid = (-(-N // block),)
            else:
                if has_part:  # (M == 0: one program, one masked row; column outputs written)
                    spec += [(False, M), (False, N), (False, max(rpp, 1))]
                    grid = (P,)
                else:  # (rpp stays the partial groups' rows per program)
                    rows_pp = k.rows * self.steps
                    spec += [(False, M), (False, N), (False, rows_pp)]
                    grid = (-(-M // rows_pp),)
                if grid[0] == 0:
                    if not any(g.nodes[i].space == "col" and g.nodes[i].kind != "cpart" for i in grp.outputs):
                        continue
                    grid = (1,)  # M == 0: program 0 still writes the column-space outputs
            kw = {"BLOCK_N": block}
            even = N % block == 0
            if grp.kind == "row":
                kw["EVEN_N"] = even
            if gpu_launch(device):
                width = block * tiles  # the row width a program holds (or streams)
                # (8 warps for whole 8192-wide rows without column partials: H100, bf16, the
                # mean-corrected LayerNorm forward at 16384 x 8192 took 206 us with 16 warps,
                # 184 with 8; session19/probe9_ln.py. Not for masked rows (4096 < N < 8192):
                # unmeasured, and compiled for sm_90 they took up to 187 registers with 8
                # warps. 16 for the backward's partials: probe 6)
                eight = 8192 if even and not has_part else 4096   # widest row with 8 warps
                warps = 4 if width <= 1024 else (8 if width <= eight else 16)
                if tiles > 1 and has_part and not k.reload:
                    warps = PARTIAL_TILED_WARPS
                elif tiles > 1 and not has_part and self.tiled_warps:
                    warps = self.tiled_warps
                kw["num_warps"] = self.num_warps or warps
                # No FMA contraction, as the C++ kernels (-ffp-contract=off): the LayerNorm
                # backward rounds g = dy * w in its first pass (mean of g), and a second pass
                # contracted g - mean(g) into fma(dy, w, -mean): dx of a 1-wide row was the
                # rounding error times rstd (up to 0.11 at eps 1e-12) instead of 0. Also pins
                # the results across Triton versions (3.10 changes the default).
                kw["enable_fp_fusion"] = False
            plan.launches.append((fn, grid, spec, kw))
        seen = set()
        for name, (nid, like) in g.outputs.items():
            dt = dtype_of[nid]
            cast = want(like) if dt != "f" and dt != want(like) else None
            if cast is None and (g.nodes[nid].op == "input" or nid in seen):
                cast = "copy"   # an output that simplified to an input (or a repeated value): a new tensor
            seen.add(nid)
            plan.outputs.append((name, nid, cast))
        return plan


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_COMPILED: dict[tuple, CompiledGraph] = {}


def compile_graph(graph: Graph, mode: str = "full", **options) -> CompiledGraph:
    """A cached :class:`CompiledGraph` (keyed by graph hash, mode and options)."""
    if not isinstance(graph, Graph):
        raise TypeError(f"graph: expected a palm_fast.fusion.Graph, got {type(graph).__name__}")
    key = (graph.hash(), mode, tuple(sorted(options.items())))
    if key not in _COMPILED:
        _COMPILED[key] = CompiledGraph(graph, mode, **options)
    return _COMPILED[key]


# ---------------------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------------------
def explain(graph: Graph, mode: str = "full", *, M: int = 16384, N: int = 4096,
            dtype: torch.dtype = torch.bfloat16, source: bool = True, file="stdout",
            **options) -> str:
    """Describe how ``graph`` runs under ``mode`` for an ``M x N`` problem in ``dtype``: the
    groups and their ops, the kernel count, the bytes each kernel moves (row inputs streamed
    once per pass; intermediates are fp32) and, with ``source=True``, the generated Triton
    source. Prints to ``file`` (default stdout; ``None``: do not print) and returns the text."""
    for name, v in (("M", M), ("N", N)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    if file is not None and file != "stdout" and not callable(getattr(file, "write", None)):
        raise TypeError(f"file: expected None, 'stdout' or a writable text stream, got {file!r}")
    cg = CompiledGraph(graph, mode, **options)
    g = cg.graph
    item = torch.tensor([], dtype=dtype).element_size()
    # Partial-sum rows as the runner makes them on an H100-class GPU (132 SMs).
    P = max(1, min(M, cg.partials_per_sm * 132))
    P = -(-M // -(-M // P))
    # Element sizes as the runner stores values (see CompiledGraph._plan): row / col inputs
    # in ``dtype``, stat inputs and intermediates in fp32; a graph output another kernel also
    # reads in fp32 (cast at the end), one nobody else reads in its requested dtype, and a
    # value output in two dtypes in fp32.
    consumed = {i for grp in cg.schedule.groups for i in grp.inputs}

    def size_of(i: int) -> int:
        return {"row": M * N, "stat": M, "col": N, "partial": P * N, "scalar": 0}[g.nodes[i].space]

    def input_item(i: int) -> int:
        return item if g.nodes[i].space in ("row", "col") else 4

    def like_item(like: str) -> int:
        return 4 if like == "float32" else input_item(g.inputs[like])

    stored: dict[int, int] = {}
    for nid, like in g.outputs.values():
        if g.nodes[nid].op == "input":
            stored[nid] = input_item(nid)
            continue
        s = 4 if nid in consumed else like_item(like)
        stored[nid] = s if stored.get(nid, s) == s else 4

    def nbytes(i: int, reads: int = 1) -> int:
        if g.nodes[i].op == "input":
            return size_of(i) * input_item(i) * reads
        return size_of(i) * stored.get(i, 4) * reads

    lines = [f"graph {graph.name} ({graph.hash()}): {graph.op_count()} primitive ops; mode {mode}; "
             f"{cg.kernel_count} kernel(s); M={M}, N={N}, {str(dtype).replace('torch.', '')}"]
    total = 0
    kernels = cg.sources(N)
    for grp, k in zip(cg.schedule.groups, kernels):
        ops = ", ".join(f"%{i}={g.nodes[i].op}" for i in grp.nodes)
        moved = sum(nbytes(i, k.row_loads.get(i, 1)) for i in grp.inputs) + \
            sum(nbytes(i) for i in grp.outputs)
        total += moved
        variant = "col-reduce" if grp.kind == "col" else (
            "looped" if k.looped else (f"tiled x{k.tiles}" if k.tiles > 1 else "single-block")) + \
            (f", {k.rows} rows per step" if k.rows > 1 else "") + \
            (", re-reading the row per pass from cache" if k.reload else "")
        lines.append(f"  kernel {grp.index}: {grp.label} [{grp.kind}, {variant}] {ops}")
        lines.append(f"    reads {['%' + str(i) for i in grp.inputs]} writes "
                     f"{['%' + str(i) for i in grp.outputs]}; bytes moved {moved:,} "
                     f"({moved / (M * N * item):.2f} x M*N*itemsize)")
    # The runner's closing copies: a value stored in another dtype than an output asks for is
    # cast (read, write), and an output that is an input (or repeats another output) in its
    # own dtype is copied to a new tensor.
    seen, extra = set(), 0
    for nid, like in g.outputs.values():
        have, want = stored[nid], like_item(like)
        if have != want:
            extra += size_of(nid) * (have + want)
        elif g.nodes[nid].op == "input" or nid in seen:
            extra += 2 * size_of(nid) * have
        seen.add(nid)
    if extra:
        total += extra
        lines.append(f"  output casts / copies after the kernels: bytes moved {extra:,} "
                     f"({extra / (M * N * item):.2f} x M*N*itemsize)")
    lines.append(f"  total bytes moved {total:,} ({total / (M * N * item):.2f} x M*N*itemsize)")
    if source:
        for k in kernels:
            lines.append(f"# ---- kernel {k.group.index}: {k.name}")
            lines.append(k.source)
    text = "\n".join(lines)
    if file is not None:
        print(text, file=sys.stdout if file == "stdout" else file)
    return text
