// Dataset index builders for the GPT dataset: the sample index and the blending index.
// Python equivalents (used when the extension is missing, and as the reference in tests) are in
// megatron_slung/data/helpers.py; both must give identical arrays.
#include <pybind11/numpy.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "registry.h"

namespace py = pybind11;

namespace slung {
namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using F64Array = py::array_t<double, py::array::c_style | py::array::forcecast>;

// Row i of the result is (position in doc_order, token offset in that document) of global token
// i * seq_length of the stream made by concatenating the documents in doc_order. Sample i is the
// seq_length + 1 tokens from row i to row i + 1 inclusive, so consecutive samples share one token.
// Empty documents are skipped: a row always points at an existing token.
py::array_t<int64_t> build_sample_idx(const I64Array& doc_lengths_, const I64Array& doc_order_,
                                      int64_t seq_length, int64_t num_samples) {
  if (doc_lengths_.ndim() != 1 || doc_order_.ndim() != 1)
    throw std::invalid_argument("build_sample_idx: doc_lengths and doc_order must be 1-D");
  if (seq_length < 1) throw std::invalid_argument("build_sample_idx: seq_length must be >= 1");
  if (num_samples < 0) throw std::invalid_argument("build_sample_idx: num_samples must be >= 0");
  const int64_t num_docs = doc_lengths_.shape(0);
  const int64_t n = doc_order_.shape(0);
  const int64_t* lengths = doc_lengths_.data();
  const int64_t* order = doc_order_.data();

  py::array_t<int64_t> result({num_samples + 1, static_cast<int64_t>(2)});
  int64_t* out = result.mutable_data();
  std::string error;
  {
    py::gil_scoped_release release;
    int64_t pos = 0, offset = 0;  // where the next sample starts (offset may run past the document)
    for (int64_t i = 0; i <= num_samples && error.empty(); ++i) {
      while (true) {  // move (pos, offset) onto an existing token
        if (pos >= n) {
          error = "build_sample_idx: the documents hold too few tokens for " + std::to_string(num_samples) +
                  " samples of " + std::to_string(seq_length) + " + 1 tokens";
          break;
        }
        const int64_t doc = order[pos];
        if (doc < 0 || doc >= num_docs) {
          error = "build_sample_idx: doc_order[" + std::to_string(pos) + "] = " + std::to_string(doc) +
                  " is not a document id (0.." + std::to_string(num_docs - 1) + ")";
          break;
        }
        if (offset < lengths[doc]) break;
        offset -= lengths[doc];
        ++pos;
      }
      out[2 * i] = pos;
      out[2 * i + 1] = offset;
      offset += seq_length;
    }
  }
  if (!error.empty()) throw std::invalid_argument(error);
  return result;
}

// Greedy blending: step i takes the dataset whose share lags its weight most, i.e. the largest
// weights[k] * (i + 1) - count[k] (the lowest k on ties). Returns (dataset index per step, int16;
// sample index within that dataset, int64).
py::tuple build_blending_indices(const F64Array& weights_, int64_t size) {
  if (weights_.ndim() != 1 || weights_.shape(0) < 1)
    throw std::invalid_argument("build_blending_indices: weights must be a non-empty 1-D array");
  if (weights_.shape(0) > std::numeric_limits<int16_t>::max())
    throw std::invalid_argument("build_blending_indices: at most 32767 datasets");
  if (size < 0) throw std::invalid_argument("build_blending_indices: size must be >= 0");
  const int64_t k = weights_.shape(0);
  const std::vector<double> weights(weights_.data(), weights_.data() + k);
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  int16_t* which = dataset_index.mutable_data();
  int64_t* within = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> count(k, 0);
    for (int64_t i = 0; i < size; ++i) {
      const double steps = static_cast<double>(i + 1);
      int64_t best = 0;
      double best_lag = weights[0] * steps - static_cast<double>(count[0]);
      for (int64_t d = 1; d < k; ++d) {
        const double lag = weights[d] * steps - static_cast<double>(count[d]);
        if (lag > best_lag) {
          best_lag = lag;
          best = d;
        }
      }
      which[i] = static_cast<int16_t>(best);
      within[i] = count[best]++;
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

void register_dataset_helpers(pybind11::module_& m) {
  m.def("build_sample_idx", &build_sample_idx, py::arg("doc_lengths"), py::arg("doc_order"), py::arg("seq_length"),
        py::arg("num_samples"),
        "Sample index [num_samples + 1, 2] of (position in doc_order, offset) for GPT samples of seq_length + 1 tokens");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "Greedy blending index: (dataset_index int16 [size], dataset_sample_index int64 [size])");
}

}  // namespace slung
