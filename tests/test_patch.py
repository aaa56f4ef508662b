"""palm_fast.patch / unpatch / register: our reference model and PaLM-pytorch 0.2.2.

The PaLM-pytorch tests need the test extra (``pip install -e .[test]`` installs
``palm-pytorch==0.2.2`` and ``einops``); they skip with that reason when it is missing.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_by_rule, close_rel, max_err
from torch import nn

import palm_fast
from palm_fast import patching
from palm_fast.integrations import palm_pytorch as pp_fast
from palm_fast.reference import PaLM as RefPaLM

try:
    from palm_pytorch import PaLM as PPaLM
    from palm_pytorch import palm_pytorch as pp
except ImportError:  # pragma: no cover - CI installs the test extra
    PPaLM = pp = None

needs_pp = pytest.mark.skipif(pp is None, reason="palm-pytorch 0.2.2 is not installed "
                              "(pip install -e .[test] installs it)")

V = 97  # vocabulary of the tiny test models


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes (see conftest)


def pp_model(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    args = dict(dim=64, num_tokens=V, depth=2, dim_head=16, heads=4, ff_mult=2)
    args.update(kw)
    return PPaLM(**args)


def ref_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = palm_fast.get_config("palm-tiny").replace(vocab_size=V)
    return RefPaLM(cfg)


def quiet_patch(model, **kw):
    """patch() with its PatchWarning captured (tests that expect skips check the report)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", patching.PatchWarning)
        return palm_fast.patch(model, **kw)


def tokens(B=2, T=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


def lm_loss(model, x):
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())


def tensors_of(model):
    return model.state_dict(keep_vars=True)


# ------------------------------------------------------------------ PaLM-pytorch's structure
@needs_pp
def test_palm_pytorch_structure_facts():
    """The facts the adapter relies on (../shared/PALM.md), read off the installed 0.2.2."""
    m = pp_model()
    assert isinstance(m, nn.Sequential) and len(m) == 5  # emb, 2 blocks, LN, Linear
    assert m[-1].weight is m[0].weight                                   # tied output
    blk = m[1].fn
    assert type(m[1]) is pp.Residual and type(blk) is pp.ParallelTransformerBlock
    assert blk.fused_dims == (4 * 16, 16, 16, 2 * 2 * 64)                # q | k | v | ff
    assert blk.scale == 16 ** -0.5
    sd = m.state_dict()
    assert "1.fn.norm.gamma" in sd and "1.fn.norm.beta" in sd            # beta: persistent buffer
    assert "1.fn.rotary_emb.inv_freq" in sd and "1.fn.ff_out.1.weight" in sd
    assert "1.fn.mask" not in sd and "1.fn.pos_emb" not in sd            # caches: non-persistent
    assert [n for n, _ in blk.norm.named_parameters()] == ["gamma"]
    assert torch.equal(blk.norm.beta, torch.zeros(64))
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    assert torch.equal(blk.rotary_emb.inv_freq, inv)
    with pytest.raises(TypeError):                                       # keyword-only
        PPaLM(64, V, 2)


# ------------------------------------------------------------------ logits parity
@needs_pp
def test_palm_pytorch_logits_fp32():
    m = pp_model()
    ref = copy.deepcopy(m)
    x = tokens()
    sd_before = tensors_of(m)
    out = palm_fast.patch(m)
    assert out is m and m.palm_fast_report.ok
    assert len(m.palm_fast_report.patched) == 3                          # 2 blocks + final norm
    assert type(m[1].fn) is pp_fast.ParallelTransformerBlock and type(m[3]) is pp_fast.LayerNorm
    sd_after = tensors_of(m)
    assert sd_after.keys() == sd_before.keys()
    assert all(sd_after[k] is sd_before[k] for k in sd_before)          # the same objects
    with torch.no_grad():
        want, got = ref(x), m(x)
    assert close_rel(got, want, 2e-5)


def assert_same_logits(m, ref, T: int = 37, rel: float = 2e-5) -> None:
    """The patched model's outputs on fresh tokens match the unpatched copy's."""
    x = tokens(T=T)
    with torch.no_grad():
        assert close_rel(m(x), ref(x), rel)


@needs_pp
def test_palm_pytorch_logits_bf16_by_rule():
    base = pp_model()
    x = tokens(T=70)
    ref64 = copy.deepcopy(base).double()
    eager = copy.deepcopy(base).to(torch.bfloat16)
    fast = palm_fast.patch(copy.deepcopy(base).to(torch.bfloat16))
    assert fast.palm_fast_report.ok
    with torch.no_grad():
        assert_close_by_rule(fast(x), ref64(x), eager(x), name="logits")


@needs_pp
@pytest.mark.parametrize("flags", [dict(rope=False), dict(attention=False), dict(swiglu=False),
                                   dict(layer_norm=False)])
def test_palm_pytorch_flags_keep_parity(flags):
    m = pp_model()
    ref = copy.deepcopy(m)
    palm_fast.patch(m, **flags)
    blk = m[1].fn
    assert type(blk) is pp_fast.ParallelTransformerBlock
    if not flags.get("swiglu", True):
        assert type(blk.ff_out[0]) is pp.SwiGLU
    if not flags.get("layer_norm", True):
        assert type(blk.norm) is pp.LayerNorm and type(m[3]) is pp.LayerNorm
    assert_same_logits(m, ref)


@needs_pp
def test_palm_pytorch_nonzero_beta_is_exact():
    """beta is a buffer a state_dict may set non-zero: the fast LayerNorm applies it."""
    m = pp_model()
    with torch.no_grad():
        for mod in m.modules():
            if type(mod) is pp.LayerNorm:
                mod.beta.normal_()
    ref = copy.deepcopy(m)
    palm_fast.patch(m)
    assert_same_logits(m, ref)


@needs_pp
def test_palm_pytorch_trainable_beta_gets_its_gradient():
    """A user made beta (a zero buffer in PaLM-pytorch) a trainable Parameter: the fused path,
    taken while beta is zero, reads gamma only, so beta.grad stayed None and beta never
    trained. With grad on, such a block takes the composed path."""
    m = pp_model()
    for mod in m.modules():
        if type(mod) is pp.LayerNorm:
            mod.beta = nn.Parameter(mod._buffers.pop("beta").clone())
    ref = copy.deepcopy(m)
    quiet_patch(m)
    assert type(m[1]) is pp_fast.Residual
    x = tokens()
    lm_loss(m, x).backward()
    lm_loss(ref, x).backward()
    for (name, a), b in zip(m.named_parameters(), ref.parameters()):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert m[1].fn.norm.beta.grad.abs().max() > 0


@needs_pp
def test_palm_pytorch_beta_changed_after_patching():
    """The fused residual path (no LayerNorm bias) is taken only while beta is zero; an
    in-place change or a load_state_dict after patching is seen on the next call."""
    m = pp_model()
    ref = copy.deepcopy(m)
    palm_fast.patch(m)
    assert type(m[1]) is pp_fast.Residual
    x = tokens()
    with torch.no_grad():
        assert close_rel(m(x), ref(x), 2e-5)
        for a, b in ((m[1].fn.norm.beta, ref[1].fn.norm.beta), (m[2].fn.norm.beta, ref[2].fn.norm.beta)):
            a.normal_()
            b.copy_(a)
        assert close_rel(m(x), ref(x), 2e-5)
        other = pp_model(seed=4)
        m.load_state_dict(other.state_dict())            # zero beta again
        assert close_rel(m(x), other(x), 2e-5)
        for a, b in ((m[1].fn.norm.beta, other[1].fn.norm.beta),):
            a.data.fill_(0.5)   # a write through .data: no version bump (read every call on CPU)
            b.data.fill_(0.5)
        assert close_rel(m(x), other(x), 2e-5)


@pytest.fixture
def simulated_packing(monkeypatch):
    """The fast blocks' CUDA-path weight cache on the CPU: the Triton backend reported on and
    the packing stubbed with a copy of the weight."""
    from palm_fast.nn import block as fast_block

    monkeypatch.setattr(fast_block, "uses_triton", lambda dev: True)
    monkeypatch.setattr(fast_block, "pack_in_proj", lambda w, *a: w.detach().clone())


def test_refresh_caches_sees_writes_through_data(simulated_packing):
    """The CUDA input GEMM's packed weight is keyed on the weight's version counter, which a
    write through .data bypasses; refresh_caches drops it. (Simulated on the CPU: the
    packing is stubbed with a copy.)"""
    m = palm_fast.nn.PaLM(palm_fast.get_config("palm-tiny").replace(vocab_size=V))
    b = m.blocks[0]
    w = b.in_proj.weight
    first = b._packed_in_proj()
    assert b._packed_in_proj() is first                   # cached
    with torch.no_grad():
        w.add_(1.0)                                        # seen: version bump
    assert torch.equal(b._packed_in_proj(), w)
    w.data.add_(1.0)                                       # not seen
    assert not torch.equal(b._packed_in_proj(), w)
    palm_fast.nn.refresh_caches(m)
    assert torch.equal(b._packed_in_proj(), w)


def test_packed_weight_of_a_flat_buffer_slice_is_never_cached(monkeypatch):
    """vector_to_parameters leaves each weight a slice of the flat vector, which is then
    updated in place (ES / SPSA loops): the writes bump the vector's version counter, not the
    weight's, and the stale packed weight was used (errors 2.1, 4.9). Also a changed rotary
    layout (interleaved) with the same weight. (Packing simulated on the CPU.)"""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from palm_fast.nn import block as fast_block

    monkeypatch.setattr(fast_block, "uses_triton", lambda dev: True)
    monkeypatch.setattr(fast_block, "pack_in_proj", lambda w, inv, H, Hk, hd, F, inter: (
        w.detach().clone() + inter))
    m = palm_fast.nn.PaLM(palm_fast.get_config("palm-tiny").replace(vocab_size=V))
    b = m.blocks[0]
    w = b.in_proj.weight
    first = b._packed_in_proj()
    assert b._packed_in_proj() is first                   # an exclusive weight: cached
    b.rotary.interleaved = True
    assert torch.equal(b._packed_in_proj(), w + 1)        # the layout is part of the key
    b.rotary.interleaved = False
    theta = parameters_to_vector(m.parameters()).detach().clone()
    with torch.no_grad():
        for _ in range(2):
            vector_to_parameters(theta, m.parameters())
            assert torch.equal(b._packed_in_proj(), w)
            theta.add_(0.5)
    # FSDP2 copies each all-gather into the same Parameter with its version kept: a module
    # it manages (marked _is_fsdp_managed_module) is re-laid out every call
    m2 = palm_fast.nn.PaLM(palm_fast.get_config("palm-tiny").replace(vocab_size=V))
    b2 = m2.blocks[0]
    assert b2._packed_in_proj() is b2._packed_in_proj()
    b2._is_fsdp_managed_module = True
    assert b2._packed_in_proj() is not b2._packed_in_proj()


@pytest.mark.parametrize("fused", [True, False])
def test_packed_weight_follows_optimizer_steps(simulated_packing, fused):
    """AdamW(fused=True) updates parameters in place without bumping their version counters:
    the packed input weight (CUDA) stayed the first step's, so the forward trained on stale
    weights. Caches also key on torch.optim's step count. (Packing simulated on the CPU.)"""
    m = palm_fast.nn.PaLM(palm_fast.get_config("palm-tiny").replace(vocab_size=V))
    b = m.blocks[0]
    w = b.in_proj.weight
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=fused)
    for _ in range(2):
        assert torch.equal(b._packed_in_proj(), w)
        m.zero_grad()
        (w.square().sum() + sum(p.sum() for p in m.parameters())).backward()
        opt.step()
    assert torch.equal(b._packed_in_proj(), w)


@pytest.mark.parametrize("wrapped", [False, True])
def test_compiled_optimizer_steps_do_not_recompile_and_are_counted(simulated_packing, wrapped):
    """The step count was a Python int the global hooks read and wrote: Dynamo, tracing the
    hooks inside a compiled ``opt.step``, guarded on its value, so every step recompiled (and
    after the recompile limit ran eagerly), in any program that imported palm_fast. It is
    now a tensor's version: no frame compiled after the first steps, and a compiled fused
    step (which bumps no weight's version) still moves the packed weight's key."""
    from torch._dynamo.utils import counters

    m = palm_fast.nn.PaLM(palm_fast.get_config("palm-tiny").replace(vocab_size=V))
    b = m.blocks[0]
    w = b.in_proj.weight
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile((lambda: opt.step()) if wrapped else opt.step, backend="eager")
    frames = []
    for _ in range(5):
        assert torch.equal(b._packed_in_proj(), w)
        m.zero_grad()
        (w.square().sum() + sum(p.sum() for p in m.parameters())).backward()
        step()
        frames.append(counters["frames"]["total"])   # frames Dynamo compiled so far
    assert torch.equal(b._packed_in_proj(), w)
    assert frames[1] == frames[-1], frames   # (before: one more per step)
    torch._dynamo.reset()


@pytest.mark.parametrize("hook", ["pre forward", "post forward", "post raises"])
def test_packed_weight_in_an_optimizers_own_step_hooks(simulated_packing, hook):
    """torch runs an optimizer's own step hooks before the global post hook that counted the
    step (and no post hook after one raises): a forward in a per-optimizer hook (an EMA or a
    logging evaluation) after a fused step packed the old weight, and that cache was used
    until the next step (65 off on the Triton path). No cache is kept while a step runs."""
    m = palm_fast.nn.PaLM(palm_fast.get_config("palm-tiny").replace(vocab_size=V))
    b = m.blocks[0]
    w = b.in_proj.weight
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
    seen = []

    def look(*_):
        seen.append(torch.equal(b._packed_in_proj(), w))
        if hook == "post raises":
            raise RuntimeError("a hook failed")

    handle = (opt.register_step_pre_hook if hook == "pre forward" else opt.register_step_post_hook)(look)
    assert torch.equal(b._packed_in_proj(), w)   # cached before the step
    (w.square().sum() + sum(p.sum() for p in m.parameters())).backward()
    try:
        opt.step()
    except RuntimeError:
        assert hook == "post raises"
    assert seen == [True]
    assert torch.equal(b._packed_in_proj(), w)
    handle.remove()
    opt.step()   # a step that completes: the cache is kept again (after a raising hook too)
    assert b._packed_in_proj() is b._packed_in_proj()


def test_reference_palm_logits_and_grads():
    m = ref_model()
    ref = copy.deepcopy(m)
    quiet_patch(m)
    rep = m.palm_fast_report
    assert rep.ok and [r.path for r in rep.patched] == ["blocks.0", "blocks.1", "norm"]
    assert all(type(b) is palm_fast.nn.ParallelBlock for b in m.blocks)
    x = tokens(T=33)
    want, got = ref(x), m(x)
    assert close_rel(got, want, 2e-5)
    lm_loss(ref, x).backward()
    lm_loss(m, x).backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), m.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_reference_palm_bf16_by_rule():
    base = ref_model()
    x = tokens(T=40)
    ref64 = copy.deepcopy(base).double()
    eager = copy.deepcopy(base).to(torch.bfloat16)
    fast = quiet_patch(copy.deepcopy(base).to(torch.bfloat16))
    with torch.no_grad():
        assert_close_by_rule(fast(x), ref64(x), eager(x), name="logits")


# ------------------------------------------------------------------ gradients and training
@needs_pp
def test_palm_pytorch_grad_parity_every_parameter():
    m = pp_model()
    ref = copy.deepcopy(m)
    palm_fast.patch(m)
    x = tokens(T=41)
    lm_loss(ref, x).backward()
    lm_loss(m, x).backward()
    names = [n for n, _ in ref.named_parameters()]
    assert len(names) == len(list(m.named_parameters())) > 0
    for (n, p), (n2, q) in zip(ref.named_parameters(), m.named_parameters()):
        assert n == n2
        assert q.grad is not None, n
        scale = max(1.0, p.grad.abs().max().item())
        assert max_err(q.grad, p.grad) <= 1e-5 * scale, n


@needs_pp
def test_palm_pytorch_training_20_steps_with_an_optimizer_built_before_patching():
    torch.manual_seed(0)
    a = pp_model(seed=3)
    b = copy.deepcopy(a)
    opt_a = torch.optim.AdamW(a.parameters(), lr=3e-3)
    opt_b = torch.optim.AdamW(b.parameters(), lr=3e-3)
    palm_fast.patch(a)                     # after the optimizer was built
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, V, (2, 25), generator=g) for _ in range(2)]
    for step in range(20):
        x = batches[step % 2]
        losses = []
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            loss = lm_loss(model, x)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-4 * abs(losses[1]), (step, losses)
    assert losses[1] < 4.0                 # it learned the two batches (ln 97 = 4.57)
    # Adam's first steps move an element by ~lr * sign(grad) whatever the gradient's size, so
    # a gradient within rounding of zero may step either way: allow a few such elements.
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        d = (p - q).abs()
        assert (d > 1e-4).float().mean().item() < 1e-3 and d.max().item() <= 2 * 3e-3, n


# ------------------------------------------------------------------ state and round trips
@needs_pp
def test_state_dict_round_trip():
    m = pp_model()
    other = pp_model(seed=5)
    palm_fast.patch(m)
    m.load_state_dict(other.state_dict())                 # unpatched -> patched
    x = tokens()
    with torch.no_grad():
        assert close_rel(m(x), other(x), 2e-5)
    fresh = pp_model(seed=9)
    fresh.load_state_dict(m.state_dict())                 # patched -> unpatched
    for k, v in other.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert m[-1].weight is m[0].weight                    # still tied


@needs_pp
def test_patch_unpatch_patch():
    m = pp_model()
    x = tokens()
    with torch.no_grad():
        want = m(x)
    orig_block, orig_norm = m[1].fn, m[3]
    params = {n: p for n, p in m.named_parameters()}
    palm_fast.patch(m)
    assert palm_fast.patching.is_patched(m)
    back = palm_fast.unpatch(m)
    assert back is m and not palm_fast.patching.is_patched(m)
    assert m[1].fn is orig_block and m[3] is orig_norm
    assert not hasattr(m, "palm_fast_report")
    assert all(p is params[n] for n, p in m.named_parameters())
    with torch.no_grad():
        assert torch.equal(m(x), want)                    # the original code again
    palm_fast.patch(m)
    assert type(m[1].fn) is pp_fast.ParallelTransformerBlock and m.palm_fast_report.ok
    first = list(m.palm_fast_report.patched)
    # again (with other options): nothing left to do; said so, and the report still describes
    # the replacements (it was replaced by an empty one, and other options did nothing silently)
    with pytest.warns(palm_fast.patching.PatchWarning, match="patched before"):
        palm_fast.patch(m, block=False)
    assert m.palm_fast_report.patched == first and type(m[1].fn) is pp_fast.ParallelTransformerBlock


@needs_pp
def test_unpatch_hands_back_converted_state():
    """A dtype change made while patched reaches the originals (buffers included)."""
    m = pp_model()
    want = copy.deepcopy(m).to(torch.bfloat16)
    palm_fast.patch(m)
    m.to(torch.bfloat16)
    palm_fast.unpatch(m)
    for k, v in want.state_dict().items():
        got = m.state_dict()[k]
        assert got.dtype == v.dtype and torch.equal(got, v), k
    x = tokens()
    with torch.no_grad():
        assert torch.equal(m(x), want(x))


@needs_pp
def test_torch_compile_patched_palm_pytorch():
    m = pp_model()
    ref = copy.deepcopy(m)
    palm_fast.patch(m)
    x = tokens(T=21)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    loss = lm_loss(compiled, x)
    loss_ref = lm_loss(ref, x)
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    loss.backward()
    loss_ref.backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), m.named_parameters()):
        assert close_rel(q.grad, p.grad, 1e-5), n


# ------------------------------------------------------------------ registry
class MyNorm(nn.Module):
    """A user's PaLM-style LayerNorm: parameter ``scale``, no bias, eps 1e-6."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.scale, None, 1e-6)


class FastMyNorm(nn.Module):
    def __init__(self, orig):
        super().__init__()
        self.scale = orig.scale                  # the same Parameter object

    def forward(self, x):
        return palm_fast.ops.layer_norm(x, self.scale, None, 1e-6)


class MyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = MyNorm(32)
        self.proj = nn.Linear(32, 64, bias=False)
        self.act = palm_fast.reference.SwiGLU()

    def forward(self, x):
        return self.act(self.proj(self.norm(x)))


@pytest.fixture
def registry_guard():
    # Snapshot the registry and which built-in sets are loaded: a test run first in its
    # process (pytest-xdist) would otherwise load the built-ins inside the guard, and the
    # restore would leave them marked loaded but unregistered for every later test.
    saved, loaded = dict(patching._REGISTRY), set(patching._BUILTINS_LOADED)
    yield
    patching._REGISTRY.clear()
    patching._REGISTRY.update(saved)
    patching._BUILTINS_LOADED.clear()
    patching._BUILTINS_LOADED.update(loaded)


def test_custom_registered_class(registry_guard):
    palm_fast.register(MyNorm, lambda m, opts: FastMyNorm(m), kind="layer_norm")
    m = MyModel()
    with torch.no_grad():
        m.norm.scale.normal_()
    ref = copy.deepcopy(m)
    palm_fast.patch(m)
    assert type(m.norm) is FastMyNorm and type(m.act) is palm_fast.nn.SwiGLU
    assert m.palm_fast_report.ok and len(m.palm_fast_report.patched) == 2
    x = torch.randn(3, 5, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, want = m(x), ref(x2)
    assert max_err(out, want) <= 1e-5
    out.square().sum().backward()
    want.square().sum().backward()
    assert max_err(m.norm.scale.grad, ref.norm.scale.grad) <= 1e-4
    assert max_err(x.grad, x2.grad) <= 1e-5
    palm_fast.unpatch(m)
    assert type(m.norm) is MyNorm and type(m.act) is palm_fast.reference.SwiGLU
    palm_fast.patch(m, layer_norm=False)                  # the kind flag gates the entry
    assert type(m.norm) is MyNorm


def test_factory_that_copies_is_refused(registry_guard):
    class CopyingFast(FastMyNorm):
        def __init__(self, orig):
            nn.Module.__init__(self)
            self.scale = nn.Parameter(orig.scale.detach().clone())

    palm_fast.register(MyNorm, lambda m, opts: CopyingFast(m), kind="layer_norm")
    m = MyModel()
    with pytest.warns(patching.PatchWarning, match="does not share"):
        palm_fast.patch(m)
    assert type(m.norm) is MyNorm
    (rec,) = m.palm_fast_report.skipped
    assert rec.path == "norm" and "copied: ['scale']" in rec.reason


def test_a_factory_error_rolls_the_call_back(registry_guard):
    """A factory raising something other than Unsupported: patch re-raises and puts back
    what it had replaced in this call (the model is never left half-patched)."""
    def broken(m, opts):
        raise RuntimeError("factory bug")

    palm_fast.register(MyNorm, broken, kind="layer_norm")
    act = palm_fast.reference.SwiGLU()
    m = nn.Sequential(act, nn.Sequential(act), MyNorm(32))
    with pytest.raises(RuntimeError, match="factory bug"):
        palm_fast.patch(m)
    assert m[0] is act and m[1][0] is act and not patching.is_patched(m)


def test_fast_module_settings_refused_are_skipped():
    """A reference LayerNorm the fast one cannot take (eps = 0) is skipped and reported, and
    the rest of the model is patched."""
    from palm_fast import reference

    m = nn.Sequential(reference.LayerNorm(8), reference.SwiGLU(), reference.LayerNorm(8, eps=0.0))
    quiet_patch(m)
    assert type(m[0]) is palm_fast.nn.LayerNorm and type(m[2]) is reference.LayerNorm
    (rec,) = m.palm_fast_report.skipped
    assert rec.path == "2" and "eps" in rec.reason


def test_unpatch_restores_every_slot_of_a_shared_module():
    from palm_fast import reference

    ln = reference.LayerNorm(16)
    holder = nn.ModuleList([ln, ln, nn.Sequential(ln)])
    palm_fast.patch(holder)
    palm_fast.unpatch(holder)
    assert holder[0] is ln and holder[1] is ln and holder[2][0] is ln
    assert not patching.is_patched(holder)


def test_palm_fast_modules_are_left_alone_quietly():
    """palm_fast.nn modules subclass the reference classes; patch must not report them as
    unknown subclasses."""
    m = palm_fast.nn.PaLM(palm_fast.get_config("palm-tiny").replace(vocab_size=V))
    with warnings.catch_warnings():
        warnings.simplefilter("error", patching.PatchWarning)
        palm_fast.patch(m)
    assert m.palm_fast_report.ok


@pytest.mark.parametrize("which", ["reference", pytest.param("palm_pytorch", marks=needs_pp)])
def test_hooks_on_a_child_skip_the_block(which):
    """A hook on a block's child (the block's replacement would bypass it): the block is
    skipped and reported, the hook still fires, the logits are the original's."""
    m = ref_model() if which == "reference" else pp_model()
    ref = copy.deepcopy(m)
    blk = m.blocks[0] if which == "reference" else m[1].fn
    calls = []
    blk.norm.register_forward_hook(lambda mod, inp, out: calls.append(1) or out * 1.5)
    ref_blk = ref.blocks[0] if which == "reference" else ref[1].fn
    ref_blk.norm.register_forward_hook(lambda mod, inp, out: out * 1.5)
    quiet_patch(m)
    assert any("hooks" in r.reason and "norm" in r.reason for r in m.palm_fast_report.skipped)
    x = tokens(T=9)
    got, want = m(x), ref(x)
    assert calls and close_rel(got, want, 2e-5)


def test_patch_again_with_blocks_after_parts():
    """patch(m, block=False) replaces a block's parts; a later patch(m) must still fuse the
    block (its parts are then palm_fast's), and unpatch must restore every original."""
    from palm_fast import reference

    m = ref_model()
    ref = copy.deepcopy(m)
    quiet_patch(m, block=False)
    assert type(m.blocks[0].norm) is palm_fast.nn.LayerNorm
    quiet_patch(m)
    assert all(type(b) is palm_fast.nn.ParallelBlock for b in m.blocks)
    x = tokens(T=9)
    assert close_rel(m(x), ref(x), 2e-5)
    palm_fast.unpatch(m)
    assert not patching.is_patched(m)
    assert all(type(b) is reference.ParallelBlock and type(b.norm) is reference.LayerNorm
               and type(b.act) is reference.SwiGLU for b in m.blocks)
    assert close_rel(m(x), ref(x), 2e-5)


@pytest.mark.parametrize("change", ["in_proj_bias", "ff_out_bias", "norm_eps", "torch_norm", "act"])
def test_reference_block_with_changed_parts_is_skipped(change):
    """The fast block reads only the parts' weights: a block whose parts differ from the
    reference's (a bias, another eps or norm class, another activation) is left as it was,
    with a reason, and the model's output is unchanged."""
    from palm_fast import reference

    m = ref_model()
    b = m.blocks[0]
    if change == "in_proj_bias":
        b.in_proj = nn.Linear(b.dim, b.in_proj.out_features, bias=True)
    elif change == "ff_out_bias":
        b.ff_out = nn.Linear(b.d_ff, b.dim, bias=True)
    elif change == "norm_eps":
        b.norm = reference.LayerNorm(b.dim, eps=0.1)
    elif change == "torch_norm":
        b.norm = nn.LayerNorm(b.dim, bias=False)
    else:
        b.act = nn.Sequential(reference.SwiGLU(), nn.Tanh())
    ref = copy.deepcopy(m)
    quiet_patch(m)
    assert type(m.blocks[0]) is reference.ParallelBlock
    assert any(r.path == "blocks.0" for r in m.palm_fast_report.skipped)
    x = tokens(T=9)
    assert close_rel(m(x), ref(x), 2e-5)


def test_register_rejects_bad_arguments(registry_guard):
    with pytest.raises(TypeError, match="cls"):
        palm_fast.register(object, lambda m, o: m)
    with pytest.raises(ValueError, match="kind"):
        palm_fast.register(MyNorm, lambda m, o: m, kind="mlp")
    with pytest.raises(TypeError, match="factory"):
        palm_fast.register(MyNorm, None)
    palm_fast.register(MyNorm, lambda m, o: FastMyNorm(m), kind="layer_norm")
    with pytest.raises(ValueError, match="already registered"):
        palm_fast.register(MyNorm, lambda m, o: FastMyNorm(m), kind="layer_norm")
    with pytest.raises(TypeError, match="model"):
        palm_fast.patch("not a module")


# ------------------------------------------------------------------ what cannot be patched
@needs_pp
def test_report_for_unsupported_variants():
    m = pp_model(depth=4)
    m[1].fn.register_forward_hook(lambda mod, inp, out: None)   # a replacement would drop it

    class MyBlock(pp.ParallelTransformerBlock):                   # a subclass: forward may differ
        pass

    sub = MyBlock(dim=64, dim_head=16, heads=4, ff_mult=2)
    sub.load_state_dict(m[2].fn.state_dict())
    m[2].fn = sub

    class OtherRotary(pp.RotaryEmbedding):                        # an unknown rotary layout
        pass

    rot = OtherRotary(16)
    m[3].fn.rotary_emb = rot
    ref = copy.deepcopy(m)
    with pytest.warns(patching.PatchWarning) as rec:
        palm_fast.patch(m)
    text = str(rec[0].message)
    rep = m.palm_fast_report
    assert not rep.ok
    skipped = {r.path: r.reason for r in rep.skipped}
    assert "hooks" in skipped["1.fn"]
    assert "subclass" in skipped["2.fn"]
    assert "rotary_emb" in skipped["3.fn"]
    assert all(p in text for p in ("1.fn", "2.fn", "3.fn"))
    # those blocks stay as they were; their LayerNorm / SwiGLU children are still swapped;
    # block 4 and the final norm are patched whole.
    assert type(m[1].fn) is pp.ParallelTransformerBlock and type(m[1].fn.norm) is pp_fast.LayerNorm
    assert type(m[3].fn) is pp.ParallelTransformerBlock
    assert type(m[4].fn) is pp_fast.ParallelTransformerBlock
    assert_same_logits(m, ref)


@needs_pp
def test_report_inline_parts_need_block_and_fp64_is_skipped():
    m = pp_model()
    with pytest.warns(patching.PatchWarning, match="inline code"):
        palm_fast.patch(m, block=False)
    assert type(m[1].fn) is pp.ParallelTransformerBlock
    assert type(m[1].fn.norm) is pp_fast.LayerNorm and type(m[1].fn.ff_out[0]) is palm_fast.nn.SwiGLU
    assert {r.path for r in m.palm_fast_report.skipped} == {"1.fn", "2.fn"}
    palm_fast.unpatch(m)
    assert type(m[1].fn.norm) is pp.LayerNorm and type(m[1].fn.ff_out[0]) is pp.SwiGLU

    m64 = pp_model().double()
    with pytest.warns(patching.PatchWarning, match="float64"):
        palm_fast.patch(m64)
    assert not m64.palm_fast_report.patched and not patching.is_patched(m64)


def test_reference_block_flags_fall_back_to_parts():
    m = ref_model()
    ref = copy.deepcopy(m)
    with pytest.warns(patching.PatchWarning, match="rope=False"):
        palm_fast.patch(m, rope=False)
    blk = m.blocks[0]
    assert type(blk) is palm_fast.reference.ParallelBlock
    assert type(blk.norm) is palm_fast.nn.LayerNorm and type(blk.act) is palm_fast.nn.SwiGLU
    assert type(blk.rotary) is palm_fast.reference.RotaryEmbedding
    assert_same_logits(m, ref, T=20)


# ------------------------------------------------------------------ generation
def lively_pp(seed: int = 0) -> nn.Module:
    """A PaLM-pytorch model whose greedy continuations vary: larger block output projections
    let the blocks (so attention over the cache) decide the next token rather than the
    current token's own tied embedding."""
    m = pp_model(seed=seed, depth=3)
    with torch.no_grad():
        for mod in m.modules():
            if type(mod) is pp.ParallelTransformerBlock:
                mod.attn_out.weight.mul_(4.0)
                mod.ff_out[1].weight.mul_(4.0)
    return m.eval()


def plain_greedy(model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding as a simple loop: the whole sequence re-run for every token."""
    out = prompt
    with torch.no_grad():
        for _ in range(new):
            out = torch.cat((out, model(out)[:, -1].argmax(dim=-1, keepdim=True)), dim=1)
    return out


@needs_pp
def test_generate_on_patched_palm_pytorch_matches_its_own_greedy_loop():
    m = lively_pp()
    prompts = tokens(B=3, T=7, seed=4)
    want = plain_greedy(m, prompts, 14)                   # unpatched, no cache
    assert len(set(want[0, 7:].tolist())) > 3             # a continuation that varies
    palm_fast.patch(m)
    got = palm_fast.generate(m, list(prompts), 14)        # patched, MQA KV cache
    for b in range(3):
        assert torch.equal(got[b], want[b]), b
    # ragged prompts: each sequence on its own
    ragged = [prompts[0, :3], prompts[1], prompts[2, :5]]
    got = palm_fast.generate(m, ragged, 6)
    for p, g in zip(ragged, got):
        assert torch.equal(g, plain_greedy(m, p[None], 6)[0])


@needs_pp
def test_generate_refuses_a_palm_pytorch_layout_it_cannot_run():
    m = pp_model()
    palm_fast.patch(m)
    m[1].fn.scale = 0.5
    with pytest.raises(ValueError, match="scale"):
        palm_fast.generate(m, [tokens(B=1, T=4)[0]], 2)
    with pytest.raises(ValueError, match="laid out like PaLM-pytorch"):
        palm_fast.generate(nn.Sequential(nn.Linear(4, 4)), [tokens(B=1, T=4)[0]], 2)


@needs_pp
def test_palm_lite_variant_is_reported_not_patched():
    from palm_pytorch import palm_lite

    torch.manual_seed(0)
    m = palm_lite.PaLM(dim=32, num_tokens=V, depth=1, dim_head=8, heads=4)
    ref = copy.deepcopy(m)
    with pytest.warns(patching.PatchWarning, match="ALiBi"):
        palm_fast.patch(m)
    assert type(m[1].fn) is palm_lite.ParallelTransformerBlock
    assert type(m[1].fn.ff_out[0]) is palm_fast.nn.SwiGLU          # same value | gate math
    assert_same_logits(m, ref, T=9, rel=1e-5)


@needs_pp
def test_patching_the_root_module_itself():
    ln = pp.LayerNorm(16)
    new = palm_fast.patch(ln)
    assert type(new) is pp_fast.LayerNorm and new.gamma is ln.gamma and new.beta is ln.beta
    assert "replaced <root>" in str(new.palm_fast_report)
    x = torch.randn(3, 16)
    assert max_err(new(x), ln(x)) <= 1e-6
    assert palm_fast.unpatch(new) is ln


def test_reference_gqa_blocks_are_patched_exactly():
    torch.manual_seed(0)
    cfg = palm_fast.get_config("palm-tiny").replace(vocab_size=V, n_kv_heads=2)
    m = RefPaLM(cfg)
    ref = copy.deepcopy(m)
    palm_fast.patch(m)
    assert m.palm_fast_report.ok and type(m.blocks[0]) is palm_fast.nn.ParallelBlock
    assert_same_logits(m, ref, T=20)


@needs_pp
def test_decoder_parts_of_palm_pytorch_rotary_tables():
    """A bf16 model holds the standard table rounded to bf16: accepted (generate uses the fp32
    table); a table that is not the standard one is refused with the reason."""
    from palm_fast.generation import decoder_parts

    m = palm_fast.patch(pp_model().to(torch.bfloat16))
    parts = decoder_parts(m)
    assert len(parts.blocks) == 2 and parts.logit_scale is None
    assert parts.head_weight is m[0].weight and parts.blocks[0].ff_out is m[1].fn.ff_out[1]
    out = palm_fast.generate(m, [tokens(B=1, T=5)[0]], 3)
    assert out[0].shape == (8,) and out[0].dtype == torch.int64
    with torch.no_grad():
        m[2].fn.rotary_emb.inv_freq.mul_(0.5)
    with pytest.raises(ValueError, match=r"model\[2\]\.fn\.rotary_emb\.inv_freq"):
        decoder_parts(m)


def test_a_module_registered_twice_is_replaced_in_every_slot():
    """``nn.ModuleList([b, b])``: named_children() lists the instance once; both slots must
    get the replacement (the same object, so the sharing is kept)."""
    from palm_fast import reference

    ln = reference.LayerNorm(16)
    holder = nn.ModuleList([ln, ln, nn.Sequential(ln)])
    palm_fast.patch(holder)
    assert type(holder[0]) is palm_fast.nn.LayerNorm
    assert holder[0] is holder[1] is holder[2][0]
    assert holder[0].weight is ln.weight


@needs_pp
def test_palm_pytorch_built_under_inference_mode():
    """Buffers and parameters made under torch.inference_mode() have no version counter:
    the patched block must not key its caches on one."""
    with torch.inference_mode():
        m = pp_model()
        x = tokens()
        ref = m(x)
        patched = quiet_patch(m)
        out = patched(x)
    assert max_err(out, ref) <= 1e-4


# ------------------------------------------------------------------ torch.autocast
def _autocast_loss(model, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()   # inside the region: a CPU backward runs with autocast on
    return logits


@pytest.mark.parametrize("which", ["reference", pytest.param("palm_pytorch", marks=needs_pp)])
def test_patched_model_under_autocast_matches_the_original(which):
    """Under torch.autocast the patched model runs as the original does there (it raised:
    a bf16 addmm met an fp32 addmm_ inside the fused output projection): bf16 logits, the
    same values up to bf16 rounding, gradients on the fp32 parameters."""
    base = ref_model() if which == "reference" else pp_model()
    ref = copy.deepcopy(base)
    m = quiet_patch(base)
    assert m.palm_fast_report.ok
    x = tokens(T=21)
    want, got = _autocast_loss(ref, x), _autocast_loss(m, x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert close_rel(got.float(), want.float(), 3e-2)
    for (n, p), (_, q) in zip(ref.named_parameters(), m.named_parameters()):
        assert q.dtype == torch.float32 and q.grad is not None, n
        assert close_rel(q.grad, p.grad, 5e-2), n


@pytest.mark.parametrize("model_dtype,autocast_dtype", [(torch.float32, torch.bfloat16),
                                                       (torch.float16, torch.bfloat16),
                                                       (torch.bfloat16, torch.float16)])
def test_fast_palm_loss_under_autocast(model_dtype, autocast_dtype):
    """A half model under the other half dtype's autocast: the fused loss got fp32 h (the
    composed blocks promote) with the half embedding and raised a TypeError naming an
    argument the user never passed. Under an autocast that casts the weights the loss is
    the reference's."""
    cfg = palm_fast.get_config("palm-tiny").replace(vocab_size=V)
    torch.manual_seed(0)
    ref = RefPaLM(cfg).to(model_dtype)
    fast = palm_fast.nn.PaLM(cfg).to(model_dtype)
    fast.load_state_dict(ref.state_dict())
    x = tokens(T=17)
    with torch.autocast("cpu", dtype=autocast_dtype):
        got = fast.loss(x)[0]
        got.backward()
        want = ref.loss(x)[0]
        want.backward()
    assert torch.isfinite(got) and abs(got.item() - want.item()) <= 2e-2 * abs(want.item())
    for (n, p), (_, q) in zip(ref.named_parameters(), fast.named_parameters()):
        assert close_rel(q.grad, p.grad, 6e-2), n


def test_a_model_in_autocasts_dtype_stays_fused_under_autocast(monkeypatch):
    """A bf16 model under bf16 autocast: nothing to cast, so the fused block runs (the
    composed path is only for x or weights autocast would cast), with the same bits."""
    from palm_fast.nn import block as fast_block

    calls = []
    real = fast_block.parallel_block
    monkeypatch.setattr(fast_block, "parallel_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = palm_fast.nn.PaLM(palm_fast.get_config("palm-tiny").replace(vocab_size=V)).bfloat16()
    x = tokens(T=9)
    with torch.no_grad():
        want = m(x)
        n = len(calls)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m(x)
    assert n == len(m.blocks) and len(calls) == 2 * n
    assert torch.equal(got, want)


def test_ops_compute_in_their_inputs_dtype_under_autocast():
    """palm_fast's ops are not autocast ops: inside an autocast region they return the same
    bits as outside it (their own GEMMs are not recast), forward and backward."""
    from palm_fast.ops import block as ob
    from palm_fast.ops.lm_loss import tied_lm_loss

    g = torch.Generator().manual_seed(3)
    B, T, d, H, D, Fd = 2, 5, 32, 4, 8, 24
    x = torch.randn(B, T, d, generator=g)
    w_in = torch.randn((H + 2) * D + 2 * Fd, d, generator=g) * 0.1
    w_o = torch.randn(d, H * D, generator=g) * 0.1
    w_f = torch.randn(d, Fd, generator=g) * 0.1
    ln_w = torch.rand(d, generator=g) + 0.5
    inv = palm_fast.reference.functional.rope_inv_freq(D, 10000.0)
    emb = torch.randn(11, d, generator=g)
    tgt = torch.randint(0, 11, (B * T,), generator=g)

    def run(autocast):
        leaves = [t.clone().requires_grad_(True) for t in (x, w_in, w_o, w_f, ln_w, emb)]
        xx, wi, wo, wf, lw, e = leaves
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = ob.parallel_block(xx, lw, wi, wo, wf, inv, n_heads=H, head_dim=D, d_ff=Fd)
            loss = tied_lm_loss(y.reshape(B * T, d), e, tgt, z_coef=1e-4)[0]
            loss.backward()
        return [y, loss] + [t.grad for t in leaves]

    for a, b in zip(run(False), run(True)):
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b)


def _pp_block_edits():
    """(name, edit(block)) pairs applied after patch to a PaLM-pytorch block and to the
    original alike: hooks on the block and its parts, and swapped parts."""
    class Scaled(nn.Linear):
        def forward(self, x):
            return 3.0 * super().forward(x)

    class LoRA(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base
            g = torch.Generator().manual_seed(5)
            self.A = nn.Parameter(torch.randn(4, base.in_features, generator=g) * 0.1)
            self.B = nn.Parameter(torch.randn(base.out_features, 4, generator=g) * 0.1)

        def forward(self, x):
            return self.base(x) + x @ self.A.t() @ self.B.t()

    def hook(name):
        return lambda blk: blk.get_submodule(name).register_forward_hook(lambda m, i, o: o * 2.0)

    def biased(blk):
        old = blk.attn_out
        new = nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.copy_(torch.linspace(-1.0, 1.0, old.out_features))   # (not constant: LN removes that)
        blk.attn_out = new

    def scaled(blk):
        old = blk.fused_attn_ff_proj
        new = Scaled(old.in_features, old.out_features, bias=False)
        new.weight = old.weight
        blk.fused_attn_ff_proj = new

    def lora_by_assignment(blk):   # (the adapter set as the instance's forward)
        lin = blk.attn_out
        g = torch.Generator().manual_seed(6)
        A = torch.randn(4, lin.in_features, generator=g) * 0.1
        B = torch.randn(lin.out_features, 4, generator=g)
        lin.forward = lambda t, f=lin.forward: f(t) + t @ A.t() @ B.t()

    def block_forward_assigned(blk):
        blk.forward = lambda t, f=blk.forward: 2.0 * f(t)

    return [("hook on the block", lambda blk: blk.register_forward_hook(lambda m, i, o: o * 2.0)),
            ("LoRA as attn_out's forward", lora_by_assignment),
            ("the block's forward assigned", block_forward_assigned),
            ("hook on attn_out", hook("attn_out")), ("hook on the projection", hook("fused_attn_ff_proj")),
            ("hook on norm", hook("norm")), ("attn_out with a bias", biased),
            ("a Linear subclass", scaled), ("LoRA", lambda blk: setattr(blk, "attn_out", LoRA(blk.attn_out)))]


@needs_pp
@pytest.mark.parametrize("edit", _pp_block_edits(), ids=lambda e: e[0])
def test_palm_pytorch_parts_hooked_or_swapped_after_patch(edit):
    """A hook or a swapped part added after patch: the fused block ran anyway (hooks skipped,
    a bias dropped, a subclass's forward not called; a LoRA wrapper raised AttributeError)."""
    m, ref = pp_model(), pp_model()
    palm_fast.patch(m)
    for model in (m, ref):
        edit[1](model[1].fn)
    x = tokens(T=9)
    with torch.no_grad():
        assert close_rel(m(x), ref(x), 2e-5)


@pytest.mark.parametrize("which", ["reference", pytest.param("palm_pytorch", marks=needs_pp)])
def test_global_module_hooks_reach_the_parts_of_fused_blocks(which):
    """register_module_forward_hook (e.g. fake quantisation of every Linear): the fused
    blocks skipped the calls it sees."""
    from torch.nn.modules.module import register_module_forward_hook

    m = ref_model() if which == "reference" else pp_model()
    ref = copy.deepcopy(m)
    palm_fast.patch(m)
    seen = []

    def fake_quant(mod, inp, out):
        if type(mod) is nn.Linear:
            seen.append(mod)
            return out.round()
        return out

    h = register_module_forward_hook(fake_quant)
    try:
        x = tokens(T=9)
        with torch.no_grad():
            want, n_ref = ref(x), len(seen)
            got = m(x)
        assert len(seen) - n_ref == n_ref and close_rel(got, want, 2e-5)
    finally:
        h.remove()


@pytest.mark.parametrize("which", ["reference", pytest.param("palm_pytorch", marks=needs_pp)])
def test_state_dict_hooks_skip_the_module(which):
    """A state_dict pre-hook or a load_state_dict post-hook stopped firing after patch (the
    replacement does not carry them): such modules are skipped and reported."""
    m = ref_model() if which == "reference" else pp_model()
    blk = m.blocks[0] if which == "reference" else m[1].fn
    fired = []
    blk.register_load_state_dict_post_hook(lambda mod, keys: fired.append("load"))
    blk.norm.register_state_dict_pre_hook(lambda mod, prefix, keep_vars: fired.append("save"))
    quiet_patch(m)
    assert any("hooks" in r.reason for r in m.palm_fast_report.skipped)
    m.load_state_dict(m.state_dict())
    assert fired == ["save", "load"]


@pytest.mark.parametrize("which", ["reference", pytest.param("palm_pytorch", marks=needs_pp)])
def test_unpatch_hands_back_submodules_swapped_after_patch(which):
    """A LoRA wrapper put around attn_out after patch (as PEFT does) was dropped by unpatch:
    the original's plain Linear came back, the wrapper's parameters were lost."""
    edits = dict(_pp_block_edits())
    m = ref_model() if which == "reference" else pp_model()
    ref = copy.deepcopy(m)
    palm_fast.patch(m)
    for model in (m, ref):
        edits["LoRA"](model.blocks[0] if which == "reference" else model[1].fn)
    m = palm_fast.unpatch(m)
    blk = m.blocks[0] if which == "reference" else m[1].fn
    assert type(blk.attn_out).__name__ == "LoRA"
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in ref.parameters())
    x = tokens(T=9)
    with torch.no_grad():
        assert close_rel(m(x), ref(x), 1e-6)


# ------------------------------------------------------------------ lookalikes: code changed at run time
def _lookalike_edits(which):
    """(name, edit(model), where the skip is reported, whether generate refuses it): methods
    replaced on an instance, which a replacement (or generate) reading the weights would
    silently bypass. (generate calls a norm or activation with code of its own as a module.)"""
    def scale(f, c):
        return lambda *a, **k: c * f(*a, **k)

    if which == "reference":
        def lora(m):
            lin = m.blocks[0].attn_out
            lin.forward = scale(lin.forward, 1.5)

        def norm(m):
            m.norm.forward = scale(m.norm.forward, 2.0)

        def rotary(m):
            rot = m.blocks[1].rotary
            rot.forward = lambda q, k, positions=None, offsets=None, f=rot.forward: f(
                q, k, None if positions is None else positions // 2, offsets)

        return [("attn_out.forward", lora, "blocks.0", True), ("norm.forward", norm, "norm", False),
                ("rotary.forward", rotary, "blocks.1", True)]

    def get_mask(m):   # a sliding window of 4 tokens
        blk = m[1].fn
        blk.get_mask = lambda n, device, f=blk.get_mask: f(n, device) | torch.ones(
            n, n, dtype=torch.bool, device=device).tril(-4)

    def swiglu(m):     # GeGLU instead
        act = m[2].fn.ff_out[0]
        act.forward = lambda x: (lambda v, g: F.gelu(g) * v)(*x.chunk(2, dim=-1))

    def lora(m):
        lin = m[1].fn.attn_out
        lin.forward = scale(lin.forward, 1.5)

    return [("get_mask", get_mask, "1", True), ("SwiGLU.forward", swiglu, "2", False),
            ("attn_out.forward", lora, "1", True)]


@pytest.mark.parametrize("which", ["reference", pytest.param("palm_pytorch", marks=needs_pp)])
def test_methods_replaced_on_an_instance_skip_the_module(which):
    """A method set on an instance (a LoRA by forward assignment, a sliding-window get_mask):
    patch swapped such modules and the change silently vanished (logits 4-67% off)."""
    for name, edit, where, refused in _lookalike_edits(which):
        m = ref_model() if which == "reference" else pp_model()
        edit(m)
        ref = copy.deepcopy(m)
        quiet_patch(m)
        reasons = [r.reason for r in m.palm_fast_report.skipped if r.path == where]
        assert reasons and "set on the instance" in reasons[0], (name, m.palm_fast_report.skipped)
        x = tokens(T=9)
        with torch.no_grad():
            assert close_rel(m(x), ref(x), 2e-5), name
        if refused:
            with pytest.raises(ValueError, match="set on the instance"):
                palm_fast.generate(m, [x[0, :4]], 2)
        else:   # called as a module: the same tokens as the model's own greedy decoding
            got = palm_fast.generate(m, [x[0, :4]], 5)[0]
            want = ref.generate(x[:1, :4], 5)[0] if which == "reference" else \
                plain_greedy(ref, x[:1, :4], 5)[0]
            assert torch.equal(got, want), name


@needs_pp
@pytest.mark.parametrize("change", ["apply_rotary_pos_emb", "SwiGLU.forward", "get_rotary_embedding"])
def test_palm_pytorch_code_replaced_at_run_time_is_not_patched(monkeypatch, change):
    """pp.apply_rotary_pos_emb replaced (a context-extension hack), SwiGLU.forward made a
    GeGLU: patch swapped the blocks anyway and the change vanished (14-18% off)."""
    if change == "apply_rotary_pos_emb":
        orig = pp.apply_rotary_pos_emb
        monkeypatch.setattr(pp, "apply_rotary_pos_emb", lambda pos, t: orig(pos / 4, t))
    elif change == "SwiGLU.forward":
        monkeypatch.setattr(pp.SwiGLU, "forward",
                            lambda self, x: (lambda v, g: F.gelu(g) * v)(*x.chunk(2, -1)))
    else:
        orig = pp.ParallelTransformerBlock.get_rotary_embedding
        monkeypatch.setattr(pp.ParallelTransformerBlock, "get_rotary_embedding",
                            lambda self, n, device: orig(self, n, device) / 2)
    m = pp_model()
    ref = copy.deepcopy(m)
    quiet_patch(m)
    assert all(type(m[i].fn) is pp.ParallelTransformerBlock for i in (1, 2))
    if change == "SwiGLU.forward":
        assert all(type(m[i].fn.ff_out[0]) is pp.SwiGLU for i in (1, 2))
    assert m.palm_fast_report.skipped and \
        all("replaced at run time" in r.reason for r in m.palm_fast_report.skipped)
    with torch.no_grad():
        assert close_rel(m(tokens(T=9)), ref(tokens(T=9)), 2e-5)
    with pytest.raises(ValueError, match="replaced at run time"):
        palm_fast.generate(m, [tokens(T=4)[0]], 2)


def test_reference_code_replaced_at_run_time_is_not_patched(monkeypatch):
    ref_cls = palm_fast.reference.SwiGLU
    monkeypatch.setattr(ref_cls, "forward", lambda self, x: (lambda v, g: F.gelu(g) * v)(*x.chunk(2, -1)))
    m = ref_model()
    ref = copy.deepcopy(m)
    quiet_patch(m)
    assert any("SwiGLU.forward was replaced" in r.reason for r in m.palm_fast_report.skipped)
    assert all(type(b) is palm_fast.reference.ParallelBlock for b in m.blocks)
    assert_same_logits(m, ref, T=9)
    # generate calls an activation whose class code changed as a module: the same tokens
    x = tokens(T=4)
    assert torch.equal(palm_fast.generate(m, [x[0]], 5)[0], ref.generate(x[:1], 5)[0])
    monkeypatch.setattr(palm_fast.reference.ParallelBlock, "forward",
                        lambda self, x, positions=None, cache=None: x)
    with pytest.raises(ValueError, match="ParallelBlock.forward replaced at run time"):
        palm_fast.generate(m, [x[0]], 2)


@needs_pp
@pytest.mark.parametrize("cache", ["mask", "pos_emb", "stale pos_emb"])
def test_palm_pytorch_hand_set_caches_are_not_patched(cache):
    """The original block reads its cached causal mask and rotary table whenever they are
    long enough; the fast block computes both: a sliding-window mask or an interpolated
    table set by hand (or a table made stale by changing inv_freq) was dropped silently."""
    m = pp_model()
    x = tokens(T=9)
    m(x)   # fills the caches
    blk = m[1].fn
    if cache == "mask":
        blk.mask |= torch.ones_like(blk.mask).tril(-3)
    elif cache == "pos_emb":
        blk.pos_emb /= 4
    else:
        blk.rotary_emb.inv_freq /= 2
    ref = copy.deepcopy(m)
    quiet_patch(m)
    skipped = {r.path: r.reason for r in m.palm_fast_report.skipped}
    assert cache.split()[-1] in skipped["1.fn"]
    assert type(m[2].fn) is pp_fast.ParallelTransformerBlock   # the untouched block is patched
    with torch.no_grad():
        assert close_rel(m(x), ref(x), 2e-5)
    palm_fast.unpatch(m)
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))


@needs_pp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_palm_pytorch_standard_caches_are_patched(dtype):
    """The caches a forward leaves (also converted to bf16 afterwards) are the standard ones."""
    m = pp_model()
    m(tokens(T=9))
    m.to(dtype)
    quiet_patch(m)
    assert m.palm_fast_report.ok, m.palm_fast_report.skipped


@pytest.mark.parametrize("which", ["reference", pytest.param("palm_pytorch", marks=needs_pp)])
def test_trained_rope_frequencies_are_not_patched(which):
    """inv_freq made a trainable Parameter: patch went through, then the first backward raised
    about an argument the user never passed."""
    m = ref_model() if which == "reference" else pp_model()
    for mod in m.modules():
        if "inv_freq" in mod._buffers:
            inv = mod._buffers.pop("inv_freq")
            mod.inv_freq = nn.Parameter(inv.clone())
    ref = copy.deepcopy(m)
    quiet_patch(m)
    assert any("inv_freq is trained" in r.reason for r in m.palm_fast_report.skipped)
    x = tokens(T=9)
    lm_loss(m, x).backward()
    lm_loss(ref, x).backward()
    for (n, a), b in zip(m.named_parameters(), ref.parameters()):
        if "inv_freq" in n:
            assert a.grad is not None and close_rel(a.grad, b.grad, 1e-4), n


@needs_pp
def test_palm_pytorch_layer_norm_gain_as_a_buffer_is_skipped():
    m = pp_model()
    ln = m[-2]
    g = ln._parameters.pop("gamma")
    ln.register_buffer("gamma", g.detach().clone())
    quiet_patch(m)
    assert any("gamma is a" in r.reason for r in m.palm_fast_report.skipped)
    assert type(m[-2]) is pp.LayerNorm


def test_parametrized_registered_module_is_reported_as_parametrized():
    """The parametrization makes a subclass: the report advised registering it, which failed."""
    from torch.nn.utils import parametrize

    class Half(nn.Module):
        def forward(self, w):
            return w * 0.5

    m = ref_model()
    parametrize.register_parametrization(m.norm, "weight", Half())
    ref = copy.deepcopy(m)
    quiet_patch(m)
    reasons = [r.reason for r in m.palm_fast_report.skipped if r.path == "norm"]
    assert reasons and "weight is parametrized" in reasons[0]
    assert_same_logits(m, ref, T=9)


def test_reference_norm_weight_in_bf16_with_fp32_activations():
    """The reference LayerNorm takes its weight in fp32 whatever its dtype; the fast one
    raised after a successful patch."""
    m = ref_model()
    for mod in m.modules():
        if isinstance(mod, palm_fast.reference.LayerNorm):
            mod.to(torch.bfloat16)
    ref = copy.deepcopy(m)
    quiet_patch(m)
    assert m.palm_fast_report.ok
    x = tokens(T=9)
    assert close_rel(m(x), ref(x), 2e-5)
    lm_loss(m, x).backward()
    lm_loss(ref, x).backward()
    for (n, a), b in zip(m.named_parameters(), ref.parameters()):
        assert a.grad.dtype == b.grad.dtype and close_rel(a.grad.float(), b.grad.float(), 1e-2), n


def test_user_registrations_are_not_overwritten_by_builtins_loaded_later():
    """In a fresh process: a user's register() of a built-in class before the first patch()
    was accepted, then silently overwritten when patch loaded the built-ins; a user's
    decoder_parts for nn.Sequential was overwritten once PaLM-pytorch got imported."""
    import subprocess
    import sys

    code = r'''
import torch, palm_fast
from palm_fast import patching
from palm_fast.reference import layers as ref
def mine(m, opts):
    raise patching.Unsupported("mine")
try:
    patching.register(ref.LayerNorm, mine, kind="layer_norm")
    print("accepted")
except ValueError as e:
    print("refused:", "replace=True" in str(e))
patching.register(ref.LayerNorm, mine, kind="layer_norm", replace=True)
model = torch.nn.Sequential(ref.LayerNorm(8))
import warnings; warnings.simplefilter("ignore")
palm_fast.patch(model)
print("factory:", [r.reason for r in model.palm_fast_report.skipped])
from palm_fast import generation
def parts(model):
    raise ValueError("my layout")
generation.register_decoder_parts(torch.nn.Sequential, parts)
try:
    import palm_pytorch  # noqa: F401
except ImportError:
    print("no palm_pytorch"); raise SystemExit
try:
    palm_fast.generate(torch.nn.Sequential(torch.nn.Linear(2, 2)), [[1]], 1)
except ValueError as e:
    print("decoder:", str(e))
'''
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "refused: True"
    assert lines[1] == "factory: ['mine']"
    assert lines[2] in ("decoder: my layout", "no palm_pytorch"), lines


def test_a_failed_builtin_load_is_retried(monkeypatch, registry_guard):
    """The built-ins were marked loaded before their registration ran: after one failure
    (e.g. a missing subpackage) patch and generate silently did nothing."""
    from palm_fast.integrations import reference as ref_integration

    patching._REGISTRY.clear()
    patching._BUILTINS_LOADED.clear()
    real = ref_integration.register_all
    monkeypatch.setattr(ref_integration, "register_all", lambda: (_ for _ in ()).throw(ImportError("boom")))
    with pytest.raises(ImportError, match="boom"):
        palm_fast.patch(ref_model())
    monkeypatch.setattr(ref_integration, "register_all", real)
    m = quiet_patch(ref_model())
    assert m.palm_fast_report.patched


@needs_pp
def test_palm_pytorch_rope_change_still_patches_its_norms(monkeypatch):
    """A RoPE function replaced at run time blocks the blocks only: the LayerNorms and
    SwiGLUs (which do not use it) were refused with it."""
    orig = pp.apply_rotary_pos_emb
    monkeypatch.setattr(pp, "apply_rotary_pos_emb", lambda pos, t: orig(pos / 4, t))
    m = pp_model()
    ref = copy.deepcopy(m)
    quiet_patch(m)
    assert type(m[-2]) is pp_fast.LayerNorm and type(m[1].fn.norm) is pp_fast.LayerNorm
    assert type(m[1].fn) is pp.ParallelTransformerBlock
    with torch.no_grad():
        assert close_rel(m(tokens(T=9)), ref(tokens(T=9)), 2e-5)


@needs_pp
def test_generate_refuses_palm_pytorch_rotary_with_code_of_its_own():
    """generate reads rotary_emb's inv_freq and never calls it: a forward set on it (or a
    hook) ran unnoticed."""
    m = pp_model()
    rot = m[1].fn.rotary_emb
    rot.forward = lambda n, *, device, f=rot.forward: f(n, device=device) / 4
    with pytest.raises(ValueError, match=r"model\[1\].fn.rotary_emb has its own 'forward'"):
        palm_fast.generate(m, [tokens(T=4)[0]], 2)


@needs_pp
@pytest.mark.parametrize("change", ["hook", "class forward"])
def test_palm_pytorch_rotary_changed_after_patch_is_called(monkeypatch, change):
    """A hook added to a patched block's rotary_emb (position interpolation), or
    RotaryEmbedding.forward replaced after patch: the original calls rotary_emb for its table,
    the fast block read inv_freq and dropped the change (fused and composed paths alike)."""
    m = pp_model()
    ref = copy.deepcopy(m)
    quiet_patch(m)
    assert type(m[1].fn) is pp_fast.ParallelTransformerBlock

    def interpolate(mod, args, kwargs, out):
        return out / 4

    if change == "hook":
        for model in (m, ref):
            model[1].fn.rotary_emb.register_forward_hook(interpolate, with_kwargs=True)
    else:
        orig = pp.RotaryEmbedding.forward
        monkeypatch.setattr(pp.RotaryEmbedding, "forward",
                            lambda self, n, *, device: orig(self, n, device=device) / 4)
    x = tokens(T=9)
    with torch.no_grad():
        assert close_rel(m(x), ref(x), 2e-5)
    loss = m(x).float().logsumexp(-1).mean()
    loss.backward()   # (the composed path is differentiable)
    with pytest.raises(ValueError, match="rotary_emb|RotaryEmbedding.forward"):
        palm_fast.generate(m, [x[0, :4]], 2)


def test_reset_parameters_of_a_patched_reference_model_resets_the_fast_norms():
    """Meta-device init (patch, to_empty, reset_parameters): the reference's init matched its
    own LayerNorm class only, so the fast LayerNorms kept uninitialised memory (NaN logits)
    or, on a trained model, their trained weights."""
    with torch.device("meta"):
        m = RefPaLM(palm_fast.get_config("palm-tiny").replace(vocab_size=V))
    quiet_patch(m)
    m.to_empty(device="cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float("nan"))
    torch.manual_seed(0)
    m.reset_parameters()
    want = RefPaLM(palm_fast.get_config("palm-tiny").replace(vocab_size=V))
    torch.manual_seed(0)
    want.reset_parameters()
    for (n, p), (_, q) in zip(m.state_dict().items(), want.state_dict().items()):
        assert torch.equal(p, q), n


def test_load_state_dict_with_swapped_params_after_a_forward(simulated_packing, monkeypatch):
    """Under torch.__future__.set_swap_module_params_on_conversion(True) load_state_dict swaps
    tensors, which torch refuses for a tensor with a weak reference: the packed weight's cache
    key (CUDA path) held one, so a load after the first forward raised half-way. The cache is
    dropped before the parts load. (Packing simulated on the CPU.)"""
    cfg = palm_fast.get_config("palm-tiny").replace(vocab_size=V)
    m = palm_fast.nn.PaLM(cfg)
    b = m.blocks[0]
    b._packed_in_proj()
    sd = RefPaLM(cfg).state_dict()
    monkeypatch.setattr(torch.__future__, "get_swap_module_params_on_conversion", lambda: True)
    m.load_state_dict(sd)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert torch.equal(b._packed_in_proj(), b.in_proj.weight)


def test_patch_and_unpatch_keep_each_modules_train_flag():
    """patch set new.train(original.training) and unpatch the reverse: every submodule the two
    share (the projections) took the root's flag, so a part the user had put in eval mode (a
    dropout, a frozen norm) came back in train mode. Each module now keeps its own; a module
    patch built takes the flag of the module it replaces."""
    m = ref_model().train()
    m.blocks[0].in_proj.eval()
    m.blocks[1].norm.eval()
    quiet_patch(m)
    assert not m.blocks[0].in_proj.training and m.blocks[0].attn_out.training
    assert not m.blocks[1].norm.training and m.blocks[0].norm.training and m.blocks[1].training
    palm_fast.unpatch(m)
    assert not m.blocks[0].in_proj.training and m.blocks[0].attn_out.training
    assert not m.blocks[1].norm.training and m.blocks[0].norm.training
    quiet_patch(m)
    m.eval()                      # after patch: unpatch hands the flags back
    palm_fast.unpatch(m)
    assert not any(mod.training for mod in m.modules())


@needs_pp
def test_patched_palm_pytorch_model_converted_to_float64_is_a_clear_error():
    m = pp_model()
    quiet_patch(m)
    m.double()
    with pytest.raises(TypeError, match="float64 .* palm_fast.unpatch"):
        m(tokens(T=5))
    palm_fast.unpatch(m)
    assert m(tokens(T=5)).dtype == torch.float64


def test_packed_weight_is_not_cached_while_a_cuda_graph_is_captured(simulated_packing, monkeypatch):
    """A forward captured in a CUDA graph read the cached re-laid-out weight: its replays kept
    reading that copy after an optimizer step (0.47 off; refresh_caches could not reach into
    the graph). While capturing, the re-layout runs in the graph from the live weight and
    nothing is cached. (Capture faked; packing simulated on the CPU.)"""
    from palm_fast.ops import _dispatch

    b = palm_fast.nn.PaLM(palm_fast.get_config("palm-tiny").replace(vocab_size=V)).blocks[0]
    cached = b._packed_in_proj()
    assert b._packed_in_proj() is cached
    monkeypatch.setattr(_dispatch, "cuda_capturing", lambda: True)
    during = b._packed_in_proj()
    assert during is not cached and b._packed_in_proj() is not during
    assert b._packed is cached   # (the eager cache is left alone)


def test_in_proj_pair_indices_are_kept_per_device_and_built_anew_when_traced():
    """pack_in_proj's index tensors are kept (a host-to-device copy is not allowed while a
    CUDA graph is captured), except under a FakeTensorMode (a kept fake tensor poisons the
    cache); the packs are the same."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from palm_fast.kernels import projection as kp

    key = (2, 1, 8, 12, 4, False, torch.device("cpu"))
    assert kp._pair_indices(*key)[0] is kp._pair_indices(*key)[0]
    with FakeTensorMode():
        fake = kp._pair_indices(*key)[0]
    assert fake is not kp._pair_indices(*key)[0] and not isinstance(kp._pair_indices(*key)[0],
                                                                    type(fake))
    w = torch.randn((2 + 2) * 8 + 2 * 12, 16)
    inv = torch.rand(4)
    p1, p2 = kp.pack_in_proj(w, inv, 2, 1, 8, 12, False), kp.pack_in_proj(w, inv, 2, 1, 8, 12, False)
    assert torch.equal(p1.w_a, p2.w_a) and torch.equal(p1.freq, p2.freq)


def test_weight_cache_can_be_turned_off(simulated_packing):
    """set_weight_cache(model, False): no re-laid-out copy of in_proj.weight is kept (each
    call builds one), and the copies held are dropped; True caches again."""
    m = palm_fast.nn.PaLM(palm_fast.get_config("palm-tiny").replace(vocab_size=V))
    b = m.blocks[0]
    first = b._packed_in_proj()
    assert b._packed is first
    assert palm_fast.nn.set_weight_cache(m, False) == len(m.blocks)
    assert b._packed is None
    one, two = b._packed_in_proj(), b._packed_in_proj()
    assert one is not two and torch.equal(one, b.in_proj.weight) and b._packed is None
    assert palm_fast.nn.set_weight_cache(m, True) == len(m.blocks)
    assert b._packed_in_proj() is b._packed_in_proj()
    with pytest.raises(TypeError, match="enabled: expected a bool"):
        palm_fast.nn.set_weight_cache(m, 0)
    with pytest.raises(TypeError, match="model: expected an nn.Module, got NoneType"):
        palm_fast.nn.set_weight_cache(None, False)
    with pytest.raises(TypeError, match="model: expected an nn.Module, got list"):
        palm_fast.nn.refresh_caches([m])


def test_pickled_and_copied_blocks_leave_the_weight_cache_behind(simulated_packing):
    """deepcopy / torch.save of a model do not carry the cached re-layout (a copy of each
    in_proj weight: +58% file size); the copy rebuilds its own."""
    import io

    m = palm_fast.nn.PaLM(palm_fast.get_config("palm-tiny").replace(vocab_size=V))

    def saved_bytes(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.tell()

    before = saved_bytes(m)
    for b in m.blocks:
        b._packed_in_proj()
    assert all(b._packed is not None for b in m.blocks)
    assert saved_bytes(m) == before
    c = copy.deepcopy(m)
    assert all(b._packed is None and b._packed_key is None for b in c.blocks)
    assert torch.equal(c.blocks[0]._packed_in_proj(), c.blocks[0].in_proj.weight)
    assert m.blocks[0]._packed is not None          # the original keeps its own


@needs_pp
def test_patched_palm_pytorch_blocks_leave_the_weight_cache_behind(monkeypatch):
    import io

    monkeypatch.setattr(pp_fast, "uses_triton", lambda dev: True)
    monkeypatch.setattr(pp_fast, "pack_in_proj", lambda w, *a: w.detach().clone())
    m = quiet_patch(pp_model())
    blocks = [mod for mod in m.modules() if isinstance(mod, pp_fast.ParallelTransformerBlock)]
    buf = io.BytesIO()
    torch.save(m, buf)
    before = buf.tell()
    for b in blocks:
        b._packed_in_proj(b.rotary_emb.inv_freq.float())
        assert b._packed is not None
    buf = io.BytesIO()
    torch.save(m, buf)
    assert buf.tell() == before
    c = copy.deepcopy(m)
    assert all(b._packed is None for b in c.modules() if isinstance(b, pp_fast.ParallelTransformerBlock))
    assert palm_fast.nn.set_weight_cache(m, False) == len(blocks)
    assert all(b._packed is None for b in blocks)


def test_patched_model_is_freed_without_the_cycle_collector():
    """A patched model's weights go with ``del model`` (reference counting): each replacement
    kept itself in its table of built submodules, a reference cycle, and the model lived on
    (with its weights and grads) until gc ran: 9 of 10 parameters."""
    import gc
    import weakref

    quiet_patch(ref_model())        # any first-use caches
    gc.collect()
    gc.disable()
    try:
        m = quiet_patch(ref_model())
        refs = [weakref.ref(p) for p in m.parameters()]
        del m
        assert sum(r() is not None for r in refs) == 0
        m = palm_fast.unpatch(quiet_patch(ref_model()))
        refs = [weakref.ref(p) for p in m.parameters()]
        del m
        assert sum(r() is not None for r in refs) == 0
        if pp is not None:
            m = quiet_patch(pp_model())
            refs = [weakref.ref(p) for p in m.parameters()]
            del m
            assert sum(r() is not None for r in refs) == 0
    finally:
        gc.enable()


@needs_pp
def test_patch_drops_the_originals_mask_and_rotary_caches():
    """The original PaLM-pytorch block's causal mask (T x T) and rotary table, built by a
    forward before patch, are not kept alive by the replacement; after unpatch the original
    rebuilds them and computes as before."""
    m = pp_model()
    x = tokens(T=33)
    want = m(x)
    origs = [mod for mod in m.modules() if isinstance(mod, pp.ParallelTransformerBlock)]
    assert origs and all(o.mask is not None and o.pos_emb is not None for o in origs)
    m = quiet_patch(m)
    assert all(o.mask is None and o.pos_emb is None for o in origs)
    torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-4)
    m = palm_fast.unpatch(m)
    assert torch.equal(m(x), want)
    # a block that patch skips (here: an extra buffer, a state mismatch) keeps its caches
    origs[0].register_buffer("extra", torch.zeros(1))
    m = quiet_patch(m)
    assert any(mod is origs[0] for mod in m.modules())
    assert origs[0].mask is not None and origs[0].pos_emb is not None
    assert origs[1].mask is None


# ----------------------------------------- reference functions replaced at run time

def _reference_function_change(name: str):
    """(module, attribute, replacement, kinds of reference module that call it as they run)."""
    import functools
    import types

    from palm_fast.reference import functional as Fn
    from palm_fast.reference import layers as L

    def geglu(x):
        value, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * value

    if name == "attention":   # (sliding-window attention, a softmax temperature...)
        orig = L.attention
        return L, "attention", lambda q, k, v, **kw: orig(q * 0.5, k, v, **kw), {"block"}
    if name == "_rope_cache_attend":
        orig = L._rope_cache_attend
        return L, name, lambda rot, q, k, v, pos, cache: orig(rot, q * 0.5, k, v, pos, cache), {"block"}
    if name == "_compute_dtype":
        return L, name, lambda x: torch.float64, {"block", "layer_norm"}
    rope = {"block", "rope"}
    if name == "apply_rope (functools.wraps)":   # position interpolation; keeps name and module
        orig = Fn.apply_rope

        @functools.wraps(orig)
        def interpolated(x, positions, inv_freq, **kw):
            return orig(x, positions // 4, inv_freq, **kw)
        return Fn, "apply_rope", interpolated, rope
    if name == "apply_rope (a copy rotating backwards)":   # (only an identity check sees it)
        orig = Fn.apply_rope
        copy_ = types.FunctionType(orig.__code__, orig.__globals__, orig.__name__, orig.__defaults__,
                                   orig.__closure__)
        copy_.__kwdefaults__ = {"interleaved": False, "inverse": True}
        copy_.__qualname__ = orig.__qualname__
        return Fn, "apply_rope", copy_, rope
    if name == "rope_angles":
        orig = Fn.rope_angles
        return Fn, name, lambda positions, inv_freq: orig(positions, inv_freq) / 4, rope
    if name == "rotate_half":
        orig = Fn.rotate_half
        return Fn, name, lambda x: -orig(x), rope
    if name == "positions_from_offsets":
        orig = Fn.positions_from_offsets
        return Fn, name, lambda offsets, T: 2 * orig(offsets, T), rope
    if name == "swiglu":
        return Fn, name, geglu, {"block", "swiglu"}
    assert name == "Fn"   # the functional module the layers call, swapped for another
    other = types.SimpleNamespace(**{k: v for k, v in vars(Fn).items() if not k.startswith("__")})
    other.swiglu = geglu
    return L, name, other, {"block", "rope", "swiglu"}


def _part_kind(path: str) -> str:
    leaf = path.rsplit(".", 1)[-1]
    return {"norm": "layer_norm", "rotary": "rope", "act": "swiglu"}.get(leaf, "block")


@pytest.mark.parametrize("change", [
    "attention", "_rope_cache_attend", "_compute_dtype", "apply_rope (functools.wraps)",
    "apply_rope (a copy rotating backwards)", "rope_angles", "rotate_half",
    "positions_from_offsets", "swiglu", "Fn"])
def test_reference_function_replaced_at_run_time_is_not_patched_over(monkeypatch, change):
    """A module-level function of palm_fast.reference replaced at run time (sliding-window
    attention, RoPE position interpolation, GeGLU for SwiGLU) changes what the reference
    modules compute; patch replaced them anyway, dropping the change silently (logits off
    by 0.4-2.1). The modules that call it are skipped, naming it; the others are patched."""
    module, attr, new, kinds = _reference_function_change(change)
    monkeypatch.setattr(module, attr, new)
    m = ref_model()
    ref = copy.deepcopy(m)
    with pytest.warns(patching.PatchWarning, match=f"{module.__name__}.{attr} was replaced"):
        palm_fast.patch(m)
    rep = m.palm_fast_report
    skipped = {r.path: r.reason for r in rep.skipped}
    patched = {r.path for r in rep.patched}
    n = len(m.blocks)
    paths = [f"blocks.{i}{part}" for i in range(n) for part in ("", ".norm", ".rotary", ".act")]
    for path in paths + ["norm"]:
        if _part_kind(path) in kinds:
            assert f"{module.__name__}.{attr} was replaced" in skipped[path], path
        else:
            assert path in patched, path
    x = tokens(T=9)
    with torch.no_grad():
        want = ref(x)
        assert close_rel(m(x), want, 2e-5)
        monkeypatch.undo()
        if change not in ("positions_from_offsets", "_compute_dtype"):   # (the model never calls
            # the first; the second computes in fp64 here, within fp32 rounding of the original)
            assert max_err(ref(x), want) > 1e-2   # the change is one the patched model must keep


def test_reference_function_replaced_before_the_first_patch_is_seen(monkeypatch):
    """The originals are held from the integration's import, which the first patch call
    makes: a function replaced before then is told by its globals and qualname (and the
    untouched functions are still taken as the originals)."""
    from palm_fast.integrations import reference as ref_integration
    from palm_fast.reference import functional as Fn

    monkeypatch.setattr(ref_integration, "_ORIGINALS", {})
    m = quiet_patch(ref_model())
    assert m.palm_fast_report.ok
    monkeypatch.setattr(Fn, "rotate_half", lambda x: -torch.cat(x.chunk(2, dim=-1)[::-1], dim=-1))
    m = ref_model()
    ref = copy.deepcopy(m)
    quiet_patch(m)
    assert {r.path for r in m.palm_fast_report.skipped} == {
        "blocks.0", "blocks.0.rotary", "blocks.1", "blocks.1.rotary"}
    assert "palm_fast.reference.functional.rotate_half" in m.palm_fast_report.skipped[0].reason
    assert_same_logits(m, ref, T=9)


class _LoRA(nn.Module):
    """A hand-written LoRA wrapper of a Linear: no ``.weight`` of its own."""

    def __init__(self, base: nn.Linear, r: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base = base
        self.A = nn.Parameter(torch.randn(r, base.in_features, generator=g) * 0.1)
        self.B = nn.Parameter(torch.randn(base.out_features, r, generator=g) * 0.1)

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t()


def _assert_same_outputs_and_grads(m, ref, x):
    got, want = m(x), ref(x)
    assert close_rel(got, want, 2e-5)
    got.square().mean().backward()
    want.square().mean().backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    assert grads.keys() == {n for n, _ in m.named_parameters()}
    for n, p in m.named_parameters():
        assert close_rel(p.grad, grads[n], 2e-5), n
    assert any(".A" in n for n in grads) and all(grads[n].abs().max() > 0 for n in grads if ".A" in n)


@pytest.mark.parametrize("kind", ["reference", pytest.param("palm_pytorch", marks=needs_pp)])
def test_lora_without_a_weight_on_the_input_projection_after_patch(kind):
    """A LoRA wrapper (no ``.weight``) put on a patched block's input projection: the float64
    check read ``in_proj.weight`` / ``fused_attn_ff_proj.weight`` before the block saw it
    could not fuse, an AttributeError. The block runs its composed path: the unpatched
    model's outputs and gradients (the LoRA's included)."""
    m = ref_model() if kind == "reference" else pp_model()
    ref = copy.deepcopy(m)
    quiet_patch(m)
    assert m.palm_fast_report.ok
    for model in (m, ref):
        if kind == "reference":
            model.blocks[0].in_proj = _LoRA(model.blocks[0].in_proj)
        else:
            model[1].fn.fused_attn_ff_proj = _LoRA(model[1].fn.fused_attn_ff_proj)
    _assert_same_outputs_and_grads(m, ref, tokens(T=9))


# ------------------------------------------------------------------ torch.compile wrappers; unpatch hand-back
def _palm_fast_modules(model):
    return sorted({type(x).__qualname__ for x in model.modules()
                   if type(x).__module__.startswith(("palm_fast.nn", "palm_fast.integrations"))})


def _inject_lora(model, leaf="attn_out"):
    """PEFT's way: find the Linear by name, replace it in its parent."""
    for name, mod in list(model.named_modules()):
        if name.endswith(leaf):
            parent = model.get_submodule(name.rpartition(".")[0])
            setattr(parent, leaf, _LoRA(mod))


def test_patch_does_not_replace_the_module_inside_a_torch_compile_wrapper():
    """``blocks[i] = torch.compile(block)`` then patch: patch replaced the wrapper's
    ``_orig_mod`` and reported it, but the wrapper's forward stays bound to the block it was
    built with, so the fast block never ran and a LoRA put into the "patched" block was
    ignored. The block is now reported as skipped (patch before compiling); its parts, which
    the block looks up when it runs, are patched."""
    torch._dynamo.reset()
    m = ref_model()
    ref = copy.deepcopy(m)
    for i, b in enumerate(m.blocks):
        m.blocks[i] = torch.compile(b, backend="eager")
    with pytest.warns(patching.PatchWarning, match="inside a torch.compile wrapper"):
        palm_fast.patch(m)
    rep = m.palm_fast_report
    assert {r.path for r in rep.skipped} == {"blocks.0._orig_mod", "blocks.1._orig_mod"}
    assert "patch before compiling" in rep.skipped[0].reason
    for r in rep.patched:   # every module the report lists is the one the model runs
        assert type(m.get_submodule(r.path)).__module__.startswith("palm_fast.nn"), r.path
    assert type(m.blocks[0]._orig_mod) is type(ref.blocks[0])
    assert type(m.blocks[0]._orig_mod.norm) is palm_fast.nn.LayerNorm
    for model in (m, ref):
        _inject_lora(model)
    x = tokens(T=9)
    got, want = m(x), ref(x)
    assert close_rel(got, want, 2e-5)   # (before: the LoRA was ignored)
    got.square().mean().backward()
    want.square().mean().backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), m.named_parameters()):
        assert q.grad is not None and close_rel(q.grad, p.grad, 2e-5), n
    torch._dynamo.reset()


def test_patch_of_a_compiled_model_patches_the_modules_it_calls():
    """``patch(torch.compile(model))``: the wrapper calls the model, which looks its blocks
    up when it runs, so the blocks replaced inside it run (a setting changed on a replaced
    module shows in the compiled model's outputs, also after a first compiled call). A
    compiled registered module itself is not replaced (its wrapper would not call it)."""
    torch._dynamo.reset()
    m = ref_model()
    ref = copy.deepcopy(m)
    x = tokens(T=9)
    compiled = torch.compile(m, backend="eager")
    compiled(x)
    assert quiet_patch(compiled) is compiled
    rep = compiled.palm_fast_report
    assert rep.ok and {r.path for r in rep.patched} == {"_orig_mod.blocks.0", "_orig_mod.blocks.1",
                                                        "_orig_mod.norm"}
    for model in (compiled._orig_mod, ref):
        model.norm.eps = 0.5
    with torch.no_grad():
        assert close_rel(compiled(x), ref(x), 2e-5)
    palm_fast.unpatch(compiled)
    assert _palm_fast_modules(compiled) == []

    norm = palm_fast.reference.LayerNorm(64)
    wrapped = torch.compile(norm, backend="eager")
    with pytest.warns(patching.PatchWarning, match="inside a torch.compile wrapper"):
        palm_fast.patch(wrapped)
    assert wrapped._orig_mod is norm and [r.path for r in wrapped.palm_fast_report.skipped] == ["_orig_mod"]
    torch._dynamo.reset()


def test_unpatch_leaves_a_fast_module_compiled_after_patch_with_a_warning():
    """``torch.compile(fast block)`` after patch: the wrapper keeps calling the fast block, so
    unpatch leaves it there (and says so) instead of putting in an original it never calls."""
    m = ref_model()
    quiet_patch(m)
    m.blocks[0] = torch.compile(m.blocks[0], backend="eager")
    with pytest.warns(patching.PatchWarning, match=r"blocks\.0\._orig_mod .*torch\.compile wrapper"):
        palm_fast.unpatch(m)
    assert type(m.blocks[0]._orig_mod) is palm_fast.nn.ParallelBlock
    assert type(m.blocks[1]) is type(ref_model().blocks[1])
    torch._dynamo.reset()


def _hook_edits(which):
    """(path of a module patch built, edit registering a hook on it) for unpatch."""
    def fwd(mod):
        return mod.register_forward_hook(lambda m_, i, o: o * 1.5)

    def fwd_kwargs(mod):
        return mod.register_forward_hook(lambda m_, a, kw, o: o * 1.5, with_kwargs=True)

    def pre(mod):
        return mod.register_forward_pre_hook(lambda m_, a: (-a[0],) + tuple(a[1:]))

    def rot(mod):
        return mod.register_forward_hook(lambda m_, i, o: (o[0] * 2, o[1]))

    if which == "reference":
        return [("blocks.0", fwd), ("blocks.0", fwd_kwargs), ("blocks.0.norm", pre), ("norm", fwd),
                ("blocks.0.rotary", rot)]
    return [("1", fwd), ("1.fn", pre), ("1.fn.norm", fwd), ("1.fn.ff_out", fwd_kwargs),
            ("1.fn.ff_out.0", fwd), ("3", pre)]


@pytest.mark.parametrize("which,path,edit", [
    *[("reference", p, e) for p, e in _hook_edits("reference")],
    *[pytest.param("palm_pytorch", p, e, marks=needs_pp) for p, e in _hook_edits("palm_pytorch")]],
    ids=lambda v: getattr(v, "__name__", v))
def test_unpatch_hands_back_hooks_registered_on_built_modules(which, path, edit):
    """A hook registered after patch on a module patch built (the fast block, LayerNorm,
    SwiGLU, RotaryEmbedding, PaLM-pytorch's Residual / ff_out) was dropped by unpatch: the
    unpatched model computed something else than the patched one. It now goes to the
    original, and the handle the user holds still removes it."""
    m = ref_model() if which == "reference" else pp_model()
    x = tokens(T=9)
    with torch.no_grad():
        base = m(x)
    quiet_patch(m)
    handle = edit(m.get_submodule(path))
    with torch.no_grad():
        patched = m(x)
    assert not close_rel(patched, base, 1e-3)   # (the hook changes the outputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", patching.PatchWarning)
        palm_fast.unpatch(m)
    assert _palm_fast_modules(m) == []
    with torch.no_grad():
        assert close_rel(m(x), patched, 2e-5)
    handle.remove()
    with torch.no_grad():
        assert close_rel(m(x), base, 2e-5)


@pytest.mark.parametrize("which", ["reference", pytest.param("palm_pytorch", marks=needs_pp)])
def test_unpatch_hands_back_backward_hooks_of_built_modules(which):
    """Backward hooks registered after patch on built modules run on their originals."""
    m = ref_model() if which == "reference" else pp_model()
    block = (lambda model: model.blocks[0]) if which == "reference" else (lambda model: model[1].fn)
    block_cls, norm_cls = type(block(m)), type(block(m).norm)
    quiet_patch(m)
    seen = []
    block(m).register_full_backward_hook(lambda mod, gi, go: seen.append(type(mod)))
    block(m).norm.register_full_backward_pre_hook(lambda mod, go: seen.append(type(mod)))
    palm_fast.unpatch(m)
    m(tokens(T=9)).float().square().mean().backward()
    assert sorted(seen, key=str) == sorted([block_cls, norm_cls], key=str)


def _setting_edits(which):
    """(path, attribute, value): a setting of a built module its original has too."""
    if which == "reference":
        return [("blocks.0.norm", "eps", 0.1), ("norm", "eps", 0.2), ("blocks.0.rotary", "interleaved", True),
                ("blocks.1", "eps", 0.1)]
    return [("1.fn", "scale", 0.05)]


@pytest.mark.parametrize("which,path,attr,value", [
    *[("reference", *e) for e in _setting_edits("reference")],
    *[pytest.param("palm_pytorch", *e, marks=needs_pp) for e in _setting_edits("palm_pytorch")]])
def test_unpatch_hands_back_settings_changed_on_built_modules(which, path, attr, value):
    """``norm.eps = 0.1`` (or the rotary layout, PaLM-pytorch's ``scale``) set after patch
    on a module patch built was lost by unpatch, silently: it goes to the original's
    attribute of the same name."""
    m = ref_model() if which == "reference" else pp_model()
    x = tokens(T=9)
    quiet_patch(m)
    setattr(m.get_submodule(path), attr, value)
    if attr == "eps" and path.startswith("blocks.") and path.count(".") == 1:
        m.get_submodule(path).norm.eps = value   # (the block's eps is its norm's)
    with torch.no_grad():
        patched = m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", patching.PatchWarning)
        palm_fast.unpatch(m)
    assert getattr(m.get_submodule(path), attr) == value
    with torch.no_grad():
        assert close_rel(m(x), patched, 2e-5)


@pytest.mark.parametrize("which", ["reference", pytest.param("palm_pytorch", marks=needs_pp)])
def test_unpatch_warns_about_changes_the_original_cannot_take(which):
    """A ``forward`` set on a built module's instance, or a setting its original does not
    have, cannot go back: unpatch now says so (module path and attribute) instead of
    dropping it silently. palm_fast's own settings (``set_weight_cache``) go silently."""
    m = ref_model() if which == "reference" else pp_model()
    quiet_patch(m)
    norm = m.blocks[0].norm if which == "reference" else m[1].fn.norm
    f = norm.forward
    norm.forward = lambda x: f(x) * 2
    blk = m.blocks[1] if which == "reference" else m[2].fn
    blk.my_tag = 3
    palm_fast.nn.set_weight_cache(m, False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        palm_fast.unpatch(m)
    msgs = [str(x.message) for x in w if issubclass(x.category, patching.PatchWarning)]
    npath, bpath = ("blocks.0.norm", "blocks.1") if which == "reference" else ("1.fn.norm", "2.fn")
    assert len(msgs) == 2, msgs
    assert f"{npath}.forward was set on the instance" in msgs[0]
    assert f"{bpath}.my_tag was set to 3" in msgs[1]


class _Wrap(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("which", ["reference", pytest.param("palm_pytorch", marks=needs_pp)])
def test_unpatch_replaces_built_modules_inside_wrappers_added_after_patch(which):
    """A wrapper put after patch around a module patch built inside a replacement
    (``res.fn = checkpoint_wrapper(res.fn)``, a wrapper around a block's fast LayerNorm) came
    back with unpatch still holding the palm_fast module: is_patched() was False, palm_fast
    modules remained (a float64 model then failed). The original now goes inside the
    wrapper, with what was changed on the fast module (a LoRA in it, a hook on its norm)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    m = ref_model() if which == "reference" else pp_model()
    x = tokens(T=9)
    quiet_patch(m)
    if which == "reference":
        m.blocks[0].norm = _Wrap(m.blocks[0].norm)
        m.blocks[1].act = checkpoint_wrapper(m.blocks[1].act)
    else:
        m[1].fn.attn_out = _LoRA(m[1].fn.attn_out)
        m[1].fn.norm.register_forward_hook(lambda mod, i, o: o * 1.5)
        m[1].fn = checkpoint_wrapper(m[1].fn)
        m[2].fn = _Wrap(m[2].fn)
    with torch.no_grad():
        patched = m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", patching.PatchWarning)
        palm_fast.unpatch(m)
    assert _palm_fast_modules(m) == [] and not patching.is_patched(m)
    if which == "palm_pytorch":
        assert "mask" not in vars(m[1].fn)   # (the block's cache reset did not land on the wrapper)
        assert type(m[1].fn._checkpoint_wrapped_module.attn_out) is _LoRA
    with torch.no_grad():
        assert close_rel(m(x), patched, 2e-5)
        m.double()(x)   # (the originals take float64)


def test_patching_again_warns_only_when_something_was_replaced_before():
    """A first patch that only skipped modules (hooks) replaced nothing, yet a second one
    warned "the model was patched before; modules replaced then are kept"."""
    m = ref_model()
    for b in m.blocks:
        b.register_forward_hook(lambda *a: None)
    m.norm.register_forward_hook(lambda *a: None)
    quiet_patch(m, rope=False, swiglu=False, layer_norm=False)
    assert not m.palm_fast_report.patched
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        palm_fast.patch(m, rope=False, swiglu=False, layer_norm=False)
    assert not any("patched before" in str(x.message) for x in w)
    m = ref_model()
    quiet_patch(m)
    with pytest.warns(patching.PatchWarning, match="patched before"):
        palm_fast.patch(m)


def test_unpatch_warns_when_hooks_on_both_the_patched_module_and_its_original_merge():
    """A hook on the original registered while it was out of the model and one on the fast
    module: the original runs both after unpatch, but the fast module's handle can no longer
    remove its hook (it holds the fast module's dict): unpatch says so."""
    m = ref_model()
    orig = m.blocks[0]
    quiet_patch(m)
    calls = []
    orig.register_forward_hook(lambda *a: calls.append("orig"))
    handle = m.blocks[0].register_forward_hook(lambda *a: calls.append("fast"))
    with pytest.warns(patching.PatchWarning, match="no longer remove them"):
        palm_fast.unpatch(m)
    handle.remove()
    with torch.no_grad():
        m(tokens(T=5))
    assert calls == ["orig", "fast"]   # (as the warning says)
