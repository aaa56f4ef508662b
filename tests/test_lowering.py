"""Without a GPU: every Triton launch the library makes on a GPU compiles for an H100 (sm_90)
through ptxas, within its shared memory, using wgmma where the fast path depends on it.

The interpreter tests check what the kernels compute but cannot catch GPU lowering errors
(a constexpr branch only the GPU takes, a tile that does not fit, a layout the backend
rejects). ``tests/lower_for_gpu.py`` runs the launchers in compile-only mode on CPU tensors,
so they pick the configuration a 132-SM H100 would get, and compiles each launch instead of
running it.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from palm_fast.kernels import _common

HAS_CUDA = torch.cuda.is_available()
SCRIPT = Path(__file__).with_name("lower_for_gpu.py")
H100_SHARED = 227 * 1024  # dynamic shared memory one block may use on sm_90
# two processes (CI has 2 cores): the GEMMs, whose fp32 variants take the longest, and the rest
GROUPS = (("projection",), ("decode", "rope", "swiglu", "layer_norm"))


def _lower(cc: int, sms: int, groups) -> list[dict]:
    """Compile-only runs of ``lower_for_gpu.py`` for a GPU of compute capability ``cc`` with
    ``sms`` SMs, one process per group of families (in parallel); their kernel records.
    Skips where there is a GPU, or no NVIDIA backend / ptxas."""
    if HAS_CUDA:
        pytest.skip("the CUDA tests run the kernels themselves")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        pytest.skip("triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), "--cc", str(cc), "--sms", str(sms),
                               *[a for f in fams for a in ("--family", f)]],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for fams in groups]
    records, summaries = [], []
    for p in procs:
        out, err = p.communicate(timeout=1200)
        if p.returncode != 0 and "ptxas" in err and "not found" in err:
            pytest.skip("ptxas is not available")
        assert p.returncode == 0, err[-4000:]
        for line in out.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                (summaries if rec.get("summary") else records).append(rec)
    assert len(summaries) == len(groups)
    assert sum(s["kernels"] for s in summaries) == len(records)
    return records


@pytest.fixture(scope="module")
def report():
    return _lower(90, 132, GROUPS)


def _kernels(report, family: str, name: str | None = None, case: str = "") -> list[dict]:
    return [r for r in report if r["family"] == family and (name is None or r["kernel"] == name)
            and case in r["case"]]


def test_every_family_lowers_within_shared_memory(report):
    for family in ("decode", "rope", "swiglu", "projection", "layer_norm"):
        assert _kernels(report, family), f"no {family} kernel was compiled"
    for r in report:
        assert 0 <= r["shared"] <= H100_SHARED, r
        assert r["num_warps"] in (1, 2, 4, 8, 16, 32), r


def test_decode_kernels(report):
    """Split and combine for the bench shapes and odd head dims, fp16 / fp32 caches, the
    shared-prefix passes (the combine kernel merging the prefix), RoPE + append."""
    split = _kernels(report, "decode", "_mqa_decode_split")
    combine = _kernels(report, "decode", "_mqa_decode_combine")
    assert len(split) >= 10 and len(combine) >= 4
    assert _kernels(report, "decode", "_mqa_decode_combine", "shared prefix")
    assert len(_kernels(report, "decode", "_rope_append")) == 3
    # PaLM's shape packs the 48 heads into 64-row tiles: the dots run as wgmma, pipelined
    for r in _kernels(report, "decode", "_mqa_decode_split", "bf16 H=48"):
        assert r["wgmma"] > 0 and r["async_wait"] > 0, r
    for case in ("torch.float16", "torch.float32", "hd=80", "hd=64"):
        assert _kernels(report, "decode", "_mqa_decode_split", case), case
    # no register spills (cuobjdump's stack bytes; None without cuobjdump): fp32 caches with
    # the fp16 / bf16 tiles spilled 8-12 KB per thread (exact fp32 dots on the FMA units)
    attn = split + combine
    if all(r["stack"] is not None for r in attn):
        assert [(r["case"], r["kernel"], r["stack"]) for r in attn if r["stack"] > 64] == []


def test_projection_kernels(report):
    """Every config of both epilogue GEMMs (bf16, and fp32 refitted to shared memory with
    masked K tails) compiles to a wgmma / software-pipelined K loop (bf16), and the SwiGLU
    TMA kernel and the RoPE kernel the block runs on an H100 lower too."""
    from palm_fast.kernels import projection as kp

    bf16_in = _kernels(report, "projection", "_in_proj_fwd", "bfloat16")
    bf16_out = _kernels(report, "projection", "_out_proj_fwd", "bfloat16")
    # one kernel per (config, region) of the input GEMM, plus both regions with separate weights
    assert len(bf16_in) == 2 * len(kp.IN_PROJ_CONFIGS) + 2
    assert len(bf16_out) == len(kp.OUT_PROJ_CONFIGS)
    for r in bf16_in + bf16_out:
        assert r["wgmma"] > 0 and r["async_wait"] > 0, r
    assert len(_kernels(report, "projection", "_in_proj_fwd", "float32")) == 2
    assert _kernels(report, "projection", "_out_proj_fwd", "float32")
    tma = _kernels(report, "projection", "_swiglu_tma")
    if kp.TMA_SUPPORTED:  # host TMA descriptors and tl.range(flatten=...): Triton >= 3.3 or so
        assert len(tma) == 2 and all(r["wgmma"] > 0 for r in tma)
    else:
        assert not tma
    assert _kernels(report, "projection", "_rope_kernel")


def test_fusion_kernels(report):
    """The generated LayerNorm (with the mean correction: ``_mc``) / add + LN / RMSNorm kernels:
    one block per row, tiled rows (N = 18432), looped rows (N = 40000), the re-reading
    backward and the mindspore grouping's three kernels."""
    names = {r["kernel"] for r in _kernels(report, "layer_norm")}
    for want in ("fused_layer_norm_fwd_nobias_mc_full_g0", "fused_layer_norm_fwd_mc_full_g0",
                 "fused_layer_norm_bwd_nobias_full_g0", "fused_layer_norm_bwd_nobias_full_g1",
                 "fused_layer_norm_fwd_nobias_mc_full_g0_looped",
                 "fused_layer_norm_bwd_nobias_full_g0_looped",
                 "fused_layer_norm_bwd_nobias_full_g0_t9", "fused_layer_norm_bwd_nobias_full_g0_t9_rl",
                 "fused_add_layer_norm_fwd_nobias_bfloat16_mc_full_g0_t9", "fused_rms_norm_fwd_full_g0",
                 "fused_rms_norm_bwd_full_g0", "fused_layer_norm_fwd_nobias_mindspore_g2",
                 "fused_generic_full_g0_looped", "fused_scalars_full_g0_looped"):
        assert want in names, (want, sorted(names))
    assert any(n.startswith("fused_layer_norm_fwd_nobias_mc_full_g0_t18_r3") for n in names)  # (1024-col)
    # wide rows take more warps (the runner's GPU rule; under the interpreter warps are not set)
    # no FMA contraction in any generated kernel (as the C++ kernels): the LayerNorm
    # backward's g - mean(g) was contracted into fma(dy, w, -mean), and a 1-wide row's dx
    # came out as the rounding error of dy * w times rstd instead of 0
    fused = [r for r in _kernels(report, "layer_norm") if r["kernel"].startswith("fused_")]
    assert fused and all(r["fma"] == 0 for r in fused), [(r["kernel"], r["case"]) for r in fused if r["fma"]]
    # (8 for whole 8192-column rows without column partials, 16 for masked rows of that block
    # and for the backward's partials)
    wide = _kernels(report, "layer_norm", "fused_layer_norm_fwd_nobias_mc_full_g0", "N=8192")
    assert wide and wide[0]["num_warps"] == 8
    wide = _kernels(report, "layer_norm", "fused_layer_norm_fwd_nobias_mc_full_g0", "N=6000")
    assert wide and wide[0]["num_warps"] == 16
    wide = _kernels(report, "layer_norm", "fused_layer_norm_bwd_nobias_full_g0", "N=8192")
    assert wide and wide[0]["num_warps"] == 16
    wide = _kernels(report, "layer_norm", "fused_layer_norm_fwd_nobias_mc_full_g0", "N=4096")
    assert wide and wide[0]["num_warps"] == 8


def test_generated_kernels_spill_at_most_64_bytes(report):
    """Register spills (stack bytes per thread, from cuobjdump) of the fusion engine's
    kernels. The product's LayerNorm forward at N=18432 (then 3 rows of 9 tiles per step, 16
    warps) spilled 304 bytes on Triton 3.6 (136 on 3.9) while it normalised x - mean and so
    held x beside d0 = x - mean0; normalising d0 - c it holds one copy of the row (48 / 0).
    Now 3 rows of 18 tiles with 8 warps (the twenty-third session's measured setting): 255
    registers, 8 bytes of stack on 3.9."""
    fused = [r for r in _kernels(report, "layer_norm") if r["kernel"].startswith("fused_")]
    if any(r["stack"] is None for r in fused):
        pytest.skip("no cuobjdump to read the kernels' resource usage")
    tiled = [r for r in fused if r["kernel"].startswith("fused_layer_norm_fwd_nobias_mc_full_g0_t18")]
    assert tiled and all(r["num_warps"] == 8 for r in tiled)   # (tiled_warps; 16 by width)
    assert all(r["regs"] > 0 for r in fused)
    assert [(r["kernel"], r["case"], r["stack"]) for r in fused if r["stack"] > 64] == []


def test_compile_only_mode_is_scoped():
    """Outside compile-only mode CPU tensors are refused unless the interpreter is on, and the
    GPU launch path is only for CUDA tensors; bad targets are rejected."""
    cpu = torch.device("cpu")
    assert not _common.gpu_launch(cpu)
    with pytest.raises(RuntimeError, match="no GPU properties"):
        _common.sm_count(cpu)
    _common.compile_only((132, (9, 0)))
    try:
        assert _common.gpu_launch(cpu)
        assert _common.sm_count(cpu) == 132 and _common.capability(cpu) == (9, 0)
        _common.check_launch_device(torch.zeros(1))
    finally:
        _common.compile_only(None)
    assert not _common.gpu_launch(cpu)
    with pytest.raises(ValueError, match="target"):
        _common.compile_only((0, (9, 0)))
    assert _common._COMPILE_ONLY is None


def test_decode_and_gemms_fit_gpus_with_99_kib_per_block():
    """sm_89 (L40, RTX 4090; also sm_86 / sm_120): 99 KiB of shared memory per block. The
    H100 decode tiles at head dim 256 took more (fp32 139,648 bytes, bf16 102,400), and so
    did GEMM config 1 (147,456 bytes): the launches would fail there. decode_config and
    fit_config size them to the device (H100 tiles unchanged)."""
    recs = _lower(89, 128, (("decode",), ("projection",)))
    assert any("H=48 hd=256" in r["case"] and "float32" in r["case"] for r in recs)
    assert any("H=48 hd=128" in r["case"] and "float32" in r["case"] for r in recs)
    assert any(r["kernel"] == "_in_proj_fwd" for r in recs)  # (config 1 fits as config 0)
    assert any(r["kernel"] == "_out_proj_fwd" for r in recs)
    for r in recs:
        assert r["shared"] <= _common._SMEM_OPTIN[(8, 9)], r


def test_gemm_configs_fit_the_target():
    """fit_config: one pipeline buffer per stage on sm_90 (wgmma), one fewer before
    (cp.async), as Triton allocates them; the H100 configs are left as they were tuned."""
    from palm_fast.kernels import projection as kp

    def smem(c, eb, b_rows, cap):
        return (c.num_stages - (cap < (9, 0))) * (c.kwargs["BLOCK_M"] + b_rows * c.kwargs["BLOCK_N"]) \
            * c.kwargs["BLOCK_K"] * eb

    for configs, b_rows in ((kp.IN_PROJ_CONFIGS, 2), (kp.OUT_PROJ_CONFIGS, 1)):
        for c in configs:
            h100 = kp.fit_config(c, 2, b_rows)
            assert (h100.kwargs, h100.num_stages) == (c.kwargs, c.num_stages)
            for cap, eb in itertools.product(((8, 0), (8, 9), (9, 0), (12, 0)), (2, 4)):
                target = (_common._SMEM_OPTIN[cap], cap)
                f = kp.fit_config(c, eb, b_rows, target)
                assert smem(f, eb, b_rows, cap) <= target[0] - kp.SMEM_RESERVE, (c, cap, eb)
                assert f.num_stages >= 2 and f.kwargs["BLOCK_K"] >= 16
    # a config that fits is kept: 3 stages = 2 cp.async buffers of 48 KiB on sm_89
    c = kp.IN_PROJ_CONFIGS[0]
    assert kp.fit_config(c, 2, 2, (_common._SMEM_OPTIN[(8, 9)], (8, 9))).num_stages == 3
    _common.compile_only((128, (8, 9)))
    try:
        assert kp.pipeline_target(torch.device("cpu")) == (_common._SMEM_OPTIN[(8, 9)], (8, 9))
    finally:
        _common.compile_only(None)


def test_tma_and_decode_tiles_follow_shared_memory(monkeypatch):
    from palm_fast.kernels import mqa_decode as kd
    from palm_fast.kernels import projection as kp

    def tiles(cfg):
        return cfg["BLOCK_R"], cfg["BLOCK_N"], cfg["num_stages"], cfg["num_warps"]

    assert tiles(kd.decode_config(8, 48, 256, 4096, 132, 2)) == (64, 32, 3, 4)
    # fp32 caches: fewer rows and keys per step and 8 warps (no register spills), and on
    # 99 KiB GPUs 2 stages
    assert tiles(kd.decode_config(8, 48, 256, 4096, 132, 4)) == (32, 16, 3, 8)
    assert tiles(kd.decode_config(8, 48, 128, 4096, 132, 4)) == (32, 32, 3, 8)
    assert tiles(kd.decode_config(8, 48, 256, 4096, 128, 4, smem=101376)) == (32, 16, 2, 8)
    assert tiles(kd.decode_config(8, 48, 128, 4096, 128, 4, smem=101376)) == (32, 32, 2, 8)
    assert kd.decode_config(8, 48, 256, 4096, 128, 2, smem=101376)["num_stages"] == 2
    small_bf16_128 = kd.decode_config(8, 16, 128, 4096, 128, 2, smem=101376)
    assert small_bf16_128 == kd.decode_config(8, 16, 128, 4096, 128, 2)
    x = torch.empty(2048, 256, dtype=torch.bfloat16)
    w = torch.empty(1024, 256, dtype=torch.bfloat16)
    h = torch.empty(2048, 512, dtype=torch.bfloat16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # (read per call: the GPU-side choice)
    try:
        for cap, want in (((9, 0), kp.TMA_SUPPORTED), ((12, 0), False), ((8, 9), False)):
            _common.compile_only((132, cap))
            assert kp._tma_usable(x, w, h, None) == want, cap
            assert _common.smem_per_block(torch.device("cpu")) == _common._SMEM_OPTIN[cap]
    finally:
        _common.compile_only(None)
