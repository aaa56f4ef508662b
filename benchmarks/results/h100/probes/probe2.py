"""GPU probe 2 (not committed): RoPE tiles with hardware trig vs libdevice vs cuBLAS + rope
pass; decode split heuristics; LayerNorm op-level timings."""
import os, sys
import torch, triton
from triton.testing import do_bench
torch.backends.cuda.matmul.allow_tf32 = False
from palm_fast.kernels import projection as kp
from palm_fast.kernels import mqa_decode as kd
from palm_fast.kernels import rope as kr
from palm_fast.reference import functional
which = sys.argv[1:] or ["proj", "decode", "ln"]
def log(*a): print(*a, flush=True)
def bench(fn): return do_bench(fn, warmup=10, rep=50)
dev = "cuda"
if "proj" in which:
    M, d, H, Hk, hd, F = 16384, 2048, 16, 1, 128, 8192
    dt = torch.bfloat16
    xn = torch.randn(M, d, device=dev, dtype=dt)
    w = torch.randn(H*hd + 2*Hk*hd + 2*F, d, device=dev, dtype=dt) * d**-0.5
    pos = torch.arange(M, device=dev) % 2048
    inv = functional.rope_inv_freq(hd).to(dev)
    packed = kp.pack_in_proj(w, inv, H, Hk, hd, F, False)
    P = packed.w_a.shape[0]; nqkv = (H + 2*Hk) * hd
    t_mm = bench(lambda: xn @ w.t()); t_q = bench(lambda: xn @ w[:nqkv].t())
    log(f"mm all {t_mm:.4f} qkv part {t_q:.4f}")
    cfgs = [kp._cfg(*c) for c in [(128,128,64,8,8,3),(128,128,64,8,8,4),(128,64,64,8,8,4),(128,64,64,8,4,4),(64,64,32,8,4,4),(64,128,64,8,4,4)]]
    q = torch.empty(M, H*hd, device=dev, dtype=dt); k = torch.empty(M, hd, device=dev, dtype=dt)
    v = torch.empty_like(k); h = torch.empty(M, F, device=dev, dtype=dt)
    for fast in (True, False):
        for c in cfgs:
            meta = kp._meta(c, 2, 2)
            args = (xn, packed.w_a, packed.w_b, packed.dst_a, packed.dst_b, packed.freq, pos, q, k, v, h, h, M, d, P, 0, packed.p_qkv,
                    triton.next_power_of_2(M), packed.p_qkv, H*hd, hd, F, d)
            grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(packed.p_qkv, meta["BLOCK_N"]),)
            t = bench(lambda: kp._in_proj_fwd[grid](*args, STORE_FF=False, UPCAST=False, PRECISE_TRIG=True, FAST_TRIG=fast,
                                                     DOT_PREC="tf32", INTERLEAVED=True, REGION=1, EVEN_K=True, **meta))
            log(f"region1 fast_trig={fast} {c.kwargs} w{c.num_warps} s{c.num_stages}: {t:.4f} ms ({t_q/t:.2f}x its mm)")
    # check fast trig accuracy vs fp64 on the real positions
    qf, kf, vf, hf, _ = kp.in_proj(xn, packed, pos, H, Hk, hd, F, store_ff=False)
    kp.FAST_TRIG_HALF = False
    qs, ks, vs, hs, _ = kp.in_proj(xn, packed, pos, H, Hk, hd, F, store_ff=False)
    kp.FAST_TRIG_HALF = True
    log("fast vs libdevice q max abs diff", (qf.float() - qs.float()).abs().max().item(), "bitwise frac", (qf == qs).float().mean().item())
    def gemm_rope():
        proj = xn @ w[:nqkv].t()
        qv = proj[:, :H*hd].view(1, M, H, hd); kv_ = proj[:, H*hd:(H+Hk)*hd].view(1, M, Hk, hd)
        kr.rope(qv, kv_, inv, pos.view(1, M), pos_is_offset=False, q_out=q.view(1, M, H, hd), k_out=k.view(1, M, Hk, hd))
        v.copy_(proj[:, (H+Hk)*hd:])
    t = bench(gemm_rope)
    log(f"region1 as cuBLAS + rope pass + v copy: {t:.4f} ms ({t_q/t:.2f}x its mm)")
    for sf in (False, True):
        kp.in_proj(xn, packed, pos, H, Hk, hd, F, store_ff=sf)
        t = bench(lambda: kp.in_proj(xn, packed, pos, H, Hk, hd, F, store_ff=sf))
        log(f"in_proj AUTOTUNED store_ff={sf}: {t:.4f} ms {2*M*w.shape[0]*d/t/1e9:.0f} TF {t_mm/t:.2f}x mm")
if "decode" in which:
    for (R, hd) in ((48, 256), (16, 128)):
        for B in (1, 8, 64):
            for T in (4096, 32768):
                kc = torch.randn(1, B, T, hd, device=dev, dtype=torch.bfloat16); vc = torch.randn_like(kc)
                q = torch.randn(B, R, hd, device=dev, dtype=torch.bfloat16)
                ends = torch.full((B,), T, device=dev, dtype=torch.int32)
                gb = (2 * B * T * hd * 2 + 2 * B * R * hd * 2) / 1e9
                out = []
                for name, waves, floor in (("ceil2", 2, False), ("floor1", 1, True), ("floor2", 2, True), ("ceil1", 1, False), ("floor3", 3, True)):
                    kd.SPLIT_WAVES, kd.SPLIT_WAVES_FLOOR = waves, floor
                    f = lambda: kd.mqa_decode(q, kc, vc, None, None, ends, 0, hd ** -0.5, False)
                    f()
                    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s): f()
                    torch.cuda.current_stream().wait_stream(s)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g): f()
                    tg = bench(lambda: g.replay())
                    S = kd.decode_config(B, R, hd, T, kd.sm_count(q.device))["n_splits"]
                    out.append(f"{name}(S={S}) {tg*1e3:.1f}us {gb/tg*1e3:.0f}GB/s")
                log(f"decode R={R} hd={hd} B={B} T={T}: " + " | ".join(out))
                del kc, vc
    kd.SPLIT_WAVES, kd.SPLIT_WAVES_FLOOR = 2, False
if "ln" in which:
    from palm_fast.ops import layer_norm
    for N in (4096, 8192, 18432):
        M = 16384
        x = torch.randn(M, N, device=dev, dtype=torch.bfloat16); wt = torch.randn(N, device=dev, dtype=torch.bfloat16)
        t = bench(lambda: layer_norm(x, wt, None, 1e-5))
        tt = bench(lambda: torch.nn.functional.layer_norm(x, (N,), wt, None, 1e-5))
        xg = x.clone().requires_grad_(); wg = wt.clone().requires_grad_(); dy = torch.randn_like(x)
        t2 = bench(lambda: torch.autograd.grad(layer_norm(xg, wg, None, 1e-5), (xg, wg), dy))
        t3 = bench(lambda: torch.autograd.grad(torch.nn.functional.layer_norm(xg, (N,), wg, None, 1e-5), (xg, wg), dy))
        log(f"LN op N={N}: fwd {t:.4f} ms ({2*M*N*2/t/1e6:.0f} GB/s) torch {tt:.4f} | fwdbwd {t2:.4f} ms ({5*M*N*2/t2/1e6:.0f} GB/s) torch {t3:.4f}")
