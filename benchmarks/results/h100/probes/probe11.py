"""GPU probe 11 (written in the twentieth session, which had no GPU; not yet run): the
changes that session made from compiled-kernel evidence alone (ptxas / cuobjdump for sm_90),
each timed against the configuration it replaced, in one process (about a minute).

1. LayerNorm forward, bf16, 16384 rows, N in {4096, 8192, 18432}: the product's graph
   (normalises d0 - c; 48 bytes of spills at 18432 on Triton 3.6) against the graph it
   replaced (normalises x - mean; 304 bytes), built here from the same primitives. The
   seventeenth session measured 98% of copy at 18432 before the mean correction, the
   nineteenth 92.8% with it.
2. add + LayerNorm, bf16, three inputs, N in {4096, 8192, 18432}: the same graph pair (the
   y_sum store now comes before the reductions in either).
3. Decode with an fp32 cache (16 x 128 and 48 x 256, B=8, T=4096): the new tiles (8 warps,
   <= 32 rows, 16 / 32 keys: no spills) against the bf16 tiles it used before (4 warps;
   704-12,416 bytes of spills per thread).
4. Shared prefix (64 x 48 x 256, 4096 + 128, pages of 256): the whole call, graph-replayed,
   shared vs unshared (was 130 vs 97 us), and the prefix pass with the new default tiles
   against the old ones (was 73.1 / 86.9 us in the sweep).
Run: python benchmarks/results/h100/probes/probe11.py
"""
import torch
from triton.testing import do_bench

from palm_fast.benchmarks.bench_decode import _Graphed, shared_prefix_cache
from palm_fast.fusion import Graph, compile_graph, expanders
from palm_fast.kernels import mqa_decode as tk
from palm_fast.ops import mqa_decode


def log(*a):
    print(*a, flush=True)


def old_layer_norm_graph(add: bool) -> Graph:
    """The mean-corrected forward as it was before (y from x - mean, x held to the end)."""
    g = Graph("old_add_layer_norm_fwd" if add else "old_layer_norm_fwd")
    x = g.input("x", "row")
    if add:
        x = g.cast(g.add(g.add(x, g.input("a", "row")), g.input("m", "row")), "bfloat16")
    weight = g.input("weight", "col")
    eps = g.input("eps", "scalar")
    inv_n = g.const(1.0, n_pow=-1)
    mean0 = g.mul(g.sum(x), inv_n)
    d0 = g.sub(x, mean0)
    ss = g.sum(g.mul(d0, d0))
    s1 = g.sum(d0)
    c = g.mul(s1, inv_n)
    mean = g.add(mean0, c)
    var = g.binary("max", g.mul(g.sub(ss, g.mul(c, s1)), inv_n), g.const(0.0))
    rstd = g.rsqrt(g.add(var, eps))
    g.output("y", g.mul(g.mul(g.sub(x, mean), rstd), weight), "x")
    if add:
        g.output("y_sum", x, "x")
    g.output("mean", mean)
    g.output("rstd", rstd)
    return g


def copy_gbs(nbytes):
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / do_bench(lambda: dst.copy_(src), warmup=25, rep=200) / 1e6


dt, M = torch.bfloat16, 16384
for N in (4096, 8192, 18432):
    x = torch.randn(M, N, device="cuda", dtype=dt)
    w = torch.randn(N, device="cuda", dtype=dt)
    peak = copy_gbs(M * N * 2)
    new = compile_graph(expanders.layer_norm_fwd(False, True), "full")
    old = compile_graph(old_layer_norm_graph(False), "full")
    ra, rb = new(x=x, weight=w, eps=1e-5), old(x=x, weight=w, eps=1e-5)
    err = (ra["y"].float() - rb["y"].float()).abs().max().item()
    for name, cg in (("new", new), ("old", old), ("new", new), ("old", old)):
        t = do_bench(lambda: cg(x=x, weight=w, eps=1e-5), warmup=25, rep=200)
        log(f"LN fwd N={N} {name}: {t * 1e3:.1f} us, {2 * M * N * 2 / t / 1e6 / peak * 100:.1f}% of copy "
            f"(max |new - old| {err:.2e})")
    a, m = torch.randn_like(x), torch.randn_like(x)
    new = compile_graph(expanders.add_layer_norm_fwd(True, False, "bfloat16", True), "full")
    old = compile_graph(old_layer_norm_graph(True), "full")
    for name, cg in (("new", new), ("old", old), ("new", new), ("old", old)):
        t = do_bench(lambda: cg(x=x, a=a, m=m, weight=w, eps=1e-5), warmup=25, rep=200)
        log(f"add+LN fwd N={N} {name}: {t * 1e3:.1f} us, {5 * M * N * 2 / t / 1e6 / peak * 100:.1f}% of copy")

for H, hd in ((16, 128), (48, 256)):
    B, T = 8, 4096
    k = torch.randn(1, B, T, hd, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(B, H, hd, device="cuda")
    ends = torch.full((B,), T, dtype=torch.int32, device="cuda")
    # the configuration fp32 caches had before (the bf16 one: one row block, 132 // 8 splits)
    old = dict(tiles=dict(BLOCK_R=min(64, max(16, 1 << (H - 1).bit_length())), BLOCK_N=64 if hd <= 128 else 32,
                          num_warps=4), n_splits=16)
    for name, kw in (("new", {}), ("old", old), ("new", {}), ("old", old)):
        t = do_bench(lambda: tk.mqa_decode(q, k, v, None, None, ends, 0, hd ** -0.5, False, **kw),
                     warmup=10, rep=100)
        log(f"fp32 decode {H}x{hd} B={B} T={T} {name}: {t * 1e3:.1f} us, "
            f"{2 * B * T * hd * 4 / t / 1e6:.0f} GB/s")

n_seq, H, hd, prefix, suffix, page = 64, 48, 256, 4096, 128, 256
cache = shared_prefix_cache(n_seq, prefix, suffix, hd, dt, "cuda", page)
q = torch.randn(n_seq, H, hd, device="cuda", dtype=dt)


def graphed(fn):
    """fn captured once as a CUDA graph (the bench's helper); returns its replay."""
    g = _Graphed(lambda _: fn())
    return lambda: g(q)


t_un = do_bench(graphed(lambda: mqa_decode(q, cache, 0, cache.lengths, shared_prefix=False)), rep=200)
t_sh = do_bench(graphed(lambda: mqa_decode(q, cache, 0, cache.lengths, shared_prefix=True)), rep=200)
log(f"shared prefix, graph: unshared {t_un * 1e3:.1f} us, shared {t_sh * 1e3:.1f} us ({t_un / t_sh:.2f}x)")
# the two passes' inputs, as ops.mqa_decode builds them
_, group_len, rows, starts, _ = cache.decode_meta()
row_idx, seq_idx = cache.decode_index()
q_pre = q.index_select(0, row_idx).view(rows.shape[0], -1, hd)
table_pre = cache.page_table.index_select(0, seq_idx)
flop = 4 * q_pre.shape[1] * prefix * hd
for name, kw in (("new default", {}), ("old default", dict(tiles=dict(BLOCK_R=64, BLOCK_N=32, num_warps=4),
                                                          n_splits=5))):
    t = do_bench(graphed(lambda: tk.mqa_decode(q_pre, cache.k, cache.v, table_pre, None, group_len, 0,
                                               hd ** -0.5, True, **kw)), rep=200)
    log(f"prefix pass, {name} tiles: {t * 1e3:.1f} us, {flop / t / 1e9:.0f} TFLOP/s")
t = do_bench(graphed(lambda: tk.mqa_decode(q, cache.k, cache.v, cache.page_table, starts, cache.lengths, 0,
                                           hd ** -0.5, True)), rep=200)
log(f"suffix pass: {t * 1e3:.1f} us (was 42.3)")
