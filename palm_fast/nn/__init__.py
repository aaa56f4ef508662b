"""Fast ``nn.Module``s, state_dict-compatible with the reference modules."""

from .swiglu import SwiGLU, SwiGLUMLP  # noqa: E402,F401
