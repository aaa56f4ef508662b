"""Fast ``ParallelBlock``: the reference PaLM block (same constructor, parameters, buffers and
state_dict) whose forward runs the fused functional block of ``palm_fast.ops.block``.

The CUDA input GEMM reads ``in_proj.weight`` re-laid out in RoPE / SwiGLU partner pairs
(``kernels.projection.pack_in_proj``). The re-layout is built once and cached on the module
(not a buffer: the state_dict keeps the reference layout); it is rebuilt when the weight
changes (new storage, or an in-place update, which bumps the tensor's version counter),
after every ``torch.optim`` optimizer step (a fused step, ``AdamW(fused=True)``, updates in
place without bumping the counter: a global step hook counts steps), or when dtype, device
or the rotary frequencies or layout change. A weight that is a slice of a larger buffer
(``vector_to_parameters``) is re-laid out on every call. A write through ``.data``, or through
another tensor on the weight's memory (numpy, DLPack), bypasses the version counter, as do
``torch.distributed`` collectives and receives into a weight (``dist.broadcast``,
``all_reduce``, ``recv``), and so may an optimizer outside ``torch.optim``: call
``palm_fast.nn.refresh_caches(model)`` after one.
The cached copy costs the weight's memory again; ``palm_fast.nn.set_weight_cache(model,
False)`` re-lays it out per call instead, and pickles / deep copies leave it behind.
"""
from __future__ import annotations

import torch

from palm_fast.ops import _dispatch
from palm_fast.ops._checks import as_fp32
from palm_fast.ops._dispatch import _autocast_on, autocast_changes_dtype, compiling, parts_hooked
from palm_fast.ops.block import (
    fsdp_managed,
    optimizer_in_step,
    optimizer_steps,
    pack_in_proj,
    parallel_block,
    same_key,
    tensor_key,
    uses_triton,
    versioned,
)
from palm_fast.reference import layers as _reference

from .layer_norm import LayerNorm
from .rope import RotaryEmbedding
from .swiglu import SwiGLU

__all__ = ["ParallelBlock"]

# The parts' forwards as defined: a class-level replacement later (``SwiGLU.forward = geglu``)
# makes the block run its parts (identity checks: this runs on every forward)
_PART_FORWARDS = (LayerNorm.forward, SwiGLU.forward, RotaryEmbedding.forward)

RECOMPUTE = ("none", "attention", "full")


class ParallelBlock(_reference.ParallelBlock):
    """``y = x + attn_out(Attn(h)) + ff_out(swiglu(h Wff))``, ``h = norm(x)``, fused.

    Same ``__init__`` arguments as :class:`palm_fast.reference.ParallelBlock`, plus
    ``recompute`` ("none" | "attention" | "full"): activation recomputation in training
    (``torch.utils.checkpoint``: the attention forward, or the whole block).
    ``forward(x [B, T, dim], positions=None, cache=None) -> [B, T, dim]`` with the
    reference semantics (a reference ``KVCache`` works). Inside a ``torch.autocast`` region
    for x's device, when x or a weight is not in autocast's dtype, the block runs its parts
    one by one (fast LayerNorm, RoPE, SwiGLU; autocast's GEMMs), as the reference block does
    there, instead of the fused kernels.
    """

    def __init__(self, dim: int, n_heads: int, head_dim: int, d_ff: int, n_kv_heads: int = 1,
                 eps: float = 1e-5, rotary_dim: int | None = None, rope_base: float = 10000.0,
                 interleaved: bool = False, *, recompute: str = "none"):
        super().__init__(dim, n_heads, head_dim, d_ff, n_kv_heads, eps, rotary_dim, rope_base,
                         interleaved)
        w = self.norm.weight   # (float64 under torch.set_default_dtype: built, refused in forward)
        self.norm = LayerNorm(dim, eps, device=w.device).to(w.dtype)
        inv_freq = self.rotary.inv_freq
        self.rotary = RotaryEmbedding(self.rotary.rotary_dim, rope_base, interleaved)
        self.rotary.inv_freq = inv_freq
        self.act = SwiGLU()
        self.recompute = recompute
        self._packed = None
        self._packed_key = None

    @property
    def recompute(self) -> str:
        return self._recompute

    @recompute.setter
    def recompute(self, value: str) -> None:
        if value not in RECOMPUTE:
            raise ValueError(f"recompute: expected one of {RECOMPUTE}, got {value!r}")
        self._recompute = value

    @classmethod
    def from_reference(cls, block: _reference.ParallelBlock, *, recompute: str = "none") -> ParallelBlock:
        """A fast block sharing ``block``'s parameters and buffers (no copy, no RNG use)."""
        rot = block.rotary
        with torch.device("meta"):
            new = cls(block.dim, block.n_heads, block.head_dim, block.d_ff, block.n_kv_heads,
                      block.eps, rot.rotary_dim, rot.base, rot.interleaved, recompute=recompute)
        new.norm.weight = block.norm.weight
        new.in_proj, new.attn_out, new.ff_out = block.in_proj, block.attn_out, block.ff_out
        new.rotary.inv_freq = rot.inv_freq
        return new

    def _packed_in_proj(self):
        """The cached pair re-layout of ``in_proj.weight`` (Triton backend only; None on CPU)."""
        w, buf = self.in_proj.weight, self.rotary.inv_freq
        if not uses_triton(w.device.type):
            return None
        inv = as_fp32(buf)   # (a checkpoint loaded with assign=True may hold it in another dtype)
        args = (w, inv, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff, self.rotary.interleaved)
        if compiling() or not self.cache_packed_weight or not versioned(w, buf) or fsdp_managed(self) \
                or optimizer_in_step() or _dispatch.cuda_capturing():
            # Inference tensors (a model built under torch.inference_mode) have no version
            # counter, a weight that is a slice of a larger buffer is written through the
            # buffer's, and FSDP2 copies each all-gather into the same Parameter with its
            # version counter preserved: an update could not be detected, so re-lay out
            # every call (and while an optimizer step runs: see ops.block.optimizer_steps;
            # while a CUDA graph is captured, so that its replays re-lay out the live weight
            # instead of reading a copy an update would leave stale). Or not cached by choice
            # (palm_fast.nn.set_weight_cache: the copy's memory).
            return pack_in_proj(*args)
        key = (tensor_key(w, buf), optimizer_steps(), args[2:])
        if self._packed is None or not same_key(self._packed_key, key):
            with torch.inference_mode(False):   # a cached inference tensor breaks later training
                self._packed = pack_in_proj(*args)
            self._packed_key = key
        return self._packed

    # Whether the CUDA re-layout of in_proj.weight is kept between calls (a second copy of
    # that weight per block) or rebuilt per forward: palm_fast.nn.set_weight_cache.
    cache_packed_weight = True

    def _apply(self, fn, recurse=True):
        self._packed, self._packed_key = None, None   # .to() / .cuda(): rebuild lazily
        return super()._apply(fn, recurse)

    def __getstate__(self):
        # pickle / deepcopy / torch.save(model): without the cached re-layout (a copy of the
        # weight, rebuilt on the next forward)
        state = dict(super().__getstate__())
        state["_packed"] = state["_packed_key"] = None
        return state

    def _load_from_state_dict(self, *args, **kwargs):
        # (runs before the parts load: the key's weak references to the weight and inv_freq
        # made torch.utils.swap_tensors refuse them, under swap_module_params_on_conversion)
        self._packed, self._packed_key = None, None
        super()._load_from_state_dict(*args, **kwargs)

    def parts_fusable(self) -> bool:
        """Whether the fused kernels compute what the block's parts do: its own kinds of parts
        (the fast LayerNorm without bias at the block's eps, SwiGLU, RotaryEmbedding,
        bias-free nn.Linear projections) with no hooks on them, nor hooks for every module
        (``register_module_forward_hook``). A part the user swapped or hooked makes the
        block run the reference forward over its parts instead."""
        mods = self._modules   # (plain dict reads: this runs on every forward)
        norm, act, rot = mods["norm"], mods["act"], mods["rotary"]
        p, o, f = mods["in_proj"], mods["attn_out"], mods["ff_out"]
        Linear = torch.nn.Linear
        if not (type(norm) is LayerNorm and type(act) is SwiGLU and type(rot) is RotaryEmbedding
                and (LayerNorm.forward, SwiGLU.forward, RotaryEmbedding.forward) == _PART_FORWARDS
                and type(p) is Linear and type(o) is Linear and type(f) is Linear
                and norm.bias is None and norm.eps == self.eps
                and p.bias is None and o.bias is None and f.bias is None):
            return False
        return not parts_hooked(norm, act, rot, p, o, f)

    def _block(self, x: torch.Tensor, positions: torch.Tensor | None, cache) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a Tensor [B, T, dim], got {type(x).__name__}")
        # (an in_proj wrapper without a weight, e.g. a LoRA, runs the composed path: x only)
        w_dtype = getattr(getattr(self.in_proj, "weight", None), "dtype", None)
        if torch.float64 in (x.dtype, w_dtype):
            raise TypeError(f"palm_fast.nn.ParallelBlock: float64 (x {x.dtype}, weights "
                            f"{w_dtype}) is not supported by palm_fast's kernels "
                            f"(float32, float16, bfloat16); use palm_fast.reference's modules, "
                            f"which load the same state_dict (palm_fast.unpatch for a patched model)")
        if not self.parts_fusable() or (_autocast_on() and autocast_changes_dtype(
                x, self.in_proj.weight, self.attn_out.weight, self.ff_out.weight)) \
                or self.norm.weight.dtype not in (self.in_proj.weight.dtype, torch.float32):
            # The reference forward over the block's parts: for a swapped or hooked part (or a
            # norm weight in another dtype than the projections' and not fp32, e.g. a bf16
            # norm in an fp32 model: the fast LayerNorm takes it in fp32, as the reference), and
            # under autocast with x or a weight in another dtype than autocast's (then its
            # projections are autocast's, results added to x in x's dtype, exactly as in the
            # reference block; the fused kernels take one dtype for x and every weight).
            return _reference.ParallelBlock.forward(self, x, positions, cache)
        return parallel_block(
            x, self.norm.weight, self.in_proj.weight, self.attn_out.weight, self.ff_out.weight,
            as_fp32(self.rotary.inv_freq), n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim, d_ff=self.d_ff, eps=self.eps,
            interleaved=self.rotary.interleaved, positions=positions, cache=cache,
            packed=self._packed_in_proj(), recompute_attention=self.recompute == "attention")

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cache: _reference.KVCache | None = None) -> torch.Tensor:
        if self.recompute == "full" and cache is None and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._block, x, positions, None, use_reentrant=False)
        return self._block(x, positions, cache)

    def extra_repr(self) -> str:
        return f"recompute={self.recompute!r}" if self.recompute != "none" else ""
