"""rope_append and mqa_decode everywhere they live: the public ops (CPU -> C++), the Triton
launchers (interpreter on CPU, CUDA when present), shared prefixes, bad input."""
from __future__ import annotations

import importlib

import pytest
import torch
from conftest import DTYPES, HAS_CUDA, TRITON_DEVICE, assert_close_by_rule, randn, requires_cuda

import palm_fast.ops as ops
from palm_fast._ext import cpp
from palm_fast.kv_cache import KVCache
from palm_fast.reference.layers import RotaryEmbedding, attention

DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def fill_cache(B, lens, hd, dtype, page_size=None, n_layers=1, layer=0, device="cpu", num_pages=None):
    """A cache whose ``layer`` holds random K/V of ``lens[b]`` tokens per sequence, written in
    two ragged appends; returns (cache, [K_b], [V_b]) with the per-sequence truth. On the CPU
    the appends use the C++ kernel even in Triton tests (the interpreter is slow)."""
    with monkeypatch_cpu_cpp():
        return _fill_cache(B, lens, hd, dtype, page_size, n_layers, layer, device, num_pages)


def _fill_cache(B, lens, hd, dtype, page_size, n_layers, layer, device, num_pages):
    max_len = max(lens) + 3
    cache = KVCache(n_layers, B, max_len, hd, dtype=dtype, page_size=page_size, device=device,
                    num_pages=num_pages)
    T = max(lens)
    k, v = randn(B, T, hd, dtype=dtype, device=device), randn(B, T, hd, dtype=dtype, device=device)
    first = torch.tensor([n // 2 for n in lens], device=device)
    second = torch.tensor([n - n // 2 for n in lens], device=device)
    cache.append(layer, k, v, first)
    cache.advance(first)
    T2 = int(second.max())
    idx = (first[:, None] + torch.arange(T2, device=device)).clamp(max=T - 1)
    k2 = torch.gather(k, 1, idx[..., None].expand(B, T2, hd))
    v2 = torch.gather(v, 1, idx[..., None].expand(B, T2, hd))
    cache.append(layer, k2, v2, second)
    cache.advance(second)
    return cache, [k[b, :n] for b, n in enumerate(lens)], [v[b, :n] for b, n in enumerate(lens)]


def ref_decode(q, Ks, Vs, dtype=None):
    """reference.layers.attention per sequence: q [B, H, hd] -> [B, H, hd] (in ``dtype``)."""
    dtype = dtype or q.dtype
    outs = []
    for b in range(q.shape[0]):
        outs.append(attention(q[b][None, None].to(dtype), Ks[b][None, :, None].to(dtype),
                              Vs[b][None, :, None].to(dtype), causal=False)[0, 0])
    return torch.stack(outs)


def check_decode(o, q, Ks, Vs):
    ref64 = ref_decode(q.double(), [k.double() for k in Ks], [v.double() for v in Vs])
    eager = ref_decode(q, Ks, Vs)
    assert_close_by_rule(o.cpu(), ref64.cpu(), eager.cpu(), name="o")


# ------------------------------------------------------------------ public ops (CPU)
CASES = [  # (B, H, hd, lens, page_size)
    (1, 8, 64, [1], None),
    (3, 8, 64, [17, 1, 5], 16),
    (2, 16, 128, [1000, 17], None),
    (2, 12, 128, [1000, 333], 64),
    (1, 48, 256, [4097], 256),
    (2, 16, 64, [4097, 30], 32),
    (4, 10, 256, [5, 17, 64, 100], 16),
]


CPU_KERNEL_CASES = [  # (B, H, hd, lens, page_size): every register block of the C++ kernel
    # (value strips of 4 rows: 3 vectors for fp32, 2 for fp16 / bf16; bf16 pairs of vectors
    # are split blocks, even | odd columns, with a natural-order rest: see load_lo)
    (2, 7, 104, [97, 530], None),   # rows 4 + 2 + 1; hd 13 vectors: 4 strips of 3 + 1 (half: 6 x 2 + 1)
    (1, 3, 88, [49], 8),            # rows 2 + 1 only (no 4-row block); 11 vectors: 4 + 4 + 2 + 1
    (2, 5, 36, [1025, 48], 16),     # hd not a multiple of 8 (scalar tails); 3 chunks
    (1, 1, 130, [3], None),         # one row, keys fewer than a key group
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("case", CASES + CPU_KERNEL_CASES,
                         ids=lambda c: f"B{c[0]}H{c[1]}d{c[2]}T{max(c[3])}p{c[4]}")
def test_decode_parity(case, dtype):
    B, H, hd, lens, page_size = case
    cache, Ks, Vs = fill_cache(B, lens, hd, dtype, page_size)
    q = randn(B, H, hd, dtype=dtype)
    o = ops.mqa_decode(q, cache, 0, cache.lengths)
    assert o.dtype == dtype and o.shape == (B, H, hd)
    check_decode(o, q, Ks, Vs)


@pytest.mark.parametrize("page_size", [None, 4])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_append_matches_reference(page_size, interleaved):
    B, T, H, hd, rdim = 3, 4, 6, 16, 8
    cache = KVCache(2, B, 20, hd, page_size=page_size)
    cache.advance(torch.tensor([0, 3, 7]))  # ragged start offsets (pages reserved by advance)
    q, k, v = randn(B, T, H, hd), randn(B, T, hd), randn(B, T, hd)
    n_new = torch.tensor([4, 2, 3])
    q_rot = ops.rope_append(q, k, v, cache, 1, rotary_dim=rdim, interleaved=interleaved, n_new=n_new)
    rot = RotaryEmbedding(rdim, interleaved=interleaved)
    q_ref, k_ref = rot(q, k[:, :, None], offsets=cache.lengths.long())
    assert torch.allclose(q_rot, q_ref, atol=1e-6, rtol=1e-5)
    for b in range(B):
        start = cache.host_lengths()[b]
        idx = torch.arange(start, start + int(n_new[b]))
        if page_size is None:
            kb, vb = cache.k[1, b, idx], cache.v[1, b, idx]
        else:
            pages = cache.page_table[b].long()[idx // page_size]
            kb, vb = cache.k[1, pages, idx % page_size], cache.v[1, pages, idx % page_size]
        assert torch.allclose(kb, k_ref[b, :len(idx), 0], atol=1e-6, rtol=1e-5)
        assert torch.equal(vb, v[b, :len(idx)])
    # explicit positions
    pos = torch.randint(0, 1000, (B, T))
    q_rot = ops.rope_append(q, k, v, cache, 0, pos, rotary_dim=rdim, interleaved=interleaved)
    q_ref, _ = rot(q, k[:, :, None], positions=pos)
    assert torch.allclose(q_rot, q_ref, atol=1e-5, rtol=1e-5)


def test_decode_step_matches_reference_block_attention():
    """rope_append + mqa_decode over several steps == the reference attention with RoPE."""
    B, H, hd, steps = 2, 4, 16, 5
    cache = KVCache(1, B, 16, hd, page_size=4)
    rot = RotaryEmbedding(hd)
    qs, ks, vs = randn(B, steps, H, hd), randn(B, steps, hd), randn(B, steps, hd)
    q_all, k_all = rot(qs, ks[:, :, None])
    for t in range(steps):
        q_rot = ops.rope_append(qs[:, t:t + 1], ks[:, t:t + 1], vs[:, t:t + 1], cache, 0)
        o = ops.mqa_decode(q_rot[:, 0].contiguous(), cache, 0, cache.lengths + 1)
        cache.advance(1)
        ref = attention(q_all[:, t:t + 1], k_all[:, :t + 1], vs[:, :t + 1, None], causal=False)[:, 0]
        assert torch.allclose(o, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("page_size", [16, 5])
def test_shared_prefix_matches_unshared(page_size, dtype):
    B, H, hd, prefix = 4, 8, 32, 70
    cache = KVCache(1, B, 128, hd, dtype=dtype, page_size=page_size)
    k, v = randn(B, prefix, hd, dtype=dtype), randn(B, prefix, hd, dtype=dtype)
    n0 = torch.tensor([prefix, 0, 0, 0])
    cache.append(0, k, v, n0)
    cache.advance(n0)
    cache.fork(0, [1, 3])  # sequences 0, 1, 3 share the prompt; 2 is on its own
    suffix = torch.tensor([9, 1, 40, 0])
    ks, vs = randn(B, 40, hd, dtype=dtype), randn(B, 40, hd, dtype=dtype)
    cache.append(0, ks, vs, suffix)
    cache.advance(suffix)
    assert len(cache.prefix_groups()) == 1
    q = randn(B, H, hd, dtype=dtype)
    shared = ops.mqa_decode(q, cache, 0, cache.lengths, shared_prefix=True)
    unshared = ops.mqa_decode(q, cache, 0, cache.lengths, shared_prefix=False)
    Ks = [torch.cat([k[0], ks[b, :int(suffix[b])]]) if b != 2 else ks[2, :40] for b in range(B)]
    Vs = [torch.cat([v[0], vs[b, :int(suffix[b])]]) if b != 2 else vs[2, :40] for b in range(B)]
    check_decode(unshared, q, Ks, Vs)
    check_decode(shared, q, Ks, Vs)
    auto = ops.mqa_decode(q, cache, 0, cache.lengths)   # None: unshared on the CPU
    assert torch.equal(auto, unshared)
    with pytest.raises(TypeError, match="shared_prefix"):
        ops.mqa_decode(q, cache, 0, cache.lengths, shared_prefix="yes")


def test_shared_prefix_cpu_merge_and_row_groups():
    """CPU: a prefix group's rows are split into tasks of at most 16 rows, and the merge runs
    in C++ (prefix_merge_cpu): the same as the torch-op merge used on CUDA, and
    deterministic for any thread count."""
    md = importlib.import_module("palm_fast.ops.mqa_decode")
    B, H, hd, prefix = 6, 8, 32, 48
    cache = KVCache(1, B, 96, hd, page_size=16)
    n0 = torch.tensor([prefix, 0, 0, 0, 0, 0])
    cache.append(0, randn(B, prefix, hd), randn(B, prefix, hd), n0)
    cache.advance(n0)
    cache.fork(0, [1, 2, 4, 5])   # 5 members x 8 heads = 40 rows: 3 row groups; 3 alone
    suffix = torch.tensor([3, 0, 17, 30, 1, 9])
    cache.append(0, randn(B, 30, hd), randn(B, 30, hd), suffix)
    cache.advance(suffix)
    q = randn(B, H, hd)
    shared = ops.mqa_decode(q, cache, 0, cache.lengths, shared_prefix=True)
    unshared = ops.mqa_decode(q, cache, 0, cache.lengths, shared_prefix=False)
    assert torch.allclose(shared, unshared, atol=1e-5, rtol=1e-5)
    group_seq, group_len, rows, starts, slot = cache.decode_meta()
    G, M = rows.shape
    q_pre = q[rows.clamp(min=0).long()].reshape(G, M * H, hd)
    run = md._mqa_decode_cpu
    o_pre, lse_pre = run(q_pre, cache.k, cache.v, cache.page_table[group_seq.long()], None, group_len,
                         0, hd ** -0.5, True)
    o_suf, lse_suf = run(q, cache.k, cache.v, cache.page_table, starts, cache.lengths, 0, hd ** -0.5, True)
    torch_merge = md._prefix_merge(o_pre, lse_pre, slot, o_suf, lse_suf, q.dtype)
    assert torch.allclose(shared, torch_merge, atol=1e-6, rtol=1e-6)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.mqa_decode(q, cache, 0, cache.lengths, shared_prefix=True)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, shared)


def test_deterministic_any_thread_count():
    cache, _, _ = fill_cache(2, [1000, 513], 64, torch.bfloat16, 32)
    q = randn(2, 8, 64, dtype=torch.bfloat16)
    a = ops.mqa_decode(q, cache, 0, cache.lengths)
    b = ops.mqa_decode(q, cache, 0, cache.lengths)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = ops.mqa_decode(q, cache, 0, cache.lengths)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b) and torch.equal(a, c)


# ------------------------------------------------------------------ bad input
def test_decode_bad_input():
    cache, _, _ = fill_cache(2, [10, 5], 16, torch.float32, 4)
    q = randn(2, 4, 16)
    good = cache.lengths
    bad = [
        (dict(q=randn(3, 4, 16)), ValueError, "q: expected shape"),
        (dict(q=randn(2, 4, 8)), ValueError, "q: expected shape"),
        (dict(q=randn(2, 4, 16, dtype=torch.float16)), TypeError, "q: expected dtype"),
        (dict(q=randn(2, 16, 4).transpose(1, 2)), ValueError, "contiguous"),
        (dict(layer=1), ValueError, "layer"),
        (dict(seq_lens=good.long()), TypeError, "seq_lens"),
        (dict(seq_lens=torch.tensor([10, 14], dtype=torch.int32)), ValueError, "seq_lens"),
        (dict(seq_lens=torch.tensor([-1, 1], dtype=torch.int32)), ValueError, "seq_lens"),
        (dict(seq_lens=torch.tensor([13, 5], dtype=torch.int32)), ValueError,   # no page yet
         "seq_lens: sequence 0 reads 13 tokens, but the cache holds pages for only"),
        (dict(seq_lens=good[:1]), ValueError, "seq_lens"),
    ]
    for kw, err, match in bad:
        args = dict(q=q, layer=0, seq_lens=good) | kw
        with pytest.raises(err, match=match):
            ops.mqa_decode(args["q"], cache, args["layer"], args["seq_lens"])
    with pytest.raises(TypeError, match="cache"):
        ops.mqa_decode(q, object(), 0, good)
    with pytest.raises(RuntimeError, match="inference only"):
        ops.mqa_decode(q.requires_grad_(), cache, 0, good)
    cache.page_table[1, 0] = 99  # corrupt the table
    with pytest.raises(ValueError, match="page_table"):
        ops.mqa_decode(q.detach(), cache, 0, good)


def test_value_checks_once_per_step_and_after_in_place_changes(monkeypatch):
    """The same seq_lens passed to every layer of a step is validated once (one host read per
    step, not per layer); a new tensor, or an in-place change to seq_lens or to the page
    table, is validated again."""
    md = importlib.import_module("palm_fast.ops.mqa_decode")
    calls = []
    orig = md._values_bad
    monkeypatch.setattr(md, "_values_bad", lambda *a: calls.append(1) or orig(*a))
    cache, _, _ = fill_cache(2, [10, 5], 16, torch.float32, 4, n_layers=2)
    q = randn(2, 4, 16)
    seq_lens = cache.lengths.clone()
    for layer in (0, 1):
        ops.mqa_decode(q, cache, layer, seq_lens)
    assert len(calls) == 1
    ops.mqa_decode(q, cache, 0, seq_lens.clone())
    assert len(calls) == 2
    seq_lens[0] = cache.max_len + 1
    with pytest.raises(ValueError, match="seq_lens"):
        ops.mqa_decode(q, cache, 1, seq_lens)
    seq_lens[0] = 10
    ops.mqa_decode(q, cache, 0, seq_lens)
    cache.page_table[0, 0] = -1
    with pytest.raises(ValueError, match="page_table"):
        ops.mqa_decode(q, cache, 1, seq_lens)


@pytest.mark.parametrize("page_size", [None, 4])
def test_rope_append_rejections_leave_cache_unchanged(page_size):
    from test_kv_cache import assert_same, snapshot

    cache, _, _ = fill_cache(2, [10, 5], 16, torch.float32, page_size)
    B, T, H, hd = 2, 2, 4, 16
    q, k, v = randn(B, T, H, hd), randn(B, T, hd), randn(B, T, hd)
    before = snapshot(cache)
    bad = [
        (lambda: ops.rope_append(randn(B, 4, H, hd), randn(B, 4, hd), randn(B, 4, hd), cache, 0),
         ValueError, "overflow"),
        (lambda: ops.rope_append(q[:1], k[:1], v[:1], cache, 0), ValueError, "q: expected shape"),
        (lambda: ops.rope_append(q, k[:, :1], v, cache, 0), ValueError, "k: expected"),
        (lambda: ops.rope_append(q, k, v[..., :8], cache, 0), ValueError, "v: expected shape"),
        (lambda: ops.rope_append(q.half(), k, v, cache, 0), TypeError, "q: expected dtype"),
        (lambda: ops.rope_append(q, k, v, cache, 2), ValueError, "layer"),
        (lambda: ops.rope_append(q, k, v, cache, 0, torch.zeros(B, T + 1, dtype=torch.long)),
         ValueError, "positions"),
        (lambda: ops.rope_append(q, k, v, cache, 0, -torch.ones(B, T, dtype=torch.long)),
         ValueError, "positions"),
        (lambda: ops.rope_append(q, k, v, cache, 0, rotary_dim=5), ValueError, "rotary_dim"),
        (lambda: ops.rope_append(q, k, v, cache, 0, base=float("nan")), ValueError, "base"),
        (lambda: ops.rope_append(q, k, v, cache, 0, base=0.0), ValueError, "base"),
        (lambda: ops.rope_append(q, cache.k[0][:B, 2:4], v, cache, 0), ValueError,
         "k: expected a tensor that does not share memory with the cache"),
        (lambda: ops.rope_append(q.requires_grad_(), k, v, cache, 0), RuntimeError, "inference only"),
    ]
    for call, err, match in bad:
        with pytest.raises(err, match=match):
            call()
        assert_same(snapshot(cache), before)


# ------------------------------------------------------------------ Triton launchers
@pytest.fixture
def triton_backend(monkeypatch):
    """Route the public ops to the Triton launchers: CUDA tensors when there is a GPU, else
    CPU tensors under the interpreter (the CPU entries of the dispatch tables swapped)."""
    mod = importlib.import_module("palm_fast.ops.mqa_decode")

    if not HAS_CUDA:
        monkeypatch.setitem(mod._DECODE, "cpu", mod._mqa_decode_cuda)
        monkeypatch.setitem(mod._SUFFIX_MERGE, "cpu", mod._suffix_merge_cuda)
        monkeypatch.setitem(mod._ROPE_APPEND, "cpu", mod._rope_append_cuda)
    return TRITON_DEVICE


# Small enough for the interpreter; the full grid runs on CUDA.
TRITON_CASES = [  # (B, H, hd, lens, page_size)
    (2, 8, 64, [17, 1], None),
    (1, 16, 128, [1000], 256),
    (1, 8, 32, [4097], 64),
    (2, 48, 64, [5, 17], 16),
    (1, 12, 256, [33], 16),
    (3, 10, 40, [1, 70, 9], 5),
    (2, 4, 8, [20, 3], None),  # hd < 16: padded to the tl.dot minimum
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("case", CASES + TRITON_CASES if HAS_CUDA else TRITON_CASES,
                         ids=lambda c: f"B{c[0]}H{c[1]}d{c[2]}T{max(c[3])}p{c[4]}")
def test_triton_decode_parity(case, dtype, triton_backend):
    B, H, hd, lens, page_size = case
    cache, Ks, Vs = fill_cache(B, lens, hd, dtype, page_size, device=triton_backend)
    q = randn(B, H, hd, dtype=dtype, device=triton_backend)
    o = ops.mqa_decode(q, cache, 0, cache.lengths)
    assert o.dtype == dtype and o.shape == (B, H, hd)
    check_decode(o, q, Ks, Vs)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("page_size", [None, 4])
def test_zero_length_sequences_decode_to_zero(backend, page_size, request):
    """A batch slot with no tokens (e.g. reset, waiting for its prompt) decodes to o = 0; the
    other sequences are unaffected."""
    device = request.getfixturevalue("triton_backend") if backend == "triton" else "cpu"
    cache, Ks, Vs = fill_cache(3, [7, 1, 12], 16, torch.float32, page_size, device=device)
    cache.reset(1)
    q = randn(3, 4, 16, device=device)
    o = ops.mqa_decode(q, cache, 0, cache.lengths)
    assert int(cache.lengths[1]) == 0 and torch.equal(o[1].cpu(), torch.zeros(4, 16))
    check_decode(o[[0, 2]], q[[0, 2]], [Ks[0], Ks[2]], [Vs[0], Vs[2]])


@pytest.mark.parametrize("n_splits", [1, 3, 30])
def test_triton_splits_and_empty_ranges(n_splits):
    """Forced split counts (many splits past the end: neutral partials), empty ranges
    (start == end gives o = 0, lse = -inf), starts > 0; vs the C++ kernel."""
    from palm_fast.kernels import mqa_decode as tk

    cache, _, _ = fill_cache(3, [1500, 3, 20], 16, torch.float32, 8, device=TRITON_DEVICE)
    q = randn(3, 6, 16, device=TRITON_DEVICE)
    starts = torch.tensor([5, 3, 0], dtype=torch.int32, device=TRITON_DEVICE)
    o, lse = tk.mqa_decode(q, cache.k, cache.v, cache.page_table, starts, cache.lengths, 0, 0.3, True,
                           n_splits=n_splits)
    o_ref, lse_ref = cpp().mqa_decode_cpu(q.cpu(), cache.k.cpu(), cache.v.cpu(), cache.page_table.cpu(),
                                          starts.cpu(), cache.lengths.cpu(), 0, 0.3, True)
    assert torch.allclose(o.cpu(), o_ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(lse.cpu(), lse_ref, atol=1e-5, rtol=1e-5)
    assert (o[1] == 0).all() and torch.isinf(lse[1]).all() and (lse[1] < 0).all()


def test_triton_empty_splits_write_no_partial_output(monkeypatch):
    """A split past its sequence's end writes only its lse (-inf); the combine kernel reads
    no output of such a split. Checked with the partial buffers filled with NaN: the empty
    splits' outputs stay NaN (not written), and the result is bitwise the one of a call
    whose partials start as zeros (nothing unwritten was read), also merging a prefix."""
    from palm_fast.kernels import mqa_decode as tk

    cache, _, _ = fill_cache(3, [700, 3, 0], 16, torch.float32, 8, device=TRITON_DEVICE)
    q = randn(3, 6, 16, device=TRITON_DEVICE)
    starts = torch.tensor([5, 0, 0], dtype=torch.int32, device=TRITON_DEVICE)
    prefix = (randn(2, 6, 16, device=TRITON_DEVICE), randn(2, 6, device=TRITON_DEVICE),
              torch.tensor([1, -1, 0], dtype=torch.int32, device=TRITON_DEVICE))
    allocs = []

    class Torch:   # kernels.mqa_decode's torch, its fp32 buffers pre-filled
        def __init__(self, fill):
            self.fill = fill

        def __getattr__(self, name):
            return getattr(torch, name)

        def empty(self, *shape, dtype=None, device=None):
            t = torch.empty(*shape, dtype=dtype, device=device)
            if dtype == torch.float32:
                t.fill_(self.fill)
                allocs.append(t)
            return t

    out = []
    for fill in (0.0, float("nan")):
        allocs.clear()
        monkeypatch.setattr(tk, "torch", Torch(fill))
        out += [tk.mqa_decode(q, cache.k, cache.v, cache.page_table, starts, cache.lengths, 0, 0.3,
                              True, n_splits=4, prefix=prefix)]
        monkeypatch.undo()
    o_part = allocs[0]
    assert o_part.shape[:2] == (3, 4)  # [B, splits, R, hd]: sequence 0 keys 5..700, 1: 0..3, 2: none
    assert not o_part[0].isnan().any() and not o_part[1, 0].isnan().any()
    assert o_part[1, 1:].isnan().all() and o_part[2].isnan().all()
    for a, b in zip(*out):
        assert torch.equal(a, b)
    assert not out[0][0].isnan().any()


@pytest.mark.parametrize("tiles", [{"BLOCK_R": 16, "BLOCK_N": 16},
                                   {"BLOCK_R": 32, "BLOCK_N": 32, "num_warps": 8},
                                   {"BLOCK_N": 64, "num_stages": 2}], ids=str)
def test_triton_tile_overrides(tiles):
    """Imposed tile sizes (the tuning probes' knobs) give the heuristic's result: 40 rows
    in 16-row blocks (three row blocks, the last partial), keys in 16-key blocks, paged."""
    from palm_fast.kernels import mqa_decode as tk

    cache, _, _ = fill_cache(2, [300, 45], 16, torch.float32, 8, device=TRITON_DEVICE)
    q = randn(2, 40, 16, device=TRITON_DEVICE)
    args = (q, cache.k, cache.v, cache.page_table, None, cache.lengths, 0, 0.25, True)
    o, lse = tk.mqa_decode(*args, tiles=tiles)
    o_ref, lse_ref = tk.mqa_decode(*args)
    assert torch.allclose(o, o_ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(lse, lse_ref, atol=1e-5, rtol=1e-5)
    for bad, msg in (({"BLOCK_R": 24}, "BLOCK_R"), ({"BLOCK_N": 8}, "BLOCK_N"),
                     ({"num_warps": 0}, "num_warps"), ({"BLOCK_K": 16}, "unknown key")):
        with pytest.raises(ValueError, match=msg):
            tk.mqa_decode(*args, tiles=bad)
    with pytest.raises(ValueError, match="n_splits"):
        tk.mqa_decode(*args, n_splits=0)


def test_triton_batch_past_the_grid_limit_is_a_clear_error():
    """The batch is the decode grid's z axis, which CUDA caps at 65535: a larger batch failed
    the launch with Triton's bare 'invalid argument'. (Checked before anything is allocated.)"""
    from palm_fast.kernels import mqa_decode as tk

    B = 65536
    q = torch.zeros(B, 1, 16, device=TRITON_DEVICE)
    k = torch.zeros(1, 1, 8, 16, device=TRITON_DEVICE)
    ends = torch.ones(B, dtype=torch.int32, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="q: expected at most 65535 sequences per decode call"):
        tk.mqa_decode(q, k, k, None, None, ends, 0, 0.25, True)
    # the split count (grid axis y) past it: only an override asks for that many
    long = torch.zeros(1, 1, 2 ** 21, 1, device=TRITON_DEVICE)   # 2M keys: 70000 splits fit
    with pytest.raises(ValueError, match="n_splits: expected at most 65535, got"):
        tk.mqa_decode(torch.zeros(1, 1, 1, device=TRITON_DEVICE), long, long, None, None,
                      torch.ones(1, dtype=torch.int32, device=TRITON_DEVICE), 0, 1.0, True,
                      n_splits=70000, tiles={"BLOCK_N": 16})


def test_triton_grid_independent_of_lengths():
    from palm_fast.kernels import mqa_decode as tk

    a = tk.decode_config(1, 48, 256, 32768, 132)
    assert a == tk.decode_config(1, 48, 256, 32768, 132)  # lengths are not an input at all
    assert a["BLOCK_R"] == 64 and a["row_blocks"] == 1  # all 48 heads in one M tile
    # batch 1 still fills the GPU, in one wave (splits are whole BLOCK_N multiples: 128)
    assert 0.9 * 132 <= a["n_splits"] * a["row_blocks"] <= 132
    c = tk.decode_config(8, 48, 256, 32768, 132)
    assert 0.9 * 132 <= 8 * c["n_splits"] * c["row_blocks"] <= 132
    b = tk.decode_config(64, 16, 128, 4096, 132)
    assert b["n_splits"] >= 1 and b["BLOCK_R"] == 16
    # a paged cache: two programs per SM (the page-table gather before each block's loads is
    # hidden by a second resident program), same tiles
    p = tk.decode_config(8, 48, 256, 32768, 132, paged=True)
    assert 0.9 * 2 * 132 <= 8 * p["n_splits"] * p["row_blocks"] <= 2 * 132
    assert {k: v for k, v in p.items() if k not in ("n_splits", "split_len")} == \
        {k: v for k, v in c.items() if k not in ("n_splits", "split_len")}
    # (not where a second program does not fit: an fp32 cache, a 99 KiB GPU)
    assert tk.decode_config(8, 48, 256, 32768, 132, 4, paged=True)["n_splits"] == \
        tk.decode_config(8, 48, 256, 32768, 132, 4)["n_splits"]
    assert tk.decode_config(8, 16, 128, 32768, 84, 2, smem=101376, paged=True)["n_splits"] == \
        tk.decode_config(8, 16, 128, 32768, 84, 2, smem=101376)["n_splits"]
    # a shared-prefix pass at head dim 256 (64 members x 48 heads over the bench's paged
    # 4096-token prefix, capacity 4352): the measured compute-bound tiles, one program per SM
    s = tk.decode_config(1, 64 * 48, 256, 4352, 132, paged=True)
    assert (s["BLOCK_R"], s["BLOCK_N"], s["num_warps"], s["row_blocks"], s["n_splits"]) == (128, 64, 8, 24, 5)
    # (decode-sized rows, other head dims, fp32, 99 KiB GPUs: unchanged)
    for cfg in (tk.decode_config(64, 48, 256, 4352, 132, paged=True),
                tk.decode_config(1, 64 * 16, 128, 4352, 132, paged=True),
                tk.decode_config(1, 64 * 48, 256, 4352, 128, smem=101376, paged=True)):
        assert cfg["BLOCK_R"] <= 64 and cfg["num_warps"] == 4
    # the suffix pass of that decode: its 4 splits of the capacity left 3 empty (the suffix
    # keys all lie in the first); split over the 256 keys past the prefix, one split
    assert tk.decode_config(64, 48, 256, 4352, 132, paged=True)["n_splits"] == 4
    sp = tk.decode_config(64, 48, 256, 4352, 132, paged=True, span=256)
    assert (sp["n_splits"], sp["split_len"]) == (1, 256)
    # (a span of the whole capacity, or more, changes nothing)
    for span in (4352, 10 ** 6):
        assert tk.decode_config(1, 48, 256, 4352, 132, span=span) == tk.decode_config(1, 48, 256, 4352, 132)
    assert tk.decode_config(1, 48, 256, 32768, 132, span=4096)["n_splits"] == 16   # 256-key splits


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("page_size", [None, 4])
def test_triton_rope_append(page_size, dtype, triton_backend):
    B, T, H, hd = 2, 3, 4, 16
    dev = triton_backend
    for interleaved in (False, True):
        c_ref = KVCache(1, B, 12, hd, dtype=dtype, page_size=page_size)
        c_tri = KVCache(1, B, 12, hd, dtype=dtype, page_size=page_size, device=dev)
        for c in (c_ref, c_tri):
            c.advance(torch.tensor([1, 4]))
        q, k, v = randn(B, T, H, hd, dtype=dtype), randn(B, T, hd, dtype=dtype), randn(B, T, hd, dtype=dtype)
        n_new = torch.tensor([3, 1])
        with monkeypatch_cpu_cpp():
            q_ref = ops.rope_append(q, k, v, c_ref, 0, rotary_dim=12, interleaved=interleaved, n_new=n_new)
        q_tri = ops.rope_append(q.to(dev), k.to(dev), v.to(dev), c_tri, 0, rotary_dim=12,
                                interleaved=interleaved, n_new=n_new.to(dev))
        # (an exception to the tolerance rule: two fast paths compared with each other, not with
        # fp64; in half precision their fp32 rotations may round to neighbouring values: 1-2 ulp)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
        assert torch.allclose(q_tri.cpu().float(), q_ref.float(), **tol)
        assert torch.allclose(c_tri.k.cpu().float(), c_ref.k.float(), **tol)
        assert torch.equal(c_tri.v.cpu(), c_ref.v)
        # plain append: exact copies
        c_tri.append(0, k.to(dev), v.to(dev), n_new.to(dev))
        with monkeypatch_cpu_cpp():
            c_ref.append(0, k, v, n_new)
        assert torch.equal(c_tri.k.cpu(), c_ref.k) and torch.equal(c_tri.v.cpu(), c_ref.v)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("page_size", [None, 4])
def test_append_with_a_strided_int32_n_new(page_size, backend, request):
    """n_new as an expanded or sliced int32 tensor: the kernels index it densely (the Triton
    append skipped a sequence's token and read past an expand's storage; the C++ one raised
    after pages were taken)."""
    dev = request.getfixturevalue("triton_backend") if backend == "triton" else "cpu"
    B, T, H, hd = 3, 2, 2, 8
    q, k, v = (randn(B, T, H, hd).to(dev), randn(B, T, hd).to(dev), randn(B, T, hd).to(dev))
    strided = {"expand": torch.ones(1, dtype=torch.int32, device=dev).expand(B),
               "slice": torch.tensor([1, 0, 2, 0, 1, 0], dtype=torch.int32, device=dev)[::2]}
    for name, n_new in strided.items():
        dense = n_new.contiguous()
        for fn in ("append", "rope_append"):
            caches = [KVCache(1, B, 8, hd, page_size=page_size, device=dev) for _ in range(2)]
            for c, n in zip(caches, (n_new, dense)):
                c.advance(torch.tensor([0, 3, 1], device=dev))
                if fn == "append":
                    c.append(0, k, v, n)
                else:
                    ops.rope_append(q, k, v, c, 0, n_new=n)
            a, b = caches
            assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v), (name, fn)
            assert torch.equal(a.page_table, b.page_table) if page_size else True


def monkeypatch_cpu_cpp():
    """A context that restores the C++ CPU kernels inside a test that swapped in Triton."""
    import contextlib

    mod = importlib.import_module("palm_fast.ops.mqa_decode")

    @contextlib.contextmanager
    def ctx():
        saved = dict(mod._DECODE), dict(mod._ROPE_APPEND)
        mod._DECODE["cpu"], mod._ROPE_APPEND["cpu"] = mod._mqa_decode_cpu, mod._rope_append_cpu
        try:
            yield
        finally:
            mod._DECODE.update(saved[0])
            mod._ROPE_APPEND.update(saved[1])

    return ctx()


@pytest.mark.parametrize("page_size", [16, 5])
def test_triton_shared_prefix(page_size, triton_backend):
    """Sequences 0-2 share a 40-token prompt (1 with no token after it), 3 is in no group:
    the suffix pass's combine kernel merges the prefix output (slot -1 for sequence 3); the
    same as reading per sequence and as the separate torch-ops merge (torch.compile's path)."""
    from palm_fast.kernels import mqa_decode as tk

    mod = importlib.import_module("palm_fast.ops.mqa_decode")
    dev = triton_backend
    B, H, hd, prefix = 4, 8, 32, 40
    cache = KVCache(1, B, 72, hd, page_size=page_size, device=dev)
    n0 = torch.tensor([prefix, 0, 0, 25], device=dev)
    cache.append(0, randn(B, prefix, hd, device=dev), randn(B, prefix, hd, device=dev), n0)
    cache.advance(n0)
    cache.fork(0, [1, 2])
    suffix = torch.tensor([3, 0, 7, 2], device=dev)
    cache.append(0, randn(B, 7, hd, device=dev), randn(B, 7, hd, device=dev), suffix)
    cache.advance(suffix)
    q = randn(B, H, hd, device=dev)
    shared = ops.mqa_decode(q, cache, 0, cache.lengths, shared_prefix=True)
    unshared = ops.mqa_decode(q, cache, 0, cache.lengths, shared_prefix=False)
    assert torch.allclose(shared, unshared, atol=1e-5, rtol=1e-5)
    a = ops.mqa_decode(q, cache, 0, cache.lengths, shared_prefix=True)
    assert torch.equal(a, shared)  # deterministic
    # The fused merge against the separate one, from the same passes.
    group_seq, group_len, rows, starts, slot = cache.decode_meta()
    assert slot.tolist()[3] == -1
    row_idx, seq_idx = cache.decode_index()
    q_pre = q.index_select(0, row_idx).view(rows.shape[0], -1, hd)
    o_pre, lse_pre = tk.mqa_decode(q_pre, cache.k, cache.v, cache.page_table.index_select(0, seq_idx), None,
                                   group_len, 0, hd ** -0.5, True)
    args = (q, cache.k, cache.v, cache.page_table, starts, cache.lengths, 0, hd ** -0.5)
    fused = mod._suffix_merge_cuda(*args, o_pre, lse_pre, slot, cache.blocks_per_seq * page_size)
    o_suf, lse_suf = tk.mqa_decode(*args, True)
    separate = mod._prefix_merge(o_pre, lse_pre, slot, o_suf, lse_suf, q.dtype)
    assert torch.allclose(fused, separate, atol=1e-6, rtol=1e-6)
    assert torch.equal(fused, shared)
    with pytest.raises(ValueError, match="prefix"):
        tk.mqa_decode(*args, False, prefix=(o_pre, lse_pre, slot.long()))


def test_triton_split_span(triton_backend):
    """``span``: the splits cover the keys past each start up to ``start + span`` instead of
    the capacity; the same attention, with or without a span, for any split count; a bad span
    is refused."""
    from palm_fast.kernels import mqa_decode as tk

    dev = triton_backend
    B, R, hd, P = 3, 5, 16, 96
    k, v = randn(1, B, P, hd, device=dev), randn(1, B, P, hd, device=dev)
    q = randn(B, R, hd, device=dev)
    starts = torch.tensor([40, 50, 60], dtype=torch.int32, device=dev)
    ends = torch.tensor([47, 96, 61], dtype=torch.int32, device=dev)
    ref, ref_lse = tk.mqa_decode(q, k, v, None, starts, ends, 0, 0.25, True)
    for n_splits in (None, 1, 2, 3):
        o, lse = tk.mqa_decode(q, k, v, None, starts, ends, 0, 0.25, True, span=P - 40, n_splits=n_splits,
                               tiles={"BLOCK_N": 16})
        assert torch.allclose(o, ref, atol=1e-5, rtol=1e-5), n_splits
        assert torch.allclose(lse, ref_lse, atol=1e-5, rtol=1e-5), n_splits
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="span: expected None or an int >= 1"):
            tk.mqa_decode(q, k, v, None, starts, ends, 0, 0.25, True, span=bad)


def test_shared_prefix_all_members_split_over_the_span(triton_backend):
    """Every sequence in a group (the suffix pass's span is the capacity less the shortest
    prefix): the same output as reading per sequence, deterministic."""
    dev = triton_backend
    B, H, hd = 4, 8, 32
    cache = KVCache(1, B, 256, hd, page_size=16, device=dev)
    n0 = torch.tensor([150, 0, 100, 0], device=dev)
    cache.append(0, randn(B, 150, hd, device=dev), randn(B, 150, hd, device=dev), n0)
    cache.advance(n0)
    cache.fork(0, [1])
    cache.fork(2, [3])
    # (fork shares whole pages: prefixes of 144 and 96 tokens. Sequence 2 reads 154 keys past
    # its prefix: more than the capacity less the longest prefix, 112, rounded up to whole
    # 32-key blocks (128), so a span taken from the wrong prefix would drop keys)
    suffix = torch.tensor([3, 9, 150, 1], device=dev)
    cache.append(0, randn(B, 150, hd, device=dev), randn(B, 150, hd, device=dev), suffix)
    cache.advance(suffix)
    q = randn(B, H, hd, device=dev)
    shared = ops.mqa_decode(q, cache, 0, cache.lengths, shared_prefix=True)
    unshared = ops.mqa_decode(q, cache, 0, cache.lengths, shared_prefix=False)
    assert torch.allclose(shared, unshared, atol=1e-5, rtol=1e-5)
    assert torch.equal(ops.mqa_decode(q, cache, 0, cache.lengths, shared_prefix=True), shared)


# ------------------------------------------------------------------ custom ops, compile
def _op_args(page_size):
    cache, _, _ = fill_cache(2, [9, 30], 16, torch.float32, page_size)
    q = randn(2, 4, 16)
    return cache, q


@pytest.mark.parametrize("page_size", [None, 8])
def test_opcheck(page_size):
    cache, q = _op_args(page_size)
    starts = torch.tensor([0, 3], dtype=torch.int32)
    torch.library.opcheck(torch.ops.palm_fast.mqa_decode.default,
                          (q, cache.k, cache.v, cache.page_table, starts, cache.lengths, 0, 0.25, True))
    torch.library.opcheck(torch.ops.palm_fast.mqa_decode.default,
                          (q, cache.k, cache.v, cache.page_table, None, cache.lengths, 0, 0.25, False))
    B, T, H, hd = 2, 2, 4, 16
    inv = torch.rand(4)
    torch.library.opcheck(torch.ops.palm_fast.rope_append.default,
                          (randn(B, T, H, hd), randn(B, T, hd), randn(B, T, hd), cache.k.clone(),
                           cache.v.clone(), cache.page_table, cache.lengths,
                           torch.tensor([2, 1], dtype=torch.int32), None, inv, 0, False))


@pytest.mark.parametrize("page_size", [None, 8])
@pytest.mark.parametrize("max_len", [None, 2048])
def test_torch_compile_decode_step(page_size, max_len):
    """A decode step (rope_append + mqa_decode) under torch.compile(fullgraph=True) on CPU
    gives the eager result and writes the same cache. max_len=2048: K and V of 1 MiB each,
    on their huge-page storages (when they shared one buffer, the compiled paged step
    wrote a wrong V)."""
    B, H, hd = 2, 4, 16 if max_len is None else 64
    caches = []
    for _ in range(2):
        torch.manual_seed(1)
        if max_len is None:
            c, _, _ = fill_cache(B, [5, 9], hd, torch.float32, page_size)
        else:
            c = KVCache(1, B, max_len, hd, page_size=page_size)
            c.append(0, randn(B, 9, hd), randn(B, 9, hd))
            c.advance(9)
        caches.append(c)

    def step(q, k, v, cache):
        q_rot = ops.rope_append(q, k, v, cache, 0)
        return ops.mqa_decode(q_rot[:, 0].contiguous(), cache, 0, cache.lengths + 1)

    q, k, v = randn(B, 1, H, hd), randn(B, 1, hd), randn(B, 1, hd)
    eager = step(q, k, v, caches[0])
    compiled = torch.compile(step, fullgraph=True)(q, k, v, caches[1])
    assert torch.allclose(compiled, eager, atol=1e-6, rtol=1e-6)
    assert torch.equal(caches[0].k, caches[1].k)
    assert torch.equal(caches[0].v, caches[1].v)


def test_compiled_paged_decode_loop_does_not_recompile_per_page():
    """A compiled decode loop over a paged cache with its pages reserved: the page count
    ceil(end / page_size) traced in the allocation bookkeeping was a guard, so every page
    boundary recompiled; after 8 graphs fullgraph=True raised (at step 64 with 16-token pages)."""
    from torch._dynamo.utils import counters

    B, H, hd, ps, n = 2, 4, 16, 16, 100
    cache = KVCache(1, B, 256, hd, page_size=ps)
    cache.reserve(n)
    torch._dynamo.reset()
    counters.clear()

    def step(q, k, v, cache):
        q_rot = ops.rope_append(q, k, v, cache, 0)
        return ops.mqa_decode(q_rot[:, 0].contiguous(), cache, 0, cache.lengths + 1)

    cstep = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for _ in range(n):
            cstep(randn(B, 1, H, hd), randn(B, 1, hd), randn(B, 1, hd), cache)
            cache.advance(1)
    assert cache.host_lengths() == [n, n]
    assert counters["stats"]["unique_graphs"] <= 3


@requires_cuda
def test_cuda_graph_step():
    """A captured decode step replays correctly for other lengths (grid independent of them)."""
    B, H, hd = 2, 8, 64
    cache, _, _ = fill_cache(B, [100, 7], hd, torch.bfloat16, 16, device="cuda")
    cache.reserve(3)
    q = randn(B, H, hd, dtype=torch.bfloat16, device="cuda")
    lens = cache.lengths.clone()
    ops.mqa_decode(q, cache, 0, lens)  # warm-up, checks
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.mqa_decode(q, cache, 0, lens)
    lens.copy_(torch.tensor([103, 10], dtype=torch.int32))
    g.replay()
    assert torch.allclose(out.float(), ops.mqa_decode(q, cache, 0, lens).float(), atol=1e-2)


def test_append_head_dim_one_with_a_strided_last_dim():
    """hd = 1: the last dim's stride is irrelevant (one element); the Python checks accept
    it, and the C++ kernel used to reject it after pages were taken."""
    k, v = randn(2, 3, 2)[..., :1], randn(2, 3, 2)[..., 1:]
    c = KVCache(1, 2, 8, 1, page_size=4)
    c.append(0, k, v)
    c.advance(3)
    assert torch.equal(c.k[0, c.page_table[0, 0], :3], k[0])
    assert torch.equal(c.v[0, c.page_table[1, 0], :3], v[1])


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("page_size", [None, 16])
def test_decode_propagates_nan(page_size, backend, request):
    """A NaN (or an infinity: inf - inf) in one query row makes that row's output NaN, as the
    reference's; the other rows are unaffected. A NaN-dropping max (C++) and a "sum of
    weights > 0" test (Triton split and combine kernels) turned it into an 'empty' row: o = 0."""
    dev = request.getfixturevalue("triton_backend") if backend == "triton" else "cpu"
    B, H, hd, T = 2, 4, 64, 40
    cache = KVCache(1, B, 128, hd, page_size=page_size, device=dev)
    k, v = randn(B, T, hd, device=dev), randn(B, T, hd, device=dev)
    k[1, :, 7] = k[1, :, 7].abs() + 0.1   # (every key of sequence 1 positive in feature 7)
    cache.append(0, k, v)
    cache.advance(T)
    q = randn(B, H, hd, device=dev)
    want = ops.mqa_decode(q, cache, 0, cache.lengths)
    mask = torch.ones(B, H, dtype=torch.bool)
    mask[0, 1] = False
    for bad in (float("nan"), float("inf")):
        q[0, 1, 5] = bad
        got = ops.mqa_decode(q, cache, 0, cache.lengths).cpu()
        assert got[0, 1].isnan().all(), bad
        assert torch.equal(got[mask], want.cpu()[mask]), bad
    # Every score -inf (q = -inf against positive keys): the reference's softmax is NaN
    # (-inf - -inf); the C++ kernel gave an empty row's o = 0.
    q2 = q.clone()
    q2[1, 2, 7] = float("-inf")
    got = ops.mqa_decode(q2, cache, 0, cache.lengths).cpu()
    k1, v1 = (t[1:2, :, None].double().cpu() for t in (k, v))
    ref = attention(q2[1:2, None].double().cpu(), k1, v1, causal=False)
    assert ref[0, 0, 2].isnan().all() and got[1, 2].isnan().all()
    mask[1, 2] = False
    assert torch.equal(got[mask], ops.mqa_decode(q, cache, 0, cache.lengths).cpu()[mask])
    if backend == "triton":  # several splits (the combine kernel merging a NaN partial)
        from palm_fast.kernels import mqa_decode as tk
        o, lse = tk.mqa_decode(q, cache.k, cache.v, cache.page_table, None, cache.lengths,
                               0, hd ** -0.5, True, n_splits=3)
        assert o[0, 1].isnan().all() and lse[0, 1].isnan()
        torch.testing.assert_close(o.cpu()[mask], want.cpu()[mask])


def test_prefix_merge_in_torch_ops_empty_rows():
    """The shared-prefix merge torch.compile traces (torch ops): a row with neither a prefix
    (slot -1) nor suffix keys (lse -inf both) is 0, as the C++ merge and the Triton combine
    give (it was 0/0 = NaN); other rows match the C++ merge."""
    md = importlib.import_module("palm_fast.ops.mqa_decode")
    H, hd = 2, 8
    o_pre, lse_pre = randn(1, H, hd), randn(1, H)
    o_suf, lse_suf = randn(3, H, hd), randn(3, H)
    lse_suf[2] = float("-inf")
    o_suf[2] = 0.0
    slot = torch.tensor([0, 0, -1], dtype=torch.int32)
    got = md._prefix_merge(o_pre, lse_pre, slot, o_suf, lse_suf, torch.float32)
    want = cpp().prefix_merge_cpu(o_pre, lse_pre, slot, o_suf, lse_suf, torch.float32)
    assert torch.equal(got[2], torch.zeros(H, hd))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_cpp_decode_guard_refuses_negative_lengths():
    """Under torch.compile the value checks that read seq_lens are skipped (a host sync);
    the C++ kernel's own guard refused lengths past the cache but let a negative one
    through as an empty row (o = 0)."""
    cache, _, _ = fill_cache(2, [3, 5], 8, torch.float32)
    q = randn(2, 2, 8)
    ends = torch.tensor([3, -1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="out of range for sequence 1"):
        cpp().mqa_decode_cpu(q, cache.k, cache.v, None, None, ends, 0, 0.3, True)


@pytest.mark.parametrize("page_size", [None, 4])
def test_triton_decode_clamps_lengths_to_the_cache(page_size):
    """Under torch.compile the host checks of seq_lens are skipped: the Triton kernel clamps
    its key range to the cache (it read past the cache or the page table), as a length
    equal to the capacity would."""
    from palm_fast.kernels import mqa_decode as tk

    cache, _, _ = fill_cache(2, [6, 9], 8, torch.float32, page_size, device=TRITON_DEVICE)
    cap = cache.page_table.shape[1] * page_size if page_size else cache.k.shape[2]
    if page_size:   # every page allocated: the clamped range reads the same memory twice
        cache.reserve(torch.tensor([cap - 6, cap - 9], device=TRITON_DEVICE))
    q = randn(2, 4, 8, device=TRITON_DEVICE)
    args = (q, cache.k, cache.v, cache.page_table, None)
    def ends(v):
        return torch.tensor(v, dtype=torch.int32, device=TRITON_DEVICE)

    for bad, clamped in (([cap + 5, 9], [cap, 9]), ([6, 2 ** 30], [6, cap])):
        got = tk.mqa_decode(*args, ends(bad), 0, 0.3, True)
        want = tk.mqa_decode(*args, ends(clamped), 0, 0.3, True)
        for a, b in zip(got, want):   # (bitwise; the unwritten slots may hold NaN)
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_cpp_guards_on_empty_shapes_raise_instead_of_dividing_by_zero():
    """The registered ops skip the Python checks (``torch.ops.palm_fast.*``): zero query rows
    now return empty outputs, and a cache with zero tokens per page or a merge with zero
    heads raise RuntimeError. All four crashed the process (integer division by zero)."""
    i32 = torch.int32
    o, lse = torch.ops.palm_fast.mqa_decode(torch.randn(2, 0, 8), torch.randn(1, 2, 16, 8),
                                            torch.randn(1, 2, 16, 8), None, None,
                                            torch.tensor([3, 5], dtype=i32), 0, 1.0, False)
    assert o.shape == (2, 0, 8) and lse.shape == (2, 0)
    empty = torch.randn(1, 2, 0, 8)
    table = torch.zeros(1, 1, dtype=i32)
    with pytest.raises(RuntimeError, match="at least one token per page"):
        torch.ops.palm_fast.mqa_decode(torch.randn(1, 1, 8), empty, empty.clone(), table, None,
                                       torch.zeros(1, dtype=i32), 0, 1.0, False)
    with pytest.raises(RuntimeError, match="at least one token per page"):
        torch.ops.palm_fast.rope_append(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8),
                                        empty, empty.clone(), table, torch.zeros(1, dtype=i32),
                                        torch.zeros(1, dtype=i32), None, torch.ones(4), 0, False)
    with pytest.raises(RuntimeError, match="at least one head and one feature"):
        cpp().prefix_merge_cpu(torch.zeros(2, 4, 0), torch.zeros(2, 4), torch.tensor([0, 1], dtype=i32),
                               torch.zeros(2, 4, 0), torch.zeros(2, 4), torch.float32)


class _ExternalCacheStep(torch.nn.Module):
    def __init__(self, cache):
        super().__init__()
        self.cache = cache

    def forward(self, q, k, v):
        q_rot = ops.rope_append(q, k, v, self.cache, 0)
        return ops.mqa_decode(q_rot[:, 0].contiguous(), self.cache, 0, self.cache.lengths + 1)


class _ExternalCacheDecode(_ExternalCacheStep):
    def forward(self, q):
        return ops.mqa_decode(q, self.cache, 0, self.cache.lengths + 1)


class _ExternalCacheAppend(_ExternalCacheStep):
    def forward(self, k, v):
        self.cache.append(0, k, v)
        return k + 1


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"),
                    reason="this torch has no torch.compiler.is_exporting (2.6): not checked")
@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("page_size", [None, 4])
def test_export_over_an_external_cache_raises(page_size, strict):
    """torch.export of a decode step over a KVCache made outside the exported function
    captured the cache's k, v and lengths as constants: the exported program (after
    save / load) wrote into a private copy at a length that never moved, silently wrong
    from the second step (a paged cache failed later with "page_table: invalid page").
    (strict=True: Dynamo reports the error inside its own.)"""
    B, H, hd = 2, 4, 16
    args = (randn(B, 1, H, hd), randn(B, 1, hd), randn(B, 1, hd))
    match = "cache: exporting a decode step over a KVCache created outside the exported function"
    cache = KVCache(1, B, 32, hd, page_size=page_size)
    before = [cache.k.clone(), cache.lengths.clone()]
    with torch.no_grad():
        for mod, a in ((_ExternalCacheStep(cache), args), (_ExternalCacheDecode(cache), (args[0][:, 0],)),
                       (_ExternalCacheAppend(cache), args[1:])):
            with pytest.raises(Exception, match=match) as info:
                torch.export.export(mod, a, strict=strict)
            if not strict:
                assert info.type is NotImplementedError
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.lengths, before[1])
    assert cache.host_lengths() == [0, 0]
    # eager calls (and torch.compile: test_torch_compile_decode_step) over it still work
    with torch.no_grad():
        assert _ExternalCacheStep(cache)(*args).shape == (B, H, hd)


@pytest.mark.parametrize("page_size", [None, 4])
def test_export_with_the_cache_made_inside_the_function(page_size, tmp_path):
    """A cache created inside the exported function is the tracer's own: export works and
    the saved and loaded program gives the eager result for new inputs."""
    B, H, hd, T0 = 2, 4, 16, 5

    class Step(torch.nn.Module):
        def forward(self, k0, v0, q, k, v):
            cache = KVCache(1, B, 16, hd, page_size=page_size)
            cache.append(0, k0, v0)
            cache.advance(T0)
            q_rot = ops.rope_append(q, k, v, cache, 0)
            return ops.mqa_decode(q_rot[:, 0].contiguous(), cache, 0, cache.lengths + 1)

    def inputs(seed):
        torch.manual_seed(seed)
        return (randn(B, T0, hd), randn(B, T0, hd), randn(B, 1, H, hd), randn(B, 1, hd), randn(B, 1, hd))

    with torch.no_grad():
        ep = torch.export.export(Step(), inputs(0), strict=False)   # (strict: Dynamo refuses KVCache())
        torch.export.save(ep, tmp_path / "step.pt2")
        loaded = torch.export.load(tmp_path / "step.pt2").module()
        for seed in (1, 2):
            x = inputs(seed)
            assert torch.allclose(loaded(*x), Step()(*x), atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"),
                    reason="this torch has no torch.compiler.is_exporting (2.6): not checked")
def test_export_of_a_cache_registered_as_buffers_with_allow_export():
    """The "static cache" pattern: a contiguous cache made outside, its k, v and lengths the
    module's buffers, strict export. It worked before the external-cache check, which now
    refuses it unless ``cache.allow_export`` is set; with it the exported program (also
    saved and loaded) follows eager step by step."""
    import io

    B, H, hd, S = 2, 4, 16, 8

    class Step(torch.nn.Module):
        def __init__(self, cache):
            super().__init__()
            self.cache = cache
            self.register_buffer("k_cache", cache.k)
            self.register_buffer("v_cache", cache.v)
            self.register_buffer("lengths", cache.lengths)

        def forward(self, q, k, v):
            q_rot = ops.rope_append(q, k, v, self.cache, 0)
            o = ops.mqa_decode(q_rot[:, 0].contiguous(), self.cache, 0, self.cache.lengths + 1)
            self.cache.advance(1)
            return o

    def inputs(seed):
        torch.manual_seed(seed)
        return randn(B, 1, H, hd), randn(B, 1, hd), randn(B, 1, hd)

    with torch.no_grad():
        with pytest.raises(Exception, match="KVCache.allow_export"):
            torch.export.export(Step(KVCache(1, B, S, hd)), inputs(0), strict=True)
        cache = KVCache(1, B, S, hd)
        cache.allow_export = True
        ep = torch.export.export(Step(cache), inputs(0), strict=True)
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        buf.seek(0)
        prog = torch.export.load(buf).module()
        eager = Step(KVCache(1, B, S, hd))
        for seed in range(1, 5):
            x = inputs(seed)
            torch.testing.assert_close(prog(*x), eager(*x), rtol=1e-6, atol=1e-6)
