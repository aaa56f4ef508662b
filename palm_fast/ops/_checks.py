"""Argument checks shared by the public functionals in ``palm_fast.ops``.

Every failure names the argument, what was expected and what was received.
"""
from __future__ import annotations

import math
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
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected a cpu or cuda tensor, got device {t.device}")


def check_same_device(**tensors: torch.Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name}: expected device {first.device} (same as {first_name}), got {t.device}"
            )


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


def check_eps(eps) -> float:
    """A LayerNorm-style epsilon: a finite float > 0."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps: expected a finite float > 0, got {eps!r}")
    return float(eps)


def unit_last_dim(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is unit-stride (any other strides are fine for our
    kernels, e.g. rows sliced from a wider buffer), else a contiguous copy (e.g. the
    expanded gradients autograd hands a backward)."""
    return t if t.dim() == 0 or t.size(-1) <= 1 or t.stride(-1) == 1 else t.contiguous()
