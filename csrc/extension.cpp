// The Python module of the extension. The ops themselves are registered with
// the torch dispatcher (TORCH_LIBRARY in ops/) when this library is loaded and
// are called as torch.ops.da2ext.*; this module only reports how it was built.
#include <pybind11/pybind11.h>

// setup.py writes this header for each build (build/generated/): the torch, CUDA
// and architectures the build saw. Other builds (a bare compile) report "".
#if defined(__has_include)
#if __has_include("da2ext_build_info.h")
#include "da2ext_build_info.h"
#endif
#endif
#ifndef DA2EXT_BUILT_TORCH
#define DA2EXT_BUILT_TORCH ""
#define DA2EXT_BUILT_CUDA ""
#define DA2EXT_BUILT_CUDA_ARCHS ""
#endif

namespace {

bool built_with_cuda() {
#ifdef DA2EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// What this binary was compiled with, for `python -m da2ext info` and the version
// check at import (da2ext/ops/_extension.py). OpenMP is what the compiler saw
// (_OPENMP, a yyyymm date): without it at::parallel_for runs on one thread.
pybind11::dict build_info() {
  pybind11::dict info;
  info["torch"] = DA2EXT_BUILT_TORCH;
  info["cuda"] = built_with_cuda() ? pybind11::object(pybind11::str(DA2EXT_BUILT_CUDA)) : pybind11::none();
  info["cuda_archs"] =
      built_with_cuda() ? pybind11::object(pybind11::str(DA2EXT_BUILT_CUDA_ARCHS)) : pybind11::none();
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_version"] = static_cast<long>(_OPENMP);
#else
  info["openmp"] = false;
  info["openmp_version"] = pybind11::none();
#endif
  info["cplusplus"] = static_cast<long>(__cplusplus);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "da2ext fused kernels (ops registered as torch.ops.da2ext.*)";
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled into this build.");
  m.def("build_info", &build_info,
        "What this build was compiled with: torch, cuda, cuda_archs, openmp, openmp_version, cplusplus.");
}
