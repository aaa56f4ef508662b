"""LayerNorm and the fused residual-add + LayerNorm as ``palm_fast::`` custom ops.

Math (over the last dim, N features; statistics in fp32, biased variance)::

    mean = sum_N(x) / N;  rstd = 1 / sqrt(sum_N((x - mean)^2) / N + eps)
    y    = (x - mean) * rstd * weight (+ bias)

``add_layer_norm`` is the parallel block's residual sum followed by the next LayerNorm:
``y_sum = x + a (+ m)`` and ``out = LN(y_sum)`` (normalising y_sum as returned: in fp16 / bf16
the fp32 sum rounded once to that dtype; eager ``x + a + m`` rounds after each add), both
returned.

Custom ops (2-D ``[M, N]`` rows; ``mean`` / ``rstd`` fp32 ``[M]``):

* ``palm_fast::layer_norm_fwd(x, weight, bias?, eps) -> (y, mean, rstd)``
* ``palm_fast::layer_norm_bwd(dy, x, weight, mean, rstd, has_bias, need_w) -> (dx, dweight, dbias)``
  (``dbias`` is an empty ``[0]`` tensor when ``has_bias`` is false: a custom op cannot
  return an optional tensor; ``need_w`` false, a frozen weight and bias: dx only, ``dweight``
  and ``dbias`` empty, the column reductions skipped)
* ``palm_fast::add_layer_norm_fwd(x, a, m?, weight, bias?, eps) -> (y_sum, out, mean, rstd)``

CPU tensors run the C++ kernels (``csrc/layer_norm.cpp``); CUDA tensors run the fusion
engine's generated ``full``-mode Triton kernels (``palm_fast.fusion.layer_norm``): one
forward kernel, a two-stage deterministic backward. Both have a fake kernel (torch.compile)
and autograd; the add+LN backward is the LN backward plus the residual sum's gradient,
flowing to ``x``, ``a`` and ``m``.

Dtypes: ``x`` (and ``a``, ``m``, ``dy``) fp32, fp16 or bf16; outputs in ``x``'s dtype.
``weight`` (and ``bias``, which must match ``weight``'s dtype) is either ``x``'s dtype or
fp32 -- the latter is what a module kept in fp32 sees under bf16 activations (as
``torch.nn.LayerNorm`` under autocast); ``dweight`` / ``dbias`` come back in ``weight``'s
dtype. fp64 is not supported (TypeError).
"""
from __future__ import annotations

import torch

from .._ext import cpp
from ._checks import FLOAT_DTYPES, check_eps, check_same_device, check_shape, check_tensor, unit_last_dim
from ._dispatch import call_impl, check_traced, compiling, eager_ctx, eager_function, eager_op, needs_grad

__all__ = ["layer_norm", "add_layer_norm"]


# ------------------------------------------------------------------------- custom ops

def _layer_norm_fwd_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm forward of 2-D ``x [M, N]``: ``(y, mean, rstd)``."""
    y, mean, rstd = cpp().layer_norm_fwd(x, weight, bias, eps)
    return y, mean, rstd


layer_norm_fwd = torch.library.custom_op("palm_fast::layer_norm_fwd", mutates_args=(),
                                       device_types="cpu")(_layer_norm_fwd_cpu)


@layer_norm_fwd.register_kernel("cuda")
def _layer_norm_fwd_cuda(x, weight, bias, eps):
    from ..fusion.layer_norm import layer_norm_fwd as launch

    # the generated kernels take a row stride: row-strided x is read in place
    return launch(unit_last_dim(x), weight.contiguous(),
                  None if bias is None else bias.contiguous(), eps, checked=True)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    M = x.shape[0]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((M,), dtype=torch.float32), x.new_empty((M,), dtype=torch.float32))


def _layer_norm_bwd_cpu(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                        rstd: torch.Tensor, has_bias: bool,
                        need_w: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`layer_norm_fwd`: ``(dx, dweight, dbias)``, dbias empty without bias,
    dweight and dbias empty without ``need_w``."""
    dx, dw, db = cpp().layer_norm_bwd(dy, x, weight, mean, rstd, has_bias, need_w)
    return dx, dw, (db if has_bias else weight.new_empty((0,)))


layer_norm_bwd = torch.library.custom_op("palm_fast::layer_norm_bwd", mutates_args=(),
                                       device_types="cpu")(_layer_norm_bwd_cpu)


@layer_norm_bwd.register_kernel("cuda")
def _layer_norm_bwd_cuda(dy, x, weight, mean, rstd, has_bias, need_w=True):
    from ..fusion.layer_norm import layer_norm_bwd as launch

    dx, dw, db = launch(unit_last_dim(dy), unit_last_dim(x), weight.contiguous(), mean.contiguous(),
                        rstd.contiguous(), has_bias, checked=True, weight_grads=need_w)
    if not need_w:
        return dx, weight.new_empty((0,)), weight.new_empty((0,))
    return dx, dw, (db if has_bias else weight.new_empty((0,)))


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, has_bias, need_w=True):
    N = x.shape[1] if need_w else 0
    return (torch.empty_like(x, memory_format=torch.contiguous_format), weight.new_empty((N,)),
            weight.new_empty((N if has_bias else 0,)))


def _add_layer_norm_fwd_cpu(x: torch.Tensor, a: torch.Tensor, m: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor | None, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y_sum = x + a (+ m)``, ``out = LN(y_sum)`` for 2-D rows: ``(y_sum, out, mean, rstd)``."""
    y_sum, out, mean, rstd = cpp().add_layer_norm_fwd(x, a, m, weight, bias, eps)
    return y_sum, out, mean, rstd


add_layer_norm_fwd = torch.library.custom_op("palm_fast::add_layer_norm_fwd", mutates_args=(),
                                       device_types="cpu")(_add_layer_norm_fwd_cpu)


@add_layer_norm_fwd.register_kernel("cuda")
def _add_layer_norm_fwd_cuda(x, a, m, weight, bias, eps):
    from ..fusion.layer_norm import add_layer_norm_fwd as launch

    return launch(x.contiguous(), a.contiguous(), None if m is None else m.contiguous(),
                  weight.contiguous(), None if bias is None else bias.contiguous(), eps)


@add_layer_norm_fwd.register_fake
def _(x, a, m, weight, bias, eps):
    M = x.shape[0]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((M,), dtype=torch.float32), x.new_empty((M,), dtype=torch.float32))


# ------------------------------------------------------------------------- autograd

def _ln_setup(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    # mean / rstd never receive a gradient (the public functions do not return them): no zero
    # tensors materialised for them per backward (2 allocations + 2 fills on a GPU)
    ctx.set_materialize_grads(False)


def _ln_bwd(ctx, *args):
    """The backward op: called directly on the eager path, as a custom op under compile."""
    if eager_ctx(ctx):
        return call_impl(_LN_BWD_IMPLS, *args)
    return layer_norm_bwd(*args)


def _weight_grads(ctx, i_weight: int) -> tuple[bool, bool]:
    """Whether the weight and the bias (inputs ``i_weight``, ``i_weight + 1``) need gradients:
    frozen (LoRA / adapter training, a frozen LayerNorm), their column reductions are skipped."""
    need = ctx.needs_input_grad
    return need[i_weight], ctx.has_bias and need[i_weight + 1]


def _ln_backward(ctx, dy, _dmean, _drstd):
    if dy is None:   # (grads are not materialised: y received none)
        return None, None, None, None
    x, weight, mean, rstd = ctx.saved_tensors
    need_w, need_b = _weight_grads(ctx, 1)
    dx, dw, db = _ln_bwd(ctx, dy, x, weight, mean, rstd, ctx.has_bias, need_w or need_b)
    return dx, (dw if need_w else None), (db if need_b else None), None


layer_norm_fwd.register_autograd(_ln_backward, setup_context=_ln_setup)


def _add_ln_setup(ctx, inputs, output):
    x, a, m, weight, bias, _eps = inputs
    y_sum, _out, mean, rstd = output
    ctx.save_for_backward(y_sum, weight, mean, rstd)
    ctx.has_m, ctx.has_bias = m is not None, bias is not None
    ctx.set_materialize_grads(False)   # (as in _ln_setup; y_sum or out may get None too)


def _add_ln_backward(ctx, d_sum, d_out, _dmean, _drstd):
    if d_sum is None and d_out is None:   # (grads are not materialised)
        return None, None, None, None, None, None
    y_sum, weight, mean, rstd = ctx.saved_tensors
    need_w, need_b = _weight_grads(ctx, 3)
    if d_out is None:   # only y_sum was used: the LayerNorm passes nothing back
        dx_ln = dw = db = None
        need_w = need_b = False
    else:
        dx_ln, dw, db = _ln_bwd(ctx, d_out, y_sum, weight, mean, rstd, ctx.has_bias, need_w or need_b)
    # y_sum feeds both outputs; x, a and m all receive its gradient
    d = dx_ln if d_sum is None else (d_sum if dx_ln is None else d_sum + dx_ln)
    # One tensor (or views of one memory) handed to two inputs can become two leaves' .grad
    # tensors: autograd keeps a gradient nothing else references instead of copying it, and
    # the public function's reshapes wrap d in separate views, through any chain of nodes
    # that pass a gradient on unchanged (p1 + p2, expand_as, x - 0). The next accumulation,
    # or clip_grad_norm_, then wrote into both. Every input after the first gets a copy.
    grads, first = [], True
    for i, need in enumerate(ctx.needs_input_grad[:3]):
        if not need or (i == 2 and not ctx.has_m):
            grads.append(None)
        else:
            grads.append(d if first else d.clone())
            first = False
    return (*grads, (dw if need_w else None), (db if need_b else None), None)


add_layer_norm_fwd.register_autograd(_add_ln_backward, setup_context=_add_ln_setup)

# The same implementations and autograd functions without the dispatcher (eager mode).
_LN_FWD_IMPLS = {"cpu": _layer_norm_fwd_cpu, "cuda": _layer_norm_fwd_cuda}
_ADD_LN_FWD_IMPLS = {"cpu": _add_layer_norm_fwd_cpu, "cuda": _add_layer_norm_fwd_cuda}
_LN_BWD_IMPLS = {"cpu": _layer_norm_bwd_cpu, "cuda": _layer_norm_bwd_cuda}
_LayerNormEager = eager_function("layer_norm_fwd", _LN_FWD_IMPLS, _ln_setup, _ln_backward)
_AddLayerNormEager = eager_function("add_layer_norm_fwd", _ADD_LN_FWD_IMPLS, _add_ln_setup,
                                    _add_ln_backward)



# ------------------------------------------------------------------------- public API

def _check_affine(x: torch.Tensor, weight, bias) -> None:
    """weight / bias: 1-D [N] on x's device, dtype x's or fp32, bias matching weight."""
    N = x.shape[-1]
    check_tensor("weight", weight, ndim=1)
    check_shape("weight", weight, (N,), " (x's last dim)")
    if weight.dtype not in (x.dtype, torch.float32):
        also = "" if x.dtype == torch.float32 else " or torch.float32"
        raise TypeError(f"weight: expected dtype {x.dtype} (same as x){also}, got {weight.dtype}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_shape("bias", bias, (N,), " (x's last dim)")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias: expected dtype {weight.dtype} (same as weight), got {bias.dtype}")
    check_same_device(x=x, weight=weight, bias=bias)


def _check_input(name: str, x) -> int:
    check_tensor(name, x, dtypes=FLOAT_DTYPES, min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"{name}: expected a non-empty last dim, got shape {tuple(x.shape)}")
    return x.shape[-1]


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim: ``x [..., N]`` -> ``y [..., N]`` in x's dtype.

    ``weight`` / ``bias`` are ``[N]``, in x's dtype or fp32 (bias matching weight). Differentiable
    in x, weight and bias. Raises TypeError (dtype) / ValueError (shape, device, eps) naming the
    argument.
    """
    N = _check_input("x", x)
    _check_affine(x, weight, bias)
    eps = check_eps(eps)
    if compiling():
        check_traced(x, weight, bias)
        op = layer_norm_fwd
    else:
        op = eager_op(_LayerNormEager, _LN_FWD_IMPLS, x.device.type, needs_grad(x, weight, bias))
    if x.dim() == 2:   # (rows already: no reshape and view back, 2.4 us)
        return op(x, weight, bias, eps)[0]
    y, _mean, _rstd = op(x.reshape(-1, N), weight, bias, eps)
    return y.view_as(x)   # (view_as: view(x.shape) parses a torch.Size, 2 us more per call)


def add_layer_norm(x: torch.Tensor, a: torch.Tensor, m: torch.Tensor | None = None, *,
                   weight: torch.Tensor, bias: torch.Tensor | None = None,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual sum and LayerNorm in one pass: returns ``(y_sum, out)`` with
    ``y_sum = x + a (+ m)`` and ``out = LayerNorm(y_sum)``, normalising ``y_sum`` as returned
    (in fp16 / bf16: the fp32 sum rounded once to that dtype; eager ``x + a + m`` rounds after
    each add, so with ``m`` the bits may differ from it in the last place).

    ``x``, ``a``, ``m``: the same shape ``[..., N]`` and dtype; weight / bias as in
    :func:`layer_norm`. Gradients flow to x, a, m (through both outputs), weight and bias.
    """
    N = _check_input("x", x)
    for name, t in (("a", a), ("m", m)):
        if t is None and name == "m":
            continue
        check_tensor(name, t)
        if t.shape != x.shape:
            raise ValueError(f"{name}: expected shape {tuple(x.shape)} (same as x), got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (same as x), got {t.dtype}")
    check_same_device(x=x, a=a, m=m)
    _check_affine(x, weight, bias)
    eps = check_eps(eps)
    if compiling():
        check_traced(x, a, m, weight, bias)
        op = add_layer_norm_fwd
    else:
        op = eager_op(_AddLayerNormEager, _ADD_LN_FWD_IMPLS, x.device.type,
                      needs_grad(x, a, m, weight, bias))
    if x.dim() == 2:   # (rows already: no reshapes and views back)
        return op(x, a, m, weight, bias, eps)[:2]
    y_sum, out, _mean, _rstd = op(
        x.reshape(-1, N), a.reshape(-1, N), None if m is None else m.reshape(-1, N), weight, bias, eps)
    return y_sum.view_as(x), out.view_as(x)
