"""The fusion engine's IR: a small dataflow graph of primitive ops on row-major tensors.

Every value lives in one *space* (shapes are symbolic in ``M`` rows and ``N`` columns):

* ``row``     ``[M, N]``  the activations (x, dy, y, ...)
* ``stat``    ``[M, 1]``  per-row statistics (mean, rstd, row sums), stored as ``[M]``
* ``col``     ``[N]``     per-column vectors (weight, bias, dweight, ...)
* ``scalar``  ``[]``      constants and runtime scalars (eps)
* ``partial`` ``[P, N]``  per-program partial column sums (made by the fusion pass only)

Primitive ops (``Node.op``):

* elementwise unary: ``neg exp log sqrt rsqrt abs cast``; binary: ``add sub mul div max min
  gt lt``; ternary ``where(c, a, b)`` (``c != 0`` selects ``a``). Operands of different spaces
  broadcast implicitly (stat and col against row give row; stat against col gives row).
* ``broadcast``: an explicit broadcast to ``row`` (a no-op for the math).
* ``reduce_sum`` / ``reduce_max`` with ``axis="row"`` (``row -> stat``: over the N columns of
  each row) or ``axis="col"`` (``row -> col``: over the M rows of each column).
* ``const``: ``value * N**n_pow`` (so ``1/N`` is ``const(1.0, n_pow=-1)``; shapes stay symbolic).
* ``input``: a named graph input of a given space (``scalar`` inputs are runtime floats).
* made by passes: ``col_partial`` (``row -> partial``) and ``col_final`` (``partial -> col``),
  the two stages of a deterministic column reduction.

Nodes are appended in topological order (an op can only use existing nodes), so
``graph.nodes`` is always a valid schedule.
"""
from __future__ import annotations

import hashlib
import keyword
import math
import numbers
import struct
from dataclasses import dataclass, field

SPACES = ("row", "stat", "col", "scalar", "partial")
UNARY = ("neg", "exp", "log", "sqrt", "rsqrt", "abs", "cast")
BINARY = ("add", "sub", "mul", "div", "max", "min", "gt", "lt")
TERNARY = ("where",)
ELEMENTWISE = UNARY + BINARY + TERNARY + ("broadcast",)
REDUCE = ("reduce_sum", "reduce_max")
COMMUTATIVE = ("add", "mul", "max", "min")
CAST_DTYPES = ("float32", "float16", "bfloat16")


class NodeId(int):
    """A node handle: the node's index in its graph, tied to that graph. The builders take
    only handles of their own graph, so ``g.mul(x, 2)`` is an error (a constant is
    ``g.const(2.0)``), not x times node 2, and a handle of another graph is refused."""

    def __new__(cls, index: int, graph: Graph):
        h = super().__new__(cls, index)
        h.graph = graph
        return h

    def __getnewargs__(self):   # (copy / deepcopy / pickle keep the tie to the graph's copy)
        return int(self), self.graph


@dataclass(frozen=True)
class Node:
    """One op. ``inputs`` are node ids; ``attrs`` a sorted tuple of (key, value) pairs."""

    id: int
    op: str
    inputs: tuple[int, ...]
    space: str
    attrs: tuple = ()
    name: str = ""

    def attr(self, key, default=None):
        return dict(self.attrs).get(key, default)

    @property
    def kind(self) -> str:
        """``input``, ``const``, ``ew`` (elementwise), ``rred`` (row reduction),
        ``cred`` (unsplit column reduction), ``cpart`` or ``cfin``."""
        if self.op in ("input", "const"):
            return self.op
        if self.op in ELEMENTWISE:
            return "ew"
        if self.op in REDUCE:
            return "rred" if self.attr("axis") == "row" else "cred"
        return {"col_partial": "cpart", "col_final": "cfin"}[self.op]


def _join_spaces(spaces) -> str:
    s = {x for x in spaces if x != "scalar"}
    if not s:
        return "scalar"
    if len(s) == 1:
        return s.pop()
    if "partial" in s:
        raise ValueError(f"cannot combine a partial-sum value with {sorted(s - {'partial'})}")
    return "row"  # stat x col, stat x row, col x row all broadcast to [M, N]


def to_fp32(v: float) -> float:
    """``v`` rounded to fp32, the kernels' arithmetic (+-inf past its range)."""
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def outside_fp32(value) -> bool:
    """Whether a finite, nonzero number (a Python int or float) becomes inf or 0 in fp32."""
    try:
        v = float(value)
    except OverflowError:   # (an int past float64's range)
        return True
    if not math.isfinite(v) or v == 0.0:
        return False
    r = to_fp32(v)
    return r == 0.0 or math.isinf(r)

@dataclass
class Graph:
    """A primitive-op graph with named inputs and outputs.

    ``outputs`` maps an output name to ``(node id, dtype_like)``; ``dtype_like`` names the
    input whose dtype the output takes, or is ``"float32"``.
    """

    name: str = "graph"
    nodes: list[Node] = field(default_factory=list)
    inputs: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, tuple[int, str]] = field(default_factory=dict)

    def __post_init__(self):
        if not (isinstance(self.name, str) and self.name.isidentifier()):
            raise ValueError(f"name: expected a Python identifier (it names the generated kernels), "
                             f"got {self.name!r}")

    # ---- building -------------------------------------------------------------------
    def _add(self, op, inputs, space, attrs=(), name="") -> NodeId:
        """Append a node (passes; the public builders check their operands first)."""
        for i in inputs:
            if not (isinstance(i, int) and 0 <= i < len(self.nodes)):
                raise ValueError(f"{op}: operand {i!r} is not a node of this graph")
        node = Node(len(self.nodes), op, tuple(int(i) for i in inputs), space, tuple(sorted(attrs)), name)
        self.nodes.append(node)
        return NodeId(node.id, self)

    def _space(self, i) -> str:
        """The space of operand ``i``, a handle this graph's builders returned."""
        if not (isinstance(i, NodeId) and i.graph is self and 0 <= i < len(self.nodes)):
            if isinstance(i, NodeId):
                raise ValueError(f"operand %{int(i)} is a node of another graph, not of {self.name!r}")
            hint = ""
            if isinstance(i, (int, float)) and not isinstance(i, bool):
                hint = f"; for a constant use g.const({float(i)!r})"
                if isinstance(i, int) and 0 <= i < len(self.nodes):
                    hint += f"; for node %{i} use NodeId({i}, g)"
            raise ValueError(f"operand {i!r} is not a node of this graph (pass the handles its "
                             f"builders return{hint})")
        return self.nodes[i].space

    def input(self, name: str, space: str) -> int:
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"input: expected a name that is a Python identifier and not a "
                             f"keyword (it becomes a keyword argument), got {name!r}")
        if space not in ("row", "stat", "col", "scalar"):
            raise ValueError(f"input {name!r}: space must be row, stat, col or scalar, got {space!r}")
        if name in self.inputs:
            raise ValueError(f"input {name!r} declared twice")
        self.inputs[name] = self._add("input", (), space, (("name", name),), name)
        return self.inputs[name]

    def const(self, value: float, n_pow: int = 0) -> int:
        """The constant ``value * N ** n_pow``. ``value`` must be representable in fp32, the
        kernels' arithmetic (inf and NaN are); one that would round to inf or to 0 is refused
        (:func:`outside_fp32`): the graph would not compute what it says."""
        v = float(value)
        if outside_fp32(v):
            raise ValueError(f"const: {value!r} is outside float32's range (the kernels compute "
                             f"in fp32): it would round to {to_fp32(v)}")
        if not isinstance(n_pow, numbers.Integral) or isinstance(n_pow, bool):
            raise TypeError(f"n_pow: expected an int, got {n_pow!r}")   # (1.5 became 1)
        return self._add("const", (), "scalar", (("n_pow", int(n_pow)), ("value", v)))

    def unary(self, op: str, a: int, **attrs) -> int:
        if op not in UNARY:
            raise ValueError(f"unknown unary op {op!r}")
        if op == "cast" and (set(attrs) != {"dtype"} or attrs["dtype"] not in CAST_DTYPES):
            raise ValueError(f"cast: expected one attribute dtype in {CAST_DTYPES}, got {attrs!r}")
        if op != "cast" and attrs:
            raise ValueError(f"{op}: takes no attributes, got {sorted(attrs)}")
        return self._add(op, (a,), self._space(a), tuple(attrs.items()))

    def binary(self, op: str, a: int, b: int) -> int:
        if op not in BINARY:
            raise ValueError(f"unknown binary op {op!r}")
        return self._add(op, (a, b), _join_spaces(self._space(i) for i in (a, b)))

    def where(self, c: int, a: int, b: int) -> int:
        return self._add("where", (c, a, b), _join_spaces(self._space(i) for i in (c, a, b)))

    def broadcast(self, a: int) -> int:
        if self._space(a) == "partial":
            raise ValueError("broadcast: cannot broadcast a partial-sum value")
        return self._add("broadcast", (a,), "row")

    def reduce(self, op: str, a: int, axis: str) -> int:
        if op not in ("sum", "max"):
            raise ValueError(f"reduce: op must be 'sum' or 'max', got {op!r}")
        if axis not in ("row", "col"):
            raise ValueError(f"reduce: axis must be 'row' or 'col', got {axis!r}")
        if self._space(a) != "row":
            raise ValueError(f"reduce: operand must live in the row space, got {self._space(a)}")
        return self._add("reduce_" + op, (a,), "stat" if axis == "row" else "col", (("axis", axis),))

    def output(self, name: str, node: int, dtype_like: str = "float32") -> None:
        if not isinstance(name, str) or not name:
            # (outputs are sorted by name for the graph's hash: another type failed there)
            raise ValueError(f"output: expected a non-empty str name, got {name!r}")
        if name in self.outputs:
            raise ValueError(f"output {name!r} declared twice")
        space = self._space(node)
        if space not in ("row", "stat", "col"):
            raise ValueError(f"output {name!r}: expected a row, stat or col value ([M, N], [M] or "
                             f"[N] tensors), got a {space}-space value (node %{node})")
        if dtype_like != "float32" and (dtype_like not in self.inputs
                                        or self.nodes[self.inputs[dtype_like]].space == "scalar"):
            raise ValueError(f"output {name!r}: dtype_like must name a tensor input or be 'float32', "
                             f"got {dtype_like!r}")
        self.outputs[name] = (node, dtype_like)

    # sugar
    def add(self, a, b):
        return self.binary("add", a, b)

    def sub(self, a, b):
        return self.binary("sub", a, b)

    def mul(self, a, b):
        return self.binary("mul", a, b)

    def div(self, a, b):
        return self.binary("div", a, b)

    def rsqrt(self, a):
        return self.unary("rsqrt", a)

    def exp(self, a):
        return self.unary("exp", a)

    def log(self, a):
        return self.unary("log", a)

    def cast(self, a, dtype):
        return self.unary("cast", a, dtype=dtype)

    def sum(self, a, axis="row"):
        return self.reduce("sum", a, axis)

    def max(self, a, axis="row"):
        return self.reduce("max", a, axis)

    # ---- queries --------------------------------------------------------------------
    def compute_nodes(self) -> list[Node]:
        """Nodes that do work (not inputs or constants), in topological order."""
        return [n for n in self.nodes if n.kind not in ("input", "const")]

    def op_count(self) -> int:
        """Number of primitive ops, counted like MindSpore: explicit broadcasts are free."""
        return sum(1 for n in self.compute_nodes() if n.op != "broadcast")

    def users(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n.id)
        return out

    def topological_order(self) -> list[int]:
        """Node ids in dependency order (nodes are stored that way; verified here)."""
        for n in self.nodes:
            if any(i >= n.id for i in n.inputs):
                raise ValueError(f"graph {self.name}: node {n.id} uses a later node")
        return [n.id for n in self.nodes]

    def canonical(self) -> str:
        lines = [f"graph {self.name}"]
        for n in self.nodes:
            lines.append(f"{n.id}={n.op}{list(n.inputs)}:{n.space}:{list(n.attrs)}")
        for k, (v, d) in sorted(self.outputs.items()):
            lines.append(f"out {k}={v}:{d}")
        return "\n".join(lines)

    def hash(self) -> str:
        """A stable content hash (independent of Python's hash seed)."""
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:16]

    def __str__(self) -> str:
        def show(n: Node) -> str:
            if n.op == "input":
                return f"%{n.id} = input {n.name!r} [{n.space}]"
            if n.op == "const":
                v, p = n.attr("value"), n.attr("n_pow")
                return f"%{n.id} = const {v!r}" + (f" * N**{p}" if p else "")
            extra = ", ".join(f"{k}={v}" for k, v in n.attrs)
            args = ", ".join(f"%{i}" for i in n.inputs)
            return f"%{n.id} = {n.op}({args}{', ' + extra if extra else ''}) [{n.space}]"

        body = [show(n) for n in self.nodes]
        body += [f"return {k} = %{v} ({d})" for k, (v, d) in self.outputs.items()]
        return f"graph {self.name}:\n  " + "\n  ".join(body)
