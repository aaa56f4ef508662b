"""``palm_fast.patch`` for the public PaLM-pytorch package (``palm-pytorch`` 0.2.2).

Its ``PaLM(dim=, num_tokens=, depth=, dim_head=64, heads=8, ff_mult=4)`` (keyword-only) returns
``nn.Sequential(Embedding, depth x Residual(ParallelTransformerBlock), LayerNorm, Linear)`` with
the Linear's weight tied to the embedding. Checked against the installed 0.2.2 source:

* ``LayerNorm``: parameter ``gamma`` (ones), persistent buffer ``beta`` (zeros),
  ``F.layer_norm(x, x.shape[-1:], gamma, beta)`` (eps 1e-5).
* ``ParallelTransformerBlock``: ``norm`` (that LayerNorm); ``fused_attn_ff_proj`` (Linear, no
  bias) split as ``q | k | v | ff`` with ``fused_dims = (heads*dim_head, dim_head, dim_head,
  2*ff_mult*dim)``; ``rotary_emb`` (persistent buffer ``inv_freq = 1/10000^(arange(0,d,2)/d)``,
  angles ``position * inv_freq`` concatenated twice: rotate-half RoPE over the whole head) on q
  and on the single k head; then q scaled by ``scale = dim_head^-0.5``; causal softmax attention
  with one shared k/v head (masked with ``-finfo.max``); ``attn_out`` (Linear) on the merged
  heads; ``ff_out = Sequential(SwiGLU, Linear)`` where SwiGLU is ``x, gate = chunk(2);
  silu(gate) * x`` (value | gate); output ``attn_out(o) + ff_out(ff)``. Non-persistent cache
  buffers ``mask`` and ``pos_emb`` (None until the first forward).
* ``Residual(fn)``: ``fn(x) + x`` (left as it is: it holds the block).

Replacements (same attribute names, the same Parameter / buffer objects, same state_dict):

* ``LayerNorm`` -> :class:`LayerNorm` on ``palm_fast.ops.layer_norm`` with ``beta`` as the bias
  (applied whatever its value, so a loaded non-zero beta stays exact).
* ``SwiGLU`` -> ``palm_fast.nn.SwiGLU`` (the same value | gate layout).
* ``ParallelTransformerBlock`` -> :class:`ParallelTransformerBlock`: fast LayerNorm, fused RoPE
  kernel (``palm_fast.ops.rope``) on q and k read in place from the projection, causal
  multi-query attention through SDPA with the scale folded in, fast SwiGLU; it also exposes the
  attribute names of ``palm_fast.reference.ParallelBlock`` (``in_proj``, ``split_sizes``,
  ``rotary``, ...) as read-only aliases, for ``palm_fast.generate``.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import nn as fast
from ..ops import _dispatch
from ..ops._checks import as_fp32
from ..ops._dispatch import autocast_changes_dtype, compiling, parts_hooked
from ..ops.block import (
    _default_positions,
    causal_mqa_attention,
    fsdp_managed,
    fused_input_projection,
    fused_output_projection,
    optimizer_in_step,
    optimizer_steps,
    pack_in_proj,
    same_key,
    tensor_key,
    uses_triton,
    versioned,
)
from ..ops.layer_norm import layer_norm
from ..ops.rope import rope
from ..patching import (
    PatchOptions,
    Unsupported,
    check_code,
    check_constant_inv_freq,
    check_dtype,
    register,
)
from ..reference import functional as Fn

__all__ = ["LayerNorm", "ParallelTransformerBlock", "register_all", "EPS", "ROPE_BASE"]

EPS = 1e-5            # F.layer_norm's default, used by PaLM-pytorch
ROPE_BASE = 10000.0


def _pp():
    from palm_pytorch import palm_pytorch as pp

    return pp


def check_package_code() -> None:
    """Raise Unsupported when PaLM-pytorch code the fast block reproduces was replaced at run
    time: a method of any of its classes (``pp.SwiGLU.forward = geglu``) or one of its RoPE
    functions (``pp.apply_rotary_pos_emb = ...``, a context-extension hack)."""
    pp = _pp()
    changed = [n for n in ("rotate_half", "apply_rotary_pos_emb")
               if getattr(getattr(pp, n, None), "__module__", None) != pp.__name__
               or getattr(getattr(pp, n, None), "__qualname__", None) != n]
    if changed:
        raise Unsupported(f"palm_pytorch's {', '.join(changed)} {'was' if len(changed) == 1 else 'were'} "
                          "replaced at run time; the fast block computes the package's own code "
                          "and would drop the change")
    check_code(pp.LayerNorm, pp.Residual, pp.RotaryEmbedding, pp.SwiGLU, pp.ParallelTransformerBlock)


def _check_caches(m: nn.Module) -> None:
    """Raise Unsupported when a block's cached causal ``mask`` or rotary table ``pos_emb``
    (non-persistent buffers the original reads whenever they are long enough) is not what
    the original would compute: set by hand (a sliding-window mask, interpolated positions)
    or stale (``inv_freq`` changed after the first forward). The fast block computes both."""
    mask = getattr(m, "mask", None)
    if mask is not None:
        n = mask.shape[-1]
        want = torch.ones((n, n), dtype=torch.bool, device=mask.device).triu(1)
        if mask.dtype != torch.bool or mask.shape != want.shape or not torch.equal(mask, want):
            raise Unsupported("its cached causal mask (the buffer mask) is not the standard causal "
                              "mask, which the original uses and the fast block computes")
    pos = getattr(m, "pos_emb", None)
    if pos is not None:
        inv = m.rotary_emb.inv_freq.detach().float().to(pos.device)
        n = pos.shape[-2] if pos.dim() == 2 else -1
        freqs = torch.outer(torch.arange(max(n, 0), device=pos.device, dtype=torch.float32), inv)
        want = torch.cat((freqs, freqs), dim=-1)
        # (a table computed in fp32 and then converted, or computed in the model's half
        # precision, is within a few ulps of the fp32 table; a changed one is not)
        eps = torch.finfo(pos.dtype).eps if pos.is_floating_point() else 0.0
        if pos.shape != want.shape or not pos.is_floating_point() or \
                not torch.allclose(pos.detach().float(), want, rtol=4 * eps, atol=0):
            raise Unsupported("its cached rotary table (the buffer pos_emb) differs from its "
                              "rotary_emb's inv_freq table (set by hand, inv_freq changed after "
                              "the first forward, or computed in a lower precision than the "
                              "model now has); the original uses the cached table, the fast "
                              "block computes it from inv_freq")


class LayerNorm(nn.Module):
    """PaLM-pytorch's LayerNorm on the fast op: ``y = LN(x) * gamma + beta`` (eps 1e-5),
    parameter ``gamma`` and persistent buffer ``beta`` as the original."""

    def __init__(self, dim: int, *, device=None, dtype=None):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.register_buffer("beta", torch.zeros(dim, device=device, dtype=dtype))

    @classmethod
    def wrap(cls, m: nn.Module) -> LayerNorm:
        """A fast LayerNorm sharing ``m``'s ``gamma`` Parameter and ``beta`` buffer."""
        if not isinstance(m.gamma, nn.Parameter):
            raise Unsupported(f"gamma is a {type(m.gamma).__name__}, not a Parameter as in "
                              "PaLM-pytorch's LayerNorm")
        new = cls(m.gamma.shape[0], device="meta")
        new.gamma = m.gamma
        new.beta = m.beta
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.gamma, self.beta, EPS)

    def extra_repr(self) -> str:
        return f"{self.gamma.shape[0]}, eps={EPS}"


# the parts' forwards as defined (a class-level replacement later makes the block run them)
_LN_FORWARD, _SWIGLU_FORWARD = LayerNorm.forward, fast.SwiGLU.forward


class _RotaryView:
    """``block.rotary`` for ``palm_fast.generate``: the reference RotaryEmbedding's attributes
    (``rotary_dim``, ``base``, ``interleaved``, fp32 ``inv_freq``) read from the block."""

    def __init__(self, rotary_emb: nn.Module):
        self._m = rotary_emb

    @property
    def inv_freq(self) -> torch.Tensor:
        return as_fp32(self._m.inv_freq)

    @property
    def rotary_dim(self) -> int:
        return 2 * self._m.inv_freq.numel()

    base = ROPE_BASE
    interleaved = False


def _refuse_float64(x: torch.Tensor, w: torch.Tensor | None) -> None:
    w_dtype = None if w is None else w.dtype
    if torch.float64 in (x.dtype, w_dtype):
        raise TypeError(f"palm_fast's PaLM-pytorch block: float64 (x {x.dtype}, weights {w_dtype}) "
                        f"is not supported by palm_fast's kernels (float32, float16, bfloat16); "
                        f"palm_fast.unpatch(model) puts the original blocks back")


def _causal_mqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q ``[B, T, H, D]``, k and v ``[B, T, 1, D]`` -> ``softmax(q k^T * scale + causal) v``
    ``[B, T, H, D]`` (``palm_fast.ops.causal_mqa_attention``: SDPA, k/v never copied per head)."""
    return causal_mqa_attention(q, k, v, scale=scale)


def _attention_plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The original's attention math (einsum, ``-finfo.max`` causal mask, softmax)."""
    T = q.shape[1]
    sim = torch.einsum("bihd,bjd->bhij", q * scale, k[:, :, 0])
    mask = torch.ones((T, T), device=q.device, dtype=torch.bool).triu(1)
    sim = sim.masked_fill(mask, -torch.finfo(sim.dtype).max)
    return torch.einsum("bhij,bjd->bihd", sim.softmax(dim=-1), v[:, :, 0])


class ParallelTransformerBlock(nn.Module):
    """PaLM-pytorch's ParallelTransformerBlock on palm_fast's kernels (see the module docstring).

    Built by :meth:`wrap` from an original block, sharing its ``fused_attn_ff_proj``,
    ``attn_out``, ``rotary_emb`` and ``ff_out``'s Linear; ``x [B, T, dim] -> attn_out(o) +
    ff_out(ff)`` (the Residual around it adds x). Flags ``use_rope`` / ``use_attention`` choose
    the fused RoPE kernel / SDPA or the plain PyTorch math for those two inline pieces.
    """

    def __init__(self):
        super().__init__()
        # set by wrap(); plain attributes, not state
        self.heads = self.dim_head = 0
        self.scale = 0.0
        self.fused_dims: tuple[int, int, int, int] = (0, 0, 0, 0)
        self.use_rope = self.use_attention = True
        self._beta_key = self._packed_key = None
        self._beta_zero = False
        self._packed = None
        self._rot_forward = None

    @classmethod
    def wrap(cls, m: nn.Module, opts: PatchOptions) -> ParallelTransformerBlock:
        pp = _pp()
        check_package_code()
        check_dtype(m)
        H = int(m.heads)
        fused = tuple(int(s) for s in m.fused_dims)
        if len(fused) != 4:
            raise Unsupported(f"fused_dims {fused}: expected 4 sizes (q, k, v, ff)")
        qd, kd, vd, ffd = fused
        if qd % H:
            raise Unsupported(f"fused_dims: q size {qd} is not a multiple of heads={H}")
        D = qd // H
        if (kd, vd) != (D, D):
            raise Unsupported(f"fused_dims: k, v sizes {(kd, vd)} != one head of dim_head={D} "
                              "(only multi-query attention with one k/v head is supported)")
        proj, out, rot = m.fused_attn_ff_proj, m.attn_out, m.rotary_emb
        if type(proj) is not nn.Linear or proj.bias is not None or proj.out_features != sum(fused):
            raise Unsupported("fused_attn_ff_proj: expected a bias-free nn.Linear with "
                              f"{sum(fused)} outputs")
        if type(out) is not nn.Linear or out.bias is not None or out.in_features != qd:
            raise Unsupported(f"attn_out: expected a bias-free nn.Linear with {qd} inputs")
        if type(rot) is not pp.RotaryEmbedding or 2 * rot.inv_freq.numel() != D:
            raise Unsupported(f"rotary_emb: expected palm_pytorch's RotaryEmbedding over the whole "
                              f"head (dim {D})")
        check_constant_inv_freq(rot, "rotary_emb.inv_freq")
        _check_caches(m)
        ff = m.ff_out
        if not (type(ff) is nn.Sequential and len(ff) == 2 and type(ff[0]) in (pp.SwiGLU, fast.SwiGLU)
                and type(ff[1]) is nn.Linear and ff[1].bias is None and 2 * ff[1].in_features == ffd):
            raise Unsupported("ff_out: expected Sequential(SwiGLU, bias-free Linear with "
                              f"{ffd // 2} inputs)")
        if type(m.norm) not in (pp.LayerNorm, LayerNorm):
            raise Unsupported(f"norm: expected palm_pytorch's LayerNorm, got {type(m.norm).__qualname__}")
        if m.norm.gamma.dtype != m.norm.beta.dtype:
            raise Unsupported(f"norm: gamma ({m.norm.gamma.dtype}) and beta ({m.norm.beta.dtype}) "
                              "dtypes differ")
        new = cls()
        new.heads, new.dim_head, new.scale, new.fused_dims = H, D, float(m.scale), fused
        new.use_rope, new.use_attention = bool(opts.rope), bool(opts.attention)
        new.norm = LayerNorm.wrap(m.norm) if opts.layer_norm and type(m.norm) is pp.LayerNorm else m.norm
        new.rotary_emb = rot
        new._rot_forward = type(rot).forward   # (unchanged: check_package_code passed)
        new.fused_attn_ff_proj = proj
        new.attn_out = out
        act = fast.SwiGLU() if opts.swiglu and type(ff[0]) is pp.SwiGLU else ff[0]
        new.ff_out = nn.Sequential(act, ff[1])
        return new

    def _palm_fast_accepted(self, original: nn.Module) -> None:
        """Called by patch once this block has replaced ``original``: the original's lazily
        built causal mask and rotary table (T x T and T x dim_head, checked standard by
        wrap) are unused while it is patched, so they are dropped rather than kept alive
        through the replacement; it rebuilds them if it runs again (after unpatch, or after
        patch rolled back on an error)."""
        original.mask = None
        original.pos_emb = None

    # ------------------------------------------- palm_fast.reference.ParallelBlock's names
    # (read-only aliases: properties are not state, so the state_dict keeps its keys)
    @property
    def in_proj(self) -> nn.Linear:
        return self.fused_attn_ff_proj

    @property
    def split_sizes(self) -> tuple[int, int, int, int]:
        return self.fused_dims

    @property
    def rotary(self) -> _RotaryView:
        return _RotaryView(self.rotary_emb)

    @property
    def act(self) -> nn.Module:
        return self.ff_out[0]

    @property
    def ff_linear(self) -> nn.Linear:
        return self.ff_out[1]

    @property
    def n_heads(self) -> int:
        return self.heads

    @property
    def head_dim(self) -> int:
        return self.dim_head

    n_kv_heads = 1

    # ------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``attn_out(o) + ff_out(ff)`` (PaLM-pytorch's block output; its Residual adds x)."""
        # (a projection wrapper without a weight, e.g. a LoRA added after patch: x only)
        _refuse_float64(x, getattr(self.fused_attn_ff_proj, "weight", None))
        B, T, _ = x.shape
        H, D = self.heads, self.dim_head
        q, k, v, ff = self.fused_attn_ff_proj(self.norm(x)).split(self.fused_dims, dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, 1, D), v.view(B, T, 1, D)
        inv_freq = as_fp32(self.rotary_emb.inv_freq)
        if self._rotary_has_code():
            # rotary_emb called and its table applied as the original does (its hooks, or
            # code of its own set after patch, may change the table the original reads)
            pp = _pp()
            freqs = self.rotary_emb(T, device=x.device)
            q = pp.apply_rotary_pos_emb(freqs, q.transpose(1, 2)).transpose(1, 2)
            k = pp.apply_rotary_pos_emb(freqs, k[:, :, 0])[:, :, None]
        elif self.use_rope:
            q, k = rope(q, k, inv_freq=inv_freq)   # positions 0..T-1; q, k read in place
        else:
            pos = torch.arange(T, device=x.device).expand(B, T)
            q = Fn.apply_rope(q, pos, inv_freq)
            k = Fn.apply_rope(k, pos, inv_freq)
        attend = _causal_mqa if self.use_attention else _attention_plain
        o = attend(q, k, v, self.scale)
        return self.attn_out(o.reshape(B, T, H * D)) + self.ff_out(ff)

    def forward_residual(self, x: torch.Tensor) -> torch.Tensor:
        """``x + forward(x)`` (what ``Residual(block)`` computes), through palm_fast's fused
        block pieces when every fast part is on and ``beta`` is zero (the fused input
        projection has no LayerNorm bias): LayerNorm + ONE input GEMM with the RoPE / SwiGLU
        epilogue, multi-query attention, ONE output GEMM with the residual in its epilogue.
        Otherwise, and while torch.compile traces, ``x + forward(x)``."""
        if not self._fused_ok(x):
            return x + self.forward(x)   # (forward refuses float64)
        _refuse_float64(x, self.fused_attn_ff_proj.weight)
        B, T, _ = x.shape
        H, D = self.heads, self.dim_head
        inv_freq = as_fp32(self.rotary_emb.inv_freq)
        positions = _default_positions(0, B, T, x.device)   # (cached: 4 us a block)
        q, k, v, h = fused_input_projection(
            x, self.norm.gamma, self.fused_attn_ff_proj.weight, inv_freq, positions, n_heads=H,
            n_kv_heads=1, head_dim=D, d_ff=self.fused_dims[3] // 2, eps=EPS,
            packed=self._packed_in_proj(inv_freq))
        o = causal_mqa_attention(q, k, v, scale=self.scale)
        return fused_output_projection(o, h, x, self.attn_out.weight, self.ff_out[1].weight)

    def _rotary_has_code(self) -> bool:
        """Whether calling ``rotary_emb`` would run more than the package's table: hooks, a
        ``forward`` set on it, or ``RotaryEmbedding.forward`` replaced after ``patch``."""
        rot = self._modules["rotary_emb"]
        return parts_hooked(rot) or type(rot).forward is not self.__dict__.get("_rot_forward")

    def parts_fusable(self) -> bool:
        """Whether the fused kernels compute what the block's parts do: the parts ``wrap``
        built (the fast LayerNorm and SwiGLU, bias-free ``nn.Linear`` projections, PaLM-pytorch's
        rotary module) with no hooks on them or on the block, nor hooks for every module.
        A part swapped (a LoRA wrapper, a Linear with a bias or a parametrization) or hooked
        after ``patch`` makes the block run its composed forward, which calls the parts."""
        m = self._modules   # (plain dict reads: this runs on every forward)
        proj, out, ff = m["fused_attn_ff_proj"], m["attn_out"], m["ff_out"]
        norm, rot = m["norm"], m["rotary_emb"]
        if type(ff) is not nn.Sequential or len(ff._modules) != 2:
            return False
        act, lin = ff._modules.values()
        Linear = nn.Linear
        if not (self.use_rope and self.use_attention and type(norm) is LayerNorm
                and type(proj) is Linear and type(out) is Linear and proj.bias is None and out.bias is None
                and type(act) is fast.SwiGLU and type(lin) is Linear and lin.bias is None
                and type(rot) is _pp().RotaryEmbedding
                and type(rot).forward is self.__dict__.get("_rot_forward")
                and LayerNorm.forward is _LN_FORWARD and fast.SwiGLU.forward is _SWIGLU_FORWARD):
            return False
        return not parts_hooked(self, norm, proj, out, ff, act, lin, rot)

    def _fused_ok(self, x: torch.Tensor) -> bool:
        if compiling() or not self.parts_fusable() or (_dispatch._autocast_on() and autocast_changes_dtype(
                x, self.fused_attn_ff_proj.weight, self.attn_out.weight, self.ff_out[1].weight)):
            # (autocast casting x or a weight: the composed path, whose projections autocast
            # casts as in the original block; the fused kernels take one dtype for x and the
            # weights)
            return False
        g, w = self.norm.gamma, self.fused_attn_ff_proj.weight
        if x.dim() != 3 or w.dtype != x.dtype or g.dtype not in (x.dtype, torch.float32):
            return False
        beta = self.norm.beta
        if beta.requires_grad and torch.is_grad_enabled():
            # beta made a trainable Parameter (PaLM-pytorch keeps it a zero buffer): the fused
            # projection reads gamma only, so beta had no gradient and never trained
            return False
        if beta.is_cpu or not versioned(beta):   # (a buffer: FSDP2 does not all-gather it)
            # an inference tensor (built under torch.inference_mode) has no version counter,
            # a slice of a larger buffer is written through the buffer's, and a write
            # through .data bypasses it: read every call where that is cheap (the CPU: no
            # device sync) or unavoidable
            return not bool(beta.any())
        # (with optimizer_steps(): a fused optimizer's update of a Parameter beta bypasses its
        # version counter, as for the packed weight below)
        key = (tensor_key(beta), optimizer_steps())
        if not same_key(self._beta_key, key):   # one host read per change of beta, not per call
            self._beta_zero = not bool(beta.any())
            self._beta_key = key
        return self._beta_zero

    def _packed_in_proj(self, inv_freq: torch.Tensor):
        """The CUDA input GEMM's re-layout of the projection weight, cached while the weight
        and the rotary buffer are unchanged (None on CPU)."""
        w, buf = self.fused_attn_ff_proj.weight, self.rotary_emb.inv_freq
        if not uses_triton(w.device.type):
            return None
        args = (w, inv_freq, self.heads, 1, self.dim_head, self.fused_dims[3] // 2, False)
        # no counter that sees every write, an optimizer step under way (see
        # ops.block.optimizer_steps), or a CUDA graph captured (its replays re-lay out the
        # live weight), or caching turned off (palm_fast.nn.set_weight_cache): re-lay out
        # every call
        if (not self.cache_packed_weight or not versioned(w, buf) or fsdp_managed(self)
                or optimizer_in_step() or _dispatch.cuda_capturing()):
            return pack_in_proj(*args)
        key = (tensor_key(w, buf), optimizer_steps(), args[2:])
        if self._packed is None or not same_key(self._packed_key, key):
            with torch.inference_mode(False):   # a cached inference tensor breaks later training
                self._packed = pack_in_proj(*args)
            self._packed_key = key
        return self._packed

    cache_packed_weight = True   # see palm_fast.nn.ParallelBlock

    def _apply(self, fn, recurse=True):
        self._packed = self._packed_key = self._beta_key = None   # .to(): recheck lazily
        return super()._apply(fn, recurse)

    def __getstate__(self):
        # pickle / deepcopy / torch.save(model): without the weight-derived caches
        state = dict(super().__getstate__())
        state["_packed"] = state["_packed_key"] = state["_beta_key"] = None
        return state

    def _load_from_state_dict(self, *args, **kwargs):
        # (before the parts load: the keys' weak references made torch.utils.swap_tensors
        # refuse the weights, under swap_module_params_on_conversion)
        self._packed = self._packed_key = self._beta_key = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, dim_head={self.dim_head}, fused_dims={self.fused_dims}, "
                f"rope={'fast' if self.use_rope else 'plain'}, "
                f"attention={'sdpa' if self.use_attention else 'plain'}")


class Residual(nn.Module):
    """PaLM-pytorch's ``Residual(block)`` around a fast block: ``block.forward_residual(x)``
    (= ``block(x) + x``, the residual folded into the block's output GEMM). Child ``fn`` as
    the original, so the state_dict keys are unchanged."""

    def __init__(self, fn: ParallelTransformerBlock):
        super().__init__()
        self.fn = fn

    def _palm_fast_accepted(self, original: nn.Module) -> None:
        self.fn._palm_fast_accepted(original.fn)   # (see ParallelTransformerBlock)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = self.fn
        if type(fn) is not ParallelTransformerBlock or parts_hooked(fn):
            return x + fn(x)   # (a swapped or hooked block: called as a module, hooks run)
        return fn.forward_residual(x)


# ----------------------------------------------------------------------- factories
def _layer_norm(m: nn.Module, opts: PatchOptions) -> nn.Module:
    check_code(type(m))
    check_dtype(m)
    if m.gamma.dtype != m.beta.dtype:
        raise Unsupported(f"gamma ({m.gamma.dtype}) and beta ({m.beta.dtype}) dtypes differ")
    return LayerNorm.wrap(m)


def _swiglu(m: nn.Module, opts: PatchOptions) -> nn.Module:
    check_code(type(m))
    return fast.SwiGLU()


def _block(m: nn.Module, opts: PatchOptions) -> nn.Module:
    return ParallelTransformerBlock.wrap(m, opts)


def _residual(m: nn.Module, opts: PatchOptions) -> nn.Module | None:
    """Residual(ParallelTransformerBlock) -> Residual(fast block). None (keep it and visit its
    child, which then reports why it was not patched) when the block cannot be replaced."""
    from ..patching import _has_hooks

    blk = m.fn
    if type(blk) is not _pp().ParallelTransformerBlock or _has_hooks(blk):
        return None
    try:
        return Residual(ParallelTransformerBlock.wrap(blk, opts))
    except Unsupported:
        return None


def _restore_residual(orig: nn.Module, new: nn.Module) -> None:
    from ..patching import _ORIGINAL

    # Only while the fast block is still ``fn``: one the user put in a wrapper after patch
    # (``res.fn = checkpoint_wrapper(res.fn)``) came back with it, and unpatch restores the
    # block inside on its own (patch marked it with its original).
    if new.fn.__dict__.get(_ORIGINAL) is orig.fn:
        _restore_block(orig.fn, new.fn)


def _restore_block(orig: nn.Module, new: nn.Module) -> None:
    # Drop the original's causal-mask and rotary caches: they may be on another device or
    # dtype than the model now is; the original rebuilds them on its next forward.
    orig.mask = None
    orig.pos_emb = None


# ------------------------------------------------------------- palm_fast.generate support
class _BlockView:
    """A PaLM-pytorch block (patched or not) seen through ``palm_fast.reference.ParallelBlock``'s
    attribute names, as ``palm_fast.generate`` reads them (``ff_out`` is the output Linear;
    the SwiGLU is ``act``)."""

    def __init__(self, blk: nn.Module, rotary):
        self.norm = blk.norm
        self.in_proj = blk.fused_attn_ff_proj
        self.split_sizes = tuple(int(s) for s in blk.fused_dims)
        self.n_heads = int(blk.heads)
        self.head_dim = self.split_sizes[0] // self.n_heads
        self.rotary = rotary
        self.act = blk.ff_out[0]
        self.attn_out = blk.attn_out
        self.ff_out = blk.ff_out[1]


class _StandardRotary:
    """The rotary table ``generate``'s fused RoPE computes: ``1 / 10000^(2i / rotary_dim)``."""

    base = ROPE_BASE
    interleaved = False

    def __init__(self, rotary_dim: int):
        self.rotary_dim = rotary_dim


def decoder_parts(model: nn.Module):
    """``palm_fast.generation.decoder_parts`` for PaLM-pytorch's ``nn.Sequential`` (patched or
    not): ``Embedding, Residual(block) x depth, LayerNorm, Linear``; no logit scale. Raises
    ValueError for another layout (generate then says why)."""
    from ..generation import DecoderParts, _not_bypassed

    pp = _pp()
    try:
        check_package_code()
    except Unsupported as e:
        raise ValueError(f"model: {e}; generate runs its own kernels") from None
    blocks_ok = (pp.ParallelTransformerBlock, ParallelTransformerBlock)
    norms_ok = (pp.LayerNorm, LayerNorm)
    n = len(model)
    if n < 4 or type(model[0]) is not nn.Embedding or type(model[-1]) is not nn.Linear \
            or type(model[-2]) not in norms_ok:
        raise ValueError("model: an nn.Sequential that is not laid out like PaLM-pytorch's PaLM "
                         "(Embedding, Residual(ParallelTransformerBlock)..., LayerNorm, Linear)")
    head = model[-1]
    _not_bypassed(f"model[{n - 1}]", head)
    if head.bias is not None or head.weight.shape != model[0].weight.shape:
        raise ValueError(f"model[{n - 1}]: expected a bias-free Linear {tuple(model[0].weight.shape)} "
                         f"(the tied output head), got {head}")
    views = []
    for i in range(1, n - 2):
        res = model[i]
        blk = getattr(res, "fn", None)
        if type(res) not in (pp.Residual, Residual) or type(blk) not in blocks_ok:
            raise ValueError(f"model[{i}]: expected Residual(ParallelTransformerBlock), got "
                             f"{type(res).__qualname__}({type(blk).__qualname__})")
        for name, m in ((f"model[{i}]", res), (f"model[{i}].fn", blk), (f"model[{i}].fn.ff_out", blk.ff_out),
                        (f"model[{i}].fn.rotary_emb", blk.rotary_emb)):
            _not_bypassed(name, m)
        D = int(blk.fused_dims[0]) // int(blk.heads)
        if float(blk.scale) != D ** -0.5:
            raise ValueError(f"model[{i}].fn.scale = {blk.scale}: generate uses dim_head^-0.5")
        inv = blk.rotary_emb.inv_freq
        want = Fn.rope_inv_freq(2 * inv.numel(), ROPE_BASE, device=inv.device)
        # A half-precision model holds the standard table rounded to its dtype: accept that
        # (generate's RoPE then uses the fp32 table, as the model had before .to(dtype)).
        if not torch.equal(inv, want.to(inv.dtype)):
            raise ValueError(f"model[{i}].fn.rotary_emb.inv_freq is not the standard table "
                             f"1 / 10000^(2i / {2 * inv.numel()}) generate's fused RoPE computes")
        views.append(_BlockView(blk, _StandardRotary(2 * inv.numel())))
    return DecoderParts(embed=model[0], blocks=views, norm=model[-2], head_weight=head.weight,
                        logit_scale=None)


def _palm_lite_block(m: nn.Module, opts: PatchOptions) -> nn.Module:
    raise Unsupported("palm_pytorch.palm_lite block: RMSNorm and ALiBi attention with one k = v "
                      "head, not PaLM's LayerNorm / RoPE / separate k, v; no palm_fast replacement "
                      "(its SwiGLU is still swapped)")


def register_palm_lite() -> None:
    """The ``palm_lite`` variant shipped in the same package (only once it is imported)."""
    import sys

    lite = sys.modules.get("palm_pytorch.palm_lite")
    if lite is None:
        return
    register(lite.SwiGLU, _swiglu, kind="swiglu", replace=True)
    register(lite.ParallelTransformerBlock, _palm_lite_block, kind="block", replace=True)


def register_all() -> None:
    from ..generation import _PARTS_REGISTRY

    # (a decoder_parts of the user's own for nn.Sequential, registered before PaLM-pytorch
    # was imported, stays)
    _PARTS_REGISTRY.setdefault(nn.Sequential, decoder_parts)
    pp = _pp()
    register(pp.LayerNorm, _layer_norm, kind="layer_norm", replace=True)
    register(pp.SwiGLU, _swiglu, kind="swiglu", replace=True)
    register(pp.ParallelTransformerBlock, _block, kind="block", restore=_restore_block,
             inline=("rope", "attention"), replace=True)
    register(pp.Residual, _residual, kind="block", restore=_restore_residual, replace=True)
