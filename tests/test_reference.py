"""The reference layers and model against independent, hand-assembled computations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from palm_fast.config import get_config
from palm_fast.reference import (
    KVCache,
    LayerNorm,
    MultiQueryAttention,
    PaLM,
    ParallelBlock,
    RotaryEmbedding,
    SerialBlock,
    SwiGLU,
    SwiGLUMLP,
    attention,
)
from palm_fast.reference.functional import apply_rope, rope_inv_freq


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def sdpa_gqa(q, k, v):
    """Independent attention: torch SDPA (causal) on kv heads expanded to the query heads."""
    rep = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def randomize_(module):
    """Give every parameter (LayerNorm weights included) random values."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return module


# ----------------------------------------------------------------------------- LayerNorm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_norm_matches_torch(dtype, bias):
    ln = randomize_(LayerNorm(48, eps=1e-5, bias=bias))
    assert [n for n, _ in ln.named_parameters()] == (["weight", "bias"] if bias else ["weight"])
    x = torch.randn(3, 5, 48) * 2 + 0.5
    ref = F.layer_norm(x, (48,), ln.weight, ln.bias, 1e-5)  # fp32 statistics
    out = ln(x.to(dtype))
    assert out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    close(out.float(), ref.to(dtype).float(), tol)


def test_layer_norm_defaults():
    ln = LayerNorm(8)
    assert ln.bias is None and torch.equal(ln.weight, torch.ones(8)) and ln.eps == 1e-5


# ----------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("rotary_dim, interleaved", [(16, False), (16, True), (8, False)])
def test_rotary_embedding_is_apply_rope(rotary_dim, interleaved):
    rot = RotaryEmbedding(rotary_dim, base=500.0, interleaved=interleaved)
    assert torch.equal(rot.inv_freq, rope_inv_freq(rotary_dim, 500.0))
    assert "inv_freq" in rot.state_dict()
    q, k = torch.randn(2, 7, 4, 16), torch.randn(2, 7, 1, 16)
    pos = torch.randint(0, 100, (2, 7))
    qr, kr = rot(q, k, pos)
    assert torch.equal(qr, apply_rope(q, pos, rot.inv_freq, interleaved=interleaved))
    assert torch.equal(kr, apply_rope(k, pos, rot.inv_freq, interleaved=interleaved))
    close(qr.norm(dim=-1), q.norm(dim=-1))  # a rotation preserves norms
    close(qr[..., rotary_dim:], q[..., rotary_dim:], 0)  # partial rotary: tail passes through
    # Defaults: offsets -> offsets[b] + t; nothing -> t.
    off = torch.tensor([3, 11])
    pos_off = off[:, None] + torch.arange(7)
    assert torch.equal(rot(q, k, offsets=off)[0], rot(q, k, pos_off)[0])
    assert torch.equal(rot(q, k)[0], rot(q, k, torch.arange(7).expand(2, 7))[0])
    assert not torch.allclose(qr, q)


def test_rope_relative_position():
    """After rope, q(m) . k(n) depends only on m - n."""
    rot = RotaryEmbedding(32)
    q, k = torch.randn(1, 1, 1, 32, dtype=torch.float64), torch.randn(1, 1, 1, 32, dtype=torch.float64)

    def dot(m, n):
        qr, _ = rot(q, q, torch.tensor([[m]]))
        kr, _ = rot(k, k, torch.tensor([[n]]))
        return (qr * kr).sum().item()

    base = dot(5, 2)
    for shift in (1, 17, 300):
        assert dot(5 + shift, 2 + shift) == pytest.approx(base, abs=1e-4)
    assert abs(dot(6, 2) - base) > 1e-3  # a different distance changes it


def test_rotary_keeps_fp32_inv_freq_under_dtype_cast():
    rot = RotaryEmbedding(8).to(torch.bfloat16)
    assert rot.inv_freq.dtype == torch.float32
    assert torch.equal(rot.inv_freq, rope_inv_freq(8))


def test_rotary_bad_positions():
    rot = RotaryEmbedding(8)
    q = torch.randn(2, 3, 1, 8)
    with pytest.raises(ValueError, match="positions"):
        rot(q, q, torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="at most one"):
        rot(q, q, torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))


# ----------------------------------------------------------------------------- SwiGLU
def test_swiglu_modules():
    x = torch.randn(2, 3, 10)
    v, g = x[..., :5], x[..., 5:]
    close(SwiGLU()(x), g * torch.sigmoid(g) * v)
    mlp = SwiGLUMLP(6, 5)
    assert mlp.w_in.weight.shape == (10, 6) and mlp.w_out.weight.shape == (6, 5)
    assert mlp.w_in.bias is None and mlp.w_out.bias is None
    h = torch.randn(4, 6)
    u = h @ mlp.w_in.weight.t()
    close(mlp(h), (F.silu(u[:, 5:]) * u[:, :5]) @ mlp.w_out.weight.t())


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_attention_matches_sdpa(n_kv):
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 9, n_kv, 8), torch.randn(2, 9, n_kv, 8)
    close(attention(q, k, v), sdpa_gqa(q, k, v))


def test_attention_q_offset_and_non_causal():
    q, k, v = torch.randn(2, 10, 4, 8), torch.randn(2, 10, 2, 8), torch.randn(2, 10, 2, 8)
    full = attention(q, k, v)
    # The last 3 queries, placed at index 7.. of the 10 keys, equal the last rows of the full result.
    close(attention(q[:, 7:], k, v, q_offset=7), full[:, 7:])
    rep = lambda t: t.repeat_interleave(2, 2).transpose(1, 2)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), rep(k), rep(v)).transpose(1, 2)
    close(attention(q, k, v, causal=False), ref)


def test_attention_dtype_and_errors():
    q, k = torch.randn(1, 4, 4, 8, dtype=torch.bfloat16), torch.randn(1, 4, 1, 8, dtype=torch.bfloat16)
    assert attention(q, k, k).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="kv heads"):
        attention(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8))
    with pytest.raises(ValueError, match="k, v"):
        attention(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 1, 6), torch.randn(1, 4, 1, 6))
    with pytest.raises(ValueError, match="q_offset"):
        attention(q, k, k, q_offset=-1)


@pytest.mark.parametrize("n_kv", [1, 2])
def test_multi_query_attention(n_kv):
    mqa = MultiQueryAttention(32, n_heads=4, head_dim=12, n_kv_heads=n_kv, rotary_dim=8)
    assert mqa.wkv.weight.shape == (2 * n_kv * 12, 32)
    x = torch.randn(2, 6, 32)
    q = (x @ mqa.wq.weight.t()).view(2, 6, 4, 12)
    kv = x @ mqa.wkv.weight.t()
    k, v = kv[..., : n_kv * 12].view(2, 6, n_kv, 12), kv[..., n_kv * 12:].view(2, 6, n_kv, 12)
    pos = torch.arange(6).expand(2, 6)
    inv = rope_inv_freq(8)
    o = sdpa_gqa(apply_rope(q, pos, inv), apply_rope(k, pos, inv), v)
    close(mqa(x), o.reshape(2, 6, 48) @ mqa.wo.weight.t())


# ----------------------------------------------------------------------------- blocks
BLOCK = dict(dim=32, n_heads=4, head_dim=24, d_ff=40)  # H * D = 96 != dim: head dim is independent


def hand_parallel_block(blk, x, n_kv, rotary_dim, eps=1e-5):
    """y = x + attn_out(Attn(rope q, rope k, v)) + ff_out(silu(gate) * value), one LN, one matmul."""
    B, T, _ = x.shape
    h = F.layer_norm(x, (x.shape[-1],), blk.norm.weight, None, eps)
    proj = h @ blk.in_proj.weight.t()
    q, k, v, ff = proj.split([96, 24 * n_kv, 24 * n_kv, 80], dim=-1)
    pos = torch.arange(T).expand(B, T)
    inv = rope_inv_freq(rotary_dim)
    q, k = apply_rope(q.reshape(B, T, 4, 24), pos, inv), apply_rope(k.reshape(B, T, n_kv, 24), pos, inv)
    o = sdpa_gqa(q, k, v.reshape(B, T, n_kv, 24))
    value, gate = ff[..., :40], ff[..., 40:]
    return x + o.reshape(B, T, 96) @ blk.attn_out.weight.t() + (F.silu(gate) * value) @ blk.ff_out.weight.t()


@pytest.mark.parametrize("n_kv, rotary_dim", [(1, 24), (2, 12)])
def test_parallel_block_matches_hand_computation(n_kv, rotary_dim):
    blk = randomize_(ParallelBlock(**BLOCK, n_kv_heads=n_kv, rotary_dim=rotary_dim))
    assert blk.in_proj.weight.shape == (96 + 2 * 24 * n_kv + 80, 32)
    assert sorted(n for n, _ in blk.named_parameters()) == [
        "attn_out.weight", "ff_out.weight", "in_proj.weight", "norm.weight"]
    x = torch.randn(2, 7, 32)
    close(blk(x), hand_parallel_block(blk, x, n_kv, rotary_dim))


@pytest.mark.parametrize("kind", ["parallel", "serial", "mqa"])
def test_cache_decoding_equals_full_forward(kind):
    blk = ParallelBlock(**BLOCK, n_kv_heads=2)
    if kind == "serial":
        blk = SerialBlock.from_parallel(blk)
    elif kind == "mqa":
        blk = MultiQueryAttention(32, 4, 24, n_kv_heads=2)
    x = torch.randn(2, 9, 32)
    full = blk(x)
    cache = KVCache(2, 12, 2, 24)
    with torch.no_grad():
        steps = [blk(x[:, :4], cache=cache)]           # prefill 4 tokens
        steps += [blk(x[:, t:t + 1], cache=cache) for t in range(4, 9)]   # then one at a time
    assert cache.length == 9
    close(torch.cat(steps, dim=1), full, 1e-5)


def test_kv_cache_append_and_overflow():
    cache = KVCache(2, 5, 1, 4)
    k1, v1 = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    k, v = cache.append(k1, v1)
    assert torch.equal(k, k1) and torch.equal(v, v1) and cache.length == 3
    k2 = torch.randn(2, 2, 1, 4)
    k, v = cache.append(k2, k2)
    assert torch.equal(k, torch.cat((k1, k2), 1)) and k.shape == (2, 5, 1, 4)
    before_k, before_v = cache.k.clone(), cache.v.clone()
    with pytest.raises(RuntimeError, match="overflow"):
        cache.append(torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4))
    assert cache.length == 5 and torch.equal(cache.k, before_k) and torch.equal(cache.v, before_v)
    with pytest.raises(ValueError, match="k_new"):
        KVCache(2, 5, 1, 4).append(torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4))
    cache.reset()
    assert cache.length == 0


def test_serial_block():
    par = randomize_(ParallelBlock(**BLOCK, n_kv_heads=2, rotary_dim=12))
    ser = SerialBlock.from_parallel(par)
    x = torch.randn(2, 7, 32)
    # The serial formulation differs from the parallel one ...
    assert (ser(x) - par(x)).abs().max() > 1e-2
    # ... but matches its own explicit formula h = x + attn(LN1 x), y = h + mlp(LN2 h).
    ln = lambda t, w: F.layer_norm(t, (32,), w, None, 1e-5)
    h = x + ser.attn(ln(x, ser.norm1.weight))
    u = ln(h, ser.norm2.weight) @ ser.mlp.w_in.weight.t()
    close(ser(x), h + (F.silu(u[..., 40:]) * u[..., :40]) @ ser.mlp.w_out.weight.t())
    # The weights are the parallel block's: with one branch switched off both formulations agree.
    with torch.no_grad():
        for zero in ("ff_out", "attn_out"):
            p = ParallelBlock(**BLOCK, n_kv_heads=2, rotary_dim=12)
            p.load_state_dict(par.state_dict())
            getattr(p, zero).weight.zero_()
            close(SerialBlock.from_parallel(p)(x), p(x))


# ----------------------------------------------------------------------------- model
def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return PaLM(get_config("palm-tiny", **overrides))


def test_model_structure_and_init():
    model = PaLM(get_config("palm-small"))
    names = {n for n, _ in model.named_parameters()}
    assert "embed.weight" in names and "norm.weight" in names and len(model.blocks) == 4
    assert not any("bias" in n for n in names)
    assert model.embed.weight.std().item() == pytest.approx(1.0, rel=0.02)
    w = model.blocks[0].in_proj.weight
    assert w.std().item() == pytest.approx(256 ** -0.5, rel=0.02)
    assert model.blocks[0].ff_out.weight.std().item() == pytest.approx(1024 ** -0.5, rel=0.02)


def test_model_logits_tied_and_scaled():
    model = tiny()
    tokens = torch.randint(0, 256, (2, 10))
    logits = model(tokens)
    assert logits.shape == (2, 10, 256)
    h = model.embed(tokens)
    for blk in model.blocks:
        h = blk(h)
    close(logits, model.norm(h) @ model.embed.weight.t() / 8.0)  # 1/sqrt(64)
    unscaled = tiny(scale_logits=False)
    close(unscaled(tokens), logits * 8.0, 1e-4)


def test_loss_is_ce_plus_z():
    model = tiny()
    tokens = torch.randint(0, 256, (3, 12))
    total, ce, z = model.loss(tokens)
    logits = model(tokens[:, :-1]).double()
    logz = logits.exp().sum(-1).log()
    tgt = tokens[:, 1:]
    ce_ref = (logz - logits.gather(-1, tgt[..., None])[..., 0]).mean()
    z_ref = 1e-4 * (logz ** 2).mean()
    assert ce.item() == pytest.approx(ce_ref.item(), rel=1e-5)
    assert z.item() == pytest.approx(z_ref.item(), rel=1e-4)
    assert total.item() == pytest.approx(ce.item() + z.item(), rel=1e-6)
    # Explicit targets of the same shape as the inputs.
    total2, ce2, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
    assert torch.equal(ce2, ce) and torch.equal(total2, total)


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_training_decreases_loss(opt):
    model = tiny()
    tokens = torch.randint(0, 256, (4, 33))
    optim = (torch.optim.AdamW(model.parameters(), lr=3e-3) if opt == "adamw"
             else torch.optim.SGD(model.parameters(), lr=0.5))
    losses = []
    for _ in range(20):
        total, _, _ = model.loss(tokens)
        optim.zero_grad()
        total.backward()
        optim.step()
        losses.append(total.item())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0], losses


def test_model_cache_forward_equals_full():
    model = tiny(n_kv_heads=2)
    tokens = torch.randint(0, 256, (2, 11))
    full = model(tokens)
    caches = model.new_caches(2)
    with torch.no_grad():
        parts = [model(tokens[:, :5], caches=caches)] + [
            model(tokens[:, t:t + 1], caches=caches) for t in range(5, 11)]
    close(torch.cat(parts, 1), full, 1e-4)


def test_generate_greedy_equals_full_forward_argmax():
    model = tiny()
    prompt = torch.randint(0, 256, (2, 5))
    out = model.generate(prompt, 8)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, seq)
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_generate_sampling_top_k():
    model = tiny()
    prompt = torch.randint(0, 256, (3, 4))
    gen = lambda seed, **kw: model.generate(prompt, 6, generator=torch.Generator().manual_seed(seed), **kw)
    out = gen(1, temperature=1.0, top_k=5)
    assert out.dtype == prompt.dtype and ((out >= 0) & (out < 256)).all()
    with torch.no_grad():
        for t in range(4, 10):
            top5 = model(out[:, :t])[:, -1].topk(5, -1).indices
            assert (top5 == out[:, t:t + 1]).any(-1).all()
    assert torch.equal(gen(1, temperature=1.0, top_k=5), out)           # same seed, same tokens
    assert torch.equal(gen(2, temperature=0.7, top_k=1), model.generate(prompt, 6))  # top-1 = greedy
    draws = torch.stack([gen(s, temperature=2.0)[:, 4:] for s in range(4)])
    assert not all(torch.equal(d, draws[0]) for d in draws)  # high temperature actually samples


def test_generate_bad_arguments():
    """Named errors for what generate() cannot take (NaN temperature, an empty prompt, a
    token dtype nn.Embedding rejects, non-integer counts), not failures deep inside."""
    model = tiny()
    p = torch.randint(0, 256, (1, 3))
    cases = [(dict(temperature=float("nan")), ValueError, "temperature"),
             (dict(temperature=float("inf")), ValueError, "temperature"),
             (dict(temperature=True), TypeError, "temperature"),
             (dict(max_new_tokens=2.0), TypeError, "max_new_tokens"),
             (dict(top_k=2.5, temperature=1.0), TypeError, "top_k"),
             (dict(prompt=p[:, :0]), ValueError, "prompt"),
             (dict(prompt=p.to(torch.uint8)), TypeError, "prompt")]
    for kw, err, name in cases:
        args = dict(prompt=p, max_new_tokens=2)
        args.update(kw)
        with pytest.raises(err, match=name):
            model.generate(**args)
    assert model.generate(p.int(), 2).shape == (1, 5)


def test_determinism():
    tokens = torch.randint(0, 256, (2, 16))
    a, b = tiny(seed=3), tiny(seed=3)
    assert torch.equal(a(tokens), b(tokens))
    la, lb = a.loss(tokens)[0], b.loss(tokens)[0]
    la.backward()
    lb.backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


def test_bf16_model_runs_close_to_fp32():
    model = tiny()
    tokens = torch.randint(0, 256, (2, 8))
    ref = model(tokens)
    low = model.to(torch.bfloat16)(tokens)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.15 * ref.abs().max()


def test_bad_inputs():
    model = tiny()
    with pytest.raises(ValueError, match=r"tokens: token ids must lie in \[0, 256\)"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="tokens"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match=r"tokens: expected .*\[B, T\]"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="tokens: expected dtype int32 or int64"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 129, dtype=torch.int64))
    with pytest.raises(ValueError, match="targets"):
        model.loss(torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(torch.zeros(1, 120, dtype=torch.int64), 10)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(torch.zeros(1, 2, dtype=torch.int64), 2, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="caches"):
        model(torch.zeros(1, 2, dtype=torch.int64), caches=model.new_caches(1)[:1])
    with pytest.raises(ValueError, match="n_kv_heads"):
        ParallelBlock(**BLOCK, n_kv_heads=3)
