"""Rotary position embedding of q and k: the ``palm_fast::rope`` / ``palm_fast::rope_``
custom ops (CPU -> C++ ``_C.rope_cpu``, CUDA -> Triton ``kernels.rope.rope``) and the
checked public functions ``rope`` and ``rope_``.

The math is ``palm_fast.reference.functional.apply_rope`` applied to q ``[B, T, H, D]``
and k ``[B, T, Hk, D]`` with the same positions. The rotation is orthogonal, so the
backward is the same op with ``inverse`` flipped (rotation by ``-theta``).
"""
from __future__ import annotations

import torch

from palm_fast._ext import cpp
from palm_fast.kernels._common import check_float_dtype
from palm_fast.reference.functional import rope_inv_freq

from ._checks import (
    check_bool,
    check_float,
    check_int,
    check_last_dim_contiguous,
    check_no_grad,
    check_same_device,
    check_same_dtype,
    check_tensor,
    unit_last_dim,
)
from ._dispatch import (
    cached_constant,
    check_no_transforms,
    check_traced,
    compiling,
    eager_ctx,
    eager_function,
    eager_op,
    needs_grad,
)

_INT_DTYPES = (torch.int32, torch.int64)


@cached_constant(maxsize=32)
def _cached_zero_offsets(device: torch.device, B: int) -> torch.Tensor:
    """Eager mode: the default offsets, zeros ``[B]`` (allocated once; never written)."""
    return torch.zeros(B, dtype=torch.int32, device=device)


@cached_constant(maxsize=32)
def _cached_inv_freq(rotary_dim: int, base: float, device: torch.device) -> torch.Tensor:
    """Eager mode: the default frequencies, built once per (rotary dim, base, device)."""
    # (device="cpu" explicitly: the CPU's pow(), whatever torch.set_default_device says)
    return rope_inv_freq(rotary_dim, base, device="cpu").to(device)


def _launch(q, k, q_out, k_out, inv_freq, pos, pos_is_offset, interleaved, inverse):
    if q.device.type == "cpu":
        # (the raw ops' check, as the Triton launcher's: the C++ kernel computes fp64 in fp32)
        check_float_dtype("q", q)   # (k: the C++ kernel checks that it is q's dtype)
        cpp().rope_cpu(q, k, q_out, k_out, inv_freq.contiguous(), pos, pos_is_offset,
                       interleaved, inverse)
    else:
        from palm_fast.kernels.rope import rope as rope_triton

        rope_triton(q, k, inv_freq, pos, pos_is_offset=pos_is_offset, interleaved=interleaved,
                    inverse=inverse, q_out=q_out, k_out=k_out)


# ---------------------------------------------------------------- out of place (autograd)
def _rope_out_of_place(q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor, pos: torch.Tensor,
                       pos_is_offset: bool, interleaved: bool,
                       inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q and k into new contiguous tensors (see the module docstring)."""
    q, k = unit_last_dim(q), unit_last_dim(k)
    # (empty_like: a torch.Size argument costs about 1.5 us more to parse than a tensor)
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format)
    k_out = torch.empty_like(k, memory_format=torch.contiguous_format)
    _launch(q, k, q_out, k_out, inv_freq, pos, pos_is_offset, interleaved, inverse)
    return q_out, k_out


rope_op = torch.library.custom_op("palm_fast::rope", mutates_args=())(_rope_out_of_place)


@rope_op.register_fake
def _(q, k, inv_freq, pos, pos_is_offset, interleaved, inverse):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device))


def _rope_setup_context(ctx, inputs, output):
    _, _, inv_freq, pos, pos_is_offset, interleaved, inverse = inputs
    ctx.save_for_backward(inv_freq, pos)
    ctx.flags = (pos_is_offset, interleaved, inverse)


def _rope_backward(ctx, grad_q, grad_k):
    inv_freq, pos = ctx.saved_tensors
    pos_is_offset, interleaved, inverse = ctx.flags
    # d(R x)/dx = R, so the gradient is R^T g: the same rotation with the angle negated.
    if not eager_ctx(ctx):
        rotate = rope_op                 # traced by AOTAutograd under torch.compile
    elif torch.is_grad_enabled():
        rotate = _RopeEager.apply        # create_graph=True: keep the backward differentiable
    else:
        rotate = _rope_out_of_place      # plain eager backward: no autograd bookkeeping
    gq, gk = rotate(grad_q, grad_k, inv_freq, pos, pos_is_offset, interleaved, not inverse)
    return gq, gk, None, None, None, None, None


rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)
# The same implementation and autograd functions without the dispatcher (eager mode).
_ROPE_IMPLS = {"cpu": _rope_out_of_place, "cuda": _rope_out_of_place}
_RopeEager = eager_function("rope", _ROPE_IMPLS, _rope_setup_context, _rope_backward,
                            double_backward=True)


# ---------------------------------------------------------------- in place (no autograd)
@torch.library.custom_op("palm_fast::rope_", mutates_args=("q", "k"))
def rope_inplace_op(q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor, pos: torch.Tensor,
                    pos_is_offset: bool, interleaved: bool, inverse: bool) -> None:
    """RoPE of q and k written back into q and k. The overlap check runs here too: under
    torch.compile (which cannot see storage while tracing) it is this call, on the real
    tensors, that refuses q / k sharing elements (else rotated twice)."""
    _check_no_overlap(q, k)
    _launch(q, k, q, k, inv_freq, pos, pos_is_offset, interleaved, inverse)


@rope_inplace_op.register_fake
def _(q, k, inv_freq, pos, pos_is_offset, interleaved, inverse):
    return None


# ---------------------------------------------------------------- public functions
def _prepare(q, k, positions, offsets, inv_freq, base, rotary_dim):
    """Check the arguments of ``rope``/``rope_``; return (inv_freq, pos, pos_is_offset)."""
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_same_dtype(q=q, k=k)
    check_same_device(q=q, k=k)
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k: expected shape [{B}, {T}, Hk, {D}] (B, T, D of q), got {tuple(k.shape)}")
    check_last_dim_contiguous("q", q)
    check_last_dim_contiguous("k", k)
    if inv_freq is None:
        base = check_float("base", base, positive=True)
        rdim = D if rotary_dim is None else check_int("rotary_dim", rotary_dim)
        if rotary_dim is None and D % 2:
            raise ValueError(f"q: the head dim {D} is odd: RoPE rotates pairs of features; pass an "
                             "even rotary_dim < the head dim to rotate part of each head")
        if rdim <= 0 or rdim % 2 or rdim > D:
            raise ValueError(f"rotary_dim: expected a positive even integer <= head dim {D}, got {rdim}")
        # Computed on the CPU and moved: pow() on another device can differ in the last
        # bit, which large positions amplify; this keeps every backend (and the
        # reference module, whose buffer is built on the CPU) on the same frequencies.
        inv_freq = (rope_inv_freq(rdim, base, device="cpu").to(q.device) if compiling()
                    else _cached_inv_freq(rdim, float(base), q.device))
    else:
        check_tensor("inv_freq", inv_freq, dtypes=(torch.float32,), ndim=1)
        check_no_grad("inv_freq", inv_freq)
        check_same_device(q=q, inv_freq=inv_freq)
        rdim = 2 * inv_freq.numel()
        if rotary_dim is not None and rotary_dim != rdim:
            raise ValueError(f"rotary_dim: expected {rdim} (2 * len(inv_freq)) or None, got {rotary_dim}")
        if rdim == 0 or rdim > D:
            raise ValueError(f"inv_freq: expected 1 <= len(inv_freq) <= head dim / 2 = {D // 2}, "
                             f"got {inv_freq.numel()}")
    if positions is not None and offsets is not None:
        raise ValueError("positions, offsets: expected at most one of them, got both")
    if positions is not None:
        check_tensor("positions", positions, dtypes=_INT_DTYPES, ndim=2)
        check_same_device(q=q, positions=positions)
        if tuple(positions.shape) != (B, T):
            raise ValueError(f"positions: expected shape ({B}, {T}), got {tuple(positions.shape)}")
        return inv_freq, positions, False
    if offsets is None:  # positions 0..T-1: one zero offset broadcast over the batch
        offsets = (torch.zeros(1, dtype=torch.int32, device=q.device).expand(B) if compiling()
                   else _cached_zero_offsets(q.device, B))
    check_tensor("offsets", offsets, dtypes=_INT_DTYPES, ndim=1)
    check_same_device(q=q, offsets=offsets)
    if offsets.shape[0] != B:
        raise ValueError(f"offsets: expected shape ({B},), got {tuple(offsets.shape)}")
    return inv_freq, offsets, True


def rope(q: torch.Tensor, k: torch.Tensor, *, positions: torch.Tensor | None = None,
         offsets: torch.Tensor | None = None, inv_freq: torch.Tensor | None = None,
         base: float = 10000.0, rotary_dim: int | None = None,
         interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q ``[B, T, H, D]`` and k ``[B, T, Hk, D]`` (autograd).

    positions: ``[B, T]`` int32/int64; or offsets: ``[B]`` (position = offsets[b] + t);
    neither: positions 0..T-1. inv_freq: ``[R/2]`` fp32, default
    ``rope_inv_freq(rotary_dim or D, base)``; features ``R..D-1`` pass through.
    interleaved: pairs ``(2i, 2i+1)`` instead of rotate-half ``(i, i + R/2)``.
    q and k may be strided views (e.g. of a fused projection); the last dim must be
    unit-stride. Returns new contiguous ``(q_out, k_out)`` in the input dtype.
    Raises TypeError/ValueError naming the bad argument.
    """
    interleaved = check_bool("interleaved", interleaved)
    inv_freq, pos, pos_is_offset = _prepare(q, k, positions, offsets, inv_freq, base, rotary_dim)
    if compiling():
        check_traced(q, k)
        op = rope_op
    else:
        op = eager_op(_RopeEager, _ROPE_IMPLS, q.device.type, needs_grad(q, k))
    return op(q, k, inv_freq, pos, pos_is_offset, interleaved, False)


def _heads_alias(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether b's first head is one of a's heads (b a head slice of a, e.g. ``q[:, :, :1]``)."""
    if a.stride(0) != b.stride(0) or a.stride(1) != b.stride(1) or a.stride(2) == 0:
        return False
    delta = b.storage_offset() - a.storage_offset()
    return delta % a.stride(2) == 0 and 0 <= delta // a.stride(2) < a.shape[2]


def _row_intervals(t: torch.Tensor) -> list[tuple[int, int]] | None:
    """The element offsets one (b, t) row of ``t`` [B, T, H, D] covers, relative to its first
    element, as sorted disjoint half-open intervals; None if a row's heads overlap each
    other (not a layout the exact check below handles)."""
    _, _, H, D = t.shape
    _, _, s2, s3 = t.stride()
    if D > 1 and s3 != 1:
        return None
    if H == 1 or s2 == D:  # heads back to back: one interval (the usual layout)
        return [(0, H * D)]
    spans = sorted((h * s2, h * s2 + D) for h in range(H))
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        return None
    return spans


def _intervals_meet(a: list[tuple[int, int]], b: list[tuple[int, int]], shift: int) -> bool:
    """Whether the union of intervals ``a`` meets the union of ``b`` shifted by ``shift``."""
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0] + shift), min(a[i][1], b[j][1] + shift)
        if lo < hi:
            return True
        if a[i][1] <= b[j][1] + shift:
            i += 1
        else:
            j += 1
    return False


def _row_stride(t: torch.Tensor) -> int | None:
    """``s`` when the B * T rows of ``t`` [B, T, H, D] start ``n * s`` elements (n < B * T,
    in some order) after its first element: batch-major (``stride(0) == T * stride(1)``),
    sequence-major (``stride(1) == B * stride(0)``, e.g. a transposed ``[T, B, W]``
    projection) or one of B, T of size 1 (a size-1 dim's stride means nothing); 0 for a
    single row; None for another layout."""
    dims = sorted((st, n) for n, st in zip(t.shape[:2], t.stride()[:2]) if n > 1)
    if not dims:
        return 0
    if len(dims) == 1:
        return dims[0][0]
    (sa, na), (sb, _) = dims
    return sa if sb == sa * na else None


def _rows_overlap(q: torch.Tensor, k: torch.Tensor) -> bool | None:
    """Exact overlap test of q and k in one storage when both are rows of one [B * T, W]
    buffer (the layout of a fused projection and its head slices, batch- or sequence-major:
    ``_row_stride``): the rows of each are ``s1`` elements apart and a row of each fits in
    ``s1`` elements. Row n of q starts at ``q0 + n * s1``, so its element i meets k's row
    n', element j iff ``(n - n') * s1 = j + d - i`` with d = k0 - q0, which for i, j in
    [0, s1) leaves two candidate row distances. One row each (B * T == 1): the two rows'
    intervals at distance d. None when the layout is another one."""
    B, T = q.shape[0], q.shape[1]
    if k.shape[0] != B or k.shape[1] != T:
        return None
    iq, ik = _row_intervals(q), _row_intervals(k)
    if iq is None or ik is None:
        return None
    d = k.storage_offset() - q.storage_offset()
    rows = B * T
    if rows == 1:
        return _intervals_meet(iq, ik, d)
    s1 = _row_stride(q)
    if not s1 or _row_stride(k) != s1 or iq[-1][1] > s1 or ik[-1][1] > s1:
        return None
    a, r = divmod(d, s1)   # d = a * s1 + r, 0 <= r < s1
    # n - n' = a: i = j + r;  n - n' = a + 1: i = j + r - s1  (any row distance < rows occurs)
    return ((abs(a) < rows and _intervals_meet(iq, ik, r))
            or (abs(a + 1) < rows and _intervals_meet(iq, ik, r - s1)))


def _self_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` [B, T, H, D] (unit last stride) share memory: a
    broadcast (stride-0) dim, heads of a row that overlap, or rows that overlap when they
    are ``_row_stride`` apart (e.g. ``unfold`` / ``as_strided`` windows). Other layouts
    pass, as torch's in-place ops let them."""
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        return True
    if t.numel() == 0:
        return False
    iv = _row_intervals(t)
    if iv is None:
        return True
    s, span = _row_stride(t), iv[-1][1]
    if not s or s >= span:
        return False
    # Rows m * s apart (1 <= m < rows: every such distance occurs) meet iff for some pair of
    # intervals a, b: a.lo - b.hi < m * s < a.hi - b.lo. Per pair the smallest candidate m
    # decides; all pairs at once (a head-major [B=1, H, T, D] view: H intervals, T rows).
    rows = t.shape[0] * t.shape[1]
    lo = torch.tensor([a for a, _ in iv], dtype=torch.int64, device="cpu")
    hi = torch.tensor([b for _, b in iv], dtype=torch.int64, device="cpu")
    m = torch.div(lo[:, None] - hi[None, :], s, rounding_mode="floor").clamp(min=0) + 1
    return bool(((m < rows) & (m * s < hi[:, None] - lo[None, :])).any())


def _check_no_overlap(q: torch.Tensor, k: torch.Tensor) -> None:
    """In place, an element reached twice is rotated twice. Rejected: q or k sharing memory
    with itself (``_self_overlap``: a broadcast dim, overlapping heads or rows); q and k
    sharing an element, tested exactly when both are rows of one buffer (views of a fused
    projection, batch- or sequence-major, head slices: ``_rows_overlap``), otherwise where
    it can be seen cheaply (as torch's in-place ops do): both dense and overlapping, or one
    a head slice of the other (``torch._C._overlaps`` is not used: it reports any two views
    of one storage). Views of one fused projection (q | k | ...) pass."""
    for name, t in (("q", q), ("k", k)):
        if _self_overlap(t):
            raise ValueError(f"{name}: rotated in place, but several of its elements share memory "
                             f"(shape {tuple(t.shape)}, strides {tuple(t.stride())}, e.g. an expand() "
                             f"or overlapping windows); pass a copy")
    if q.numel() == 0 or k.numel() == 0 or q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr():
        return
    exact = _rows_overlap(q, k)
    if exact is None:
        q0, k0 = q.storage_offset(), k.storage_offset()
        dense = (q.is_contiguous() and k.is_contiguous()
                 and q0 < k0 + k.numel() and k0 < q0 + q.numel())  # element ranges meet
        exact = dense or _heads_alias(q, k) or _heads_alias(k, q)
    if exact:
        raise ValueError("k: rotated in place, but it shares memory with q (e.g. a view of q's heads); "
                         "pass non-overlapping tensors")


def rope_(q: torch.Tensor, k: torch.Tensor, *, positions: torch.Tensor | None = None,
          offsets: torch.Tensor | None = None, inv_freq: torch.Tensor | None = None,
          base: float = 10000.0, rotary_dim: int | None = None,
          interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place ``rope``: rotates q and k in their own storage and returns ``(q, k)``.

    No autograd: raises RuntimeError when grad mode is on and q or k requires grad
    (use ``rope``). Same arguments as ``rope``. q and k must not share elements (each is
    rotated once per element): a broadcast dim, or q and k sharing an element, raises
    ValueError. Sharing is tested exactly when q and k are rows of one ``[B * T, W]`` buffer
    (views of a fused projection (q | k | ...) are fine), otherwise where it is cheap to
    see (both dense, or one a head slice of the other).
    """
    if not compiling():
        check_no_transforms(q, k)
    if torch.is_grad_enabled() and (getattr(q, "requires_grad", False) or getattr(k, "requires_grad", False)):
        raise RuntimeError("rope_: in-place RoPE does not support autograd, but q or k requires grad; "
                           "use palm_fast.ops.rope or run under torch.no_grad()")
    interleaved = check_bool("interleaved", interleaved)
    inv_freq, pos, pos_is_offset = _prepare(q, k, positions, offsets, inv_freq, base, rotary_dim)
    if not compiling():  # (tracing: fake tensors have no storage to compare)
        _check_no_overlap(q, k)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        rope_inplace_op(q, k, inv_freq, pos, pos_is_offset, bool(interleaved), False)
    elif compiling():
        # A TorchDispatchMode (not a compiler): it sees a mutable custom op's arguments with
        # their versions already bumped (torch's custom-op layer does that first), so a mode
        # that keys on versions misses the mutation: allow_mutation_on_saved_tensors() did not
        # clone a saved q, and its backward read the rotated values silently. The out-of-place
        # op and two aten copy_ calls are mutations every mode sees.
        q_out, k_out = rope_op(q, k, inv_freq, pos, pos_is_offset, bool(interleaved), False)
        q.copy_(q_out)
        k.copy_(k_out)
    else:  # eager: the same launch without the dispatcher, so its bookkeeping is done here
        if not torch.is_inference_mode_enabled() and (q.is_inference() or k.is_inference()):
            raise RuntimeError("rope_: q or k is an inference tensor (made under "
                               "torch.inference_mode()); an in-place update of one is only "
                               "allowed inside inference mode")
        _launch(q, k, q, k, inv_freq, pos, pos_is_offset, bool(interleaved), False)
        # As any in-place op: a tensor autograd saved before this call is now stale, and
        # its backward must raise rather than read the rotated values.
        torch.autograd.graph.increment_version(q)
        torch.autograd.graph.increment_version(k)
    return q, k
