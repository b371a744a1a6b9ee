// Dataset index builders (document shuffle, sample index, blending index). Filled in by the data pipeline.
#include "registry.h"

namespace slung {
void register_dataset_helpers(pybind11::module_& m) {}
}  // namespace slung
