"""Tracers and dispatch modes other than torch.compile: make_fx, FakeTensorMode, FlopCounterMode,
torch.jit.trace. None of them can see a call into palm_fast._C, so while one is active the
public ops must go through the registered custom ops."""
import copy
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import palm_fast
from palm_fast import ops
from palm_fast.nn import PaLM
from palm_fast.reference import PaLM as RefPaLM


def _models():
    cfg = palm_fast.get_config("palm-tiny", n_layers=1)
    torch.manual_seed(0)
    ref = RefPaLM(cfg).eval()
    fast = PaLM(cfg).eval()
    fast.load_state_dict(ref.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patched = palm_fast.patch(copy.deepcopy(ref))
    return cfg, ref, {"nn.PaLM": fast, "patched": patched}


def _palm_fast_targets(gm):
    return {str(n.target) for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("palm_fast.")}


@pytest.mark.parametrize("fn_name", ["swiglu", "layer_norm", "add_layer_norm", "rope"])
def test_make_fx_records_the_custom_ops(fn_name):
    """make_fx (tracing_mode="real") recorded only the empty output of the eager path's direct
    call into _C: the graph returned uninitialised memory."""
    w = torch.randn(16)
    fns = {
        "swiglu": (lambda x: ops.swiglu(x), lambda: torch.randn(4, 32)),
        "layer_norm": (lambda x: ops.layer_norm(x, w), lambda: torch.randn(4, 16) * 3 + 1),
        "add_layer_norm": (lambda x: ops.add_layer_norm(x, x * 2, x * 3, weight=w)[1],
                           lambda: torch.randn(4, 16)),
        "rope": (lambda x: ops.rope(x[..., :2, :], x[..., 2:, :])[0], lambda: torch.randn(2, 5, 3, 16)),
    }
    fn, make = fns[fn_name]
    gm = make_fx(fn)(make())
    assert _palm_fast_targets(gm), gm.graph
    x2 = make()
    assert torch.equal(gm(x2), fn(x2))


@pytest.mark.parametrize("mode", ["fake", "symbolic"])
def test_make_fx_fake_and_symbolic(mode):
    """With fake tensors the eager path failed inside the kernel ("data is not allocated")."""
    gm = make_fx(lambda x: ops.swiglu(x), tracing_mode=mode)(torch.randn(4, 32))
    assert _palm_fast_targets(gm) == {"palm_fast.swiglu.default"}
    x = torch.randn(3, 32)
    assert torch.equal(gm(x), ops.swiglu(x))


@pytest.mark.parametrize("which", ["nn.PaLM", "patched"])
def test_models_under_fake_tensor_mode_and_make_fx(which):
    cfg, ref, models = _models()
    model = models[which]
    tok = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        want = ref(tok)
        gm = make_fx(model)(tok)
        assert _palm_fast_targets(gm)
        torch.testing.assert_close(gm(tok), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gm(tok), model(tok), rtol=0, atol=0)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:   # (real parameters)
        out = model(mode.from_tensor(tok))
    assert out.shape == want.shape and out.dtype == want.dtype


def test_flop_counter_mode_sees_the_ops():
    """A TorchDispatchMode (here FlopCounterMode) sees the custom ops and the results are
    unchanged."""
    from torch.utils.flop_counter import FlopCounterMode

    x, w = torch.randn(8, 64), torch.randn(64)
    want = ops.layer_norm(x, w)
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with FlopCounterMode(display=False), Spy():
        got = ops.layer_norm(x, w)
    assert torch.equal(got, want)
    assert any(s.startswith("palm_fast.") for s in seen), seen


@pytest.mark.parametrize("which", ["nn.PaLM", "patched"])
def test_jit_trace_with_its_default_check_and_training_a_no_grad_trace(which):
    """jit.trace's default check re-traces under no_grad: the block's "keep the SwiGLU
    pre-activation for backward" flag, recorded as a constant, differed between the two
    traces (TracingCheckError). A trace made under no_grad then raised in backward."""
    cfg, ref, models = _models()
    model = models[which]
    tok = torch.randint(0, cfg.vocab_size, (2, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (tok,))   # check_trace=True
        with torch.no_grad():
            traced_ng = torch.jit.trace(model, (tok,), check_trace=False)
    torch.testing.assert_close(traced(tok), model(tok), rtol=0, atol=0)
    traced_ng(tok).float().square().mean().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model(tok).float().square().mean().backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and got
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)


def test_forward_ad_under_a_dispatch_mode_raises_as_in_eager():
    """Under a dispatch mode the ops take the custom ops, which have no forward-AD formula:
    torch.func.jvp returned a zero tangent and a dual tensor's tangent came back None. Now
    they raise as the eager path does."""
    import torch.autograd.forward_ad as fwAD
    from torch.utils.flop_counter import FlopCounterMode

    from palm_fast.nn import ParallelBlock

    x, t = torch.randn(4, 8), torch.ones(4, 8)
    w = torch.ones(8)
    k = torch.randn(1, 4, 1, 8)
    block = ParallelBlock(8, 2, 4, 6)
    calls = {"swiglu": lambda z: ops.swiglu(z), "layer_norm": lambda z: ops.layer_norm(z, w),
             "add_layer_norm": lambda z: ops.add_layer_norm(z, z, weight=w)[1],
             "rope": lambda z: ops.rope(z.view(1, 4, 1, 8), k)[0],
             "block": lambda z: block(z.view(1, 4, 8))}
    for name, f in calls.items():
        with FlopCounterMode(display=False):
            with pytest.raises(RuntimeError, match="palm_fast's ops do not support"):
                torch.func.jvp(f, (x,), (t,))
            with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
                f(fwAD.make_dual(x, t))
            with fwAD.dual_level():   # (plain tensors inside a dual level are fine)
                assert f(x).isfinite().all(), name
    from palm_fast.kv_cache import KVCache

    cache = KVCache(1, 1, 8, 8)
    cache.append(0, torch.randn(1, 3, 8), torch.randn(1, 3, 8))
    cache.advance(3)
    qd = torch.randn(1, 2, 8)
    with FlopCounterMode(display=False), fwAD.dual_level(), \
            pytest.raises(RuntimeError, match="forward-mode AD"):
        ops.mqa_decode(fwAD.make_dual(qd, torch.ones_like(qd)), cache, 0, cache.lengths)


def test_rope_inplace_under_allow_mutation_on_saved_tensors():
    """A TorchDispatchMode sees the mutable custom op ``palm_fast::rope_`` with its arguments'
    versions already bumped (torch's custom-op layer does that first), so
    allow_mutation_on_saved_tensors() did not clone a q saved for backward before rope_
    rotated it: the gradient came from the rotated values (max error 2.8), silently. Under a
    mode, rope_ is now the out-of-place op and aten copy_ calls, which the mode sees."""
    torch.manual_seed(0)
    q0, k0 = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 1, 8)
    leaf = q0.clone().requires_grad_()
    ops.swiglu(leaf * 1).sum().backward()
    with torch.autograd.graph.allow_mutation_on_saved_tensors():
        leaf2 = q0.clone().requires_grad_()
        q = leaf2 * 1
        y = ops.swiglu(q)   # saves q
        k = k0.clone()
        with torch.no_grad():
            ops.rope_(q, k)
        y.sum().backward()
    assert torch.equal(leaf2.grad, leaf.grad)
    # and the rotation itself is the eager one, bit for bit
    eq, ek = ops.rope_(q0.clone(), k0.clone())
    assert torch.equal(q.detach(), eq) and torch.equal(k, ek)


def test_rope_inplace_under_make_fx_and_flop_counter():
    """rope_ under a mode (out-of-place op + copy_): the traced graph updates its inputs as
    eager rope_ does; FlopCounterMode runs it."""
    from torch.utils.flop_counter import FlopCounterMode

    def fn(q, k):
        ops.rope_(q, k)
        return q * 1, k * 1

    q0, k0 = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 1, 8)
    gm = make_fx(fn)(q0.clone(), k0.clone())
    assert "palm_fast.rope.default" in _palm_fast_targets(gm)
    q, k = q0.clone(), k0.clone()
    out = gm(q, k)
    eq, ek = ops.rope_(q0.clone(), k0.clone())
    assert torch.equal(out[0], eq) and torch.equal(out[1], ek)
    assert torch.equal(q, eq) and torch.equal(k, ek)   # the inputs were rotated in place
    q, k = q0.clone(), k0.clone()
    with FlopCounterMode(display=False):
        ops.rope_(q, k)
    assert torch.equal(q, eq) and torch.equal(k, ek)


def test_export_with_a_dynamic_length_takes_every_length_up_to_max_seq_len():
    """The CPU attention picked its kernel (C++ up to T * hd <= CPU_MQA_MAX_KV, else ATen's
    flash attention) in Python, before calling the op: under torch.export with a dynamic T
    that test became a guard, and a model with head dim 128 exported only for T <= 384
    (Dim("T", max=1024) was refused; Dim.AUTO accepted and then failed at T = 500). The op
    now picks its kernel itself."""
    from torch.export import Dim

    from palm_fast.ops import block as ob

    cfg = palm_fast.PaLMConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, head_dim=128, d_ff=64,
                               max_seq_len=1024)
    torch.manual_seed(0)
    m = PaLM(cfg).eval()
    assert 500 * 128 > ob.CPU_MQA_MAX_KV >= 16 * 128   # both kernels are exercised below
    with torch.no_grad():
        ep = torch.export.export(m, (torch.randint(0, 64, (1, 16)),),
                                 dynamic_shapes={"tokens": {1: Dim("T", min=2, max=1024)}})
        for T in (16, 500):
            tok = torch.randint(0, 64, (1, T))
            assert torch.equal(ep.module()(tok), m(tok)), T


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"),
                    reason="this torch has no torch.compiler.is_exporting (2.6): export not detected")
def test_a_program_exported_under_no_grad_can_be_differentiated():
    """Exported under no_grad, the fast block's input projection did not keep the SwiGLU
    pre-activation (a constant in the program), and the program's backward raised, where
    the reference model's works."""
    cfg, ref, models = _models()
    tok = torch.randint(0, cfg.vocab_size, (2, 8))
    for name, m in models.items():
        with torch.no_grad():
            gm = torch.export.export(m, (tok,)).module()
        gm(tok).square().mean().backward()
        m.zero_grad()
        m(tok).square().mean().backward()
        for (n, p), q in zip(m.named_parameters(), gm.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=f"{name} {n}")
