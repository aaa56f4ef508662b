"""LayerNorm benchmark: the fusion engine's LayerNorm against its unfused and library rivals.

Cases (no bias, as PaLM; ``x [M, N]``):

* ``layer_norm.fwd``: reads x, writes y (2 MN elements);
* ``layer_norm.fwdbwd``: forward, then dx and dweight (reads dy and x again, writes dx: 5 MN);
* ``layer_norm.bwd``: the backward alone from saved mean / rstd (reads dy and x, writes dx:
  3 MN): ``palm_fast`` runs the ``palm_fast::layer_norm_bwd`` op's implementation as the
  autograd backward does outside torch.compile (not through the dispatcher), ``torch`` ATen's
  ``native_layer_norm_backward``, ``eager`` / ``compile`` the backward math written out;
  ``palm_fast_frozen`` / ``torch_frozen``: the same backward for a frozen weight (dx only:
  no column reductions; on CUDA one generated kernel);
* ``add_layer_norm.fwd``: the parallel block's ``y_sum = x + a + m``, ``out = LN(y_sum)``
  (reads 3 MN, writes 2 MN).

Implementations: ``palm_fast`` (``full`` mode on CUDA: 1 forward kernel, 2 backward; the C++
kernels on CPU), ``mindspore`` (the engine's ``mindspore``-mode graphs, 3 forward kernels;
CUDA only: the interpreter is far too slow to time), ``primitives`` (the 10 primitive ops of
the expanded LayerNorm run one by one in eager torch, in x's dtype), ``eager`` (the reference
module), ``torch`` (``torch.nn.functional.layer_norm``), ``compile`` (``torch.compile`` of the
reference), ``liger`` when importable; for add+LN ``separate`` (a torch add, then palm_fast's
LayerNorm). Each record carries ``kernels``, the number of kernels its implementation launches,
where known (``Case.impl_extra``). On CPU the default run leaves out ``primitives``
(``--quick`` keeps it) so the whole suite stays short.
"""
from __future__ import annotations

import functools

import torch

from palm_fast import reference
from palm_fast.benchmarks.harness import BenchContext, Case, register


def _no_grad(fn):
    """A forward-only case runs every implementation without autograd: the reference
    module's weight requires grad, and eager / compile would otherwise record a graph (a
    compiled training graph: measured 12% slower on the CPU) that palm_fast and torch, given
    the detached weight, do not."""
    def run(*args):
        with torch.no_grad():
            return fn(*args)
    return run


def _shapes(ctx: BenchContext) -> list[tuple[int, int]]:
    if ctx.device == "cuda":
        return [(4096, 4096)] if ctx.quick else [(16384, n) for n in (4096, 8192, 18432)]
    return [(1024, 4096)] if ctx.quick else [(4096, 4096)]


def _primitives(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """MindSpore's expansion of LayerNorm without beta, one eager op per primitive (10 ops)."""
    inv_n = 1.0 / x.shape[-1]
    mean = torch.mul(torch.sum(x, dim=-1, keepdim=True), inv_n)   # ReduceSum, Mul
    d = torch.sub(x, mean)                                         # Sub
    var = torch.mul(torch.sum(torch.mul(d, d), dim=-1, keepdim=True), inv_n)  # Mul, ReduceSum, Mul
    rstd = torch.rsqrt(torch.add(var, eps))                        # Add, Rsqrt
    return torch.mul(torch.mul(d, rstd), weight)                   # Mul, Mul


@functools.cache
def _mindspore_graphs():
    from palm_fast.fusion import compile_graph, expanders

    return (compile_graph(expanders.layer_norm_fwd(False), "mindspore"),
            compile_graph(expanders.layer_norm_bwd(False), "mindspore"),
            compile_graph(expanders.layer_norm_fwd(False, mean_correction=True), "full"),
            compile_graph(expanders.layer_norm_bwd(False), "full"),
            compile_graph(expanders.add_layer_norm_fwd(True, False, mean_correction=True), "full"))


def _liger_layer_norm():
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError:
        return None
    return lambda x, w, b, eps: LigerLayerNormFunction.apply(x, w, b, eps)


@register("layer_norm")
def layer_norm_cases(ctx: BenchContext):
    for M, N in _shapes(ctx):
        yield from _cases(ctx, M, N)


def _cases(ctx: BenchContext, M: int, N: int):
    """The three cases at one shape (a function per shape, so closures bind this shape)."""
    from palm_fast.ops import add_layer_norm, layer_norm

    cuda = ctx.device == "cuda"
    eps = 1e-5
    elem = torch.empty((), dtype=ctx.dtype).element_size()
    shape = {"M": M, "N": N}
    ref = reference.LayerNorm(N).to(ctx.device)
    with torch.no_grad():
        ref.weight.normal_()
    w = ref.weight.detach().to(ctx.dtype)
    compiled = torch.compile(ref, dynamic=False)
    zeros = torch.zeros(N, device=ctx.device, dtype=ctx.dtype)

    fns = {
        "palm_fast": lambda x, w: layer_norm(x, w, None, eps),
        "torch": lambda x, w: torch.nn.functional.layer_norm(x, (N,), w, None, eps),
        "eager": lambda x, w: ref(x),
        "compile": lambda x, w: compiled(x),
        "primitives": lambda x, w: _primitives(x, w, eps),
    }
    kernels = {"palm_fast": 1, "torch": 1, "primitives": 10}
    liger = _liger_layer_norm() if cuda else None
    if liger is not None:
        fns["liger"] = lambda x, w: liger(x, w, zeros, eps)
    if cuda:
        ms_fwd, ms_bwd, full_fwd, full_bwd, full_add = _mindspore_graphs()
        kernels.update(palm_fast=full_fwd.kernel_count, mindspore=ms_fwd.kernel_count)

        def mindspore(x, w):
            return ms_fwd(x=x, weight=w, eps=eps)["y"]
        fns["mindspore"] = mindspore

    def setup_fwd():
        return torch.randn(M, N, device=ctx.device, dtype=ctx.dtype)

    yield Case(
        name="layer_norm.fwd", shape=shape, dtype=ctx.dtype, bytes=2 * M * N * elem,
        setup=setup_fwd, impls={k: _no_grad(lambda x, f=f: f(x, w)) for k, f in fns.items()
                                if cuda or ctx.quick or k != "primitives"},
        impl_extra={k: {"kernels": v} for k, v in kernels.items()},
    )

    def setup_fwdbwd():
        x = torch.randn(M, N, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
        return x, torch.randn(M, N, device=ctx.device, dtype=ctx.dtype)

    wg = w.clone().requires_grad_()

    def fwdbwd(f):
        def run(inputs):
            x, dy = inputs
            return torch.autograd.grad(f(x, wg), (x, wg), dy)
        return run

    def fwdbwd_ref(mod):
        def run(inputs):
            x, dy = inputs
            return torch.autograd.grad(mod(x), (x, ref.weight), dy)
        return run

    impls = {k: fwdbwd(f) for k, f in fns.items() if k not in ("eager", "compile", "mindspore")}
    impls["eager"] = fwdbwd_ref(ref)
    impls["compile"] = fwdbwd_ref(compiled)
    # forward + backward: the CPU C++ path also runs 1 forward pass + a 2-stage backward
    bwd_kernels = {"palm_fast": 3}
    if cuda:
        def mindspore_fwdbwd(inputs):
            x, dy = inputs
            r = ms_fwd(x=x, weight=w, eps=eps)
            g = ms_bwd(dy=dy, x=x, weight=w, mean=r["mean"], rstd=r["rstd"])
            return g["dx"], g["dweight"]
        impls["mindspore"] = mindspore_fwdbwd
        bwd_kernels.update(palm_fast=full_fwd.kernel_count + full_bwd.kernel_count,
                           mindspore=ms_fwd.kernel_count + ms_bwd.kernel_count)
    if not cuda and not ctx.quick:  # keeps the CPU default run short
        impls.pop("primitives")
    yield Case(
        name="layer_norm.fwdbwd", shape=shape, dtype=ctx.dtype, bytes=5 * M * N * elem,
        setup=setup_fwdbwd, impls=impls,
        impl_extra={k: {"kernels": v} for k, v in bwd_kernels.items()},
    )

    # ---- the backward alone (given the forward's mean / rstd): what the kernels cost without
    # the autograd engine's host time, which the fwd+bwd records include
    def setup_bwd():
        x = torch.randn(M, N, device=ctx.device, dtype=ctx.dtype)
        dy = torch.randn(M, N, device=ctx.device, dtype=ctx.dtype)
        xf = x.float()
        mean = xf.mean(1)
        rstd = torch.rsqrt(xf.var(1, unbiased=False) + eps)
        _, t_mean, t_rstd = torch.native_layer_norm(x, [N], w, None, eps)  # ATen's own layout/dtype
        return dy, x, mean, rstd, t_mean, t_rstd

    def ref_bwd(dy, x, w, mean, rstd):
        """The LayerNorm backward written out (no bias), in fp32: what torch.compile fuses."""
        xhat = (x.float() - mean[:, None]) * rstd[:, None]
        g = dy.float() * w.float()
        c1 = (g * xhat).mean(1, keepdim=True)
        c2 = g.mean(1, keepdim=True)
        dx = (g - xhat * c1 - c2) * rstd[:, None]
        return dx.to(x.dtype), (dy.float() * xhat).sum(0).to(w.dtype)

    from palm_fast.ops._dispatch import call_impl
    from palm_fast.ops.layer_norm import _LN_BWD_IMPLS

    def ln_bwd_op(*args):
        return call_impl(_LN_BWD_IMPLS, *args)
    compiled_bwd = torch.compile(ref_bwd, dynamic=False)
    bwd_impls = {
        "palm_fast": lambda a: ln_bwd_op(a[0], a[1], w, a[2], a[3], False)[:2],
        "torch": lambda a: torch.ops.aten.native_layer_norm_backward(
            a[0], a[1], [N], a[4], a[5], w, None, [True, True, False])[:2],
        "eager": lambda a: ref_bwd(a[0], a[1], w, a[2], a[3]),
        "compile": lambda a: compiled_bwd(a[0], a[1], w, a[2], a[3]),
        # A frozen weight (fine-tuning with the norms fixed): dx only, no column reductions.
        "palm_fast_frozen": lambda a: ln_bwd_op(a[0], a[1], w, a[2], a[3], False, False)[0],
        "torch_frozen": lambda a: torch.ops.aten.native_layer_norm_backward(
            a[0], a[1], [N], a[4], a[5], w, None, [True, False, False])[0],
    }
    bwd_kernels = {"palm_fast": 2}
    if cuda:
        from palm_fast.fusion import compile_graph, expanders

        bwd_kernels["palm_fast"] = full_bwd.kernel_count
        bwd_kernels["palm_fast_frozen"] = compile_graph(expanders.layer_norm_bwd(False, weight_grads=False),
                                                        "full").kernel_count
    yield Case(
        name="layer_norm.bwd", shape=shape, dtype=ctx.dtype, bytes=3 * M * N * elem,
        setup=setup_bwd, impls=bwd_impls, impl_extra={k: {"kernels": v} for k, v in bwd_kernels.items()},
    )

    # ---- the parallel block's residual sum + next LayerNorm
    def setup_add():
        return tuple(torch.randn(M, N, device=ctx.device, dtype=ctx.dtype) for _ in range(3))

    def separate(xam):
        x, a, m = xam
        y = x + a + m
        return y, layer_norm(y, w, None, eps)

    def eager_add(xam):
        x, a, m = xam
        y = x + a + m
        return y, ref(y)

    add_impls = {
        "palm_fast": lambda xam: add_layer_norm(*xam, weight=w, eps=eps),
        "separate": separate,
        "eager": eager_add,
    }
    add_kernels = {"palm_fast": 1, "separate": 3}
    if cuda:
        compiled_add = torch.compile(eager_add, dynamic=False)
        add_impls["compile"] = compiled_add
        add_kernels["palm_fast"] = full_add.kernel_count
    add_impls = {k: _no_grad(f) for k, f in add_impls.items()}
    yield Case(
        name="add_layer_norm.fwd", shape=shape, dtype=ctx.dtype, bytes=5 * M * N * elem,
        setup=setup_add, impls=add_impls, impl_extra={k: {"kernels": v} for k, v in add_kernels.items()},
    )
