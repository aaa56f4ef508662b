"""The fused tied head + cross-entropy + z-loss (palm_fast.ops.lm_loss) against the
reference's math: values and gradients (total, ce alone, z alone), every dtype by the
tolerance rule, odd shapes, bad input, and the fast model's loss against the reference's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, assert_close_by_rule, randn, requires_cuda

from palm_fast.ops.lm_loss import tied_lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(h, w, t, scale, z_coef):
    """The reference PaLM.loss head: logits in h's dtype, upcast, CE + z-loss."""
    logits = (h @ w.t()) * scale if scale != 1.0 else h @ w.t()
    if logits.dtype != torch.float64:     # fp64 stays fp64 (the high-precision reference)
        logits = logits.float()
    ce = F.cross_entropy(logits, t)
    z = z_coef * torch.logsumexp(logits, dim=-1).square().mean()
    return ce + z, ce, z


def _grads(fn, h, w, t, which, scale, z_coef):
    h = h.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    out = fn(h, w, t, scale, z_coef)
    loss = out[which] if which is not None else out[0] * 0.7 + out[1] * 0.2 + out[2] * 1.3
    dh, dw = torch.autograd.grad(loss, (h, w))
    return [o.detach() for o in out], dh, dw


def _fast(h, w, t, scale, z_coef):
    return tied_lm_loss(h, w, t, scale=scale, z_coef=z_coef)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,d,V", [(37, 24, 101), (64, 32, 512), (1, 8, 3), (19, 16, 601)])
def test_matches_reference(dtype, M, d, V):
    scale, z_coef = d ** -0.5, 1e-2    # a large z coefficient so its gradient is visible
    h = randn(M, d, dtype=dtype, scale=2.0)
    w = randn(V, d, dtype=dtype)
    t = torch.randint(0, V, (M,))
    for which in (0, 1, 2, None):        # total, ce alone, z alone, a mix of the three
        out, dh, dw = _grads(_fast, h, w, t, which, scale, z_coef)
        ref = _grads(_reference, h.double(), w.double(), t, which, scale, z_coef)
        eager = _grads(_reference, h, w, t, which, scale, z_coef)
        for i, name in enumerate(("total", "ce", "z")):
            assert out[i].dtype == torch.float32
            # (the loss values are fp32 scalars whatever h's dtype: the atol follows the
            # GEMM's input dtype, not the output's, hence this per-dtype override of the rule)
            assert_close_by_rule(out[i], ref[0][i].float(), eager[0][i], name=name,
                                 atol=1e-5 if dtype == torch.float32 else 2e-3)
        assert dh.dtype == dtype and dw.dtype == dtype
        assert_close_by_rule(dh, ref[1].to(dtype), eager[1], name=f"dh[{which}]")
        assert_close_by_rule(dw, ref[2].to(dtype), eager[2], name=f"dw[{which}]")


def test_fp32_tight_and_deterministic():
    h, w = randn(50, 16), randn(77, 16)
    t = torch.randint(0, 77, (50,))
    a = _grads(_fast, h, w, t, 0, 0.25, 1e-4)
    b = _grads(_fast, h, w, t, 0, 0.25, 1e-4)
    r = _grads(_reference, h.double(), w.double(), t, 0, 0.25, 1e-4)
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    torch.testing.assert_close(a[0][0].double(), r[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a[1].double(), r[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a[2].double(), r[2], rtol=1e-5, atol=1e-7)


def test_large_logits_no_overflow():
    h = randn(8, 4, scale=300.0)
    w = randn(10, 4)
    t = torch.randint(0, 10, (8,))
    out, dh, dw = _grads(_fast, h, w, t, 0, 1.0, 1e-4)
    ref = _grads(_reference, h.double(), w.double(), t, 0, 1.0, 1e-4)
    assert torch.isfinite(out[0]) and torch.isfinite(dh).all() and torch.isfinite(dw).all()
    torch.testing.assert_close(out[0].double(), ref[0][0], rtol=1e-5, atol=1e-3)


def test_only_one_input_needs_grad():
    h, w = randn(9, 8), randn(13, 8, scale=0.5).requires_grad_(True)
    t = torch.randint(0, 13, (9,))
    (dw,) = torch.autograd.grad(tied_lm_loss(h, w, t, scale=0.5, z_coef=1e-3)[0], (w,))
    _, _, dw_ref = _grads(_reference, h.double(), w.double(), t, 0, 0.5, 1e-3)
    torch.testing.assert_close(dw.double(), dw_ref, rtol=1e-5, atol=1e-7)


def test_bad_input():
    h, w, t = randn(4, 8), randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(TypeError, match="h: expected a torch.Tensor"):
        tied_lm_loss(h.tolist(), w, t)
    with pytest.raises(ValueError, match="h: expected 2 dims"):
        tied_lm_loss(h[None], w, t)
    with pytest.raises(TypeError, match="weight: expected dtype"):
        tied_lm_loss(h, w.double(), t)
    with pytest.raises(ValueError, match=r"weight: expected shape \(V, 8\)"):
        tied_lm_loss(h, randn(10, 7), t)
    with pytest.raises(TypeError, match="targets: expected dtype"):
        tied_lm_loss(h, w, t.float())
    with pytest.raises(ValueError, match=r"targets: expected shape \(4,\)"):
        tied_lm_loss(h, w, t[:3])
    with pytest.raises(ValueError, match="h: expected at least one row"):
        tied_lm_loss(h[:0], w, t[:0])
    with pytest.raises(ValueError, match="h: expected at least one feature"):
        tied_lm_loss(h[:, :0], w[:, :0], t)
    with pytest.raises(ValueError, match="scale: expected a finite float > 0"):
        tied_lm_loss(h, w, t, scale=0.0)
    with pytest.raises(ValueError, match="scale: expected a finite float > 0"):
        tied_lm_loss(h, w, t, scale=float("inf"))
    with pytest.raises(ValueError, match="z_coef: expected a float >= 0"):
        tied_lm_loss(h, w, t, z_coef=-1.0)


def test_model_loss_and_gradients_match_reference():
    """The fast PaLM's fused loss against the reference model's loss (same weights)."""
    import palm_fast
    from palm_fast.nn import PaLM
    from palm_fast.reference import PaLM as RefPaLM

    cfg = palm_fast.get_config("palm-tiny")
    torch.manual_seed(0)
    ref = RefPaLM(cfg)
    fast = PaLM(cfg)
    fast.load_state_dict(ref.state_dict())
    tok = torch.randint(0, cfg.vocab_size, (2, 19))
    out_r, out_f = ref.loss(tok), fast.loss(tok)
    for a, b in zip(out_f, out_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    (out_r[0] + out_r[2]).backward()
    (out_f[0] + out_f[2]).backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="targets: expected shape"):
        fast.loss(tok[:, :5], tok[:, :4])
    with pytest.raises(ValueError, match="token ids must lie"):
        fast.loss(tok + cfg.vocab_size)


def test_tied_embedding_link():
    """embed_tokens + tied_lm_loss sharing a GradLink: the weight gradient (head + lookup)
    equals autograd's sum of the two; a lookup whose head gave no gradient still works."""
    from palm_fast.ops.lm_loss import GradLink, embed_tokens

    w = randn(23, 8).requires_grad_(True)
    tok = torch.randint(0, 23, (3, 5))
    tgt = torch.randint(0, 23, (15,))

    def run(link):
        x = embed_tokens(w, tok, link)
        h = torch.tanh(x).flatten(0, 1) * 1.5
        return tied_lm_loss(h, w, tgt, scale=0.5, z_coef=1e-3, link=link)[0]

    (g_link,) = torch.autograd.grad(run(GradLink()), (w,))
    (g_plain,) = torch.autograd.grad(run(None), (w,))
    torch.testing.assert_close(g_link, g_plain, rtol=1e-6, atol=1e-7)
    (g_lookup,) = torch.autograd.grad((embed_tokens(w, tok, GradLink()) * 2).sum(), (w,))
    want = torch.zeros(23, 8).index_add_(0, tok.flatten(), torch.full((15, 8), 2.0))
    torch.testing.assert_close(g_lookup, want)


@pytest.mark.parametrize("transposed", [True, False])
def test_tied_embedding_link_shared_by_chunked_losses(monkeypatch, transposed):
    """One link, the loss computed in two token chunks (two head backwards before the
    lookup's): both chunks' weight gradients count (the second overwrote the first). A link
    reused after a backward that never reached its lookup starts clean."""
    from palm_fast.ops import lm_loss as L
    from palm_fast.ops.lm_loss import GradLink, embed_tokens

    monkeypatch.setattr(L, "_cpu_transposed", lambda h, gd: transposed)
    w = randn(23, 8).requires_grad_(True)
    tok = torch.randint(0, 23, (2, 6))
    tgt = torch.randint(0, 23, (12,))

    def run(link):
        h = torch.tanh(embed_tokens(w, tok, link)).flatten(0, 1)
        return (tied_lm_loss(h[:5], w, tgt[:5], z_coef=1e-3, link=link)[0]
                + tied_lm_loss(h[5:], w, tgt[5:], z_coef=1e-3, link=link)[0])

    link = GradLink()
    x = embed_tokens(w, tok, link)
    torch.autograd.grad(tied_lm_loss(torch.tanh(x).flatten(0, 1), w, tgt, link=link)[0], (x,))
    assert link.dw is not None   # left behind: the gradient was captured before the lookup
    (g_link,) = torch.autograd.grad(run(link), (w,))
    (g_plain,) = torch.autograd.grad(run(None), (w,))
    torch.testing.assert_close(g_link, g_plain, rtol=1e-6, atol=1e-7)


def test_tied_embedding_link_after_a_partial_backward():
    """A backward pass that runs the head's backward but not the lookup's (backward(inputs=
    ...), or autograd.grad of other tensors) must not leave its weight gradient to be added
    by the next pass over the same graph."""
    from palm_fast.ops.lm_loss import GradLink, embed_tokens

    w = randn(23, 8).requires_grad_(True)
    s = torch.full((8,), 1.5, requires_grad=True)
    tok = torch.randint(0, 23, (3, 5))
    tgt = torch.randint(0, 23, (15,))

    def loss(link):
        h = torch.tanh(embed_tokens(w, tok, link)).flatten(0, 1) * s
        return tied_lm_loss(h, w, tgt, z_coef=1e-3, link=link)[0]

    (want,) = torch.autograd.grad(loss(None), (w,))
    total = loss(GradLink())
    total.backward(inputs=[s], retain_graph=True)
    torch.autograd.grad(total, (s,), retain_graph=True)
    assert w.grad is None
    total.backward()
    torch.testing.assert_close(w.grad, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_gemm_path_confident_predictions(monkeypatch, dtype, compiled):
    """The half-precision GEMM path (CUDA; CPUs with bf16 / fp16 matrix units; simulated
    here): with confident predictions (P_target near 1) the one-hot was subtracted after
    rounding P, and dW was 17x the eager error in bf16. Errors vs fp64 within 2x eager's."""
    from palm_fast.ops import lm_loss as L

    monkeypatch.setattr(L, "_upcast_gemm", lambda t: False)
    g = torch.Generator().manual_seed(0)
    M, d, V = 64, 64, 512
    w = torch.randn(V, d, generator=g)
    t = torch.randint(0, V, (M,), generator=g)
    h = torch.randn(M, d, generator=g) * 0.5 + 16.0 * w[t] / d ** 0.5
    h, w, s = h.to(dtype), w.to(dtype), d ** -0.5

    def ref(hh, ww):
        logits = (hh @ ww.t()) * s
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return F.cross_entropy(logits, t) + 1e-4 * torch.logsumexp(logits, -1).square().mean()

    def grads(fn, cast=None):
        hh = (h.to(cast) if cast else h).detach().requires_grad_(True)
        ww = (w.to(cast) if cast else w).detach().requires_grad_(True)
        return [x.double() for x in torch.autograd.grad(fn(hh, ww), (hh, ww))]

    def loss(hh, ww):
        return tied_lm_loss(hh, ww, t, scale=s, z_coef=1e-4)[0]

    if compiled:   # (traced: the one-hot form of the same gradient)
        torch._dynamo.reset()
        loss = torch.compile(loss, fullgraph=True, backend="aot_eager")
    fast = grads(loss)
    eager, exact = grads(ref), grads(ref, torch.float64)
    for f, e, x in zip(fast, eager, exact):
        assert (f - x).abs().max() <= 2 * (e - x).abs().max() + 1e-7


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("chunks", [1, 3])
def test_tied_embedding_link_inside_checkpoints(reentrant, chunks):
    """Loss chunks inside activation checkpoints: a reentrant checkpoint runs its backward
    as a nested pass in which the lookup does not run; the head's gradient must still reach
    the weight (keyed on the pass, it was dropped), once per chunk."""
    from torch.utils.checkpoint import checkpoint

    from palm_fast.ops.lm_loss import GradLink, embed_tokens

    w = randn(23, 8).requires_grad_(True)
    tok = torch.randint(0, 23, (3, 6))
    tgt = torch.randint(0, 23, (18,))

    def run(link):
        h = torch.tanh(embed_tokens(w, tok, link)).flatten(0, 1)
        parts = torch.tensor_split(torch.arange(18), chunks)
        return sum(checkpoint(lambda hh, i=i: tied_lm_loss(hh[i], w, tgt[i], z_coef=1e-3, link=link)[0],
                              h, use_reentrant=reentrant) for i in parts)

    run(None).backward()   # (a reentrant checkpoint does not support autograd.grad)
    want, w.grad = w.grad, None
    run(GradLink()).backward()
    torch.testing.assert_close(w.grad, want, rtol=1e-6, atol=1e-7)


def test_torch_compile():
    h, w = randn(10, 8).requires_grad_(True), randn(13, 8).requires_grad_(True)
    t = torch.randint(0, 13, (10,))

    def f(h, w, t):
        return tied_lm_loss(h, w, t, scale=0.5, z_coef=1e-3)[0]

    a = torch.compile(f, fullgraph=True)(h, w, t)
    ga = torch.autograd.grad(a, (h, w))
    b = f(h, w, t)
    gb = torch.autograd.grad(b, (h, w))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("transposed", [True, False])
def test_cpu_paths_agree(monkeypatch, transposed):
    """The CPU path (transposed logits + C++ softmax statistics) and the ATen path (what CUDA
    and torch.compile run) both match the fp64 reference; ragged M (C++ column tails) and a
    V of several row chunks with a partial one."""
    import importlib

    mod = importlib.import_module("palm_fast.ops.lm_loss")
    if not transposed:
        monkeypatch.setattr(mod, "_cpu_transposed", lambda h, gd: False)
    h, w = randn(29, 16, scale=2.0), randn(777, 16)
    t = torch.randint(0, 777, (29,))
    out, dh, dw = _grads(_fast, h, w, t, None, 0.3, 1e-2)
    ref = _grads(_reference, h.double(), w.double(), t, None, 0.3, 1e-2)
    for i in range(3):
        torch.testing.assert_close(out[i].double(), ref[0][i], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dh.double(), ref[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw.double(), ref[2], rtol=1e-4, atol=1e-6)


def test_softmax_stats_kernel_exact_and_thread_independent():
    """csrc/lm_loss.cpp on its own: exp(L - max) in place, lse, target logit and 1 / sum
    against fp64, bitwise the same for 1 and 2 threads (fixed row chunks)."""
    from palm_fast._ext import cpp

    lt = randn(1000, 45, scale=4.0)
    lt[3, 7] = 80.0                      # a large logit: the shift keeps exp finite
    t = torch.randint(0, 1000, (45,))
    ref = lt.double()
    outs = []
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            e = lt.clone()
            outs.append((e, *cpp().lm_softmax_cols_cpu(e, t)))
        finally:
            torch.set_num_threads(prev)
    for x, y in zip(outs[0], outs[1]):
        assert torch.equal(x, y)
    e, lse, tgt, rsum = outs[0]
    mx = ref.amax(0)
    torch.testing.assert_close(e.double(), (ref - mx).exp(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lse.double(), torch.logsumexp(ref, 0), rtol=1e-6, atol=1e-6)
    assert torch.equal(tgt, lt[t, torch.arange(45)])
    torch.testing.assert_close(rsum.double(), 1 / (ref - mx).exp().sum(0), rtol=1e-5, atol=0)


def test_targets_out_of_range():
    h, w = randn(4, 8), randn(10, 8)
    for bad in (torch.tensor([0, 1, 10, 2]), torch.tensor([0, -1, 3, 2])):
        with pytest.raises(ValueError, match="targets: expected ids in"):
            tied_lm_loss(h, w, bad)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_weight_gradient_scatter_is_bitwise_reproducible(device):
    """The weight gradient's row scatters (head and tied lookup) add many rows into few
    (repeated targets and tokens): the same bits every run. CUDA: ``index_put_`` with
    accumulate (sort-based), not ``index_add_``'s atomic adds."""
    from palm_fast.ops.lm_loss import GradLink, _scatter_rows_, embed_tokens

    gen = torch.Generator().manual_seed(3)
    V, d, M = 7, 64, 4096
    w0 = torch.randn(V, d, generator=gen).to(device)
    tok = torch.randint(0, V, (M,), generator=gen).to(device)
    tgt = torch.randint(0, 3, (M,), generator=gen).to(device)   # three targets, many repeats

    def run():
        w = w0.clone().requires_grad_(True)
        link = GradLink()
        h = embed_tokens(w, tok, link) * 1.5
        return torch.autograd.grad(tied_lm_loss(h, w, tgt, scale=0.3, z_coef=1e-3, link=link)[0], (w,))[0]

    first = run()
    for _ in range(4):
        assert torch.equal(run(), first)
    rows = torch.randn(M, d, generator=gen).to(device)
    dst = torch.zeros(V, d, device=device)
    _scatter_rows_(dst, tok, rows)
    ref = torch.zeros(V, d, dtype=torch.float64).index_add_(0, tok.cpu(), rows.cpu().double())
    torch.testing.assert_close(dst.cpu().double(), ref, rtol=1e-5, atol=1e-4)


def test_nan_or_inf_logit_columns_do_not_depend_on_their_lane():
    """A token whose logits hold +inf (or NaN) has a NaN softmax: its log-normaliser came out
    inf in the 8-wide vector lanes (exp_u20 turns a NaN argument into a number) and NaN in
    the tail. Now NaN wherever the token sits; other tokens are unaffected."""
    from palm_fast._ext import cpp

    V, M = 5, 11     # 8 vector lanes + a 3-token tail
    base = torch.randn(V, M, generator=torch.Generator().manual_seed(0))
    for bad in (float("inf"), float("nan")):
        lt = base.clone()
        cols = [1, 7, 9]        # two in the vector body, one in the tail
        lt[2, cols] = bad
        want = torch.logsumexp(base.double(), 0)
        lse, tgt, rsum = cpp().lm_softmax_cols_cpu(lt, torch.zeros(M, dtype=torch.long))
        assert lse[cols].isnan().all() and rsum[cols].isnan().all(), (bad, lse)
        ok = [m for m in range(M) if m not in cols]
        torch.testing.assert_close(lse[ok].double(), want[ok], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fullgraph", [True, False])
def test_linked_lookup_and_loss_under_torch_compile(fullgraph):
    """embed_tokens + tied_lm_loss sharing a GradLink inside a compiled function: the compiler
    traces the backward, where the link's hand-over is a side effect ("Unsafe side effect"
    with fullgraph, an internal dynamo error without). Traced, the link is ignored; the
    gradient is the same."""
    from palm_fast.ops.lm_loss import GradLink, embed_tokens

    V, d = 40, 16
    w0 = randn(V, d)
    tok, tgt = torch.randint(0, V, (12,)), torch.randint(0, V, (12,))

    def f(w, tok, tgt):
        link = GradLink()
        h = embed_tokens(w, tok, link)
        return tied_lm_loss(h, w, tgt, scale=0.25, z_coef=1e-4, link=link)[0]

    grads = []
    for fn in (f, torch.compile(f, fullgraph=fullgraph, backend="aot_eager")):
        w = w0.clone().requires_grad_()
        fn(w, tok, tgt).backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_a_link_whose_lookup_read_another_weight_is_not_used():
    """A GradLink shared by a lookup of w_in and a head on another weight w_out (an untied
    output embedding): the head's gradient was handed to the lookup, added to w_in.grad,
    and w_out.grad stayed None. The link is now used only for the weight the lookup read."""
    from palm_fast.ops.lm_loss import GradLink, embed_tokens, tied_lm_loss

    torch.manual_seed(0)
    V, d = 11, 8
    w_in = torch.randn(V, d, requires_grad=True)
    w_out = torch.randn(V, d, requires_grad=True)
    tok, tgt = torch.randint(0, V, (2, 5)), torch.randint(0, V, (10,))

    def run(link):
        w_in.grad = w_out.grad = None
        h = torch.tanh(embed_tokens(w_in, tok, link)).flatten(0, 1)
        tied_lm_loss(h, w_out, tgt, link=link)[0].backward()
        return w_in.grad.clone(), w_out.grad.clone()

    gi, go = run(None)
    li, lo = run(GradLink())
    assert torch.equal(li, gi) and torch.equal(lo, go)
    # tied (the same weight): the link still hands the gradient over, same result
    w_in.grad = None
    h = torch.tanh(embed_tokens(w_in, tok)).flatten(0, 1)
    tied_lm_loss(h, w_in, tgt)[0].backward()
    want = w_in.grad.clone()
    w_in.grad = None
    link = GradLink()
    h = torch.tanh(embed_tokens(w_in, tok, link)).flatten(0, 1)
    tied_lm_loss(h, w_in, tgt, link=link)[0].backward()
    torch.testing.assert_close(w_in.grad, want, rtol=1e-6, atol=1e-7)


def test_torch_func_and_forward_ad_raise_palm_fasts_error():
    """torch.func transforms and forward-mode AD through the loss (and the tied lookup of
    model.loss) gave autograd's own errors ("must override the setup_context staticmethod",
    "You must implement the jvp function"); now palm_fast's, which names the way out. A
    batched backward (is_grads_batched, which vmaps the backward only) still works."""
    import torch.autograd.forward_ad as fwad

    import palm_fast
    from palm_fast.nn import PaLM

    h, w, t = torch.randn(6, 8), torch.randn(11, 8), torch.randint(0, 11, (6,))
    with pytest.raises(RuntimeError, match="palm_fast's ops do not support torch.func"):
        torch.func.grad(lambda x: tied_lm_loss(x, w, t)[0])(h)
    with pytest.raises(RuntimeError, match="palm_fast's ops do not support forward-mode AD"):
        with fwad.dual_level():
            tied_lm_loss(fwad.make_dual(h, torch.ones_like(h)), w, t)
    model, tok = PaLM(palm_fast.get_config("palm-tiny")), torch.randint(0, 256, (1, 9))
    with pytest.raises(RuntimeError, match="palm_fast's ops do not support torch.func"):
        torch.func.grad(lambda p: model.loss(tok)[0] * p)(torch.tensor(1.0))
    hg = h.clone().requires_grad_()
    loss = tied_lm_loss(hg, w, t, z_coef=1e-3)[0]
    (g,) = torch.autograd.grad(loss, hg, torch.tensor([1.0, 2.0]), is_grads_batched=True)
    (g1,) = torch.autograd.grad(tied_lm_loss(hg, w, t, z_coef=1e-3)[0], hg)
    torch.testing.assert_close(g[1], 2 * g1)
