"""Shared test configuration: backend selection, the tolerance rule, helpers.

* On a machine without CUDA the Triton launchers run on CPU tensors under the
  Triton interpreter: TRITON_INTERPRET=1 must be set before triton is imported,
  so it is set here, before any test module imports palm_fast.kernels.
* On a machine with CUDA the same tests drive the Triton kernels on CUDA tensors.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# Device on which the Triton launchers are tested: real GPU, or CPU + interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The tolerance rule (DESIGN.md): the max error of a fast output against an fp64
# reference may be at most twice the max error of the eager PyTorch reference run
# in the same dtype, plus a small per-dtype atol (scaled by the output's magnitude).
ATOL = {
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
    torch.float64: 1e-12,
}

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _triton_version() -> tuple[int, int]:
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2])


def _patch_triton32_scalar_store_mask() -> None:
    """Triton 3.2's interpreter drops the mask of a store through a scalar pointer when the
    mask is False (``semantic._store_legacy`` tests ``if not mask``, and the interpreter's
    scalar tensors are falsy then), so the store lands past the tensor and corrupts the heap;
    fixed in Triton 3.3. The generated kernels store per-row statistics that way (GPU code is
    not affected). Under the interpreter only: skip such a store when its mask is False."""
    from triton.language import core, semantic

    original = getattr(semantic, "_store_legacy", None)
    if original is None:  # a 3.2 build laid out differently: nothing to patch
        return

    def store(ptr, val, mask, boundary_check, cache, eviction, builder):
        if mask is not None and not ptr.type.is_block() and not mask.type.is_block() \
                and not bool(mask.handle.data):
            return core.tensor(None, core.void)
        return original(ptr, val, mask, boundary_check, cache, eviction, builder)

    semantic._store_legacy = store


def _patch_interpreter_bf16_rounding() -> None:
    """The interpreter converts fp32 to bf16 by truncation (``cast_impl`` passes no rounding
    mode; its own round-to-nearest mode rounds ties up), where the GPU's ``fptrunc`` rounds
    to nearest even: every bf16 output of a Triton kernel on the CPU carried up to twice the
    GPU's rounding error, close to the tolerance rule's bound. Under the interpreter only:
    convert through torch, which rounds as the GPU does (checked by
    ``test_interpreter_rounds_bf16_like_the_gpu``)."""
    import numpy as np
    from triton import language as tl
    from triton.runtime import interpreter as interp

    handle = getattr(interp, "TensorHandle", None)
    original = getattr(getattr(interp, "InterpreterBuilder", None), "cast_impl", None)
    if handle is None or original is None:   # laid out differently: leave it
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.ascontiguousarray(src.data, dtype=np.float32)
            bits = torch.from_numpy(data).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return handle(bits.reshape(data.shape), dst_type.scalar)
        return original(self, src, dst_type)

    interp.InterpreterBuilder.cast_impl = cast_impl


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    _patch_interpreter_bf16_rounding()
    if _triton_version() >= (3, 3):
        return
    import numpy

    if tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 4):
        pytest.exit("Triton < 3.3's interpreter fails with numpy >= 2.4 (it converts 1-element "
                    "arrays to Python ints): install numpy < 2.4 for the CPU test suite", returncode=4)
    _patch_triton32_scalar_store_mask()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def close_rel(got: torch.Tensor, want: torch.Tensor, rel: float) -> bool:
    """max |got - want| is within ``rel`` of want's largest magnitude (taken as >= 1)."""
    return max_err(got, want) <= rel * max(1.0, want.detach().abs().max().item())


def assert_close_by_rule(out: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor,
                         *, name: str = "output", atol: float | None = None) -> None:
    """Check ``out`` against the fp64 reference with the tolerance rule."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == eager.dtype, f"{name}: dtype {out.dtype} != {eager.dtype}"
    assert torch.isfinite(out.detach().float()).all(), f"{name}: non-finite values"
    scale = max(1.0, ref64.detach().abs().max().item())
    atol = (ATOL[out.dtype] if atol is None else atol) * scale
    err = max_err(out, ref64)
    eager_err = max_err(eager, ref64)
    bound = 2.0 * eager_err + atol
    assert err <= bound, (f"{name}: max error {err:.3e} exceeds 2 x eager error "
                          f"{eager_err:.3e} + atol {atol:.1e} = {bound:.3e}")


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0, generator=None) -> torch.Tensor:
    """Fresh random data (never zeros)."""
    return (torch.randn(*shape, dtype=torch.float32, generator=generator) * scale).to(
        device=device, dtype=dtype)


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer filled with NaN so unwritten elements show."""
    return torch.full_like(t, float("nan"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one intra-op thread: for tiny models and shapes one thread is as fast,
    and on a loaded 2-core machine every parallel region of a second thread waits for a time
    slice (measured: tests ~50x slower). Use with ``pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
