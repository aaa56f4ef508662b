"""Fast ``nn.Module``s, state_dict-compatible with the reference modules."""
from .layer_norm import LayerNorm  # noqa: F401
