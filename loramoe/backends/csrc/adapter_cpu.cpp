// CPU kernels for the adapter's products with the layer input x (float32), used by
// loramoe/fused.py through loramoe/cpu_kernels.py.
//
// W = [Wg; A] (P, d) stacks the router (its first n_clean rows) and the experts' input
// weights. The router reads x, the experts read dropout(x); dropout arrives as the sorted
// flat positions it zeroes (loramoe/dropout.py). In torch ops that costs a dropped copy of x
// in both passes and two GEMMs on x in each; here one pass over x computes both, and the
// dropped terms (one in twenty at p = 0.05) are taken out of the experts' sums afterwards:
//
//   forward:  h_t (P, M) = W·xᵀ, rows o >= n_clean on the dropped input
//   backward: grad_W (P, d) = gh_t·x (same rule), grad_x (M, d) = gh_tᵀ·W, where a dropped
//             position gets only the router's share
//
// Vectors are GCC vector extensions of 16 floats (one AVX-512 register, two AVX2 ones, four
// NEON ones). The blockings keep 16 of them as accumulators, sized for AVX-512's 32 registers;
// other builds are correct (the tests run wherever the kernels build) but not tuned here.
// Threads come from at::parallel_for, i.e. torch's own OpenMP pool. Every output element is
// summed by one fixed sequence of operations whatever the thread count, so the results are
// the same with 1 or 64 threads.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t L = 16;      // floats per vector
constexpr int64_t G = 2 * L;   // output lanes per pass of the x-side microkernels
typedef float vf __attribute__((vector_size(L * sizeof(float))));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(vf)); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

struct Dropped {  // sorted flat positions into an (M, d) tensor
  const int64_t* begin;
  const int64_t* end;
  // The positions inside rows [m0, m1).
  std::pair<const int64_t*, const int64_t*> rows(int64_t m0, int64_t m1, int64_t d) const {
    const int64_t* lo = std::lower_bound(begin, end, m0 * d);
    return {lo, std::lower_bound(lo, end, m1 * d)};
  }
};

Dropped check(const at::Tensor& x, const at::Tensor& w, int64_t n_clean, const at::Tensor& dropped) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "loramoe_cpu: x (M, d) and w (P, d) expected, got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "loramoe_cpu: float32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "loramoe_cpu: contiguous x and w expected");
  TORCH_CHECK(n_clean >= 0 && n_clean <= w.size(0), "loramoe_cpu: n_clean outside [0, P]");
  TORCH_CHECK(dropped.scalar_type() == at::kLong && dropped.dim() == 1 && dropped.is_contiguous(),
              "loramoe_cpu: dropped must be 1-d int64 positions");
  const int64_t* p = dropped.data_ptr<int64_t>();
  const int64_t n = dropped.numel();
  // The kernels index x and their buffers through these positions: check rather than trust.
  TORCH_CHECK(n == 0 || (p[0] >= 0 && p[n - 1] < x.numel() && std::is_sorted(p, p + n)),
              "loramoe_cpu: dropped must be sorted positions inside x's ", x.numel(), " elements");
  return {p, p + n};
}

// (d, Q): w transposed, lanes P..Q zero, so one input column's weights are contiguous lanes.
std::vector<float> transpose_padded(const float* w, int64_t P, int64_t d, int64_t Q) {
  std::vector<float> wT((size_t)d * Q, 0.f);
  for (int64_t o = 0; o < P; ++o)
    for (int64_t k = 0; k < d; ++k) wT[k * Q + o] = w[o * d + k];
  return wT;
}

// Lanes of the experts' rows (n_clean <= o < P) are 1, the router's and the padding 0.
std::vector<float> expert_lanes(int64_t n_clean, int64_t P, int64_t Q) {
  std::vector<float> lanes(Q, 0.f);
  std::fill(lanes.begin() + n_clean, lanes.begin() + P, 1.f);
  return lanes;
}

}  // namespace

at::Tensor adapter_in_forward(const at::Tensor& x, const at::Tensor& w, int64_t n_clean,
                              const at::Tensor& dropped) {
  const Dropped drop = check(x, w, n_clean, dropped);
  const int64_t M = x.size(0), d = x.size(1), P = w.size(0), Q = round_up(P, G);
  auto h_t = at::empty({P, M}, x.options());
  const float* xp = x.data_ptr<float>();
  float* hp = h_t.data_ptr<float>();
  const std::vector<float> wT = transpose_padded(w.data_ptr<float>(), P, d, Q);
  const std::vector<float> lanes = expert_lanes(n_clean, P, Q);
  constexpr int64_t RB = 8;  // rows per block: 16 accumulators, each weight load feeds 8 FMAs
  at::parallel_for(0, (M + RB - 1) / RB, 8, [&](int64_t b0, int64_t b1) {
    std::vector<float> h((size_t)RB * Q);  // (RB, Q): this block's rows of h
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * RB, rows = std::min(RB, M - m0);
      const float* xr[RB];  // a short last block repeats its last row and discards it
      for (int64_t i = 0; i < RB; ++i) xr[i] = xp + std::min(m0 + i, M - 1) * d;
      for (int64_t c = 0; c < Q; c += G) {
        vf acc[RB][2] = {};
        for (int64_t k = 0; k < d; ++k) {
          const vf w0 = load(&wT[k * Q + c]), w1 = load(&wT[k * Q + c + L]);
#pragma GCC unroll 8
          for (int64_t i = 0; i < RB; ++i) {
            acc[i][0] += xr[i][k] * w0;
            acc[i][1] += xr[i][k] * w1;
          }
        }
        for (int64_t i = 0; i < RB; ++i) {
          store(&h[i * Q + c], acc[i][0]);
          store(&h[i * Q + c + L], acc[i][1]);
        }
      }
      // Take the dropped terms out of the experts' lanes, row by row.
      auto [p, pend] = drop.rows(m0, m0 + rows, d);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t row_end = (m0 + i + 1) * d;
        for (int64_t c = 0; c < Q; c += G) {
          vf corr0 = {}, corr1 = {};
          for (const int64_t* q = p; q < pend && *q < row_end; ++q) {
            const float* wk = &wT[(*q - (m0 + i) * d) * Q + c];
            corr0 += xp[*q] * load(wk);
            corr1 += xp[*q] * load(wk + L);
          }
          store(&h[i * Q + c], load(&h[i * Q + c]) - corr0 * load(&lanes[c]));
          store(&h[i * Q + c + L], load(&h[i * Q + c + L]) - corr1 * load(&lanes[c + L]));
        }
        while (p < pend && *p < row_end) ++p;
      }
      for (int64_t o = 0; o < P; ++o)  // experts-major output: (P, M)
        for (int64_t i = 0; i < rows; ++i) hp[o * M + m0 + i] = h[i * Q + o];
    }
  });
  return h_t;
}

namespace {

// grad_W (P, d) = gh_t·x, the experts' rows on the dropped input. The rows of x are cut into
// fixed chunks (independent of the thread count) whose partial sums are added in order.
at::Tensor weight_grad(const float* xp, const std::vector<float>& gh, int64_t M, int64_t d,
                       int64_t P, int64_t Q, const std::vector<float>& lanes, const Dropped& drop,
                       const at::TensorOptions& options) {
  constexpr int64_t CH = 256, KB = 8;  // rows per chunk; input columns per block (16 accumulators)
  const int64_t chunks = (M + CH - 1) / CH;
  // per chunk: grad_Wᵀ (d, Q); left uninitialised, the main loop writes every element
  std::unique_ptr<float[]> partial(new float[(size_t)chunks * d * Q]);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> g_experts(Q);  // one token's gradients, the router's lanes zeroed
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t m0 = ch * CH, m1 = std::min(M, m0 + CH);
      float* part = &partial[(size_t)ch * d * Q];
      for (int64_t k0 = 0; k0 < d; k0 += KB) {
        const int64_t cols = std::min(KB, d - k0);
        int64_t col[KB];  // a short last block repeats its last column and discards it
        for (int64_t j = 0; j < KB; ++j) col[j] = k0 + std::min(j, cols - 1);
        for (int64_t c = 0; c < Q; c += G) {
          vf acc[KB][2] = {};
          for (int64_t m = m0; m < m1; ++m) {
            const vf g0 = load(&gh[m * Q + c]), g1 = load(&gh[m * Q + c + L]);
            const float* xr = xp + m * d;
#pragma GCC unroll 8
            for (int64_t j = 0; j < KB; ++j) {
              acc[j][0] += xr[col[j]] * g0;
              acc[j][1] += xr[col[j]] * g1;
            }
          }
          for (int64_t j = 0; j < cols; ++j) {
            store(&part[(k0 + j) * Q + c], acc[j][0]);
            store(&part[(k0 + j) * Q + c + L], acc[j][1]);
          }
        }
      }
      // Take the dropped terms out of the experts' lanes, one row of x at a time.
      auto [p, pend] = drop.rows(m0, m1, d);
      for (int64_t m = m0; p < pend; ++m) {
        const int64_t row_end = (m + 1) * d;
        if (*p >= row_end) continue;
        for (int64_t c = 0; c < Q; c += L) store(&g_experts[c], load(&gh[m * Q + c]) * load(&lanes[c]));
        for (; p < pend && *p < row_end; ++p) {
          float* row = &part[(*p - m * d) * Q];
          for (int64_t c = 0; c < Q; c += L) store(row + c, load(row + c) - xp[*p] * load(&g_experts[c]));
        }
      }
    }
  });
  auto grad_w = at::empty({P, d}, options);
  float* gwp = grad_w.data_ptr<float>();
  at::parallel_for(0, d, 64, [&](int64_t k0, int64_t k1) {
    std::vector<float> sum(Q);
    for (int64_t k = k0; k < k1; ++k) {
      std::copy_n(&partial[k * Q], Q, sum.begin());
      for (int64_t ch = 1; ch < chunks; ++ch)
        for (int64_t o = 0; o < Q; ++o) sum[o] += partial[((size_t)ch * d + k) * Q + o];
      for (int64_t o = 0; o < P; ++o) gwp[o * d + k] = sum[o];
    }
  });
  return grad_w;
}

// grad_x (M, d) = gh·W, where a dropped position gets only the router's rows' share.
at::Tensor input_grad(const float* wp, const std::vector<float>& gh, int64_t M, int64_t d,
                      int64_t P, int64_t Q, int64_t n_clean, const Dropped& drop,
                      const at::TensorOptions& options) {
  auto grad_x = at::empty({M, d}, options);
  float* gxp = grad_x.data_ptr<float>();
  constexpr int64_t RB = 4, KV = 4;  // 4 rows x 4 vectors: 16 accumulators
  const int64_t dpad = round_up(d, L);
  at::parallel_for(0, (M + RB - 1) / RB, 8, [&](int64_t b0, int64_t b1) {
    std::vector<float> keep((size_t)RB * dpad);  // 0 at the block's dropped positions, else 1
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * RB, rows = std::min(RB, M - m0);
      std::fill(keep.begin(), keep.end(), 1.f);
      auto [p, pend] = drop.rows(m0, m0 + rows, d);
      for (int64_t i = 0; p < pend; ++p) {
        while (*p >= (m0 + i + 1) * d) ++i;
        keep[i * dpad + (*p - (m0 + i) * d)] = 0.f;
      }
      const float* g[RB];  // a short last block repeats its last row and discards it
      for (int64_t i = 0; i < RB; ++i) g[i] = &gh[std::min(m0 + i, M - 1) * Q];
      // The experts' rows first, masked, then the router's rows on top.
      auto block = [&](int64_t k, auto nv) {
        constexpr int64_t NV = decltype(nv)::value;
        vf acc[RB][NV] = {};
        auto accumulate = [&](int64_t o0, int64_t o1) {
          for (int64_t o = o0; o < o1; ++o) {
            vf wv[NV];
            for (int64_t v = 0; v < NV; ++v) wv[v] = load(wp + o * d + k + v * L);
            for (int64_t i = 0; i < RB; ++i)
              for (int64_t v = 0; v < NV; ++v) acc[i][v] += g[i][o] * wv[v];
          }
        };
        accumulate(n_clean, P);
        for (int64_t i = 0; i < RB; ++i)
          for (int64_t v = 0; v < NV; ++v) acc[i][v] *= load(&keep[i * dpad + k + v * L]);
        accumulate(0, n_clean);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t v = 0; v < NV; ++v) store(gxp + (m0 + i) * d + k + v * L, acc[i][v]);
      };
      int64_t k = 0;
      for (; k + KV * L <= d; k += KV * L) block(k, std::integral_constant<int64_t, KV>{});
      for (; k + L <= d; k += L) block(k, std::integral_constant<int64_t, 1>{});
      for (; k < d; ++k) {  // the last d % 16 columns, one at a time
        for (int64_t i = 0; i < rows; ++i) {
          float experts = 0.f, router = 0.f;
          for (int64_t o = n_clean; o < P; ++o) experts += g[i][o] * wp[o * d + k];
          for (int64_t o = 0; o < n_clean; ++o) router += g[i][o] * wp[o * d + k];
          gxp[(m0 + i) * d + k] = experts * keep[i * dpad + k] + router;
        }
      }
    }
  });
  return grad_x;
}

}  // namespace

// Given gh_t (P, M), the gradient of h_t: (grad_x (M, d), grad_W (P, d)); either is an
// empty tensor when not asked for.
std::tuple<at::Tensor, at::Tensor> adapter_in_backward(
    const at::Tensor& x, const at::Tensor& w, int64_t n_clean, const at::Tensor& dropped,
    const at::Tensor& gh_t, bool need_grad_x, bool need_grad_w) {
  const Dropped drop = check(x, w, n_clean, dropped);
  const int64_t M = x.size(0), d = x.size(1), P = w.size(0), Q = round_up(P, G);
  TORCH_CHECK(gh_t.scalar_type() == at::kFloat && gh_t.is_contiguous() && gh_t.dim() == 2 &&
                  gh_t.size(0) == P && gh_t.size(1) == M,
              "loramoe_cpu: gh_t (P, M) contiguous float32 expected, got ", gh_t.sizes());
  // (M, Q): token-major and zero-padded, so one token's gradients are contiguous lanes.
  std::vector<float> gh((size_t)M * Q, 0.f);
  const float* ghp = gh_t.data_ptr<float>();
  at::parallel_for(0, M, 256, [&](int64_t m0, int64_t m1) {
    for (int64_t o = 0; o < P; ++o)
      for (int64_t m = m0; m < m1; ++m) gh[m * Q + o] = ghp[o * M + m];
  });
  const at::TensorOptions options = x.options();
  at::Tensor grad_x = at::empty({0}, options), grad_w = at::empty({0}, options);
  if (need_grad_w) {
    grad_w = weight_grad(x.data_ptr<float>(), gh, M, d, P, Q, expert_lanes(n_clean, P, Q), drop, options);
  }
  if (need_grad_x) {
    grad_x = input_grad(w.data_ptr<float>(), gh, M, d, P, Q, n_clean, drop, options);
  }
  return {grad_x, grad_w};
}

TORCH_LIBRARY(loramoe_cpu, m) {
  m.def("adapter_in_forward(Tensor x, Tensor w, int n_clean, Tensor dropped) -> Tensor");
  m.def("adapter_in_backward(Tensor x, Tensor w, int n_clean, Tensor dropped, Tensor gh_t, "
        "bool need_grad_x, bool need_grad_w) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(loramoe_cpu, CPU, m) {
  m.impl("adapter_in_forward", adapter_in_forward);
  m.impl("adapter_in_backward", adapter_in_backward);
}
