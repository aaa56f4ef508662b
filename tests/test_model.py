"""The fast PaLM model: same init and state_dict as the reference, a 20-step training run
matching the reference loss at every step, activation recomputation leaving gradients
unchanged, generate(), bad arguments."""
from __future__ import annotations

import pytest
import torch

import palm_fast
from palm_fast.nn import PaLM, ParallelBlock
from palm_fast.reference import PaLM as RefPaLM

CFG = palm_fast.get_config("palm-tiny")


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes (see conftest)


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    ref = RefPaLM(CFG)
    torch.manual_seed(seed)
    fast = PaLM(CFG, **kw)
    return ref, fast


def test_same_init_and_state_dict():
    ref, fast = _pair()
    sd_ref, sd_fast = ref.state_dict(), fast.state_dict()
    assert list(sd_ref) == list(sd_fast)
    assert all(torch.equal(sd_ref[k], sd_fast[k]) for k in sd_ref)
    assert all(isinstance(b, ParallelBlock) for b in fast.blocks)
    assert isinstance(fast.norm, palm_fast.nn.LayerNorm)
    assert fast.embed.weight is not None and fast.num_params() == ref.num_params() == CFG.param_count()
    with torch.no_grad():
        fast.norm.weight.mul_(3.0)
        fast.blocks[0].norm.weight.mul_(3.0)
    fast.reset_parameters()                     # re-init restores the fast norms too
    assert torch.equal(fast.norm.weight, torch.ones(CFG.d_model))
    assert torch.equal(fast.blocks[0].norm.weight, torch.ones(CFG.d_model))
    # round trip through a fresh model of the other kind
    other = RefPaLM(CFG)
    other.load_state_dict(fast.state_dict())
    tok = torch.randint(0, CFG.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(other(tok), fast(tok), rtol=1e-5, atol=1e-5)


def test_training_20_steps_matches_reference():
    """Same seed, same data (two fixed batches, alternating, so the loss falls), AdamW:
    reference and fast losses agree at every step."""
    ref, fast = _pair()
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (ref, fast)]
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, CFG.vocab_size, (2, 17), generator=gen) for _ in range(2)]
    history = []
    for step in range(20):
        tok = batches[step % 2]
        losses = []
        for model, opt in zip((ref, fast), opts):
            opt.zero_grad(set_to_none=True)
            total, ce, z = model.loss(tok)
            total.backward()
            opt.step()
            losses.append(total.item())
        assert abs(losses[0] - losses[1]) <= 1e-4 * max(1.0, abs(losses[0])), (step, losses)
        history.append(losses[1])
    assert history[-1] < history[0] - 1.0, history   # it trains


@pytest.mark.parametrize("recompute", ["attention", "full"])
def test_recompute_gradients_identical(recompute):
    _, plain = _pair()
    _, ckpt = _pair(recompute=recompute)
    assert ckpt.recompute == recompute
    tok = torch.randint(0, CFG.vocab_size, (2, 17))
    grads = []
    for model in (plain, ckpt):
        model.zero_grad(set_to_none=True)
        model.loss(tok)[0].backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_generate_matches_reference():
    ref, fast = _pair()
    prompt = torch.randint(0, CFG.vocab_size, (2, 5))
    assert torch.equal(ref.generate(prompt, 10), fast.generate(prompt, 10))


def test_bad_recompute():
    with pytest.raises(ValueError, match="recompute: expected one of"):
        PaLM(CFG, recompute="everything")


def test_loss_needs_two_tokens():
    ref, fast = _pair()
    for m in (ref, fast):
        with pytest.raises(ValueError, match="tokens: expected at least 2 tokens per sequence"):
            m.loss(torch.zeros(2, 1, dtype=torch.long))


def test_loss_with_a_hooked_or_padded_embedding():
    """The fused loss reads the embedding's weight directly (a gather tied to the head's
    gradient): an embedding with hooks or lookup options takes the module's own lookup, so
    the hooks fire and padding_idx keeps its row's gradient at zero, as in the reference."""
    ref, fast = _pair()
    tok = torch.randint(1, CFG.vocab_size, (2, 9))
    tok[0, :3] = 0
    calls = []
    for m in (ref, fast):
        m.embed.padding_idx = 0
        m.embed.register_forward_hook(lambda mod, i, o: calls.append(1))
        m.loss(tok)[0].backward()
    assert len(calls) == 2
    assert torch.allclose(fast.embed.weight.grad, ref.embed.weight.grad, rtol=1e-4, atol=1e-6)


def test_loss_runs_the_models_own_call_when_it_does_more(monkeypatch):
    """The reference's loss is ``self(tokens)`` then the loss: hooks on the model (a logit
    soft-cap, a token remap), hooks on every module, or a subclass's forward change it. The
    fused CPU loss skipped the model's call and returned the plain loss; it now runs the
    reference's loss in those cases (and stays fused otherwise)."""
    tok = torch.randint(0, CFG.vocab_size, (2, 9))

    def softcap(mod, inp, out):
        return 30 * torch.tanh(out / 30) * 0.5

    import palm_fast.nn.model as fast_model
    fused = []
    real = fast_model.tied_lm_loss
    monkeypatch.setattr(fast_model, "tied_lm_loss", lambda *a, **k: fused.append(1) or real(*a, **k))
    ref, fast = _pair()
    plain = fast.loss(tok)[0].item()
    assert fused == [1]     # no hooks: the fused loss
    for m in (ref, fast):
        m.register_forward_hook(softcap)
    want = ref.loss(tok)[0]
    assert abs(want.item() - plain) > 0.1      # the hook matters
    torch.testing.assert_close(fast.loss(tok)[0], want, rtol=1e-5, atol=1e-5)

    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m)))
    try:
        _, fast = _pair()
        fast.loss(tok)
    finally:
        handle.remove()
    assert PaLM in seen        # the root module's call happened

    class Biased(PaLM):
        def forward(self, tokens, *args, **kwargs):
            out = super().forward(tokens, *args, **kwargs)
            return out + 5.0 * (torch.arange(out.shape[-1]) == 7)

    class RefBiased(RefPaLM):
        def forward(self, tokens, *args, **kwargs):
            out = super().forward(tokens, *args, **kwargs)
            return out + 5.0 * (torch.arange(out.shape[-1]) == 7)

    torch.manual_seed(0)
    r = RefBiased(CFG)
    torch.manual_seed(0)
    f = Biased(CFG)
    torch.testing.assert_close(f.loss(tok)[0], r.loss(tok)[0], rtol=1e-5, atol=1e-5)
    assert abs(f.loss(tok)[0].item() - plain) > 0.1
    assert fused == [1]
    # a forward set on the instance (as wrappers do) counts too
    r2, f2 = _pair()
    for m in (r2, f2):
        base_fwd = m.forward
        m.forward = lambda tokens, *a, _f=base_fwd, **k: _f(tokens, *a, **k) * 0.5
    torch.testing.assert_close(f2.loss(tok)[0], r2.loss(tok)[0], rtol=1e-5, atol=1e-5)
    assert fused == [1]


def test_loss_int32_tokens_and_empty_batch():
    ref, fast = _pair()
    tok = torch.randint(0, CFG.vocab_size, (2, 9), dtype=torch.int32)
    torch.testing.assert_close(fast.loss(tok)[0], ref.loss(tok)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="tokens: expected at least one token to predict"):
        fast.loss(torch.zeros(0, 9, dtype=torch.long))


def test_swapped_or_hooked_parts_are_honoured():
    """A fast block whose part was replaced (another norm) or hooked runs the reference
    forward over its parts (the fused kernels ignored them: the block computed the stock
    LayerNorm, and the hook never fired); generate does the same."""
    ref, fast = _pair()
    for m in (ref, fast):
        m.blocks[0].norm = torch.nn.LayerNorm(CFG.d_model, eps=0.1, bias=False)
    x = torch.randint(0, CFG.vocab_size, (2, 9))
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-5)
    assert not fast.blocks[0].parts_fusable() and fast.blocks[1].parts_fusable()
    calls = []
    fast.blocks[1].act.register_forward_hook(lambda mod, i, o: calls.append(1))
    fast(x)
    assert calls and not fast.blocks[1].parts_fusable()
    prompt = torch.randint(0, CFG.vocab_size, (1, 5))
    assert torch.equal(palm_fast.generate(fast, prompt, 4)[0], ref.generate(prompt, 4)[0])


def test_deferred_init_on_the_meta_device():
    """Build on the meta device, to_empty(), load weights: RotaryEmbedding copied its meta
    inv_freq to the new device (NotImplementedError: Cannot copy out of meta tensor)."""
    cfg = palm_fast.get_config("palm-tiny")
    src = PaLM(cfg)
    for cls in (RefPaLM, PaLM):
        with torch.device("meta"):
            m = cls(cfg)
        m.to_empty(device="cpu")
        for blk in m.blocks:
            torch.testing.assert_close(blk.rotary.inv_freq, src.blocks[0].rotary.inv_freq, rtol=0, atol=0)
        m.load_state_dict(src.state_dict())
        tok = torch.tensor([[1, 2, 3]])
        torch.testing.assert_close(m(tok), src(tok))


@pytest.mark.parametrize("which", ["nn.PaLM", "patched"])
def test_jit_trace_records_the_kernels(which):
    """torch.jit.trace cannot see a call into palm_fast._C: it recorded only the empty tensors
    the eager path allocates, and the traced model returned uninitialised memory (inf / NaN /
    1e34) for any input. While tracing, the ops go through the registered custom ops."""
    import warnings

    cfg = palm_fast.get_config("palm-tiny", n_layers=1)
    torch.manual_seed(0)
    ref = RefPaLM(cfg).eval()
    if which == "nn.PaLM":
        model = PaLM(cfg).eval()
        model.load_state_dict(ref.state_dict())
    else:
        import copy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = palm_fast.patch(copy.deepcopy(ref))
    g = torch.Generator().manual_seed(1)
    x, x2 = (torch.randint(0, cfg.vocab_size, (2, 9), generator=g) for _ in range(2))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (x,), check_trace=False)
        for inp in (x, x2):
            assert torch.equal(traced(inp), model(inp))
        w = torch.randn(64)
        t = torch.jit.trace(lambda a: palm_fast.ops.layer_norm(a, w), (torch.randn(4, 64),),
                            check_trace=False)
        y = torch.randn(4, 64) * 3 + 1
        assert torch.equal(t(y), palm_fast.ops.layer_norm(y, w))


@pytest.mark.parametrize("which", ["nn.PaLM", "patched"])
def test_half_checkpoint_loaded_with_assign_keeps_working(which):
    """A bf16 checkpoint loaded with load_state_dict(assign=True) (meta-device loading) puts a
    bf16 inv_freq in the rotary buffer (assign bypasses the module's fp32 rule): the fast
    ops refused it (TypeError); the reference computes its angles in fp32 from it."""
    import warnings

    cfg = palm_fast.get_config("palm-tiny")
    torch.manual_seed(0)
    ckpt = {k: v.bfloat16() for k, v in RefPaLM(cfg).state_dict().items()}
    x = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.device("meta"):
        ref = RefPaLM(cfg)
        model = PaLM(cfg) if which == "nn.PaLM" else RefPaLM(cfg)
    if which == "patched":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            palm_fast.patch(model)
    ref.load_state_dict(ckpt, assign=True)
    model.load_state_dict(ckpt, assign=True)
    assert model.blocks[0].rotary.inv_freq.dtype == torch.bfloat16
    with torch.no_grad():
        got, want = model(x), ref(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=0.1, rtol=0.05)


def test_float64_fast_model_is_a_clear_error():
    """Built under torch.set_default_dtype(torch.float64), nn.PaLM raised a TypeError about a
    dtype argument never passed; after .double(), one from deep in parallel_block naming x.
    Both build, and the forward names the module and what to use instead."""
    cfg = palm_fast.get_config("palm-tiny", n_layers=1)
    x = torch.randint(0, cfg.vocab_size, (1, 5))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        built = PaLM(cfg)
    finally:
        torch.set_default_dtype(old)
    for m in (built, PaLM(cfg).double()):
        assert m.blocks[0].norm.weight.dtype == torch.float64
        with pytest.raises(TypeError, match="ParallelBlock: float64 .* palm_fast.reference"):
            m(x)


@pytest.mark.parametrize("cls", [RefPaLM, PaLM])
def test_forward_reads_no_token_values_while_a_cuda_graph_is_captured(cls, monkeypatch):
    """The token range check read values on the host (two syncs), which is an error while a
    CUDA graph is captured: a model's forward could not be captured. (Capture faked: no GPU.)"""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    reads = []
    real = torch.Tensor.__int__
    monkeypatch.setattr(torch.Tensor, "__int__", lambda self: reads.append(1) or real(self))
    cfg = palm_fast.get_config("palm-tiny")
    with torch.no_grad():
        cls(cfg).eval()(torch.randint(0, cfg.vocab_size, (2, 8)))
    assert reads == []
