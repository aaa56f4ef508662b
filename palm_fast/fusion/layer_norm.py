"""LayerNorm built from fused primitives: launchers over the ``full`` mode's generated kernels.

These are the CUDA entry points of ``palm_fast.ops.layer_norm`` (they also run on CPU tensors
under ``TRITON_INTERPRET=1``, which the tests use). Shapes: ``x2d [M, N]`` with a unit stride
in the last dim, ``weight`` / ``bias`` ``[N]``, ``mean`` / ``rstd`` fp32 ``[M]``.
"""
from __future__ import annotations

import functools

import torch

from ..ops._checks import FLOAT_DTYPES, check_eps, check_last_dim_contiguous, check_shape, check_tensor
from . import expanders
from .codegen import CompiledGraph, compile_graph

# The forward's tiled kernel (16384 < N <= 32768): 1024-column tiles, 8 warps, and at most
# 3 rows of 18432 (no bias) or 2 (with a bias) loaded per step. H100, bf16, 16384 rows, % of
# copy bandwidth (benchmarks/results/h100/session23/probe14.log; the codegen's default was
# 2048-column tiles, 16 warps, 3 rows): no bias, N = 18432: 97.9% (default 94.3%; 1.015x
# torch.compile, 0.977x before), 3 rows; 20480: 96.8% (76.8%) and 24576: 96.7% (59.8%), 2
# rows; 16896: 92.4% (93.4%), 3 rows; with a bias, 18432: 88.8% (53.5%), 2 rows. Three rows
# of 20480 (90.2%) or 24576 (70.6%), or of 18432 with a bias (69.4%), ran out of registers
# (255 per thread at 8 warps). N = 32768 takes 1 row: unmeasured (2 rows: 68.4%, the
# default 40.4%, torch.compile 98%).
_FWD_TILED = {False: dict(tile=1024, tiled_warps=8, row_elems=3 * 18432),
              True: dict(tile=1024, tiled_warps=8, row_elems=2 * 18432)}


@functools.cache
def _compiled(expander: str, *flags) -> CompiledGraph:
    """The ``full``-mode compiled graph of an expander (built and hashed once per process);
    the LayerNorm forward with its tiled-kernel options (``_FWD_TILED``)."""
    opts = _FWD_TILED[flags[0]] if expander == "layer_norm_fwd" else {}
    return compile_graph(getattr(expanders, expander)(*flags), "full", **opts)

def _check(name: str, t, *, ndim: int | None = None, shape=None, device=None, dtypes=FLOAT_DTYPES):
    check_tensor(name, t, dtypes=dtypes, ndim=ndim)
    if shape is not None:
        check_shape(name, t, shape)
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    check_last_dim_contiguous(name, t)


def layer_norm_fwd(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                   *, checked: bool = False):
    """``y = (x - mean) * rstd * weight (+ bias)`` row-wise; returns ``(y, mean, rstd)``
    with y in x's dtype and mean/rstd fp32 ``[M]``. One generated kernel, from the expander
    with the mean correction (``expanders.layer_norm_fwd(has_bias, mean_correction=True)``). ``checked``: the
    caller (the custom op's CUDA kernel, behind ``palm_fast.ops``) validated the arguments;
    the runner still validates each new input signature."""
    if not checked:
        _check("x2d", x2d, ndim=2)
        N = x2d.size(1)
        _check("weight", weight, shape=(N,), device=x2d.device)
        if bias is not None:
            _check("bias", bias, shape=(N,), device=x2d.device)
        eps = check_eps(eps)
    cg = _compiled("layer_norm_fwd", bias is not None, True)  # with the mean correction
    args = dict(x=x2d, weight=weight, eps=eps)
    if bias is not None:
        args["bias"] = bias
    r = cg(**args)
    return r["y"], r["mean"], r["rstd"]


def layer_norm_bwd(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor, has_bias: bool, *, checked: bool = False,
                   weight_grads: bool = True):
    """Gradients of :func:`layer_norm_fwd`: ``(dx, dweight, dbias or None)``. Stage 1 computes
    dx and per-program partial column sums, stage 2 sums the partials in a fixed order (fp32;
    dweight/dbias returned in weight's dtype). Deterministic: no atomics. ``checked``: as
    in :func:`layer_norm_fwd`. ``weight_grads=False`` (frozen weight and bias): one kernel
    computing dx; returns ``(dx, None, None)``."""
    if not checked:
        _check("x2d", x2d, ndim=2)
        M, N = x2d.shape
        _check("dy", dy, shape=(M, N), device=x2d.device)
        _check("weight", weight, shape=(N,), device=x2d.device)
        _check("mean", mean, shape=(M,), device=x2d.device, dtypes=(torch.float32,))
        _check("rstd", rstd, shape=(M,), device=x2d.device, dtypes=(torch.float32,))
    cg = _compiled("layer_norm_bwd", bool(has_bias) and weight_grads, weight_grads)
    r = cg(dy=dy, x=x2d, weight=weight, mean=mean, rstd=rstd)
    return r["dx"], r.get("dweight"), r.get("dbias")


def add_layer_norm_fwd(x: torch.Tensor, a: torch.Tensor, m: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor | None, eps: float):
    """The parallel block's residual sum and next LayerNorm in one kernel:
    ``y_sum = x + a (+ m)``, ``out = LN(y_sum)``; returns ``(y_sum, out, mean, rstd)``.
    ``x``, ``a``, ``m`` share a shape ``[..., N]``; y_sum and out have that shape, mean/rstd
    are fp32 ``[M]`` with M the product of the leading dims."""
    _check("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dim, got shape {tuple(x.shape)}")
    _check("a", a, shape=x.shape, device=x.device)
    if m is not None:
        _check("m", m, shape=x.shape, device=x.device)
    N = x.size(-1)
    _check("weight", weight, shape=(N,), device=x.device)
    if bias is not None:
        _check("bias", bias, shape=(N,), device=x.device)
    eps = check_eps(eps)
    for name, t in (("x", x), ("a", a), ("m", m)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor; call .contiguous() first")
    # fp16 / bf16: the sum is rounded before it is normalised (see expanders.add_layer_norm_fwd)
    round_to = None if x.dtype == torch.float32 else str(x.dtype).removeprefix("torch.")
    cg = _compiled("add_layer_norm_fwd", m is not None, bias is not None, round_to, True)
    args = dict(x=x.reshape(-1, N), a=a.reshape(-1, N), weight=weight, eps=eps)
    if m is not None:
        args["m"] = m.reshape(-1, N)
    if bias is not None:
        args["bias"] = bias
    r = cg(**args)
    return r["y_sum"].view(x.shape), r["out"].view(x.shape), r["mean"], r["rstd"]


def rms_norm_fwd(x2d: torch.Tensor, weight: torch.Tensor, eps: float):
    """``y = x * rsqrt(mean(x^2) + eps) * weight``; returns ``(y, rstd)``."""
    _check("x2d", x2d, ndim=2)
    _check("weight", weight, shape=(x2d.size(1),), device=x2d.device)
    r = _compiled("rms_norm_fwd")(x=x2d, weight=weight, eps=check_eps(eps))
    return r["y"], r["rstd"]


def rms_norm_bwd(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Gradients of :func:`rms_norm_fwd`: ``(dx, dweight)``."""
    _check("x2d", x2d, ndim=2)
    M, N = x2d.shape
    _check("dy", dy, shape=(M, N), device=x2d.device)
    _check("weight", weight, shape=(N,), device=x2d.device)
    _check("rstd", rstd, shape=(M,), device=x2d.device, dtypes=(torch.float32,))
    r = _compiled("rms_norm_bwd")(dy=dy, x=x2d, weight=weight, rstd=rstd)
    return r["dx"], r["dweight"]
