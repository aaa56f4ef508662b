"""``palm_fast.patch`` for palm_fast's reference modules: each is replaced by the fast module of
``palm_fast.nn`` with the same constructor arguments, sharing the original's parameters and
buffers (``reference.LayerNorm`` -> ``nn.LayerNorm``, ``reference.RotaryEmbedding`` ->
``nn.RotaryEmbedding``, ``reference.SwiGLU`` -> ``nn.SwiGLU``, ``reference.ParallelBlock`` ->
``nn.ParallelBlock`` when this build has it)."""
from __future__ import annotations

import types

import torch
from torch import nn

from .. import nn as fast
from .. import reference as ref
from ..patching import PatchOptions, Unsupported, check_code, check_constant_inv_freq, check_dtype, register
from ..reference import functional as _fn
from ..reference import layers as _layers


def _as_defined(m: types.ModuleType, name: str, f) -> bool:
    """Whether ``f`` is ``m``'s own ``name``: the function its body defines, not one assigned
    at run time (a function elsewhere, or a wrapper, ``functools.wraps`` or not, a ``partial``,
    a lambda, has other globals, another qualname or a ``__wrapped__``); for ``layers.Fn``,
    the functional module."""
    if name == "Fn":
        return f is _fn
    return isinstance(f, types.FunctionType) and f.__globals__ is vars(m) \
        and f.__qualname__ == name and not hasattr(f, "__wrapped__")


# The module-level names the replaced reference modules look up each time they run
# (LayerNorm: _compute_dtype; RotaryEmbedding: Fn.positions_from_offsets, Fn.apply_rope, which
# calls rope_angles and rotate_half; SwiGLU: Fn.swiglu; ParallelBlock: _rope_cache_attend,
# which calls attention, which calls _compute_dtype; and the parts). Replacing one
# (``layers.attention = sliding_window``) changes what the original computes, not what its
# fast module does. (Fn.rope_inv_freq, run by RotaryEmbedding._apply, runs in the fast
# module too: it inherits _apply.)
_ROPE = ((_layers, "Fn"), (_fn, "positions_from_offsets"), (_fn, "apply_rope"), (_fn, "rope_angles"),
         (_fn, "rotate_half"))
_RUN_TIME = {
    "layer_norm": ((_layers, "_compute_dtype"),),
    "rope": _ROPE,
    "swiglu": ((_layers, "Fn"), (_fn, "swiglu")),
    "block": ((_layers, "_rope_cache_attend"), (_layers, "attention"), (_layers, "_compute_dtype"),
              *_ROPE, (_fn, "swiglu")),
}
# The originals as of this module's import (it is imported by the first patch call): later
# replacements fail the identity check; one made before then fails _as_defined.
_ORIGINALS = {(m, n): getattr(m, n) for pairs in _RUN_TIME.values() for m, n in pairs
              if _as_defined(m, n, getattr(m, n, None))}


def check_reference_functions(kind: str) -> None:
    """Raise Unsupported when a module-level function that the reference modules of ``kind``
    ("layer_norm", "rope", "swiglu", "block") call as they run was replaced at run time
    (``palm_fast.reference.layers.attention = f``): the fast module computes the original
    and would drop the change."""
    changed = []
    for m, n in dict.fromkeys(_RUN_TIME[kind]):
        f, orig = getattr(m, n, None), _ORIGINALS.get((m, n))
        if not (f is orig if orig is not None else _as_defined(m, n, f)):
            changed.append(f"{m.__name__}.{n}")
    if changed:
        raise Unsupported(f"{', '.join(changed)} {'was' if len(changed) == 1 else 'were'} replaced "
                          "at run time; the fast module computes the original function and would "
                          "drop the change")


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


def _build(make):
    """``make()``, a fast module's constructor call; its argument errors (settings the fast
    module refuses, e.g. eps = 0) become Unsupported: the module is skipped and reported."""
    try:
        return make()
    except (ValueError, TypeError) as e:
        raise Unsupported(f"the fast module refuses this module's settings ({e})") from e


def layer_norm(m: ref.LayerNorm, opts: PatchOptions) -> nn.Module:
    check_code(ref.LayerNorm)
    check_reference_functions("layer_norm")
    check_dtype(m)
    new = _build(lambda: fast.LayerNorm(m.dim, eps=m.eps, bias=m.bias is not None, device="meta"))
    return share_state(new, m)


def rotary(m: ref.RotaryEmbedding, opts: PatchOptions) -> nn.Module:
    check_code(ref.RotaryEmbedding)
    check_reference_functions("rope")
    check_dtype(m)
    check_constant_inv_freq(m)
    with torch.device("meta"):
        new = _build(lambda: fast.RotaryEmbedding(m.rotary_dim, m.base, m.interleaved))
    return share_state(new, m)


def swiglu(m: ref.SwiGLU, opts: PatchOptions) -> nn.Module:
    check_code(ref.SwiGLU)
    check_reference_functions("swiglu")
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
    _check_block_parts(m)
    return _build(lambda: fast_block.from_reference(m))


def _check_block_parts(m: ref.ParallelBlock) -> None:
    """The fast block reads only its parts' weights (and ``m.eps``): the parts must be the
    reference block's own kinds, or its forward would differ from the original's."""
    def linear(name, n_out, n_in):
        lin = getattr(m, name)
        if type(lin) is not nn.Linear or lin.bias is not None or tuple(lin.weight.shape) != (n_out, n_in):
            raise Unsupported(f"{name} is not the block's bias-free nn.Linear({n_in}, {n_out}) "
                              f"(got {lin!r})")
    linear("in_proj", sum(m.split_sizes), m.dim)
    linear("attn_out", m.dim, m.n_heads * m.head_dim)
    linear("ff_out", m.dim, m.d_ff)
    # (the reference parts, or the fast ones an earlier patch(..., block=False) put there)
    norm = m.norm
    if type(norm) not in (ref.LayerNorm, fast.LayerNorm) or norm.bias is not None or norm.eps != m.eps \
            or norm.dim != m.dim:
        raise Unsupported(f"norm is not the block's reference LayerNorm({m.dim}, eps={m.eps}) without "
                          f"bias (got {norm!r})")
    if type(m.act) not in (ref.SwiGLU, fast.SwiGLU):
        raise Unsupported(f"act is not the reference SwiGLU (got {type(m.act).__qualname__})")
    if type(m.rotary) not in (ref.RotaryEmbedding, fast.RotaryEmbedding):
        raise Unsupported(f"rotary is not the reference RotaryEmbedding (got {type(m.rotary).__qualname__})")
    check_constant_inv_freq(m.rotary, "rotary.inv_freq")
    check_code(type(m), type(norm), type(m.act), type(m.rotary))
    check_reference_functions("block")


def register_all() -> None:
    register(ref.LayerNorm, layer_norm, kind="layer_norm", replace=True)
    register(ref.RotaryEmbedding, rotary, kind="rope", replace=True)
    register(ref.SwiGLU, swiglu, kind="swiglu", replace=True)
    register(ref.ParallelBlock, parallel_block, kind="block", inline=("attention",), replace=True)
