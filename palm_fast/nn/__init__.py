"""Fast ``nn.Module``s, state_dict-compatible with the reference modules."""
from .rope import RotaryEmbedding  # noqa: F401
