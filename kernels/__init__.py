"""Triton kernels of palm_fast, installed as ``palm_fast.kernels``.

One op family per file; each file holds its ``@triton.jit`` kernels and thin
host launchers that take and return torch tensors. Launchers work on CUDA
tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests them).
"""
