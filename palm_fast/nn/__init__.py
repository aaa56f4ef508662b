"""Fast ``nn.Module``s, state_dict-compatible with the reference modules."""
from .block import ParallelBlock  # noqa: F401
from .layer_norm import LayerNorm  # noqa: F401
from .model import PaLM  # noqa: F401
from .rope import RotaryEmbedding  # noqa: F401
from .swiglu import SwiGLU, SwiGLUMLP  # noqa: F401
