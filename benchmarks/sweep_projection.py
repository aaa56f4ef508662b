"""Tile sweep of the fused block's epilogue GEMMs on a GPU (how the autotune lists were chosen).

    python -m palm_fast.benchmarks.sweep_projection [--tokens 16384]

For the issue's block shape (d=2048, H=16, hd=128, F=8192, bf16) it times, with
``triton.testing.do_bench`` (median), the input GEMM with its RoPE + SwiGLU epilogue and the
output GEMM with its residual epilogue under each candidate tile config, next to the plain
``torch.mm`` of the same shape, and prints TFLOP/s and the ratio to ``torch.mm``. The input
GEMM runs as the block runs it: with ``kernels.projection.QKV_VIA_GEMM`` the q / k / v columns
take the library GEMM + RoPE kernel and the swept config applies to the SwiGLU columns.
"""
from __future__ import annotations

import argparse

import torch


def _cands(cfg):
    # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages)
    return [cfg(*c) for c in (
        (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 64, 64, 8, 4, 3),
        (128, 64, 64, 8, 4, 4), (128, 64, 64, 8, 8, 4), (128, 64, 64, 8, 4, 5),
        (256, 64, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4), (128, 128, 32, 8, 8, 5),
        (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4),
    )]


def main(argv=None) -> None:
    import functools

    from triton.testing import do_bench as _do_bench

    do_bench = functools.partial(_do_bench, return_mode="median")   # (its default is the mean)

    from palm_fast.kernels import projection as kp
    from palm_fast.reference import functional

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    a = ap.parse_args(argv)
    M, d, H, Hk, hd, F = a.tokens, 2048, 16, 1, 128, 8192
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    n_in = (H + 2 * Hk) * hd + 2 * F
    w_in = torch.randn(n_in, d, device=dev, dtype=dt) * d ** -0.5
    xn = torch.randn(M, d, device=dev, dtype=dt)
    pos = torch.arange(M, device=dev, dtype=torch.int64) % 2048
    inv_freq = functional.rope_inv_freq(hd)
    packed = kp.pack_in_proj(w_in, inv_freq.to(dev), H, Hk, hd, F, False)
    qkv = (dict(qkv_weight=w_in[:(H + 2 * Hk) * hd], inv_freq=inv_freq.to(dev), interleaved=False)
           if kp.QKV_VIA_GEMM else {})
    fl_in = 2.0 * M * d * n_in
    t_mm = do_bench(lambda: torch.mm(xn, w_in.t()))
    print(f"in_proj M={M} K={d} N={n_in}: torch.mm {t_mm:.4f} ms {fl_in / t_mm / 1e9:.0f} TFLOP/s")
    for c in _cands(kp._cfg):
        for store in (False, True):
            try:
                t = do_bench(lambda c=c, s=store: kp.in_proj(xn, packed, pos, H, Hk, hd, F,
                                                             store_ff=s, config=c, **qkv))
            except Exception as e:  # noqa: BLE001 - a config that does not fit is reported
                print(f"  {c} store_ff={store}: {type(e).__name__}")
                continue
            print(f"  {c} store_ff={store}: {t:.4f} ms {fl_in / t / 1e9:.0f} TFLOP/s "
                  f"{t_mm / t:.2f}x mm")
    o = torch.randn(M, H * hd, device=dev, dtype=dt)
    h = torch.randn(M, F, device=dev, dtype=dt)
    x = torch.randn(M, d, device=dev, dtype=dt)
    wo = torch.randn(d, H * hd, device=dev, dtype=dt) * 0.02
    wf = torch.randn(d, F, device=dev, dtype=dt) * 0.02
    cat = torch.cat((o, h), 1)
    wcat = torch.cat((wo, wf), 1)
    fl_out = 2.0 * M * d * (H * hd + F)
    t_mm = do_bench(lambda: torch.mm(cat, wcat.t()))
    print(f"out_proj M={M} K={H * hd + F} N={d}: torch.mm {t_mm:.4f} ms "
          f"{fl_out / t_mm / 1e9:.0f} TFLOP/s")
    for c in _cands(kp._cfg):
        try:
            t = do_bench(lambda c=c: kp.out_proj(o, h, x, wo, wf, config=c))
        except Exception as e:  # noqa: BLE001
            print(f"  {c}: {type(e).__name__}")
            continue
        print(f"  {c}: {t:.4f} ms {fl_out / t / 1e9:.0f} TFLOP/s {t_mm / t:.2f}x mm")


if __name__ == "__main__":
    main()
