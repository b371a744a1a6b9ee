// The one Python module of the extension: megatron_slung._C.
#include "registry.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron-slung native helpers: masked cross-entropy kernels and dataset index builders";
#ifdef SLUNG_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  slung::register_dataset_helpers(m);
  slung::register_masked_ce(m);
}
