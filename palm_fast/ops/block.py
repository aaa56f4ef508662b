"""The fused PaLM parallel block as functional pieces with their own autograd.

Math (reference: ``palm_fast.reference.ParallelBlock``), x ``[B, T, d]``, M = B T::

    xn          = LayerNorm(x)                                  (no bias)
    q|k|v|ff    = xn @ W_in^T                                   (ONE GEMM, N = H hd + 2 Hk hd + 2F)
    q, k        = RoPE(q, k, positions);  h = silu(gate) * value  (ff = value | gate)
    o           = causal_attention(q, k, v)                     (one shared k/v head: MQA)
    y           = x + [o | h] @ [W_attn_out ; W_ff_out]^T        (ONE GEMM, K = H hd + F)

Three autograd pieces, each a ``palm_fast::`` custom op with a fake kernel (for
``torch.compile``) and an eager fast path (``_dispatch``) like the other ops:

* ``fused_input_projection`` (``palm_fast::block_in_proj`` / ``_bwd``): LayerNorm (ours),
  the GEMM, RoPE on q and the k head(s), SwiGLU. CUDA: the Triton GEMM whose epilogue does
  RoPE + SwiGLU (``kernels/projection.py``; the 2F pre-activation is written only when
  autograd needs it). CPU: one ATen GEMM, then the C++ RoPE (reading the projection in
  place) and the C++ SwiGLU. Backward: the RoPE backward (inverse rotation) and the SwiGLU
  backward write ``d proj`` in place, then two GEMMs (cuBLAS / ATen: ``d xn = dproj W_in``,
  ``dW_in = dproj^T xn``), then the LayerNorm backward. Saved: x, xn, mean/rstd and the
  pre-activation ``ff`` (not q / k / v / h, which attention and the output GEMM save).
* ``causal_mqa_attention``: ``scaled_dot_product_attention`` (flash on GPU) with one k/v
  head shared by all query heads (broadcast as a stride-0 view: no k/v copy per head).
  CPU with one k/v head: our C++ kernel (``palm_fast::mqa_attention``,
  ``csrc/mqa_attention.cpp``), where the H heads of a token share the keys they read and
  the backward recomputes P from the saved log-normaliser.
* ``fused_output_projection`` (``palm_fast::block_out_proj`` / ``_bwd``): CUDA: one Triton
  GEMM over the virtual concatenation ``[o | h]`` with the residual added in its epilogue;
  CPU: two accumulating ATen ``addmm`` into the residual. Backward: four cuBLAS/ATen GEMMs
  (``do``, ``dh``, ``dW_attn_out``, ``dW_ff_out``); ``dx`` is the incoming gradient.

The backward GEMMs use cuBLAS through ATen: we could not time Triton against cuBLAS on a
GPU when this was written, and cuBLAS is the safe default for plain GEMMs.

CPU GEMMs in bf16 / fp16 on a CPU without native half-precision matrix instructions
(no AVX512-BF16 / AMX) run as fp32 GEMMs on upcast operands (``_mm``): the products of
half-precision values are exact in fp32 and the sum accumulates in fp32, as ATen's own
half GEMM does, but ATen's fallback for them is several times slower (6x on our AVX2 CI
VM for the block's input GEMM).
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook as _register_optimizer_step_post_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook as _register_optimizer_step_pre_hook

from palm_fast.kernels._common import cdiv, check_float_dtypes, on_tensor_device

from .._ext import cpp
from ._checks import (
    FLOAT_DTYPES,
    check_bool,
    check_eps,
    check_float,
    check_int,
    check_no_grad,
    check_same_device,
    check_tensor,
)
from ._dispatch import (
    cached_constant,
    call_impl,
    check_traced,
    compiling,
    eager_ctx,
    eager_function,
    eager_op,
    exporting,
    needs_grad,
    run_without_autocast,
)
from .layer_norm import (
    _layer_norm_bwd_cpu,
    _layer_norm_bwd_cuda,
    _layer_norm_fwd_cpu,
    _layer_norm_fwd_cuda,
)

__all__ = ["causal_mqa_attention", "fused_input_projection", "fused_output_projection",
           "pack_in_proj", "parallel_block"]

_INT_DTYPES = (torch.int32, torch.int64)


def _proj():
    from palm_fast.kernels import projection

    return projection


# Optimizer steps in this process (torch.optim's global step hooks). A fused optimizer step
# (AdamW(fused=True): torch._fused_adamw_) updates parameters in place WITHOUT bumping their
# version counters, so caches derived from a weight (the packed input-projection weight
# below) key on this count as well as on the weight's version. Counted before and after
# each step, and no cache is kept while a step runs: torch runs an optimizer's own step
# hooks (an EMA update, a logging forward) before the global post hook, and none of the
# post hooks after one raises; a cache built in there outlived the step's update.
# The count is the version counter of a 0-d tensor bumped by add_, not a Python int: Dynamo
# traces these hooks inside a compiled optimizer step, and an int it reads and writes back
# became a guard on its value, so every step of a compiled optimizer recompiled (and after
# the recompile limit ran eagerly), in any program that imported palm_fast. A traced add_
# runs with the graph, and bumps the version (a compiled fused step does not bump the
# weights' own versions either).
_STEP_COUNTER = torch.zeros((), dtype=torch.int64, device="cpu")   # (not a default device)
_IN_STEP = [False]


def _optimizer_step_begins(optimizer, args, kwargs) -> None:
    _STEP_COUNTER.add_(1)
    _IN_STEP[0] = True


def _optimizer_step_ends(optimizer, args, kwargs) -> None:
    _STEP_COUNTER.add_(1)
    _IN_STEP[0] = False


_register_optimizer_step_pre_hook(_optimizer_step_begins)
_register_optimizer_step_post_hook(_optimizer_step_ends)


def optimizer_steps() -> int:
    """A count that moves with every ``torch.optim`` optimizer step of this process, compiled
    or not (part of the keys of weight-derived caches; see above)."""
    return _STEP_COUNTER._version


def optimizer_in_step() -> bool:
    """Whether a ``torch.optim`` step is under way (or the last one raised): weight-derived
    caches are not kept then."""
    return _IN_STEP[0]


def versioned(*tensors: torch.Tensor) -> bool:
    """Whether a cache keyed on these tensors' version counters can see every write to them:
    not inference tensors (no counter), and each a view (views share their base's counter)
    or the only tensor of its storage. A parameter whose ``.data`` was set to a slice of a
    flat buffer (``torch.nn.utils.vector_to_parameters``, flat-buffer optimizers) keeps its
    own counter and is written through the buffer's."""
    for t in tensors:
        if t.is_inference() or (t._base is None and
                                t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            return False
    return True


def fsdp_managed(module) -> bool:
    """Whether FSDP2 (``fully_shard``) manages ``module``: it copies each all-gather into the
    same unsharded Parameter under ``_unsafe_preserve_version_counter``, so a weight written
    outside an optimizer step (an EMA swap, a partial load) keeps its identity, address and
    version: weight-derived caches cannot see it."""
    return bool(module.__dict__.get("_is_fsdp_managed_module", False))   # (no __getattr__ miss)


def tensor_key(*tensors: torch.Tensor) -> tuple:
    """The part of a weight-derived cache's key that says "the same tensors, unchanged":
    each tensor's address, version, dtype and device, and a weak reference to it. A key
    on addresses and versions alone matched a NEW tensor allocated where the cached one
    was (version 0 again; e.g. ``torch.func.functional_call`` with a fresh weight per call):
    the stale cache was used. Compare keys with ``same_key``."""
    return tuple((_WeakTensor(t), t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


def same_key(a: tuple | None, b: tuple) -> bool:
    """Whether two cache keys (tuples that may hold ``tensor_key`` parts) are equal: the
    weakly referenced tensors must be the same objects."""
    return a is not None and len(a) == len(b) and all(
        (x.same(y) if isinstance(x, _WeakTensor) else
         same_key(x, y) if isinstance(x, tuple) and isinstance(y, tuple) else x == y)
        for x, y in zip(a, b))


class _WeakTensor:
    """A weak reference to a tensor (a cache key part); pickled / deep-copied as a dead one
    (a copied module rebuilds its caches)."""

    __slots__ = ("ref",)

    def __init__(self, t: torch.Tensor | None):
        self.ref = weakref.ref(t) if t is not None else (lambda: None)

    def same(self, other) -> bool:
        return isinstance(other, _WeakTensor) and self.ref() is not None and self.ref() is other.ref()

    def __eq__(self, other):   # (a key compared with == is never equal: use same_key)
        return False

    __hash__ = None

    def __reduce__(self):
        return (_WeakTensor, (None,))


def pack_in_proj(w_in, inv_freq, n_heads, n_kv_heads, head_dim, d_ff, interleaved):
    """The pair re-layout of ``in_proj.weight`` the CUDA epilogue GEMM reads
    (``kernels.projection.PackedInProj``); modules cache it."""
    return _proj().pack_in_proj(w_in, inv_freq, n_heads, n_kv_heads, head_dim, d_ff, interleaved)


_HALF = (torch.float16, torch.bfloat16)


# Whether this CPU has matrix instructions for each half dtype (else ATen's half GEMM is
# slow). Read once at import: torch.compile cannot trace the torch.cpu queries, and the
# half-precision lm loss asks while it is traced.
_NATIVE_HALF_GEMM = {
    torch.bfloat16: torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported(),
    torch.float16: torch.cpu._is_amx_fp16_supported(),
}


def _native_half_gemm(dtype: torch.dtype) -> bool:
    return _NATIVE_HALF_GEMM[dtype]


def _upcast_gemm(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in _HALF and not _native_half_gemm(t.dtype)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in a's dtype; half-precision CPU operands without native support go through
    an fp32 GEMM (exact products, fp32 accumulation, one rounding)."""
    if _upcast_gemm(a):
        return torch.mm(a.float(), b.float()).to(a.dtype)
    return torch.mm(a, b)


def _linear(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w^T`` (a ``[M, K]``, w ``[N, K]``) through ``_mm``. (oneDNN's linear was used on
    the CPU until the sixteenth session: it keeps a primitive per shape, about 0.5 MiB each
    with ideep's entry, and a loop over many sequence lengths grew the process to 9x the
    reference's memory; re-timed then, it was no faster than MKL at the loss's and the
    training step's shapes on 1 or 2 threads.)"""
    return _mm(a, w.t())


# =========================================================================== input side

def _sizes(n_heads, n_kv_heads, head_dim, d_ff):
    hq, hkv = n_heads * head_dim, n_kv_heads * head_dim
    return hq, hkv, hq + 2 * hkv, d_ff


def in_proj_epilogue_aten(xn, w_in, inv_freq, pos, n_heads, n_kv_heads, head_dim, d_ff, interleaved):
    """CPU input GEMM + epilogues of 2-D xn ``[M, d]``: ONE ATen GEMM, then the C++ RoPE
    (reading q and k in place from the projection) and the C++ SwiGLU. Returns
    (q, k, v, h, proj) with proj ``[M, Nin]`` (its last 2F columns: the pre-activation)."""
    hq, hkv, nqkv, _ = _sizes(n_heads, n_kv_heads, head_dim, d_ff)
    M = xn.shape[0]
    proj = _linear(xn, w_in)
    q = torch.empty(M, hq, dtype=xn.dtype, device=xn.device)
    k = torch.empty(M, hkv, dtype=xn.dtype, device=xn.device)
    cpp().rope_cpu(proj[:, :hq].view(1, M, n_heads, head_dim),
                   proj[:, hq:hq + hkv].view(1, M, n_kv_heads, head_dim),
                   q.view(1, M, n_heads, head_dim), k.view(1, M, n_kv_heads, head_dim),
                   inv_freq, pos.view(1, M), False, interleaved, False)
    # (clone, not contiguous(): for M <= 1 the slice is contiguous already and v would alias
    # proj, which the op also returns; the dispatcher refuses aliased outputs under compile)
    v = proj[:, hq + hkv:nqkv].clone(memory_format=torch.contiguous_format)
    h = cpp().swiglu_fwd(proj[:, nqkv:])
    return q, k, v, h, proj


def _in_proj_aten(x, ln_weight, w_in, w_a, w_b, dst_a, dst_b, freq, inv_freq, pos,
                  n_heads, n_kv_heads, head_dim, d_ff, eps, interleaved, keep_ff):
    """x ``[M, d]`` -> (q, k, v, h, ff, xn, mean, rstd); ff = the whole projection [M, Nin]
    (its last 2F columns are the pre-activation: read in place, no copy)."""
    xn, mean, rstd = _layer_norm_fwd_cpu(x, ln_weight, None, eps)
    q, k, v, h, proj = in_proj_epilogue_aten(xn, w_in, inv_freq, pos, n_heads, n_kv_heads,
                                             head_dim, d_ff, interleaved)
    return q, k, v, h, proj, xn, mean, rstd


def _in_proj_triton(x, ln_weight, w_in, w_a, w_b, dst_a, dst_b, freq, inv_freq, pos,
                  n_heads, n_kv_heads, head_dim, d_ff, eps, interleaved, keep_ff):
    """x ``[M, d]`` -> (q, k, v, h, ff, xn, mean, rstd); ff = [M, 2F] when keep_ff, else [0]."""
    xn, mean, rstd = _layer_norm_fwd_cuda(x, ln_weight, None, eps)
    kp = _proj()
    packed = kp.PackedInProj(w_a, w_b, dst_a, dst_b, freq, kp.qkv_pairs(n_heads, n_kv_heads, head_dim))
    extra = {}
    # q / k / v columns: library GEMM + RoPE kernel (see kernels.projection); always for an
    # odd head dim (no q / k / v pairs for the epilogue GEMM's RoPE region)
    if kp.QKV_VIA_GEMM or head_dim % 2:
        nqkv = (n_heads + 2 * n_kv_heads) * head_dim
        extra = dict(qkv_weight=w_in[:nqkv], inv_freq=inv_freq, interleaved=interleaved)
    q, k, v, h, ff = kp.in_proj(xn, packed, pos, n_heads, n_kv_heads, head_dim, d_ff,
                                store_ff=keep_ff, **extra)
    return q, k, v, h, ff, xn, mean, rstd


# Backends by device type. CPU: ATen GEMM + C++ epilogues; CUDA: the Triton epilogue GEMM.
# (Tests point "cpu" at the Triton functions to run them on CPU tensors under the interpreter.)
_IN_IMPLS = {"cpu": _in_proj_aten, "cuda": _in_proj_triton}


def uses_triton(device_type: str) -> bool:
    """True when tensors of ``device_type`` run the Triton input GEMM (it needs the packed weight)."""
    return _IN_IMPLS.get(device_type) is _in_proj_triton


@torch.library.custom_op("palm_fast::block_in_proj", mutates_args=())
def block_in_proj(x: torch.Tensor, ln_weight: torch.Tensor, w_in: torch.Tensor, w_a: torch.Tensor,
                  w_b: torch.Tensor, dst_a: torch.Tensor, dst_b: torch.Tensor, freq: torch.Tensor,
                  inv_freq: torch.Tensor, pos: torch.Tensor, n_heads: int, n_kv_heads: int,
                  head_dim: int, d_ff: int, eps: float, interleaved: bool, keep_ff: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm + input GEMM + RoPE/SwiGLU epilogue of 2-D x ``[M, d]`` (see module doc)."""
    return call_impl(_IN_IMPLS, x, ln_weight, w_in, w_a, w_b, dst_a, dst_b, freq, inv_freq, pos,
                     n_heads, n_kv_heads, head_dim, d_ff, eps, interleaved, keep_ff)


@block_in_proj.register_fake
def _(x, ln_weight, w_in, w_a, w_b, dst_a, dst_b, freq, inv_freq, pos, n_heads, n_kv_heads,
      head_dim, d_ff, eps, interleaved, keep_ff):
    hq, hkv, _, _ = _sizes(n_heads, n_kv_heads, head_dim, d_ff)
    M = x.shape[0]
    if not uses_triton(x.device.type):
        ff = x.new_empty((M, w_in.shape[0]))
    else:
        ff = x.new_empty((M, 2 * d_ff) if keep_ff else (0,))
    f32 = torch.float32
    return (x.new_empty((M, hq)), x.new_empty((M, hkv)), x.new_empty((M, hkv)),
            x.new_empty((M, d_ff)), ff, x.new_empty(x.shape), x.new_empty((M,), dtype=f32),
            x.new_empty((M,), dtype=f32))


def _in_proj_bwd_impl(dq, dk, dv, dh, x, ln_weight, w_in, xn, mean, rstd, ff, inv_freq, pos,
                      n_heads, n_kv_heads, head_dim, d_ff, interleaved, need_w=True, need_ln_w=True):
    """Gradients (dx, d_ln_weight, d_w_in) of ``block_in_proj``: the RoPE and SwiGLU backward
    write ``dproj [M, Nin]`` in place, then two GEMMs and the LayerNorm backward. Without
    ``need_w`` (a frozen weight) the weight GEMM is skipped and d_w_in is an empty tensor;
    without ``need_ln_w`` the LayerNorm's column reduction, and d_ln_weight is empty."""
    hq, hkv, nqkv, F_ = _sizes(n_heads, n_kv_heads, head_dim, d_ff)
    M = x.shape[0]
    dproj = torch.empty(M, nqkv + 2 * F_, dtype=x.dtype, device=x.device)
    dq4 = dq.reshape(1, M, n_heads, head_dim).contiguous()
    dk4 = dk.reshape(1, M, n_kv_heads, head_dim).contiguous()
    oq = dproj[:, :hq].view(1, M, n_heads, head_dim)
    ok = dproj[:, hq:hq + hkv].view(1, M, n_kv_heads, head_dim)
    pre = ff[:, ff.shape[1] - 2 * F_:]          # value | gate pre-activation (a view)
    if uses_triton(x.device.type):
        from palm_fast.kernels import swiglu as ks
        from palm_fast.kernels.rope import rope as rope_triton

        rope_triton(dq4, dk4, inv_freq, pos.view(1, M), pos_is_offset=False,
                    interleaved=interleaved, inverse=True, q_out=oq, k_out=ok)
        _swiglu_bwd_into(ks, dh.contiguous(), pre, dproj[:, nqkv:])
        ln_bwd = _layer_norm_bwd_cuda
    else:
        cpp().rope_cpu(dq4, dk4, oq, ok, inv_freq, pos.view(1, M), False, interleaved, True)
        cpp().swiglu_bwd(dh.contiguous(), pre, dproj[:, nqkv:])   # written in place
        ln_bwd = _layer_norm_bwd_cpu
    dproj[:, hq + hkv:nqkv].copy_(dv.reshape(M, hkv))
    dxn = _mm(dproj, w_in)
    dw_in = _mm(dproj.t(), xn) if need_w else w_in.new_empty(0)
    dx, dlnw, _ = ln_bwd(dxn, x, ln_weight, mean, rstd, False, need_ln_w)
    return dx, dlnw, dw_in


@on_tensor_device
def _swiglu_bwd_into(ks, grad_out, x, out):
    """The SwiGLU backward kernel writing ``d(value | gate)`` straight into a slice of dproj."""
    n_rows, F_ = grad_out.shape
    if n_rows == 0:
        return
    block_r, block_f, num_warps = ks.tile_config(n_rows, F_)
    grid = (cdiv(n_rows, block_r), cdiv(F_, block_f))
    ks._swiglu_bwd[grid](grad_out, x, out, n_rows, F_, grad_out.stride(0), x.stride(0), out.stride(0),
                         BLOCK_R=block_r, BLOCK_F=block_f, PRECISE_EXP=ks.precise_exp(out),
                         num_warps=num_warps)


@torch.library.custom_op("palm_fast::block_in_proj_bwd", mutates_args=())
def block_in_proj_bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, dh: torch.Tensor,
                      x: torch.Tensor, ln_weight: torch.Tensor, w_in: torch.Tensor, xn: torch.Tensor,
                      mean: torch.Tensor, rstd: torch.Tensor, ff: torch.Tensor, inv_freq: torch.Tensor,
                      pos: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int, d_ff: int,
                      interleaved: bool, need_w: bool,
                      need_ln_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _in_proj_bwd_impl(dq, dk, dv, dh, x, ln_weight, w_in, xn, mean, rstd, ff, inv_freq, pos,
                             n_heads, n_kv_heads, head_dim, d_ff, interleaved, need_w, need_ln_w)


@block_in_proj_bwd.register_fake
def _(dq, dk, dv, dh, x, ln_weight, w_in, xn, mean, rstd, ff, inv_freq, pos, n_heads, n_kv_heads,
      head_dim, d_ff, interleaved, need_w, need_ln_w):
    return (x.new_empty(x.shape), ln_weight.new_empty(ln_weight.shape if need_ln_w else (0,)),
            w_in.new_empty(w_in.shape if need_w else (0,)))


def _in_setup(ctx, inputs, output):
    (x, ln_weight, w_in, _wa, _wb, _da, _db, _fr, inv_freq, pos, n_heads, n_kv_heads, head_dim,
     d_ff, _eps, interleaved, keep_ff) = inputs
    _q, _k, _v, _h, ff, xn, mean, rstd = output
    ctx.save_for_backward(x, ln_weight, w_in, xn, mean, rstd, ff, inv_freq, pos)
    ctx.dims = (n_heads, n_kv_heads, head_dim, d_ff, interleaved)
    ctx.keep_ff = keep_ff
    # ff / xn / mean / rstd never receive a gradient: do not let autograd build zero [M, Nin]
    # tensors for them (the backward treats None as zero).
    ctx.set_materialize_grads(False)


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _in_backward(ctx, dq, dk, dv, dh, _dff, _dxn, _dmean, _drstd):
    if not ctx.keep_ff:
        raise RuntimeError("fused_input_projection: backward needs the SwiGLU pre-activation, "
                           "which the forward did not keep (it ran without grad: keep_ff=False)")
    x, ln_weight, w_in, xn, mean, rstd, ff, inv_freq, pos = ctx.saved_tensors
    n_heads, n_kv_heads, head_dim, d_ff, interleaved = ctx.dims
    M = x.shape[0]
    hq, hkv = n_heads * head_dim, n_kv_heads * head_dim
    dq = _zeros_if_none(dq, x.new_empty(M, hq))
    dk = _zeros_if_none(dk, x.new_empty(M, hkv))
    dv = _zeros_if_none(dv, x.new_empty(M, hkv))
    dh = _zeros_if_none(dh, x.new_empty(M, d_ff))
    bwd = _in_proj_bwd_impl if eager_ctx(ctx) else block_in_proj_bwd
    # frozen weights: the projection's weight GEMM / the LayerNorm's column reduction skipped
    need_ln_w, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dx, dlnw, dw = bwd(dq, dk, dv, dh, x, ln_weight, w_in, xn, mean, rstd, ff, inv_freq, pos,
                       n_heads, n_kv_heads, head_dim, d_ff, interleaved, need_w, need_ln_w)
    return (dx, dlnw if need_ln_w else None, dw if need_w else None) + (None,) * 14


block_in_proj.register_autograd(_in_backward, setup_context=_in_setup)
_InProjEager = eager_function("block_in_proj", _IN_IMPLS, _in_setup, _in_backward)


def _check_in(x, ln_weight, w_in, inv_freq, positions, n_heads, n_kv_heads, head_dim, d_ff):
    for name, v in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim), ("d_ff", d_ff)):
        if check_int(name, v) < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v}")
    if n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads: expected a divisor of n_heads={n_heads} (each key/value head "
                         f"serves n_heads / n_kv_heads query heads), got {n_kv_heads}")
    check_tensor("x", x, ndim=3)
    B, T, d = x.shape
    check_tensor("ln_weight", ln_weight, ndim=1)
    check_tensor("w_in", w_in, ndim=2)
    if ln_weight.shape[0] == w_in.shape[1] != d:   # the weights agree: x is the odd one
        raise ValueError(f"x: expected last dim {w_in.shape[1]} (the model width of ln_weight and "
                         f"w_in), got shape {tuple(x.shape)}")
    if ln_weight.dtype == w_in.dtype != x.dtype:
        raise TypeError(f"x: expected dtype {w_in.dtype} (the block weights'), got {x.dtype}")
    if ln_weight.shape[0] != d:
        raise ValueError(f"ln_weight: expected shape ({d},) (x's last dim), got {tuple(ln_weight.shape)}")
    if ln_weight.dtype not in (x.dtype, torch.float32):
        also = "" if x.dtype == torch.float32 else " or torch.float32"
        raise TypeError(f"ln_weight: expected dtype {x.dtype} (same as x){also}, got {ln_weight.dtype}")
    n_in = (n_heads + 2 * n_kv_heads) * head_dim + 2 * d_ff
    if tuple(w_in.shape) != (n_in, d):
        raise ValueError(f"w_in: expected shape ({n_in}, {d}) ((H + 2 Hk) hd + 2F, d), "
                         f"got {tuple(w_in.shape)}")
    if w_in.dtype != x.dtype:
        raise TypeError(f"w_in: expected dtype {x.dtype} (same as x), got {w_in.dtype}")
    check_tensor("inv_freq", inv_freq, dtypes=(torch.float32,), ndim=1)
    check_no_grad("inv_freq", inv_freq)
    if not 1 <= inv_freq.numel() <= head_dim // 2:
        raise ValueError(f"inv_freq: expected 1 <= len <= head_dim / 2 = {head_dim // 2}, "
                         f"got {inv_freq.numel()}")
    check_tensor("positions", positions, dtypes=_INT_DTYPES, ndim=2)
    if tuple(positions.shape) != (B, T):
        raise ValueError(f"positions: expected shape ({B}, {T}), got {tuple(positions.shape)}")
    check_same_device(x=x, ln_weight=ln_weight, w_in=w_in, inv_freq=inv_freq, positions=positions)


def fused_input_projection(x: torch.Tensor, ln_weight: torch.Tensor, w_in: torch.Tensor,
                           inv_freq: torch.Tensor, positions: torch.Tensor, *, n_heads: int,
                           n_kv_heads: int = 1, head_dim: int, d_ff: int, eps: float = 1e-5,
                           interleaved: bool = False, packed=None):
    """LayerNorm + ONE GEMM against ``w_in`` (q | k | v | value | gate) + RoPE/SwiGLU epilogue.

    x ``[B, T, d]``; ln_weight ``[d]``; w_in ``[(H + 2 Hk) hd + 2F, d]`` (reference layout);
    inv_freq ``[R/2]`` fp32; positions ``[B, T]`` int. Returns q ``[B, T, H, hd]`` and
    k, v ``[B, T, Hk, hd]`` (rotated q and k) and h ``[B, T, F]``, with autograd to x,
    ln_weight and w_in. ``packed``: a cached ``pack_in_proj`` result (CUDA; built on the
    fly when None). Raises TypeError/ValueError naming the bad argument.
    """
    _check_in(x, ln_weight, w_in, inv_freq, positions, n_heads, n_kv_heads, head_dim, d_ff)
    return _input_projection(x, ln_weight, w_in, inv_freq, positions, n_heads, n_kv_heads,
                             head_dim, d_ff, check_eps(eps), check_bool("interleaved", interleaved),
                             packed)


def _input_projection(x, ln_weight, w_in, inv_freq, positions, n_heads, n_kv_heads, head_dim,
                      d_ff, eps, interleaved, packed):
    """``fused_input_projection`` on checked arguments. Without autograd (no grad needed),
    the device implementation is called directly (no ``autograd.Function``)."""
    B, T, d = x.shape
    M = B * T
    if uses_triton(x.device.type):
        if packed is None:
            packed = pack_in_proj(w_in, inv_freq, n_heads, n_kv_heads, head_dim, d_ff, interleaved)
        extra = (packed.w_a, packed.w_b, packed.dst_a, packed.dst_b, packed.freq)
    else:
        e = x.new_empty((0,))
        extra = (e, e, e, e, e)
    # Whether to keep the SwiGLU pre-activation for a backward. A jit.trace or torch.export
    # records it as a constant, and the program may run with or without grad (jit.trace's
    # own check re-traces under no_grad; a program exported under no_grad may be
    # differentiated, as the reference's can): kept there always.
    keep_ff = needs_grad(x, ln_weight, w_in) or torch.jit.is_tracing() or exporting()
    x2 = x.reshape(M, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    pos = positions.reshape(M)
    args = (x2, ln_weight, w_in, *extra, inv_freq.contiguous(), pos, int(n_heads), int(n_kv_heads),
            int(head_dim), int(d_ff), eps, bool(interleaved), bool(keep_ff))
    op = block_in_proj if compiling() else eager_op(_InProjEager, _IN_IMPLS, x.device.type, keep_ff)
    q, k, v, h = op(*args)[:4]
    return (q.view(B, T, n_heads, head_dim), k.view(B, T, n_kv_heads, head_dim),
            v.view(B, T, n_kv_heads, head_dim), h.view(B, T, d_ff))


# =========================================================================== attention

def causal_mqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float | None = None) -> torch.Tensor:
    """Causal multi-query attention: q ``[B, T, H, hd]``, k and v ``[B, T, hd]`` (one head
    shared by all query heads; ``[B, T, Hk, hd]`` with ``H % Hk == 0`` also works) ->
    o ``[B, T, H, hd]`` in q's dtype. ``scale`` defaults to ``hd ** -0.5``.

    ``o[b, i, h] = softmax_{j <= i}(q[b, i, h] . k[b, j] * scale) @ v[b, :]``. Runs
    ``scaled_dot_product_attention`` (flash backend on GPU) with the k/v head broadcast to
    the query heads as a stride-0 view (never copied per head); autograd through SDPA.
    On CPU with one k/v head: the op ``palm_fast::mqa_attention`` (with autograd), which runs
    the C++ kernel while the shape fits it and ATen's CPU flash attention past that.
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=(3, 4))
    check_tensor("v", v, ndim=(3, 4))
    check_same_device(q=q, k=k, v=v)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (same as q), got {t.dtype}")
    B, T, H, D = q.shape
    if k.dim() == 3:
        k = k.unsqueeze(2)
    if v.dim() == 3:
        v = v.unsqueeze(2)
    Hk = k.shape[2]
    if k.shape != (B, T, Hk, D) or H % Hk:
        raise ValueError(f"k: expected shape ({B}, {T}, {D}) or ({B}, {T}, Hk, {D}) with Hk dividing "
                         f"{H}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {tuple(k.shape)} (same as k), got {tuple(v.shape)}")
    if D == 0:
        raise ValueError(f"q: expected a head dim >= 1, got shape {tuple(q.shape)}")
    if scale is not None:
        scale = check_float("scale", scale, positive=True)
    return _sdpa(q, k, v, scale, q_offset=0)


def _mqa_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal MQA attention of contiguous q ``[B, T, H, D]``, k, v ``[B, T, D]`` on CPU: returns
    (o ``[B, T, H, D]``, lse ``[B, T, H]`` fp32, the natural log-sum-exp of the scaled scores).
    The C++ kernel while the shape fits it (_cpu_mqa_fits), else ATen's CPU flash attention.
    The choice is made here, on the concrete shape, rather than by the caller: a caller's size
    test becomes a shape guard under torch.export / torch.compile with a dynamic T (an
    exported palm-1b accepted T <= 384 only)."""
    check_float_dtypes("q, k, v", q, k, v)   # (the raw op's check: the C++ kernel computes fp64 in fp32)
    B, T, H, D = q.shape
    if q.numel() == 0 or _cpu_mqa_fits(T, H, D):   # (ATen's flash kernel divides by 0 at H = 0)
        return tuple(cpp().mqa_attn_fwd(q, k, v, scale))
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), _heads_view(k, H), _heads_view(v, H), 0.0, True, scale=scale)
    return o.transpose(1, 2).contiguous(), lse.transpose(1, 2).contiguous()


def _heads_view(k: torch.Tensor, H: int) -> torch.Tensor:
    """k ``[B, T, D]`` as ``[B, H, T, D]``: a stride-0 view over the heads (no copy)."""
    B, T, D = k.shape
    return k.unsqueeze(1).expand(B, H, T, D)


def _mqa_attention_bwd_cpu(grad_out, q, k, v, o, lse, scale):
    """(dq, dk, dv) of _mqa_attention_cpu, by the kernel that made (o, lse)."""
    B, T, H, D = q.shape
    if q.numel() == 0 or _cpu_mqa_fits(T, H, D):
        return tuple(cpp().mqa_attn_bwd(grad_out, q, k, v, o, lse, scale))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.transpose(1, 2), q.transpose(1, 2), _heads_view(k, H), _heads_view(v, H),
        o.transpose(1, 2), lse.transpose(1, 2).contiguous(), 0.0, True, scale=scale)
    return dq.transpose(1, 2).contiguous(), dk.sum(1), dv.sum(1)


mqa_attention_op = torch.library.custom_op("palm_fast::mqa_attention", mutates_args=())(_mqa_attention_cpu)


@mqa_attention_op.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("palm_fast::mqa_attention_bwd", mutates_args=())
def mqa_attention_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         o: torch.Tensor, lse: torch.Tensor, scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_float_dtypes("q, k, v, grad_out, o", q, k, v, grad_out, o)
    return _mqa_attention_bwd_cpu(grad_out, q, k, v, o, lse, scale)


@mqa_attention_bwd_op.register_fake
def _(grad_out, q, k, v, o, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale
    ctx.set_materialize_grads(False)


def _attn_backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if do is None:
        return None, None, None, None
    do = do.contiguous()
    if eager_ctx(ctx):
        dq, dk, dv = _mqa_attention_bwd_cpu(do, q, k, v, o, lse, ctx.scale)
    else:
        dq, dk, dv = mqa_attention_bwd_op(do, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


mqa_attention_op.register_autograd(_attn_backward, setup_context=_attn_setup)
_MQA_IMPLS = {"cpu": _mqa_attention_cpu}
_MQAEager = eager_function("mqa_attention", _MQA_IMPLS, _attn_setup, _attn_backward)


# Largest T * hd (per sequence) for which the C++ kernel runs instead of ATen's CPU flash
# attention: each token's H query heads stream the sequence's whole fp32 k and v, so the
# kernel wins while those (2 * T * hd * 4 bytes, 384 KiB here) stay in the core's L2.
# Measured on our 2-core AVX2 CI VM (2 threads, fp32, forward + backward vs SDPA):
# T 128 / hd 64 / H 4 1.74x, T 512 / hd 64 1.20x (H 8: 1.45x), T 384 / hd 128 1.55x, T 128 / hd 256
# 1.53x; past the bound T 1024 / hd 64 0.97x, T 256 / hd 256 1.04x (forward 0.69x),
# T 1000 / hd 96 0.94x (forward 0.60x).
CPU_MQA_MAX_KV = 49152
# Largest per-thread score scratch of the C++ backward, in floats (16 MB): token block x H
# rows of T keys (csrc/mqa_attention.cpp token_block). Many heads with a tiny head dim inside
# CPU_MQA_MAX_KV asked for up to 19 GB per buffer (head dim 1, 64 heads, T = 49152); such
# shapes take ATen's flash kernel. PaLM-like shapes are far below (48 x 128: 221k floats).
CPU_MQA_MAX_SCRATCH = 1 << 22


def _cpu_mqa_scratch(T: int, H: int) -> int:
    """Floats per scratch buffer of the C++ backward (its token block x H x T padded to 16)."""
    tb = min(T, max(max(1, 64 // max(1, H)), (T + 31) // 32))
    return tb * H * ((T + 15) // 16 * 16)


def _cpu_mqa_fits(T: int, H: int, D: int) -> bool:
    """Whether palm_fast::mqa_attention runs the C++ kernel at this shape (else ATen's CPU
    flash attention): concrete sizes, inside the op."""
    return T * D <= CPU_MQA_MAX_KV and _cpu_mqa_scratch(T, H) <= CPU_MQA_MAX_SCRATCH


def _cpu_mqa(q, k, v, scale):
    """The C++ causal MQA attention (CPU, one shared k/v head, queries at keys 0..T-1):
    the H heads of a token share the keys they read (see csrc/mqa_attention.cpp)."""
    B, T, H, D = q.shape
    q = q.contiguous()
    k = k.reshape(B, T, D).contiguous()
    v = v.reshape(B, T, D).contiguous()
    s = float(D ** -0.5 if scale is None else scale)
    if compiling():
        check_traced(q, k, v)
        return mqa_attention_op(q, k, v, s)[0]
    return eager_op(_MQAEager, _MQA_IMPLS, "cpu", needs_grad(q, k, v))(q, k, v, s)[0]


def _sdpa(q, k, v, scale, q_offset: int):
    """SDPA over [B, T, H, D] / [B, S, Hk, D]; queries sit at key index q_offset + i. With
    autocast off: the ops compute in their inputs' dtypes (under a bf16 autocast SDPA
    returned bf16 for fp32 inputs)."""
    return run_without_autocast(_sdpa_body, q, k, v, scale, q_offset)


def _sdpa_body(q, k, v, scale, q_offset):
    B, T, H, D = q.shape
    S, Hk = k.shape[1], k.shape[2]
    if q.device.type == "cpu" and Hk == 1 and q_offset == 0 and T == S and T > 0:
        return _cpu_mqa(q, k, v, scale)   # (the op picks its kernel by size)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if Hk != H:
        # Each kv head broadcast to its H / Hk query heads as a stride-0 view (no copy), so
        # every SDPA backend (flash, memory-efficient, cuDNN) accepts the shapes; the
        # backward sums the expanded gradient back onto the shared head.
        g = H // Hk
        kt = kt[:, :, None].expand(B, Hk, g, S, D).reshape(B, H, S, D) if Hk > 1 else kt.expand(B, H, S, D)
        vt = vt[:, :, None].expand(B, Hk, g, S, D).reshape(B, H, S, D) if Hk > 1 else vt.expand(B, H, S, D)
    if q_offset == 0 and T == S:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
    elif T == 1:   # one new token: every cached key is visible
        o = F.scaled_dot_product_attention(qt, kt, vt, scale=scale)
    else:
        i = torch.arange(T, device=q.device)[:, None] + q_offset
        mask = torch.arange(S, device=q.device)[None, :] <= i
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return o.transpose(1, 2)


# =========================================================================== output side

def _out_proj_aten(o, h, x, w_attn_out, w_ff_out):
    if _upcast_gemm(x):   # fp32 GEMMs, one rounding of the sum (see the module doc)
        y = torch.addmm(x.float(), o.float(), w_attn_out.float().t())
        return y.addmm_(h.float(), w_ff_out.float().t()).to(x.dtype)
    y = torch.addmm(x, o, w_attn_out.t())
    return y.addmm_(h, w_ff_out.t())


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    """t with a unit stride in its last dim (the GEMM kernels take a row stride only): a
    transposed or expanded weight is copied."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _out_proj_triton(o, h, x, w_attn_out, w_ff_out):
    return _proj().out_proj(*(_unit_columns(t) for t in (o, h, x, w_attn_out, w_ff_out)))


_OUT_IMPLS = {"cpu": _out_proj_aten, "cuda": _out_proj_triton}


@torch.library.custom_op("palm_fast::block_out_proj", mutates_args=())
def block_out_proj(o: torch.Tensor, h: torch.Tensor, x: torch.Tensor, w_attn_out: torch.Tensor,
                   w_ff_out: torch.Tensor) -> torch.Tensor:
    """``x + o @ w_attn_out^T + h @ w_ff_out^T`` for 2-D o ``[M, H hd]``, h ``[M, F]``, x ``[M, d]``."""
    return call_impl(_OUT_IMPLS, o, h, x, w_attn_out, w_ff_out)


@block_out_proj.register_fake
def _(o, h, x, w_attn_out, w_ff_out):
    return x.new_empty(x.shape)


def _out_proj_bwd_impl(g, o, h, w_attn_out, w_ff_out, need_wo=True, need_wf=True):
    """(do, dh, dw_attn_out, dw_ff_out); a weight gradient not needed (a frozen weight) is an
    empty tensor and its GEMM is skipped."""
    return (_mm(g, w_attn_out), _mm(g, w_ff_out),
            _mm(g.t(), o) if need_wo else w_attn_out.new_empty(0),
            _mm(g.t(), h) if need_wf else w_ff_out.new_empty(0))


@torch.library.custom_op("palm_fast::block_out_proj_bwd", mutates_args=())
def block_out_proj_bwd(g: torch.Tensor, o: torch.Tensor, h: torch.Tensor, w_attn_out: torch.Tensor,
                       w_ff_out: torch.Tensor, need_wo: bool, need_wf: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _out_proj_bwd_impl(g, o, h, w_attn_out, w_ff_out, need_wo, need_wf)


@block_out_proj_bwd.register_fake
def _(g, o, h, w_attn_out, w_ff_out, need_wo, need_wf):
    return (o.new_empty(o.shape), h.new_empty(h.shape),
            w_attn_out.new_empty(w_attn_out.shape if need_wo else (0,)),
            w_ff_out.new_empty(w_ff_out.shape if need_wf else (0,)))


def _out_setup(ctx, inputs, output):
    o, h, _x, w_attn_out, w_ff_out = inputs
    ctx.save_for_backward(o, h, w_attn_out, w_ff_out)


def _out_backward(ctx, g):
    o, h, w_attn_out, w_ff_out = ctx.saved_tensors
    g = g.contiguous()
    bwd = _out_proj_bwd_impl if eager_ctx(ctx) else block_out_proj_bwd
    need_wo, need_wf = ctx.needs_input_grad[3], ctx.needs_input_grad[4]   # (frozen: skipped)
    do, dh, dwo, dwf = bwd(g, o, h, w_attn_out, w_ff_out, need_wo, need_wf)
    return do, dh, g, dwo if need_wo else None, dwf if need_wf else None


block_out_proj.register_autograd(_out_backward, setup_context=_out_setup)
_OutProjEager = eager_function("block_out_proj", _OUT_IMPLS, _out_setup, _out_backward)


def _rows(name, t, M, n):
    """``t`` as ``[M, n]`` rows with a unit column stride (a view when possible)."""
    t2 = t.reshape(M, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check_out_weights(x: torch.Tensor, w_attn_out: torch.Tensor, w_ff_out: torch.Tensor,
                       cols: tuple[int, int] | None = None) -> None:
    """The output projection's weights: 2-D, ``d`` = x's last dim rows (and ``cols`` columns
    when given), x's dtype and device."""
    check_tensor("w_attn_out", w_attn_out, ndim=2)
    check_tensor("w_ff_out", w_ff_out, ndim=2)
    d = x.shape[-1]
    want = None if cols is None else ((d, cols[0]), (d, cols[1]))
    got = (tuple(w_attn_out.shape), tuple(w_ff_out.shape))
    if (w_attn_out.shape[0] != d or w_ff_out.shape[0] != d) or (want is not None and got != want):
        exp = f"shapes {want[0]} and {want[1]}" if want is not None else f"{d} rows (x's last dim)"
        raise ValueError(f"w_attn_out, w_ff_out: expected {exp}, got {got[0]} and {got[1]}")
    for name, t in (("w_attn_out", w_attn_out), ("w_ff_out", w_ff_out)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (same as x), got {t.dtype}")
    check_same_device(x=x, w_attn_out=w_attn_out, w_ff_out=w_ff_out)


def fused_output_projection(o: torch.Tensor, h: torch.Tensor, x: torch.Tensor,
                            w_attn_out: torch.Tensor, w_ff_out: torch.Tensor) -> torch.Tensor:
    """``y = x + o @ w_attn_out^T + h @ w_ff_out^T`` as ONE GEMM over ``[o | h]``.

    o ``[B, T, H, hd]`` (or ``[B, T, H hd]``), h ``[B, T, F]``, x ``[B, T, d]``;
    w_attn_out ``[d, H hd]``, w_ff_out ``[d, F]``. Returns ``[B, T, d]`` with autograd.
    """
    check_tensor("x", x, ndim=3)
    check_tensor("o", o, ndim=(3, 4))
    check_tensor("h", h, ndim=3)
    _check_out_weights(x, w_attn_out, w_ff_out)
    B, T, d = x.shape
    hq = w_attn_out.shape[1]
    F_ = w_ff_out.shape[1]
    if o.shape[:2] != (B, T) or math.prod(o.shape[2:]) != hq:
        raise ValueError(f"o: expected shape ({B}, {T}, {hq}) or ({B}, {T}, H, hd) with H hd = {hq}, "
                         f"got {tuple(o.shape)}")
    if tuple(h.shape) != (B, T, F_):
        raise ValueError(f"h: expected shape ({B}, {T}, {F_}), got {tuple(h.shape)}")
    for name, t in (("o", o), ("h", h)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (same as x), got {t.dtype}")
    check_same_device(x=x, o=o, h=h)
    return _output_projection(o, h, x, w_attn_out, w_ff_out)


def _output_projection(o, h, x, w_attn_out, w_ff_out):
    """``fused_output_projection`` on checked arguments (the implementation is called
    directly when nothing needs a gradient)."""
    B, T, d = x.shape
    M = B * T
    args = (_rows("o", o, M, w_attn_out.shape[1]), _rows("h", h, M, w_ff_out.shape[1]),
            _rows("x", x, M, d), w_attn_out, w_ff_out)
    if compiling():
        check_traced(o, h, x, w_attn_out, w_ff_out)
        op = block_out_proj
    else:
        op = eager_op(_OutProjEager, _OUT_IMPLS, x.device.type, needs_grad(o, h, x, w_attn_out, w_ff_out))
    # Not a view (as the reference block's ``x + ...`` is not): an in-place op on a view
    # output (``y *= 0.5``) dropped FSDP2's pre-backward hook of the block that returned it,
    # so its weights were not gathered again for the backward (which then failed). About
    # 4 us more per call than a view on the CPU; one op whatever the grad mode (a jit.trace
    # checks that traces with and without grad give the same graph).
    return torch.ops.aten._unsafe_view(op(*args), (B, T, d))


# =========================================================================== the block

def _check_cache(cache, x: torch.Tensor, n_kv_heads, head_dim) -> None:
    """A reference ``KVCache`` that can take x's T new tokens: checked before anything is
    computed or appended (a rejected call leaves the cache as it was)."""
    from ..kv_cache import KVCache as DecodeCache
    from ..reference.layers import KVCache as RefCache

    if not isinstance(cache, RefCache):
        if isinstance(cache, DecodeCache) or not (hasattr(cache, "length") and hasattr(cache, "append")):
            raise TypeError(f"cache: expected None or a palm_fast.reference.layers.KVCache-like "
                            f"object (.length, .append(k, v) -> all k, v; palm_fast.kv_cache.KVCache "
                            f"is the decode cache of palm_fast.generate and ops.mqa_decode), got "
                            f"{type(cache).__name__}")
        return   # (another cache with the reference's interface: its own checks apply)
    B, T, _ = x.shape
    want = (B, n_kv_heads, head_dim)
    got = (cache.k.shape[0], cache.k.shape[2], cache.k.shape[3])
    if got != want:
        raise ValueError(f"cache: expected [batch, max_len, n_kv_heads, head_dim] buffers with "
                         f"(batch, n_kv_heads, head_dim) = {want} (x's batch, the block's heads), "
                         f"got {tuple(cache.k.shape)}")
    if cache.k.device != x.device:
        raise ValueError(f"cache: expected buffers on {x.device} (x's device), got {cache.k.device}")
    if cache.length + T > cache.max_len:   # (the reference cache's own error, raised up front)
        raise RuntimeError(f"KVCache overflow: {cache.length} cached + {T} new tokens exceeds "
                           f"max_len {cache.max_len}")


def parallel_block(x: torch.Tensor, ln_weight: torch.Tensor, w_in: torch.Tensor,
                   w_attn_out: torch.Tensor, w_ff_out: torch.Tensor, inv_freq: torch.Tensor, *,
                   n_heads: int, n_kv_heads: int = 1, head_dim: int, d_ff: int, eps: float = 1e-5,
                   interleaved: bool = False, positions: torch.Tensor | None = None, cache=None,
                   packed=None, recompute_attention: bool = False) -> torch.Tensor:
    """The PaLM parallel block ``x + attn_out(Attn(LN x)) + ff_out(SwiGLU(LN x))`` (see module doc).

    Weights in the reference layout (``in_proj.weight``, ``attn_out.weight``,
    ``ff_out.weight``, ``norm.weight``, ``rotary.inv_freq``). positions ``[B, T]`` default to
    ``start + t`` (start = the cache length, or 0). ``cache``: a reference ``KVCache``
    (``.length``, ``.append(k [B, T, Hk, hd], v)``): new keys/values are appended and the
    queries attend to everything cached. ``recompute_attention``: checkpoint the attention
    (its forward is recomputed in the backward instead of keeping its saved tensors).
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=3)
    B, T, d = x.shape
    interleaved = check_bool("interleaved", interleaved)
    if cache is not None:
        _check_cache(cache, x, n_kv_heads, head_dim)
    start = int(cache.length) if cache is not None else 0
    if positions is None:
        positions = (torch.arange(start, start + T, device=x.device).expand(B, T) if compiling()
                     else _default_positions(start, B, T, x.device))
    # Every argument is checked once here; the pieces below run unchecked (their inputs are
    # the checked arguments or tensors the previous piece made).
    _check_in(x, ln_weight, w_in, inv_freq, positions, n_heads, n_kv_heads, head_dim, d_ff)
    eps = check_eps(eps)
    _check_out_weights(x, w_attn_out, w_ff_out, cols=(n_heads * head_dim, d_ff))
    q, k, v, h = _input_projection(x, ln_weight, w_in, inv_freq, positions, n_heads, n_kv_heads,
                                   head_dim, d_ff, eps, interleaved, packed)
    if cache is not None:
        k, v = cache.append(k, v)
        # a cache in another dtype holds k, v rounded to it; attention as the reference's
        k, v = k.to(q.dtype), v.to(q.dtype)
        o = _sdpa(q, k, v, None, q_offset=start)
    elif recompute_attention and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        o = checkpoint(causal_mqa_attention, q, k, v, use_reentrant=False)
    else:
        o = _sdpa(q, k, v, None, q_offset=0)
    return _output_projection(o, h, x, w_attn_out, w_ff_out)


@cached_constant(maxsize=16)
def _default_positions(start: int, B: int, T: int, device: torch.device) -> torch.Tensor:
    """``start + t`` as ``[B, T]`` (cached; a contiguous tensor, so flattening is a view)."""
    return torch.arange(start, start + T, device=device).repeat(B, 1)
