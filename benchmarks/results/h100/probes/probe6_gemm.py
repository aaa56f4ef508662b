"""GPU probe 6b: the SwiGLU region of the input projection as a TMA (persistent) GEMM vs cuBLAS."""
import sys, torch, triton
sys.path.insert(0, "scratch")
from triton.testing import do_bench
import tma_swiglu as T
def log(*a): print(*a, flush=True)
def alloc(size, align, stream): return torch.empty(size, device="cuda", dtype=torch.int8)
triton.set_allocator(alloc)
M, K, P = 16384, 2048, 8192
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) / 8
w = torch.randn(2 * P, K, device="cuda", dtype=torch.bfloat16) / 8
h = torch.empty(M, P, device="cuda", dtype=torch.bfloat16)
flop = 2 * M * K * 2 * P
t = do_bench(lambda: x @ w.t(), warmup=25, rep=100); tc = t
log(f"cuBLAS x @ w.T: {t:.4f} ms {flop/t/1e9:.0f} TFLOP/s")
ref = torch.nn.functional.silu((x @ w[1::2].t()).float()) * (x @ w[0::2].t()).float()
variants = []
for persist in (True, False):
    for (bm, bn, bk, st, nw) in ((128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 64, 64, 4, 8), (128, 64, 64, 5, 8),
                                 (128, 64, 64, 4, 4), (128, 128, 64, 3, 12), (256, 64, 64, 3, 8), (128, 128, 128, 2, 8)):
        for flatten in ((True, False) if persist else (False,)):
            variants.append(dict(BM=bm, BN=bn, BK=bk, stages=st, warps=nw, persist=persist, flatten=flatten))
variants.append(dict(BM=128, BN=128, BK=64, stages=3, warps=8, persist=True, flatten=False, ws=True))
variants.append(dict(BM=128, BN=64, BK=64, stages=4, warps=8, persist=True, flatten=False, ws=True))
for v in variants:
    try:
        T.run(x, w, h, **v)
        err = (h.float() - ref).abs().max().item()
        t = do_bench(lambda: T.run(x, w, h, **v), warmup=25, rep=100)
        log(f"tma {v}: {t:.4f} ms {flop/t/1e9:.0f} TFLOP/s {tc/t:.3f}x cuBLAS err {err:.3g}")
    except Exception as e:
        log(f"tma {v}: FAILED {type(e).__name__}: {str(e)[:300]}")
# the library's current block in_proj path for reference
# the current epilogue GEMM's SwiGLU region (kernels.projection, autotuned) at the same shape
H, Hk, hd, F = 16, 1, 128, P
from palm_fast.kernels.projection import pack_in_proj, in_proj
inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2, device="cuda").float() / hd))
w_in = torch.randn((H + 2 * Hk) * hd + 2 * F, K, device="cuda", dtype=torch.bfloat16) / 8
packed = pack_in_proj(w_in, inv_freq, H, Hk, hd, F, False)
xn = x
pos = torch.arange(M, device="cuda")
qkv = w_in[: (H + 2 * Hk) * hd]
f = lambda: in_proj(xn, packed, pos, H, Hk, hd, F, store_ff=False, qkv_weight=qkv, inv_freq=inv_freq, interleaved=False)
f()
t = do_bench(f, warmup=25, rep=100)
fl = 2 * M * K * w_in.shape[0]
log(f"current in_proj (qkv via cuBLAS + RoPE, SwiGLU epilogue GEMM): {t:.4f} ms {fl/t/1e9:.0f} TFLOP/s")
t2 = do_bench(lambda: xn @ w_in.t(), warmup=25, rep=100)
log(f"plain matmul same shape: {t2:.4f} ms {fl/t2/1e9:.0f} TFLOP/s; ratio {t2/t:.3f}")
tq = do_bench(lambda: xn @ qkv.t(), warmup=25, rep=100)
log(f"qkv part matmul alone: {tq:.4f} ms")
