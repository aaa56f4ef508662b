"""Plain PyTorch reference implementations: the definition of every op, block and
the PaLM model. Every fast path is tested against these."""
from . import functional  # noqa: F401
from .layers import (
    KVCache,
    LayerNorm,
    MultiQueryAttention,
    ParallelBlock,
    RotaryEmbedding,
    SerialBlock,
    SwiGLU,
    SwiGLUMLP,
    attention,
)
from .model import PaLM

__all__ = ["functional", "LayerNorm", "RotaryEmbedding", "SwiGLU", "SwiGLUMLP", "KVCache",
           "attention", "MultiQueryAttention", "ParallelBlock", "SerialBlock", "PaLM"]
