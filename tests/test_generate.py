"""palm_fast.generate: parity with the reference model's generate(), sampling, stopping,
caches, CUDA graphs and argument checks (palm_fast/generation.py)."""
from __future__ import annotations

import copy
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_by_rule, randn, requires_cuda
from torch import nn

import palm_fast
from palm_fast import PaLMConfig, get_config
from palm_fast.generation import (
    _PARTS_REGISTRY,
    DecoderParts,
    _prepare_layers,
    decoder_parts,
    register_decoder_parts,
    sample,
)
from palm_fast.reference import PaLM

CONFIGS = {
    "tiny": get_config("palm-tiny"),                           # hd 16, 2 layers, 4 heads
    "hd64": PaLMConfig(vocab_size=384, d_model=96, n_layers=3, n_heads=3, head_dim=64, d_ff=192,
                       max_seq_len=128, name="hd64"),
}


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes (see conftest)


def lively(config: PaLMConfig, seed: int = 0, cls=PaLM) -> PaLM:
    """A randomly initialised model whose greedy continuations vary. At the standard init the
    tied embedding dominates and greedy decoding repeats the last token; larger output
    projections make the blocks (so attention over the cache) decide the next token."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn_out.weight.mul_(8.0)
            blk.ff_out.weight.mul_(8.0)
    return model


def varied(seqs, n_new: int) -> None:
    """The test compares something: continuations are not one repeated token."""
    assert max(len(set(s[-n_new:].tolist())) for s in seqs) >= 4


def ragged_prompts(vocab: int, lengths, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


# --------------------------------------------------------------------------- greedy parity

@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_batch_matches_reference(name, page_size):
    cfg = CONFIGS[name]
    model = lively(cfg)
    prompts = torch.randint(0, cfg.vocab_size, (3, 11), generator=torch.Generator().manual_seed(2))
    n_new = 20
    ref = model.generate(prompts, n_new)
    out = palm_fast.generate(model, prompts, n_new, page_size=page_size)
    varied(ref, n_new)
    assert len(out) == 3
    for b in range(3):
        assert out[b].dtype == torch.int64 and out[b].shape == (11 + n_new,)
        assert torch.equal(out[b], ref[b]), f"sequence {b}"


def test_greedy_wide_batch_matches_reference():
    # more rows than the CPU small-GEMM path takes (generation._SMALL_ROWS): plain x W^T GEMMs
    cfg = CONFIGS["tiny"]
    model = lively(cfg, seed=19)
    prompts = torch.randint(0, cfg.vocab_size, (20, 5), generator=torch.Generator().manual_seed(20))
    ref = model.generate(prompts, 8)
    out = palm_fast.generate(model, prompts, 8)
    varied(ref, 8)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))


@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_ragged_matches_reference_alone(name, page_size):
    cfg = CONFIGS[name]
    model = lively(cfg, seed=3)
    lengths = (7, 1, 23, 16, 17)              # a single token; page boundaries 16 / 17
    prompts = ragged_prompts(cfg.vocab_size, lengths)
    n_new = 18
    out = palm_fast.generate(model, [p.tolist() if i == 1 else p for i, p in enumerate(prompts)],
                             n_new, page_size=page_size)
    refs = [model.generate(p[None], n_new)[0] for p in prompts]
    varied(refs, n_new)
    for b, (o, r) in enumerate(zip(out, refs)):
        assert torch.equal(o, r), f"sequence {b} (prompt length {lengths[b]})"


def test_contiguous_and_paged_caches_agree_across_page_sizes():
    cfg = CONFIGS["tiny"]
    model = lively(cfg, seed=4)
    prompts = ragged_prompts(cfg.vocab_size, (5, 40, 12), seed=5)
    base = palm_fast.generate(model, prompts, 24)
    for page_size in (16, 32, 64):
        out = palm_fast.generate(model, prompts, 24, page_size=page_size)
        assert all(torch.equal(a, b) for a, b in zip(out, base)), f"page_size={page_size}"


def test_max_new_tokens_zero_and_one():
    cfg = CONFIGS["tiny"]
    model = lively(cfg)
    prompts = ragged_prompts(cfg.vocab_size, (3, 6))
    out = palm_fast.generate(model, prompts, 0)
    assert all(torch.equal(o, p) for o, p in zip(out, prompts))
    out = palm_fast.generate(model, prompts, 1)
    for o, p in zip(out, prompts):
        assert torch.equal(o, model.generate(p[None], 1)[0])


def test_output_in_fp32_model_dtype_and_bf16_model_runs():
    cfg = CONFIGS["tiny"]
    model = lively(cfg).to(torch.bfloat16)
    out = palm_fast.generate(model, ragged_prompts(cfg.vocab_size, (4, 9)), 6)
    assert [o.shape[0] for o in out] == [10, 15]
    assert all(o.dtype == torch.int64 and int(o.max()) < cfg.vocab_size for o in out)


# --------------------------------------------------------------------------- stop tokens

def test_stop_tokens_end_each_sequence_at_its_first_stop():
    cfg = CONFIGS["tiny"]
    model = lively(cfg, seed=6)
    prompts = ragged_prompts(cfg.vocab_size, (6, 10, 3), seed=7)
    n_new = 16
    refs = [model.generate(p[None], n_new)[0] for p in prompts]
    varied(refs, n_new)
    # a stop token that sequence 0 generates at its 4th new token (and maybe elsewhere)
    stop = int(refs[0][len(prompts[0]) + 3])
    out = palm_fast.generate(model, prompts, n_new, stop_tokens=[stop, cfg.vocab_size - 1])
    for p, r, o in zip(prompts, refs, out):
        gen = r[len(p):].tolist()
        cut = next((i + 1 for i, t in enumerate(gen) if t in (stop, cfg.vocab_size - 1)), len(gen))
        assert o.tolist() == p.tolist() + gen[:cut]
    assert out[0].shape[0] <= len(prompts[0]) + 4
    # a stop token inside the prompt does not stop anything
    out = palm_fast.generate(model, [prompts[0]], 5, stop_tokens=int(prompts[0][0]))
    gen = out[0][len(prompts[0]):].tolist()
    assert len(gen) == 5 or gen[-1] == int(prompts[0][0])


def test_all_sequences_stopped_ends_early():
    cfg = CONFIGS["tiny"]
    model = lively(cfg, seed=6)
    prompts = ragged_prompts(cfg.vocab_size, (6, 10), seed=7)
    firsts = [int(model.generate(p[None], 1)[0, -1]) for p in prompts]
    out = palm_fast.generate(model, prompts, 50, stop_tokens=set(firsts))
    assert [o.tolist() for o in out] == [p.tolist() + [f] for p, f in zip(prompts, firsts)]


# --------------------------------------------------------------------------- sampling

def _next_token_logits(model, seqs, n_prompt):
    """For each sequence, the logits that chose each of its generated tokens."""
    out = []
    for s, n in zip(seqs, n_prompt):
        with torch.no_grad():
            logits = model(s[None, :-1])[0, n - 1:].float()      # predicts s[n:]
        out.append((logits, s[n:]))
    return out


def test_top_k_never_samples_outside_the_top_k():
    cfg = CONFIGS["tiny"]
    model = lively(cfg, seed=8)
    prompts = ragged_prompts(cfg.vocab_size, (5, 12, 8, 2), seed=9)
    k = 3
    out = palm_fast.generate(model, prompts, 12, temperature=1.5, top_k=k,
                             generator=torch.Generator().manual_seed(0))
    picked_non_argmax = 0
    for logits, toks in _next_token_logits(model, out, [len(p) for p in prompts]):
        top = logits.topk(k, dim=-1).indices
        assert (top == toks[:, None]).any(dim=-1).all()
        picked_non_argmax += int((top[:, 0] != toks).sum())
    assert picked_non_argmax > 0            # the sampling did sample


def test_top_p_samples_inside_the_nucleus_and_tiny_top_p_is_greedy():
    cfg = CONFIGS["tiny"]
    model = lively(cfg, seed=10)
    prompts = ragged_prompts(cfg.vocab_size, (5, 9, 14), seed=11)
    greedy = palm_fast.generate(model, prompts, 10)
    tiny = palm_fast.generate(model, prompts, 10, temperature=1.0, top_p=1e-6,
                              generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(greedy, tiny))
    p = 0.6
    out = palm_fast.generate(model, prompts, 10, temperature=2.0, top_p=p,
                             generator=torch.Generator().manual_seed(2))
    for logits, toks in _next_token_logits(model, out, [len(q) for q in prompts]):
        probs = (logits / 2.0).softmax(dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        rank = (order == toks[:, None]).float().argmax(dim=-1)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        # the token's rank is inside the nucleus: the mass of the tokens above it is < p
        assert (mass_before.gather(1, rank[:, None])[:, 0] < p + 1e-6).all()


def test_top_p_keeps_every_token_tied_at_the_cut():
    """8 equal logits, top_p = 0.5: the cut went by sorted position, so tokens 0-3 were always
    kept and 4-7 never (the sort's tie order). Tied tokens are now all kept, as top_k does;
    tokens strictly below the cut are still dropped."""
    g = torch.Generator().manual_seed(0)
    flat = torch.zeros(1, 8).expand(4000, 8)
    counts = torch.bincount(sample(flat, 1.0, top_p=0.5, generator=g), minlength=8)
    assert (counts > 300).all(), counts
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, -5.0, 1.0]]).expand(4000, 6)
    # softmax: 0.83, then four tied at 0.04: a nucleus of 0.85 reaches into the tie
    counts = torch.bincount(sample(logits, 1.0, top_p=0.85, generator=g), minlength=6)
    assert counts[4] == 0 and (counts[[1, 2, 3, 5]] > 20).all(), counts


def test_sample_function_properties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g)
    assert torch.equal(sample(logits), logits.argmax(-1))
    assert torch.equal(sample(logits, 1.0, top_k=1, generator=g), logits.argmax(-1))
    assert torch.equal(sample(logits, 1.0, top_p=1e-9, generator=g), logits.argmax(-1))
    toks = sample(logits, 1.0, top_k=5, top_p=0.9, generator=g)
    assert (logits.topk(5, -1).indices == toks[:, None]).any(-1).all()
    # one dominant token: a nucleus of 0.5 holds only it
    peaked = logits.clone()
    peaked[:, 7] = 100.0
    assert (sample(peaked, 1.0, top_p=0.5, generator=g) == 7).all()
    # a tiny temperature picks a maximal logit (logits / 1e-40 overflowed: NaN
    # probabilities), for fp32 and bf16 logits (bf16 rows can tie at the maximum), with and
    # without top-k / top-p
    for temp in (1e-30, 1e-40, 1e-45, 1e-300):
        for kw in ({}, {"top_k": 5}, {"top_p": 0.9}):
            for lg in (logits, logits.bfloat16()):
                toks = sample(lg, temp, generator=g, **kw)
                lf = lg.float()
                assert torch.equal(lf.gather(1, toks[:, None])[:, 0], lf.amax(-1))
    # ties at the maximum: a tiny temperature samples among the tied tokens only
    tied = torch.zeros(2000, 6)
    tied[:, 2] = tied[:, 4] = 1.0
    toks = sample(tied, 1e-40, generator=g)
    assert set(toks.tolist()) == {2, 4}
    # top-k ranks the logits as given: 1e-6 above 0 stays above it, even where shifting by
    # the max (50) would round the two into a tie
    far = torch.tensor([[50.0, 0.0, 1e-6]]).expand(4000, 3).contiguous()
    assert 1 not in set(sample(far, 50.0, top_k=2, generator=g).tolist())


def test_tiny_temperature_generates_greedily_like_the_reference():
    cfg = CONFIGS["tiny"]
    model = lively(cfg, seed=10)
    prompt = ragged_prompts(cfg.vocab_size, (6,), seed=3)[0][None]
    greedy = model.generate(prompt, 6)
    ref = model.generate(prompt, 6, temperature=1e-40, generator=torch.Generator().manual_seed(0))
    fast = palm_fast.generate(model, prompt, 6, temperature=1e-40,
                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(ref, greedy)
    assert torch.equal(fast[0], greedy[0])


def test_seeded_sampling_is_deterministic():
    cfg = CONFIGS["hd64"]
    model = lively(cfg, seed=12)
    prompts = ragged_prompts(cfg.vocab_size, (4, 13), seed=13)

    def run(seed, **kw):
        return palm_fast.generate(model, prompts, 12, temperature=1.0, top_k=20, top_p=0.95,
                                  generator=torch.Generator().manual_seed(seed), **kw)

    a, b = run(5), run(5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = run(5, page_size=16)
    assert all(torch.equal(x, y) for x, y in zip(a, c))
    assert any(not torch.equal(x, y) for x, y in zip(a, run(6)))


# --------------------------------------------------------------------------- models

def test_decoder_parts_of_the_reference_model():
    cfg = CONFIGS["tiny"]
    model = PaLM(cfg)
    parts = decoder_parts(model)
    assert parts.embed is model.embed and parts.norm is model.norm
    assert list(parts.blocks) == list(model.blocks)
    assert parts.head_weight is model.embed.weight
    assert parts.logit_scale == pytest.approx(cfg.d_model ** -0.5)
    assert decoder_parts(PaLM(cfg.replace(scale_logits=False))).logit_scale is None


def test_unsupported_models_are_rejected():
    with pytest.raises(TypeError, match="model: unsupported model class"):
        decoder_parts(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="model: expected a PaLM nn.Module"):
        decoder_parts("palm")
    gqa = PaLM(CONFIGS["tiny"].replace(n_kv_heads=2))
    with pytest.raises(ValueError, match="n_kv_heads"):
        palm_fast.generate(gqa, [[1, 2]], 2)
    odd = PaLM(CONFIGS["tiny"])
    odd.blocks[1].rotary.inv_freq.mul_(2.0)
    with pytest.raises(ValueError, match=r"blocks\[1\].rotary.inv_freq"):
        palm_fast.generate(odd, [[1, 2]], 2)


def test_register_decoder_parts_for_a_custom_layout():
    cfg = CONFIGS["tiny"]
    inner = lively(cfg, seed=14)

    class Wrapper(nn.Module):         # a user model holding a PaLM's pieces elsewhere
        def __init__(self, m):
            super().__init__()
            self.tok, self.layers, self.final = m.embed, m.blocks, m.norm

    register_decoder_parts(Wrapper, lambda m: DecoderParts(m.tok, list(m.layers), m.final,
                                                           m.tok.weight, cfg.d_model ** -0.5))
    prompts = ragged_prompts(cfg.vocab_size, (5, 8))
    out = palm_fast.generate(Wrapper(inner), prompts, 8)
    assert all(torch.equal(o, inner.generate(p[None], 8)[0]) for o, p in zip(out, prompts))
    with pytest.raises(TypeError, match="cls"):
        register_decoder_parts("Wrapper", lambda m: None)


def test_a_subclass_with_its_own_forward_is_refused_unless_registered():
    """generate runs the registered layout's parts, never the model's forward: a subclass
    adding a logit bias in forward() decoded as its base class (silently other tokens). It
    is refused; a subclass that keeps forward still decodes; registering the subclass is the
    caller's statement that its logits are the base's."""
    cfg = CONFIGS["tiny"]
    base = lively(cfg, seed=21)

    class Biased(type(base)):
        def forward(self, tokens, *args, **kwargs):
            out = super().forward(tokens, *args, **kwargs)
            return out + 100.0 * (torch.arange(out.shape[-1]) == 7)

    class Plain(type(base)):
        pass

    prompts = ragged_prompts(cfg.vocab_size, (4, 6), seed=22)
    for cls in (Biased, Plain):
        m = cls(cfg).eval()
        m.load_state_dict(base.state_dict())
        if cls is Biased:
            with pytest.raises(TypeError, match="overrides forward"):
                palm_fast.generate(m, prompts, 4)
            register_decoder_parts(Biased, _PARTS_REGISTRY[type(base)])
            try:
                palm_fast.generate(m, prompts, 4)     # the caller's word: accepted
            finally:
                del _PARTS_REGISTRY[Biased]
        else:
            out = palm_fast.generate(m, prompts, 4)
            assert all(torch.equal(o, base.generate(p[None], 4)[0]) for o, p in zip(out, prompts))
            m.forward = lambda *a, _m=m, **k: type(_m).forward(_m, *a, **k)   # set on the instance
            with pytest.raises(TypeError, match="the instance overrides forward"):
                palm_fast.generate(m, prompts, 4)


def test_fast_palm_generates_like_the_reference():
    fast_cls = getattr(palm_fast.nn, "PaLM", None)
    if fast_cls is None:
        pytest.skip("palm_fast.nn.PaLM is not in this build yet (branch block)")
    cfg = CONFIGS["hd64"]
    ref = lively(cfg, seed=15)
    fast = fast_cls(cfg).eval()
    fast.load_state_dict(ref.state_dict())
    # the fast blocks' prefill runs their fused functional path
    assert all(lay.fused is blk for lay, blk in zip(_prepare_layers(decoder_parts(fast)), fast.blocks))
    prompts = ragged_prompts(cfg.vocab_size, (3, 10, 6), seed=16)
    for page_size in (None, 16):
        out = palm_fast.generate(fast, prompts, 12, page_size=page_size)
        for o, p in zip(out, prompts):
            assert torch.equal(o, ref.generate(p[None], 12)[0])


# --------------------------------------------------------------------------- CUDA graphs

@requires_cuda
@pytest.mark.parametrize("page_size", [None, 16])
def test_cuda_graph_matches_eager_and_reference(page_size):
    cfg = CONFIGS["hd64"]
    model = lively(cfg, seed=17).cuda()
    prompts = [p.cuda() for p in ragged_prompts(cfg.vocab_size, (4, 19, 9), seed=18)]
    eager = palm_fast.generate(model, prompts, 16, cuda_graph=False, page_size=page_size)
    graphed = palm_fast.generate(model, prompts, 16, cuda_graph=True, page_size=page_size)
    assert all(torch.equal(a, b) for a, b in zip(eager, graphed))
    for o, p in zip(graphed, prompts):
        assert torch.equal(o, model.generate(p[None], 16)[0])
    g = lambda: torch.Generator("cuda").manual_seed(3)  # noqa: E731
    a = palm_fast.generate(model, prompts, 16, temperature=1.0, top_k=10, generator=g())
    b = palm_fast.generate(model, prompts, 16, temperature=1.0, top_k=10, generator=g(),
                           cuda_graph=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_modules_generate_calls_may_carry_code_of_their_own():
    """A norm generate calls as a module (one not ours, or one with a forward set on the
    instance) and torch.compile'd blocks (the wrapper sets its own forward) were
    refused for a method set on an instance; they decode as the model does."""
    class RMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

        def forward(self, x):
            return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * self.weight

    model = lively(CONFIGS["tiny"])
    d = CONFIGS["tiny"].d_model
    model.blocks[0].norm = RMSNorm(d)
    model.norm.forward = (lambda f: lambda x: 1.5 * f(x))(model.norm.forward)
    prompts = ragged_prompts(CONFIGS["tiny"].vocab_size, (3, 6))
    want = [model.generate(p[None], 8)[0] for p in prompts]
    assert [torch.equal(a, b) for a, b in zip(palm_fast.generate(model, prompts, 8), want)] == [True] * 2
    varied(want, 8)
    model.blocks[1] = torch.compile(model.blocks[1])   # (never run: generate reads its weights)
    assert [torch.equal(a, b) for a, b in zip(palm_fast.generate(model, prompts, 8), want)] == [True] * 2


# --------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return PaLM(CONFIGS["tiny"]).eval()


@pytest.mark.parametrize("prompts, kwargs, exc, match", [
    ("hello", {}, TypeError, "prompts: expected a .B, T. integer tensor"),
    ([], {}, ValueError, "prompts: expected at least one prompt"),
    (torch.zeros(4, dtype=torch.int64), {}, ValueError, r"prompts: .*got a tensor of shape \(4,\)"),
    ([torch.zeros(2, 2, dtype=torch.int64)], {}, ValueError, r"prompts\[0\]: expected a 1-D tensor"),
    ([[1, 2], torch.ones(3)], {}, TypeError, r"prompts\[1\]: expected an integer dtype"),
    ([[1, 2.5]], {}, TypeError, r"prompts\[0\]: expected a list of int token ids"),
    ([1, 2, 3], {}, TypeError, r"prompts\[0\]: expected a 1-D tensor or a list of ints, got int \(one"),
    ([[1], []], {}, ValueError, r"prompts\[1\]: expected at least one token"),
    ([[1, 256]], {}, ValueError, r"prompts\[0\]: token ids must lie in \[0, 256\)"),
    ([[1, -1]], {}, ValueError, r"prompts\[0\]: token ids must lie"),
    ([[1]], {"max_new_tokens": -1}, ValueError, "max_new_tokens: expected an int >= 0, got -1"),
    ([[1]], {"max_new_tokens": 2.0}, TypeError, "max_new_tokens: expected an int >= 0, got float"),
    ([[1]], {"max_new_tokens": True}, TypeError, "max_new_tokens: expected an int"),
    ([[1]], {"top_k": 2.0}, TypeError, "top_k: expected None or an int"),
    ([[1]], {"temperature": "hot"}, TypeError, "temperature"),
    ([[1]], {"stop_tokens": "a"}, TypeError, "stop_tokens: expected None, an int or a sequence"),
    ([[1] * 100], {"max_new_tokens": 29}, ValueError, "max_new_tokens: .* exceeds the model's max_seq_len"),
    ([[1], [1] * 129], {"max_new_tokens": 0}, ValueError,
     r"prompts\[1\]: 129 tokens exceed the model's max_seq_len 128"),
    ([[1]], {"temperature": -0.5}, ValueError, "temperature: expected a finite float >= 0"),
    ([[1]], {"temperature": float("nan")}, ValueError, "temperature"),
    ([[1]], {"top_k": 0}, ValueError, r"top_k: expected None or an int in \[1, 256\], got 0"),
    ([[1]], {"top_k": 257}, ValueError, "top_k"),
    ([[1]], {"top_p": 0.0}, ValueError, r"top_p: expected None or a float in \(0, 1\], got 0.0"),
    ([[1]], {"top_p": 1.5}, ValueError, "top_p"),
    ([[1]], {"stop_tokens": [3, 999]}, ValueError, r"stop_tokens: expected token ids in \[0, 256\)"),
    ([[1]], {"stop_tokens": 2.5}, TypeError, "stop_tokens: expected None, an int or a sequence"),
    ([[1]], {"generator": 3}, TypeError, "generator: expected None or a torch.Generator"),
    ([[1]], {"page_size": 0}, ValueError, r"page_size: expected None or an int >= 1, got 0"),
    ([[1]], {"cuda_graph": "yes"}, TypeError, "cuda_graph: expected None"),
])
def test_bad_input(tiny_model, prompts, kwargs, exc, match):
    kwargs = {"max_new_tokens": 3, **kwargs}
    n = kwargs.pop("max_new_tokens")
    with pytest.raises(exc, match=match):
        palm_fast.generate(tiny_model, prompts, n, **kwargs)


def test_numpy_integers_are_ints(tiny_model):
    np = pytest.importorskip("numpy")
    want = palm_fast.generate(tiny_model, [[1, 2]], 4, top_k=1, temperature=1.0, stop_tokens=[7])
    got = palm_fast.generate(tiny_model, [[1, 2]], np.int64(4), top_k=np.int32(1),
                             temperature=np.float32(1.0), stop_tokens=np.array([7]), page_size=np.int64(16))
    assert [t.tolist() for t in got] == [t.tolist() for t in want]


def test_cuda_graph_on_cpu_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="cuda_graph: True needs a model on a CUDA device"):
        palm_fast.generate(tiny_model, [[1, 2]], 2, cuda_graph=True)


# --------------------------------------------------------------------------- CPU direct step

@pytest.mark.parametrize("page_size", [None, 16])
def test_cpu_direct_step_equals_the_checked_step(page_size):
    # generate's CPU decode steps after the first call the C++ kernels directly
    # (generation._CpuStep): bitwise the logits and cache writes of the checked step
    from palm_fast.generation import _CpuStep, _decode_step, _fast_norm, _prefill
    from palm_fast.kv_cache import KVCache

    cfg = CONFIGS["hd64"]
    model = lively(cfg, seed=21)
    parts = decoder_parts(model)
    layers = _prepare_layers(parts)
    final_norm = _fast_norm(parts.norm)
    lengths = torch.tensor([5, 9, 2], dtype=torch.int32)
    tokens = torch.randint(0, cfg.vocab_size, (3, 9), generator=torch.Generator().manual_seed(22))
    caches = [KVCache(cfg.n_layers, 3, 20, cfg.head_dim, page_size=page_size) for _ in range(2)]
    with torch.no_grad():
        logits = [_prefill(parts, layers, final_norm, c, tokens, lengths) for c in caches]
        for c in caches:
            c.reserve(6)
        direct = _CpuStep(parts, layers, caches[1])
        assert direct.final_norm is not final_norm          # our LayerNorm: called directly
        for _ in range(6):
            nxt = logits[0].argmax(-1)
            logits = [_decode_step(parts, layers, final_norm, caches[0], nxt), direct(nxt)]
            assert torch.equal(logits[0], logits[1])
            for c in caches:
                c.advance(1)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    assert torch.equal(caches[0].lengths, caches[1].lengths)


def test_cpu_direct_step_calls_other_norms_and_activations_as_modules():
    cfg = CONFIGS["tiny"]
    model = lively(cfg, seed=23)
    prompts = ragged_prompts(cfg.vocab_size, (4, 7), seed=24)
    ref = [model.generate(p[None], 10)[0] for p in prompts]

    class Norm(nn.Module):            # not one of our LayerNorms: the step calls it
        def __init__(self, ln):
            super().__init__()
            self.ln = ln
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.ln(x)

    for blk in model.blocks:
        blk.norm = Norm(blk.norm)
    model.norm = Norm(model.norm)
    out = palm_fast.generate(model, prompts, 10)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))
    assert model.norm.calls == 1 + 9 and all(blk.norm.calls == 1 + 9 for blk in model.blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 7, 5), (3, 33, 64), (4, 130, 257), (16, 9, 1024),
                                   (6, 25, 24), (13, 40, 100)])
def test_small_mm_matches_the_reference(M, N, K, dtype):
    # the CPU decode step's GEMM: x W^T (+ res), odd sizes (N, K not multiples of 4 / 8 / 12;
    # M = 6 and 13: x rows in fours, then a pair or a single row, in the same call)
    from palm_fast._ext import cpp

    x, w, res = randn(M, K, dtype=dtype), randn(N, K, dtype=dtype), randn(M, N, dtype=dtype)
    ref64 = x.double() @ w.double().t()
    for r in (None, res):
        want = ref64 if r is None else ref64 + r.double()
        eager = x @ w.t() if r is None else torch.addmm(r, x, w.t())
        out = cpp().small_mm_cpu(x, w, r)
        assert_close_by_rule(out, want, eager, name=f"small_mm res={r is not None}")
    # strided x (a transposed view) and a strided residual are read correctly
    xt = randn(K, M, dtype=dtype).t()
    assert torch.equal(cpp().small_mm_cpu(xt, w, res.t().contiguous().t()),
                       cpp().small_mm_cpu(xt.contiguous(), w, res))


def test_small_mm_is_deterministic_across_thread_counts():
    from palm_fast._ext import cpp

    x, w, res = randn(4, 256), randn(2432, 256), randn(4, 2432)
    n = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(cpp().small_mm_cpu(x, w, res))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(RuntimeError, match="x, w"):
        cpp().small_mm_cpu(x, w[:, :8], None)
    with pytest.raises(RuntimeError, match="res"):
        cpp().small_mm_cpu(x, w, res[:, :8])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_mm_row_does_not_depend_on_its_batch(dtype):
    # x rows go in fours (4 x 3 register blocks), then in a pair or alone (2 x 4 / 1 x 4):
    # all sum each output in the same lane order, so a row's result is the same bits
    # whichever block computed it (a sequence decodes alike alone or in a batch)
    from palm_fast._ext import cpp

    x, w = randn(13, 100, dtype=dtype), randn(40, 100, dtype=dtype)
    whole = cpp().small_mm_cpu(x, w, None)
    for i in range(13):
        assert torch.equal(cpp().small_mm_cpu(x[i:i + 1], w, None)[0], whole[i]), i
    assert torch.equal(cpp().small_mm_cpu(x[5:11], w, None), whole[5:11])


def test_generate_takes_a_compiled_model_and_a_page_larger_than_needed(tiny_model):
    """torch.compile(model) is unwrapped (it raised: unsupported model class); a page_size
    beyond prompt + new tokens is cut to that (it allocated batch x page_size tokens)."""
    prompts = [[1, 2, 3], [4, 5]]
    want = palm_fast.generate(tiny_model, prompts, 5)
    got = palm_fast.generate(torch.compile(tiny_model), prompts, 5)
    big_page = palm_fast.generate(tiny_model, prompts, 5, page_size=10 ** 9)
    for a, b, c in zip(want, got, big_page):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_parts_generate_cannot_call_are_refused_and_others_are_called():
    """generate reads the projections' weights and the rotary settings and never calls the
    blocks: forward hooks there (or a Linear / rotary subclass) would silently not run, so
    they are refused, naming the part; a LayerNorm / SwiGLU subclass or a hooked norm is
    called as a module, so its output follows the reference model's (it ran the fast ops
    for any subclass of ours, and skipped the hooks)."""
    from palm_fast.reference.layers import LayerNorm, RotaryEmbedding, SwiGLU

    cfg = CONFIGS["tiny"]
    model = lively(cfg, seed=5)
    prompt = torch.tensor([[5, 17, 3, 99, 42]])

    def same():
        want = model.generate(prompt, 8)[0]
        assert torch.equal(palm_fast.generate(model, prompt, 8)[0], want)
        return want

    plain = same()
    b0, b1 = model.blocks
    for where, mod in (("blocks[0].ff_out", b0.ff_out), ("blocks[1].in_proj", b1.in_proj),
                       ("blocks[1]", b1), ("blocks[0].rotary", b0.rotary), ("the model", model)):
        h = mod.register_forward_hook(lambda m, i, o: o)
        with pytest.raises(ValueError, match=rf"{re.escape(where)} has forward hooks"):
            palm_fast.generate(model, prompt, 8)
        h.remove()
    with pytest.raises(ValueError, match=r"blocks\[0\]\.in_proj: expected a bias-free nn.Linear"):
        old = model.blocks[0].in_proj
        my_linear = type("MyLinear", (nn.Linear,), {})
        model.blocks[0].in_proj = my_linear(old.in_features, old.out_features, bias=False)
        try:
            palm_fast.generate(model, prompt, 8)
        finally:
            model.blocks[0].in_proj = old

    class Rotary(RotaryEmbedding):
        pass

    old = model.blocks[0].rotary
    model.blocks[0].rotary = Rotary(cfg.head_dim)
    with pytest.raises(ValueError, match=r"blocks\[0\]\.rotary: expected a RotaryEmbedding"):
        palm_fast.generate(model, prompt, 8)
    model.blocks[0].rotary = old

    h = model.norm.register_forward_pre_hook(lambda m, i: (i[0].flip(-1),))
    assert not torch.equal(same(), plain)
    h.remove()

    class ScaledNorm(LayerNorm):
        def forward(self, x):
            return super().forward(x) * 3.0

    class GeGLU(SwiGLU):
        def forward(self, x):
            v, g = x.chunk(2, dim=-1)
            return F.gelu(g) * v

    sn = ScaledNorm(cfg.d_model, cfg.eps)
    sn.load_state_dict(model.blocks[1].norm.state_dict())
    model.blocks[1].norm, model.blocks[0].act = sn, GeGLU()
    assert not torch.equal(same(), plain)


def test_autocast_and_float64_models_are_refused(tiny_model):
    """generate runs in the model's dtype: under an autocast to another dtype the reference's
    bf16 matmuls met the fp32 cache (a dtype error naming k or q, at some batch sizes only);
    a float64 model's error named a 'dtype' argument nobody passed."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="torch.autocast"):
            palm_fast.generate(tiny_model, [[1, 2, 3]], 3)
    with pytest.raises(TypeError, match="model: generate's kernels .* torch.float64"):
        palm_fast.generate(copy.deepcopy(tiny_model).double(), [[1, 2, 3]], 3)
    with pytest.raises(ValueError, match=r"prompts\[0\]: .* meta"):
        palm_fast.generate(tiny_model, [torch.zeros(3, dtype=torch.int64, device="meta")], 3)


def test_unpatched_palm_pytorch_model_in_a_fresh_process():
    """PaLM-pytorch's layout was registered only by a first palm_fast.patch call: in a fresh
    process generate refused an unpatched PaLM-pytorch model. Hooks on its blocks (which
    generate does not call) are refused."""
    pytest.importorskip("palm_pytorch")
    code = ("import torch, palm_fast\nfrom palm_pytorch import PaLM\ntorch.manual_seed(0)\n"
            "m = PaLM(num_tokens=50, dim=32, depth=1, heads=2, dim_head=16).eval()\n"
            "print(len(palm_fast.generate(m, [[1, 2, 3]], 4)[0]))\n"
            "m[1].fn.register_forward_hook(lambda *a: None)\n"
            "try:\n    palm_fast.generate(m, [[1, 2, 3]], 4)\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "7" and "model[1].fn has forward hooks" in lines[1], lines


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_raise_instead_of_picking_tokens(tiny_model, temperature):
    """A NaN in the model's logits: greedy returned the NaN's index, sampling failed in
    torch.multinomial with a generic error (on a GPU a device-side assert)."""
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.embed.weight[7, 0] = float("nan")    # the tied head: token 7's logit is NaN
    with pytest.raises(ValueError, match=r"model: its logits were NaN .*for sequences \[0, 1\]"):
        palm_fast.generate(model, [[1, 2, 3], [4, 5]], 3, temperature=temperature,
                           generator=torch.Generator().manual_seed(0))


def test_parametrized_linear_and_infinite_greedy_logits():
    """A parametrized Linear (weight_norm) reads .weight as generate does: accepted (the
    exact-class check refused it). An fp16 logit that overflows to +inf is a well-defined
    greedy choice: no error (only NaN is)."""
    from torch.nn.utils.parametrizations import weight_norm

    cfg = CONFIGS["tiny"]
    model = lively(cfg, seed=3)
    weight_norm(model.blocks[0].attn_out)
    prompt = torch.tensor([[5, 17, 3, 99]])
    assert torch.equal(palm_fast.generate(model, prompt, 6)[0], model.generate(prompt, 6)[0])
    from palm_fast.reference.layers import LayerNorm

    model = lively(cfg, seed=3)
    model.norm = LayerNorm(cfg.d_model, cfg.eps, bias=True)   # final h = bias = 100 e_0
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.bias.zero_()
        model.norm.bias[0] = 100.0
        model.embed.weight[9, 0] = 60000.0       # token 9's logit: far beyond fp16's range
    model = model.half()
    out = palm_fast.generate(model, [[1, 2, 3]], 3)[0]
    assert out[3:].tolist() == [9, 9, 9]


def test_sampling_follows_the_temperature_and_the_nucleus_boundary():
    """sample() draws from softmax(logits / temperature) (a mutation dividing by
    sqrt(temperature) went unnoticed): same generator, same draw as torch.multinomial on
    that distribution. top_p keeps the smallest prefix whose mass REACHES top_p: with
    probabilities [0.5, 0.25, 0.25] and top_p = 0.5 only token 0 is drawn. A stop token
    equal to the vocabulary size is refused."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]).expand(64, 5).contiguous()
    for temp in (0.5, 2.0):
        got = sample(logits, temp, generator=torch.Generator().manual_seed(3))
        probs = (logits / temp).softmax(-1)
        want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3))[:, 0]
        assert torch.equal(got, want), temp
    exact = torch.log(torch.tensor([[0.5, 0.25, 0.25]])).expand(200, 3).contiguous()
    drawn = sample(exact, 1.0, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert drawn.eq(0).all()
    model = lively(CONFIGS["tiny"])
    with pytest.raises(ValueError, match="stop_tokens"):
        palm_fast.generate(model, [[1, 2]], 2, stop_tokens=CONFIGS["tiny"].vocab_size)


def test_generate_refuses_code_it_would_skip_at_every_level(monkeypatch):
    """Regressions of the first fix, and gaps: the model class's own forward replaced at run
    time; a fast part's class code changed (the fused prefill skipped it, the decode ran it);
    a block subclass with its own forward; hooks on a torch.compile wrapper or on every
    module. generate ran those and gave other tokens than the model's."""
    from torch.nn.modules.module import register_module_forward_hook

    import palm_fast.reference.model as RM

    prompt = [torch.tensor([1, 2, 3])]
    model = lively(CONFIGS["tiny"])
    orig = RM.PaLM.forward
    monkeypatch.setattr(RM.PaLM, "forward", lambda self, *a, **k: orig(self, *a, **k) + 1.0)
    with pytest.raises(ValueError, match="PaLM.forward replaced at run time"):
        palm_fast.generate(model, prompt, 2)
    monkeypatch.undo()

    fast = lively(CONFIGS["tiny"], cls=palm_fast.nn.PaLM)
    want = fast.generate(prompt[0][None], 8)[0]
    monkeypatch.setattr(palm_fast.nn.SwiGLU, "forward",
                        lambda self, x: (lambda v, g: F.gelu(g) * v)(*x.chunk(2, -1)))
    got = palm_fast.generate(fast, prompt, 8)[0]     # the parts called: the GeGLU throughout
    assert torch.equal(got, fast.generate(prompt[0][None], 8)[0]) and not torch.equal(got, want)
    monkeypatch.undo()

    class Scaled(palm_fast.reference.ParallelBlock):
        def forward(self, x, positions=None, cache=None):
            return 2.0 * super().forward(x, positions, cache)

    sub = lively(CONFIGS["tiny"])
    blk = sub.blocks[0]
    new = Scaled(blk.dim, blk.n_heads, blk.head_dim, blk.d_ff)
    new.load_state_dict(blk.state_dict())
    sub.blocks[0] = new
    with pytest.raises(ValueError, match="has a forward of its own"):
        palm_fast.generate(sub, prompt, 2)

    wrapped = torch.compile(model, backend="eager")
    h = wrapped.register_forward_hook(lambda m, a, out: -out)
    with pytest.raises(ValueError, match="forward hooks"):
        palm_fast.generate(wrapped, prompt, 2)
    h.remove()
    h = register_module_forward_hook(lambda m, a, out: out)
    try:
        with pytest.raises(ValueError, match="forward hooks"):
            palm_fast.generate(model, prompt, 2)
    finally:
        h.remove()


def test_cpu_steps_run_the_embeddings_hooks_and_code():
    """The CPU decode steps look a plain nn.Embedding up directly; one with hooks, code of its
    own or max_norm is called as a module at every step, as the reference generate() does."""
    model = lively(CONFIGS["hd64"])
    prompts = ragged_prompts(384, (5, 9))
    calls = []
    handle = model.embed.register_forward_hook(lambda mod, args, out: calls.append(1) or out * 1.5)
    try:
        ours = palm_fast.generate(model, prompts, 6)
        n_ours = len(calls)
        ref = [model.generate(p[None], 6)[0] for p in prompts]
    finally:
        handle.remove()
    assert n_ours == 6   # the prefill and 5 decode steps
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [PaLM, palm_fast.nn.PaLM], ids=["reference", "fast"])
def test_column_major_weights_are_made_contiguous_once(cls, monkeypatch):
    """Weights stored column-major (loaded as kernel.T, or with assign=True): the CPU decode
    GEMMs (small_mm_cpu) read row-major weights, and _small_mm copied each such weight in
    every decode step (palm-small 4x slower). They are made contiguous once per generate
    call (contiguous weights are used as they are), and give the same tokens."""
    generation = sys.modules["palm_fast.generation"]
    model = lively(CONFIGS["tiny"], seed=31, cls=cls)
    col = copy.deepcopy(model)
    for mod in col.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.dim() == 2:
                setattr(mod, name, nn.Parameter(p.detach().t().contiguous().t()))
    assert not col.blocks[0].in_proj.weight.is_contiguous()
    # contiguous weights: no copies
    lay = _prepare_layers(decoder_parts(model))[0]
    assert lay.w_in is model.blocks[0].in_proj.weight and lay.w_ff_out is model.blocks[0].ff_out.weight
    seen = []
    small_mm = generation._small_mm

    def spy(x, w, res=None):
        seen.append(w.is_contiguous())
        return small_mm(x, w, res)

    prompts = ragged_prompts(CONFIGS["tiny"].vocab_size, [3, 5])
    want = palm_fast.generate(model, prompts, 8)
    monkeypatch.setattr(generation, "_small_mm", spy)
    got = palm_fast.generate(col, prompts, 8)
    assert len(seen) > 8 and all(seen)   # every decode GEMM got a row-major weight
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("page_size", [None, 2])
def test_generate_under_another_default_device(page_size):
    """torch.set_default_device ("meta" here, standing in for "cuda") does not move
    generate's own tensors: the fast model's RoPE failed ("rope_cpu: expected 4-dim CPU
    tensors"), an int-list prompt was made on the default device (and refused as meta), the
    CPU decode step's rotated-q buffer was made there, and the stop-token cut compared with
    a stop-id tensor there (the output kept tokens past the stop token, or lost it)."""
    model = lively(CONFIGS["tiny"], seed=32, cls=palm_fast.nn.PaLM)
    prompts = [[1, 2, 3], [4, 5]]
    tok = torch.tensor([[1, 2, 3, 4]])
    free = palm_fast.generate(model, prompts, 8, page_size=page_size)
    stops = [int(free[0][4]), int(free[1][3])]   # each row's 2nd new token
    want = palm_fast.generate(model, prompts, 8, stop_tokens=stops, page_size=page_size)
    assert 0 < sum(len(a) < len(b) for a, b in zip(want, free))   # the cut happens
    with torch.no_grad():
        want_logits = model(tok)
    torch.set_default_device("meta")
    try:
        got = palm_fast.generate(model, prompts, 8, stop_tokens=stops, page_size=page_size)
        got_free = palm_fast.generate(model, prompts, 8, page_size=page_size)   # (every step)
        with torch.no_grad():
            logits = model(tok)
    finally:
        torch.set_default_device(None)
    assert [g.tolist() for g in got] == [w.tolist() for w in want]
    assert [g.tolist() for g in got_free] == [w.tolist() for w in free]
    assert logits.device.type == "cpu" and torch.equal(logits, want_logits)
