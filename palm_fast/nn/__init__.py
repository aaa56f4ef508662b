"""Fast ``nn.Module``s, state_dict-compatible with the reference modules."""
from .block import ParallelBlock  # noqa: F401
from .layer_norm import LayerNorm  # noqa: F401
from .model import PaLM  # noqa: F401
from .rope import RotaryEmbedding  # noqa: F401
from .swiglu import SwiGLU, SwiGLUMLP  # noqa: F401


def _check_model(model) -> None:
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")


def refresh_caches(model) -> None:
    """Drop the weight-derived caches of every fast module in ``model`` (the CUDA input
    GEMM's re-laid-out projection weight, a patched PaLM-pytorch block's "LayerNorm beta
    is zero" flag); they are rebuilt on the next forward.

    Call it after writing weights through ``.data`` (``p.data.copy_(...)``, as some EMA
    utilities do), through another tensor on their memory (``p.detach().numpy()``, DLPack),
    or by a ``torch.distributed`` collective or receive (``dist.broadcast(p, src=0)`` after a
    forward, ``all_reduce``, ``recv``): such writes bypass the version counter the caches are
    keyed on. (A weight that is a slice
    of a larger buffer, as ``vector_to_parameters`` leaves it, is never cached.) Writes
    under ``torch.no_grad()`` (``p.copy_(...)``), optimizer steps, ``load_state_dict`` and
    ``.to()`` are seen without it."""
    _check_model(model)
    for m in model.modules():
        for name in ("_packed", "_packed_key", "_beta_key"):
            if name in m.__dict__:
                setattr(m, name, None)


def set_weight_cache(model, enabled: bool) -> int:
    """Keep (``enabled=True``, the default) or stop keeping the CUDA input GEMM's re-laid-out
    projection weight on every fast block in ``model`` (``palm_fast.nn.ParallelBlock`` and
    patched PaLM-pytorch blocks); returns the number of blocks set.

    The re-layout is a second copy of each block's ``in_proj.weight``: with the SwiGLU
    columns, about 60% of a PaLM model's parameter memory again (palm-8b in bf16: about
    9 GiB). Kept, it is built once and reused until the weight changes; not kept, each
    forward re-lays it out (a gather of the ``[Nin, dim]`` weight per block and call) and
    frees it after the call. Turning the cache off drops the copies held now. CPU blocks
    keep no copy (their GEMM reads the weight as it is)."""
    _check_model(model)
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {enabled!r}")
    n = 0
    for m in model.modules():
        if hasattr(type(m), "cache_packed_weight"):
            m.cache_packed_weight = enabled
            if not enabled:
                m._packed = m._packed_key = None
            n += 1
    return n
