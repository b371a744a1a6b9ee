// Fused masked cross-entropy on the CPU, and the Python bindings of every masked-CE op (CPU and CUDA).
//
// masked_ce_forward: for each row, pass 1 reads the logits once with an online softmax (running max and
// sum, chunk by chunk) and keeps exp(x - chunk max) in the gradient row (or a float scratch row for
// bf16/fp16); pass 2 turns that into the gradient. The gradient is thus written during the forward and
// the backward is a scale. Rows are spread over threads with at::parallel_for; the inner loops are
// compiled for AVX2+FMA and for the baseline ISA (masked_ce_cpu_rows.inc) and picked at run time.
//
// With inplace=true the gradient overwrites the logits buffer (no extra logits-sized memory); the caller
// (megatron_slung.loss.masked_ce) only does this when the user allows it.
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "masked_ce.h"
#include "registry.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace slung {
namespace masked_ce {

struct ForwardArgs {
  const void* x;
  int64_t V, x_stride;
  const int64_t* labels;
  const uint8_t* risk;
  const uint8_t* modes;
  const float* weights;
  int64_t ignore_index;
  Options opt;
  void* grad;  // nullptr: no gradient wanted
  int64_t grad_stride;
  void* per_token;
  void* ce;
  int8_t* kind;
};

struct StatsArgs {
  const void* x;
  int64_t V, x_stride;
  const int64_t* target;  // local column of the target, -1 when not in this shard
  void *m, *s, *q, *xt, *sx;
};

struct GradArgs {
  const void* x;
  int64_t V, x_stride;
  const int64_t* target;
  const void *lse, *a, *gt, *c;
  void* grad;
  int64_t grad_stride;
};

// The clamps in exp_approx are compares; with the default -ftrapping-math GCC keeps them as branches and
// does not vectorise the loop. FP exceptions are never enabled here, so tell it they cannot trap.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
namespace base {
#include "masked_ce_cpu_rows.inc"
}  // namespace base
#pragma GCC pop_options

#if defined(__x86_64__) && defined(__GNUC__)
#define SLUNG_HAVE_AVX2_COPY 1
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "masked_ce_cpu_rows.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

static bool use_avx2() {
#ifdef SLUNG_HAVE_AVX2_COPY
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// Gradient buffers are reused. A fresh logits-sized buffer costs a page fault per page on its first
// write: measured on the 2-core VM, first touching 500 MB took 530 ms in 4 KB pages and 150 ms in 2 MB
// transparent huge pages, against 50 ms for writing memory already mapped, and more threads did not make
// the faults faster. glibc returns such large blocks to the OS when they are freed, so every call paid
// this again. So a freed gradient buffer goes back to a small cache (what the CUDA caching allocator
// does on the GPU): the next call of a similar size reuses its pages. At most kMaxCached blocks, of at
// least kMinCached bytes (smaller ones glibc reuses itself), are held; SLUNG_GRAD_CACHE=0 turns the cache
// off and masked_ce_empty_cache() frees what it holds. A new block is advised to use transparent huge
// pages (512x fewer faults on its first use); SLUNG_NO_THP=1 turns the advice off. Neither changes values.
static bool env_off(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::string(v) == "0";
}

static bool use_thp() {
  static const bool on = [] {
    const char* v = std::getenv("SLUNG_NO_THP");
    return v == nullptr || std::string(v) != "1";
  }();
  return on;
}

class GradBufferCache {
 public:
  static constexpr size_t kMaxCached = 2;
  static constexpr size_t kMinCached = size_t(1) << 20;

  static GradBufferCache& get() {
    static GradBufferCache* cache = new GradBufferCache();  // never destroyed: tensors may outlive statics
    return *cache;
  }

  // An uninitialised CPU tensor of `sizes` and `dtype`, in a cached block when one fits (capacity in
  // [nbytes, 2 nbytes]: a small request does not pin a large block), else in a new one.
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const size_t nbytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
    if (nbytes < kMinCached) return at::empty(sizes, options);
    Block* block = enabled_ ? take(nbytes) : nullptr;
    if (block == nullptr) block = fresh(nbytes);
    return at::from_blob(block->data.get(), sizes, [block](void*) { GradBufferCache::get().give_back(block); },
                         options);
  }

  void clear() {
    std::vector<Block*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(free_);
    }
    for (Block* b : drop) delete b;
  }

 private:
  struct Block {
    at::DataPtr data;  // from torch's CPU allocator
    size_t capacity;
  };

  GradBufferCache() : enabled_(!env_off("SLUNG_GRAD_CACHE")) {}

  Block* take(size_t nbytes) {
    std::lock_guard<std::mutex> lock(mu_);
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if ((*it)->capacity >= nbytes && (*it)->capacity / 2 <= nbytes &&
          (best == free_.end() || (*it)->capacity < (*best)->capacity)) {
        best = it;
      }
    }
    if (best == free_.end()) return nullptr;
    Block* b = *best;
    free_.erase(best);
    return b;
  }

  static Block* fresh(size_t nbytes) {
    at::DataPtr data = c10::GetCPUAllocator()->allocate(nbytes);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (use_thp()) {
      constexpr uintptr_t kHuge = uintptr_t(2) << 20;
      const uintptr_t begin = (reinterpret_cast<uintptr_t>(data.get()) + kHuge - 1) & ~(kHuge - 1);
      const uintptr_t end = (reinterpret_cast<uintptr_t>(data.get()) + nbytes) & ~(kHuge - 1);
      if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // best effort
    }
#endif
    return new Block{std::move(data), nbytes};
  }

  // The tensor's storage is freed: keep its block (the most recent kMaxCached), free the oldest.
  void give_back(Block* block) {
    if (!enabled_) {
      delete block;
      return;
    }
    Block* drop = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.push_back(block);
      if (free_.size() > kMaxCached) {
        drop = free_.front();
        free_.erase(free_.begin());
      }
    }
    delete drop;  // outside the lock: freeing 500 MB takes a while
  }

  const bool enabled_;
  std::mutex mu_;
  std::vector<Block*> free_;  // oldest first
};

static at::Tensor new_grad_buffer(const at::Tensor& logits) {
  if (!logits.is_cpu()) return at::empty_like(logits, at::MemoryFormat::Contiguous);
  return GradBufferCache::get().empty(logits.sizes(), logits.options());
}

void empty_cache() { GradBufferCache::get().clear(); }

// Rows per task: at least ~64K elements, so small vocabularies don't drown in scheduling.
static int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

// The AVX2+FMA copy of the row loops when the CPU has it, else the baseline copy.
template <typename scalar_t, typename acc_t>
static void run_forward_rows(const ForwardArgs& p, int64_t begin, int64_t end) {
#ifdef SLUNG_HAVE_AVX2_COPY
  if (use_avx2()) return avx2::forward_rows<scalar_t, acc_t>(p, begin, end);
#endif
  base::forward_rows<scalar_t, acc_t>(p, begin, end);
}
template <typename scalar_t, typename acc_t>
static void run_stats_rows(const StatsArgs& p, int64_t begin, int64_t end) {
#ifdef SLUNG_HAVE_AVX2_COPY
  if (use_avx2()) return avx2::stats_rows<scalar_t, acc_t>(p, begin, end);
#endif
  base::stats_rows<scalar_t, acc_t>(p, begin, end);
}
template <typename scalar_t, typename acc_t>
static void run_grad_rows(const GradArgs& p, int64_t begin, int64_t end) {
#ifdef SLUNG_HAVE_AVX2_COPY
  if (use_avx2()) return avx2::grad_rows<scalar_t, acc_t>(p, begin, end);
#endif
  base::grad_rows<scalar_t, acc_t>(p, begin, end);
}

// ---------------------------------------------------------------------------------------- checks
static void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "masked_ce: logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.is_floating_point(), "masked_ce: logits must be floating point, got ", logits.scalar_type());
  TORCH_CHECK(logits.stride(1) == 1, "masked_ce: logits rows must be contiguous");
  TORCH_CHECK(logits.size(1) > 0, "masked_ce: empty vocabulary");
}

static void check_vector(const at::Tensor& t, const at::Tensor& logits, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0), "masked_ce: ", name, " must be [", logits.size(0),
              "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "masked_ce: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), "masked_ce: ", name, " is on ", t.device(), ", logits on ",
              logits.device());
  TORCH_CHECK(t.is_contiguous(), "masked_ce: ", name, " must be contiguous");
}

static at::ScalarType acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

static void check_tables(const at::Tensor& modes, const at::Tensor& weights, const at::Tensor& logits) {
  TORCH_CHECK(modes.numel() == 256 && modes.scalar_type() == at::kByte && modes.is_contiguous(),
              "masked_ce: modes must be a contiguous [256] uint8 table");
  TORCH_CHECK(weights.numel() == 256 && weights.scalar_type() == at::kFloat && weights.is_contiguous(),
              "masked_ce: weights must be a contiguous [256] float32 table");
  TORCH_CHECK(modes.device() == logits.device() && weights.device() == logits.device(),
              "masked_ce: policy tables must be on the device of the logits");
}

#ifdef SLUNG_WITH_CUDA
// csrc/masked_ce_cuda.cu
std::vector<at::Tensor> forward_cuda(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& risk,
                                     const at::Tensor& modes, const at::Tensor& weights, int64_t ignore_index,
                                     const Options& opt, bool compute_grad, bool inplace, int64_t variant);
std::vector<at::Tensor> row_stats_cuda(const at::Tensor& logits, const at::Tensor& target);
at::Tensor grad_cuda(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& a, const at::Tensor& gt,
                     const at::Tensor& c, const at::Tensor& target, at::Tensor out);
std::vector<at::Tensor> level_stats_cuda(const at::Tensor& per_token, const at::Tensor& ce, const at::Tensor& kind,
                                         const at::Tensor& risk);
#endif

#define SLUNG_CUDA_OR_FAIL(call)                                                                      \
  do {                                                                                               \
    if (logits.is_cuda()) {                                                                          \
      SLUNG_CUDA_CALL(call);                                                                         \
    }                                                                                                \
    TORCH_CHECK(logits.device().is_cpu(), "masked_ce: no kernel for device ", logits.device());      \
  } while (0)
#ifdef SLUNG_WITH_CUDA
#define SLUNG_CUDA_CALL(call) return call
#else
#define SLUNG_CUDA_CALL(call) TORCH_CHECK(false, "masked_ce: megatron_slung._C was built without CUDA")
#endif

// ---------------------------------------------------------------------------------------- ops
// Returns (per_token [N] acc, ce [N] acc, kind [N] int8, grad [N, V] logits dtype or empty).
std::vector<at::Tensor> forward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& risk,
                                const at::Tensor& modes, const at::Tensor& weights, int64_t ignore_index,
                                double label_smoothing, double z_loss, double unlikelihood_eps, bool compute_grad,
                                bool inplace, int64_t variant) {
  check_logits(logits);
  check_vector(labels, logits, at::kLong, "labels");
  check_vector(risk, logits, at::kByte, "risk");
  check_tables(modes, weights, logits);
  TORCH_CHECK(!inplace || logits.is_contiguous(), "masked_ce: inplace needs contiguous logits");
  const Options opt{label_smoothing, z_loss, unlikelihood_eps, logits.size(1)};
  SLUNG_CUDA_OR_FAIL(forward_cuda(logits, labels, risk, modes, weights, ignore_index, opt, compute_grad, inplace,
                                  variant));

  const int64_t N = logits.size(0), V = logits.size(1);
  // every label must be ignore_index or a column (checked up front: no half-written output on error)
  const int64_t* lab = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(lab[i] == ignore_index || (lab[i] >= 0 && lab[i] < V), "masked_ce: label ", lab[i], " at row ", i,
                " is outside the vocabulary [0, ", V, ") and is not ignore_index=", ignore_index);
  }
  const auto acc = acc_type(logits);
  at::Tensor per_token = at::empty({N}, logits.options().dtype(acc));
  at::Tensor ce = at::empty({N}, logits.options().dtype(acc));
  at::Tensor kind = at::empty({N}, logits.options().dtype(at::kChar));
  at::Tensor grad;
  if (compute_grad) grad = inplace ? logits : new_grad_buffer(logits);

  ForwardArgs p{logits.data_ptr(), V, logits.stride(0), lab, risk.data_ptr<uint8_t>(), modes.data_ptr<uint8_t>(),
                weights.data_ptr<float>(), ignore_index, opt, compute_grad ? grad.data_ptr() : nullptr,
                compute_grad ? grad.stride(0) : 0, per_token.data_ptr(), ce.data_ptr(), kind.data_ptr<int8_t>()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "masked_ce_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      run_forward_rows<scalar_t, acc_t>(p, begin, end);
    });
  });
  return {per_token, ce, kind, compute_grad ? grad : at::Tensor()};
}

// Returns (m, s, q, xt, sx), each [N] acc: row max, sum exp(x - m), the same sum without the target column
// (= s when target < 0), target logit (0 if target < 0), sum x.
std::vector<at::Tensor> row_stats(const at::Tensor& logits, const at::Tensor& target) {
  check_logits(logits);
  check_vector(target, logits, at::kLong, "target");
  SLUNG_CUDA_OR_FAIL(row_stats_cuda(logits, target));
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(t[i] < V && t[i] >= -1, "masked_ce: target column ", t[i], " at row ", i, " is outside [-1, ", V, ")");
  }
  auto opts = logits.options().dtype(acc_type(logits));
  at::Tensor m = at::empty({N}, opts), s = at::empty({N}, opts), q = at::empty({N}, opts), xt = at::empty({N}, opts),
             sx = at::empty({N}, opts);
  StatsArgs p{logits.data_ptr(), V, logits.stride(0), t, m.data_ptr(), s.data_ptr(), q.data_ptr(), xt.data_ptr(),
              sx.data_ptr()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "masked_ce_row_stats_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      run_stats_rows<scalar_t, acc_t>(p, begin, end);
    });
  });
  return {m, s, q, xt, sx};
}

// grad = a * exp(x - lse) + c, and gt at the target column; into `out` (may be the logits) or a new tensor.
at::Tensor grad(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& a, const at::Tensor& gt,
                const at::Tensor& c, const at::Tensor& target, c10::optional<at::Tensor> out_opt) {
  check_logits(logits);
  const auto acc = acc_type(logits);
  check_vector(lse, logits, acc, "lse");
  check_vector(a, logits, acc, "a");
  check_vector(gt, logits, acc, "gt");
  check_vector(c, logits, acc, "c");
  check_vector(target, logits, at::kLong, "target");
  at::Tensor out = out_opt.has_value() ? *out_opt : new_grad_buffer(logits);
  TORCH_CHECK(out.sizes() == logits.sizes() && out.scalar_type() == logits.scalar_type() && out.stride(1) == 1 &&
                  out.device() == logits.device(),
              "masked_ce: out must be like the logits");
  SLUNG_CUDA_OR_FAIL(grad_cuda(logits, lse, a, gt, c, target, out));
  const int64_t N = logits.size(0), V = logits.size(1);
  GradArgs p{logits.data_ptr(), V, logits.stride(0), target.data_ptr<int64_t>(), lse.data_ptr(), a.data_ptr(),
             gt.data_ptr(), c.data_ptr(), out.data_ptr(), out.stride(0)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "masked_ce_grad_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      run_grad_rows<scalar_t, acc_t>(p, begin, end);
    });
  });
  return out;
}

// Returns (loss_sum scalar acc, num_tokens scalar int64, level_count [256] int64, level_ce_sum [256] float32).
// Sums run in a fixed order (in double), so results are reproducible.
std::vector<at::Tensor> level_stats(const at::Tensor& per_token, const at::Tensor& ce, const at::Tensor& kind,
                                    const at::Tensor& risk) {
  TORCH_CHECK(per_token.dim() == 1 && ce.sizes() == per_token.sizes() && kind.sizes() == per_token.sizes() &&
                  risk.sizes() == per_token.sizes(),
              "masked_ce: level_stats inputs must all be [N]");
  TORCH_CHECK(kind.scalar_type() == at::kChar && risk.scalar_type() == at::kByte, "masked_ce: kind int8, risk uint8");
  TORCH_CHECK(per_token.scalar_type() == ce.scalar_type(), "masked_ce: per_token and ce must share a dtype");
  const at::Tensor& logits = per_token;  // for the device dispatch macro
  SLUNG_CUDA_OR_FAIL(level_stats_cuda(per_token, ce, kind, risk));
  const int64_t N = per_token.size(0);
  at::Tensor loss_sum = at::empty({}, per_token.options());
  at::Tensor num_tokens = at::empty({}, per_token.options().dtype(at::kLong));
  at::Tensor level_count = at::zeros({256}, per_token.options().dtype(at::kLong));
  at::Tensor level_ce_sum = at::empty({256}, per_token.options().dtype(at::kFloat));
  const int8_t* k = kind.contiguous().data_ptr<int8_t>();
  const uint8_t* r = risk.contiguous().data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES(per_token.scalar_type(), "masked_ce_level_stats_cpu", [&] {
    at::Tensor pt = per_token.contiguous(), cec = ce.contiguous();
    const scalar_t* l = pt.data_ptr<scalar_t>();
    const scalar_t* c = cec.data_ptr<scalar_t>();
    double total = 0.0, ce_sum[256] = {0};
    int64_t carries = 0;
    int64_t* count = level_count.data_ptr<int64_t>();
    for (int64_t i = 0; i < N; ++i) {
      total += double(l[i]);
      carries += k[i] == kKindCarries;
      if (k[i] != kKindSkipped) {
        count[r[i]] += 1;
        ce_sum[r[i]] += double(c[i]);
      }
    }
    loss_sum.fill_(total);
    num_tokens.fill_(carries);
    float* out = level_ce_sum.data_ptr<float>();
    for (int l2 = 0; l2 < 256; ++l2) out[l2] = float(ce_sum[l2]);
  });
  return {loss_sum, num_tokens, level_count, level_ce_sum};
}

}  // namespace masked_ce

void register_masked_ce(pybind11::module_& m) {
  namespace py = pybind11;
  using namespace masked_ce;
  m.attr("masked_ce_modes") = py::dict(py::arg("ce") = int(kModeCE), py::arg("ignore") = int(kModeIgnore),
                                       py::arg("unlikelihood") = int(kModeUnlikelihood));
  m.def("masked_ce_forward", &forward,
        "Fused masked CE forward (+ gradient): (per_token, ce, kind, grad) for logits [N, V] (CPU or CUDA)",
        py::arg("logits"), py::arg("labels"), py::arg("risk"), py::arg("modes"), py::arg("weights"),
        py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("z_loss"), py::arg("unlikelihood_eps"),
        py::arg("compute_grad"), py::arg("inplace"), py::arg("variant") = 0);
  m.def("masked_ce_row_stats", &row_stats,
        "Per-row (max, sum exp(x - max), the same without the target, target logit, sum x) of a vocab shard",
        py::arg("logits"), py::arg("target"));
  m.def("masked_ce_grad", &grad, "Gradient a * exp(x - lse) + c of each row, gt at the target column",
        py::arg("logits"), py::arg("lse"), py::arg("a"), py::arg("gt"), py::arg("c"), py::arg("target"),
        py::arg("out") = py::none());
  m.def("masked_ce_empty_cache", &empty_cache,
        "Free the CPU gradient buffers kept for reuse (see SLUNG_GRAD_CACHE in docs/masked_loss.md)");
  m.def("masked_ce_level_stats", &level_stats,
        "(loss_sum, num_tokens, level_count, level_ce_sum) from per-token results, in a fixed order",
        py::arg("per_token"), py::arg("ce"), py::arg("kind"), py::arg("risk"));
}

}  // namespace slung
