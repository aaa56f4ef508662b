"""GPU probe (not committed): kernel variants for the in/out projection, LayerNorm
backward launch knobs, decode tiling and the host cost of a decode call."""
import json, os, sys, time
import torch, triton
from triton.testing import do_bench
torch.backends.cuda.matmul.allow_tf32 = False
from palm_fast.kernels import projection as kp
from palm_fast.kernels import mqa_decode as kd
from palm_fast.reference import functional
OUT = os.environ.get("OUT", "/tmp")
which = sys.argv[1:] or ["proj", "ln", "decode"]
res = {}
def log(*a):
    print(*a, flush=True)
SMALL = os.environ.get("PROBE_SMALL") == "1"
def bench(fn, **kw):
    if SMALL:
        fn(); return 1.0
    return do_bench(fn, warmup=10, rep=50, **kw)

dev = "cpu" if SMALL else "cuda"
if "proj" in which:
    M, d, H, Hk, hd, F = (64, 64, 2, 1, 32, 64) if SMALL else (16384, 2048, 16, 1, 128, 8192)
    dt = torch.bfloat16
    xn = torch.randn(M, d, device=dev, dtype=dt)
    w = torch.randn(H*hd + 2*Hk*hd + 2*F, d, device=dev, dtype=dt) * d**-0.5
    pos = torch.arange(M, device=dev) % 2048
    inv = functional.rope_inv_freq(hd)
    packed = kp.pack_in_proj(w, inv.to(dev), H, Hk, hd, F, False)
    sep = kp.PackedInProj(packed.w_a.contiguous(), packed.w_b.contiguous(), packed.dst_a, packed.dst_b, packed.freq, packed.p_qkv)
    N = w.shape[0]
    flops = 2 * M * N * d
    t_mm = bench(lambda: xn @ w.t())
    t_mm_ff = bench(lambda: xn @ w[2*(H*hd+2*Hk*hd)//2:].t())
    t_mm_qkv = bench(lambda: xn @ w[:(H+2*Hk)*hd].t())
    log(f"mm all {t_mm:.4f} ms {flops/t_mm/1e9:.0f} TF | ff part {t_mm_ff:.4f} | qkv part {t_mm_qkv:.4f}")
    res["mm"] = dict(all=t_mm, ff=t_mm_ff, qkv=t_mm_qkv)
    # plain Triton-style ceiling: our out_proj kernel with K2 = 0 is a plain GEMM + residual
    P = packed.w_a.shape[0]
    cfgs = [kp._cfg(*c) for c in [(128,128,64,8,8,3),(128,128,64,8,8,4),(128,64,64,8,4,4),(128,64,64,8,8,4),
                                   (128,64,64,8,4,3),(64,128,64,8,4,4),(256,64,64,8,8,3),(128,128,32,8,8,5),(64,64,32,8,4,4)]]
    for name, pk in (("interleaved", packed), ("separate", sep)):
        inter = kp.is_interleaved(pk.w_a, pk.w_b)
        for region, (p0, p1) in ((1, (0, pk.p_qkv)), (2, (pk.p_qkv, P))):
            if region == 1 and not inter:
                continue
            for c in cfgs:
                meta = kp._meta(c, 2, 2)
                q = torch.empty(M, H*hd, device=dev, dtype=dt); k = torch.empty(M, hd, device=dev, dtype=dt)
                v = torch.empty_like(k); h = torch.empty(M, F, device=dev, dtype=dt); ff = torch.empty(M, 2*F, device=dev, dtype=dt)
                args = (xn, pk.w_a, pk.w_b, pk.dst_a, pk.dst_b, pk.freq, pos, q, k, v, h, ff, M, d, P, p0, p1,
                        triton.next_power_of_2(M), pk.p_qkv, H*hd, hd, F, d)
                grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(p1 - p0, meta["BLOCK_N"]),)
                for sf in (False,):
                    try:
                        fn = lambda: kp._in_proj_fwd[grid](*args, STORE_FF=sf, UPCAST=False, PRECISE_TRIG=True, DOT_PREC="tf32",
                                                            INTERLEAVED=inter, REGION=region, EVEN_K=True, **meta)
                        t = bench(fn)
                    except Exception as e:
                        t = float("nan"); log("ERR", name, region, c, repr(e)[:200])
                    fl = 2 * M * 2 * (p1 - p0) * d
                    log(f"in_proj {name} region{region} store_ff={sf} {c.kwargs} w{c.num_warps} s{c.num_stages}: {t:.4f} ms {fl/t/1e9:.0f} TF")
                    res[f"in_{name}_r{region}_ff{sf}_{c}"] = t
        for sf in ((False, True) if inter else (False,)):
            kp.in_proj(xn, pk, pos, H, Hk, hd, F, store_ff=sf)
            t = bench(lambda: kp.in_proj(xn, pk, pos, H, Hk, hd, F, store_ff=sf))
            log(f"in_proj AUTOTUNED {name} store_ff={sf}: {t:.4f} ms {flops/t/1e9:.0f} TF {t_mm/t:.2f}x mm")
            res[f"in_auto_{name}_ff{sf}"] = t
    # out proj: M x 2048 x (2048 + 8192)
    if SMALL: ocfgs_small = True
    o = torch.randn(M, H*hd, device=dev, dtype=dt); hh = torch.randn(M, F, device=dev, dtype=dt)
    x = torch.randn(M, d, device=dev, dtype=dt)
    wo = torch.randn(d, H*hd, device=dev, dtype=dt) * 0.02; wf = torch.randn(d, F, device=dev, dtype=dt) * 0.02
    cat = torch.cat([o, hh], 1); wcat = torch.cat([wo, wf], 1)
    t_mm2 = bench(lambda: torch.addmm(x, cat, wcat.t()))
    fl2 = 2 * M * d * (H*hd + F)
    log(f"out mm {t_mm2:.4f} ms {fl2/t_mm2/1e9:.0f} TF")
    ocfgs = [kp._cfg(*c) for c in [(128,256,64,8,8,3),(128,256,64,8,8,4),(128,128,64,8,8,4),(128,128,64,8,4,4),(256,128,64,8,8,3),(128,128,64,8,8,3),(128,256,32,8,8,5)]]
    for c in ocfgs:
        try:
            t = bench(lambda: kp.out_proj(o, hh, x, wo, wf, config=c))
        except Exception as e:
            t = float("nan"); log("ERR", c, repr(e)[:200])
        log(f"out_proj {c.kwargs} w{c.num_warps} s{c.num_stages}: {t:.4f} ms {fl2/t/1e9:.0f} TF {t_mm2/t:.2f}x mm")
    kp.out_proj(o, hh, x, wo, wf)
    t = bench(lambda: kp.out_proj(o, hh, x, wo, wf))
    log(f"out_proj AUTOTUNED {t:.4f} ms {t_mm2/t:.2f}x mm")

if "ln" in which:
    from palm_fast.fusion import expanders, compile_graph
    from palm_fast.fusion.codegen import CompiledGraph
    for N in ((64, 100) if SMALL else (4096, 8192, 18432)):
        M = 32 if SMALL else 16384
        x = torch.randn(M, N, device=dev, dtype=torch.bfloat16); wt = torch.randn(N, device=dev, dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        mean = x.float().mean(1); rstd = torch.rsqrt(x.float().var(1, unbiased=False) + 1e-5)
        gb_bwd = 3 * M * N * 2 / 1e9
        try:
            tn = bench(lambda: torch.ops.aten.native_layer_norm_backward(dy, x, [N], mean.view(M,1), rstd.view(M,1), wt, None, [True, True, False]))
        except Exception as e:
            log("ERR aten", repr(e)[:100]); tn = 1.0
        log(f"LN bwd N={N} aten {tn:.4f} ms {gb_bwd/tn*1e3:.0f} GB/s")
        for pps in (2, 4, 8):
            for nw in (None, 4, 8, 16, 32):
                cg = CompiledGraph(expanders.layer_norm_bwd(False), "full", partials_per_sm=pps, num_warps=nw)
                try:
                    t = bench(lambda: cg(dy=dy, x=x, weight=wt, mean=mean, rstd=rstd))
                except Exception as e:
                    t = float("nan"); log("ERR", repr(e)[:200])
                log(f"LN bwd N={N} pps={pps} warps={nw}: {t:.4f} ms {gb_bwd/t*1e3:.0f} GB/s")
        gb_fwd = 2 * M * N * 2 / 1e9
        for nw in (None, 4, 8, 16, 32):
            cg = CompiledGraph(expanders.layer_norm_fwd(False), "full", num_warps=nw)
            f = lambda: cg(x=x, weight=wt, eps=1e-5)
            t = bench(f)
            if SMALL:
                tg = 1.0
            else:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    f()
                tg = bench(lambda: g.replay())
            log(f"LN fwd N={N} warps={nw}: {t:.4f} ms {gb_fwd/t*1e3:.0f} GB/s | graphed {tg:.4f} ms {gb_fwd/tg*1e3:.0f} GB/s")
        tt = bench(lambda: torch.nn.functional.layer_norm(x, (N,), wt))
        log(f"LN fwd N={N} torch {tt:.4f} ms {gb_fwd/tt*1e3:.0f} GB/s")

if "decode" in which:
    base_cfg = kd.decode_config
    for (R, hd) in ((48, 256), (16, 128)):
        for B in ((1, 2) if SMALL else (1, 8, 64)):
            for T in ((300,) if SMALL else (4096, 32768)):
                kc = torch.randn(1, B, T, hd, device=dev, dtype=torch.bfloat16)
                vc = torch.randn_like(kc)
                q = torch.randn(B, R, hd, device=dev, dtype=torch.bfloat16)
                ends = torch.full((B,), T, device=dev, dtype=torch.int32)
                gb = (2 * B * T * hd * 2 + 2 * B * R * hd * 2) / 1e9
                variants = [("default", {})]
                for bn in ((32, 64) if hd > 128 else (64, 128)):
                    for nw in (4, 8):
                        for ns in (2, 3, 4):
                            variants.append((f"bn{bn}w{nw}s{ns}", dict(BLOCK_N=bn, num_warps=nw, num_stages=ns)))
                for ms in (1, 2, 4):
                    variants.append((f"splits{ms}x", dict(_split_mult=ms)))
                best = None
                for name, ov in variants:
                    def cfg_fn(B_, R_, hd_, cap, sms, ov=ov):
                        c = base_cfg(B_, R_, hd_, cap, sms)
                        mult = ov.get("_split_mult")
                        if mult:
                            n = max(1, min(triton.cdiv(cap, 128), triton.cdiv(mult * sms, B_ * c["row_blocks"])))
                            sl = triton.cdiv(triton.cdiv(cap, n), c["BLOCK_N"]) * c["BLOCK_N"]
                            c.update(n_splits=triton.cdiv(cap, sl), split_len=sl)
                        for kk, vv in ov.items():
                            if not kk.startswith("_"):
                                c[kk] = vv
                        if "BLOCK_N" in ov:
                            sl = triton.cdiv(c["split_len"], c["BLOCK_N"]) * c["BLOCK_N"]
                            c.update(split_len=sl, n_splits=triton.cdiv(cap, sl))
                        return c
                    kd.decode_config = cfg_fn
                    f = lambda: kd.mqa_decode(q, kc, vc, None, None, ends, 0, hd ** -0.5, False)
                    try:
                        f()
                        t = bench(f)
                        if SMALL:
                            raise StopIteration
                        g = torch.cuda.CUDAGraph()
                        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(s):
                            f()
                        torch.cuda.current_stream().wait_stream(s)
                        with torch.cuda.graph(g):
                            f()
                        tg = bench(lambda: g.replay())
                    except StopIteration:
                        tg = t
                    except Exception as e:
                        log("ERR", name, repr(e)[:200]); continue
                    log(f"decode R={R} hd={hd} B={B} T={T} {name}: {t*1e3:.1f} us {gb/t*1e3:.0f} GB/s | graph {tg*1e3:.1f} us {gb/tg*1e3:.0f} GB/s")
                    if best is None or tg < best[1]:
                        best = (name, tg)
                log(f"BEST decode R={R} hd={hd} B={B} T={T}: {best}")
                kd.decode_config = base_cfg
                # sdpa reference
                qq = q.view(B, R, 1, hd).transpose(1, 2) if False else q.view(B, 1, R, hd).transpose(1, 2)
                kk_ = kc[0].view(B, 1, T, hd).expand(B, R, T, hd) if False else kc[0].unsqueeze(1).expand(B, R, T, hd)
                vv_ = vc[0].unsqueeze(1).expand(B, R, T, hd)
                qq = q.unsqueeze(2)
                t = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk_, vv_))
                log(f"decode R={R} hd={hd} B={B} T={T} sdpa: {t*1e3:.1f} us {gb/t*1e3:.0f} GB/s")
                del kc, vc
