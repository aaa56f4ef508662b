"""palm_fast.kv_cache.KVCache: contiguous and paged storage, append / advance / reset,
fork (shared prefixes), and validation that leaves the cache bitwise unchanged."""
from __future__ import annotations

import pytest
import torch
from conftest import randn

from palm_fast.kv_cache import KVCache


def snapshot(cache: KVCache):
    """Everything a rejected call must leave as it was (bitwise)."""
    state = [cache.k.clone(), cache.v.clone(), cache.lengths.clone(), list(cache._host_lengths)]
    if cache.paged:
        state += [cache.page_table.clone(), [list(r) for r in cache._host_table],
                  list(cache._refcount), list(cache._free), list(cache._groups), list(cache._n_alloc)]
    return state


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x.flatten().view(torch.uint8), y.flatten().view(torch.uint8))  # bitwise
        else:
            assert x == y


def cache_tokens(cache: KVCache, layer: int, b: int, which: str = "k") -> torch.Tensor:
    """The cached rows [length, hd] of sequence b, read through the storage layout."""
    store = cache.k if which == "k" else cache.v
    n = cache.host_lengths()[b]
    if not cache.paged:
        return store[layer, b, :n]
    idx = torch.arange(n)
    pages = cache.page_table[b].long()[idx // cache.page_size]
    return store[layer, pages, idx % cache.page_size]


@pytest.mark.parametrize("page_size", [None, 1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_append_advance_ragged(page_size, dtype):
    L, B, T_max, hd = 2, 3, 37, 8
    cache = KVCache(L, B, T_max, hd, dtype=dtype, page_size=page_size)
    ref = {(layer, b): ([], []) for layer in range(L) for b in range(B)}
    steps = [(5, None), (3, torch.tensor([3, 0, 1])), (1, 1), (7, torch.tensor([2, 7, 0], dtype=torch.int32))]
    for T, n_new in steps:
        counts = [T] * B if n_new is None else ([n_new] * B if isinstance(n_new, int) else n_new.tolist())
        for layer in range(L):
            k, v = randn(B, T, hd, dtype=dtype), randn(B, T, hd, dtype=dtype)
            cache.append(layer, k, v, n_new)
            for b in range(B):
                ref[layer, b][0].append(k[b, :counts[b]])
                ref[layer, b][1].append(v[b, :counts[b]])
        cache.advance(n_new if n_new is not None else T)
    for layer in range(L):
        for b in range(B):
            k_ref = torch.cat(ref[layer, b][0])
            assert cache.lengths[b].item() == k_ref.shape[0] == cache.host_lengths()[b]
            assert torch.equal(cache_tokens(cache, layer, b, "k"), k_ref)
            assert torch.equal(cache_tokens(cache, layer, b, "v"), torch.cat(ref[layer, b][1]))
    assert cache.lengths.dtype == torch.int32


def test_paged_allocation_and_reset():
    cache = KVCache(1, 2, 40, 4, page_size=8, num_pages=6)
    cache.append(0, randn(2, 9, 4), randn(2, 9, 4))
    cache.advance(9)
    assert cache.free_pages() == 2
    assert (cache.page_table[:, :2] >= 0).all() and (cache.page_table[:, 2:] == -1).all()
    with pytest.raises(ValueError, match="out of pages"):
        cache.reserve(16)  # needs 2 more pages per sequence
    cache.reset(0)
    assert cache.free_pages() == 4 and cache.host_lengths() == [0, 9]
    assert (cache.page_table[0] == -1).all()
    cache.reset()
    assert cache.free_pages() == 6 and cache.lengths.tolist() == [0, 0]


def test_fork_shares_pages():
    cache = KVCache(2, 4, 64, 4, page_size=8)
    k, v = randn(4, 21, 4), randn(4, 21, 4)
    n0 = torch.tensor([21, 0, 0, 0])
    for layer in range(2):
        cache.append(layer, k, v, n0)
    cache.advance(n0)
    free = cache.free_pages()
    cache.fork(0, [1, 2], 20)  # 2 full pages shared, the partial third copied
    assert cache.free_pages() == free - 2
    assert cache.host_lengths() == [21, 20, 20, 0]
    assert torch.equal(cache.page_table[1, :2], cache.page_table[0, :2])
    assert cache.page_table[1, 2] != cache.page_table[0, 2]
    for layer in range(2):
        for b in (1, 2):
            assert torch.equal(cache_tokens(cache, layer, b), k[0, :20])
    (g,) = cache.prefix_groups()
    assert g.members == (0, 1, 2) and g.n_tokens == 16
    # Appending to a forked sequence never touches the shared pages.
    before = cache.k[:, cache.page_table[0, :2].long()].clone()
    cache.append(0, randn(4, 3, 4), randn(4, 3, 4), torch.tensor([0, 3, 3, 0]))
    cache.advance(torch.tensor([0, 3, 3, 0]))
    assert torch.equal(cache.k[:, cache.page_table[0, :2].long()], before)
    # Releasing members: pages come back only when no one shares them.
    cache.reset([1, 2])
    assert cache.free_pages() == free and len(cache.prefix_groups()) == 0
    cache.reset(0)
    assert cache.free_pages() == cache.num_pages


def _bad_calls(cache: KVCache):
    B, hd = cache.batch, cache.head_dim
    f16 = torch.float16
    k, v = randn(B, 2, hd), randn(B, 2, hd)
    yield lambda: cache.append(0, k, v), ValueError, "overflow"
    yield lambda: cache.append(3, randn(B, 1, hd), randn(B, 1, hd)), ValueError, "layer"
    yield lambda: cache.append(0, randn(B + 1, 1, hd), randn(B + 1, 1, hd)), ValueError, "k: expected shape"
    yield lambda: cache.append(0, randn(B, 1, hd + 1), randn(B, 1, hd + 1)), ValueError, "k: expected shape"
    yield lambda: cache.append(0, randn(B, 1, hd), randn(B, 2, hd)), ValueError, "v: expected shape"
    yield lambda: cache.append(0, randn(B, 1, hd, dtype=f16), randn(B, 1, hd)), TypeError, "k: expected dtype"
    yield lambda: cache.append(0, randn(B, 1, 2 * hd)[..., ::2], v[:, :1]), ValueError, "unit stride"
    yield lambda: cache.append(0, k[:, :1], v[:, :1], torch.tensor([2] * B)), ValueError, "n_new"
    yield lambda: cache.append(0, k[:, :1], v[:, :1], torch.tensor([1.0] * B)), TypeError, "n_new"
    yield lambda: cache.append(0, k[:, :1], v[:, :1], torch.tensor([-1] * B)), ValueError, "n_new"
    yield lambda: cache.advance(2), ValueError, "overflow"
    yield lambda: cache.advance(torch.tensor([0] * (B + 1))), ValueError, "n_new"
    yield lambda: cache.reset(B), ValueError, "seqs"
    yield lambda: cache.reset(True), TypeError, "seqs: expected None, an int or a list"
    yield lambda: cache.advance(-1), ValueError, "n_new: expected values >= 0, got -1"
    # a view of the cache's own K or V as the source (the kernels copy token by token: the
    # second token's slot was written before it was read, silently)
    shares = "expected a tensor that does not share memory with the cache"
    yield lambda: cache.append(0, cache.k[1][:B, :1], v[:, :1]), ValueError, "k: " + shares
    yield lambda: cache.append(0, k[:, :1], cache.v[0][:B, 2:3]), ValueError, "v: " + shares


@pytest.mark.parametrize("page_size", [None, 4])
def test_rejected_calls_leave_cache_unchanged(page_size):
    cache = KVCache(2, 3, 9, 8, page_size=page_size)
    cache.append(0, randn(3, 8, 8), randn(3, 8, 8))
    cache.append(1, randn(3, 8, 8), randn(3, 8, 8))
    cache.advance(8)  # one slot left
    before = snapshot(cache)
    for call, err, match in _bad_calls(cache):
        with pytest.raises(err, match=match):
            call()
        assert_same(snapshot(cache), before)


def test_paged_rejections_unchanged():
    cache = KVCache(1, 3, 32, 4, page_size=4, num_pages=6)
    cache.append(0, randn(3, 5, 4), randn(3, 5, 4), torch.tensor([5, 1, 0]))
    cache.advance(torch.tensor([5, 1, 0]))
    before = snapshot(cache)
    bad = [
        (lambda: cache.append(0, randn(3, 9, 4), randn(3, 9, 4)), ValueError, "out of pages"),
        (lambda: cache.fork(0, [1], 4), ValueError, "not empty"),
        (lambda: cache.fork(0, [0], 4), ValueError, "distinct"),
        (lambda: cache.fork(0, [2], 6), ValueError, "n_tokens"),
        (lambda: cache.fork(0, [], 4), ValueError, "at least one"),
        (lambda: cache.fork(5, [2], 4), ValueError, "src"),
        (lambda: cache.fork(0, True), TypeError, "dst: expected an int or a list"),
        (lambda: cache.fork(2, [1]), ValueError, "src: sequence 2 is empty"),
    ]
    for call, err, match in bad:
        with pytest.raises(err, match=match):
            call()
        assert_same(snapshot(cache), before)


def test_constructor_validation():
    with pytest.raises(ValueError, match="batch"):
        KVCache(1, 0, 8, 4)
    with pytest.raises(TypeError, match="dtype"):
        KVCache(1, 1, 8, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="num_pages"):
        KVCache(1, 1, 8, 4, num_pages=3)
    with pytest.raises(TypeError, match="page_size"):
        KVCache(1, 1, 8, 4, page_size=4.0)


@pytest.mark.parametrize("page_size", [None, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_storage_huge_page_buffers(page_size, dtype):
    """A CPU cache whose K (and V) is >= 1 MiB gets 2 MiB-aligned storages (transparent huge
    pages): zero-filled, contiguous, and K and V never share a storage."""
    from palm_fast.kv_cache import _thp_size

    cache = KVCache(2, 2, 1024, 128, dtype=dtype, page_size=page_size)
    k, v = cache.k, cache.v
    assert k.is_contiguous() and v.is_contiguous() and k.shape == v.shape
    assert k.device == v.device == cache.device
    assert not k.any() and not v.any()
    assert k.untyped_storage().data_ptr() != v.untyped_storage().data_ptr()
    huge = _thp_size()
    if huge and 2 * k.nbytes >= huge:
        assert k.data_ptr() % huge == 0 and v.data_ptr() % huge == 0
    k.fill_(1.0)
    assert not v.any()
    # the cache works as before on these storages
    cache.reset()
    kk, vv = randn(2, 5, 128, dtype=dtype), randn(2, 5, 128, dtype=dtype)
    cache.append(0, kk, vv)
    cache.advance(5)
    if page_size is None:
        torch.testing.assert_close(cache.k[0, :, :5], kk, rtol=0, atol=0)
        torch.testing.assert_close(cache.v[0, :, :5], vv, rtol=0, atol=0)


def test_small_cpu_cache_uses_plain_tensors():
    cache = KVCache(1, 1, 16, 8)  # 512 bytes each: two ordinary tensors
    for t in (cache.k, cache.v):
        assert t.untyped_storage().nbytes() == t.nbytes and not t._is_view()
    assert not cache.k.any() and not cache.v.any()


def test_large_cpu_cache_under_default_device_and_fake_mode():
    """The huge-page path allocates on the cache's device whatever the default device, and
    falls back to torch.zeros under a fake tensor mode (no data pointer to align)."""
    with torch.device("meta"):
        cache = KVCache(1, 2, 1024, 128, device="cpu")
    assert cache.k.device.type == "cpu" and cache.v.device.type == "cpu"
    assert not cache.k.any()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = KVCache(1, 2, 1024, 128)
        assert fake.k.shape == (1, 2, 1024, 128)


@pytest.mark.parametrize("page_size", [None, 4])
def test_save_and_load_after_decoding(page_size, tmp_path):
    """torch.save of a cache that mqa_decode has used (its validation memo holds weak
    references, which could not be pickled); the loaded cache decodes the same."""
    from palm_fast.ops import mqa_decode

    B, hd = 2, 8
    c = KVCache(1, B, 12, hd, page_size=page_size)
    c.append(0, torch.randn(B, 5, hd), torch.randn(B, 5, hd))
    c.advance(torch.tensor([5, 3]))
    q = torch.randn(B, 4, hd)
    want = mqa_decode(q, c, 0, c.lengths)
    torch.save(c, tmp_path / "cache.pt")
    loaded = torch.load(tmp_path / "cache.pt", weights_only=False)
    assert torch.equal(mqa_decode(q, loaded, 0, loaded.lengths), want)
    assert torch.equal(mqa_decode(q, c, 0, c.lengths), want)


@pytest.mark.parametrize("page_size", [None, 4])
def test_cache_made_under_inference_mode_works_outside_it(page_size):
    """A cache built under torch.inference_mode() held inference tensors: its in-place updates
    then raised outside that mode (torch's RuntimeError), after the host lengths, the page
    refcounts or the free list had moved; a retry advanced twice."""
    with torch.inference_mode():
        c = KVCache(1, 3, 16, 8, page_size=page_size)
    k, v = torch.randn(3, 6, 8), torch.randn(3, 6, 8)
    with torch.no_grad():
        c.append(0, k, v, n_new=torch.tensor([6, 6, 6]))
        c.advance(6)
        assert c.host_lengths() == c.lengths.tolist() == [6, 6, 6]
        if page_size:
            c.reset(1)
            c.fork(0, [1])
            assert c.page_table[1, 0] == c.page_table[0, 0]
            assert c.host_lengths() == c.lengths.tolist() == [6, 6, 6]
        c.reset()
        assert c.host_lengths() == c.lengths.tolist() == [0, 0, 0]


def test_append_from_a_copy_of_the_cache_slots():
    """What the refused aliased append (see _bad_calls) should have done, done with a copy:
    slots 2, 3 take the rows slots 1, 2 held before the call."""
    cache = KVCache(1, 1, 8, 4)
    rows = torch.arange(8.0).view(1, 2, 4) + 1
    cache.append(0, rows, -rows)
    cache.advance(2)
    src_k, src_v = cache.k[0][:, 1:3].clone(), cache.v[0][:, 1:3].clone()
    cache.append(0, src_k, src_v)
    assert torch.equal(cache.k[0][:, 2:4], src_k) and torch.equal(cache.v[0][:, 2:4], src_v)


@pytest.mark.parametrize("page_size", [None, 4])
def test_calls_under_another_default_device(page_size):
    """The cache's host-side tensors (the page table and lengths it copies to its device,
    the record it compares them with) are built on the CPU whatever
    torch.set_default_device says ("meta" here, standing in for "cuda"): they were made on
    the default device, so reserve / reset / fork / advance failed after the host state
    had moved, the device table no longer matched it, and every later append raised."""
    import numpy as np

    def run(default):
        torch.manual_seed(0)
        cache = KVCache(2, 3, 16, 8, page_size=page_size)
        kv = [(randn(3, 4, 8), randn(3, 4, 8)) for _ in range(3)]
        one = torch.ones(3, dtype=torch.int32)
        torch.set_default_device(default)
        try:
            cache.reserve(5)
            for layer in range(2):
                cache.append(layer, *kv[0])
            cache.advance(np.int64(3))            # (a non-int count: copied from the host)
            cache.lengths.add_(0)                 # (version moved: compared with the record)
            cache.append(0, *kv[1], n_new=one)
            cache.advance(one)
            if page_size is not None:
                cache.reset([1, 2])
                cache.fork(0, [1, 2])
            cache.reset([0])
            cache.append(1, *kv[2])
            cache.advance(2)
        finally:
            torch.set_default_device(None)
        return cache

    want, got = run(None), run("meta")
    assert_same(snapshot(got), snapshot(want))
    assert got.lengths.device.type == "cpu" and got.host_lengths() == want.host_lengths()
    if page_size is not None:
        assert got.page_table.tolist() == got._host_table


def _state(c):
    """The cache's lengths and pages (host and device; a free page's count is not part of
    it: it is never read, see _check_consistent for the counts of used pages)."""
    return (c.host_lengths(), c.lengths.tolist(),
            None if not c.paged else ([list(r) for r in c._host_table], c.page_table.tolist(),
                                      sorted(c._free), list(c._n_alloc),
                                      [(g.members, g.n_tokens, g.pages) for g in c.prefix_groups()]))


def _check_consistent(c):
    """The host record and the device tensors agree, and every page is free or referenced
    (by as many rows as its count), never both."""
    assert c.host_lengths() == c.lengths.tolist()
    if c.paged:
        assert [list(r) for r in c._host_table] == c.page_table.tolist()
        refs = {}
        for row in c._host_table:
            for p in row:
                if p >= 0:
                    refs[p] = refs.get(p, 0) + 1
        assert not set(refs) & set(c._free) and set(refs) | set(c._free) == set(range(c.num_pages))
        assert all(c._refcount[p] == n for p, n in refs.items())


@pytest.mark.parametrize("page_size", [None, 4])
def test_an_interrupted_cache_method_leaves_the_old_or_the_new_state(page_size):
    """A KeyboardInterrupt (Ctrl-C, a signal-based timeout) inside reset / advance / fork /
    reserve / an append that allocates pages left the host record changed and the device
    lengths or page table not: an interrupted reset kept the device length, and the reset
    sequence went on attending over its old tokens, silently. The interrupt is raised here
    at every call the method makes, in turn: each time the lengths and the pages are each in
    their old state or their new one, the record and the tensors agree, and the next decode
    step runs."""
    import copy
    import sys

    import palm_fast.kv_cache
    from palm_fast import ops

    kv_file = palm_fast.kv_cache.__file__

    torch.manual_seed(0)
    base = KVCache(1, 3, 32, 8, page_size=page_size)
    with torch.no_grad():
        n0 = torch.tensor([10, 6, 0], dtype=torch.int32)
        base.append(0, torch.randn(3, 10, 8), torch.randn(3, 10, 8), n0)
        base.advance(n0)
    calls = [("reset", lambda c: c.reset([1])), ("advance", lambda c: c.advance(3)),
             ("advance per sequence", lambda c: c.advance(torch.tensor([1, 5, 2]))),
             ("append", lambda c: c.append(0, torch.randn(3, 5, 8), torch.randn(3, 5, 8)))]
    if page_size:
        calls += [("fork", lambda c: c.fork(0, [2], 6)), ("reserve", lambda c: c.reserve(7))]
    for name, fn in calls:
        old = _state(base)
        new_cache = copy.deepcopy(base)
        with torch.no_grad():
            fn(new_cache)
        new = _state(new_cache)
        n, interrupted = 0, True
        while interrupted:
            n += 1
            c = copy.deepcopy(base)
            seen = [0]

            def prof(frame, event, arg, n=n, seen=seen):
                # (calls made from the cache's own code only: an interrupt elsewhere, e.g. in
                # torch.no_grad's __enter__, would leave torch's global state behind)
                if event in ("call", "c_call") and frame.f_code.co_filename == kv_file \
                        and arg is not sys.setprofile:
                    seen[0] += 1
                    if seen[0] == n:
                        sys.setprofile(None)
                        raise KeyboardInterrupt

            with torch.no_grad():
                sys.setprofile(prof)
                try:
                    fn(c)
                    interrupted = False
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.setprofile(None)
            _check_consistent(c)
            got = _state(c)   # (an advance may stop with its pages allocated, its lengths not)
            assert got[:2] in (old[:2], new[:2]) and got[2:] in (old[2:], new[2:]), (name, n)
            with torch.no_grad():   # the next step is accepted and runs
                q = ops.rope_append(torch.randn(3, 1, 2, 8), torch.randn(3, 1, 8), torch.randn(3, 1, 8), c, 0)
                ops.mqa_decode(q[:, 0].contiguous(), c, 0, c.lengths + 1)
        assert n > 3, name   # (the method was interrupted at several points)
