// The Python module of the extension. The ops themselves are registered with
// the torch dispatcher (TORCH_LIBRARY in ops/) when this library is loaded and
// are called as torch.ops.da2ext.*; this module only reports how it was built.
#include <pybind11/pybind11.h>

namespace {

bool built_with_cuda() {
#ifdef DA2EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "da2ext fused kernels (ops registered as torch.ops.da2ext.*)";
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled into this build.");
}
