// Shared declarations for palm_fast's C++ CPU kernels.
//
// Each op family lives in its own csrc/<op>.cpp and exposes one function
// `bind_<op>(py::module_&)` that adds its entry points to palm_fast._C;
// bindings.cpp calls them all.  Conventions (see DESIGN.md): kernels are
// templated over the element type (float, at::Half, at::BFloat16), vectorised
// with at::vec::Vectorized<float>, parallel with at::parallel_for, and
// accumulate in fp32.  Argument checking happens in Python (palm_fast/ops);
// the TORCH_CHECKs here only guard memory safety.
#pragma once

#include <torch/extension.h>

namespace palm_fast {

void bind_rope(pybind11::module_& m);
void bind_swiglu(pybind11::module_& m);
void bind_layer_norm(pybind11::module_& m);
void bind_mqa_decode(pybind11::module_& m);
void bind_mqa_attention(pybind11::module_& m);

}  // namespace palm_fast
