"""``palm_fast.patch`` for palm_fast's reference modules: each is replaced by the fast module of
``palm_fast.nn`` with the same constructor arguments, sharing the original's parameters and
buffers (``reference.LayerNorm`` -> ``nn.LayerNorm``, ``reference.RotaryEmbedding`` ->
``nn.RotaryEmbedding``, ``reference.SwiGLU`` -> ``nn.SwiGLU``, ``reference.ParallelBlock`` ->
``nn.ParallelBlock`` when this build has it)."""
from __future__ import annotations

import torch
from torch import nn

from .. import nn as fast
from .. import reference as ref
from ..patching import PatchOptions, Unsupported, check_dtype, register


def share_state(new: nn.Module, orig: nn.Module) -> nn.Module:
    """Point every parameter and buffer of ``new`` at ``orig``'s object of the same name
    (``new`` is typically built on the meta device with the same structure)."""
    for kind, named in (("_parameters", orig.named_parameters), ("_buffers", orig.named_buffers)):
        for name, t in named(remove_duplicate=False):
            mod_path, _, leaf = name.rpartition(".")
            owner = new.get_submodule(mod_path)
            if leaf not in getattr(owner, kind):
                raise Unsupported(f"the fast module has no {kind[1:-1]} named {name!r}")
            getattr(owner, kind)[leaf] = t
    return new


def layer_norm(m: ref.LayerNorm, opts: PatchOptions) -> nn.Module:
    check_dtype(m)
    new = fast.LayerNorm(m.dim, eps=m.eps, bias=m.bias is not None, device="meta")
    return share_state(new, m)


def rotary(m: ref.RotaryEmbedding, opts: PatchOptions) -> nn.Module:
    check_dtype(m)
    with torch.device("meta"):
        new = fast.RotaryEmbedding(m.rotary_dim, m.base, m.interleaved)
    return share_state(new, m)


def swiglu(m: ref.SwiGLU, opts: PatchOptions) -> nn.Module:
    return fast.SwiGLU()


def parallel_block(m: ref.ParallelBlock, opts: PatchOptions) -> nn.Module:
    fast_block = getattr(fast, "ParallelBlock", None)
    if fast_block is None or not hasattr(fast_block, "from_reference"):
        raise Unsupported("palm_fast.nn.ParallelBlock is not in this build; the block's parts are "
                          "patched one by one (attention stays the reference)")
    off = [k for k in ("rope", "swiglu", "layer_norm", "attention") if not opts.enabled(k)]
    if off:
        raise Unsupported(f"palm_fast.nn.ParallelBlock uses every fast piece but {', '.join(off)}="
                          "False was asked; the block's parts are patched one by one")
    check_dtype(m)
    return fast_block.from_reference(m)


def register_all() -> None:
    register(ref.LayerNorm, layer_norm, kind="layer_norm", replace=True)
    register(ref.RotaryEmbedding, rotary, kind="rope", replace=True)
    register(ref.SwiGLU, swiglu, kind="swiglu", replace=True)
    register(ref.ParallelBlock, parallel_block, kind="block", inline=("attention",), replace=True)
