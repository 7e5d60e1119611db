// Two adjacent order statistics per row, for dynamic thresholding's per-sample quantile on the
// CPU: a radix select on the float bits instead of torch.topk (a partial sort of ~0.5% of the
// row, which was half of a thresholded step's time).
//
// The rows hold |x0|, so every value is >= 0 (or NaN): their bit patterns, read as unsigned
// integers with the sign bit cleared, order as the values do (a -0.0 counts as 0.0, NaN above
// +inf, as torch.topk ranks it). One pass histograms the top bits, the bin holding the rank is
// gathered and nth_element finishes it; the next rank is the smallest key above it.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "torch_glue.h"

namespace ddpm_fast {
namespace {

template <typename F>
using KeyOf = std::conditional_t<sizeof(F) == 4, uint32_t, uint64_t>;

constexpr int kBinBits = 10;  // 1024 bins: the exponent and two mantissa bits (1/4 octave for float)
constexpr int kBins = 1 << kBinBits;

template <typename F>
inline KeyOf<F> magnitude_key(F v) {
  using K = KeyOf<F>;
  K k;
  std::memcpy(&k, &v, sizeof(F));
  return k & (std::numeric_limits<K>::max() >> 1);
}

template <typename F>
inline F key_value(KeyOf<F> k) {
  F v;
  std::memcpy(&v, &k, sizeof(F));
  return v;
}

// Values at ascending ranks `rank` and `rank + 1` (rank itself at the end of the row) of x[0..m).
template <typename F>
void adjacent_order_stats_row(const F* x, int64_t m, int64_t rank, std::vector<KeyOf<F>>& cand, F* lo, F* hi) {
  using K = KeyOf<F>;
  constexpr int kShift = static_cast<int>(sizeof(K) * 8) - 1 - kBinBits;
  // Four interleaved histograms: values cluster in a few bins, and with one table every
  // increment would wait for the previous one to the same bin.
  std::array<uint32_t, 4 * kBins> hist{};
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    ++hist[magnitude_key(x[i]) >> kShift];
    ++hist[kBins + (magnitude_key(x[i + 1]) >> kShift)];
    ++hist[2 * kBins + (magnitude_key(x[i + 2]) >> kShift)];
    ++hist[3 * kBins + (magnitude_key(x[i + 3]) >> kShift)];
  }
  for (; i < m; ++i) ++hist[magnitude_key(x[i]) >> kShift];
  int64_t below = 0;
  K bin = 0;
  for (; bin < kBins - 1; ++bin) {
    const int64_t count = hist[bin] + hist[kBins + bin] + hist[2 * kBins + bin] + hist[3 * kBins + bin];
    if (below + count > rank) break;
    below += count;
  }
  cand.clear();
  for (i = 0; i < m; ++i) {
    const K k = magnitude_key(x[i]);
    if ((k >> kShift) == bin) cand.push_back(k);
  }
  const auto nth = cand.begin() + (rank - below);
  std::nth_element(cand.begin(), nth, cand.end());
  const K k_lo = *nth;
  K k_hi = k_lo;
  if (rank + 1 < m) {
    if (nth + 1 != cand.end()) {
      k_hi = *std::min_element(nth + 1, cand.end());  // the tail of the bin holds the ranks above
    } else {  // rank is the bin's largest: the next one is the smallest key above it
      k_hi = std::numeric_limits<K>::max();
      for (i = 0; i < m; ++i) {
        const K k = magnitude_key(x[i]);
        if (k > k_lo && k < k_hi) k_hi = k;
      }
    }
  }
  *lo = key_value<F>(k_lo);
  *hi = key_value<F>(k_hi);
}

std::tuple<at::Tensor, at::Tensor> abs_order_stats_cpu(const at::Tensor& x, int64_t rank) {
  DDPM_CHECK(x.dim() == 2 && x.is_contiguous(), "ddpm_fast: abs_order_stats takes a contiguous (N, M) tensor");
  DDPM_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
             "ddpm_fast: abs_order_stats takes float32 or float64, got ", x.scalar_type());
  const int64_t n = x.size(0), m = x.size(1);
  DDPM_CHECK(m > 0 && rank >= 0 && rank < m, "ddpm_fast: abs_order_stats rank ", rank, " outside a row of ", m);
  at::Tensor lo = at::empty({n}, x.options()), hi = at::empty({n}, x.options());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using F = decltype(tag);
    if constexpr (std::is_same_v<F, float> || std::is_same_v<F, double>) {
      const F* data = x.data_ptr<F>();
      F* lo_out = lo.data_ptr<F>();
      F* hi_out = hi.data_ptr<F>();
      const int64_t grain = std::max<int64_t>(1, 65536 / m);
      at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
        std::vector<KeyOf<F>> cand;
        for (int64_t row = begin; row < end; ++row) {
          adjacent_order_stats_row(data + row * m, m, rank, cand, lo_out + row, hi_out + row);
        }
      });
    }
  });
  return {lo, hi};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast_C, CPU, m) { m.impl("abs_order_stats", &abs_order_stats_cpu); }

}  // namespace ddpm_fast
