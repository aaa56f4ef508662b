"""Expanders: composite ops written as primitive-op graphs.

Each function returns a fresh :class:`~palm_fast.fusion.ir.Graph`. The LayerNorm forward is
exactly MindSpore's 11-op decomposition (10 without a bias, as in PaLM)::

    s = ReduceSum(x); mean = Mul(s, 1/N); d = Sub(x, mean); sq = Mul(d, d)
    ss = ReduceSum(sq); var = Mul(ss, 1/N); ve = Add(var, eps); rstd = Rsqrt(ve)
    xhat = Mul(d, rstd); yw = Mul(xhat, gamma); y = Add(yw, beta)

``mean_correction=True`` (what ``palm_fast.ops`` runs, as the C++ kernel does) adds the
deviations' own mean to the rounded mean, in the same reduction pass as the variance::

    s = ReduceSum(x); mean0 = Mul(s, 1/N); d0 = Sub(x, mean0)
    s1 = ReduceSum(d0); s2 = ReduceSum(Mul(d0, d0)); c = Mul(s1, 1/N)
    mean = Add(mean0, c); var = Max(Mul(Sub(s2, Mul(c, s1)), 1/N), 0)
    rstd = Rsqrt(Add(var, eps)); y = Mul(Mul(Sub(d0, c), rstd), gamma) (+ beta)

Without it a row of equal values c far from 0 (mean0 = c plus a rounding error) gave
``x - mean != 0``, which ``rstd = eps^-1/2`` amplified: |y| = 0.3 for rows of 12345.678,
where torch gives 0; rows with a large mean and a small spread lost accuracy the same way.
With it such a row gives |y| <= ~2e-8 in fp32 (H100, N = 300: c = Mul(s1, 1/N) can miss
the rows' common deviation d0 by an ulp of d0; a division there, exact for that row,
spilled the 18432-wide tiled forward and cost it 35%).

The backward, with ``xhat = (x - mean) * rstd`` and ``g = dy * gamma``::

    dx      = rstd * (g - xhat * mean_N(xhat * g) - mean_N(g))
    dweight = sum_M(dy * xhat)         dbias = sum_M(dy)
"""
from __future__ import annotations

from .ir import Graph


def _layer_norm_body(g: Graph, x: int, weight: int, bias: int | None, eps: int,
                     mean_correction: bool = False):
    inv_n = g.const(1.0, n_pow=-1)
    s = g.sum(x)
    mean = g.mul(s, inv_n)
    d = g.sub(x, mean)
    sq = g.mul(d, d)
    ss = g.sum(sq)
    if mean_correction:
        # sum_N (d - c)^2 = ss - c * s1 with c = s1 / N, s1 = sum_N d (same pass as ss)
        s1 = g.sum(d)
        c = g.mul(s1, inv_n)
        mean = g.add(mean, c)
        # x - mean as d0 - c: x is dead once d0 exists (a tiled kernel holds one copy of
        # the row, not x and d0), and d0 - c skips the rounding of mean0 + c
        d = g.sub(d, c)
        var = g.binary("max", g.mul(g.sub(ss, g.mul(c, s1)), inv_n), g.const(0.0))
    else:
        var = g.mul(ss, inv_n)
    ve = g.add(var, eps)
    rstd = g.rsqrt(ve)
    xhat = g.mul(d, rstd)
    y = g.mul(xhat, weight)
    if bias is not None:
        y = g.add(y, bias)
    return y, mean, rstd


def layer_norm_fwd(has_bias: bool = True, mean_correction: bool = False) -> Graph:
    """Inputs x[row], weight[col], (bias[col]), eps[scalar]; outputs y, mean, rstd.
    ``mean_correction``: see the module docstring (False: MindSpore's decomposition)."""
    g = Graph("layer_norm_fwd" + ("" if has_bias else "_nobias") + ("_mc" if mean_correction else ""))
    x = g.input("x", "row")
    weight = g.input("weight", "col")
    bias = g.input("bias", "col") if has_bias else None
    eps = g.input("eps", "scalar")
    y, mean, rstd = _layer_norm_body(g, x, weight, bias, eps, mean_correction)
    g.output("y", y, "x")
    g.output("mean", mean)
    g.output("rstd", rstd)
    return g


def layer_norm_bwd(has_bias: bool = True, weight_grads: bool = True) -> Graph:
    """Inputs dy[row], x[row], weight[col], mean[stat], rstd[stat]; outputs dx, dweight, (dbias).
    ``weight_grads=False`` (frozen weight and bias): dx only, no column reductions."""
    if not weight_grads:
        has_bias = False   # (the bias does not enter dx)
    g = Graph("layer_norm_bwd" + ("" if has_bias else "_nobias") + ("" if weight_grads else "_dx"))
    dy = g.input("dy", "row")
    x = g.input("x", "row")
    weight = g.input("weight", "col")
    mean = g.input("mean", "stat")
    rstd = g.input("rstd", "stat")
    inv_n = g.const(1.0, n_pow=-1)
    xhat = g.mul(g.sub(x, mean), rstd)
    wdy = g.mul(dy, weight)
    c1 = g.mul(g.sum(g.mul(xhat, wdy)), inv_n)
    c2 = g.mul(g.sum(wdy), inv_n)
    dx = g.mul(g.sub(wdy, g.add(g.mul(xhat, c1), c2)), rstd)
    g.output("dx", dx, "x")
    if weight_grads:
        g.output("dweight", g.sum(g.mul(dy, xhat), axis="col"), "weight")
    if has_bias:
        g.output("dbias", g.sum(dy, axis="col"), "weight")
    return g


def rms_norm_fwd() -> Graph:
    """``y = x * rsqrt(mean_N(x^2) + eps) * weight``; outputs y, rstd."""
    g = Graph("rms_norm_fwd")
    x = g.input("x", "row")
    weight = g.input("weight", "col")
    eps = g.input("eps", "scalar")
    ms = g.mul(g.sum(g.mul(x, x)), g.const(1.0, n_pow=-1))
    rstd = g.rsqrt(g.add(ms, eps))
    g.output("y", g.mul(g.mul(x, rstd), weight), "x")
    g.output("rstd", rstd)
    return g


def rms_norm_bwd() -> Graph:
    """``dx = rstd * (g - xhat * mean_N(xhat * g))``, ``g = dy * weight``; ``dweight = sum_M(dy * xhat)``."""
    g = Graph("rms_norm_bwd")
    dy = g.input("dy", "row")
    x = g.input("x", "row")
    weight = g.input("weight", "col")
    rstd = g.input("rstd", "stat")
    xhat = g.mul(x, rstd)
    wdy = g.mul(dy, weight)
    c = g.mul(g.sum(g.mul(xhat, wdy)), g.const(1.0, n_pow=-1))
    g.output("dx", g.mul(g.sub(wdy, g.mul(xhat, c)), rstd), "x")
    g.output("dweight", g.sum(g.mul(dy, xhat), axis="col"), "weight")
    return g


def add_layer_norm_fwd(has_m: bool = True, has_bias: bool = True, round_to: str | None = None,
                       mean_correction: bool = False) -> Graph:
    """The parallel block's residual sum and the next LayerNorm:
    ``y = x + a (+ m); out = LN(y)``; outputs y_sum, out, mean, rstd. ``round_to`` (the
    inputs' dtype when it is fp16 / bf16): the sum is rounded to it before it is normalised,
    so that ``out`` is the LayerNorm of ``y_sum`` as stored (the tensor the backward gets).
    ``mean_correction``: as in :func:`layer_norm_fwd`."""
    g = Graph("add_layer_norm_fwd" + ("" if has_m else "_2") + ("" if has_bias else "_nobias")
              + (f"_{round_to}" if round_to else "") + ("_mc" if mean_correction else ""))
    x = g.input("x", "row")
    a = g.input("a", "row")
    m = g.input("m", "row") if has_m else None
    weight = g.input("weight", "col")
    bias = g.input("bias", "col") if has_bias else None
    eps = g.input("eps", "scalar")
    y = g.add(x, a)
    if m is not None:
        y = g.add(y, m)
    if round_to is not None:
        y = g.cast(y, round_to)
    out, mean, rstd = _layer_norm_body(g, y, weight, bias, eps, mean_correction)
    g.output("y_sum", y, "x")
    g.output("out", out, "x")
    g.output("mean", mean)
    g.output("rstd", rstd)
    return g
