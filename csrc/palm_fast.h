// Shared declarations for palm_fast's C++ CPU kernels.
//
// Each op family lives in its own csrc/<op>.cpp and exposes one function
// `bind_<op>(py::module_&)` that adds its entry points to palm_fast._C;
// bindings.cpp calls them all.  Conventions (see DESIGN.md): kernels are
// templated over the element type (float, at::Half, at::BFloat16), vectorised
// with at::vec::Vectorized<float>, parallel with at::parallel_for, and
// accumulate in fp32.  Argument checking happens in Python (palm_fast/ops);
// the PF_CHECKs here only guard memory safety.
#pragma once

#include <torch/extension.h>

#include <stdexcept>
#include <string>

namespace palm_fast {

inline std::string check_message(const char* cond, std::string msg) {
  return msg.empty() ? std::string("palm_fast: check failed: ") + cond : msg;
}

// A failed check throws std::invalid_argument, which `guarded` (below) raises as a Python
// RuntimeError. Not TORCH_CHECK: constructing a c10::Error captures a backtrace of the whole
// stack, and on the GPU image (torch 2.11, CUDA 13, GCC 13.3) that stack walk segfaulted in
// libgcc's unwinder (linear_search_fdes, as in pytorch/pytorch#117597) before any handler
// could run; a plain exception caught one frame up never walks past our own frames.
#define PF_CHECK(cond, ...)                                                                  \
  do {                                                                                       \
    if (!(cond)) throw std::invalid_argument(::palm_fast::check_message(#cond, c10::str(__VA_ARGS__))); \
  } while (0)

// A bound entry point that raises its errors as Python RuntimeErrors itself: a C++
// exception (a failed PF_CHECK) is caught here, its message set as the Python error and
// pybind11::error_already_set thrown, which pybind11 turns back into the Python error
// without consulting its exception translators. On the GPU image (torch 2.11, CUDA 13) an
// exception left to the translators crashed the process (segfault) instead of raising.
template <typename R, typename... Args>
auto guarded(R (*fn)(Args...)) {
  return [fn](Args... args) -> R {
    try {
      return fn(std::forward<Args>(args)...);
    } catch (const pybind11::error_already_set&) {
      throw;
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    } catch (const std::exception& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
    throw pybind11::error_already_set();
  };
}

void bind_rope(pybind11::module_& m);
void bind_swiglu(pybind11::module_& m);
void bind_layer_norm(pybind11::module_& m);
void bind_mqa_decode(pybind11::module_& m);
void bind_mqa_attention(pybind11::module_& m);

}  // namespace palm_fast
