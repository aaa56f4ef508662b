"""``LayerNorm`` module on the fast ``palm_fast.ops.layer_norm`` (C++ on CPU, the fusion
engine's generated Triton kernels on CUDA).

Drop-in for :class:`palm_fast.reference.LayerNorm` (same parameters ``weight`` and optional
``bias``, same state_dict) and for :class:`torch.nn.LayerNorm` with a 1-D
``normalized_shape`` and ``elementwise_affine=True`` (``bias=True`` or ``False``): build one
with the same keyword arguments (``LayerNorm(shape, eps=..., bias=...)``; unlike torch's,
``bias`` defaults to False, as in the reference, and is the third positional argument) and
load its state_dict, or wrap an existing module with :meth:`LayerNorm.from_torch`, which
shares its Parameter objects.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..ops._checks import FLOAT_DTYPES, check_eps, is_int
from ..ops.layer_norm import layer_norm

__all__ = ["LayerNorm"]


def _feature_dim(dim) -> int:
    if is_int(dim):
        n = int(dim)
    elif isinstance(dim, Sequence) and len(dim) == 1 and is_int(dim[0]):
        n = int(dim[0])  # torch.nn.LayerNorm's normalized_shape as a 1-tuple / torch.Size
    else:
        raise ValueError(f"dim: expected an int or a 1-tuple (normalisation over the last dim only), "
                         f"got {dim!r}")
    if n < 1:
        raise ValueError(f"dim: expected a positive size, got {n}")
    return n


class LayerNorm(nn.Module):
    """``y = (x - mean(x)) / sqrt(var(x) + eps) * weight (+ bias)`` over the last dim.

    Parameters as the reference: ``weight`` (ones, ``[dim]``) and, with ``bias=True``, ``bias``
    (zeros). ``dim`` may be an int or a 1-tuple (``torch.nn.LayerNorm``'s ``normalized_shape``,
    which is also accepted by that keyword and read back as the attribute ``normalized_shape``).
    Inputs fp32 / fp16 / bf16; parameters in the input's dtype or fp32 (others, e.g. a bf16
    weight with fp32 inputs, are taken in fp32, as the reference does).
    """

    def __init__(self, dim=None, eps: float = 1e-5, bias: bool = False, *, normalized_shape=None,
                 elementwise_affine: bool = True, device=None, dtype=None):
        super().__init__()
        if (dim is None) == (normalized_shape is None):
            raise TypeError("dim: expected the feature size as dim or as normalized_shape (torch's "
                            f"name), exactly one of them; got dim={dim!r}, "
                            f"normalized_shape={normalized_shape!r}")
        if dim is None:
            dim = normalized_shape
        if elementwise_affine is not True:
            raise ValueError(f"elementwise_affine: expected True (this LayerNorm has a weight), "
                             f"got {elementwise_affine!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {type(bias).__name__}")
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected None or one of {FLOAT_DTYPES}, got {dtype}")
        self.dim, self.eps = _feature_dim(dim), check_eps(eps)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(self.dim, **kw))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.dim, **kw))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_torch(cls, ln: nn.LayerNorm) -> LayerNorm:
        """A fast LayerNorm sharing ``ln``'s ``weight`` / ``bias`` Parameters (training either
        trains both). ``ln`` needs a 1-D ``normalized_shape`` and ``elementwise_affine=True``."""
        if not isinstance(ln, nn.LayerNorm):
            raise TypeError(f"ln: expected a torch.nn.LayerNorm, got {type(ln).__name__}")
        if not ln.elementwise_affine:
            raise ValueError("ln: expected elementwise_affine=True (palm_fast's LayerNorm has a weight)")
        new = cls(_feature_dim(tuple(ln.normalized_shape)), eps=ln.eps, bias=False, device="meta")
        new.weight = ln.weight
        if ln.bias is not None:
            new.bias = ln.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() and x.shape[-1] != self.weight.shape[0] == self.dim:
            raise ValueError(f"x: expected last dim {self.dim} (this LayerNorm's), got shape "
                             f"{tuple(x.shape)}")
        w, b = self.weight, self.bias
        if isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES and w.is_floating_point() and (
                w.dtype not in (x.dtype, torch.float32) or (b is not None and b.dtype != w.dtype)):
            # as the reference (weight.to(fp32), statistics in fp32): a bf16 weight of an fp32
            # model, or weight and bias in different dtypes, are taken in fp32
            w = w.float()
            b = b.float() if b is not None else None
        return layer_norm(x, w, b, self.eps)

    @property
    def normalized_shape(self) -> tuple[int]:
        """``(dim,)``, as ``torch.nn.LayerNorm.normalized_shape``."""
        return (self.dim,)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"
