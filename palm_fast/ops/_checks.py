"""Argument checks shared by the public functionals in ``palm_fast.ops``.

Every failure names the argument, what was expected and what was received.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
                 ndim: int | Sequence[int] | None = None, min_ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(
            f"{name}: expected dtype in ({', '.join(str(d) for d in dtypes)}), got {t.dtype}"
        )
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name}: expected {' or '.join(map(str, allowed))} dims, got shape "
                             f"{tuple(t.shape)} ({t.dim()} dims)")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if not (t.is_cpu or t.is_cuda):   # (t.device.type builds a str: 0.3 us more per tensor)
        raise ValueError(f"{name}: expected a cpu or cuda tensor, got device {t.device}")
    if t.layout is not torch.strided:   # (sparse, mkldnn: the kernels read strided memory)
        raise TypeError(f"{name}: expected a dense (torch.strided) tensor, got layout {t.layout}")


def check_bool(name: str, value) -> bool:
    """A flag: a bool (or a numpy bool), not any truthy object (the string "False" is true)."""
    if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):   # (numpy 1 / 2)
        return bool(value)
    raise TypeError(f"{name}: expected a bool, got {value!r}")


def is_int(value) -> bool:
    """A Python or numpy integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value) -> int:
    """An integer (a Python or numpy int, not a bool) as a Python int."""
    if type(value) is int:   # the common case, without the abstract-class check
        return value
    if not is_int(value):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return int(value)


def check_no_grad(name: str, t: torch.Tensor) -> None:
    """Inputs the ops give no gradient (the RoPE frequency table): refuse one that requires
    grad rather than leave its .grad silently None."""
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name}: gradients with respect to {name} are not computed, but it "
                         f"requires grad; pass {name}.detach()")


def check_same_device(**tensors: torch.Tensor) -> None:
    """The non-None tensors on one device (runs per op call: no lists built)."""
    first_name = first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if first is None:
            first_name, first = name, t.device
        elif t.device != first:
            raise ValueError(f"{name}: expected device {first} (same as {first_name}), got {t.device}")


def check_same_dtype(**tensors: torch.Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name}: expected dtype {first.dtype} (same as {first_name}), got {t.dtype}"
            )


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() > 0 and t.size(-1) > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name}: expected a unit stride in the last dim, got strides {tuple(t.stride())}; "
            "call .contiguous() first"
        )


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}{what}, got {tuple(t.shape)}")


FP32_MAX = 3.4028234663852886e38
FP32_TINY = 1.1754943508222875e-38   # the smallest normal fp32 (smaller ones flush to 0)


def check_float(name: str, value, *, positive: bool = False) -> float:
    """A real number (a Python int / float or a numpy scalar, not a bool), finite and within
    fp32 range (the kernels take fp32 scalars), and if ``positive`` at least the smallest
    normal fp32 (a smaller one is 0 in fp32, or flushed to 0): as a Python float.
    Written as comparisons (not ``math.isfinite``) so that ``torch.compile(dynamic=True)``
    traces it."""
    if type(value) is float and -FP32_MAX <= value <= FP32_MAX and (not positive or value >= FP32_TINY):
        return value  # the common case, without the abstract-class check (per decode call)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a Python float, got {type(value).__name__}")
    if not (-FP32_MAX <= value <= FP32_MAX) or (positive and not value >= FP32_TINY):  # NaN fails both
        raise ValueError(f"{name}: expected a finite float{' > 0' if positive else ''} "
                         f"(within the fp32 range{', a normal fp32 >= 1.2e-38' if positive else ''}), "
                         f"got {value!r}")
    return float(value)


def check_eps(eps) -> float:
    """A LayerNorm-style epsilon: a finite float > 0."""
    return check_float("eps", eps, positive=True)


def unit_last_dim(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is unit-stride (any other strides are fine for our
    kernels, e.g. rows sliced from a wider buffer), else a contiguous copy (e.g. the
    expanded gradients autograd hands a backward)."""
    if t.numel() == 0:   # contiguous() keeps an empty tensor's strides (e.g. 0 from a sum's grad)
        return t if t.dim() == 0 or t.stride(-1) == 1 else t.new_empty(t.shape)
    return t if t.dim() == 0 or t.size(-1) <= 1 or t.stride(-1) == 1 else t.contiguous()


def as_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t.float()``: ``t`` itself when it is fp32 already, without the dispatcher's ``to``
    (2.5 us per call, e.g. a module's fp32 ``inv_freq`` buffer on every forward)."""
    return t if t.dtype == torch.float32 else t.float()
