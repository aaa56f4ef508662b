"""PaLM model configurations and presets.

``PaLMConfig`` holds the shape of a PaLM-style decoder; ``get_config(name)``
returns a preset. The three paper sizes follow PaLM (arXiv 2204.02311) Table 1;
the small presets are for CPU tests/benchmarks and a ~1B model for one GPU.
Head dim is always given explicitly: it is never derived from d_model / heads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["PaLMConfig", "PRESETS", "get_config"]


@dataclass
class PaLMConfig:
    """Shape and hyper-parameters of a PaLM model.

    vocab_size V, d_model d, n_layers L, n_heads H (query heads), head_dim Q,
    d_ff (SwiGLU hidden size F), n_kv_heads Hk (1 = multi-query attention),
    max_seq_len, rope_base, rotary_dim (None = head_dim), scale_logits
    (multiply the tied-embedding logits by 1/sqrt(d)), z_loss coefficient,
    LayerNorm eps, and an optional preset name.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    head_dim: int
    d_ff: int
    n_kv_heads: int = 1
    max_seq_len: int = 2048
    rope_base: float = 10000.0
    rotary_dim: int | None = None
    scale_logits: bool = True
    z_loss: float = 1e-4
    eps: float = 1e-5
    name: str = ""

    def __post_init__(self):
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "d_ff",
                      "n_kv_heads", "max_seq_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field}: expected a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads: expected a divisor of n_heads={self.n_heads}, "
                             f"got {self.n_kv_heads}")
        rd = self.rotary_dim
        if rd is not None and (rd <= 0 or rd % 2 or rd > self.head_dim):
            raise ValueError(f"rotary_dim: expected an even integer in (0, head_dim={self.head_dim}], "
                             f"got {rd}")

    def layer_param_count(self) -> int:
        """Parameters of one block: ``d (H Q + 2 Hk Q) + H Q d + 3 d F + d``
        (fused input projection q | k | v | value | gate, attention output,
        MLP output, LayerNorm weight)."""
        d, hq, kq = self.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return d * (hq + 2 * kq) + hq * d + 3 * d * self.d_ff + d

    def param_count(self) -> int:
        """All parameters: ``V d`` (tied embedding) ``+ L * layer + d`` (final norm)."""
        return self.vocab_size * self.d_model + self.n_layers * self.layer_param_count() + self.d_model

    def replace(self, **changes) -> PaLMConfig:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


def _paper(name: str, n_layers: int, n_heads: int, d_model: int) -> PaLMConfig:
    # PaLM Table 1: V = 256k SentencePiece, head dim 256, d_ff = 4 d, MQA, T = 2048.
    return PaLMConfig(vocab_size=256000, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                      head_dim=256, d_ff=4 * d_model, max_seq_len=2048, name=name)


PRESETS: dict[str, PaLMConfig] = {
    "palm-8b": _paper("palm-8b", 32, 16, 4096),
    "palm-62b": _paper("palm-62b", 64, 32, 8192),
    "palm-540b": _paper("palm-540b", 118, 48, 18432),
    # Trains on a CPU in seconds (tests).
    "palm-tiny": PaLMConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, head_dim=16,
                            d_ff=256, max_seq_len=128, name="palm-tiny"),
    # CPU benchmarks.
    "palm-small": PaLMConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, head_dim=64,
                             d_ff=1024, max_seq_len=256, name="palm-small"),
    # ~1.01B parameters, for single-GPU benchmarks.
    "palm-1b": PaLMConfig(vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, head_dim=128,
                          d_ff=8192, max_seq_len=2048, name="palm-1b"),
}


def get_config(name: str, **overrides) -> PaLMConfig:
    """A fresh copy of preset ``name``, with optional field overrides.

    Raises ``ValueError`` listing the known names for an unknown one.
    """
    if name not in PRESETS:
        raise ValueError(f"name: unknown PaLM preset {name!r}; expected one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
