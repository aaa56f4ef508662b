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

// A bound entry point that runs without the GIL and raises its errors as Python
// RuntimeErrors itself. The kernel runs with the GIL released (as torch's own ops do): no
// kernel touches a Python object, and a Python thread beside a long decode or LayerNorm
// call was otherwise frozen for the whole call. A C++ exception (a failed TORCH_CHECK) is
// caught once the GIL is back (the release guard unwinds first), its message set as the
// Python error and pybind11::error_already_set thrown, which pybind11 turns back into the
// Python error without consulting its exception translators (the message, without a C++
// backtrace).
// Known issue: on the GPU image (torch 2.11, CUDA 13, GCC 13.3 build) any exception thrown
// from this extension still segfaults, with this wrapper or without, and with a plain
// std::exception instead of TORCH_CHECK (benchmarks/results/h100/probes/exc_probe.log); the
// cause is not found. The public ops check their arguments in Python before calling here.
template <typename R, typename... Args>
auto guarded(R (*fn)(Args...)) {
  return [fn](Args... args) -> R {
    std::string message;
    try {
      pybind11::gil_scoped_release no_gil;
      return fn(std::forward<Args>(args)...);
    } catch (const c10::Error& e) {
      message = e.what_without_backtrace();
    } catch (const std::exception& e) {
      message = e.what();
    }
    PyErr_SetString(PyExc_RuntimeError, message.c_str());
    throw pybind11::error_already_set();
  };
}

void bind_rope(pybind11::module_& m);
void bind_swiglu(pybind11::module_& m);
void bind_layer_norm(pybind11::module_& m);
void bind_mqa_decode(pybind11::module_& m);
void bind_mqa_attention(pybind11::module_& m);
void bind_lm_loss(pybind11::module_& m);

}  // namespace palm_fast
