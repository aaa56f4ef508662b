"""Plain PyTorch reference implementations: the definition of every op, block
and the PaLM model. Every fast path is tested against these."""
from . import functional  # noqa: F401
