// Fused masked cross-entropy on the CPU. Filled in by the loss kernel work.
#include "registry.h"

namespace slung {
void register_masked_ce(pybind11::module_& m) {}
}  // namespace slung
