"""palm_fast: fused Triton (GPU) and C++ (CPU) kernels for PaLM-style transformers.

* ``palm_fast.reference``: plain PyTorch definitions of every op, block and the model.
* ``palm_fast.ops``: the fast functional ops (torch custom ops ``palm_fast::*``).
* ``palm_fast.nn``: fast modules, state_dict-compatible with the reference ones.
* ``palm_fast.config``: model presets (PaLM 8B/62B/540B from the paper, small ones).
* ``palm_fast.flops``: model/hardware FLOPs per token, MFU and HFU (PaLM Appendix B).
* ``palm_fast.generate``: batched generation with the MQA KV cache (``palm_fast.generation``).
"""
from . import config, flops, nn, ops, reference  # noqa: F401
from .config import PRESETS, PaLMConfig, get_config  # noqa: F401
from .generation import generate  # noqa: F401

__version__ = "0.1.0"
from . import patching  # noqa: F401,E402
from .patching import PatchReport, patch, register, unpatch  # noqa: F401,E402
