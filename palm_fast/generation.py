"""Fast batched generation for PaLM-style decoders: ``palm_fast.generate``.

The model is taken apart once (:func:`decoder_parts`) into its embedding, its parallel
blocks, the final norm and the tied output head; generation then runs its own loop over
those weights with the multi-query KV cache (:class:`palm_fast.kv_cache.KVCache`):

* **Prefill** (one batched forward over all prompts, right-padded): per block
  ``h = LN(x)``; ``q | k | v | ff = h W_in``; RoPE on q and k at positions ``0..T-1``;
  k, v appended to the cache (only each prompt's real tokens: ``n_new = prompt lengths``);
  causal multi-query attention over the prompt (:func:`_prefill_attention`);
  ``x = x + attn_out(o) + ff_out(swiglu(ff))``. Right padding is harmless: a real token
  only attends to earlier positions, all real. The logits are taken at each prompt's
  last real token. Fast blocks (``palm_fast.nn.ParallelBlock``) run their fused functional
  path instead (``palm_fast.ops.block``: LayerNorm + input GEMM + RoPE/SwiGLU epilogue,
  ``causal_mqa_attention``, output GEMM + residual).
* **Decode step** (one token per sequence, :func:`_decode_step`): embed; per block LN,
  ``W_in``, ``rope_append`` (RoPE of q and the new k at position ``lengths[b]``, k and v
  written into the cache), ``mqa_decode`` over cache indices ``[0, lengths[b] + 1)``, the
  two output projections and the residual; then the final norm, the tied head and the
  logit scale. ``cache.advance(1)`` after every step. All positions and lengths live in
  device tensors, so the step has no host synchronisation and on a GPU it is captured
  once in a CUDA graph and replayed (:class:`_GraphedStep`).
* **Sampling**: greedy (``temperature == 0``), or ``softmax(logits / temperature)``
  restricted to the ``top_k`` largest logits and / or the smallest set of tokens whose
  probability mass reaches ``top_p`` (nucleus); ``torch.multinomial`` with the caller's
  generator, so a seeded generator gives the same tokens every run. All rows of a step draw
  from that one stream, so a sampled sequence's tokens depend on the other prompts of its
  batch (as in the reference's ``generate``); greedy output does not.
* **Stopping**: each sequence ends at its first generated stop token (included) or after
  ``max_new_tokens``. Finished sequences keep running in the batch (their extra tokens
  are discarded); the loop ends early once every sequence has finished.

Supported models (:func:`decoder_parts`): ``palm_fast.reference.PaLM`` and its subclasses
(``palm_fast.nn.PaLM``). Other layouts are taught with :func:`register_decoder_parts`
(the patch helper registers PaLM-pytorch's ``nn.Sequential`` this way).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module
from torch.nn.utils import parametrize

from palm_fast.kernels._common import launch_device

from . import ops
from ._ext import cpp as _cpp
from .ops._checks import FP32_TINY, check_float, is_int
from .ops._dispatch import forward_replaced, instance_override, methods_replaced, unwrap_compiled
from .reference import functional as _ref_fn
from .reference import layers as _ref
from .reference import model as _ref_model

__all__ = ["DecoderParts", "decoder_parts", "register_decoder_parts", "generate"]


# --------------------------------------------------------------------------- model parts

@dataclass
class DecoderParts:
    """A PaLM-style decoder taken apart for generation.

    embed:        module mapping token ids ``[...]`` to ``[..., d]`` (an ``nn.Embedding``).
    blocks:       the parallel blocks, in order; each exposes the reference
                  ``ParallelBlock`` attributes ``norm, in_proj, split_sizes, rotary, act,
                  attn_out, ff_out, n_heads, head_dim`` (one shared K/V head: split sizes
                  ``(n_heads * head_dim, head_dim, head_dim, 2 * d_ff)``) and means the
                  reference block's function, residual included:
                  ``x + attn_out(Attn(norm x)) + ff_out(act(ff))``. Only these attributes
                  are read (never ``forward``): forward hooks on the block, its projections
                  or its rotary module are refused (they would not run). ``norm`` / ``act``
                  may be any callables: ours (those classes, without hooks) run the fast ops
                  directly, any other module (a subclass, a hooked one) is called as it is.
    norm:         the final LayerNorm (module ``[..., d] -> [..., d]``).
    head_weight:  the output head ``[V, d]`` (the tied embedding): ``logits = norm(h) @ W^T``.
    logit_scale:  multiplies the logits (``d ** -0.5`` for PaLM's tied embedding), or None.
    """

    embed: nn.Module
    blocks: Sequence[nn.Module]
    norm: nn.Module
    head_weight: torch.Tensor
    logit_scale: float | None


def _palm_parts(model: _ref_model.PaLM) -> DecoderParts:
    c = model.config
    if c.n_kv_heads != 1:
        raise ValueError(f"model: generate needs multi-query attention (config.n_kv_heads == 1), "
                         f"got n_kv_heads={c.n_kv_heads}")
    return DecoderParts(embed=model.embed, blocks=list(model.blocks), norm=model.norm,
                        head_weight=model.embed.weight,
                        logit_scale=c.d_model ** -0.5 if c.scale_logits else None)


# Model class -> function(model) -> DecoderParts. decoder_parts() uses the entry of the most
# specific class in type(model).__mro__, so palm_fast.nn.PaLM (a subclass of the reference
# PaLM with the same attributes) is covered by the reference entry.
_PARTS_REGISTRY: dict[type, Callable[[Any], DecoderParts]] = {_ref_model.PaLM: _palm_parts}


def register_decoder_parts(cls: type, fn: Callable[[Any], DecoderParts]) -> None:
    """Teach :func:`decoder_parts` (and so :func:`generate`) a model class.

    ``fn(model)`` returns a :class:`DecoderParts`, or raises ``ValueError`` saying why this
    particular model cannot be taken apart (e.g. a ``nn.Sequential`` of another layout).
    Registering a class again replaces its entry.
    """
    if not isinstance(cls, type):
        raise TypeError(f"cls: expected a class, got {type(cls).__name__}")
    if not callable(fn):
        raise TypeError(f"fn: expected a callable model -> DecoderParts, got {type(fn).__name__}")
    _PARTS_REGISTRY[cls] = fn


def decoder_parts(model: nn.Module) -> DecoderParts:
    """Take ``model`` apart for generation (see :class:`DecoderParts`).

    Supported: ``palm_fast.reference.PaLM``, ``palm_fast.nn.PaLM`` and any class given to
    :func:`register_decoder_parts`, and their subclasses that keep the registered class's
    ``forward``. Raises TypeError for an unsupported model class (or a subclass with its own
    ``forward``) and
    ValueError for a supported class with an unsupported layout (e.g. more than one K/V head).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a PaLM nn.Module, got {type(model).__name__}")
    model = unwrap_compiled(model)
    from .patching import _load_builtins

    _load_builtins()   # (registers PaLM-pytorch's layout once that package is imported)
    for cls in type(model).__mro__:
        if cls in _PARTS_REGISTRY:
            if forward_replaced(model, cls):
                # (a subclass's forward, e.g. a logit bias, would be skipped: the parts of the
                # registered layout are run instead)
                where = "the instance" if "forward" in vars(model) else type(model).__qualname__
                raise TypeError(f"model: {where} overrides forward() of "
                                f"{cls.__module__}.{cls.__qualname__}, which generate would not "
                                f"run; if its logits are the same, register the class with "
                                f"palm_fast.generation.register_decoder_parts (and keep the "
                                f"class's forward on the instance)")
            parts = _PARTS_REGISTRY[cls](model)
            break
    else:
        known = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in _PARTS_REGISTRY)
        raise TypeError(f"model: unsupported model class {type(model).__module__}."
                        f"{type(model).__qualname__}; expected one of ({known}) or a class taught "
                        f"with palm_fast.generation.register_decoder_parts")
    if not isinstance(parts, DecoderParts):
        raise TypeError(f"model: the decoder_parts entry for {type(model).__qualname__} returned "
                        f"{type(parts).__name__}, expected DecoderParts")
    return parts


# --------------------------------------------------------------------------- prepared layers

@dataclass
class _Layer:
    """One block's weights and shapes, read once per generate() call."""

    norm: Callable[[torch.Tensor], torch.Tensor]
    w_in: torch.Tensor           # [P, d], P = H hd + 2 hd + 2F
    splits: tuple[int, ...]      # (H hd, hd, hd, 2F)
    n_heads: int
    head_dim: int
    rotary_dim: int
    rope_base: float
    interleaved: bool
    act: Callable[[torch.Tensor], torch.Tensor]
    w_attn_out: torch.Tensor     # [d, H hd]
    w_ff_out: torch.Tensor       # [d, F]
    fused: nn.Module | None = None  # a palm_fast.nn.ParallelBlock: prefill on its fused path


_LAYER_NORMS: tuple[type, ...] = (_ref.LayerNorm,)
_SWIGLUS: tuple[type, ...] = (_ref.SwiGLU,)


def _hooked(mod) -> bool:
    """Whether calling ``mod`` would run forward hooks (generate's kernels would skip them):
    its own, those of a module a ``torch.compile`` wrapper holds (each level), or hooks for
    every module (``register_module_forward_hook``)."""
    if not isinstance(mod, nn.Module):
        return False
    g = _torch_module
    if g._global_forward_hooks or g._global_forward_pre_hooks:
        return True
    while not (mod._forward_hooks or mod._forward_pre_hooks):
        if mod is unwrap_compiled(mod):
            return False
        mod = mod._orig_mod
    return True


def _code_changed(mod) -> str | None:
    """What of ``mod``'s code is not its class's as written, if anything: a method set on the
    instance (``block.get_mask = f``, a LoRA by forward assignment) or a method of its class
    replaced at run time (``SwiGLU.forward = geglu``). generate would not run it if it took
    the module apart."""
    if not isinstance(mod, nn.Module):
        return None
    over = instance_override(mod, recurse=False)
    if over is not None:
        return f"its own {over[1]!r} set on the instance"
    changed = methods_replaced(type(unwrap_compiled(mod)))
    if changed:
        return f"{', '.join(changed)} replaced at run time"
    return None


def _fast_norm(mod: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``palm_fast.ops.layer_norm`` with the module's weight / bias / eps when it is one of
    our LayerNorms (that exact class, no hooks; a patched PaLM-pytorch one too); otherwise
    the module itself (a subclass or a hooked norm runs its own forward, hooks included)."""
    from .integrations import palm_pytorch as pp_fast
    from .nn import LayerNorm as FastLayerNorm

    kind = type(mod)
    if kind in (*_LAYER_NORMS, FastLayerNorm, pp_fast.LayerNorm) and not _hooked(mod) \
            and _code_changed(mod) is None:
        if kind is pp_fast.LayerNorm:   # (a patched PaLM-pytorch norm: gamma, beta, its eps)
            w, b, eps = mod.gamma, mod.beta, pp_fast.EPS
        else:
            w, b, eps = mod.weight, mod.bias, mod.eps

        def norm(x):
            return ops.layer_norm(x, w, b, eps)

        norm._palm_fast_ln = (w, b, float(eps))   # _CpuStep calls the kernel directly
        return norm
    return mod


def _fast_act(mod: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``palm_fast.ops.swiglu`` for our SwiGLU modules (that exact class, no hooks), else
    the module itself."""
    from .nn import SwiGLU as FastSwiGLU

    if type(mod) in (*_SWIGLUS, FastSwiGLU) and not _hooked(mod) and _code_changed(mod) is None:
        return ops.swiglu
    return mod


def _fused_block(blk: nn.Module) -> nn.Module | None:
    """``blk`` when it is a fast ``palm_fast.nn.ParallelBlock`` whose fused functional path
    (LayerNorm + input GEMM + RoPE/SwiGLU epilogue; output GEMM + residual) applies."""
    from .nn import ParallelBlock as FastBlock

    if type(blk) is FastBlock and blk.n_kv_heads == 1 and blk.parts_fusable() and all(
            _code_changed(p) is None for p in (blk.norm, blk.act, blk.rotary)):
        return blk   # (a part whose class code changed: the checked per-part path, which calls it)
    return None


def _not_bypassed(where: str, mod, methods: bool = True) -> None:
    """generate reads a module's weights or attributes and never calls it: refuse one with
    forward hooks or (``methods``) code of its own (see :func:`_code_changed`): they would
    silently not run."""
    if _hooked(mod):
        raise ValueError(f"model: {where} has forward hooks, which generate would not run (it "
                         f"reads the weights and runs its own kernels); remove them, or use the "
                         f"model's own generate()")
    why = _code_changed(mod) if methods else None
    if why is not None:
        raise ValueError(f"model: {where} has {why}, which generate would not run (it reads the "
                         f"weights and runs its own kernels); use the model's own generate()")


def _plain_linear(mod) -> bool:
    """An ``nn.Linear`` whose forward is ``F.linear(x, weight, bias)``: that class, or the class
    a parametrization (``weight_norm``, ...) makes of it (its ``.weight`` is computed)."""
    cls = type(mod)
    return cls is nn.Linear or (cls.__bases__ == (nn.Linear,) and parametrize.is_parametrized(mod))


def _linear_weight(block_name: str, name: str, mod) -> torch.Tensor:
    if not _plain_linear(mod) or mod.bias is not None:
        raise ValueError(f"model: {block_name}.{name}: expected a bias-free nn.Linear (that class, or "
                         f"it parametrized: generate multiplies by its weight), got {mod!r}")
    _not_bypassed(f"{block_name}.{name}", mod)
    return mod.weight


# Rotary modules whose function generate's fused RoPE reproduces from (rotary_dim, base,
# interleaved); integrations add theirs.
_ROTARIES: tuple[type, ...] = (_ref.RotaryEmbedding,)


def _gemm_weight(w: torch.Tensor) -> torch.Tensor:
    """A weight as generate's GEMMs take it: on the CPU row-major, copied once per generate
    call if it is not (``small_mm_cpu`` reads row-major weights: a column-major one, e.g.
    loaded as ``kernel.T``, was copied in every decode step, 4x slower at palm-small);
    elsewhere as it is (cuBLAS reads either layout, and a copy would double its memory)."""
    return w.contiguous() if w.is_cpu else w


def _prepare_layers(parts: DecoderParts) -> list[_Layer]:
    """Check every block's layout and collect what the loops need."""
    from .nn import ParallelBlock as FastBlock
    from .nn import RotaryEmbedding as FastRotary

    d = parts.head_weight.shape[1]
    layers = []
    for i, blk in enumerate(parts.blocks):
        where = f"blocks[{i}]"
        missing = [a for a in ("norm", "in_proj", "split_sizes", "rotary", "act", "attn_out", "ff_out",
                               "n_heads", "head_dim") if not hasattr(blk, a)]
        if missing:
            raise ValueError(f"model: {where} ({type(blk).__qualname__}) lacks the ParallelBlock "
                             f"attributes {missing}")
        H, hd = int(blk.n_heads), int(blk.head_dim)
        splits = tuple(int(s) for s in blk.split_sizes)
        if len(splits) != 4 or splits[:3] != (H * hd, hd, hd):
            raise ValueError(f"model: {where}.split_sizes: expected ({H * hd}, {hd}, {hd}, 2F) "
                             f"(q | one shared k head | one v head | ff), got {splits}")
        w_in = _linear_weight(where, "in_proj", blk.in_proj)
        w_ao = _linear_weight(where, "attn_out", blk.attn_out)
        w_ff = _linear_weight(where, "ff_out", blk.ff_out)
        if tuple(w_in.shape) != (sum(splits), d):
            raise ValueError(f"model: {where}.in_proj.weight: expected shape {(sum(splits), d)}, "
                             f"got {tuple(w_in.shape)}")
        _not_bypassed(where, blk)
        inner = unwrap_compiled(blk)
        if isinstance(inner, _ref.ParallelBlock) and type(inner).forward not in (
                _ref.ParallelBlock.forward, FastBlock.forward):
            raise ValueError(f"model: {where} ({type(inner).__qualname__}) has a forward of its own, "
                             f"which generate would not run (it reads the weights and runs its own "
                             f"kernels); use the model's own generate()")
        rot = blk.rotary
        if isinstance(rot, nn.Module) and type(rot) not in (*_ROTARIES, FastRotary):
            raise ValueError(f"model: {where}.rotary: expected a RotaryEmbedding (that class: generate "
                             f"computes RoPE from its rotary_dim / base), got {type(rot).__qualname__}")
        _not_bypassed(f"{where}.rotary", rot)
        rd = int(getattr(rot, "rotary_dim", hd))
        base = float(getattr(rot, "base", 10000.0))
        inv = getattr(rot, "inv_freq", None)
        if inv is not None:
            # rope_append computes inv_freq from (rotary_dim, base): the buffer must agree.
            want = _ref_fn.rope_inv_freq(rd, base, device=inv.device)
            if inv.shape != want.shape or not torch.allclose(inv.float(), want, rtol=1e-6, atol=0):
                raise ValueError(f"model: {where}.rotary.inv_freq differs from 1 / base^(2i / "
                                 f"rotary_dim) with rotary_dim={rd}, base={base}; generate's "
                                 f"fused RoPE only supports that standard table (a table rounded "
                                 f"to fp16 / bf16, e.g. loaded from a half-precision checkpoint, "
                                 f"differs too: restore it with {where}.rotary.inv_freq.copy_("
                                 f"palm_fast.reference.functional.rope_inv_freq({rd}, {base})))")
        layers.append(_Layer(
            norm=_fast_norm(blk.norm), w_in=_gemm_weight(w_in), splits=splits, n_heads=H,
            head_dim=hd, rotary_dim=rd, rope_base=base,
            interleaved=bool(getattr(rot, "interleaved", False)), act=_fast_act(blk.act),
            w_attn_out=_gemm_weight(w_ao), w_ff_out=_gemm_weight(w_ff), fused=_fused_block(blk)))
    if not layers:
        raise ValueError("model: expected at least one block, got none")
    if len({(lay.head_dim) for lay in layers}) != 1:
        raise ValueError("model: every block must have the same head_dim (one KV cache)")
    return layers


# --------------------------------------------------------------------------- the forward pieces

def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal multi-query attention over the prompt: q ``[B, T, H, hd]``, k and v
    ``[B, T, hd]`` (already rotated) -> o ``[B, T, H, hd]``, scale ``hd ** -0.5``."""
    return ops.causal_mqa_attention(q, k, v)


def _prefill_fused(lay: _Layer, x: torch.Tensor, positions: torch.Tensor, cache, i: int,
                   lengths: torch.Tensor) -> torch.Tensor:
    """One fast block over the prompt on its fused functional path (``palm_fast.ops.block``)."""
    from .ops.block import fused_input_projection, fused_output_projection

    blk = lay.fused
    B, T, _ = x.shape
    q, k, v, h = fused_input_projection(
        x, blk.norm.weight, lay.w_in, blk.rotary.inv_freq, positions, n_heads=lay.n_heads,
        n_kv_heads=1, head_dim=lay.head_dim, d_ff=lay.splits[3] // 2, eps=blk.norm.eps,
        interleaved=lay.interleaved, packed=blk._packed_in_proj())   # the block's cached re-layout
    k, v = k.view(B, T, lay.head_dim), v.view(B, T, lay.head_dim)
    cache.append(i, k, v, n_new=lengths)
    o = _prefill_attention(q, k, v)
    return fused_output_projection(o, h, x, lay.w_attn_out, lay.w_ff_out)


# CPU GEMMs with few rows (decode steps) run ``palm_fast._C.small_mm_cpu``: one stream over
# the weight (the bytes that matter), blocks of 12 weight rows dotted with the x rows four at
# a time (the last M % 4 in pairs or alone) across the cores; fp16 / bf16 weights are widened
# in registers. Measured when it dotted pairs of x rows, at 4 rows (palm-small shapes, 2
# threads): 1.1-2.5x faster per GEMM than BLAS computing ``x W^T`` as ``(W x^T)^T`` (itself
# 1.2-2.3x faster than ``x W^T`` there), the 8192-row output head about equal; the fours
# since are 0.7-1.0x that time (benchmarks/results/cpu/NOTES.md, twenty-first section).
_SMALL_ROWS = 16


def _small_cpu(x: torch.Tensor) -> bool:
    return x.is_cpu and x.shape[0] <= _SMALL_ROWS


def _small_mm(x: torch.Tensor, w: torch.Tensor, res: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T (+ res)`` on the CPU for few rows (see ``_SMALL_ROWS``), contiguous ``[M, N]``.
    (generate's weights are row-major already, :func:`_gemm_weight`: no copy per step.)"""
    return _cpp().small_mm_cpu(x, w.contiguous(), res)


def _mm_wt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x W^T`` for 2-D x ``[M, K]``, w ``[N, K]`` -> contiguous ``[M, N]``."""
    if _small_cpu(x):
        return _small_mm(x, w)
    return F.linear(x, w)


def _residual(x: torch.Tensor, lay: _Layer, o: torch.Tensor, ff: torch.Tensor) -> torch.Tensor:
    """``x + o W_ao^T + swiglu(ff) W_ff^T`` on 2-D rows (two addmm, no separate adds)."""
    return _residual_act(x, lay, o, lay.act(ff))


def _residual_act(x: torch.Tensor, lay: _Layer, o: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``x + o W_ao^T + a W_ff^T`` (``a``: the activation output)."""
    if _small_cpu(x):   # as in _mm_wt
        return _small_mm(a, lay.w_ff_out, _small_mm(o, lay.w_attn_out, x))
    y = torch.addmm(x, o, lay.w_attn_out.t())
    return torch.addmm(y, a, lay.w_ff_out.t())


def _logits(parts: DecoderParts, final_norm, h: torch.Tensor) -> torch.Tensor:
    """h ``[B, d]`` -> ``norm(h) W^T (* scale)`` ``[B, V]`` (on the CPU with few rows by
    :func:`_small_mm`, as in :func:`_mm_wt`)."""
    hn = final_norm(h)
    if _small_cpu(hn):
        logits = _small_mm(hn, parts.head_weight)
    else:
        logits = hn @ parts.head_weight.t()
    if parts.logit_scale is not None:
        logits = logits * parts.logit_scale
    return logits


def _prefill(parts: DecoderParts, layers: list[_Layer], final_norm, cache, tokens: torch.Tensor,
             lengths: torch.Tensor) -> torch.Tensor:
    """tokens ``[B, T]`` (right-padded), lengths ``[B]`` int32 -> logits ``[B, V]`` at each
    prompt's last real token; the prompts' keys and values are written into ``cache``."""
    B, T = tokens.shape
    x = parts.embed(tokens)                                             # [B, T, d]
    d = x.shape[-1]
    positions = torch.arange(T, device=x.device).expand(B, T)
    for i, lay in enumerate(layers):
        if lay.fused is not None:
            x = _prefill_fused(lay, x, positions, cache, i, lengths)
            continue
        H, hd = lay.n_heads, lay.head_dim
        proj = F.linear(lay.norm(x), lay.w_in)
        q, k, v, ff = proj.split(lay.splits, dim=-1)
        q, k = ops.rope(q.view(B, T, H, hd), k.view(B, T, 1, hd), rotary_dim=lay.rotary_dim,
                        base=lay.rope_base, interleaved=lay.interleaved)
        k = k.view(B, T, hd)
        v = v.reshape(B, T, hd)
        cache.append(i, k, v, n_new=lengths)
        o = _prefill_attention(q, k, v)
        x = _residual(x.reshape(B * T, d), lay, o.reshape(B * T, H * hd),
                      ff.reshape(B * T, -1)).reshape(B, T, d)
    cache.advance(lengths)
    last = x[torch.arange(B, device=x.device), lengths.long() - 1]        # [B, d]
    return _logits(parts, final_norm, last)


def _decode_step(parts: DecoderParts, layers: list[_Layer], final_norm, cache,
                 tokens: torch.Tensor) -> torch.Tensor:
    """One token per sequence: tokens ``[B]`` -> logits ``[B, V]``.

    The token of sequence b sits at position ``cache.lengths[b]``; its k and v are written
    there and attention reads ``[0, lengths[b] + 1)``. Does not advance the cache (the
    caller does, once all layers appended). Reads positions from the device tensor
    ``cache.lengths`` only: no host synchronisation (CUDA-graph safe).
    """
    B = tokens.shape[0]
    seq_lens = cache.lengths + 1
    x = parts.embed(tokens)                                            # [B, d]
    for i, lay in enumerate(layers):
        H, hd = lay.n_heads, lay.head_dim
        proj = _mm_wt(lay.norm(x), lay.w_in)
        q, k, v, ff = proj.split_with_sizes(lay.splits, dim=-1)
        # positions default to lengths[b] (read on the device by the kernel)
        q = ops.rope_append(q.view(B, 1, H, hd), k.view(B, 1, hd), v.reshape(B, 1, hd), cache, i,
                            rotary_dim=lay.rotary_dim, base=lay.rope_base, interleaved=lay.interleaved)
        o = ops.mqa_decode(q.view(B, H, hd), cache, i, seq_lens)
        x = _residual(x, lay, o.reshape(B, H * hd), ff)
    return _logits(parts, final_norm, x)


class _CpuStep:
    """The decode step on the CPU, calling the C++ kernels directly.

    Per token the checked step (:func:`_decode_step`) spends more time in Python than in
    its kernels at small batch: every public op re-validates arguments that cannot change
    during one ``generate`` call (weights, shapes, dtypes, the cache) and goes through
    ``autograd.Function``. This step computes exactly the same thing with the same kernels
    (LayerNorm, input GEMM, ``rope_append``, ``mqa_decode``, SwiGLU, output GEMMs, head),
    bitwise equal, but calls ``palm_fast._C`` directly. It is only used after one checked
    step has run with the same model and cache (``generate`` runs the first decode step
    through :func:`_decode_step`), and the cache has every page the later steps write
    already reserved; the C++ kernels keep their memory-safety guards. Norms / activations
    that are not ours are called as modules.
    """

    def __init__(self, parts: DecoderParts, layers: list[_Layer], cache):
        from ._ext import cpp
        from .ops.rope import _cached_inv_freq

        self.C = cpp()
        self.parts, self.layers, self.cache = parts, layers, cache
        self.norms = [self._norm(lay.norm) for lay in layers]
        self.final_norm = self._norm(_fast_norm(parts.norm))
        self.acts = [lay.act for lay in layers]
        self.swiglu = [lay.act is ops.swiglu for lay in layers]
        self.inv_freq = [_cached_inv_freq(lay.rotary_dim, float(lay.rope_base), cache.device)
                         for lay in layers]
        self.scale = [lay.head_dim ** -0.5 for lay in layers]
        self.ones = cache.full_n_new(1)
        emb = parts.embed
        # a plain nn.Embedding (no hooks, no code of its own, no max_norm, which renormalises
        # the weight in place): its lookup without the module call (8 us a step)
        self.embed = emb
        if type(emb) is nn.Embedding and emb.max_norm is None and not _hooked(emb) \
                and _code_changed(emb) is None:
            w = emb.weight
            self.embed = lambda t: torch.embedding(w, t)

    def _norm(self, fn):
        """A direct LayerNorm for our LayerNorm closures (see :func:`_fast_norm`), else fn."""
        mod = getattr(fn, "_palm_fast_ln", None)
        if mod is None:
            return fn
        w, b, eps = mod
        C = self.C
        return lambda x: C.layer_norm_fwd(x, w, b, eps)[0]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        C, cache = self.C, self.cache
        B = tokens.shape[0]
        seq_lens = cache.lengths + 1
        pt = cache.page_table
        x = self.embed(tokens)                                             # [B, d]
        for i, lay in enumerate(self.layers):
            H, hd = lay.n_heads, lay.head_dim
            proj = _mm_wt(self.norms[i](x), lay.w_in)
            q, k, v, ff = proj.split_with_sizes(lay.splits, dim=-1)
            q_rot = torch.empty((B, 1, H, hd), dtype=proj.dtype, device=proj.device)
            C.rope_append_cpu(q.view(B, 1, H, hd), k.view(B, 1, hd), v.view(B, 1, hd), cache.k, cache.v,
                              pt, cache.lengths, self.ones, None, self.inv_freq[i], q_rot, i,
                              lay.interleaved)
            o = C.mqa_decode_cpu(q_rot.view(B, H, hd), cache.k, cache.v, pt, None, seq_lens, i,
                                 self.scale[i], False)[0]
            a = C.swiglu_fwd(ff) if self.swiglu[i] else self.acts[i](ff)
            x = _residual_act(x, lay, o.view(B, H * hd), a)
        return _logits(self.parts, self.final_norm, x)


class _GraphedStep:
    """The decode step captured once in a CUDA graph and replayed per token.

    Static input ``tokens`` ``[B]``; static output ``logits`` ``[B, V]``. The step reads its
    positions from ``cache.lengths`` (a device tensor advanced in place between replays), so
    one capture serves every step. The warm-up runs the step for real (it writes k / v at the
    current positions, which the first replay overwrites with the same values); the capture
    only records its kernels.
    """

    def __init__(self, step: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor):
        self.tokens = tokens.clone()
        # Streams, the capture and the replays on the model's device (torch.cuda.Stream()
        # and torch.cuda.graph take the current one, which may be another).
        with launch_device(tokens.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):          # warm-up: lazy init, autotuning, allocator
                    step(self.tokens)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = step(self.tokens)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        with launch_device(tokens.device):
            self.graph.replay()
        return self.logits


# --------------------------------------------------------------------------- sampling


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits ``[B, V]`` -> token ids ``[B]`` (int64).

    temperature 0: argmax (top_k / top_p ignored). Otherwise sample from
    ``softmax((logits - max) / temperature)`` (= ``softmax(logits / temperature)``, finite for
    any temperature > 0) over the ``top_k`` largest logits (ties at the k-th value kept) and,
    with ``top_p``, over the smallest prefix of tokens sorted by probability whose mass
    reaches ``top_p`` (the most likely token is always kept; tokens tied with the prefix's
    last one are kept too).
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    if top_k is not None:  # on the logits as given: the shift below can round two into a tie
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # Shifted by the row maximum (which the mask keeps) before the division: the same
    # softmax, and finite for any temperature > 0 (logits / 1e-40 overflowed to inf and the
    # softmax to NaN; a tiny temperature now samples among the maximal logits). Below fp32's
    # smallest normal number the temperature is taken as that number.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, FP32_TINY)
    if top_p is not None and top_p < 1.0:
        sorted_logits = logits.sort(dim=-1, descending=True).values
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # The smallest logit of the kept prefix; every token at or above it stays, so tokens
        # tied at the cut are all kept, as with top_k (masking by sorted position kept the
        # lower token ids of a tie, by the sort's order)
        drop = mass_before >= top_p
        # The most likely token always stays: a top_p below fp32's smallest subnormal compared
        # as 0.0 here and dropped every token (the softmax of all -inf: NaN, and multinomial
        # raised); the rule keeps it for any top_p > 0.
        drop[:, 0] = False
        cut = sorted_logits.masked_fill(drop, float("inf")).amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < cut, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


# --------------------------------------------------------------------------- arguments

def _int_arg(name: str, x, lo: int, hi: int | None = None, none_ok: bool = False) -> int | None:
    """``x`` as an int in ``[lo, hi]``: TypeError for a non-integer, ValueError out of range."""
    if x is None and none_ok:
        return None
    want = f"{'None or ' if none_ok else ''}an int " + (f">= {lo}" if hi is None else f"in [{lo}, {hi}]")
    if not is_int(x):
        raise TypeError(f"{name}: expected {want}, got {type(x).__name__} {x!r}")
    if x < lo or (hi is not None and x > hi):
        raise ValueError(f"{name}: expected {want}, got {x!r}")
    return int(x)


def _prompt_list(prompts, vocab: int, device: torch.device) -> list[torch.Tensor]:
    """prompts (a [B, T] tensor or a sequence of 1-D tensors / int lists) -> 1-D int64
    tensors on ``device``, checked."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompts: expected a [B, T] integer tensor or a list of 1-D prompts, "
                             f"got a tensor of shape {tuple(prompts.shape)}")
        rows = list(prompts.unbind(0))
    elif isinstance(prompts, (list, tuple)):
        rows = list(prompts)
    else:
        raise TypeError(f"prompts: expected a [B, T] integer tensor or a list of 1-D prompts "
                        f"(tensors or int lists), got {type(prompts).__name__}")
    if not rows:
        raise ValueError("prompts: expected at least one prompt, got none")
    out = []
    for b, p in enumerate(rows):
        name = f"prompts[{b}]"
        if isinstance(p, torch.Tensor):
            if p.dim() != 1:
                raise ValueError(f"{name}: expected a 1-D tensor of token ids, got shape {tuple(p.shape)}")
            if p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
                raise TypeError(f"{name}: expected an integer dtype, got {p.dtype}")
        elif isinstance(p, (list, tuple)):
            if not all(is_int(t) for t in p):
                bad = next(t for t in p if not is_int(t))
                raise TypeError(f"{name}: expected a list of int token ids, got an element {bad!r}")
            try:
                p = torch.tensor(p, dtype=torch.int64, device="cpu")
            except (OverflowError, RuntimeError, ValueError):   # beyond int64
                bad = next(t for t in p if not -2**63 <= int(t) < 2**63)
                raise ValueError(f"{name}: token ids must lie in [0, {vocab}), got {bad}") from None
        else:
            hint = " (one prompt as a list of ints: pass [[...]])" if is_int(p) else ""
            raise TypeError(f"{name}: expected a 1-D tensor or a list of ints, got "
                            f"{type(p).__name__}{hint}")
        if p.is_meta:
            raise ValueError(f"{name}: expected token ids with values, got a tensor on the meta device")
        if p.numel() == 0:
            raise ValueError(f"{name}: expected at least one token, got an empty prompt")
        lo, hi = int(p.min()), int(p.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name}: token ids must lie in [0, {vocab}), got range [{lo}, {hi}]")
        out.append(p.to(device=device, dtype=torch.int64))
    return out


def _check_options(max_new_tokens, temperature, top_k, top_p, stop_tokens, generator, page_size,
                   cuda_graph, vocab: int, device: torch.device) -> tuple:
    """(temperature, stop token set, max_new_tokens, top_k, page_size) as Python values."""
    ints = (_int_arg("max_new_tokens", max_new_tokens, 0), _int_arg("top_k", top_k, 1, vocab, none_ok=True),
            _int_arg("page_size", page_size, 1, none_ok=True))
    temperature = check_float("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"temperature: expected a finite float >= 0, got {temperature!r}")
    if top_p is not None and not 0 < check_float("top_p", top_p) <= 1:
        raise ValueError(f"top_p: expected None or a float in (0, 1], got {top_p!r}")
    if stop_tokens is None:
        stops: set[int] = set()
    else:
        items = [stop_tokens] if is_int(stop_tokens) else stop_tokens
        if isinstance(items, torch.Tensor):
            items = items.flatten().tolist()
        try:
            items = list(items)
        except TypeError:
            raise TypeError(f"stop_tokens: expected None, an int or a sequence of ints, "
                            f"got {type(stop_tokens).__name__}") from None
        if any(not is_int(t) for t in items):
            raise TypeError(f"stop_tokens: expected None, an int or a sequence of ints, got "
                            f"{[t for t in items if not is_int(t)]}")
        bad = [t for t in items if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"stop_tokens: expected token ids in [0, {vocab}), got {bad}")
        stops = {int(t) for t in items}
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected None or a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator: expected a generator on the model's device type "
                             f"{device.type!r}, got one on {generator.device}")
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph: expected None (auto), True or False, got {cuda_graph!r}")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph: True needs a model on a CUDA device, the model is on {device}")
    return (temperature, stops) + ints


# --------------------------------------------------------------------------- generate

@torch.no_grad()   # not inference_mode: cache tensors keep version counters (mqa_decode
                   # then validates seq_lens once per step instead of once per layer)
def generate(model: nn.Module, prompts, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop_tokens=None,
             generator: torch.Generator | None = None, page_size: int | None = None,
             cuda_graph: bool | None = None) -> list[torch.Tensor]:
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    model:        ``palm_fast.reference.PaLM``, ``palm_fast.nn.PaLM``, or a model taught to
                  :func:`decoder_parts` (a patched PaLM-pytorch model); also one of these
                  wrapped by ``torch.compile`` (its module is used). A subclass (or instance)
                  with its own ``forward`` raises TypeError unless registered.
    prompts:      a ``[B, T]`` integer tensor, or a list of 1-D integer tensors / int lists of
                  any (different) lengths >= 1.
    temperature:  0 = greedy; otherwise sample, restricted by ``top_k`` / ``top_p`` (see
                  :func:`sample`) with ``generator`` (on the model's device type) when given.
    stop_tokens:  an int or a collection of ints: a sequence ends at its first generated stop
                  token (included in its output).
    page_size:    None: contiguous KV cache; an int: paged cache with pages of that many tokens
                  (at most the longest prompt + max_new_tokens: a larger one is cut to that).
    cuda_graph:   capture the decode step in a CUDA graph (None: when the model is on CUDA).

    Returns one 1-D int64 tensor per prompt on the model's device: the prompt followed by its
    new tokens. Raises TypeError / ValueError naming the argument for bad input.
    """
    from .kv_cache import KVCache

    parts = decoder_parts(model)   # (unwraps torch.compile; the wrapper forwards .config)
    # hooks on the model (or on a torch.compile wrapper of it); its forward: decoder_parts,
    # and here a forward replaced on the registered class itself (which forward_replaced,
    # comparing with that class's forward, cannot see)
    _not_bypassed("the model", model, methods=False)
    replaced = [n for n in methods_replaced(type(unwrap_compiled(model))) if n.endswith(".forward")]
    if replaced:
        raise ValueError(f"model: {', '.join(replaced)} replaced at run time, which generate would "
                         f"not run (it reads the weights and runs its own kernels); use the "
                         f"model's own generate()")
    layers = _prepare_layers(parts)
    parts = replace(parts, head_weight=_gemm_weight(parts.head_weight))   # (the tied head too)
    head = parts.head_weight
    device, dtype = head.device, head.dtype
    vocab = head.shape[0]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"model: generate's kernels and KV cache take float32, float16 or bfloat16 "
                        f"weights, the model's are {dtype} (use the model's own generate(), or "
                        f"convert it with .float())")
    if torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) != dtype:
        raise ValueError(f"generate runs in the model's dtype ({dtype}); torch.autocast "
                         f"({torch.get_autocast_dtype(device.type)}) is on and would mix dtypes: "
                         f"call generate outside autocast, or convert the model with "
                         f".to({torch.get_autocast_dtype(device.type)})")
    temperature, stops, max_new_tokens, top_k, page_size = _check_options(
        max_new_tokens, temperature, top_k, top_p, stop_tokens, generator, page_size, cuda_graph,
        vocab, device)
    rows = _prompt_list(prompts, vocab, device)
    lens = [int(p.numel()) for p in rows]
    B, T = len(rows), max(lens)
    max_len = T + max_new_tokens
    config = getattr(model, "config", None)
    limit = getattr(config, "max_seq_len", None)
    if limit is not None and max_len > limit:
        if T > limit:   # a prompt alone is too long: name it, not max_new_tokens
            b = lens.index(T)
            raise ValueError(f"prompts[{b}]: {T} tokens exceed the model's max_seq_len {limit}")
        raise ValueError(f"max_new_tokens: the longest prompt ({T} tokens) + {max_new_tokens} new "
                         f"tokens exceeds the model's max_seq_len {limit}")
    if max_new_tokens == 0:
        return [p.clone() for p in rows]
    use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph

    tokens = torch.zeros(B, T, dtype=torch.int64, device=device)
    for b, p in enumerate(rows):
        tokens[b, : lens[b]] = p
    lengths = torch.tensor(lens, dtype=torch.int32, device=device)
    if page_size is not None:
        page_size = min(page_size, max_len)   # (a larger page would only hold unused slots)
    cache = KVCache(len(layers), B, max_len, layers[0].head_dim, dtype=dtype, device=device,
                    page_size=page_size)
    final_norm = _fast_norm(parts.norm)

    def step(tok: torch.Tensor) -> torch.Tensor:
        return _decode_step(parts, layers, final_norm, cache, tok)

    logits = _prefill(parts, layers, final_norm, cache, tokens, lengths)
    # every page the decode steps will write, allocated now: no allocation inside a step
    cache.reserve(max_new_tokens - 1)
    new = torch.empty(B, max_new_tokens, dtype=torch.int64, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stop_ids = torch.tensor(sorted(stops), dtype=torch.int64, device=device) if stops else None
    graphed = None
    # CPU: the first step runs the checked ops, the later ones the same kernels directly
    direct = _CpuStep(parts, layers, cache) if device.type == "cpu" else None
    # NaN / +inf logits (a broken model): flagged on the device (no per-step sync), those rows
    # sampled from zeros meanwhile (torch.multinomial on NaN fails, on a GPU as a device-side
    # assert), and an error at the end rather than tokens picked from NaN
    broken = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for n in range(1, max_new_tokens + 1):
        if temperature == 0:   # argmax picks a NaN if the row has one: its logit tells (B reads)
            nxt = sample(logits, temperature, top_k, top_p, generator)
            broken |= logits.gather(1, nxt[:, None])[:, 0].isnan()   # (+inf: a fine choice)
        else:                  # sampling: NaN or +inf leave no distribution (amax keeps NaN)
            bad = ~(logits.amax(dim=-1) < float("inf"))
            broken |= bad
            nxt = sample(torch.where(bad[:, None], 0.0, logits.float()), temperature, top_k, top_p,
                         generator)
        new[:, n - 1] = nxt
        if stop_ids is not None:
            done |= torch.isin(nxt, stop_ids)
            # one host sync per step on CPU (free); every 8 steps on GPU
            if (device.type == "cpu" or n % 8 == 0) and bool(done.all()):
                break
        if n == max_new_tokens:
            break
        if use_graph:
            if graphed is None:
                graphed = _GraphedStep(step, nxt)
            logits = graphed(nxt)
        elif direct is not None and n > 1:
            logits = direct(nxt)
        else:
            logits = step(nxt)
        cache.advance(1)
    if bool(broken.any()):
        raise ValueError(f"model: its logits were NaN (or +inf, sampling) for sequences "
                         f"{broken.nonzero().flatten().tolist()}: no token can be chosen from them "
                         f"(check the weights and inputs; the reference generate() would return "
                         f"arbitrary tokens)")
    return _assemble(rows, new[:, :n].cpu(), stops)


def _assemble(rows: list[torch.Tensor], new: torch.Tensor, stops: set[int]) -> list[torch.Tensor]:
    """prompt + new tokens per sequence, each cut after its first stop token."""
    out = []
    for b, p in enumerate(rows):
        gen = new[b]
        if stops:
            stop_ids = torch.tensor(sorted(stops), dtype=gen.dtype, device=gen.device)
            hits = torch.isin(gen, stop_ids).nonzero()
            if hits.numel():
                gen = gen[: int(hits[0, 0]) + 1]
        out.append(torch.cat((p, gen.to(p.device))))
    return out
