"""Graph passes: simplification, CSE, dead-code removal, and the fusion pass.

Fusion rules (applied greedily over nodes in topological order, producer by producer):

1. elementwise into elementwise: an elementwise op joins the group of its elementwise producer;
2. a reduction absorbs its elementwise producers (their group becomes the reduction's);
3. a row reduction feeds its consumers in the same kernel when the row fits on chip — in one
   block, or re-streamed by the looped variant (mode ``full`` only; in ``mindspore`` mode a
   reduction's output never fuses forward, MindSpore's rule for its Ascend kernels);
4. same-axis reductions merge: independent groups (no path between them) that both reduce
   along rows / produce column partials merge, and so do the final column reductions;
5. column reductions become ``col_partial`` (per-program partial sums, accumulated inside the
   row kernel) and ``col_final`` (a small kernel summing the partials): deterministic, no atomics.

Every merge is checked for cycles: two groups may not merge when a path between them runs
through a third group (the merged kernel would both feed and consume that group).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..ops._checks import FP32_MAX, FP32_TINY
from .ir import COMMUTATIVE, Graph, Node, NodeId, outside_fp32, to_fp32

MODES = ("mindspore", "full")


class FusionError(ValueError):
    """An illegal fusion (a merge that would create a cycle, or break a rule)."""


# ---------------------------------------------------------------------------------------
# rewriting helpers
# ---------------------------------------------------------------------------------------
def _rebuild(graph: Graph, visit) -> Graph:
    """Replay ``graph`` node by node; ``visit(new_graph, node, remapped_inputs)`` returns the
    new node id for ``node`` (or ``None`` to copy it unchanged)."""
    g = Graph(graph.name)
    remap: dict[int, int] = {}
    for n in graph.nodes:
        ins = tuple(remap[i] for i in n.inputs)
        new = visit(g, n, ins)
        if new is None:
            if n.op == "input":
                new = g.input(n.name, n.space)
            else:
                new = g._add(n.op, ins, n.space, n.attrs, n.name)
        remap[n.id] = new
    for k, (v, d) in graph.outputs.items():
        g.outputs[k] = (remap[v], d)
    return g


def _const(g: Graph, i: int):
    n = g.nodes[i]
    return (n.attr("value"), n.attr("n_pow")) if n.op == "const" else None


def _normal_for_any_n(value: float, n_pow: int) -> bool:
    """Whether ``value * N**n_pow`` is a normal fp32 number for every N in [1, 2^31] (it is
    monotonic in N: the two ends bound it)."""
    try:
        return all(FP32_TINY <= abs(value) * float(n) ** n_pow <= FP32_MAX for n in (1, 2 ** 31))
    except OverflowError:   # (2^31)^p past the float range: not normal either
        return False


def _fold(g: Graph, op: str, ca: tuple, cb: tuple):
    """The constant ``ca op cb`` computed as the kernels would, in fp32 (operands rounded to
    fp32, one rounding of the result), or None: not folded where that result overflows or
    underflows to 0 (``Graph.const`` refuses such a value, and a valid graph must still
    compile) or the exponents of N differ. (Folding in float64 gave x + 1 for
    x + (16777217 - 16777216), where fp32 op by op gives x + 0.)"""
    (va, pa), (vb, pb) = ca, cb
    fa, fb = to_fp32(va), to_fp32(vb)
    if op == "mul":
        r, p = fa * fb, pa + pb
    elif op == "div" and fb != 0:
        r, p = fa / fb, pa - pb
    elif op in ("add", "sub") and pa == pb:
        r, p = (fa + fb if op == "add" else fa - fb), pa
    else:
        return None
    if outside_fp32(r):
        return None
    return g.const(to_fp32(r), p)


def simplify(graph: Graph) -> Graph:
    """Simple algebra: fold constant expressions (``c1 * N**p1 op c2 * N**p2``), drop
    ``x * 1``, ``x / 1``, ``x + (-0)``, ``x - (+0)``, ``--x``, and fold chained constant
    scalings ``(x * c1) * c2 -> x * (c1 * c2)`` where ``c1 * c2`` is a normal fp32 number
    (for every row length N, when it has an ``N**p`` factor).
    Constants go to the right of commutative ops."""

    def visit(g: Graph, n: Node, ins):
        if n.op in COMMUTATIVE and _const(g, ins[0]) and not _const(g, ins[1]):
            ins = (ins[1], ins[0])
        if n.op in ("add", "sub", "mul", "div") and len(ins) == 2:
            a, b = ins
            ca, cb = _const(g, a), _const(g, b)
            if ca and cb:
                folded = _fold(g, n.op, ca, cb)
                if folded is not None:
                    return folded
            if cb == (1.0, 0) and n.op in ("mul", "div"):
                return a
            # x + (-0) and x - (+0) are x for every x; x + (+0) is not (-0 + +0 = +0)
            if n.op in ("add", "sub") and cb and cb[0] == 0.0 and cb[1] == 0 and \
                    math.copysign(1.0, cb[0]) == (-1.0 if n.op == "add" else 1.0):
                return a   # (only for add / sub: x * +0 and x / +0 are not x)
            if n.op == "mul" and cb and g.nodes[a].op == "mul" and _const(g, g.nodes[a].inputs[1]):
                inner_x, inner_c = g.nodes[a].inputs
                vc, pc = _const(g, inner_c)
                # reassociated only where c1 * c2 is a normal fp32 number: (x * 1e30) * 1e-30
                # must not become x * 0 (nor x * inf); the result can still differ from the
                # op-by-op one in the last bit, or where x * c1 alone would overflow
                # for every row length N in [1, 2^31] when it has an N**p factor ((x * N) *
                # 1e38 overflowed at N = 1000)
                if _normal_for_any_n(vc * cb[0], pc + cb[1]):
                    return g.mul(NodeId(inner_x, g), g.const(vc * cb[0], pc + cb[1]))
        if n.op == "neg" and g.nodes[ins[0]].op == "neg":
            return NodeId(g.nodes[ins[0]].inputs[0], g)
        if n.op in ("input", "const"):
            return None
        return g._add(n.op, ins, n.space, n.attrs, n.name)

    return _rebuild(graph, visit)


def cse(graph: Graph) -> Graph:
    """Common-subexpression elimination (commutative operands compared as a set)."""
    seen: dict[tuple, int] = {}

    def visit(g: Graph, n: Node, ins):
        if n.op == "input":
            return None
        key_ins = tuple(sorted(ins)) if n.op in COMMUTATIVE else ins
        # attribute values by repr: 0.0 == -0.0 (and hash the same) in Python, but
        # x / 0.0 and x / -0.0 differ
        key = (n.op, key_ins, n.space, tuple((k, repr(v)) for k, v in n.attrs))
        if key not in seen:
            seen[key] = g._add(n.op, ins, n.space, n.attrs, n.name)
        return seen[key]

    return _rebuild(graph, visit)


def dce(graph: Graph) -> Graph:
    """Drop nodes no output depends on (inputs are kept: they are the signature)."""
    live = {v for v, _ in graph.outputs.values()}
    for n in reversed(graph.nodes):
        if n.id in live:
            live.update(n.inputs)
    g = Graph(graph.name)
    remap: dict[int, int] = {}
    for n in graph.nodes:
        if n.op == "input":
            remap[n.id] = g.input(n.name, n.space)
        elif n.id in live:
            remap[n.id] = g._add(n.op, tuple(remap[i] for i in n.inputs), n.space, n.attrs, n.name)
    for k, (v, d) in graph.outputs.items():
        g.outputs[k] = (remap[v], d)
    return g


def split_column_reductions(graph: Graph) -> Graph:
    """``reduce_*(x, axis=col)`` -> ``col_final(col_partial(x))`` (two deterministic stages)."""

    def visit(g: Graph, n: Node, ins):
        if n.kind == "cred":
            red = n.op.split("_")[1]
            part = g._add("col_partial", ins, "partial", (("red", red),))
            return g._add("col_final", (part,), "col", (("red", red),))
        return None

    return _rebuild(graph, visit)


def prepare(graph: Graph) -> Graph:
    """The pass pipeline run before fusion."""
    graph.topological_order()
    return split_column_reductions(dce(cse(simplify(graph))))


# ---------------------------------------------------------------------------------------
# fusion
# ---------------------------------------------------------------------------------------
@dataclass
class Group:
    """One kernel: ``nodes`` (ids, topological), the values it reads (``inputs``: graph
    inputs and other groups' nodes) and the values it writes (``outputs``)."""

    index: int
    kind: str  # "row" (one program per block of rows) or "col" (the final column reductions)
    nodes: list[int]
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "single op" if len(self.nodes) == 1 else f"fused ({len(self.nodes)} ops)"


class Partition:
    """A partition of a graph's compute nodes into groups, with cycle-checked merges."""

    def __init__(self, graph: Graph, mode: str = "full", row_fits: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.graph, self.mode, self.row_fits = graph, mode, row_fits
        self.group_of: dict[int, int] = {}
        self.members: dict[int, set[int]] = {}
        for n in graph.compute_nodes():
            self.group_of[n.id] = n.id
            self.members[n.id] = {n.id}

    def _producers(self, gid: int) -> set[int]:
        out = set()
        for nid in self.members[gid]:
            for i in self.graph.nodes[nid].inputs:
                if i in self.group_of and self.group_of[i] != gid:
                    out.add(self.group_of[i])
        return out

    def _consumers(self) -> dict[int, set[int]]:
        cons: dict[int, set[int]] = {g: set() for g in self.members}
        for g in self.members:
            for p in self._producers(g):
                cons[p].add(g)
        return cons

    def path_exists(self, a: int, b: int, *, direct: bool = True) -> bool:
        """Is there a path of groups from ``a`` to ``b``? (``direct=False``: ignore the edge a->b,
        i.e. only paths through another group.)"""
        cons = self._consumers()
        stack = [c for c in cons[a] if direct or c != b]
        seen = set(stack)
        while stack:
            g = stack.pop()
            if g == b:
                return True
            for c in cons[g]:
                if c not in seen:
                    seen.add(c)
                    stack.append(c)
        return False

    def creates_cycle(self, a: int, b: int) -> bool:
        return self.path_exists(a, b, direct=False) or self.path_exists(b, a, direct=False)

    def legal(self, nodes: set[int]) -> bool:
        """Would ``nodes`` make one legal kernel under this mode's rules?"""
        g = self.graph
        kinds = {g.nodes[i].kind for i in nodes}
        if "cfin" in kinds:  # the final column kernel: only col-space elementwise epilogues
            return all(g.nodes[i].kind == "cfin" or (g.nodes[i].kind == "ew" and g.nodes[i].space
                                                     in ("col", "scalar")) for i in nodes)
        if self.mode == "mindspore" or not self.row_fits:  # reductions do not fuse forward
            for i in nodes:
                if any(p in nodes and g.nodes[p].kind == "rred" for p in g.nodes[i].inputs):
                    return False
        return True

    def merge(self, a: int, b: int) -> int:
        """Merge groups ``a`` and ``b``; raises :class:`FusionError` if illegal."""
        if a == b:
            return a
        if self.creates_cycle(a, b):
            raise FusionError(f"merging groups {a} and {b} would create a cycle through another group")
        union = self.members[a] | self.members[b]
        if not self.legal(union):
            raise FusionError(f"merging groups {a} and {b} breaks a {self.mode} fusion rule")
        keep, drop = min(a, b), max(a, b)
        self.members[keep] = union
        del self.members[drop]
        for n in union:
            self.group_of[n] = keep
        return keep

    def try_merge(self, a: int, b: int) -> bool:
        try:
            self.merge(a, b)
            return True
        except FusionError:
            return False

    def run_rules(self) -> None:
        g = self.graph
        # rules 1-3: vertical fusion, producer by producer
        for n in g.compute_nodes():
            for p in n.inputs:
                if p in self.group_of:
                    self.try_merge(self.group_of[p], self.group_of[n.id])
        # rule 4: same-axis reductions merge (independent groups only)
        for tag in ("row", "col"):
            changed = True
            while changed:
                changed = False
                cands = sorted(gid for gid, m in self.members.items() if self._axis(m) == tag)
                for i, a in enumerate(cands):
                    for b in cands[i + 1:]:
                        if self.path_exists(a, b) or self.path_exists(b, a):
                            continue
                        if self.try_merge(a, b):
                            changed = True
                            break
                    if changed:
                        break

    def _axis(self, members: set[int]) -> str | None:
        kinds = {self.graph.nodes[i].kind for i in members}
        if "cfin" in kinds:
            return "col"
        if kinds & {"rred", "cpart"}:
            return "row"
        return None

    def groups(self) -> list[Group]:
        """The groups in a topological (launch) order, with their inputs and outputs."""
        g = self.graph
        order: list[int] = []
        indeg = {gid: len(self._producers(gid)) for gid in self.members}
        cons = self._consumers()
        ready = sorted(gid for gid, d in indeg.items() if d == 0)
        while ready:
            gid = ready.pop(0)
            order.append(gid)
            for c in sorted(cons[gid]):
                indeg[c] -= 1
                if indeg[c] == 0:
                    ready.append(c)
            ready.sort()
        if len(order) != len(self.members):
            raise FusionError("the group graph has a cycle")
        graph_outs = {v for v, _ in g.outputs.values()}
        users = g.users()
        out = []
        for idx, gid in enumerate(order):
            mem = set(self.members[gid])
            # Scalar math (of scalar inputs and constants) is recomputed in every kernel that
            # uses it, never passed between kernels (a kernel's outputs are tensors).
            todo = list(mem)
            while todo:
                for i in g.nodes[todo.pop()].inputs:
                    n = g.nodes[i]
                    if i not in mem and n.space == "scalar" and n.kind == "ew":
                        mem.add(i)
                        todo.append(i)
            ins = sorted({i for n in mem for i in g.nodes[n].inputs
                          if i not in mem and g.nodes[i].op != "const"})
            outs = sorted(n for n in mem if g.nodes[n].space != "scalar"
                          and (n in graph_outs or any(u not in mem for u in users[n])))
            kind = "col" if self._axis(mem) == "col" else "row"
            out.append(Group(idx, kind, sorted(mem), ins, outs))
        return out


@dataclass
class Schedule:
    graph: Graph  # the prepared graph (after simplify / CSE / DCE / column split)
    mode: str
    groups: list[Group]

    @property
    def kernel_count(self) -> int:
        return len(self.groups)


def fuse(graph: Graph, mode: str = "full", *, row_fits: bool = True) -> Schedule:
    """Prepare ``graph`` and partition it into kernels under ``mode``'s rules.

    ``row_fits=False`` forbids rule 3 in ``full`` mode too (for targets that cannot hold or
    re-stream a row); the Triton back end does not need it since it has a looped variant.
    """
    g = prepare(graph)
    part = Partition(g, mode, row_fits)
    part.run_rules()
    return Schedule(g, mode, part.groups())
