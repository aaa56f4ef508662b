"""Fast ``nn.Module``s, state_dict-compatible with the reference modules."""
from .block import ParallelBlock  # noqa: F401
from .layer_norm import LayerNorm  # noqa: F401
from .model import PaLM  # noqa: F401
from .rope import RotaryEmbedding  # noqa: F401
from .swiglu import SwiGLU, SwiGLUMLP  # noqa: F401


def refresh_caches(model) -> None:
    """Drop the weight-derived caches of every fast module in ``model`` (the CUDA input
    GEMM's re-laid-out projection weight, a patched PaLM-pytorch block's "LayerNorm beta
    is zero" flag); they are rebuilt on the next forward.

    Call it after writing weights through ``.data`` (``p.data.copy_(...)``, as some EMA
    utilities do) or through another tensor on their memory (``p.detach().numpy()``, DLPack):
    such writes bypass the version counter the caches are keyed on. (A weight that is a slice
    of a larger buffer, as ``vector_to_parameters`` leaves it, is never cached.) Writes
    under ``torch.no_grad()`` (``p.copy_(...)``), optimizer steps, ``load_state_dict`` and
    ``.to()`` are seen without it."""
    for m in model.modules():
        for name in ("_packed", "_packed_key", "_beta_key"):
            if name in m.__dict__:
                setattr(m, name, None)
