// Fused masked cross-entropy on CUDA: the algorithm of masked_ce_cpu.cpp, one row per thread block.
//
// Pass 1 reads the row with 16-byte loads, each thread keeping an online softmax (running max and sum of
// exponentials) over the columns other than the target, and the sum of all the logits; a warp-shuffle +
// shared-memory tree combines the threads in a fixed order, and the target's own term is folded in after
// (fold_target), so the non-target mass q is summed on its own. finish_row (masked_ce.h) turns these into the
// loss and the gradient coefficients a, gt, c; pass 2 writes g = a * exp(x - lse) + c (gt at the target)
// with 16-byte streaming stores. The "cached" variants keep the first part of the row in shared memory during
// pass 1 so that pass 2 reads it from there instead of from L2/HBM; the "stream" variants re-read the row
// (usually from L2). Results are deterministic: every row is reduced by one block in a fixed order, the
// per-level statistics by a separate kernel in a fixed order, and nothing uses floating-point atomics.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <limits>
#include <type_traits>
#include <vector>

#include "masked_ce.h"

namespace slung {
namespace masked_ce {
namespace {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// VEC elements of T in one aligned pack (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }  // ex2.approx: ~2 ulp
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

// Loads: kKeep leaves the line in L2 for a second read (ld.global.cg); kLast marks it evict-first (ld.cs).
enum LoadHint { kKeep = 0, kLast = 1 };

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p, LoadHint hint) {
  Pack<T, VEC> out;
  if constexpr (sizeof(Pack<T, VEC>) == 16) {
    const uint4* q = reinterpret_cast<const uint4*>(p);
    uint4 r = hint == kLast ? __ldcs(q) : __ldcg(q);
    out = *reinterpret_cast<Pack<T, VEC>*>(&r);
  } else {
    out = *reinterpret_cast<const Pack<T, VEC>*>(p);
  }
  return out;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  if constexpr (sizeof(Pack<T, VEC>) == 16) {
    __stcs(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&v));  // streaming: evict first
  } else {
    *reinterpret_cast<Pack<T, VEC>*>(p) = v;
  }
}

// Elements before the first VEC-aligned element of a row (0 when VEC is 1).
template <typename T, int VEC>
__device__ __forceinline__ int64_t row_head(const T* row, int64_t V) {
  if constexpr (VEC == 1) {
    return 0;
  } else {
    const uintptr_t mis = reinterpret_cast<uintptr_t>(row) % (VEC * sizeof(T));
    const int64_t head = mis == 0 ? 0 : int64_t((VEC * sizeof(T) - mis) / sizeof(T));
    return head < V ? head : V;
  }
}

template <typename acc_t>
struct RowStats {
  acc_t m, s, sx;
};

// (m, s) <- online-softmax merge of (m, s) and (m2, s2).
template <typename acc_t>
__device__ __forceinline__ void merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  const acc_t mn = m > m2 ? m : m2;
  if (mn == -std::numeric_limits<acc_t>::infinity()) return;  // both empty
  s = s * fast_exp(m - mn) + s2 * fast_exp(m2 - mn);
  m = mn;
}

// sx takes every column; (m, s) every column but the target (its term is folded in after the reduction).
template <typename acc_t>
__device__ __forceinline__ void add_value(acc_t& m, acc_t& s, acc_t& sx, acc_t v, bool is_target) {
  sx += v;
  if (is_target || v == -std::numeric_limits<acc_t>::infinity()) return;  // (no NaN while m is -inf)
  if (v > m) {
    s = s * fast_exp(m - v) + acc_t(1);
    m = v;
  } else {
    s += fast_exp(v - m);
  }
}

// Warp-wide merge of the lanes' (m, s, sx) by butterfly shuffles; every lane gets the result.
template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> warp_reduce(RowStats<acc_t> st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, st.m, offset);
    const acc_t s2 = __shfl_xor_sync(0xffffffffu, st.s, offset);
    st.sx += __shfl_xor_sync(0xffffffffu, st.sx, offset);
    merge(st.m, st.s, m2, s2);
  }
  return st;
}

// Block-wide merge of every thread's (m, s, sx), in a fixed order; every thread gets the result.
template <typename acc_t, int THREADS>
__device__ RowStats<acc_t> block_reduce(RowStats<acc_t> st) {
  constexpr int kWarps = THREADS / 32;
  __shared__ acc_t sm_m[kWarps], sm_s[kWarps], sm_x[kWarps];
  __shared__ RowStats<acc_t> result;
  st = warp_reduce(st);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sm_m[warp] = st.m;
    sm_s[warp] = st.s;
    sm_x[warp] = st.sx;
  }
  __syncthreads();
  if (warp == 0) {
    RowStats<acc_t> w{-std::numeric_limits<acc_t>::infinity(), acc_t(0), acc_t(0)};
    if (lane < kWarps) w = {sm_m[lane], sm_s[lane], sm_x[lane]};
    w = warp_reduce(w);
    if (lane == 0) result = w;
  }
  __syncthreads();
  return result;
}

// Pass 1 over one row: (m, s) over the columns other than t (t < 0: all of them), sx over all of them.
// A NaN is skipped by the max (a thread whose first pack is all NaN skips it for s, too) but always makes sx
// NaN, which finish_row treats as a non-finite row. CACHE: the row's first cache_vecs packs also go to
// shared memory.
template <typename T, int VEC, int THREADS, int UNROLL, bool CACHE>
__device__ RowStats<typename AccOf<T>::type> row_pass1(const T* x, int64_t V, int64_t t, Pack<T, VEC>* cache,
                                                        int64_t cache_vecs) {
  using acc_t = typename AccOf<T>::type;
  RowStats<acc_t> st{-std::numeric_limits<acc_t>::infinity(), acc_t(0), acc_t(0)};
  const int64_t head = row_head<T, VEC>(x, V);
  const int64_t nvec = (V - head) / VEC;
  const int64_t tail = head + nvec * VEC;
  const int tid = threadIdx.x;
  if (tid < head) add_value(st.m, st.s, st.sx, acc_t(x[tid]), tid == t);
  for (int64_t j = tail + tid; j < V; j += THREADS) add_value(st.m, st.s, st.sx, acc_t(x[j]), j == t);
  const T* xv = x + head;
  const int64_t t_vec = t >= head ? (t - head) / VEC : -1;  // the pack and lane of the target, if any
  const int t_lane = t >= head ? int((t - head) % VEC) : -1;

  auto consume = [&](int64_t kk, const Pack<T, VEC>& p) {
    acc_t v[VEC];
    acc_t vmax = -std::numeric_limits<acc_t>::infinity();
    const bool has_t = kk == t_vec;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const acc_t xe = acc_t(p.v[e]);
      st.sx += xe;
      v[e] = (has_t && e == t_lane) ? -std::numeric_limits<acc_t>::infinity() : xe;  // the target: folded in after
      vmax = v[e] > vmax ? v[e] : vmax;
    }
    if (vmax > st.m) {  // rare after the first packs: rescale the running sum once per pack
      st.s *= fast_exp(st.m - vmax);
      st.m = vmax;
    }
    if (st.m == -std::numeric_limits<acc_t>::infinity()) return;  // only -inf so far
#pragma unroll
    for (int e = 0; e < VEC; ++e) st.s += fast_exp(v[e] - st.m);
  };

  int64_t k = tid;
  for (; k + (UNROLL - 1) * THREADS < nvec; k += UNROLL * THREADS) {
    Pack<T, VEC> p[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t kk = k + u * THREADS;
      p[u] = load_pack<T, VEC>(xv + kk * VEC, (CACHE && kk < cache_vecs) ? kLast : kKeep);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (CACHE && k + u * THREADS < cache_vecs) cache[k + u * THREADS] = p[u];
      consume(k + u * THREADS, p[u]);
    }
  }
  for (; k < nvec; k += THREADS) {
    const Pack<T, VEC> p = load_pack<T, VEC>(xv + k * VEC, (CACHE && k < cache_vecs) ? kLast : kKeep);
    if (CACHE && k < cache_vecs) cache[k] = p;
    consume(k, p);
  }
  return block_reduce<acc_t, THREADS>(st);
}

// From pass 1's (m, s) over the columns other than the target and the target logit xt: (m, s) over every
// column and q, the non-target mass relative to the new m (has_t false: no target here, q = s).
template <typename acc_t>
__device__ __forceinline__ void fold_target(acc_t& m, acc_t& s, acc_t& q, acc_t xt, bool has_t) {
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  q = s;
  if (!has_t) return;
  const acc_t mt = xt > m ? xt : m;
  if (mt == neg_inf) return;  // every column is -inf
  q = m == neg_inf ? acc_t(0) : q * m_exp(m - mt);
  s = q + (xt == neg_inf ? acc_t(0) : m_exp(xt - mt));
  m = mt;
}

// Pass 2: g = a * exp(x - lse) + c, and gt at column t (t < 0: no target in this row or shard).
template <typename T, int VEC, int THREADS, int UNROLL, bool CACHE>
__device__ void row_pass2(const T* x, T* g, int64_t V, typename AccOf<T>::type lse, typename AccOf<T>::type a,
                          typename AccOf<T>::type gt, typename AccOf<T>::type c, int64_t t,
                          const Pack<T, VEC>* cache, int64_t cache_vecs) {
  using acc_t = typename AccOf<T>::type;
  const int64_t head = row_head<T, VEC>(x, V);
  const int64_t nvec = (V - head) / VEC;
  const int64_t tail = head + nvec * VEC;
  const int tid = threadIdx.x;
  auto scalar = [&](int64_t j) {
    acc_t r = a * fast_exp(acc_t(x[j]) - lse) + c;
    if (j == t) r = gt;
    g[j] = T(r);
  };
  if (tid < head) scalar(tid);
  for (int64_t j = tail + tid; j < V; j += THREADS) scalar(j);
  const T* xv = x + head;
  T* gv = g + head;
  const int64_t t_vec = t >= head ? (t - head) / VEC : -1;
  const int t_lane = t >= head ? int((t - head) % VEC) : -1;

  auto produce = [&](int64_t kk, const Pack<T, VEC>& p) {
    Pack<T, VEC> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      acc_t r = a * fast_exp(acc_t(p.v[e]) - lse) + c;
      if (kk == t_vec && e == t_lane) r = gt;
      out.v[e] = T(r);
    }
    store_pack<T, VEC>(gv + kk * VEC, out);
  };
  int64_t k = tid;
  for (; k + (UNROLL - 1) * THREADS < nvec; k += UNROLL * THREADS) {
    Pack<T, VEC> p[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t kk = k + u * THREADS;
      p[u] = (CACHE && kk < cache_vecs) ? cache[kk] : load_pack<T, VEC>(xv + kk * VEC, kLast);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) produce(k + u * THREADS, p[u]);
  }
  for (; k < nvec; k += THREADS) {
    const Pack<T, VEC> p = (CACHE && k < cache_vecs) ? cache[k] : load_pack<T, VEC>(xv + k * VEC, kLast);
    produce(k, p);
  }
}

template <typename T, int VEC, int THREADS>
__device__ void row_zero(T* g, int64_t V) {
  const int64_t head = row_head<T, VEC>(g, V);
  const int64_t nvec = (V - head) / VEC;
  const int64_t tail = head + nvec * VEC;
  const int tid = threadIdx.x;
  if (tid < head) g[tid] = T(0);
  for (int64_t j = tail + tid; j < V; j += THREADS) g[j] = T(0);
  Pack<T, VEC> z;
#pragma unroll
  for (int e = 0; e < VEC; ++e) z.v[e] = T(0);
  for (int64_t k = tid; k < nvec; k += THREADS) store_pack<T, VEC>(g + head + k * VEC, z);
}

// ------------------------------------------------------------------------------------------ kernels
template <typename T>
struct FwdParams {
  const T* x;
  T* g;  // nullptr: no gradient
  int64_t V, x_stride, g_stride;
  const int64_t* labels;
  const uint8_t* risk;
  const uint8_t* modes;
  const float* weights;
  int64_t ignore_index;
  Options opt;
  typename AccOf<T>::type* per_token;
  typename AccOf<T>::type* ce;
  int8_t* kind;
  int64_t cache_vecs;
};

template <typename T, int VEC, int THREADS, int MIN_BLOCKS, int UNROLL, bool CACHE>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) forward_kernel(const FwdParams<T> p) {
  using acc_t = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Pack<T, VEC>* cache = reinterpret_cast<Pack<T, VEC>*>(smem_raw);
  __shared__ acc_t coef[4];
  const int64_t row = blockIdx.x;
  const T* x = p.x + row * p.x_stride;
  T* g = p.g ? p.g + row * p.g_stride : nullptr;
  const int64_t label = p.labels[row];
  if (label == p.ignore_index) {
    if (threadIdx.x == 0) {
      p.per_token[row] = p.ce[row] = acc_t(0);
      p.kind[row] = kKindSkipped;
    }
    if (g) row_zero<T, VEC, THREADS>(g, p.V);
    return;
  }
  if (label < 0 || label >= p.V) {  // the Python wrapper checks first; never read out of bounds
    if (threadIdx.x == 0) {
      p.per_token[row] = p.ce[row] = std::numeric_limits<acc_t>::quiet_NaN();
      p.kind[row] = kKindCarries;
    }
    return;
  }
  const uint8_t level = p.risk[row];
  const int mode = p.modes[level];
  acc_t xt = acc_t(0);
  if (threadIdx.x == 0) xt = acc_t(x[label]);  // in flight during pass 1
  const bool want_grad = g != nullptr && mode != kModeIgnore;
  const int64_t cache_vecs = (CACHE && want_grad) ? p.cache_vecs : 0;
  const RowStats<acc_t> st = row_pass1<T, VEC, THREADS, UNROLL, CACHE>(x, p.V, label, cache, cache_vecs);
  if (threadIdx.x == 0) {
    acc_t m = st.m, s = st.s, q;
    fold_target(m, s, q, xt, true);
    const RowResult<acc_t> r = finish_row<acc_t>(mode, acc_t(p.weights[level]), m, s, q, xt, st.sx, p.opt);
    p.per_token[row] = r.loss;
    p.ce[row] = r.ce;
    p.kind[row] = r.kind;
    coef[0] = r.lse;
    coef[1] = r.a;
    coef[2] = r.gt;
    coef[3] = r.c;
  }
  if (g == nullptr) return;
  if (!want_grad) {
    row_zero<T, VEC, THREADS>(g, p.V);
    return;
  }
  __syncthreads();  // coef, and the shared-memory copy of the row
  row_pass2<T, VEC, THREADS, UNROLL, CACHE>(x, g, p.V, coef[0], coef[1], coef[2], coef[3], label, cache,
                                            cache_vecs);
}

template <typename T, int VEC, int THREADS>
__global__ void __launch_bounds__(THREADS) row_stats_kernel(const T* X, int64_t V, int64_t stride,
                                                            const int64_t* target, typename AccOf<T>::type* m,
                                                            typename AccOf<T>::type* s,
                                                            typename AccOf<T>::type* q,
                                                            typename AccOf<T>::type* xt,
                                                            typename AccOf<T>::type* sx) {
  using acc_t = typename AccOf<T>::type;
  const int64_t row = blockIdx.x;
  const T* x = X + row * stride;
  const int64_t t = target[row] >= 0 && target[row] < V ? target[row] : -1;
  acc_t xt_val = acc_t(0);
  if (threadIdx.x == 0 && t >= 0) xt_val = acc_t(x[t]);
  const RowStats<acc_t> st = row_pass1<T, VEC, THREADS, 4, false>(x, V, t, nullptr, 0);
  if (threadIdx.x == 0) {
    acc_t m_row = st.m, s_row = st.s, q_row;
    fold_target(m_row, s_row, q_row, xt_val, t >= 0);
    m[row] = m_row;
    s[row] = s_row;
    q[row] = q_row;
    sx[row] = st.sx;
    xt[row] = xt_val;
  }
}

template <typename T, int VEC, int THREADS>
__global__ void __launch_bounds__(THREADS) grad_kernel(const T* X, T* G, int64_t V, int64_t x_stride,
                                                       int64_t g_stride, const int64_t* target,
                                                       const typename AccOf<T>::type* lse,
                                                       const typename AccOf<T>::type* a,
                                                       const typename AccOf<T>::type* gt,
                                                       const typename AccOf<T>::type* c) {
  using acc_t = typename AccOf<T>::type;
  const int64_t row = blockIdx.x;
  T* g = G + row * g_stride;
  if (a[row] == acc_t(0) && gt[row] == acc_t(0) && c[row] == acc_t(0)) {  // no loss on this row
    row_zero<T, VEC, THREADS>(g, V);
    return;
  }
  row_pass2<T, VEC, THREADS, 4, false>(X + row * x_stride, g, V, lse[row], a[row], gt[row], c[row], target[row],
                                       nullptr, 0);
}

// One block per risk level (blocks 0..255) plus one for the totals (block 256); fixed-order sums.
template <typename acc_t>
__global__ void __launch_bounds__(256) level_stats_kernel(const acc_t* per_token, const acc_t* ce,
                                                          const int8_t* kind, const uint8_t* risk, int64_t n,
                                                          acc_t* loss_sum, int64_t* num_tokens,
                                                          int64_t* level_count, float* level_ce_sum) {
  __shared__ double sm_sum[256];
  __shared__ long long sm_count[256];
  const int level = blockIdx.x;
  double sum = 0.0;
  long long count = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    if (level == 256) {
      sum += double(per_token[i]);
      count += kind[i] == kKindCarries;
    } else if (risk[i] == level && kind[i] != kKindSkipped) {
      sum += double(ce[i]);
      count += 1;
    }
  }
  sm_sum[threadIdx.x] = sum;
  sm_count[threadIdx.x] = count;
  __syncthreads();
  for (int stride = 128; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      sm_sum[threadIdx.x] += sm_sum[threadIdx.x + stride];
      sm_count[threadIdx.x] += sm_count[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (level == 256) {
      *loss_sum = acc_t(sm_sum[0]);
      *num_tokens = sm_count[0];
    } else {
      level_ce_sum[level] = float(sm_sum[0]);
      level_count[level] = sm_count[0];
    }
  }
}

// ------------------------------------------------------------------------------------------ launchers
constexpr int kStaticSmemReserve = 2048;  // block_reduce scratch and the coefficients

template <typename T, int VEC, int THREADS, int MIN_BLOCKS, int UNROLL, bool CACHE>
void launch_forward(FwdParams<T> p, int64_t N, cudaStream_t stream) {
  auto kernel = forward_kernel<T, VEC, THREADS, MIN_BLOCKS, UNROLL, CACHE>;
  size_t smem = 0;
  if (CACHE && p.g != nullptr) {
    int dev = 0, per_sm = 0, per_block = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    // MIN_BLOCKS blocks share an SM; each keeps at most its share (1 KB per block is reserved by CUDA)
    int64_t budget = std::min<int64_t>(per_block, per_sm / MIN_BLOCKS - 1024) - kStaticSmemReserve;
    const int64_t row_packs = p.V / VEC + 1;
    const int64_t packs = std::max<int64_t>(0, std::min<int64_t>(budget / int64_t(sizeof(Pack<T, VEC>)), row_packs));
    p.cache_vecs = packs;
    smem = size_t(packs) * sizeof(Pack<T, VEC>);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  } else {
    p.cache_vecs = 0;
  }
  kernel<<<dim3(unsigned(N)), dim3(THREADS), smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Variants (benchmarked by tools/bench_masked_ce.py --variants): 1..3 stream with 256/512/1024 threads,
// 4 cached with 1024 threads and one block per SM, 5 cached with 512 threads and two blocks per SM,
// 6 cached with 512 threads, one block per SM and 4 loads in flight per thread.
// 0 = the default: variant 5, chosen by reasoning, NOT by measurement (no GPU was available when this was
// written; see benchmarks/masked_ce.md): two blocks per SM hide each other's reduction and tail bubbles,
// and each keeps up to ~110 KB of its row in shared memory, so at most ~264 partial rows are re-read
// through L2 (about 40 MB for V = 128256 in bf16, under the H100's 50 MB). Run
// `tools/bench_masked_ce.py --device cuda --variants 1,2,3,4,5,6` on a GPU and set the winner here.
constexpr int kDefaultVariant = 5;

template <typename T>
void dispatch_forward(const FwdParams<T>& p, int64_t N, int64_t variant, bool vectorised, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  if (!vectorised) return launch_forward<T, 1, 256, 1, 4, false>(p, N, stream);
  if (variant == 0) variant = kDefaultVariant;
  if constexpr (std::is_same_v<T, double>) {
    return launch_forward<T, VEC, 256, 1, 2, false>(p, N, stream);
  } else {
    switch (variant) {
      case 1: return launch_forward<T, VEC, 256, 4, 2, false>(p, N, stream);
      case 2: return launch_forward<T, VEC, 512, 2, 2, false>(p, N, stream);
      case 3: return launch_forward<T, VEC, 1024, 1, 2, false>(p, N, stream);
      case 4: return launch_forward<T, VEC, 1024, 1, 2, true>(p, N, stream);
      case 5: return launch_forward<T, VEC, 512, 2, 2, true>(p, N, stream);
      case 6: return launch_forward<T, VEC, 512, 1, 4, true>(p, N, stream);
      default: TORCH_CHECK(false, "masked_ce: unknown CUDA kernel variant ", variant);
    }
  }
}

// Rows of x and g can share the 16-byte vector path when they are equally (mis)aligned.
bool same_alignment(const at::Tensor& x, const at::Tensor& g) {
  if (!g.defined()) return reinterpret_cast<uintptr_t>(x.data_ptr()) % x.element_size() == 0;
  const int64_t es = x.element_size();
  return x.stride(0) == g.stride(0) &&
         (reinterpret_cast<uintptr_t>(x.data_ptr()) - reinterpret_cast<uintptr_t>(g.data_ptr())) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(x.data_ptr()) % es == 0;
}

void check_cuda_inputs(std::initializer_list<at::Tensor> ts, const at::Tensor& logits) {
  for (const auto& t : ts) {
    if (t.defined()) {
      TORCH_CHECK(t.is_cuda() && t.get_device() == logits.get_device(),
                  "masked_ce: every input must be on the GPU of the logits (", logits.device(), ")");
    }
  }
}

}  // namespace

std::vector<at::Tensor> forward_cuda(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& risk,
                                     const at::Tensor& modes, const at::Tensor& weights, int64_t ignore_index,
                                     const Options& opt, bool compute_grad, bool inplace, int64_t variant) {
  check_cuda_inputs({labels, risk, modes, weights}, logits);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor per_token = at::empty({N}, logits.options().dtype(acc));
  at::Tensor ce = at::empty({N}, logits.options().dtype(acc));
  at::Tensor kind = at::empty({N}, logits.options().dtype(at::kChar));
  at::Tensor grad;
  if (compute_grad) grad = inplace ? logits : at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (N == 0) return {per_token, ce, kind, grad};
  TORCH_CHECK(N <= std::numeric_limits<int32_t>::max(), "masked_ce: too many rows for one launch");
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool vectorised = same_alignment(logits, grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "masked_ce_forward_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    FwdParams<scalar_t> p{logits.data_ptr<scalar_t>(),
                          compute_grad ? grad.data_ptr<scalar_t>() : nullptr,
                          V,
                          logits.stride(0),
                          compute_grad ? grad.stride(0) : 0,
                          labels.data_ptr<int64_t>(),
                          risk.data_ptr<uint8_t>(),
                          modes.data_ptr<uint8_t>(),
                          weights.data_ptr<float>(),
                          ignore_index,
                          opt,
                          per_token.data_ptr<acc_t>(),
                          ce.data_ptr<acc_t>(),
                          kind.data_ptr<int8_t>(),
                          0};
    dispatch_forward<scalar_t>(p, N, variant, vectorised, stream);
  });
  return {per_token, ce, kind, grad};
}

std::vector<at::Tensor> row_stats_cuda(const at::Tensor& logits, const at::Tensor& target) {
  check_cuda_inputs({target}, logits);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  auto opts = logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor m = at::empty({N}, opts), s = at::empty({N}, opts), q = at::empty({N}, opts), xt = at::empty({N}, opts),
             sx = at::empty({N}, opts);
  if (N == 0) return {m, s, q, xt, sx};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "masked_ce_row_stats_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    constexpr int VEC = 16 / sizeof(scalar_t);
    row_stats_kernel<scalar_t, VEC, 512><<<unsigned(N), 512, 0, stream>>>(
        logits.data_ptr<scalar_t>(), V, logits.stride(0), target.data_ptr<int64_t>(), m.data_ptr<acc_t>(),
        s.data_ptr<acc_t>(), q.data_ptr<acc_t>(), xt.data_ptr<acc_t>(), sx.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {m, s, q, xt, sx};
}

at::Tensor grad_cuda(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& a, const at::Tensor& gt,
                     const at::Tensor& c, const at::Tensor& target, at::Tensor out) {
  check_cuda_inputs({lse, a, gt, c, target, out}, logits);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool vectorised = same_alignment(logits, out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "masked_ce_grad_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    auto run = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      grad_kernel<scalar_t, VEC, 512><<<unsigned(N), 512, 0, stream>>>(
          logits.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), V, logits.stride(0), out.stride(0),
          target.data_ptr<int64_t>(), lse.data_ptr<acc_t>(), a.data_ptr<acc_t>(), gt.data_ptr<acc_t>(),
          c.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vectorised) {
      run(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    } else {
      run(std::integral_constant<int, 1>{});
    }
  });
  return out;
}

std::vector<at::Tensor> level_stats_cuda(const at::Tensor& per_token, const at::Tensor& ce, const at::Tensor& kind,
                                         const at::Tensor& risk) {
  check_cuda_inputs({ce, kind, risk}, per_token);
  c10::cuda::CUDAGuard guard(per_token.device());
  const int64_t N = per_token.size(0);
  at::Tensor loss_sum = at::empty({}, per_token.options());
  at::Tensor num_tokens = at::empty({}, per_token.options().dtype(at::kLong));
  at::Tensor level_count = at::empty({256}, per_token.options().dtype(at::kLong));
  at::Tensor level_ce_sum = at::empty({256}, per_token.options().dtype(at::kFloat));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor pt = per_token.contiguous(), cec = ce.contiguous(), k = kind.contiguous(), r = risk.contiguous();
  AT_DISPATCH_FLOATING_TYPES(per_token.scalar_type(), "masked_ce_level_stats_cuda", [&] {
    level_stats_kernel<scalar_t><<<257, 256, 0, stream>>>(
        pt.data_ptr<scalar_t>(), cec.data_ptr<scalar_t>(), k.data_ptr<int8_t>(), r.data_ptr<uint8_t>(), N,
        loss_sum.data_ptr<scalar_t>(), num_tokens.data_ptr<int64_t>(), level_count.data_ptr<int64_t>(),
        level_ce_sum.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss_sum, num_tokens, level_count, level_ce_sum};
}

}  // namespace masked_ce
}  // namespace slung
