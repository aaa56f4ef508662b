"""palm_fast.fusion on seeded random graphs, against a float64 interpreter of the same graph.

Each case builds a random primitive-op graph through the public :class:`Graph` API: a row input
``x0``, up to two more row inputs, up to two stat and two col inputs, maybe a runtime scalar
``e0``, then 2-14 random moves (deep graphs: 10-28): unary ops and casts, binary ops (with
constants ``value * N**n_pow`` among the operands), ``gt``/``lt`` + ``where``, broadcasts, row and
column sums and maxes, and the patterns the engine is built for: a LayerNorm-style normalisation,
a softmax and (deep graphs) 2-3 dependent row reductions ending in a column reduction. Most graphs
are guarded (``exp(min(a, 4))``, ``log``/``sqrt``/``rsqrt`` of ``|a| + 0.5``, division by
``|b| + 1``); the others may make inf and NaN, which must come out where the reference has them.
Up to 4 row, stat or col values are returned, in fp32 or an input's dtype.

The case runs the graph in one mode (``full`` or ``mindspore``) and one kernel variant; the
looped and tiled variants are forced at small N through small codegen options (as
test_fusion.py does), so every row kernel of the case runs the variant it names. Checked:

* every output against the reference, under the rule below;
* determinism: a second run gives the same bits;
* ``explain()``: its header's kernel count, the kernels it lists (each row kernel in the forced
  variant), the compiled graph's kernel count and the runner's launches all agree.

Reference: the graph's nodes evaluated one by one with torch on the CPU, in float64 and three
times in float32 as the kernels compute (constants times / over N in fp32, casts through fp32,
fp32 sums): once as is and twice (two seeds) with every value computed moved up or down by an
ulp at random, which shows how far fp32 rounding can move each output.

Tolerance rule, per output, comparing in the output's dtype: an element passes when it is within
``atol + rtol * |ref|`` of the fp64 reference or of one of the fp32 ones (or is the same inf, or
NaN where that reference is NaN), with ``rtol`` 2e-3 for fp32 outputs and 2e-2 for fp16/bf16
ones and ``atol = 1e-6 + rtol / 20 * mean|ref64| + 8 * max|ref32 - ref64|`` (the largest over the
fp32 references). The last term, the fp32 references' own error, keeps ill-conditioned outputs
from flaking: where a ``gt``/``lt``/``where`` or a max is decided by a near tie, or a result
cancels to near 0 (the LayerNorm of a constant row), the kernels' summation order moves the
result as far as the nudges move the references, while well-conditioned outputs keep tight
bounds. (Against torch's fp32 alone the outcome there is luck: about one random case in 500
failed that way.)
"""
from __future__ import annotations

import itertools
import random

import pytest
import torch
from conftest import TRITON_DEVICE, randn

from palm_fast.fusion import Graph, NodeId, codegen, compile_graph, explain

DEV = TRITON_DEVICE
# The interpreter computes with numpy, which warns: unguarded graphs make inf and NaN on purpose,
# and the padding lanes of a block (loaded as 0) divide by zero.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(overflow|invalid value|divide by zero) encountered:RuntimeWarning")

# Kernel variants (compile options). Each forces its variant for N > 32: looped with a 32- or
# 16-column block, tiled with 16- or 32-column tiles (tile_min 16); the name's first word says
# which variant every row kernel must run (see ROW_KERNEL).
TILED = {"tile": 16, "tile_min": 16, "max_tiled": 1000, "max_tiled_partial": 1000}
VARIANTS = {
    "single": {},
    "single_rows": {"single_rows": 3, "steps": 2},   # 3 rows per step, 2 steps per program
    "single_reload": {"reload": True},                # re-read the row after each row reduction
    "looped": {"max_block": 32, "loop_block": 32},
    "looped_short": {"max_block": 32, "loop_block": 16},
    "tiled": TILED,
    "tiled_reload": {**TILED, "reload": True},
    "tiled_rows": {**TILED, "tile": 32, "row_step": 4, "steps": 2},
    "tiled_row_elems": {**TILED, "row_elems": 40},
}
ROW_KERNEL = {"single": "[row, single-block", "looped": "[row, looped", "tiled": "[row, tiled x"}
MODES = ("full", "mindspore")
CONSTS = (0.5, 2.0, -1.0, 1.0, 0.0, -0.0, 3.0, 1e-3)
OUT_SHAPE = {"row": lambda M, N: (M, N), "stat": lambda M, N: (M,), "col": lambda M, N: (N,)}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every buffer the runner allocates starts as NaN, so an unwritten element shows."""
    monkeypatch.setattr(codegen, "POISON", True)


# ---------------------------------------------------------------------------------------
# random graphs and inputs
# ---------------------------------------------------------------------------------------
def random_graph(rng: random.Random, name: str, deep: bool) -> Graph:
    """A random graph as the module docstring describes (``deep``: 10-28 moves, not 2-14)."""
    g = Graph(name)
    g.input("x0", "row")
    for k in range(rng.randint(0, 2)):
        g.input(f"x{k + 1}", "row")
    for k in range(rng.randint(0, 2)):
        g.input(f"s{k}", "stat")
    for k in range(rng.randint(0, 2)):
        g.input(f"w{k}", "col")
    if rng.random() < 0.5:
        g.input("e0", "scalar")
    guarded = rng.random() < 0.85

    def pick(space=None, recent=True):
        """A node of ``space`` (any space: None), 60% of the time among the last 4 made."""
        ids = [NodeId(n.id, g) for n in g.nodes if space in (None, n.space)]
        return rng.choice(ids[-4:] if recent and rng.random() < 0.6 else ids)

    def const():
        value = rng.choice(CONSTS)
        return g.const(value, 0 if value == 0 else rng.choice((0, 0, 0, -1, 1)))

    def reduce(x, axis, ops=("sum", "max")):
        return g.reduce(rng.choice(ops), x, axis)

    for _ in range(rng.randint(10, 28) if deep else rng.randint(2, 14)):
        move = rng.random()
        if deep and move < 0.1:   # dependent row reductions in one kernel, then a column one
            x = pick("row")
            for _ in range(rng.randint(2, 3)):
                s = g.add(g.unary("abs", reduce(x, "row")), g.const(1.0))
                x = g.binary(rng.choice(("add", "sub", "mul", "div")), x, s)
            reduce(x, "col")
        elif move < 0.12:   # LayerNorm-style normalisation
            x, inv_n = pick("row"), g.const(1.0, -1)
            d = g.sub(x, g.mul(g.sum(x), inv_n))
            var = g.mul(g.sum(g.mul(d, d)), inv_n)
            g.mul(d, g.rsqrt(g.add(var, g.const(1e-5))))
        elif move < 0.18:   # softmax
            x = pick("row")
            e = g.exp(g.sub(x, g.max(x)))
            g.div(e, g.sum(e))
        elif move < 0.3:
            reduce(pick("row"), "row")
        elif move < 0.4:
            reduce(pick("row"), "col", ("sum", "sum", "max"))
        elif move < 0.55:
            a, op = pick(), rng.choice(("neg", "abs", "exp", "log", "sqrt", "rsqrt", "cast"))
            if op == "cast":
                g.cast(a, rng.choice(("float32", "float16", "bfloat16")))
            elif op == "exp" and guarded:
                g.exp(g.binary("min", a, g.const(4.0)))
            elif op in ("log", "sqrt", "rsqrt") and guarded:
                g.unary(op, g.add(g.unary("abs", a), g.const(0.5)))
            else:
                g.unary(op, a)
        elif move < 0.85:
            a, b = pick(), (pick(recent=False) if rng.random() < 0.8 else const())
            if rng.random() < 0.5:
                a, b = b, a
            op = rng.choice(("add", "sub", "mul", "div", "max", "min", "gt", "lt", "mul", "add"))
            if op == "div" and guarded:
                b = g.add(g.unary("abs", b), g.const(1.0))
            g.binary(op, a, b)
        elif move < 0.92:
            cond = g.binary(rng.choice(("gt", "lt")), pick(), pick(recent=False))
            g.where(cond, pick(), pick(recent=False))
        else:
            g.broadcast(pick())

    last = g.nodes[-1]
    chosen = [last.id] if last.space != "scalar" else []
    tensors = [n.id for n in g.nodes if n.space != "scalar"]
    chosen += [rng.choice(tensors) for _ in range(rng.randint(1, 4) - len(chosen))]
    tensor_inputs = [name for name, i in g.inputs.items() if g.nodes[i].space != "scalar"]
    for k, i in enumerate(chosen):
        like = "float32" if rng.random() < 0.7 else rng.choice(tensor_inputs)
        g.output(f"o{k}", NodeId(i, g), like)
    return g


def random_inputs(rng: random.Random, g: Graph, M: int, N: int, dtype: torch.dtype) -> dict:
    """Row and col inputs in ``dtype``, stat inputs in fp32 or ``dtype``, values ~ N(0, 4)."""
    gen = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    stat_dtype = rng.choice((torch.float32, dtype))
    inputs = {}
    for name, i in g.inputs.items():
        space = g.nodes[i].space
        if space == "scalar":
            inputs[name] = rng.choice((0.5, 2.0, -1.5, 1e-5))
        else:
            inputs[name] = randn(*OUT_SHAPE[space](M, N), dtype=stat_dtype if space == "stat" else dtype,
                                 device=DEV, scale=2.0, generator=gen)
    return inputs


# ---------------------------------------------------------------------------------------
# the reference and the tolerance rule
# ---------------------------------------------------------------------------------------
_OPS = {
    "neg": torch.neg, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
    "abs": torch.abs, "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "max": torch.maximum, "min": torch.minimum,   # (both propagate NaN, as the kernels do)
    "gt": lambda a, b: (a > b).to(a.dtype), "lt": lambda a, b: (a < b).to(a.dtype),
    "where": lambda c, a, b: torch.where(c != 0, a, b),
}


def evaluate(g: Graph, inputs: dict, M: int, N: int, dtype: torch.dtype,
             nudge: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The graph's outputs computed with torch on the CPU in ``dtype`` (float64 or float32),
    node by node: row values are [M, N], stat values [M, 1], col values [1, N]. With ``nudge``,
    every value computed is then moved up or down by an ulp or two at random."""
    shape = {"row": (M, N), "stat": (M, 1), "col": (1, N)}
    vals = []
    for n in g.nodes:
        args = [vals[i] for i in n.inputs]
        if n.op == "input" and n.space == "scalar":
            v = torch.tensor(inputs[n.name], dtype=dtype)
        elif n.op == "input":
            v = inputs[n.name].cpu().to(dtype).reshape(shape[n.space])
        elif n.op == "const":   # value * N**n_pow, one rounding per factor (as the kernels)
            v = torch.tensor(n.attr("value"), dtype=dtype)
            for _ in range(abs(n.attr("n_pow"))):
                v = v * N if n.attr("n_pow") > 0 else v / N
        elif n.op == "cast":
            v = args[0].float().to(getattr(torch, n.attr("dtype"))).to(dtype)
        elif n.op == "broadcast":
            v = args[0].expand(M, N)
        elif n.op in ("reduce_sum", "reduce_max"):
            dim = 1 if n.attr("axis") == "row" else 0
            v = args[0].sum(dim, keepdim=True) if n.op == "reduce_sum" else args[0].amax(dim, keepdim=True)
        else:
            v = _OPS[n.op](*args)
        if nudge is not None and n.op != "input":
            v = v * (1 + (torch.randint(0, 2, v.shape, generator=nudge) * 2 - 1) * 2.0 ** -23)
        vals.append(v)
    return {name: vals[i].reshape(OUT_SHAPE[g.nodes[i].space](M, N)) for name, (i, _) in g.outputs.items()}


def assert_matches_reference(out: torch.Tensor, ref64: torch.Tensor, refs32: list[torch.Tensor], what: str):
    """The tolerance rule of the module docstring."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    rtol = 2e-3 if out.dtype == torch.float32 else 2e-2
    got, r64, *r32 = (t.cpu().to(out.dtype).double() for t in (out, ref64, *refs32))
    finite = torch.isfinite(r64)
    noise = max((r - r64).abs().where(finite & r.isfinite(), 0.0).max().item() for r in r32)
    scale = r64[finite].abs().mean().item() if finite.any() else 1.0
    atol = 1e-6 + rtol / 20 * scale + 8 * noise

    def near(ref):
        return ((got - ref).abs() <= atol + rtol * ref.abs()) | (torch.isinf(got) & (got == ref)) \
            | (torch.isnan(got) & torch.isnan(ref))

    bad = ~torch.stack([near(r) for r in (r64, *r32)]).any(0)
    if bad.any():
        at = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements off, e.g. at {at}: "
                             f"got {got[at].item()!r}, fp64 reference {r64[at].item()!r}, fp32 "
                             f"references {[r[at].item() for r in r32]} (atol {atol:.2e}, rtol {rtol:.0e})")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


# ---------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------
def _cases(first_seed: int, rounds: int, deep: bool) -> list:
    """Every (variant, mode) pair ``rounds`` times, one seed (graph, shapes, data) each; every
    fourth case has fp16 or bf16 row and col inputs."""
    combos = list(itertools.product(VARIANTS, MODES)) * rounds
    cases = []
    for seed, (variant, mode) in enumerate(combos, first_seed):
        dtype = (torch.float16, torch.bfloat16)[seed // 4 % 2] if seed % 4 == 3 else torch.float32
        kind = "deep" if deep else "graph"
        cases.append(pytest.param(seed, deep, mode, variant, dtype,
                                  id=f"{kind}{seed}-{mode}-{variant}-{str(dtype).removeprefix('torch.')}"))
    return cases


@pytest.mark.parametrize(("seed", "deep", "mode", "variant", "dtype"),
                         _cases(0, 3, deep=False) + _cases(1000, 2, deep=True))
def test_random_graph(seed, deep, mode, variant, dtype):
    """One random graph, its shapes and data from ``seed``, in one mode and variant (see the
    module docstring)."""
    rng = random.Random(seed)
    g = random_graph(rng, f"fuzz{seed}", deep)
    print(g)   # (shown when the case fails)
    forced = not variant.startswith("single")
    M, N = rng.choice((1, 3, 5, 9)), rng.choice((33, 47, 70, 100) if forced else (1, 5, 16, 33, 70, 100))
    inputs = random_inputs(rng, g, M, N, dtype)
    case = f"{mode}, {variant}, M={M}, N={N}"

    cg = compile_graph(g, mode, **VARIANTS[variant])
    out = cg(**inputs)
    ref64 = evaluate(g, inputs, M, N, torch.float64)
    refs32 = [evaluate(g, inputs, M, N, torch.float32, nudge) for nudge in
              (None, torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1))]
    for name, (_, like) in g.outputs.items():
        want = torch.float32 if like == "float32" else inputs[like].dtype
        assert out[name].dtype == want, f"{name} ({case}): dtype {out[name].dtype} != {want}"
        assert_matches_reference(out[name], ref64[name], [r[name] for r in refs32], f"{name} ({case})")

    again = cg(**inputs)
    for name in out:
        assert torch.equal(_bits(again[name]), _bits(out[name])), f"{name} ({case}): a second run differs"

    text = explain(g, mode, M=M, N=N, dtype=torch.float32, source=False, file=None, **VARIANTS[variant])
    header, *lines = text.splitlines()
    kernels = [line for line in lines if line.startswith("  kernel ")]
    assert f"; {len(kernels)} kernel(s);" in header, text
    assert len(kernels) == cg.kernel_count == len(cg._plans[cg._signature(inputs)].launches), text
    expect = ROW_KERNEL[variant.split("_")[0]]
    assert all(expect in line for line in kernels if "[row, " in line), text
