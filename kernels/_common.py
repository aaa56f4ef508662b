"""Helpers shared by the Triton launchers."""
from __future__ import annotations

import contextlib
import functools
import os

import torch

# Compile-only mode: (SM count, compute capability) of the GPU the launchers plan for, or None.
# Set by ``compile_only`` (``tests/lower_for_gpu.py``): CPU tensors then take the GPU launch
# path (tile sizes, warps, SM-count grids, bf16 dots) while that script has Triton compile each
# launch for the GPU target instead of running it, so that GPU lowering is checked without a GPU.
_COMPILE_ONLY: tuple[int, tuple[int, int]] | None = None


def compile_only(target: tuple[int, tuple[int, int]] | None) -> None:
    """Enter compile-only mode for a GPU of ``target = (SM count, (major, minor))``; None
    leaves it. Not for use with kernels that are meant to run."""
    global _COMPILE_ONLY
    if target is not None:
        sms, cap = target
        if not (isinstance(sms, int) and sms > 0 and len(cap) == 2):
            raise ValueError(f"target: expected (SM count > 0, (major, minor)), got {target!r}")
        target = (sms, (int(cap[0]), int(cap[1])))
    _COMPILE_ONLY = target


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def gpu_launch(device: torch.device) -> bool:
    """Whether launches for ``device`` take the GPU configuration: CUDA tensors, or any
    tensors in compile-only mode. (Under the interpreter, CPU tensors take small tiles and
    a few programs instead.)"""
    return device.type == "cuda" or _COMPILE_ONLY is not None


@functools.lru_cache(maxsize=8)
def _cuda_props(index: int) -> tuple[int, tuple[int, int]]:
    p = torch.cuda.get_device_properties(index)
    return p.multi_processor_count, (p.major, p.minor)


def _props(device: torch.device) -> tuple[int, tuple[int, int]]:
    if device.type == "cuda":
        return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())
    if _COMPILE_ONLY is not None:
        return _COMPILE_ONLY
    raise RuntimeError(f"no GPU properties for device {device}")


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA ``device`` (or of the compile-only target)."""
    return _props(device)[0]


def capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of the CUDA ``device`` (or of the compile-only target)."""
    return _props(device)[1]


# Shared memory a block may opt into, by compute capability (CUDA programming guide);
# used where torch does not report it (older torch, compile-only mode).
_SMEM_OPTIN = {(7, 0): 98304, (7, 5): 65536, (8, 0): 166912, (8, 6): 101376, (8, 7): 166912,
               (8, 9): 101376, (9, 0): 232448, (10, 0): 232448, (10, 3): 232448,
               (12, 0): 101376, (12, 1): 101376}


@functools.lru_cache(maxsize=8)
def _cuda_smem(index: int) -> int | None:
    return getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)


def smem_per_block(device: torch.device) -> int:
    """Shared memory (bytes) one block may use on the CUDA ``device`` (or the compile-only
    target): the launchers size tiles and pipeline stages to it (an H100 has 227 KiB; an
    RTX 4090 or L40, sm_89, and consumer Blackwell, sm_120, 99 KiB)."""
    if device.type == "cuda":
        n = _cuda_smem(device.index if device.index is not None else torch.cuda.current_device())
        if n:
            return int(n)
    return _SMEM_OPTIN.get(capability(device), 101376)


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_dtype(name: str, t: torch.Tensor) -> None:
    """A launcher's float input (the raw custom ops reach the launchers without the public
    functions' checks: an int tensor was computed silently, an fp64 one in fp32)."""
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype torch.float32, torch.float16 or torch.bfloat16, "
                        f"got {t.dtype}")


def check_float_dtypes(names: str, *tensors: torch.Tensor) -> None:
    """check_float_dtype for the first of ``tensors`` and the others in its dtype (a kernel
    that reads them all as one element type); ``names``: theirs, comma-separated."""
    dtype = tensors[0].dtype
    if dtype not in _FLOAT_DTYPES:
        check_float_dtype(names.split(",")[0].strip(), tensors[0])
    for i in range(1, len(tensors)):
        if tensors[i].dtype != dtype:
            split = [n.strip() for n in names.split(",")]
            name0, name = split[0], split[i]
            raise TypeError(f"{name}: expected dtype {dtype} (same as {name0}), got {tensors[i].dtype}")


def check_launch_device(t: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under the interpreter (or in
    compile-only mode)."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and (interpreting() or _COMPILE_ONLY is not None):
        return
    raise RuntimeError(
        f"Triton launcher got a tensor on {t.device}: Triton kernels need CUDA tensors "
        "(or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)"
    )


_SAME_DEVICE = contextlib.nullcontext()


def launch_device(device: torch.device):
    """A context making ``device`` the current CUDA device while kernels are launched.

    Triton launches on the *current* CUDA device (and its current stream), whatever device
    the tensors are on: a model on ``cuda:1`` run while ``cuda:0`` is current would launch
    its kernels on device 0 with pointers into device 1's memory (a fault, or peer reads
    at a fraction of the bandwidth). torch's own ops switch to their tensors' device; this
    does the same for ours. Nothing to do (no device switch) for CPU tensors or when the
    device is already current."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _SAME_DEVICE
    return torch.cuda.device(device.index)


def on_tensor_device(launcher):
    """Decorator for a Triton launcher: runs it with the CUDA device of its first tensor
    argument current (see :func:`launch_device`). Marks it ``device_guarded`` (checked by
    ``tests/test_device_guard.py`` for every function that launches a kernel)."""
    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor):
                if a.is_cuda:
                    with launch_device(a.device):
                        return launcher(*args, **kwargs)
                break
        return launcher(*args, **kwargs)

    guarded.device_guarded = True
    return guarded


# Host-side launch arithmetic. triton.cdiv and triton.next_power_of_2 are constexpr functions
# in recent Triton (3.5+): callable from the host, but each call costs microseconds (argument
# unwrapping and an import per call), and a launcher makes a dozen of them per op call.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
