"""``palm_fast.ops.swiglu``: SwiGLU of a fused ``value | gate`` projection output.

Math (reference: ``palm_fast.reference.functional.swiglu``), with x ``[..., 2F]``
laid out ``value | gate`` (PaLM-pytorch order) and ``s = sigmoid(gate)``::

    out     = silu(gate) * value                                   [..., F]
    d_value = g * silu(gate);  d_gate = g * value * s * (1 + gate * (1 - s))

Custom ops (CPU -> C++ ``palm_fast._C``, CUDA -> Triton ``palm_fast.kernels.swiglu``):

* ``palm_fast::swiglu(Tensor x) -> Tensor``: contiguous ``[..., F]``; autograd
  through ``palm_fast::swiglu_bwd``.
* ``palm_fast::swiglu_bwd(Tensor grad_out, Tensor x) -> Tensor``: contiguous
  ``[..., 2F]`` gradient w.r.t. x (the sigmoid is recomputed, not saved).

x is read in place when its leading dims merge into one row stride (e.g. a
``proj[..., a:a + 2F]`` slice of a wider fused projection: no copy); otherwise,
or when its last dim is not unit-stride, the kernels copy it to a contiguous
tensor first. Math in fp32, results in x's dtype. The custom ops also accept
fp64 on CPU (used by gradcheck); the public function takes fp32/fp16/bf16.
"""
from __future__ import annotations

import torch

from palm_fast._ext import cpp

from ._checks import check_tensor
from ._dispatch import call_impl, check_traced, compiling, eager_ctx, eager_function, eager_op, needs_grad

__all__ = ["swiglu"]


def _triton():
    from palm_fast.kernels import swiglu as kernels

    return kernels


def _out_shape(x: torch.Tensor) -> list[int]:
    return [*x.shape[:-1], x.shape[-1] // 2]


@torch.library.custom_op("palm_fast::swiglu", mutates_args=())
def _swiglu(x: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError(f"palm_fast::swiglu: no kernel for device {x.device} (cpu or cuda)")


@_swiglu.register_kernel("cpu")
def _swiglu_cpu(x: torch.Tensor) -> torch.Tensor:
    return cpp().swiglu_fwd(x)


@_swiglu.register_kernel("cuda")
def _swiglu_cuda(x: torch.Tensor) -> torch.Tensor:
    return _triton().swiglu_fwd(x)


@_swiglu.register_fake
def _swiglu_fake(x: torch.Tensor) -> torch.Tensor:
    # The real kernels always return a fresh contiguous tensor.
    return x.new_empty(_out_shape(x))


@torch.library.custom_op("palm_fast::swiglu_bwd", mutates_args=())
def _swiglu_bwd(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError(f"palm_fast::swiglu_bwd: no kernel for device {x.device} (cpu or cuda)")


@_swiglu_bwd.register_kernel("cpu")
def _swiglu_bwd_cpu(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return cpp().swiglu_bwd(grad_out, x)


@_swiglu_bwd.register_kernel("cuda")
def _swiglu_bwd_cuda(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _triton().swiglu_bwd(grad_out, x)


@_swiglu_bwd.register_fake
def _swiglu_bwd_fake(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)


def _backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    if eager_ctx(ctx):
        return call_impl(_BWD_IMPLS, grad_out, x)
    return torch.ops.palm_fast.swiglu_bwd(grad_out, x)


_swiglu.register_autograd(_backward, setup_context=_setup_context)
_BWD_IMPLS = {"cpu": _swiglu_bwd_cpu, "cuda": _swiglu_bwd_cuda}
_FWD_IMPLS = {"cpu": _swiglu_cpu, "cuda": _swiglu_cuda}
_SwiGLUEager = eager_function("swiglu", _FWD_IMPLS, _setup_context, _backward)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * value`` of ``x = value | gate`` ``[..., 2F]`` -> ``[..., F]`` (autograd).

    Raises TypeError for a non-tensor or a dtype other than fp32/fp16/bf16 and
    ValueError for a 0-dim x, an odd or zero last dim, or a device other than
    cpu/cuda; every message names ``x``.
    """
    check_tensor("x", x, min_ndim=1)
    two_f = x.shape[-1]
    if two_f == 0 or two_f % 2:
        raise ValueError(f"x: expected an even, positive last dim [..., 2F] (value | gate), "
                         f"got shape {tuple(x.shape)} (last dim {two_f})")
    if compiling():
        check_traced(x)
        return torch.ops.palm_fast.swiglu(x)
    return eager_op(_SwiGLUEager, _FWD_IMPLS, x.device.type, needs_grad(x))(x)
