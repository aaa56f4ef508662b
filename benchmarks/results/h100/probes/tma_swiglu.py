"""Probe kernel: the SwiGLU region of the input projection as a (persistent) TMA GEMM.
w: interleaved [2P, K] (row 2j value of pair j, 2j + 1 gate), x [M, K], h [M, P]."""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    in_group = GROUP_M * num_pid_n
    group = tile_id // in_group
    first_m = group * GROUP_M
    gsz = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % in_group) % gsz
    pid_n = (tile_id % in_group) // gsz
    return pid_m, pid_n


@triton.jit
def swiglu_tma(a_desc, w_desc, h_desc, M, P, K, NUM_PROGS: tl.constexpr, PERSIST: tl.constexpr,
               FLATTEN: tl.constexpr, WS: tl.constexpr, UPCAST: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(P, BN)
    k_tiles = tl.cdiv(K, BK)
    if PERSIST:
        start, stop, step = tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGS
    else:
        start, stop, step = tl.program_id(0), tl.program_id(0) + 1, 1
    for tile_id in tl.range(start, stop, step, flatten=FLATTEN, warp_specialize=WS):
        pid_m, pid_n = _tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BK])
            w = w_desc.load([2 * off_n, ki * BK])
            if UPCAST:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w.T, acc)
        acc_a, acc_b = tl.split(tl.reshape(acc, (BM, BN, 2)))
        h = acc_b / (1.0 + tl.exp(-acc_b)) * acc_a
        h_desc.store([off_m, off_n], h.to(h_desc.dtype))


def run(x, w, h, BM=128, BN=128, BK=64, GROUP_M=8, warps=8, stages=4, persist=True, flatten=True,
        upcast=False, num_progs=None, ws=False):
    M, K = x.shape
    P = w.shape[0] // 2
    a_desc = TensorDescriptor.from_tensor(x, [BM, BK])
    w_desc = TensorDescriptor.from_tensor(w, [2 * BN, BK])
    h_desc = TensorDescriptor.from_tensor(h, [BM, BN])
    tiles = triton.cdiv(M, BM) * triton.cdiv(P, BN)
    if persist:
        n = num_progs or torch.cuda.get_device_properties(x.device).multi_processor_count
        grid = (min(n, tiles),)
    else:
        n, grid = 1, (tiles,)
    swiglu_tma[grid](a_desc, w_desc, h_desc, M, P, K, NUM_PROGS=grid[0], PERSIST=persist, FLATTEN=flatten, WS=ws,
                     UPCAST=upcast, BM=BM, BN=BN, BK=BK, GROUP_M=GROUP_M, num_warps=warps, num_stages=stages)
    return h
