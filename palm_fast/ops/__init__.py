"""Public functional ops. Each is a ``palm_fast::`` torch custom op (CPU -> C++,
CUDA -> Triton) with fake kernel and autograd, behind a checked Python function."""

from .swiglu import swiglu  # noqa: E402,F401
