"""GPU probe (written in the ninth session, not yet run): where the shared-prefix decode's
time goes, and which tiles suit its prefix pass.

The bench's shape (issue 5): 64 sequences forked from one 4096-token prompt, 128 tokens each
after it, 48 heads x 256, bf16, pages of 256. The prefix pass is one "sequence" of
64 x 48 = 3072 query rows over the 4096 shared keys: 12.9 GFLOP, compute-bound (the default
tiles are sized for bandwidth-bound decode: 64 rows, 32 keys, 4 warps).

Prints, per line: what was timed, the median of triton.testing.do_bench, and TFLOP/s (the
prefix pass) or the time vs the unshared decode (whole calls, CUDA-graph replays).
Run: python benchmarks/results/h100/probes/shared_prefix_tiles.py
"""
import itertools

import torch
from triton.testing import do_bench

from palm_fast.benchmarks.bench_decode import shared_prefix_cache
from palm_fast.kernels import mqa_decode as tk
from palm_fast.ops import mqa_decode


def log(*a):
    print(*a, flush=True)


n_seq, H, hd, prefix, suffix, page, dt = 64, 48, 256, 4096, 128, 256, torch.bfloat16
cache = shared_prefix_cache(n_seq, prefix, suffix, hd, dt, "cuda", page)
q = torch.randn(n_seq, H, hd, device="cuda", dtype=dt)
lens = cache.lengths
scale = hd ** -0.5


def graphed(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def bench(fn):
    return do_bench(fn, warmup=25, rep=200)


# Whole calls, graph-replayed (no host cost), as generate would run them.
t_un = bench(graphed(lambda: mqa_decode(q, cache, 0, lens, shared_prefix=False)))
t_sh = bench(graphed(lambda: mqa_decode(q, cache, 0, lens, shared_prefix=True)))
log(f"whole call, graph: unshared {t_un * 1e3:.1f} us, shared {t_sh * 1e3:.1f} us ({t_un / t_sh:.2f}x)")
t_un_e = bench(lambda: mqa_decode(q, cache, 0, lens, shared_prefix=False))
t_sh_e = bench(lambda: mqa_decode(q, cache, 0, lens, shared_prefix=True))
log(f"whole call, eager: unshared {t_un_e * 1e3:.1f} us, shared {t_sh_e * 1e3:.1f} us")

# The shared path's passes, as ops.mqa_decode runs them.
group_seq, group_len, rows, starts, slot = cache.decode_meta()
G, M = rows.shape
q_pre = q[rows.clamp(min=0).long()].reshape(G, M * H, hd).contiguous()
table_pre = cache.page_table[group_seq.long()].contiguous()
flop = 4 * q_pre.shape[1] * prefix * hd


def prefix_pass(**kw):
    return tk.mqa_decode(q_pre, cache.k, cache.v, table_pre, None, group_len, 0, scale, True, **kw)


def suffix_pass():
    return tk.mqa_decode(q, cache.k, cache.v, cache.page_table, starts, lens, 0, scale, True)


ref_o, ref_lse = prefix_pass()
t = bench(graphed(prefix_pass))
cfg = tk.decode_config(G, M * H, hd, table_pre.shape[1] * page, tk.sm_count(q.device), 2,
                       tk.smem_per_block(q.device), paged=True)
log(f"prefix pass, default tiles {cfg}: {t * 1e3:.1f} us, {flop / t / 1e9:.0f} TFLOP/s")
log(f"suffix pass: {bench(graphed(suffix_pass)) * 1e3:.1f} us")
merged = graphed(lambda: tk.mqa_decode(q, cache.k, cache.v, cache.page_table, starts, lens, 0, scale, False,
                                       prefix=(ref_o, ref_lse, slot)))
log(f"suffix pass + prefix merge in its combine (as the op runs it): {bench(merged) * 1e3:.1f} us")

# Tile sweep of the prefix pass (each checked against the default's output).
for block_r, block_n, warps, stages, splits in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3),
                                                                 (None, 4, 8, 16)):
    tiles = dict(BLOCK_R=block_r, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    try:
        o, lse = prefix_pass(tiles=tiles, n_splits=splits)
        err = (o - ref_o).abs().max().item()
        t = bench(graphed(lambda: prefix_pass(tiles=tiles, n_splits=splits)))
        log(f"prefix pass {tiles} n_splits={splits}: {t * 1e3:.1f} us, {flop / t / 1e9:.0f} TFLOP/s, "
            f"max |o - default| {err:.2e}")
    except Exception as e:  # out of shared memory / registers: say so and go on
        log(f"prefix pass {tiles} n_splits={splits}: failed: {type(e).__name__}: {str(e)[:120]}")
