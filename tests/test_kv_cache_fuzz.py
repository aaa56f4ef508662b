"""palm_fast.kv_cache.KVCache and palm_fast.ops.mqa_decode under seeded random operations,
checked after every one against a plain model of what the cache should hold.

The model: for every sequence and layer, the K and V rows the cache should show at indices
``[0, length)`` (tensors), and for a paged cache how many pages each sequence holds. The test
updates it from the calls it makes; it never copies it from the cache, except for the K rows
written by ``rope_append``, which are first checked against ``apply_rope``, then kept as the
kernel rounded them.

Operations (a step is the most frequent, then forks and invalid calls):

* step: random K/V ``[B, T, hd]`` appended to every layer with ``n_new`` None, an int, or a
  ragged int32 / int64 tensor; some from strided views, some written twice (``append`` does
  not move the lengths, so a second append overwrites the first); some steps through
  ``rope_append`` (default or explicit positions); a decode over ``lengths + n_new`` before
  the ``advance``, as the generation loop does it; then ``advance``;
* fork (paged): a whole, page-aligned or arbitrary prefix of a sequence into one or several
  others (reset first), so that later steps append to sequences sharing pages, some with a
  copied, partly filled last page;
* reset (all, an int, a list / tuple / tensor, with repeats), sometimes followed by a reserve
  for the emptied sequences, as a server does for new prompts; reserve (an int or a tensor);
* an invalid call, picked among those invalid in the current state (see ``invalid_calls``).

An append, rope_append, reserve or fork that would pass ``max_len`` or need more pages than
are free is made anyway and must be refused (seeds 1 and 2 give a paged cache a half and a
third of the pages its sequences could use). A refused call must raise the documented error
(type and message) and leave the cache bitwise unchanged (``test_kv_cache.snapshot``).

Checks after every operation:

* ``host_lengths()`` and ``lengths`` are the model's lengths, and every sequence's K and V,
  read through the page table, are the model's, bit for bit;
* paged: each page-table row holds the model's number of pages (distinct), then -1s; the
  reference counts count the rows holding each page and the free list is exactly the pages
  no row holds; a page held by two sequences is full in both (nobody writes it again);
  every prefix group has two or more sorted members, in no other group, whose rows start
  with its pages and whose lengths reach its ``n_tokens`` (a positive multiple of the page
  size); a fork shares the source's full pages and takes one new page per partial prefix;
* ``mqa_decode`` with ``shared_prefix`` False, True and None (random layer, heads, scale, and
  ``seq_lens`` = ``lengths`` or shorter, not below a shared prefix) against an fp64 softmax
  attention over the model's rows (max error at most 1e-5 for fp32, 1e-2 for bf16, of
  ``max(1, max |reference|)``; the same bound for ``rope_append``'s rotated q and k); None
  gives the same bits as False; decoding changes nothing in the cache.

A failure names the cache, the seed and the last operations. Each case ends by asserting
that it made steps and refused calls (and forks, paged): a guard against a change that
leaves the fuzzer quietly doing nothing.
"""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from conftest import close_rel, randn
from test_kv_cache import assert_same, snapshot

import palm_fast.ops as ops
from palm_fast.kv_cache import KVCache
from palm_fast.reference.functional import apply_rope, rope_inv_freq

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes (see conftest)

N_OPS = 120
# max |error| / max(1, max |reference|) of decode outputs and rotated rows (both round once
# to the dtype at the end); measured at most 0.1 (fp32) and 0.4 (bf16) of these
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def cached_rows(cache: KVCache, layer: int, b: int, start: int, stop: int):
    """K and V rows ``[start, stop)`` of sequence ``b`` in ``layer``, read through the storage."""
    if not cache.paged:
        return cache.k[layer, b, start:stop], cache.v[layer, b, start:stop]
    idx = torch.arange(start, stop)
    pages, slots = cache.page_table[b].long()[idx // cache.page_size], idx % cache.page_size
    return cache.k[layer, pages, slots], cache.v[layer, pages, slots]


class CacheFuzzer:
    def __init__(self, page_size: int | None, dtype: torch.dtype, seed: int):
        self.rng = rng = random.Random(f"kv-cache-fuzz {page_size} {dtype} {seed}")
        self.gen = torch.Generator().manual_seed(rng.randrange(2 ** 31))
        self.B, self.L, self.hd = rng.randint(2, 5), rng.randint(1, 2), rng.choice([8, 64])
        self.max_len = rng.randint(max(8, 2 * (page_size or 1)), 64)
        self.ps, self.dtype = page_size, dtype
        num_pages = None
        if page_size is not None and seed:
            every = self.B * -(-self.max_len // page_size)
            num_pages = max(1, every // (seed + 1))
        self.cache = KVCache(self.L, self.B, self.max_len, self.hd, dtype=dtype, page_size=page_size,
                             num_pages=num_pages)
        self.name = f"{self.cache!r}, seed {seed}"
        empty = torch.empty(0, self.hd, dtype=dtype)
        self.k = [[empty] * self.L for _ in range(self.B)]   # the model: rows per sequence, layer
        self.v = [[empty] * self.L for _ in range(self.B)]
        self.held = [0] * self.B                              # pages held per sequence (paged)
        self.log: list[str] = []
        self.done: Counter[str] = Counter()
        self.ops = {self.op_step: 6, self.op_reset: 1, self.op_reserve: 1, self.op_invalid: 2}
        if self.cache.paged:
            self.ops[self.op_fork] = 2

    def run(self, n_ops: int) -> None:
        for i in range(n_ops):
            op = self.rng.choices(list(self.ops), list(self.ops.values()))[0]
            try:
                op()
                self.check()
            except (Exception, pytest.fail.Exception) as e:
                last = "\n  ".join(self.log[-12:])
                raise AssertionError(f"{self.name}: operation {i} failed: {type(e).__name__}: {e}\n"
                                     f"last operations:\n  {last}") from e
        # the operations did happen (see the module docstring)
        assert self.done["step"] and self.done["refused"], self.done
        assert self.done["fork"] or not self.cache.paged, self.done

    # ------------------------------------------------------------------ model helpers
    def randn(self, *shape) -> torch.Tensor:
        return randn(*shape, dtype=self.dtype, generator=self.gen)

    def lengths(self) -> list[int]:
        return [rows[0].shape[0] for rows in self.k]

    def clear(self, seqs) -> None:
        for b in seqs:
            self.k[b] = [rows[:0] for rows in self.k[b]]
            self.v[b] = [rows[:0] for rows in self.v[b]]
            self.held[b] = 0

    def fits(self, ends: list[int]) -> bool:
        """Whether sequences can grow to ``ends`` tokens (max_len, free pages)."""
        if max(ends) > self.max_len:
            return False
        need = sum(max(0, -(-e // self.ps) - h) for e, h in zip(ends, self.held)) if self.ps else 0
        return need <= (self.cache.free_pages() if self.ps else 0)

    def hold(self, ends: list[int]) -> None:
        if self.ps:
            self.held = [max(h, -(-e // self.ps)) for h, e in zip(self.held, ends)]

    def refuse(self, what: str, exc: type, match: str, call) -> None:
        """``call`` must raise ``exc`` matching ``match`` and change nothing."""
        self.log.append(f"refused: {what}")
        self.done["refused"] += 1
        before = snapshot(self.cache)
        with pytest.raises(exc, match=match):
            call()
        self.assert_unchanged(before, "the refused call")

    def assert_unchanged(self, before: list, what: str) -> None:
        try:
            assert_same(snapshot(self.cache), before)
        except AssertionError as e:
            raise AssertionError(f"{what} changed the cache: {e}") from None

    def strided(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a view with a unit last stride, every other row of a larger buffer."""
        buf = self.randn(x.shape[0], x.shape[1], 2, x.shape[2])
        buf[:, :, 1] = x
        return buf[:, :, 1]

    # ------------------------------------------------------------------ operations
    def random_counts(self, T: int):
        """A random ``n_new`` for ``T`` new tokens and its per-sequence counts."""
        r = self.rng.random()
        if r < 0.2:
            return None, [T] * self.B
        if r < 0.35:
            n = self.rng.randint(0, T)
            return n, [n] * self.B
        n = [self.rng.randint(0, T) for _ in range(self.B)]
        return torch.tensor(n, dtype=self.rng.choice([torch.int32, torch.int64])), n

    def op_step(self) -> None:
        c, rng, B, hd = self.cache, self.rng, self.B, self.hd
        lens = self.lengths()
        # T up to the room left to the longest sequence (less often: to the shortest one)
        room = self.max_len - (min(lens) if rng.random() < 0.3 else max(lens))
        T = rng.randint(0, min(room, 2 * (self.ps or 4) + 3)) if rng.random() < 0.9 else rng.randint(0, 3)
        n_new, n = self.random_counts(T)
        ends = [x + y for x, y in zip(lens, n)]
        kv = [(self.randn(B, T, hd), self.randn(B, T, hd)) for _ in range(self.L)]
        rope = rng.random() < 0.2
        what = f"{'rope_append' if rope else 'append'}(T={T}, n_new={n_new!r}) to every layer"
        if not self.fits(ends):
            layer = rng.randrange(self.L)
            k, v = kv[layer]
            if rope:
                call = lambda: ops.rope_append(self.randn(B, T, 1, hd), k, v, c, layer, n_new=n_new)
            else:
                call = lambda: c.append(layer, k, v, n_new)
            self.refuse(f"{what} past max_len or the free pages (counts {n})", ValueError,
                        "n_new: (cache overflow|out of pages)", call)
            return
        self.log.append(what)
        self.done["step"] += 1
        for layer, (k, v) in enumerate(kv):
            if rng.random() < 0.15:
                k = self.strided(k)
            if rng.random() < 0.15:
                v = self.strided(v)
            if rope:
                new_k = self.rope_append(layer, k, v, n_new, lens, n)
            else:
                if rng.random() < 0.2:
                    c.append(layer, self.randn(B, T, hd), self.randn(B, T, hd), n_new)   # overwritten next
                c.append(layer, k, v, n_new)
                new_k = [k[b, :n[b]] for b in range(B)]
            for b in range(B):
                self.k[b][layer] = torch.cat((self.k[b][layer], new_k[b]))
                self.v[b][layer] = torch.cat((self.v[b][layer], v[b, :n[b]]))
        self.hold(ends)
        if rng.random() < 0.5:
            self.check_decode(c.lengths + torch.tensor(n, dtype=torch.int32))
        c.advance(T if n_new is None else n_new)

    def rope_append(self, layer, k, v, n_new, lens, n) -> list[torch.Tensor]:
        """``ops.rope_append`` of a random q; checks the rotated q and k against ``apply_rope``
        and returns each sequence's new K rows as the cache holds them."""
        B, T, hd = k.shape
        q = self.randn(B, T, self.rng.choice([1, 2]), hd)
        if self.rng.random() < 0.5:
            positions, pos = None, torch.tensor(lens)[:, None] + torch.arange(T)
        else:
            positions = pos = torch.randint(0, 4 * self.max_len, (B, T), generator=self.gen)
        q_rot = ops.rope_append(q, k, v, self.cache, layer, positions, n_new=n_new)
        inv_freq, tol = rope_inv_freq(hd), TOL[self.dtype]
        ok = T == 0 or close_rel(q_rot, apply_rope(q, pos, inv_freq), tol)
        assert ok, f"rope_append: rotated q of layer {layer}"
        want = apply_rope(k[:, :, None], pos, inv_freq)[:, :, 0]
        rows = []
        for b in range(B):
            got = cached_rows(self.cache, layer, b, lens[b], lens[b] + n[b])[0]
            ok = n[b] == 0 or close_rel(got, want[b, :n[b]], tol)
            assert ok, f"rope_append: rotated k of sequence {b} in layer {layer}"
            rows.append(got.clone())
        return rows

    def op_reserve(self) -> None:
        cap = 2 * (self.ps or 4)
        if self.rng.random() < 0.5:
            self.reserve(self.rng.randint(0, cap))
        else:
            self.reserve(torch.tensor([self.rng.randint(0, cap) for _ in range(self.B)]))

    def reserve(self, n_tokens) -> None:
        n = n_tokens.tolist() if isinstance(n_tokens, torch.Tensor) else [n_tokens] * self.B
        ends = [x + y for x, y in zip(self.lengths(), n)]
        if not self.fits(ends):
            self.refuse(f"reserve({n_tokens!r})", ValueError, "n_tokens: (cache overflow|out of pages)",
                        lambda: self.cache.reserve(n_tokens))
            return
        self.log.append(f"reserve({n_tokens!r})")
        self.cache.reserve(n_tokens)
        self.hold(ends)

    def op_reset(self) -> None:
        rng = self.rng
        if rng.random() < 0.1:
            seqs, which = None, list(range(self.B))
        else:
            which = rng.sample(range(self.B), rng.randint(1, self.B))
            if rng.random() < 0.2:
                which.append(which[0])
            if len(which) == 1 and rng.random() < 0.5:
                seqs = which[0]
            else:
                seqs = rng.choice([list, tuple, torch.tensor])(which)
        self.log.append(f"reset({seqs!r})")
        self.cache.reset(seqs)
        self.clear(set(which))
        if rng.random() < 0.3:   # pages for the next prompts, as a server would reserve them
            cap = 2 * (self.ps or 4)
            self.reserve(torch.tensor([rng.randint(1, cap) if b in which else 0 for b in range(self.B)]))

    def op_fork(self) -> None:
        c, rng, ps = self.cache, self.rng, self.ps
        lens = self.lengths()
        sources = [b for b in range(self.B) if lens[b]]
        if not sources:
            self.op_step()
            return
        src = rng.choice(sources)
        dsts = rng.sample([b for b in range(self.B) if b != src], rng.randint(1, self.B - 1))
        busy = [d for d in dsts if lens[d] or self.held[d]]
        if busy:
            self.log.append(f"reset({busy}) (before a fork)")
            c.reset(busy)
            self.clear(busy)
        r = rng.random()
        if r < 0.25:
            n_tokens = None
        elif r < 0.5:
            n_tokens = lens[src] // ps * ps or lens[src]
        else:
            n_tokens = rng.randint(1, lens[src])
        n_prefix = lens[src] if n_tokens is None else n_tokens
        n_full, rem = divmod(n_prefix, ps)
        dst = dsts[0] if len(dsts) == 1 and rng.random() < 0.5 else dsts
        what = f"fork({src}, {dst}, {n_tokens})"
        if rem and c.free_pages() < len(dsts):
            self.refuse(f"{what} with too few free pages", ValueError, "dst: out of pages",
                        lambda: c.fork(src, dst, n_tokens))
            return
        self.log.append(what)
        self.done["fork"] += 1
        free = c.free_pages()
        c.fork(src, dst, n_tokens)
        for d in dsts:
            self.k[d] = [rows[:n_prefix] for rows in self.k[src]]
            self.v[d] = [rows[:n_prefix] for rows in self.v[src]]
            self.held[d] = n_full + (rem > 0)
        table = c.page_table.tolist()
        for d in dsts:
            assert table[d][:n_full] == table[src][:n_full], f"fork: sequence {d} does not share src's pages"
        assert c.free_pages() == free - (len(dsts) if rem else 0), "fork: took the wrong number of pages"
        if n_full:
            assert any(g.n_tokens == n_full * ps and {src, *dsts} <= set(g.members)
                       for g in c.prefix_groups()), f"fork: no prefix group for it in {c.prefix_groups()}"

    def op_invalid(self) -> None:
        self.refuse(*self.rng.choice(self.invalid_calls()))

    def invalid_calls(self) -> list[tuple]:
        """(what, exception type, message regex, call) for calls invalid in the current state."""
        c, rng, B, L, hd = self.cache, self.rng, self.B, self.L, self.hd
        lens = self.lengths()
        k, v, q = self.randn(B, 1, hd), self.randn(B, 1, hd), self.randn(B, 2, hd)
        past_max = c.lengths.clone()
        past_max[rng.randrange(B)] = self.max_len + 1
        negative = torch.zeros(B, 1, dtype=torch.int64)
        negative[rng.randrange(B), 0] = -3
        minus_one = torch.tensor([0] * (B - 1) + [-1])
        calls = [
            ("append to layer L", ValueError, "layer", lambda: c.append(L, k, v)),
            ("append of fp16 rows", TypeError, "k: expected dtype", lambda: c.append(0, k.half(), v.half())),
            ("append of n_new > T", ValueError, "n_new", lambda: c.append(0, k, v, torch.full((B,), 2))),
            ("append of n_new -1", ValueError, "n_new", lambda: c.append(0, k, v, minus_one)),
            ("append of a view of the cache", ValueError, "k: expected a tensor that does not share memory",
             lambda: c.append(0, c.k[0].reshape(-1, hd)[:B, None], v)),
            ("advance past max_len", ValueError, "n_new: cache overflow",
             lambda: c.advance(self.max_len - min(lens) + 1)),
            ("advance by -1", ValueError, "n_new: expected values >= 0", lambda: c.advance(minus_one)),
            ("reset of sequence B", ValueError, "seqs: expected a sequence index", lambda: c.reset([0, B])),
            ("reset of sequence -1", ValueError, "seqs: expected a sequence index", lambda: c.reset(-1)),
            ("decode past max_len", ValueError, "seq_lens: expected values in",
             lambda: ops.mqa_decode(q, c, 0, past_max)),
            ("rope_append at a negative position", ValueError, "positions: expected values >= 0",
             lambda: ops.rope_append(self.randn(B, 1, 2, hd), k, v, c, 0, negative)),
            ("rope_append of q with head_dim + 2", ValueError, "q: expected shape",
             lambda: ops.rope_append(self.randn(B, 1, 2, hd + 2), k, v, c, 0)),
        ]
        if not c.paged:
            return calls + [("fork on a contiguous cache", ValueError, "fork: needs a paged cache",
                             lambda: c.fork(0, 1))]
        seq = rng.randrange(B)
        calls.append(("fork of a sequence into itself", ValueError, "dst: expected distinct",
                      lambda: c.fork(seq, [seq], 1)))
        short = [b for b in range(B) if self.held[b] * self.ps < self.max_len]
        if short:
            unheld, past_pages = rng.choice(short), c.lengths.clone()
            past_pages[unheld] = self.held[unheld] * self.ps + 1
            calls.append((f"decode of sequence {unheld} past its pages", ValueError,
                          f"seq_lens: sequence {unheld} reads .* pages for only",
                          lambda: ops.mqa_decode(q, c, 0, past_pages, shared_prefix=False)))
        if c.prefix_groups():
            g = rng.choice(c.prefix_groups())
            below = c.lengths.clone()
            below[g.members[0]] = g.n_tokens - 1
            calls.append(("decode below a shared prefix", ValueError,
                          f"seq_lens: sequence {g.members[0]} shares",
                          lambda: ops.mqa_decode(q, c, 0, below, shared_prefix=True)))
        full = [b for b in range(B) if lens[b]]
        empty = [b for b in range(B) if not lens[b] and not self.held[b]]
        reserved = [b for b in range(B) if not lens[b] and self.held[b]]
        if len(full) >= 2:
            calls.append(("fork into a non-empty sequence", ValueError, "dst: sequence .* is not empty",
                          lambda: c.fork(full[0], full[1], 1)))
        if full and reserved:
            calls.append(("fork into a sequence holding reserved pages", ValueError, "holds reserved pages",
                          lambda: c.fork(full[0], reserved[0], 1)))
        if empty:
            src = rng.choice([b for b in range(B) if b != empty[0]])
            calls.append((f"fork of {lens[src] + 1} tokens from sequence {src}", ValueError,
                          "n_tokens: expected <=", lambda: c.fork(src, empty[0], lens[src] + 1)))
        return calls

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        c, lens = self.cache, self.lengths()
        assert c.host_lengths() == lens and c.lengths.tolist() == lens, \
            f"lengths {c.lengths.tolist()} (host {c.host_lengths()}), model {lens}"
        if c.paged:
            self.check_pages(lens)
        for b in range(self.B):
            for layer in range(self.L):
                k, v = cached_rows(c, layer, b, 0, lens[b])
                want_k, want_v = self.k[b][layer], self.v[b][layer]
                same = torch.equal(k, want_k) and torch.equal(v, want_v)
                assert same, (
                    f"sequence {b}, layer {layer}: cached K/V differ from the model at tokens "
                    f"{((k != want_k) | (v != want_v)).any(-1).nonzero().flatten().tolist()}")
        self.check_decode()

    def check_pages(self, lens: list[int]) -> None:
        c, ps = self.cache, self.ps
        table = c.page_table.tolist()
        refs = Counter()
        for b, row in enumerate(table):
            held = self.held[b]
            pages = row[:held]
            assert min(pages, default=0) >= 0 and len(set(pages)) == held and set(row[held:]) <= {-1}, \
                f"sequence {b}: page-table row {row}, expected {held} distinct pages then -1"
            refs.update(pages)
        wrong = {p: (n, refs[p]) for p, n in enumerate(c._refcount) if n != refs[p]}
        assert not wrong, f"page: (refcount, rows holding it) {wrong}"
        unheld = [p for p in range(c.num_pages) if not refs[p]]
        free = sorted(c._free)
        assert free == unheld, (f"free list of {len(free)} for {len(unheld)} free pages: held "
                                f"{sorted(set(free) - set(unheld))}, lost {sorted(set(unheld) - set(free))}")
        for b, row in enumerate(table):
            for j, p in enumerate(row[:self.held[b]]):
                assert refs[p] == 1 or (j + 1) * ps <= lens[b], \
                    f"sequence {b}: shared page {p} (entry {j}) is not full ({lens[b]} tokens)"
        seen: set[int] = set()
        for g in c.prefix_groups():
            members = set(g.members)
            assert len(members) >= 2 and list(g.members) == sorted(members) and not seen & members, \
                f"prefix groups {c.prefix_groups()}"
            seen |= members
            assert g.n_tokens > 0 and g.n_tokens == len(g.pages) * ps, f"prefix group {g}"
            for m in g.members:
                assert tuple(table[m][:len(g.pages)]) == g.pages and lens[m] >= g.n_tokens, \
                    f"prefix group {g}: member {m} has {lens[m]} tokens, pages {table[m]}"

    def check_decode(self, seq_lens: torch.Tensor | None = None) -> None:
        """mqa_decode (shared_prefix False, True, None) against an fp64 softmax attention."""
        c, rng, B = self.cache, self.rng, self.B
        H, layer = rng.choice([1, 2, 3, 8]), rng.randrange(self.L)
        q = self.randn(B, H, self.hd)
        if seq_lens is None:
            if rng.random() < 0.6:
                seq_lens = c.lengths
            else:   # shorter reads, never below a shared prefix
                starts = {m: g.n_tokens for g in c.prefix_groups() for m in g.members}
                lens = [rng.randint(starts.get(b, 0), n) for b, n in enumerate(self.lengths())]
                seq_lens = torch.tensor(lens, dtype=torch.int32)
        scale = None if rng.random() < 0.7 else rng.uniform(0.05, 1.0)
        before = snapshot(c)
        outs = {sp: ops.mqa_decode(q, c, layer, seq_lens, scale=scale, shared_prefix=sp)
                for sp in (False, True, None)}
        self.assert_unchanged(before, "mqa_decode")
        want = torch.zeros(q.shape, dtype=torch.float64)
        for b, n in enumerate(seq_lens.tolist()):
            if n:
                k, v = self.k[b][layer][:n].double(), self.v[b][layer][:n].double()
                s = q[b].double() @ k.T * (self.hd ** -0.5 if scale is None else scale)
                want[b] = torch.softmax(s, -1) @ v
        for sp, o in outs.items():
            assert o.dtype == q.dtype and o.shape == q.shape, f"mqa_decode: o {o.dtype} {list(o.shape)}"
            ok = close_rel(o, want, TOL[self.dtype])
            assert ok, (
                f"mqa_decode(shared_prefix={sp}) of layer {layer}, H {H}, seq_lens {seq_lens.tolist()}, "
                f"scale {scale}: max error {(o.double() - want).abs().max().item():.3g}, "
                f"groups {c.prefix_groups()}")
        same = torch.equal(outs[None], outs[False])
        assert same, "mqa_decode: shared_prefix=None gives other bits than shared_prefix=False"


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("page_size", [None, 1, 3, 16], ids=["contiguous", "page1", "page3", "page16"])
def test_random_operations_match_the_model(page_size, dtype, seed):
    CacheFuzzer(page_size, dtype, seed).run(N_OPS)
