// The one pybind11 module, palm_fast._C: every op family registers itself here.
#include "palm_fast.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "palm_fast C++ CPU kernels";
  palm_fast::bind_rope(m);
  palm_fast::bind_swiglu(m);
  palm_fast::bind_layer_norm(m);
  palm_fast::bind_mqa_decode(m);
  palm_fast::bind_mqa_attention(m);
  palm_fast::bind_lm_loss(m);
}
