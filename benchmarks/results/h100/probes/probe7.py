"""GPU probe 7: the input projection's pieces with the TMA SwiGLU path; LN forward at 4096
with several steps per program; LN backward defaults at 18432."""
import torch
from triton.testing import do_bench
from palm_fast.kernels import projection as kp
from palm_fast.kernels.rope import rope
from palm_fast.fusion import expanders
from palm_fast.fusion.codegen import CompiledGraph
def log(*a): print(*a, flush=True)
def bench(f): return do_bench(f, warmup=25, rep=100)
M, K, H, Hk, hd, F = 16384, 2048, 16, 1, 128, 8192
dt = torch.bfloat16
inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2, device="cuda").float() / hd))
w_in = torch.randn((H + 2 * Hk) * hd + 2 * F, K, device="cuda", dtype=dt) / 8
packed = kp.pack_in_proj(w_in, inv_freq, H, Hk, hd, F, False)
xn = torch.randn(M, K, device="cuda", dtype=dt)
pos = torch.arange(M, device="cuda")
qkv_w = w_in[: (H + 2 * Hk) * hd]
fl = 2 * M * K * w_in.shape[0]
tp = bench(lambda: xn @ w_in.t()); log(f"plain matmul {tp:.4f} ms {fl/tp/1e9:.0f} TFLOP/s")
for tma in (None, False):
    for sff in (False, True):
        f = lambda: kp.in_proj(xn, packed, pos, H, Hk, hd, F, store_ff=sff, qkv_weight=qkv_w, inv_freq=inv_freq, interleaved=False, tma=tma)
        f(); t = bench(f)
        log(f"in_proj tma={tma} store_ff={sff}: {t:.4f} ms {fl/t/1e9:.0f} TFLOP/s ratio {tp/t:.3f}")
q = torch.empty(M, H * hd, device="cuda", dtype=dt); k = torch.empty(M, Hk * hd, device="cuda", dtype=dt); v = torch.empty_like(k)
t = bench(lambda: kp._qkv_gemm_rope(xn, qkv_w, inv_freq, pos, False, q, k, v, H, Hk, hd)); log(f"qkv gemm + rope + v copy: {t:.4f} ms")
t = bench(lambda: xn @ qkv_w.t()); log(f"qkv gemm alone: {t:.4f} ms")
proj = xn @ qkv_w.t()
HQ, HKV = H * hd, Hk * hd
t = bench(lambda: rope(proj[:, :HQ].view(1, M, H, hd), proj[:, HQ:HQ + HKV].view(1, M, Hk, hd), inv_freq, pos.view(1, M), pos_is_offset=False, interleaved=False, q_out=q.view(1, M, H, hd), k_out=k.view(1, M, Hk, hd)))
log(f"rope alone: {t:.4f} ms ({(2*M*(HQ+HKV)*2)/t/1e6:.0f} GB/s)")
t = bench(lambda: v.copy_(proj[:, HQ + HKV:])); log(f"v copy alone: {t:.4f} ms")
h = torch.empty(M, F, device="cuda", dtype=dt); ff = torch.empty(M, 2 * F, device="cuda", dtype=dt)
w_ff = packed.w_a.as_strided((2 * F, K), (K, 1), packed.w_a.storage_offset() + 2 * packed.p_qkv * K)
for cfg in ({}, dict(num_stages=4), dict(GROUP_M=16), dict(BN=64, num_stages=4)):
    t = bench(lambda: kp._swiglu_tma_launch(xn, w_ff, h, ff, False, cfg)); log(f"swiglu tma {cfg}: {t:.4f} ms {2*M*K*2*F/t/1e9:.0f} TFLOP/s")
t = bench(lambda: xn @ w_ff.t()); log(f"cuBLAS swiglu shape: {t:.4f} ms")
# LN forward N=4096 steps per program
x = torch.randn(M, 4096, device="cuda", dtype=dt); w = torch.randn(4096, device="cuda", dtype=dt)
gb = 2 * M * 4096 * 2 / 1e9
t = bench(lambda: torch.nn.functional.layer_norm(x, (4096,), w, None, 1e-5)); log(f"fwd 4096 native {t:.4f} ms {gb/t*1e3:.0f} GB/s")
for steps in (1, 2, 4, 8, 16):
    for sr in (1, 2):
        for nw in (4, 8):
            cg = CompiledGraph(expanders.layer_norm_fwd(False), "full", steps=steps, single_rows=sr, num_warps=nw)
            t = bench(lambda: cg(x=x, weight=w, eps=1e-5)); log(f"fwd 4096 steps{steps} rows{sr} w{nw}: {t:.4f} ms {gb/t*1e3:.0f} GB/s")
del x
N = 18432
x = torch.randn(M, N, device="cuda", dtype=dt); w = torch.randn(N, device="cuda", dtype=dt); dy = torch.randn_like(x)
y, mean, rstd = torch.ops.aten.native_layer_norm(x, [N], w, None, 1e-5)
gb = 3 * M * N * 2 / 1e9
for pps in (1, 2):
    cg = CompiledGraph(expanders.layer_norm_bwd(False), "full", partials_per_sm=pps)
    t = bench(lambda: cg(dy=dy, x=x, weight=w, mean=mean.view(M), rstd=rstd.view(M))); log(f"bwd 18432 default pps{pps}: {t:.4f} ms {gb/t*1e3:.0f} GB/s")
