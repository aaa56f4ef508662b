"""Fused tied-embedding head + cross-entropy + z-loss (the PaLM training loss).

Math (reference: ``palm_fast.reference.PaLM.loss``), h ``[M, d]`` the final LayerNorm
output, W ``[V, d]`` the tied embedding, targets ``t [M]``, s the logit scale::

    L    = s h W^T                          (logits [M, V], one GEMM; see below)
    lse  = logsumexp_j L[:, j]
    ce   = mean_i (lse_i - L[i, t_i])
    z    = z_coef * mean_i lse_i^2
    loss = ce + z

The reference builds the logits, upcasts them, then runs ``cross_entropy`` (log-softmax,
NLL) and a separate ``logsumexp`` for z: four exponentials per logit over forward and
backward and about a dozen passes over ``[M, V]`` tensors. Here the forward makes the
logits, takes each row's max, and overwrites the logits with the softmax ``P`` in place
(one exponential per logit); ``lse_i = max_i - log max_j P[i, j]`` (the largest
probability is ``1 / sum_j exp(L_ij - max_i) >= 1 / V``: no underflow). Only ``P`` is saved.

Backward, with upstream scalars g (total), g_ce, g_z::

    a   = (g + g_ce) / M,   b = 2 z_coef (g + g_z) / M,   c_i = a + b lse_i
    dL  = diag(c) P - a onehot(t)                      (never materialised)
    dh  = s (c * (P W) - a W[t])                       (GEMM [M, V] x [V, d], then rows)
    dW  = s (P^T (c * h) - a scatter_t(h))             (GEMM [V, M] x [M, d], then index_add)

so no ``[M, V]`` gradient tensor is written at all.

The logits are fp32 from an fp32 GEMM where half-precision inputs go through fp32 (the CPU
without native half GEMMs); where the GEMM runs in h's half precision (CUDA, CPUs with native
bf16 / fp16 GEMMs) they are rounded to that dtype first, as the reference's are (an fp16
logit past 65504 is inf there, and the loss NaN, in both).

CPU (fp32 GEMMs, not while torch.compile traces): the logits are made transposed,
``L^T = W (s h)^T`` ``[V, M]`` (this layout measured 3% faster than a row-wise one), and one
C++ pass (``csrc/lm_loss.cpp``) takes each column's max, reads the target logit, overwrites
the column with ``e = exp(L - max)`` and returns ``lse`` and ``r = 1 / sum e`` per token. The
softmax is never normalised: ``P = e * r`` row by row, so the backward uses ``c_i r_i`` in
place of ``c_i`` with the GEMMs ``e^T``-``W`` and ``e``-``(c r s h)``.

Tied embedding (``embed_tokens`` with a shared ``GradLink``): the input lookup
``weight[tokens]`` and the head read the same ``[V, d]`` weight, so autograd would build the
lookup's gradient in a zeroed ``[V, d]`` buffer and then add the head's ``[V, d]`` gradient
to it. With a link, the head's backward (which always runs first: the lookup feeds it)
hands its ``dW`` to the lookup's backward, which scatters its rows into it in place.

Elsewhere plain ATen ops: the same code runs on CPU and CUDA (and traces under
``torch.compile``, where a link is ignored: the compiler traces the backward, and the
link's hand-over is a side effect it cannot trace); half-precision CPU GEMMs go through
fp32 as the block's do.
The weight gradient's row scatters (``_scatter_rows_``) are bitwise reproducible in eager mode:
``index_add_`` on the CPU (a fixed order), ``index_put_(accumulate=True)`` elsewhere (ATen's
sort-based kernel on CUDA; ``index_add_`` there uses atomic adds, whose order changes run to
run). Traced by ``torch.compile`` the head takes a one-hot GEMM instead; a tied lookup's
scatter (``embed_tokens`` with a link) is lowered by Inductor to atomic adds unless
``torch.use_deterministic_algorithms(True)`` is on.
``nn.PaLM.loss`` uses this loss on the CPU only; on other devices it keeps the reference loss.
"""
from __future__ import annotations

import weakref

import torch

from .._ext import cpp
from ._checks import FLOAT_DTYPES, check_float, check_same_device, check_tensor
from ._dispatch import autocast_off, check_traced, compiling, cuda_capturing, once_differentiable
from .block import _linear, _upcast_gemm

__all__ = ["GradLink", "embed_tokens", "tied_lm_loss"]

_INT_DTYPES = (torch.int32, torch.int64)


def _gemm_dtype(h: torch.Tensor) -> torch.dtype:
    """fp32 GEMMs for fp32 and for half precision on CPUs without half matrix units."""
    return torch.float32 if h.dtype == torch.float32 or _upcast_gemm(h) else h.dtype


def _scatter_rows_(dst: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``dst[index[i]] += rows[i]`` in place, in the same order every run (see module doc)."""
    if dst.device.type == "cpu":
        dst.index_add_(0, index, rows)
    else:
        dst.index_put_((index,), rows, accumulate=True)


class GradLink:
    """Carries the head's weight gradient to the tied input embedding's backward."""

    __slots__ = ("dw", "task", "node", "weight")

    def __init__(self):
        self.dw = None
        self.task = None   # the backward pass (autograd graph task) dw belongs to
        self.node = None   # weak reference to the lookup's backward node
        self.weight = None   # weak reference to the weight the lookup read


def _hand_to_link(link: GradLink, dw: torch.Tensor) -> torch.Tensor | None:
    """Leave a head's weight gradient for the tied lookup's backward (None returned), when
    that lookup runs later in this same backward pass; several heads may share one link (a
    loss computed in chunks): their gradients are summed, in backward order. Otherwise
    (``backward(inputs=...)`` or ``autograd.grad`` that does not reach the lookup, or a
    reentrant checkpoint's nested pass) the gradient is returned, for autograd to handle as
    any other: a gradient left in the link would be added by a later pass."""
    node = link.node() if link.node is not None else None
    if node is None or not torch._C._will_engine_execute_node(node):
        return dw
    task = torch._C._current_graph_task_id()
    if link.dw is None or link.task != task:
        # (one left by another pass: ``autograd.grad`` of the lookup's output runs the head
        # but captures the gradient before the lookup)
        link.dw, link.task = dw, task
    else:
        link.dw.add_(dw)
    return None


class _TiedEmbed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, tokens, link):
        link.dw = None   # (a gradient an interrupted backward left behind)
        ctx.save_for_backward(tokens)
        ctx.link, ctx.n_rows = link, weight.shape[0]
        return torch.nn.functional.embedding(tokens, weight)

    @staticmethod
    @once_differentiable("tied_lm_loss")
    def backward(ctx, g):
        (tokens,) = ctx.saved_tensors
        link = ctx.link
        dw, link.dw = link.dw, None
        if link.task != torch._C._current_graph_task_id():
            dw = None       # left by another backward pass (see _hand_to_link)
        if dw is None:      # the head produced no weight gradient (e.g. not differentiated)
            dw = g.new_zeros((ctx.n_rows, g.shape[-1]))
        _scatter_rows_(dw, tokens.reshape(-1), g.reshape(-1, g.shape[-1]).to(dw.dtype))
        return dw, None, None


def embed_tokens(weight: torch.Tensor, tokens: torch.Tensor, link: GradLink | None = None):
    """``weight[tokens]`` (an embedding lookup). With ``link`` (shared with ``tied_lm_loss``)
    the head's weight gradient is completed in place by this lookup's backward instead of
    being summed with a separate ``[V, d]`` gradient (see module doc)."""
    if link is not None and not isinstance(link, GradLink):
        raise TypeError(f"link: expected None or a GradLink, got {type(link).__name__}")
    if link is None or not torch.is_grad_enabled() or not weight.requires_grad or compiling():
        return torch.nn.functional.embedding(tokens, weight)   # (traced: the link is ignored)
    check_traced(weight)   # (torch.func / forward AD: palm_fast's error, not autograd's)
    out = _TiedEmbed.apply(weight, tokens, link)
    link.node = weakref.ref(out.grad_fn)   # (weak: no cycle through the graph)
    link.weight = weakref.ref(weight)
    return out


class _TiedLMLoss(torch.autograd.Function):
    # (autocast off: the loss computes in fp32 / h's dtype whatever the caller's autocast)
    @staticmethod
    @autocast_off
    def forward(ctx, h, weight, targets, scale, z_coef, link):
        M = h.shape[0]
        gd = _gemm_dtype(h)
        ctx.scale, ctx.z_coef, ctx.link = scale, z_coef, link
        ctx.set_materialize_grads(False)
        ctx.transposed = _cpu_transposed(h, gd)
        if ctx.transposed:
            # Logits as [V, M] (W h^T), then the C++ softmax statistics over each column,
            # leaving e = exp(L - max) in place (csrc/lm_loss.cpp).
            hs = (h.float() * scale) if scale != 1.0 else h.float()
            lt = _linear(weight.float(), hs)                 # [V, M] = W hs^T
            lse, tgt, rsum = cpp().lm_softmax_cols_cpu(lt, targets)
            ce = (lse - tgt).mean()
            z = z_coef * lse.square().mean()
            ctx.save_for_backward(h, weight, targets, lt, lse, rsum)
            return ce + z, ce, z
        hs = (h.to(gd) * scale) if scale != 1.0 else h.to(gd)
        logits = _linear(hs, weight.to(gd))
        if logits.dtype != torch.float32:
            logits = logits.float()
        tgt = logits.gather(1, targets.view(M, 1)).view(M)
        mx = logits.amax(dim=1)
        if logits.device.type == "cpu" and not compiling():
            probs = torch._softmax(logits, 1, False, out=logits)   # in place (row-wise kernel)
        else:
            probs = torch.softmax(logits, dim=1)
        # The row max of P is P at the argmax = 1 / sum_j exp(L_j - max) >= 1 / V.
        lse = mx - probs.amax(dim=1).log()
        ce = (lse - tgt).mean()
        z = z_coef * lse.square().mean()
        ctx.save_for_backward(h, weight, targets, probs, lse)
        return ce + z, ce, z

    @staticmethod
    @autocast_off
    @once_differentiable("tied_lm_loss")
    def backward(ctx, g, g_ce, g_z):
        if ctx.transposed:
            return _TiedLMLoss._backward_transposed(ctx, g, g_ce, g_z)
        h, weight, targets, probs, lse = ctx.saved_tensors
        M = h.shape[0]
        zero = lse.new_zeros(())
        g = zero if g is None else g.float()
        a = (g + (zero if g_ce is None else g_ce.float())) / M
        b = (g + (zero if g_z is None else g_z.float())) * (2.0 * ctx.z_coef / M)
        c = (a + b * lse).view(M, 1)                       # [M, 1] fp32
        s = ctx.scale
        gd = torch.float32 if probs.dtype == torch.float32 and _gemm_dtype(h) == torch.float32 \
            else h.dtype
        w = weight.to(gd)
        dh = dw = None
        if gd != torch.float32:
            # Half-precision GEMMs: the logits' gradient D = c P - a onehot rounded ONCE from
            # fp32 (P rounded first, the one-hot taken off after the GEMMs, cancelled badly
            # where P_target is near 1: bf16 spacing there is 2^-8).
            if compiling():   # (the one-hot: a comparison the compiler fuses)
                onehot = torch.arange(probs.shape[1], device=targets.device)[None, :] == targets[:, None]
                dl = (probs * c - onehot * a).to(gd)
            else:   # one [M, V] half buffer; only the target entries are formed separately
                dl = torch.empty(probs.shape, dtype=gd, device=probs.device)
                torch.mul(probs, c, out=dl)                 # fp32 product, one rounding
                rows = torch.arange(M, device=targets.device)
                dl[rows, targets] = (probs[rows, targets] * c.view(M) - a).to(gd)
            if ctx.needs_input_grad[0]:
                dh = (torch.mm(dl, w).float() * s).to(h.dtype)
            if ctx.needs_input_grad[1]:
                dw = torch.mm(dl.t(), (h.float() * s).to(gd)).float().to(weight.dtype)
                if ctx.link is not None:
                    dw = _hand_to_link(ctx.link, dw)
            return dh, dw, None, None, None, None
        p = probs   # fp32 GEMMs from here on
        if ctx.needs_input_grad[0]:
            pw = torch.mm(p, w).float()                     # [M, d]
            dh = (pw * c - a * w.index_select(0, targets).float()) * s
            dh = dh.to(h.dtype)
        if ctx.needs_input_grad[1]:
            if compiling():
                # Traced: dW = (c P - a onehot)^T (s h), one GEMM over a [M, V] operand (the
                # one-hot is a comparison the compiler fuses) and no compiled scatter-add:
                # torch 2.6's inductor computes index_add / index_put(accumulate=True) wrongly
                # on one CPU thread (tests/test_lm_loss.py::test_torch_compile, cpu/NOTES.md).
                onehot = torch.arange(probs.shape[1], device=targets.device)[None, :] == targets[:, None]
                dlog = probs * c - onehot * a
                dw = torch.mm(dlog.t(), h.float() * s)
            else:
                hc = h.float() * (c * s)                        # [M, d]
                dw = torch.mm(p.t(), hc).float()                # [V, d]
                _scatter_rows_(dw, targets, h.float() * (-a * s))   # - a s scatter_t(h), no host sync
            dw = dw.to(weight.dtype)
            if ctx.link is not None:    # the tied lookup's backward adds its rows and returns it
                dw = _hand_to_link(ctx.link, dw)
        return dh, dw, None, None, None, None

    @staticmethod
    def _backward_transposed(ctx, g, g_ce, g_z):
        """The CPU backward from e^T ``[V, M]`` (unnormalised): P = e * rsum per token, so
        c_i rsum_i scales token i's row and no [V, M] value is rewritten."""
        h, weight, targets, et, lse, rsum = ctx.saved_tensors
        M = h.shape[0]
        zero = lse.new_zeros(())
        g = zero if g is None else g.float()
        a = (g + (zero if g_ce is None else g_ce.float())) / M
        b = (g + (zero if g_z is None else g_z.float())) * (2.0 * ctx.z_coef / M)
        c = ((a + b * lse) * rsum).view(M, 1)              # [M, 1]: P = e * rsum
        s = ctx.scale
        w = weight.float()
        dh = dw = None
        if ctx.needs_input_grad[0]:
            pw = torch.mm(et.t(), w)                        # [M, d]
            dh = ((pw * c - a * w.index_select(0, targets)) * s).to(h.dtype)
        if ctx.needs_input_grad[1]:
            hf = h.float()
            dw = _linear(et, (hf * (c * s)).t())            # [V, d] = e^T (c s h)
            dw.index_add_(0, targets, hf * (-a * s))        # fixed order on the CPU
            dw = dw.to(weight.dtype)
            if ctx.link is not None:
                dw = _hand_to_link(ctx.link, dw)
        return dh, dw, None, None, None, None


def _cpu_transposed(h: torch.Tensor, gemm_dtype: torch.dtype) -> bool:
    """The CPU path with transposed logits and the C++ softmax statistics: fp32 GEMMs on
    the CPU, outside torch.compile tracing (which keeps the ATen form)."""
    return (h.device.type == "cpu" and gemm_dtype == torch.float32
            and not compiling())


def tied_lm_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                 scale: float = 1.0, z_coef: float = 0.0, link: GradLink | None = None):
    """``(total, ce, z)`` of the tied-embedding head: ``logits = scale * h @ weight^T`` (fp32;
    rounded to h's dtype first where the GEMM runs in half precision, see module doc),
    ``ce = mean cross_entropy(logits, targets)``, ``z = z_coef * mean(logsumexp(logits)^2)``,
    ``total = ce + z``, without materialising any ``[M, V]`` gradient (see module doc).

    h ``[M, d]`` (float), weight ``[V, d]`` (h's dtype), targets ``[M]`` int in ``[0, V)``.
    Gradients flow to h and weight. ``link``: the ``GradLink`` given to the ``embed_tokens``
    call that produced h's input (tied embedding; the weight gradient then comes out of that
    lookup's backward; several calls, e.g. a loss in token chunks, may share one link). Raises
    TypeError/ValueError naming the bad argument.
    """
    check_tensor("h", h, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("weight", weight, dtypes=(h.dtype,), ndim=2)
    check_tensor("targets", targets, dtypes=_INT_DTYPES, ndim=1)
    if weight.shape[1] != h.shape[1]:
        raise ValueError(f"weight: expected shape (V, {h.shape[1]}) (h's last dim), "
                         f"got {tuple(weight.shape)}")
    if targets.shape[0] != h.shape[0]:
        raise ValueError(f"targets: expected shape ({h.shape[0]},) (h's rows), "
                         f"got {tuple(targets.shape)}")
    if h.shape[0] == 0:
        raise ValueError("h: expected at least one row, got 0")
    if h.shape[1] == 0:
        raise ValueError(f"h: expected at least one feature, got shape {tuple(h.shape)}")
    check_same_device(h=h, weight=weight, targets=targets)
    scale = check_float("scale", scale, positive=True)
    z_coef = check_float("z_coef", z_coef)
    if z_coef < 0:
        raise ValueError(f"z_coef: expected a float >= 0, got {z_coef!r}")
    if link is not None and not isinstance(link, GradLink):
        raise TypeError(f"link: expected None or a GradLink (the one given to embed_tokens), got "
                        f"{type(link).__name__}")
    # torch.func / forward AD: palm_fast's error, not autograd's (nor, on torch 2.6, the
    # target check's host read failing on a functorch-wrapped tensor)
    check_traced(h, weight)
    targets = targets.long().contiguous()
    # (one host read; skipped while tracing or capturing a CUDA graph, where it cannot run)
    if not compiling() and not cuda_capturing() and targets.numel():
        lo, hi = torch.stack(torch.aminmax(targets)).tolist()
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"targets: expected ids in [0, {weight.shape[0]}) (weight's rows), "
                             f"got values in [{lo}, {hi}]")
    if compiling():   # (the compiler traces the backward; the link's hand-over is a side effect)
        link = None
    if link is not None and (link.weight is None or link.weight() is not weight):
        # a link whose lookup read another tensor (an untied output weight, a copy): handing
        # this head's gradient over would add it to the lookup's weight and leave this one's
        # None. Not used: autograd sums the two gradients as for any other graph.
        link = None
    return _TiedLMLoss.apply(h, weight, targets, float(scale), float(z_coef), link)
