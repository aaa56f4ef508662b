"""Public functional ops. Each is a ``palm_fast::`` torch custom op (CPU -> C++,
CUDA -> Triton) with fake kernel and autograd, behind a checked Python function; except
``tied_lm_loss``, a composite of ATen ops with its own backward (it traces under
torch.compile as it is)."""
from .block import (  # noqa: F401
    causal_mqa_attention,
    fused_input_projection,
    fused_output_projection,
    parallel_block,
)
from .layer_norm import add_layer_norm, layer_norm  # noqa: F401
from .lm_loss import tied_lm_loss  # noqa: F401
from .mqa_decode import mqa_decode, rope_append  # noqa: F401
from .rope import rope, rope_  # noqa: F401
from .swiglu import swiglu  # noqa: F401
