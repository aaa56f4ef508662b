"""FLOPs per token, MFU and HFU exactly as PaLM (arXiv 2204.02311) Appendix B.

With N parameters (tied embedding included), L layers, H query heads, head
dim Q and sequence length T:

* model FLOPs per token    = 6 N + 12 L H Q T
  (forward + backward matmuls; the attention term counts the full T x T score
  matrix, no causal halving; multi-query attention does not change it).
* hardware FLOPs per token = a N + b L H Q T, with (a, b) by recomputation:
  "none" (6, 12), "attention" (6, 16), "palm540b" (7.5, 16: 75% of the
  non-attention forward and all attention forward recomputed), "full" (8, 16: the whole
  forward recomputed). "blocks" is what ``palm_fast.nn.PaLM(recompute="full")`` runs: every
  transformer block's forward recomputed (``torch.utils.checkpoint`` per block), the tied
  embedding / head and the final norm not: ``6 N + 2 N_blocks + 16 L H Q T`` with N_blocks
  the blocks' parameters (a ``PaLMConfig`` is needed to know them).
* MFU = tokens/s * model FLOPs per token / (n_devices * peak FLOP/s per device);
  HFU the same with hardware FLOPs per token.

The policy names what the training step checkpoints. A fused attention backward (FlashAttention,
torch's SDPA kernels, our C++ MQA kernel) also recomputes the scores ``QK^T`` from the saved
q, k and log-sum-exp; "none" does not count that part of the kernel (it is the paper's
accounting of what is stored vs recomputed, not a count of a kernel's instructions).

A model is a ``PaLMConfig`` or explicit ``(n_params, n_layers, n_heads, head_dim)``
(a ``ModelShape`` or a plain 4-tuple), so published figures of other models can
be checked too.
"""
from __future__ import annotations

from typing import NamedTuple

from .config import PaLMConfig

__all__ = ["ModelShape", "RECOMPUTE", "DATASHEET_PEAK_FLOPS", "model_flops_per_token",
           "hardware_flops_per_token", "mfu", "hfu", "datasheet_peak_flops"]

# (a, b): hardware FLOPs per token = a N + b L H Q T.
RECOMPUTE: dict[str, tuple[float, float]] = {
    "none": (6.0, 12.0),
    "attention": (6.0, 16.0),
    "palm540b": (7.5, 16.0),
    "full": (8.0, 16.0),
}

# Datasheet peak dense bf16 FLOP/s per device; the first key found in the device name wins
# (more specific names first).
DATASHEET_PEAK_FLOPS: dict[str, float] = {
    "h100pcie": 756e12,
    "h100nvl": 835e12,
    "h100": 989e12,    # H100 SXM
    "h200nvl": 835e12,
    "h200": 989e12,    # H200 SXM
    "a100": 312e12,
    "tpu-v4": 275e12,
}


class ModelShape(NamedTuple):
    """What the FLOPs formulas need: N, L, H (query heads), Q (head dim)."""

    n_params: float
    n_layers: int
    n_heads: int
    head_dim: int


def _shape(model) -> ModelShape:
    if isinstance(model, PaLMConfig):
        return ModelShape(model.param_count(), model.n_layers, model.n_heads, model.head_dim)
    if isinstance(model, tuple) and len(model) == 4:
        return ModelShape(*model)
    raise TypeError("model: expected a PaLMConfig or (n_params, n_layers, n_heads, head_dim), "
                    f"got {type(model).__name__}")


def _flops(model, seq_len: int, a: float, b: float) -> float:
    if seq_len <= 0:
        raise ValueError(f"seq_len: expected a positive integer, got {seq_len}")
    n, l, h, q = _shape(model)
    return a * n + b * l * h * q * seq_len


def model_flops_per_token(model, seq_len: int) -> float:
    """``6 N + 12 L H Q T`` FLOPs per trained token (no rematerialisation)."""
    return _flops(model, seq_len, *RECOMPUTE["none"])


def hardware_flops_per_token(model, seq_len: int, recompute: str = "none") -> float:
    """``a N + b L H Q T`` FLOPs per trained token for a recomputation policy
    (one of ``RECOMPUTE``: "none", "attention", "palm540b", "full"), or "blocks":
    ``6 N + 2 N_blocks + 16 L H Q T`` (every block's forward recomputed; ``model`` a
    ``PaLMConfig``)."""
    if recompute == "blocks":
        if not isinstance(model, PaLMConfig):
            raise TypeError("model: recompute='blocks' needs a PaLMConfig (the blocks' parameter "
                            f"count), got {type(model).__name__}")
        n_blocks = model.n_layers * model.layer_param_count()
        return _flops(model, seq_len, 6.0, 16.0) + 2.0 * n_blocks
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute: expected one of {list(RECOMPUTE) + ['blocks']}, got {recompute!r}")
    return _flops(model, seq_len, *RECOMPUTE[recompute])


def _utilisation(tokens_per_s, flops_per_token, n_devices, peak_flops_per_device) -> float:
    if n_devices <= 0 or peak_flops_per_device <= 0:
        raise ValueError("n_devices and peak_flops_per_device: expected positive numbers, got "
                         f"{n_devices} and {peak_flops_per_device}")
    return tokens_per_s * flops_per_token / (n_devices * peak_flops_per_device)


def mfu(tokens_per_s: float, model, seq_len: int, n_devices: int = 1,
        peak_flops_per_device: float = DATASHEET_PEAK_FLOPS["h100"]) -> float:
    """Model FLOPs utilisation, a fraction in [0, 1]."""
    return _utilisation(tokens_per_s, model_flops_per_token(model, seq_len), n_devices,
                        peak_flops_per_device)


def hfu(tokens_per_s: float, model, seq_len: int, n_devices: int = 1,
        peak_flops_per_device: float = DATASHEET_PEAK_FLOPS["h100"],
        recompute: str = "none") -> float:
    """Hardware FLOPs utilisation (rematerialisation counted), a fraction."""
    return _utilisation(tokens_per_s, hardware_flops_per_token(model, seq_len, recompute),
                        n_devices, peak_flops_per_device)


def datasheet_peak_flops(device_name: str) -> float | None:
    """Datasheet bf16 peak for a device name such as ``torch.cuda.get_device_name()``
    ("NVIDIA H100 80GB HBM3" -> 989e12); None when unknown."""
    name = device_name.lower().replace(" ", "")
    for key, peak in DATASHEET_PEAK_FLOPS.items():
        if key.replace("-", "") in name:
            return peak
    return None
