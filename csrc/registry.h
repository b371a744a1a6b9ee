// Each component of megatron_slung._C registers its functions here; bindings.cpp calls them all.
// Adding a component: write csrc/<component>.cpp with a register_<component>(m) and list it below.
#pragma once
#include <torch/extension.h>

namespace slung {
void register_dataset_helpers(pybind11::module_& m);  // csrc/dataset_helpers.cpp
void register_masked_ce(pybind11::module_& m);        // csrc/masked_ce_cpu.cpp (+ masked_ce_cuda.cu)
}  // namespace slung
