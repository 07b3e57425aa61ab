// lmspec's own MLX primitives for the CPU: quantized matrix products over
// MLX's affine layout, dequantization, RMSNorm, RoPE and attention, and a
// read of one slice of a tensor stored in a file. Each is
// an `mlx::core::Primitive` whose `eval_cpu` allocates its output and hands
// the work to the stream's command encoder, as MLX's own CPU primitives do,
// so the graph stays lazy and one graph. The work inside runs on a small
// pool of threads, with AVX-512 / AVX2 / scalar code chosen at run time.
//
// The C ABI at the bottom takes and returns `mlx::core::array*` (the `ctx`
// of mlx-c's `mlx_array`); errors come back as a message, never as an
// exception crossing into Rust.

#include <fcntl.h>
#include <sys/mman.h>
#include <immintrin.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"

namespace mx = mlx::core;

namespace lmspec {

// ---------------------------------------------------------------- dispatch

enum Level { SCALAR = 0, AVX2 = 1, AVX512 = 2 };

static Level detect_level() {
  __builtin_cpu_init();
  Level best = SCALAR;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    best = AVX2;
  }
  if (best == AVX2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    best = AVX512;
  }
  // LMSPEC_CPU_KERNELS=scalar|avx2|avx512 asks for a path; a path the
  // machine lacks is not taken.
  const char* want = std::getenv("LMSPEC_CPU_KERNELS");
  if (want != nullptr) {
    std::string w(want);
    Level asked = best;
    if (w == "scalar") asked = SCALAR;
    if (w == "avx2") asked = AVX2;
    if (w == "avx512") asked = AVX512;
    if (asked < best) best = asked;
  }
  return best;
}

static Level level() {
  static Level l = detect_level();
  return l;
}

// ------------------------------------------------------------- thread pool

// Workers spin briefly between jobs (a decode step runs a few hundred
// small jobs back to back), then sleep on a condition variable.
class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; i++) {
      workers_.emplace_back([this] { work(); });
    }
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> g(m_);
      stop_ = true;
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const {
    return int(workers_.size()) + 1;
  }

  // Runs f(0..n) over the pool and the calling thread; returns when all
  // are done. Calls from different threads are serialised.
  void run(int n, const std::function<void(int)>& f) {
    if (n <= 0) return;
    if (workers_.empty() || n == 1) {
      for (int i = 0; i < n; i++) f(i);
      return;
    }
    std::lock_guard<std::mutex> serial(run_m_);
    n_ = n;
    next_.store(0);
    pending_.store(n);
    job_.store(&f, std::memory_order_release);
    {
      std::lock_guard<std::mutex> g(m_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    drain(&f);
    while (pending_.load(std::memory_order_acquire) > 0) {
      _mm_pause();
    }
    // A worker that saw this job may still hold it: wait until none does.
    job_.store(nullptr, std::memory_order_release);
    while (busy_.load(std::memory_order_acquire) > 0) {
      _mm_pause();
    }
  }

 private:
  void drain(const std::function<void(int)>* job) {
    for (;;) {
      int i = next_.fetch_add(1);
      if (i >= n_) break;
      (*job)(i);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }
  void work() {
    uint64_t seen = gen_.load();
    for (;;) {
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen && spins < 3000) {
        _mm_pause();
        spins++;
      }
      if (gen_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return gen_.load() != seen; });
      }
      seen = gen_.load();
      if (stop_) return;
      busy_.fetch_add(1, std::memory_order_acq_rel);
      const std::function<void(int)>* job = job_.load(std::memory_order_acquire);
      if (job != nullptr) drain(job);
      busy_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex m_, run_m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> next_{0}, pending_{0}, busy_{0};
  std::atomic<const std::function<void(int)>*> job_{nullptr};
  int n_ = 0;
  bool stop_ = false;
};

static int thread_count() {
  const char* env = std::getenv("LMSPEC_THREADS");
  if (env != nullptr) {
    int n = std::atoi(env);
    if (n >= 1) return std::min(n, 256);
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : int(std::min(hw, 64u));
}

static Pool& pool() {
  // Never destroyed: MLX's threads may still run kernels at exit.
  static Pool* p = new Pool(thread_count());
  return *p;
}

// Splits [0, n) into chunks of at least `grain` and runs them.
static void parallel_range(
    int64_t n,
    int64_t grain,
    const std::function<void(int64_t, int64_t)>& f) {
  int threads = pool().size();
  int64_t chunks = std::min<int64_t>(
      std::max<int64_t>(1, n / std::max<int64_t>(grain, 1)), threads * 4);
  if (chunks <= 1) {
    f(0, n);
    return;
  }
  int64_t step = (n + chunks - 1) / chunks;
  pool().run(int(chunks), [&](int c) {
    int64_t a = c * step, b = std::min(n, a + step);
    if (a < b) f(a, b);
  });
}

// ------------------------------------------------------------- helpers

static inline float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {
      // Subnormal: normalise.
      int e = -1;
      do {
        e++;
        man <<= 1;
      } while ((man & 0x400) == 0);
      bits = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000 | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// float32 to float16, rounding to nearest even (as F16C and numpy do).
static inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  uint32_t absx = x & 0x7fffffff;
  if (absx >= 0x7f800000) return uint16_t(sign | 0x7c00 | (absx > 0x7f800000 ? 0x200 : 0));
  if (absx >= 0x477ff000) return uint16_t(sign | 0x7c00);  // overflows to infinity
  if (absx < 0x33000001) return uint16_t(sign);  // underflows to zero
  int e = int(absx >> 23);
  uint32_t man = (absx & 0x7fffff) | 0x800000;
  if (e < 113) {
    // Subnormal half.
    int shift = 126 - e;
    uint32_t half = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1);
    uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) half++;
    return uint16_t(sign | half);
  }
  uint32_t half = uint32_t(e - 112) << 10 | ((man >> 13) & 0x3ff);
  uint32_t rem = man & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++;
  return uint16_t(sign | half);
}

static inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Scales or biases as float32. With `times` set, the values are that
// multiple of the ones at `p` (biases tied to the scales, read from them).
struct ScaleReader {
  const void* p = nullptr;
  mx::Dtype t = mx::float32;
  float times = 0.0f;
  float operator()(int64_t i) const {
    float v;
    if (t == mx::float16) {
      v = half_to_float(static_cast<const uint16_t*>(p)[i]);
    } else if (t == mx::bfloat16) {
      v = bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    } else {
      v = static_cast<const float*>(p)[i];
    }
    return times != 0.0f ? times * v : v;
  }
};

// n float16 values as float32, 8 per F16C conversion.
__attribute__((target("avx2,f16c"))) static void halves_f16c(const uint16_t* p, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + i))));
  for (; i < n; i++) out[i] = _cvtsh_ss(p[i]);
}

// n scales (or biases) from index i0 as float32: in place when they are
// stored so, else converted into `buf` (F16C where the path has it).
static const float* scales_at(const ScaleReader& r, int64_t i0, int64_t n, float* buf) {
  if (r.t == mx::float32 && r.times == 0.0f) return static_cast<const float*>(r.p) + i0;
  if (r.t == mx::float16 && level() >= AVX2) {
    halves_f16c(static_cast<const uint16_t*>(r.p) + i0, n, buf);
    if (r.times != 0.0f) {
      for (int64_t i = 0; i < n; i++) buf[i] *= r.times;
    }
  } else {
    for (int64_t i = 0; i < n; i++) buf[i] = r(i0 + i);
  }
  return buf;
}

// A row-major float copy of any strided float32 array.
static std::vector<float> dense_f32(const mx::array& a) {
  std::vector<float> out(a.size());
  const float* src = a.data<float>();
  if (a.flags().row_contiguous) {
    std::memcpy(out.data(), src, a.size() * 4);
    return out;
  }
  // Row by row over the outer axes; a row with unit stride is one copy.
  const int nd = a.ndim();
  if (nd == 0 || a.size() == 0) {
    if (a.size() != 0) out[0] = src[0];
    return out;
  }
  const int64_t width = a.shape(nd - 1), step = a.strides()[nd - 1];
  std::vector<int64_t> idx(nd, 0);
  for (size_t r = 0; r < a.size() / size_t(width); r++) {
    int64_t off = 0;
    for (int d = 0; d + 1 < nd; d++) off += idx[d] * a.strides()[d];
    float* o = out.data() + r * width;
    if (step == 1) {
      std::memcpy(o, src + off, size_t(width) * 4);
    } else {
      for (int64_t i = 0; i < width; i++) o[i] = src[off + i * step];
    }
    for (int d = nd - 2; d >= 0; d--) {
      if (++idx[d] < a.shape(d)) break;
      idx[d] = 0;
    }
  }
  return out;
}

// Unpacks values [i0, i0 + n) of a row of `bits`-bit values (a
// little-endian bit stream) into floats (or bytes).
template <class T>
static inline void unpack_row(
    const uint8_t* row,
    int64_t row_bytes,
    int bits,
    int64_t i0,
    int n,
    T* out) {
  uint32_t mask = (1u << bits) - 1;
  for (int i = 0; i < n; i++) {
    int64_t bit = (i0 + i) * bits;
    int64_t byte = bit >> 3;
    uint64_t window = 0;
    int64_t avail = std::min<int64_t>(8, row_bytes - byte);
    std::memcpy(&window, row + byte, size_t(avail));
    out[i] = T((window >> (bit & 7)) & mask);
  }
}

// Dot products and `y += a * x` for the attention and norm kernels.
__attribute__((target("avx512f,fma"))) static float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

__attribute__((target("avx2,fma"))) static float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float s = _mm_cvtss_f32(h);
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

static float dot(const float* a, const float* b, int64_t n) {
  switch (level()) {
    case AVX512:
      return dot_avx512(a, b, n);
    case AVX2:
      return dot_avx2(a, b, n);
    default: {
      float s = 0;
      for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
      return s;
    }
  }
}

__attribute__((target("avx512f,fma"))) static void axpy_avx512(float a, const float* x, float* y, int64_t n) {
  __m512 av = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; i++) y[i] += a * x[i];
}

__attribute__((target("avx2,fma"))) static void axpy_avx2(float a, const float* x, float* y, int64_t n) {
  __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; i++) y[i] += a * x[i];
}

static void axpy(float a, const float* x, float* y, int64_t n) {
  switch (level()) {
    case AVX512:
      axpy_avx512(a, x, y, n);
      break;
    case AVX2:
      axpy_avx2(a, x, y, n);
      break;
    default:
      for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
  }
}

// ------------------------------------------------ quantized matrix product

struct QuantArgs {
  const float* x;  // [m, k], row-major
  const uint8_t* w;  // [n, k * bits / 8]
  ScaleReader scales, biases;  // [n, k / group]
  float* y;  // [m, n]
  int64_t m, n, k;
  int group, bits;
};

// Whether the biases are the scales times a power of two: their terms
// are then the scales times sums of x scaled once by that power, exactly
// the same products, and the biases need not be formed row by row.
static bool biases_fold(const QuantArgs& a) {
  if (a.biases.times == 0.0f || a.biases.p != a.scales.p || a.biases.t != a.scales.t) return false;
  int e = 0;
  return std::fabs(std::frexp(a.biases.times, &e)) == 0.5f;
}

// Rows' biases from index i0 (as `scales_at`), or their scales `sc` where
// the biases fold (`biases_fold`: the sums of x carry their multiple).
static const float* biases_at(const QuantArgs& a, bool fold, const float* sc, int64_t i0, int64_t n, float* buf) {
  return fold ? sc : scales_at(a.biases, i0, n, buf);
}

// Per row of x: the x values permuted for 4-bit rows (per 32 values: the
// 16 even-indexed, then the 16 odd-indexed, matching low and high nibbles)
// and each group's sum.
struct Prepared {
  std::vector<float> perm;  // [m, k]
  std::vector<float> sums;  // [m, k / group]; times the biases' multiple when `fold`
  bool fold = false;  // `biases_fold`: the scales stand for the biases
};

// Per 32 values: the 16 even-indexed, then the 16 odd-indexed, the order
// of a 4-bit row's low and high nibbles (k a multiple of 32).
template <class T>
static void nibble_order(const T* x, T* out, int64_t k) {
  for (int64_t c = 0; c < k / 32; c++) {
    for (int t = 0; t < 16; t++) {
      out[c * 32 + t] = x[c * 32 + 2 * t];
      out[c * 32 + 16 + t] = x[c * 32 + 2 * t + 1];
    }
  }
}

static Prepared prepare(const QuantArgs& a) {
  Prepared p;
  int64_t groups = a.k / a.group;
  p.sums.resize(a.m * groups);
  for (int64_t r = 0; r < a.m; r++) {
    const float* x = a.x + r * a.k;
    for (int64_t g = 0; g < groups; g++) {
      float s = 0;
      for (int i = 0; i < a.group; i++) s += x[g * a.group + i];
      p.sums[r * groups + g] = s;
    }
  }
  p.fold = biases_fold(a);
  if (p.fold) {
    for (float& s : p.sums) s *= a.biases.times;
  }
  if (a.bits == 4 && a.k % 32 == 0) {
    p.perm.resize(a.m * a.k);
    for (int64_t r = 0; r < a.m; r++) nibble_order(a.x + r * a.k, p.perm.data() + r * a.k, a.k);
  }
  return p;
}

// A whole row of `bits`-bit values as floats (or bytes): 8 values fill
// `bits` bytes, read as one little-endian word.
template <class T>
static void unpack_whole_row(const uint8_t* row, int64_t k, int bits, T* out) {
  const int64_t row_bytes = k * bits / 8;
  const uint64_t mask = (1u << bits) - 1;
  for (int64_t c = 0; c < k / 8; c++) {
    const int64_t at = c * bits;
    uint64_t v = 0;
    std::memcpy(&v, row + at, size_t(std::min<int64_t>(8, row_bytes - at)));
    for (int t = 0; t < 8; t++) out[c * 8 + t] = T((v >> (t * bits)) & mask);
  }
  if (k % 8 != 0) unpack_row(row, row_bytes, bits, k - k % 8, int(k % 8), out + k - k % 8);
}

// Any width: unpack each row of w once, then one dot product per group.
static void qmm_scalar(const QuantArgs& a, const Prepared& p, int64_t n0, int64_t n1) {
  const int64_t groups = a.k / a.group;
  const int64_t row_bytes = a.k * a.bits / 8;
  std::vector<float> q(a.k), sbuf(groups), bbuf(groups);
  for (int64_t j = n0; j < n1; j++) {
    unpack_whole_row(a.w + j * row_bytes, a.k, a.bits, q.data());
    const float* sc = scales_at(a.scales, j * groups, groups, sbuf.data());
    const float* bi = biases_at(a, p.fold, sc, j * groups, groups, bbuf.data());
    for (int64_t r = 0; r < a.m; r++) {
      const float* x = a.x + r * a.k;
      float acc = 0;
      for (int64_t g = 0; g < groups; g++) {
        const float d = dot(q.data() + g * a.group, x + g * a.group, a.group);
        acc += sc[g] * d + bi[g] * p.sums[r * groups + g];
      }
      a.y[r * a.n + j] = acc;
    }
  }
}

__attribute__((target("avx2,fma,f16c"))) static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The vector kernels compute R rows of w at once: R independent chains of
// multiply-adds share each load of x.
#define LMSPEC_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LMSPEC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))

template <int R>
LMSPEC_AVX2 static inline void block_avx2(
    const QuantArgs& a, const Prepared& p, int64_t j, int64_t r, const float* sc, const float* bi) {
  const int64_t groups = a.k / a.group, row_bytes = a.k * a.bits / 8;
  const __m256i low4 = _mm256_set1_epi32(0xF);
  __m256 yv[R];
  float yb[R];
  for (int i = 0; i < R; i++) yv[i] = _mm256_setzero_ps(), yb[i] = 0;
  for (int64_t g = 0; g < groups; g++) {
    const int64_t k0 = g * a.group;
    __m256 acc[R];
    for (int i = 0; i < R; i++) acc[i] = _mm256_setzero_ps();
    if (a.bits == 4) {
      const float* xp = p.perm.data() + r * a.k + k0;
      for (int c = 0; c < a.group; c += 32) {
        for (int h = 0; h < 2; h++) {
          __m256 xe = _mm256_loadu_ps(xp + c + h * 8), xo = _mm256_loadu_ps(xp + c + 16 + h * 8);
          for (int i = 0; i < R; i++) {
            const uint8_t* wp = a.w + (j + i) * row_bytes + (k0 + c) / 2 + h * 8;
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)wp));
            __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, low4));
            __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
            acc[i] = _mm256_fmadd_ps(lo, xe, _mm256_fmadd_ps(hi, xo, acc[i]));
          }
        }
      }
    } else {  // 8 bits
      const float* xp = a.x + r * a.k + k0;
      for (int c = 0; c < a.group; c += 8) {
        __m256 xv = _mm256_loadu_ps(xp + c);
        for (int i = 0; i < R; i++) {
          const uint8_t* wp = a.w + (j + i) * row_bytes + k0 + c;
          __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)wp)));
          acc[i] = _mm256_fmadd_ps(v, xv, acc[i]);
        }
      }
    }
    const float xs = p.sums[r * groups + g];
    for (int i = 0; i < R; i++) {
      yv[i] = _mm256_fmadd_ps(acc[i], _mm256_set1_ps(sc[i * groups + g]), yv[i]);
      yb[i] += bi[i * groups + g] * xs;
    }
  }
  for (int i = 0; i < R; i++) a.y[r * a.n + j + i] = hsum256(yv[i]) + yb[i];
}

// Group g's sum of weight values times activations (row r of x); groups
// of G values (0: of a.group).
template <int Bits, int G>
LMSPEC_AVX512 static inline __m512 group_dot_avx512(
    const QuantArgs& a, const Prepared& p, const uint8_t* w, int64_t r, int64_t g) {
  const __m512 nibbles = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int group = G != 0 ? G : a.group;
  const int64_t k0 = g * group;
  __m512 acc = _mm512_setzero_ps();
  if constexpr (Bits == 4) {
    const float* xp = p.perm.data() + r * a.k + k0;
    for (int c = 0; c < group; c += 32) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + (k0 + c) / 2)));
      const __m512 lo = _mm512_permutexvar_ps(v, nibbles);
      const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), nibbles);
      acc = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp + c), _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp + c + 16), acc));
    }
  } else {
    const float* xp = a.x + r * a.k + k0;
    for (int c = 0; c < group; c += 16) {
      const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + k0 + c))));
      acc = _mm512_fmadd_ps(v, _mm512_loadu_ps(xp + c), acc);
    }
  }
  return acc;
}

// One row of 4- or 8-bit w against one row of x (float32 activations,
// groups of 32 or more for 4 bits, 16 or more for 8): per group, the sum of
// weight values times activations, times the group's scale; the groups
// alternate between two running totals (one total would make each group's
// multiply-add wait for the last); the bias terms come last. Rows go one at
// a time, so w is read in order.
template <int Bits, int G>
LMSPEC_AVX512 static void row_avx512(
    const QuantArgs& a, const Prepared& p, int64_t j, int64_t r, const float* sc, const float* bi) {
  const int64_t groups = a.k / a.group;
  const uint8_t* w = a.w + j * (a.k * Bits / 8);
  // Even groups in one total, odd ones in the other (named values: an
  // array indexed by the group's parity lived in memory).
  __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    even = _mm512_fmadd_ps(group_dot_avx512<Bits, G>(a, p, w, r, g), _mm512_set1_ps(sc[g]), even);
    odd = _mm512_fmadd_ps(group_dot_avx512<Bits, G>(a, p, w, r, g + 1), _mm512_set1_ps(sc[g + 1]), odd);
  }
  if (g < groups) even = _mm512_fmadd_ps(group_dot_avx512<Bits, G>(a, p, w, r, g), _mm512_set1_ps(sc[g]), even);
  float yb = 0;
  for (g = 0; g < groups; g++) yb += bi[g] * p.sums[r * groups + g];
  a.y[r * a.n + j] = _mm512_reduce_add_ps(_mm512_add_ps(even, odd)) + yb;
}

// Rows [n0, n1) of w against every row of x, one row of w at a time.
template <void (*Row)(const QuantArgs&, const Prepared&, int64_t, int64_t, const float*, const float*)>
static void qmm_rows(const QuantArgs& a, const Prepared& p, int64_t n0, int64_t n1) {
  const int64_t groups = a.k / a.group;
  std::vector<float> sbuf(4 * groups), bbuf(4 * groups);
  for (int64_t j = n0; j < n1; j += 4) {
    const int rows = int(std::min<int64_t>(4, n1 - j));
    const float* sc = scales_at(a.scales, j * groups, rows * groups, sbuf.data());
    const float* bi = biases_at(a, p.fold, sc, j * groups, rows * groups, bbuf.data());
    for (int i = 0; i < rows; i++) {
      for (int64_t r = 0; r < a.m; r++) Row(a, p, j + i, r, sc + i * groups, bi + i * groups);
    }
  }
}

// 2, 3, 5 and 6 bits with AVX-512 VBMI: each 64-bit lane takes the `bits`
// bytes that hold 8 values (a byte permute), a multishift pulls each value
// into a byte, and 16 at a time become floats.
#define LMSPEC_VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,fma,f16c")))

static bool has_vbmi() {
  static bool v = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi");
  }();
  return v;
}

static bool vbmi_covers(int bits, int group, int64_t k) {
  return (bits == 2 || bits == 3 || bits == 5 || bits == 6) && group % 16 == 0 && k % 64 == 0;
}

// The byte permute and multishift controls that put the 8 `bits`-bit
// values held by each 64-bit lane into a byte each, for every width.
struct VbmiControls {
  alignas(64) uint8_t idx[64] = {};
  alignas(64) uint8_t ctrl[64] = {};
  constexpr explicit VbmiControls(int bits) {
    for (int lane = 0; lane < 8; lane++) {
      for (int t = 0; t < 8; t++) {
        idx[lane * 8 + t] = uint8_t(std::min(bits * lane + t, 63));
        ctrl[lane * 8 + t] = uint8_t(t * bits);
      }
    }
  }
};
static constexpr VbmiControls vbmi_controls[9] = {
    VbmiControls(0), VbmiControls(1), VbmiControls(2), VbmiControls(3), VbmiControls(4),
    VbmiControls(5), VbmiControls(6), VbmiControls(7), VbmiControls(8)};

template <int G>
LMSPEC_VBMI static void qmm_vbmi_groups(const QuantArgs& a, const Prepared& p, int64_t n0, int64_t n1) {
  const int group = G != 0 ? G : a.group;
  const int64_t groups = a.k / group, row_bytes = a.k * a.bits / 8;
  const int b = a.bits;
  const __m512i vidx = _mm512_load_si512(vbmi_controls[b].idx), vctrl = _mm512_load_si512(vbmi_controls[b].ctrl);
  const __m512i mask = _mm512_set1_epi8(char((1 << b) - 1));
  const __mmask64 load_mask = (b * 8 >= 64) ? ~__mmask64(0) : ((__mmask64(1) << (b * 8)) - 1);
  std::vector<float> sbuf(groups), bbuf(groups);
  for (int64_t j = n0; j < n1; j++) {
    const uint8_t* row = a.w + j * row_bytes;
    const float* sc = scales_at(a.scales, j * groups, groups, sbuf.data());
    const float* bi = biases_at(a, p.fold, sc, j * groups, groups, bbuf.data());
    for (int64_t r = 0; r < a.m; r++) {
      const float* x = a.x + r * a.k;
      __m512 yv = _mm512_setzero_ps(), acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      float yb = 0;
      for (int64_t c = 0; c < a.k / 64; c++) {
        __m512i bytes = _mm512_maskz_loadu_epi8(load_mask, row + c * 8 * b);
        __m512i vals = _mm512_and_si512(
            _mm512_multishift_epi64_epi8(vctrl, _mm512_permutexvar_epi8(vidx, bytes)), mask);
        for (int t = 0; t < 4; t++) {
          const int64_t i = c * 64 + t * 16;
          __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(vals, t)));
          if (t % 2 == 0) {
            acc0 = _mm512_fmadd_ps(f, _mm512_loadu_ps(x + i), acc0);
          } else {
            acc1 = _mm512_fmadd_ps(f, _mm512_loadu_ps(x + i), acc1);
          }
          if ((i + 16) % group == 0) {
            const int64_t g = i / group;
            yv = _mm512_fmadd_ps(_mm512_add_ps(acc0, acc1), _mm512_set1_ps(sc[g]), yv);
            yb += bi[g] * p.sums[r * groups + g];
            acc0 = acc1 = _mm512_setzero_ps();
          }
        }
      }
      a.y[r * a.n + j] = _mm512_reduce_add_ps(yv) + yb;
    }
  }
}

// Groups of 16 and 32 (GGUF's K-quant sub-blocks and blocks) with the
// group size a constant (a division per 16 values otherwise).
static void qmm_vbmi(const QuantArgs& a, const Prepared& p, int64_t n0, int64_t n1) {
  switch (a.group) {
    case 16: return qmm_vbmi_groups<16>(a, p, n0, n1);
    case 32: return qmm_vbmi_groups<32>(a, p, n0, n1);
    default: return qmm_vbmi_groups<0>(a, p, n0, n1);
  }
}

// Asks for rows [j + 12, j + 12 + rows) of w, and the scales and biases of
// rows [j, j + rows), which stream in while the rows before them are
// computed. Reads past the end of w are only hints.
static void prefetch_rows(const QuantArgs& a, int64_t j, int rows) {
  const int64_t row_bytes = a.k * a.bits / 8, groups = a.k / a.group;
  // Into L2, far enough ahead (12 rows) to hide the memory's latency.
  const uintptr_t next = reinterpret_cast<uintptr_t>(a.w) + uintptr_t((j + 12) * row_bytes);
  for (int64_t off = 0; off < rows * row_bytes; off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(next + uintptr_t(off)), _MM_HINT_T1);
  for (const ScaleReader* r : {&a.scales, &a.biases}) {
    const int64_t size = mx::size_of(r->t);
    const char* p = static_cast<const char*>(r->p) + j * groups * size;
    for (int64_t off = 0; off < rows * groups * size; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
  }
}

// Rows [n0, n1) of w against every row of x, 4 rows of w at a time.
template <void (*Block4)(const QuantArgs&, const Prepared&, int64_t, int64_t, const float*, const float*),
          void (*Block1)(const QuantArgs&, const Prepared&, int64_t, int64_t, const float*, const float*)>
static void qmm_blocks(const QuantArgs& a, const Prepared& p, int64_t n0, int64_t n1) {
  const int64_t groups = a.k / a.group;
  std::vector<float> sbuf(4 * groups), bbuf(4 * groups);
  int64_t j = n0;
  for (; j + 4 <= n1; j += 4) {
    if (j + 8 <= n1) prefetch_rows(a, j + 4, 4);
    const float* sc = scales_at(a.scales, j * groups, 4 * groups, sbuf.data());
    const float* bi = biases_at(a, p.fold, sc, j * groups, 4 * groups, bbuf.data());
    for (int64_t r = 0; r < a.m; r++) Block4(a, p, j, r, sc, bi);
  }
  for (; j < n1; j++) {
    const float* sc = scales_at(a.scales, j * groups, groups, sbuf.data());
    const float* bi = biases_at(a, p.fold, sc, j * groups, groups, bbuf.data());
    for (int64_t r = 0; r < a.m; r++) Block1(a, p, j, r, sc, bi);
  }
}

// ------------------------------------- products with 8-bit activations
//
// llama.cpp's numerics: each row of x is quantized to int8 in blocks, the
// block products are integer dot products, and the block scales multiply
// their sums. Blocks of 32 with a float16 scale (llama.cpp's Q8_0/Q8_1,
// used against its Q4_0..Q8_0 weights: MLX scales in float16/bfloat16), or
// of 256 with a float32 scale (its Q8_K, used against K-quants: MLX scales
// in float32, when the width is a multiple of 256).

struct Q8Row {
  std::vector<int8_t> q;  // [k]; for 4-bit weights permuted per 32 like Prepared::perm
  // 4 bits: per 64 values (two blocks of 32, c and c + 1) the even-indexed
  // values of c, of c + 1, then the odd-indexed of c, of c + 1: the order
  // of the low and high nibbles of 32 weight bytes; an odd last block as in
  // `q`.
  std::vector<int8_t> pairs;
  std::vector<float> d;  // per activation block
  std::vector<float> dblk;  // per 32 values: the scale of the block holding them
  std::vector<float> dpair;  // 4 bits: per 32 values, 4 times over (the lanes of a block pair)
  std::vector<float> dquad;  // 2/3/5/6 bits: per 4 values, their block's scale (the lanes of 64 values)
  std::vector<float> gsum;  // per weight group: the sum of x the bias multiplies
  int block = 32;
  // 16-bit activations: a second byte per value, in the layouts of `q` and
  // `pairs`: x = d (256 q + lo) within d / 2, with the scales above holding
  // d (a block's largest magnitude / 32512) and the integer products
  // combined as 256 times the first byte's plus the second's.
  std::vector<int8_t> lo, pairs_lo;
};

// Quantizes one block of 32 (Q8_0; the caller rounds its scale to float16)
// or 256 (Q8_K) values as `quantize_rows` does, 16 values per instruction.
#define LMSPEC_Q8X __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))
LMSPEC_Q8X static float quantize_block_avx512(const float* xb, int n, bool k_block, int8_t* qb) {
  __m512 amax_v = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) amax_v = _mm512_max_ps(amax_v, _mm512_abs_ps(_mm512_loadu_ps(xb + i)));
  const float amax = _mm512_reduce_max_ps(amax_v);
  if (amax == 0) {
    std::memset(qb, 0, size_t(n));
    return 0;
  }
  float scale;
  if (k_block) {
    // The first value of largest magnitude maps to -127.
    float max = 0;
    for (int i = 0; i < n; i++) {
      if (std::fabs(xb[i]) == amax) {
        max = xb[i];
        break;
      }
    }
    scale = -127.f / max;
  } else {
    scale = 127.f / amax;
  }
  const __m512 sv = _mm512_set1_ps(scale);
  const __m512i top = _mm512_set1_epi32(127);
  for (int i = 0; i < n; i += 16) {
    // Round to nearest even, as nearbyint in the default rounding mode.
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + i), sv));
    _mm_storeu_si128((__m128i*)(qb + i), _mm512_cvtepi32_epi8(_mm512_min_epi32(v, top)));
  }
  return k_block ? 1 / scale : amax / 127.f;
}

static inline float round_half(float v) {
  return half_to_float(float_to_half(v));
}

// The per-32 copies of a row's block scales, only for the kernels that
// read them.
static void expand_scales(const QuantArgs& a, Q8Row& row) {
  const bool pairs = a.bits == 4, quads = a.bits != 4 && a.bits != 8;
  row.dblk.resize(a.k / 32);
  row.dpair.resize(pairs ? a.k / 8 : 0);
  row.dquad.resize(quads ? a.k / 4 : 0);
  for (int64_t c = 0; c < a.k / 32; c++) {
    row.dblk[c] = row.d[c * 32 / row.block];
    for (int t = 0; pairs && t < 4; t++) row.dpair[c * 4 + t] = row.dblk[c];
    for (int t = 0; quads && t < 8; t++) row.dquad[c * 8 + t] = row.dblk[c];
  }
}

// The 4-bit kernels' orders of one plane of int8 values: `q` (per 32:
// evens, odds) and `pairs` (see Q8Row).
static void arrange_nibble_orders(const std::vector<int8_t>& plain, int64_t k, std::vector<int8_t>& q,
                                  std::vector<int8_t>& pairs) {
  q.resize(k);
  nibble_order(plain.data(), q.data(), k);
  pairs.resize(k);
  const int64_t k32 = k / 32;
  for (int64_t c = 0; c + 2 <= k32; c += 2) {
    const int8_t* p = plain.data() + c * 32;
    int8_t* o = pairs.data() + c * 32;
    for (int t = 0; t < 16; t++) {
      o[t] = p[2 * t];
      o[16 + t] = p[32 + 2 * t];
      o[32 + t] = p[2 * t + 1];
      o[48 + t] = p[32 + 2 * t + 1];
    }
  }
  if (k32 % 2 == 1) std::memcpy(pairs.data() + (k32 - 1) * 32, q.data() + (k32 - 1) * 32, 32);
}

// One block of 32 as `quantize_row_wide` quantizes it, 16 values per
// instruction (the same roundings: to nearest, ties to even); its scale.
LMSPEC_Q8X static float quantize_wide_avx512(const float* xb, int8_t* hi, int8_t* lo) {
  const __m512 a0 = _mm512_loadu_ps(xb), a1 = _mm512_loadu_ps(xb + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
  const __m512 id = _mm512_set1_ps(amax != 0 ? 127.f / amax : 0.f);
  const __m512i top = _mm512_set1_epi32(127), bottom = _mm512_set1_epi32(-127);
  for (int h = 0; h < 2; h++) {
    const __m512 v = _mm512_mul_ps(h == 0 ? a0 : a1, id);
    const __m512 r = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i l = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(v, r), _mm512_set1_ps(256.f)));
    _mm_storeu_si128((__m128i*)(hi + 16 * h), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)));
    _mm_storeu_si128((__m128i*)(lo + 16 * h), _mm512_cvtepi32_epi8(_mm512_max_epi32(_mm512_min_epi32(l, top), bottom)));
  }
  return amax;
}

// 16-bit activations (`Q8Row::lo`), blocks of 32: per value the nearest of
// the block's largest magnitude times i / 127 (the first byte, i), then
// the remainder to the nearest 256th of that step (the second byte); the
// bias terms take the plain float sums of x, as the float product.
static void quantize_row_wide(const QuantArgs& a, const float* x, Q8Row& row) {
  const int64_t blocks = a.k / 32, groups = a.k / a.group;
  row.block = 32;
  row.d.resize(blocks);
  std::vector<int8_t> hi(a.k), lo(a.k);
  const bool wide = level() == AVX512;
  for (int64_t b = 0; b < blocks; b++) {
    const float* xb = x + b * 32;
    if (wide) {
      row.d[b] = quantize_wide_avx512(xb, hi.data() + b * 32, lo.data() + b * 32) / 127.f / 256.f;
      continue;
    }
    float amax = 0;
    for (int i = 0; i < 32; i++) amax = std::max(amax, std::fabs(xb[i]));
    const float id = amax != 0 ? 127.f / amax : 0.f;
    for (int i = 0; i < 32; i++) {
      const float v = xb[i] * id;
      const float h = std::nearbyint(v);
      hi[b * 32 + i] = int8_t(h);
      lo[b * 32 + i] = int8_t(std::clamp(std::nearbyint((v - h) * 256.f), -127.f, 127.f));
    }
    row.d[b] = amax / 127.f / 256.f;
  }
  row.gsum.assign(groups, 0.f);
  for (int64_t g = 0; g < groups; g++) {
    float s = 0;
    for (int i = 0; i < a.group; i++) s += x[g * a.group + i];
    row.gsum[g] = s;
  }
  if (a.bits == 4) {
    arrange_nibble_orders(hi, a.k, row.q, row.pairs);
    arrange_nibble_orders(lo, a.k, row.lo, row.pairs_lo);
  } else {
    row.q = std::move(hi);
    row.lo = std::move(lo);
  }
}

// Per row of x: int8 blocks (llama.cpp's Q8_0/Q8_1, or Q8_K with
// `k_blocks`), or with `wide` the 16-bit blocks of `quantize_row_wide`;
// then the per-32 scale copies the kernels read.
static std::vector<Q8Row> quantize_rows(const QuantArgs& a, bool k_blocks, bool wide) {
  std::vector<Q8Row> rows(a.m);
  const int64_t groups = a.k / a.group;
  for (int64_t r = 0; r < a.m; r++) {
    const float* x = a.x + r * a.k;
    Q8Row& row = rows[r];
    if (wide) {
      quantize_row_wide(a, x, row);
      expand_scales(a, row);
      continue;
    }
    row.block = k_blocks ? 256 : 32;
    const int64_t blocks = a.k / row.block;
    row.d.resize(blocks);
    std::vector<int> qsum(a.k / 16, 0);  // per 16 values
    std::vector<float> dfull(blocks, 0.f);  // Q8_0 scales before rounding
    std::vector<int8_t> plain(a.k);
    for (int64_t b = 0; b < blocks; b++) {
      const float* xb = x + b * row.block;
      int8_t* qb = plain.data() + b * row.block;
      if (level() == AVX512) {
        const float d = quantize_block_avx512(xb, row.block, k_blocks, qb);
        row.d[b] = k_blocks ? d : round_half(d);
        dfull[b] = d;
        continue;
      }
      if (k_blocks) {
        // Q8_K: the value of largest magnitude maps to -127.
        float amax = 0, max = 0;
        for (int i = 0; i < 256; i++) {
          if (std::fabs(xb[i]) > amax) amax = std::fabs(xb[i]), max = xb[i];
        }
        if (amax == 0) {
          row.d[b] = 0;
          std::memset(qb, 0, 256);
          continue;
        }
        const float iscale = -127.f / max;
        for (int i = 0; i < 256; i++) {
          int v = int(std::nearbyint(iscale * xb[i]));
          qb[i] = int8_t(std::min(127, v));
        }
        row.d[b] = 1 / iscale;
      } else {
        // Q8_0: scale amax / 127 kept as float16, values rounded half to even.
        float amax = 0;
        for (int i = 0; i < 32; i++) amax = std::max(amax, std::fabs(xb[i]));
        const float d = amax / 127.f;
        const float id = amax != 0 ? 127.f / amax : 0.f;
        for (int i = 0; i < 32; i++) qb[i] = int8_t(std::nearbyint(xb[i] * id));
        row.d[b] = round_half(d);
        dfull[b] = d;
      }
    }
    for (int64_t c = 0; c < a.k / 16; c++) {
      int sq = 0;
      for (int i = 0; i < 16; i++) sq += plain[c * 16 + i];
      qsum[c] = sq;
    }
    // The sums the biases multiply, per weight group.
    row.gsum.assign(groups, 0.f);
    for (int64_t g = 0; g < groups; g++) {
      float acc = 0;
      if (a.group % 32 == 0) {
        for (int64_t c = g * a.group / 32; c < (g + 1) * a.group / 32; c++) {
          const float q = float(qsum[2 * c] + qsum[2 * c + 1]);
          // Against 4-bit float16-scaled weights (llama.cpp's Q4_1 with
          // Q8_1), the block sum is itself stored as float16.
          acc += (!k_blocks && a.bits == 4) ? round_half(dfull[c] * q) : row.d[c * 32 / row.block] * q;
        }
      } else {
        for (int64_t c = g * a.group / 16; c < (g + 1) * a.group / 16; c++) {
          acc += row.d[c * 16 / row.block] * float(qsum[c]);
        }
      }
      row.gsum[g] = acc;
    }
    if (a.bits == 4) {
      arrange_nibble_orders(plain, a.k, row.q, row.pairs);
    } else {
      row.q = plain;
    }
    expand_scales(a, row);
  }
  return rows;
}

// One row of w (4 or 8 bits) against one quantized row of x.
static float q8_dot_scalar(const QuantArgs& a, const Q8Row& x, int64_t j, const float* sc, const float* bi) {
  const int64_t groups = a.k / a.group, row_bytes = a.k * a.bits / 8;
  const uint8_t* w = a.w + j * row_bytes;
  const bool wide = !x.lo.empty();
  float y = 0, yb = 0;
  for (int64_t c = 0; c < a.k / 32; c++) {
    // The block's products with one plane of x.
    auto block = [&](const std::vector<int8_t>& xq) {
      int isum = 0;
      if (a.bits == 4) {
        for (int t = 0; t < 16; t++) {
          uint8_t b = w[c * 16 + t];
          isum += int(b & 0xF) * xq[c * 32 + t] + int(b >> 4) * xq[c * 32 + 16 + t];
        }
      } else {
        for (int t = 0; t < 32; t++) isum += int(w[c * 32 + t]) * xq[c * 32 + t];
      }
      return isum;
    };
    const int isum = wide ? 256 * block(x.q) + block(x.lo) : block(x.q);
    y += sc[c * 32 / a.group] * x.d[c * 32 / x.block] * float(isum);
  }
  for (int64_t g = 0; g < groups; g++) yb += bi[g] * x.gsum[g];
  return y + yb;
}

#define LMSPEC_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))

// acc plus the bias terms of one row of w (its biases times the sums of x
// they multiply), 8 groups per step: one chain of adds per group would take
// as long as the row's products on a small model.
LMSPEC_AVX2 static inline __m256 add_bias_terms(const QuantArgs& a, const Q8Row& x, const float* bi, __m256 acc) {
  const int64_t groups = a.k / a.group;
  const float* gs = x.gsum.data();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(bi + g), _mm256_loadu_ps(gs + g), acc);
  if (g < groups) {
    const __m256i lanes =
        _mm256_cmpgt_epi32(_mm256_set1_epi32(int(groups - g)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    acc = _mm256_fmadd_ps(_mm256_maskload_ps(bi + g, lanes), _mm256_maskload_ps(gs + g, lanes), acc);
  }
  return acc;
}

// Integer dot products of one block pair (lanes 0-3 block c, 4-7 block
// c + 1) added to 8 int32 lanes `acc`: AVX-512 VNNI, or AVX2 `maddubs`
// (4-bit weights only: 15 * 127 * 4 fits in 16 bits).
LMSPEC_VNNI static inline __m256i dot_pair4_vnni(__m256i acc, __m256i lo, __m256i hi, __m256i xe, __m256i xo) {
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc, lo, xe), hi, xo);
}

LMSPEC_AVX2 static inline __m256i dot_pair4_avx2(__m256i acc, __m256i lo, __m256i hi, __m256i xe, __m256i xo) {
  const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

// The weight scales of a block pair times the activation scales, per
// lane: groups of 32 (Gb = 1) hold one block each, larger groups both.
template <int Gb>
LMSPEC_AVX2 static inline __m256 pair_scales(const float* sc, const Q8Row& x, int64_t c) {
  const __m256 d = _mm256_loadu_ps(x.dpair.data() + c * 4);
  if constexpr (Gb == 1) {
    const __m128d s2 = _mm_load_sd(reinterpret_cast<const double*>(sc + c));
    const __m256i pair = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    return _mm256_mul_ps(_mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castpd_ps(s2)), pair), d);
  } else {
    return _mm256_mul_ps(_mm256_set1_ps(sc[c / Gb]), d);
  }
}

// Row j of 4-bit w (groups of 32 * Gb) against M int8 rows of x, two
// blocks of 32 per step; sc, bi: the row's scales and biases; out: one
// product per row of x. One row of w at a time reads w in order, which the
// hardware prefetcher follows (4 rows interleaved ran the 8-bit output head
// of a small model at half the speed); the M rows of x (a prompt) share
// each unpacked step of it. One body for each instruction set (the pair
// product differs).
#define LMSPEC_Q4_ROW(NAME, TARGET, DOT)                                                                   \
  template <int Gb, int M, bool W>                                                                         \
  TARGET static void NAME(const QuantArgs& a, const Q8Row* x, int64_t j, const float* sc, const float* bi, \
                          float* out) {                                                                    \
    const int64_t blocks = a.k / 32, row_bytes = a.k / 2;                                                  \
    const uint8_t* w = a.w + j * row_bytes;                                                                \
    const __m256i m4 = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();                              \
    __m256 acc[M];                                                                                         \
    for (int i = 0; i < M; i++) acc[i] = _mm256_setzero_ps();                                              \
    int64_t c = 0;                                                                                         \
    for (; c + 2 <= blocks; c += 2) {                                                                      \
      const __m256i v = _mm256_loadu_si256((const __m256i*)(w + c * 16));                                 \
      const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);      \
      for (int i = 0; i < M; i++) {                                                                        \
        const int8_t* xq = x[i].pairs.data() + c * 32;                                                     \
        __m256i is = DOT(zero, lo, hi, _mm256_loadu_si256((const __m256i*)xq), _mm256_loadu_si256((const __m256i*)(xq + 32))); \
        if constexpr (W) {                                                                                 \
          const int8_t* xl = x[i].pairs_lo.data() + c * 32;                                                \
          is = DOT(_mm256_slli_epi32(is, 8), lo, hi, _mm256_loadu_si256((const __m256i*)xl),               \
                   _mm256_loadu_si256((const __m256i*)(xl + 32)));                                         \
        }                                                                                                  \
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), pair_scales<Gb>(sc, x[i], c), acc[i]);            \
      }                                                                                                    \
    }                                                                                                      \
    if (c < blocks) {                                                                                      \
      /* The odd last block, in `q`'s order [evens | odds]: low 128 bits only. */                          \
      const __m256i v = _mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(w + c * 16)));            \
      const __m256i lo = _mm256_blend_epi32(_mm256_and_si256(v, m4), zero, 0xF0);                          \
      const __m256i hi = _mm256_blend_epi32(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), zero, 0xF0);    \
      for (int i = 0; i < M; i++) {                                                                        \
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(x[i].pairs.data() + c * 32));              \
        __m256i is = DOT(zero, lo, hi, xv, _mm256_permute2x128_si256(xv, xv, 0x11));                       \
        if constexpr (W) {                                                                                 \
          const __m256i xl = _mm256_loadu_si256((const __m256i*)(x[i].pairs_lo.data() + c * 32));          \
          is = DOT(_mm256_slli_epi32(is, 8), lo, hi, xl, _mm256_permute2x128_si256(xl, xl, 0x11));         \
        }                                                                                                  \
        const __m256 sv = _mm256_set1_ps(sc[c / Gb] * x[i].dblk[c]);                                       \
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), sv, acc[i]);                                      \
      }                                                                                                    \
    }                                                                                                      \
    for (int i = 0; i < M; i++) out[i] = hsum256(add_bias_terms(a, x[i], bi, acc[i]));                     \
  }

LMSPEC_Q4_ROW(q4_row_vnni, LMSPEC_VNNI, dot_pair4_vnni)
LMSPEC_Q4_ROW(q4_row_avx2, LMSPEC_AVX2, dot_pair4_avx2)

// One block of 32 8-bit weights times one of x's, as 8 int32 sums of
// four: with W, 256 times the first byte's plus the second's.
template <bool W>
LMSPEC_VNNI static inline __m256i q8_block_dot(const uint8_t* w, const int8_t* xq, const int8_t* xl) {
  const __m256i wv = _mm256_loadu_si256((const __m256i*)w);
  const __m256i is = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, _mm256_loadu_si256((const __m256i*)xq));
  if constexpr (!W) return is;
  return _mm256_dpbusd_epi32(_mm256_slli_epi32(is, 8), wv, _mm256_loadu_si256((const __m256i*)xl));
}

// Row j of 8-bit w against M int8 rows of x, one block of 32 per step.
template <int Gb, int M, bool W>
LMSPEC_VNNI static void q8_row_vnni(
    const QuantArgs& a, const Q8Row* x, int64_t j, const float* sc, const float* bi, float* out) {
  const uint8_t* w = a.w + j * a.k;
  if constexpr (W) {
    // The blocks alternate between two running totals per row of x, so
    // each block's multiply-add does not wait for the last one's (a decode
    // step's output head); every row in the same order, so a row's product
    // does not depend on the rows beside it (a batch).
    __m256 even[M], odd[M];
    for (int i = 0; i < M; i++) even[i] = odd[i] = _mm256_setzero_ps();
    const int64_t blocks = a.k / 32;
    int64_t c = 0;
    for (; c + 2 <= blocks; c += 2) {
      for (int i = 0; i < M; i++) {
        const int8_t *xq = x[i].q.data(), *xl = x[i].lo.data();
        even[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_block_dot<W>(w + c * 32, xq + c * 32, xl + c * 32)),
                                  _mm256_set1_ps(sc[c / Gb] * x[i].dblk[c]), even[i]);
        odd[i] = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(q8_block_dot<W>(w + c * 32 + 32, xq + c * 32 + 32, xl + c * 32 + 32)),
            _mm256_set1_ps(sc[(c + 1) / Gb] * x[i].dblk[c + 1]), odd[i]);
      }
    }
    for (int i = 0; c < blocks && i < M; i++) {
      even[i] = _mm256_fmadd_ps(
          _mm256_cvtepi32_ps(q8_block_dot<W>(w + c * 32, x[i].q.data() + c * 32, x[i].lo.data() + c * 32)),
          _mm256_set1_ps(sc[c / Gb] * x[i].dblk[c]), even[i]);
    }
    for (int i = 0; i < M; i++) out[i] = hsum256(add_bias_terms(a, x[i], bi, _mm256_add_ps(even[i], odd[i])));
    return;
  }
  __m256 acc[M];
  for (int i = 0; i < M; i++) acc[i] = _mm256_setzero_ps();
  for (int64_t c = 0; c < a.k / 32; c++) {
    for (int i = 0; i < M; i++) {
      const __m256i is = q8_block_dot<W>(w + c * 32, x[i].q.data() + c * 32, nullptr);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), _mm256_set1_ps(sc[c / Gb] * x[i].dblk[c]), acc[i]);
    }
  }
  for (int i = 0; i < M; i++) out[i] = hsum256(add_bias_terms(a, x[i], bi, acc[i]));
}

using RowKernel = void (*)(const QuantArgs&, const Q8Row*, int64_t, const float*, const float*, float*);

#define LMSPEC_VBMI_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,fma,f16c")))

// Row j of 2, 3, 5 or 6-bit w (groups of G = 16, 32, 64 or 128) against an
// int8 row of x, 64 values per step: each 64-bit lane takes the Bits bytes
// that hold 8 values (a byte permute), a multishift puts each value in a
// byte, and one VNNI product sums them in fours (lane t: values 4t..4t+3).
// For groups of G: which of a step's groups each lane's 4 values are in.
template <int G>
struct LaneGroups {
  alignas(64) int32_t v[16] = {};
  constexpr LaneGroups() {
    for (int t = 0; t < 16; t++) v[t] = G < 64 ? 4 * t / G : 0;
  }
};
template <int G>
inline constexpr LaneGroups<G> lane_groups{};

// 64 values' integer products with one row of x, in fours; with W the
// second byte's too, combined as 256 times the first's plus the second's.
template <bool W>
LMSPEC_VBMI_VNNI static inline __m512i qx_dot(__m512i vals, const int8_t* xq, const int8_t* xl) {
  const __m512i is = _mm512_dpbusd_epi32(_mm512_setzero_si512(), vals, _mm512_loadu_si512(xq));
  if constexpr (!W) return is;
  return _mm512_dpbusd_epi32(_mm512_slli_epi32(is, 8), vals, _mm512_loadu_si512(xl));
}

template <int Bits, int G, int M, bool W>
LMSPEC_VBMI_VNNI static void qx_row_vbmi(
    const QuantArgs& a, const Q8Row* x, int64_t j, const float* sc, const float* bi, float* out) {
  static_assert(M >= 1 && M <= 4);
  constexpr int groups_per_step = G < 64 ? 64 / G : 1;
  const __m512i vidx = _mm512_load_si512(vbmi_controls[Bits].idx);
  const __m512i vctrl = _mm512_load_si512(vbmi_controls[Bits].ctrl);
  const __m512i vgroup = _mm512_load_si512(lane_groups<G>.v);
  const __m512i mask = _mm512_set1_epi8(char((1 << Bits) - 1));
  const __mmask64 load_mask = (__mmask64(1) << (Bits * 8)) - 1;
  const __mmask16 scale_mask = __mmask16((1u << groups_per_step) - 1);
  const uint8_t* row = a.w + j * (a.k * Bits / 8);
  // The running totals as named values, not an array: gcc keeps an array
  // of vectors in memory and stores it back on every step.
  __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  const int8_t* xq[M];
  const int8_t* xl[M];
  const float* xd[M];
  for (int i = 0; i < M; i++) xq[i] = x[i].q.data(), xl[i] = x[i].lo.data(), xd[i] = x[i].dquad.data();
  for (int64_t c = 0; c < a.k / 64; c++) {
    const __m512i bytes = _mm512_maskz_loadu_epi8(load_mask, row + c * 8 * Bits);
    const __m512i vals = _mm512_and_si512(_mm512_multishift_epi64_epi8(vctrl, _mm512_permutexvar_epi8(vidx, bytes)), mask);
    const __m512 s = _mm512_permutexvar_ps(vgroup, _mm512_maskz_loadu_ps(scale_mask, sc + c * 64 / G));
#define LMSPEC_QX_STEP(i, acc)                                                                               \
  acc = _mm512_fmadd_ps(                                                                                     \
      _mm512_cvtepi32_ps(qx_dot<W>(vals, xq[i] + c * 64, W ? xl[i] + c * 64 : nullptr)),                    \
      _mm512_mul_ps(s, _mm512_loadu_ps(xd[i] + c * 16)), acc)
    LMSPEC_QX_STEP(0, acc0);
    if constexpr (M > 1) LMSPEC_QX_STEP(1, acc1);
    if constexpr (M > 2) LMSPEC_QX_STEP(2, acc2);
    if constexpr (M > 3) LMSPEC_QX_STEP(3, acc3);
#undef LMSPEC_QX_STEP
  }
  const __m512 acc[4] = {acc0, acc1, acc2, acc3};
  for (int i = 0; i < M; i++) {
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[i]), 1));
    out[i] = hsum256(add_bias_terms(a, x[i], bi, _mm256_add_ps(_mm512_castps512_ps256(acc[i]), hi)));
  }
}

template <int Bits, int M, bool W>
static RowKernel qx_row_for(int group) {
  switch (group) {
    case 16: return qx_row_vbmi<Bits, 16, M, W>;
    case 32: return qx_row_vbmi<Bits, 32, M, W>;
    case 64: return qx_row_vbmi<Bits, 64, M, W>;
    case 128: return qx_row_vbmi<Bits, 128, M, W>;
    default: return nullptr;
  }
}

// The row kernel for these weights and M rows of x (4 or 8 bits in groups
// of 32, 64 or 128; 2, 3, 5 or 6 bits in groups of 16 to 128 where VBMI and
// VNNI are there); null where none applies. W: 16-bit activations.
template <int M, bool W>
static RowKernel row_kernel(int bits, int group, int64_t k, bool vnni) {
  if (bits == 4) {
    switch (group) {
      case 32: return vnni ? q4_row_vnni<1, M, W> : q4_row_avx2<1, M, W>;
      case 64: return vnni ? q4_row_vnni<2, M, W> : q4_row_avx2<2, M, W>;
      case 128: return vnni ? q4_row_vnni<4, M, W> : q4_row_avx2<4, M, W>;
      default: return nullptr;
    }
  }
  if (vnni && has_vbmi() && k % 64 == 0) {
    switch (bits) {
      case 2: return qx_row_for<2, M, W>(group);
      case 3: return qx_row_for<3, M, W>(group);
      case 5: return qx_row_for<5, M, W>(group);
      case 6: return qx_row_for<6, M, W>(group);
      default: break;
    }
  }
  if (bits == 8 && vnni) {
    switch (group) {
      case 32: return q8_row_vnni<1, M, W>;
      case 64: return q8_row_vnni<2, M, W>;
      case 128: return q8_row_vnni<4, M, W>;
      default: return nullptr;
    }
  }
  return nullptr;
}

// Widths other than 4 and 8: rows unpacked to one byte per value first
// (`unpack_whole_row`), then integer dot products per group (groups of 16
// or multiples of 32).
static float q8_unpacked_scalar(
    const Q8Row& x, const uint8_t* w, int64_t k, int group, const float* sc, const float* bi) {
  const int64_t groups = k / group;
  float y = 0, yb = 0;
  const bool wide = !x.lo.empty();
  for (int64_t c = 0; c < k / 16; c++) {
    int isum = 0, lsum = 0;
    for (int t = 0; t < 16; t++) isum += int(w[c * 16 + t]) * x.q[c * 16 + t];
    for (int t = 0; wide && t < 16; t++) lsum += int(w[c * 16 + t]) * x.lo[c * 16 + t];
    if (wide) isum = 256 * isum + lsum;
    y += sc[c * 16 / group] * x.d[c * 16 / x.block] * float(isum);
  }
  for (int64_t g = 0; g < groups; g++) yb += bi[g] * x.gsum[g];
  return y + yb;
}

template <int R, bool W>
LMSPEC_VNNI static void q8_unpacked_vnni(
    const Q8Row& x, const uint8_t* w, int64_t k, int group, const float* sc, const float* bi, float* out) {
  const int64_t groups = k / group;
  __m256 acc[R];
  for (int i = 0; i < R; i++) acc[i] = _mm256_setzero_ps();
  for (int64_t c = 0; c < k / 32; c++) {
    const __m256i xv = _mm256_loadu_si256((const __m256i*)(x.q.data() + c * 32));
    const __m256i xl = W ? _mm256_loadu_si256((const __m256i*)(x.lo.data() + c * 32)) : xv;
    const float dx = x.d[c * 32 / x.block];
    const int64_t g0 = c * 32 / group, g1 = (c * 32 + 16) / group;
    for (int i = 0; i < R; i++) {
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + i * k + c * 32));
      __m256i isum = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, xv);
      if constexpr (W) isum = _mm256_dpbusd_epi32(_mm256_slli_epi32(isum, 8), wv, xl);
      // Lanes 0-3 hold values 0-15, lanes 4-7 values 16-31.
      const __m256 scale =
          _mm256_set_m128(_mm_set1_ps(sc[i * groups + g1] * dx), _mm_set1_ps(sc[i * groups + g0] * dx));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[i]);
    }
  }
  for (int i = 0; i < R; i++) {
    float yb = 0;
    for (int64_t g = 0; g < groups; g++) yb += bi[i * groups + g] * x.gsum[g];
    out[i] = hsum256(acc[i]) + yb;
  }
}

static bool has_vnni() {
  static bool v = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
  }();
  return v;
}

// Rows of x whose int8 blocks stay in L1 while the rows of w stream by (a
// prompt; with x in the outer loop instead, x streamed from L2 for every
// row of w: 56 -> 72 GMAC/s on gemma-3-270m's 5-bit projections).
static constexpr int64_t kXBlock = 16;

// The product with activations quantized per block: int8 (llama.cpp's
// numerics), or with `wide` 16 bits in two bytes (`quantize_row_wide`).
static void qmm_q8(const QuantArgs& a, bool wide) {
  const bool k_blocks = a.scales.t == mx::float32 && a.k % 256 == 0;
  std::vector<Q8Row> xs = quantize_rows(a, k_blocks, wide);
  const bool fold = biases_fold(a);
  if (fold) {
    for (Q8Row& r : xs) {
      for (float& g : r.gsum) g *= a.biases.times;
    }
  }
  const Level l = level();
  const bool vnni = l == AVX512 && has_vnni();
  const bool avx2 = l >= AVX2 && a.bits == 4;
  const int64_t groups = a.k / a.group;
  int64_t grain = std::max<int64_t>(16, 65536 / std::max<int64_t>(a.k * a.m, 1));
  const RowKernel direct = !(vnni || avx2) ? nullptr
                           : wide         ? row_kernel<1, true>(a.bits, a.group, a.k, vnni)
                                          : row_kernel<1, false>(a.bits, a.group, a.k, vnni);
  const RowKernel direct4 = !(vnni || avx2) ? nullptr
                            : wide         ? row_kernel<4, true>(a.bits, a.group, a.k, vnni)
                                           : row_kernel<4, false>(a.bits, a.group, a.k, vnni);
  const bool unpacked = direct == nullptr && a.bits != 4 && a.bits != 8;
  parallel_range(a.n, grain, [&](int64_t n0, int64_t n1) {
    std::vector<float> sbuf(4 * groups), bbuf(4 * groups);
    float out[4];
    if (direct != nullptr) {
      // Each row of w against the rows of x, 4 at a time while they last;
      // the rows of x in blocks that stay in L1 while w's rows stream by.
      for (int64_t r0 = 0; r0 < a.m; r0 += kXBlock) {
        const int64_t r1 = std::min(a.m, r0 + kXBlock);
        for (int64_t j = n0; j < n1; j += 4) {
          const int rows = int(std::min<int64_t>(4, n1 - j));
          const float* sc = scales_at(a.scales, j * groups, rows * groups, sbuf.data());
          const float* bi = biases_at(a, fold, sc, j * groups, rows * groups, bbuf.data());
          for (int i = 0; i < rows; i++) {
            const float *s = sc + i * groups, *b = bi + i * groups;
            int64_t r = r0;
            for (; r + 4 <= r1; r += 4) {
              direct4(a, &xs[r], j + i, s, b, out);
              for (int t = 0; t < 4; t++) a.y[(r + t) * a.n + j + i] = out[t];
            }
            for (; r < r1; r++) {
              direct(a, &xs[r], j + i, s, b, out);
              a.y[r * a.n + j + i] = out[0];
            }
          }
        }
      }
      return;
    }
    std::vector<uint8_t> bytes(unpacked ? 4 * a.k : 0);
    const int64_t row_bytes = a.k * a.bits / 8;
    int64_t j = n0;
    for (; j < n1;) {
      const int rows = (j + 4 <= n1 && unpacked && vnni) ? 4 : 1;
      const float* sc = scales_at(a.scales, j * groups, rows * groups, sbuf.data());
      const float* bi = biases_at(a, fold, sc, j * groups, rows * groups, bbuf.data());
      if (unpacked) {
        for (int i = 0; i < rows; i++) unpack_whole_row(a.w + (j + i) * row_bytes, a.k, a.bits, bytes.data() + i * a.k);
      }
      for (int64_t r = 0; r < a.m; r++) {
        if (unpacked) {
          if (vnni && rows == 4) {
            wide ? q8_unpacked_vnni<4, true>(xs[r], bytes.data(), a.k, a.group, sc, bi, out)
                 : q8_unpacked_vnni<4, false>(xs[r], bytes.data(), a.k, a.group, sc, bi, out);
          } else {
            for (int i = 0; i < rows; i++)
              out[i] = q8_unpacked_scalar(xs[r], bytes.data() + i * a.k, a.k, a.group, sc + i * groups,
                                          bi + i * groups);
          }
        } else {
          out[0] = q8_dot_scalar(a, xs[r], j, sc, bi);
        }
        for (int i = 0; i < rows; i++) a.y[r * a.n + j + i] = out[i];
      }
      j += rows;
    }
  });
}

// Whether the 8-bit-activation product covers these weights.
static bool q8_covers(int bits, int group, int64_t k) {
  if (bits == 4 || bits == 8) return group % 32 == 0 && k % 32 == 0;
  return bits >= 2 && bits <= 8 && (group == 16 || group % 32 == 0) && k % 32 == 0;
}

// How the quantized product takes its activations (`Activations` in Rust).
enum class Act : int { Float = 0, Int8 = 1, Int16 = 2 };

static void qmm(const QuantArgs& a, Act act) {
  if (act != Act::Float && q8_covers(a.bits, a.group, a.k)) {
    qmm_q8(a, act == Act::Int16);
    return;
  }
  Prepared p = prepare(a);
  bool simd_bits = (a.bits == 4 && a.group % 32 == 0) || (a.bits == 8 && a.group % 16 == 0);
  Level l = level();
  // Rows of w per chunk: enough work to pay for a hand-off.
  int64_t grain = std::max<int64_t>(16, 65536 / std::max<int64_t>(a.k * a.m, 1));
  parallel_range(a.n, grain, [&](int64_t n0, int64_t n1) {
    if (simd_bits && l == AVX512) {
      // Groups of 32 (GGUF's blocks) with the group size a constant.
      if (a.group == 32) {
        a.bits == 4 ? qmm_rows<row_avx512<4, 32>>(a, p, n0, n1) : qmm_rows<row_avx512<8, 32>>(a, p, n0, n1);
      } else {
        a.bits == 4 ? qmm_rows<row_avx512<4, 0>>(a, p, n0, n1) : qmm_rows<row_avx512<8, 0>>(a, p, n0, n1);
      }
    } else if (simd_bits && l >= AVX2) {
      qmm_blocks<block_avx2<4>, block_avx2<1>>(a, p, n0, n1);
    } else if (l == AVX512 && has_vbmi() && vbmi_covers(a.bits, a.group, a.k)) {
      qmm_vbmi(a, p, n0, n1);
    } else {
      qmm_scalar(a, p, n0, n1);
    }
  });
}

// w * scale + bias for every value, as float32 rows.
static void dequantize_rows(
    const uint8_t* w,
    ScaleReader scales,
    ScaleReader biases,
    float* out,
    int64_t n,
    int64_t k,
    int group,
    int bits) {
  int64_t groups = k / group;
  int64_t row_bytes = k * bits / 8;
  parallel_range(n, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t j = n0; j < n1; j++) {
      const uint8_t* row = w + j * row_bytes;
      float* o = out + j * k;
      if (bits == 4) {
        for (int64_t i = 0; i < k / 2; i++) {
          o[2 * i] = float(row[i] & 0xF);
          o[2 * i + 1] = float(row[i] >> 4);
        }
      } else if (bits == 8) {
        for (int64_t i = 0; i < k; i++) o[i] = float(row[i]);
      } else {
        unpack_whole_row(row, k, bits, o);
      }
      for (int64_t g = 0; g < groups; g++) {
        float s = scales(j * groups + g), b = biases(j * groups + g);
        float* og = o + g * group;
        for (int i = 0; i < group; i++) og[i] = og[i] * s + b;
      }
    }
  });
}

// ------------------------------------------------------------- primitives

// Inputs must be evaluated; returns a pointer valid while `a` lives, to a
// row-major float32 copy when `a` is strided.
struct F32View {
  std::vector<float> copy;
  const float* ptr;
  explicit F32View(const mx::array& a) {
    if (a.flags().row_contiguous) {
      ptr = a.data<float>();
    } else {
      copy = dense_f32(a);
      ptr = copy.data();
    }
  }
};

static void alloc_out(mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
}

// Hands `work` to the stream's command encoder, as MLX's own CPU
// primitives do. `out` must be allocated before `work` takes its weak copy.
template <class F>
static void run_on_stream(mx::Stream s, const std::vector<mx::array>& in, mx::array& out, F&& work) {
  auto& enc = mx::cpu::get_command_encoder(s);
  for (auto& a : in) enc.set_input_array(a);
  enc.set_output_array(out);
  enc.dispatch(std::forward<F>(work));
}

class QuantMatmul : public mx::UnaryPrimitive {
 public:
  // `bias_of_scale`: when not 0, every bias is this multiple of its scale
  // (read from the scales; the biases are not read).
  QuantMatmul(mx::Stream s, int group, int bits, Act act, float bias_of_scale)
      : UnaryPrimitive(s), group_(group), bits_(bits), act_(act), bias_of_scale_(bias_of_scale) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    alloc_out(out);
    run_on_stream(stream(), in, out, [x = mx::array::unsafe_weak_copy(in[0]),
                  w = mx::array::unsafe_weak_copy(in[1]),
                  s = mx::array::unsafe_weak_copy(in[2]),
                  b = mx::array::unsafe_weak_copy(in[3]),
                  out = mx::array::unsafe_weak_copy(out),
                  group = group_,
                  bits = bits_,
                  act = act_,
                  tied = bias_of_scale_]() mutable {
      F32View xv(x);
      QuantArgs a;
      a.k = x.shape(-1);
      a.m = int64_t(x.size()) / std::max<int64_t>(a.k, 1);
      a.n = w.shape(0);
      a.x = xv.ptr;
      a.w = w.data<uint8_t>();
      a.scales = ScaleReader{s.data<void>(), s.dtype()};
      a.biases = tied != 0.0f ? ScaleReader{s.data<void>(), s.dtype(), tied} : ScaleReader{b.data<void>(), b.dtype()};
      a.y = out.data<float>();
      a.group = group;
      a.bits = bits;
      qmm(a, act);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("lmspec quantized matmul runs on the CPU only");
  }
  const char* name() const override {
    return "LmspecQuantMatmul";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantMatmul&>(other);
    return group_ == o.group_ && bits_ == o.bits_ && act_ == o.act_ && bias_of_scale_ == o.bias_of_scale_;
  }

 private:
  int group_, bits_;
  Act act_;
  float bias_of_scale_;
};

// y[r, j] = x[r] . w[j] for float32 rows of w ([N, K], the weight of a
// linear layer before its transpose): a decode step's product with a dense
// weight, read once and in order; BLAS's sgemm repacks the whole weight on
// every one-row call.
LMSPEC_AVX512 static float dot_rows_avx512(const float* x, const float* w, int64_t k) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(w + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(w + i + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), _mm512_loadu_ps(w + i + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), _mm512_loadu_ps(w + i + 48), a3);
  }
  for (; i + 16 <= k; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(w + i), a0);
  float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  for (; i < k; i++) s += x[i] * w[i];
  return s;
}

static void matvec(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k) {
  const bool wide = level() == AVX512;
  int64_t grain = std::max<int64_t>(8, 16384 / std::max<int64_t>(k * m, 1));
  parallel_range(n, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t j = n0; j < n1; j++) {
      const float* wj = w + j * k;
      for (int64_t r = 0; r < m; r++) y[r * n + j] = wide ? dot_rows_avx512(x + r * k, wj, k) : dot(x + r * k, wj, k);
    }
  });
}

class DenseMatvec : public mx::UnaryPrimitive {
 public:
  explicit DenseMatvec(mx::Stream s) : UnaryPrimitive(s) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    alloc_out(out);
    run_on_stream(stream(), in, out, [x = mx::array::unsafe_weak_copy(in[0]),
                  w = mx::array::unsafe_weak_copy(in[1]),
                  out = mx::array::unsafe_weak_copy(out)]() mutable {
      F32View xv(x);
      // w is the transpose view [K, N] of a row-major [N, K] array.
      const int64_t k = w.shape(0), n = w.shape(1);
      matvec(xv.ptr, w.data<float>(), out.data<float>(), int64_t(x.size()) / std::max<int64_t>(k, 1), n, k);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("lmspec dense product runs on the CPU only");
  }
  const char* name() const override {
    return "LmspecDenseMatvec";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

class Dequantize : public mx::UnaryPrimitive {
 public:
  Dequantize(mx::Stream s, int group, int bits)
      : UnaryPrimitive(s), group_(group), bits_(bits) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    alloc_out(out);
    run_on_stream(stream(), in, out, [w = mx::array::unsafe_weak_copy(in[0]),
                  s = mx::array::unsafe_weak_copy(in[1]),
                  b = mx::array::unsafe_weak_copy(in[2]),
                  out = mx::array::unsafe_weak_copy(out),
                  group = group_,
                  bits = bits_]() mutable {
      dequantize_rows(
          w.data<uint8_t>(),
          ScaleReader{s.data<void>(), s.dtype()},
          ScaleReader{b.data<void>(), b.dtype()},
          out.data<float>(),
          out.shape(0),
          out.shape(1),
          group,
          bits);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("lmspec dequantize runs on the CPU only");
  }
  const char* name() const override {
    return "LmspecDequantize";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Dequantize&>(other);
    return group_ == o.group_ && bits_ == o.bits_;
  }

 private:
  int group_, bits_;
};

// x * rsqrt(mean(x^2) + eps) (* w), float32, as MLX's rms_norm computes it.
class RmsNorm : public mx::UnaryPrimitive {
 public:
  RmsNorm(mx::Stream s, float eps, bool has_weight)
      : UnaryPrimitive(s), eps_(eps), has_weight_(has_weight) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    alloc_out(out);
    std::optional<mx::array> w;
    if (has_weight_) w = mx::array::unsafe_weak_copy(in[1]);
    run_on_stream(stream(), in, out, [x = mx::array::unsafe_weak_copy(in[0]),
                  w,
                  out = mx::array::unsafe_weak_copy(out),
                  eps = eps_]() mutable {
      F32View xv(x);
      std::optional<F32View> wv;
      if (w) wv.emplace(*w);
      int64_t d = x.shape(-1);
      int64_t rows = int64_t(x.size()) / std::max<int64_t>(d, 1);
      float* o = out.data<float>();
      const float* xs = xv.ptr;
      const float* ws = wv ? wv->ptr : nullptr;
      parallel_range(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) {
          const float* xr = xs + r * d;
          float ss = dot(xr, xr, d);
          float inv = 1.0f / std::sqrt(ss / float(d) + eps);
          float* orow = o + r * d;
          for (int64_t i = 0; i < d; i++) {
            float v = xr[i] * inv;
            orow[i] = ws ? v * ws[i] : v;
          }
        }
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("lmspec rms_norm runs on the CPU only");
  }
  const char* name() const override {
    return "LmspecRmsNorm";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const RmsNorm&>(other);
    return eps_ == o.eps_ && has_weight_ == o.has_weight_;
  }

 private:
  float eps_;
  bool has_weight_;
};

// Rotary embedding of x [B, H, T, D] at positions offset + t, as MLX's
// rope computes it: theta = (t + offset) * scale * inv_freq, inv_freq =
// exp(-i * log(base) / (dims/2)) or 1 / freqs[i]. One offset serves every
// row, or each row b has its own, offsets[b] (a batch of sequences at
// their own positions): a row's values are the same either way.
class Rope : public mx::UnaryPrimitive {
 public:
  Rope(mx::Stream s,
       int dims,
       bool traditional,
       float base,
       float scale,
       std::vector<int> offsets,
       bool has_freqs)
      : UnaryPrimitive(s),
        dims_(dims),
        traditional_(traditional),
        base_(base),
        scale_(scale),
        offsets_(std::move(offsets)),
        has_freqs_(has_freqs) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    alloc_out(out);
    std::optional<mx::array> freqs;
    if (has_freqs_) freqs = mx::array::unsafe_weak_copy(in[1]);
    run_on_stream(stream(), in, out, [x = mx::array::unsafe_weak_copy(in[0]),
                  freqs,
                  out = mx::array::unsafe_weak_copy(out),
                  dims = dims_,
                  trad = traditional_,
                  base = base_,
                  scale = scale_,
                  offsets = offsets_]() mutable {
      int half = dims / 2;
      std::vector<float> inv(half);
      if (freqs) {
        F32View fv(*freqs);
        for (int i = 0; i < half; i++) inv[i] = 1.0f / fv.ptr[i];
      } else {
        float step = std::log(base) / float(half);
        for (int i = 0; i < half; i++) inv[i] = std::exp(float(-i) * step);
      }
      int64_t B = x.shape(0), H = x.shape(1), T = x.shape(2), D = x.shape(3);
      int64_t R = int64_t(offsets.size());
      std::vector<float> cs(R * T * half), sn(R * T * half);
      for (int64_t r = 0; r < R; r++) {
        for (int64_t t = 0; t < T; t++) {
          float pos = (float(t) + float(offsets[r])) * scale;
          for (int i = 0; i < half; i++) {
            float th = pos * inv[i];
            cs[(r * T + t) * half + i] = std::cos(th);
            sn[(r * T + t) * half + i] = std::sin(th);
          }
        }
      }
      const float* xs = x.data<float>();
      auto st = x.strides();
      float* o = out.data<float>();
      parallel_range(B * H, std::max<int64_t>(1, 8192 / std::max<int64_t>(T * D, 1)), [&](int64_t p0, int64_t p1) {
        std::vector<float> row(D);
        for (int64_t p = p0; p < p1; p++) {
          int64_t b = p / H, h = p % H;
          for (int64_t t = 0; t < T; t++) {
            const float* xr = xs + b * st[0] + h * st[1] + t * st[2];
            for (int64_t i = 0; i < D; i++) row[i] = xr[i * st[3]];
            float* orow = o + ((b * H + h) * T + t) * D;
            int64_t at = ((R == 1 ? 0 : b) * T + t) * half;
            const float* c = cs.data() + at;
            const float* s = sn.data() + at;
            for (int i = 0; i < half; i++) {
              int i1 = trad ? 2 * i : i;
              int i2 = trad ? 2 * i + 1 : i + half;
              float x1 = row[i1], x2 = row[i2];
              orow[i1] = x1 * c[i] - x2 * s[i];
              orow[i2] = x1 * s[i] + x2 * c[i];
            }
            for (int64_t i = dims; i < D; i++) orow[i] = row[i];
          }
        }
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("lmspec rope runs on the CPU only");
  }
  const char* name() const override {
    return "LmspecRope";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Rope&>(other);
    return dims_ == o.dims_ && traditional_ == o.traditional_ && base_ == o.base_ &&
        scale_ == o.scale_ && offsets_ == o.offsets_ && has_freqs_ == o.has_freqs_;
  }

 private:
  int dims_;
  bool traditional_;
  float base_, scale_;
  std::vector<int> offsets_;
  bool has_freqs_;
};

// exp(x) for 16 floats: x = n ln2 + r (|r| <= ln2 / 2, ln2 in two parts),
// exp(r) by its degree-7 Taylor polynomial, times 2^n; within 2 ulp of
// std::exp for the arguments softmax gives it (<= 0), 0 below -87.3.
LMSPEC_AVX512 static inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f), hi = _mm512_set1_ps(88.37626f);
  x = _mm512_max_ps(_mm512_min_ps(x, hi), lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512 y = _mm512_scalef_ps(p, n);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LE_OQ), y, _mm512_setzero_ps());
}

// p[j] = exp(p[j] - max) for j < n; returns their sum (in 16 lanes, then
// across them).
LMSPEC_AVX512 static float exp_shifted_avx512(float* p, int64_t n, float max) {
  const __m512 m = _mm512_set1_ps(max);
  __m512 sum = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j), m));
    _mm512_storeu_ps(p + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (j < n) {
    const __mmask16 k = __mmask16((1u << (n - j)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + j), m));
    _mm512_mask_storeu_ps(p + j, k, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
  }
  return _mm512_reduce_add_ps(sum);
}

// A float32 array's rows of its last axis, `stride` values apart.
struct RowsView {
  const float* p;
  int64_t rows, width, stride;
};

// The array as rows of its last axis, when its other axes collapse to one
// stride and the last is contiguous.
static std::optional<RowsView> rows_view(const mx::array& a) {
  const int nd = a.ndim();
  if (nd == 0 || a.strides()[nd - 1] != 1) return std::nullopt;
  const int64_t width = a.shape(-1);
  int64_t rows = 1, stride = width;
  for (int i = nd - 2; i >= 0; i--) {
    if (a.shape(i) == 1) continue;
    if (rows == 1) {
      stride = a.strides()[i];
    } else if (int64_t(a.strides()[i]) != stride * rows) {
      return std::nullopt;
    }
    rows *= a.shape(i);
  }
  return RowsView{a.data<float>(), rows, width, stride};
}

// silu(gate) * up = gate * sigmoid(gate) * up over rows that may be
// strided views (the halves of a fused gate/up projection), with the vector
// exp above: mlx-lm's compiled `swiglu`. (A tanh GELU computed this way,
// as g * sigmoid(2u), moved a sensitive golden model past its tolerance:
// with float32 activations GELUs stay with MLX.)
LMSPEC_AVX512 static void swiglu_row_avx512(const float* g, const float* u, float* y, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 gv = _mm512_maskz_loadu_ps(k, g + i);
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
    _mm512_mask_storeu_ps(y + i, k, _mm512_mul_ps(_mm512_mul_ps(gv, sig), _mm512_maskz_loadu_ps(k, u + i)));
  }
}

// llama.cpp's GELU (GGML_GELU_FP16, its default): the tanh approximation
// of x rounded to float16, looked up in a table of float16 results; 0 at
// x <= -10, x itself at x >= 10.
static const float* gelu_f16_table() {
  static const std::vector<float> t = [] {
    std::vector<float> v(65536);
    for (uint32_t h = 0; h < 65536; h++) {
      const float x = half_to_float(uint16_t(h));
      const float g = 0.5f * x * (1.0f + std::tanh(0.79788456080286535587989211986876f * x * (1.0f + 0.044715f * x * x)));
      v[h] = round_half(g);
    }
    return v;
  }();
  return t.data();
}

static inline float gelu_f16_at(const float* table, float x) {
  if (x <= -10.0f) return 0.0f;
  if (x >= 10.0f) return x;
  return table[float_to_half(x)];
}

// The same, 16 values at a time: float16 conversion and a gather.
LMSPEC_AVX512 static void geglu_f16_row_avx512(const float* table, const float* g, const float* u, float* y, int64_t n) {
  const __m512 lo = _mm512_set1_ps(-10.0f), hi = _mm512_set1_ps(10.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(k, g + i);
    const __m512i h = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, h, table, 4);
    v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(x, hi, _CMP_GE_OQ), x);
    v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(x, lo, _CMP_LE_OQ), _mm512_setzero_ps());
    _mm512_mask_storeu_ps(y + i, k, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, u + i)));
  }
}

// MLX's tanh GELU of x (mlx-rs's formula, as its compiled CPU graph
// evaluates it: one float32 operation at a time, libm's `powf` and `tanhf`):
// 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
static inline float gelu_tanh_mlx(float x) {
  static const float c = std::sqrt(2.0f / float(M_PI));
  const float cube = 0.044715f * std::pow(x, 3.0f);
  const float t = std::tanh(c * (x + cube));
  return (0.5f * x) * (1.0f + t);
}

// The same function as x sigmoid(2 y) for y = sqrt(2 / pi) (x + 0.044715
// x^3) ((1 + tanh y) / 2 = sigmoid(2 y)), 16 values at a time with `exp16`:
// within 1e-5 of the exact function, relatively (the rounding of y to
// float32 moves exp(-2 y) where y is large; MLX's formula loses more where
// 1 + tanh y cancels, at x below about -3).
LMSPEC_AVX512 static void geglu_sigmoid_row_avx512(const float* g, const float* u, float* y, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f), c = _mm512_set1_ps(-2.f * 0.7978845608028654f);
  const __m512 k3 = _mm512_set1_ps(0.044715f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(k, g + i);
    const __m512 inner = _mm512_fmadd_ps(_mm512_mul_ps(k3, _mm512_mul_ps(x, x)), x, x);
    const __m512 gelu = _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_mul_ps(c, inner))));
    _mm512_mask_storeu_ps(y + i, k, _mm512_mul_ps(gelu, _mm512_maskz_loadu_ps(k, u + i)));
  }
}

static inline float gelu_sigmoid(float x) {
  const float inner = x + 0.044715f * x * x * x;
  return x / (1.f + std::exp(-2.f * 0.7978845608028654f * inner));
}

// The gate's activation of a `Glu`.
enum class GluKind : int { Silu = 0, GeluF16 = 1, GeluTanh = 2, GeluSigmoid = 3 };

// `act(gate) * up` row by row: SiLU, llama.cpp's float16-table GELU,
// MLX's tanh GELU, or the same function in its sigmoid form.
class Glu : public mx::UnaryPrimitive {
 public:
  Glu(mx::Stream s, GluKind kind) : UnaryPrimitive(s), kind_(kind) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    alloc_out(out);
    run_on_stream(stream(), in, out, [g = mx::array::unsafe_weak_copy(in[0]),
                  u = mx::array::unsafe_weak_copy(in[1]),
                  out = mx::array::unsafe_weak_copy(out), kind = kind_]() mutable {
      std::vector<float> gc, uc;
      auto gv = rows_view(g), uv = rows_view(u);
      if (!gv) {
        gc = dense_f32(g);
        gv = RowsView{gc.data(), int64_t(g.size()) / g.shape(-1), g.shape(-1), g.shape(-1)};
      }
      if (!uv) {
        uc = dense_f32(u);
        uv = RowsView{uc.data(), int64_t(u.size()) / u.shape(-1), u.shape(-1), u.shape(-1)};
      }
      float* y = out.data<float>();
      const int64_t width = gv->width;
      const bool wide = level() == AVX512;
      const float* table = kind == GluKind::GeluF16 ? gelu_f16_table() : nullptr;
      parallel_range(gv->rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) {
          const float* gr = gv->p + r * gv->stride;
          const float* ur = uv->p + r * uv->stride;
          float* yr = y + r * width;
          if (kind == GluKind::GeluTanh) {
            for (int64_t i = 0; i < width; i++) yr[i] = gelu_tanh_mlx(gr[i]) * ur[i];
          } else if (kind == GluKind::GeluSigmoid && wide) {
            geglu_sigmoid_row_avx512(gr, ur, yr, width);
          } else if (kind == GluKind::GeluSigmoid) {
            for (int64_t i = 0; i < width; i++) yr[i] = gelu_sigmoid(gr[i]) * ur[i];
          } else if (table != nullptr && wide) {
            geglu_f16_row_avx512(table, gr, ur, yr, width);
          } else if (table != nullptr) {
            for (int64_t i = 0; i < width; i++) yr[i] = gelu_f16_at(table, gr[i]) * ur[i];
          } else if (wide) {
            swiglu_row_avx512(gr, ur, yr, width);
          } else {
            for (int64_t i = 0; i < width; i++) yr[i] = gr[i] * (1.f / (1.f + std::exp(-gr[i]))) * ur[i];
          }
        }
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("lmspec glu runs on the CPU only");
  }
  const char* name() const override {
    switch (kind_) {
      case GluKind::GeluF16: return "LmspecGegluF16";
      case GluKind::GeluTanh: return "LmspecGegluTanh";
      case GluKind::GeluSigmoid: return "LmspecGegluSigmoid";
      default: return "LmspecSwiglu";
    }
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return static_cast<const Glu&>(other).kind_ == kind_;
  }

 private:
  GluKind kind_;
};

// Query rows an attention work item takes at once (grouped heads).
static constexpr int64_t kAttnRows = 8;

// p[r * ldp + j] = q_r . k_j for the NQ rows r of q ([NQ, D], D a multiple
// of 16) and keys j < n (row stride ks): each key row is read once for all
// query rows, each row's sum in `dot_avx512`'s order. (The row count is a
// constant so that the running sums stay in registers.)
template <int NQ>
LMSPEC_AVX512 static void scores_rows_avx512(
    const float* q, int64_t D, const float* k, int64_t ks, int64_t n, float* p, int64_t ldp) {
  for (int64_t j = 0; j < n; j++) {
    const float* kr = k + j * ks;
    __m512 acc[NQ];
#pragma GCC unroll 8
    for (int r = 0; r < NQ; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) {
      const __m512 kv = _mm512_loadu_ps(kr + i);
#pragma GCC unroll 8
      for (int r = 0; r < NQ; r++) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(q + r * D + i), kv, acc[r]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < NQ; r++) p[r * ldp + j] = _mm512_reduce_add_ps(acc[r]);
  }
}

// `scores_rows_avx512` for nq <= kAttnRows rows.
static void scores_avx512(
    const float* q, int nq, int64_t D, const float* k, int64_t ks, int64_t n, float* p, int64_t ldp) {
  using Kernel = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);
  static constexpr Kernel by_rows[kAttnRows] = {scores_rows_avx512<1>, scores_rows_avx512<2>, scores_rows_avx512<3>,
                                                scores_rows_avx512<4>, scores_rows_avx512<5>, scores_rows_avx512<6>,
                                                scores_rows_avx512<7>, scores_rows_avx512<8>};
  by_rows[nq - 1](q, D, k, ks, n, p, ldp);
}

// out[c0 + c] = sum_j (p[j] / sum) v_j[c0 + c] for the NT * 16 columns from
// c0 over value rows j < n (row stride vs), the running sums in registers.
template <int NT>
LMSPEC_AVX512 static void weighted_tiles_avx512(
    const float* p, float sum, int64_t n, const float* v, int64_t vs, int64_t c0, float* out) {
  __m512 acc[NT];
#pragma GCC unroll 16
  for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j++) {
    const __m512 pj = _mm512_set1_ps(p[j] / sum);
    const float* vr = v + j * vs + c0;
#pragma GCC unroll 16
    for (int t = 0; t < NT; t++) acc[t] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vr + 16 * t), acc[t]);
  }
#pragma GCC unroll 16
  for (int t = 0; t < NT; t++) _mm512_storeu_ps(out + c0 + 16 * t, acc[t]);
}

// out = sum_j (p[j] / sum) v_j over value rows j < n (row stride vs; Dv a
// multiple of 16), 256 columns at a time; each element's sum in
// `axpy_avx512`'s order.
static void weighted_rows_avx512(
    const float* p, float sum, int64_t n, const float* v, int64_t vs, int64_t Dv, float* out) {
  int64_t c = 0;
  for (; c + 256 <= Dv; c += 256) weighted_tiles_avx512<16>(p, sum, n, v, vs, c, out);
  for (; c + 64 <= Dv; c += 64) weighted_tiles_avx512<4>(p, sum, n, v, vs, c, out);
  for (; c < Dv; c += 16) weighted_tiles_avx512<1>(p, sum, n, v, vs, c, out);
}

// out_h[c] = sum_j w_h[j] v_j[c] for NH weight rows w_h (row stride ldw)
// over value rows j < n (row stride vs), for the NT * 16 columns from c0:
// each value row's columns are read once for all the rows, each element's
// sum in `weighted_rows_avx512`'s order.
template <int NH, int NT>
LMSPEC_AVX512 static void weighted_heads_avx512(
    const float* w, int64_t ldw, int64_t n, const float* v, int64_t vs, int64_t c0, float* const* out) {
  __m512 acc[NH][NT];
#pragma GCC unroll 16
  for (int h = 0; h < NH; h++) {
#pragma GCC unroll 16
    for (int t = 0; t < NT; t++) acc[h][t] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < n; j++) {
    const float* vr = v + j * vs + c0;
#pragma GCC unroll 16
    for (int h = 0; h < NH; h++) {
      const __m512 pj = _mm512_set1_ps(w[h * ldw + j]);
#pragma GCC unroll 16
      for (int t = 0; t < NT; t++) acc[h][t] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vr + 16 * t), acc[h][t]);
    }
  }
#pragma GCC unroll 16
  for (int h = 0; h < NH; h++) {
#pragma GCC unroll 16
    for (int t = 0; t < NT; t++) _mm512_storeu_ps(out[h] + c0 + 16 * t, acc[h][t]);
  }
}

// The columns c0 <= c < c1 (a multiple of 16 apart) of nh <= 4 rows of
// `weighted_heads_avx512`, 64 at a time.
static void weighted_heads(
    const float* w, int64_t ldw, int nh, int64_t n, const float* v, int64_t vs, int64_t c0, int64_t c1,
    float* const* out) {
  using Kernel = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float* const*);
  static constexpr Kernel four[4] = {weighted_heads_avx512<1, 4>, weighted_heads_avx512<2, 4>,
                                     weighted_heads_avx512<3, 4>, weighted_heads_avx512<4, 4>};
  static constexpr Kernel one[4] = {weighted_heads_avx512<1, 1>, weighted_heads_avx512<2, 1>,
                                    weighted_heads_avx512<3, 1>, weighted_heads_avx512<4, 1>};
  int64_t c = c0;
  for (; c + 64 <= c1; c += 64) four[nh - 1](w, ldw, n, v, vs, c, out);
  for (; c < c1; c += 16) one[nh - 1](w, ldw, n, v, vs, c, out);
}

// softmax(scale * q k^T (causal: query i sees keys <= i + Tk - Tq)) v, with
// grouped-query heads; q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D(v)].
class Attention : public mx::UnaryPrimitive {
  // The keys query position t of a row sees, from its first key `first`
  // on: up to t + shift where causal (shift = Tk - Tq), else all Tk.
  static int64_t keys_seen(bool causal, int64_t t, int64_t shift, int64_t Tk, int64_t first) {
    return std::max<int64_t>(0, (causal ? std::min(Tk, t + shift + 1) : Tk) - first);
  }

 public:
  // firsts: the first key each row of the batch sees (the keys before it
  // are padding), or empty: every row sees every key.
  Attention(mx::Stream s, float scale, bool causal, std::vector<int> firsts)
      : UnaryPrimitive(s), scale_(scale), causal_(causal), firsts_(std::move(firsts)) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    alloc_out(out);
    run_on_stream(stream(), in, out, [q = mx::array::unsafe_weak_copy(in[0]),
                  k = mx::array::unsafe_weak_copy(in[1]),
                  v = mx::array::unsafe_weak_copy(in[2]),
                  out = mx::array::unsafe_weak_copy(out),
                  scale = scale_,
                  causal = causal_,
                  firsts = firsts_]() mutable {
      int64_t B = q.shape(0), Hq = q.shape(1), Tq = q.shape(2), D = q.shape(3);
      int64_t Hkv = k.shape(1), Tk = k.shape(2), Dv = v.shape(3);
      int64_t rep = Hq / Hkv;
      const float* qs = q.data<float>();
      const float* ks = k.data<float>();
      const float* vs = v.data<float>();
      auto sq = q.strides();
      auto sk = k.strides();
      auto sv = v.strides();
      float* o = out.data<float>();
      int64_t shift = Tk - Tq;
      // One work item: `per` query heads sharing a key/value head, at one
      // position (one causal limit): each key and value row is read once
      // for all of them (without AVX-512: one query head per item). Too few
      // items for the threads (a decode step with few key/value heads):
      // `split_keys`. Every query row's sums run in the same order as one
      // row alone (`dot`, `axpy`), so a prompt and its decode steps agree
      // bit for bit; a padded row's sums start at its first key, so it
      // agrees with the row alone as well.
      std::vector<int64_t> first(B, 0);
      for (int64_t b = 0; b < int64_t(firsts.size()) && b < B; b++)
        first[b] = std::clamp<int64_t>(firsts[b], 0, Tk);
      const bool wide = level() == AVX512;
      const bool tiled = wide && sk[3] == 1 && sv[3] == 1 && D % 16 == 0 && Dv % 16 == 0 && rep <= kAttnRows;
      if (tiled && B * Hkv * Tq < 2 * pool().size() && pool().size() > 1) {
        split_keys(qs, sq, ks, sk, vs, sv, o, B, Hq, Hkv, Tq, Tk, D, Dv, scale, causal, first);
        return;
      }
      const int64_t per = tiled ? rep : 1;
      const int64_t parts = rep / per;
      int64_t work = B * Hkv * parts * Tq;
      parallel_range(work, std::max<int64_t>(1, 4096 / std::max<int64_t>(Tk * D * per, 1)), [&](int64_t w0, int64_t w1) {
        std::vector<float> qrows(per * D), p(per * Tk), acc(Dv);
        for (int64_t w = w0; w < w1; w++) {
          int64_t b = w / (Hkv * parts * Tq), g = (w / Tq) % (Hkv * parts), t = w % Tq;
          int64_t hk = g / parts, h0 = hk * rep + (g % parts) * per;
          const int64_t j0 = first[b];
          const int64_t n = keys_seen(causal, t, shift, Tk, j0);
          const float* kbase = ks + b * sk[0] + hk * sk[1] + j0 * sk[2];
          const float* vbase = vs + b * sv[0] + hk * sv[1] + j0 * sv[2];
          for (int64_t r = 0; r < per; r++) {
            const float* qr = qs + b * sq[0] + (h0 + r) * sq[1] + t * sq[2];
            for (int64_t i = 0; i < D; i++) qrows[r * D + i] = scale * qr[i * sq[3]];
          }
          if (tiled) {
            scores_avx512(qrows.data(), int(per), D, kbase, sk[2], n, p.data(), Tk);
          } else {
            for (int64_t r = 0; r < per; r++) {
              for (int64_t j = 0; j < n; j++) {
                const float* kr = kbase + j * sk[2];
                float d = 0;
                if (sk[3] == 1) {
                  d = dot(qrows.data() + r * D, kr, D);
                } else {
                  for (int64_t i = 0; i < D; i++) d += qrows[r * D + i] * kr[i * sk[3]];
                }
                p[r * Tk + j] = d;
              }
            }
          }
          for (int64_t r = 0; r < per; r++) {
            float* pr = p.data() + r * Tk;
            float mx_ = -INFINITY;
            for (int64_t j = 0; j < n; j++) mx_ = std::max(mx_, pr[j]);
            float sum = 0;
            if (wide) {
              sum = exp_shifted_avx512(pr, n, mx_);
            } else {
              for (int64_t j = 0; j < n; j++) {
                pr[j] = std::exp(pr[j] - mx_);
                sum += pr[j];
              }
            }
            float* orow = o + ((b * Hq + h0 + r) * Tq + t) * Dv;
            if (tiled) {
              weighted_rows_avx512(pr, sum, n, vbase, sv[2], Dv, orow);
              continue;
            }
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t j = 0; j < n; j++) {
              float pj = pr[j] / sum;
              const float* vr = vbase + j * sv[2];
              if (sv[3] == 1) {
                axpy(pj, vr, acc.data(), Dv);
              } else {
                for (int64_t i = 0; i < Dv; i++) acc[i] += pj * vr[i * sv[3]];
              }
            }
            for (int64_t i = 0; i < Dv; i++) orow[i] = acc[i];
          }
        }
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("lmspec attention runs on the CPU only");
  }

  // Few (head, position) items, as in a decode step with few key/value
  // heads: the threads share each item's keys (scores of all its query
  // heads at once) and then its value columns, so that every key and value
  // row is read once, not once per query head. Every sum runs in the order
  // of the per-item path above (a prompt and its decode steps still agree
  // bit for bit).
  static void split_keys(const float* qs, const mx::Strides& sq, const float* ks, const mx::Strides& sk,
                         const float* vs, const mx::Strides& sv, float* o, int64_t B, int64_t Hq, int64_t Hkv,
                         int64_t Tq, int64_t Tk, int64_t D, int64_t Dv, float scale, bool causal,
                         const std::vector<int64_t>& first) {
    const int64_t rep = Hq / Hkv, items = B * Hkv * Tq, shift = Tk - Tq;
    // Scores and weights of an item sit from its first key on (index 0 of
    // its rows of p), as the per-item path places them.
    std::vector<float> q(items * rep * D), p(items * rep * Tk);
    std::vector<int64_t> count(items);
    auto base = [&](int64_t it, const float* x, const mx::Strides& st) {
      const int64_t b = it / (Hkv * Tq);
      return x + b * st[0] + ((it / Tq) % Hkv) * st[1] + first[b] * st[2];
    };
    for (int64_t it = 0; it < items; it++) {
      const int64_t b = it / (Hkv * Tq), hk = (it / Tq) % Hkv, t = it % Tq;
      count[it] = keys_seen(causal, t, shift, Tk, first[b]);
      for (int64_t r = 0; r < rep; r++) {
        const float* qr = qs + b * sq[0] + (hk * rep + r) * sq[1] + t * sq[2];
        for (int64_t i = 0; i < D; i++) q[(it * rep + r) * D + i] = scale * qr[i * sq[3]];
      }
    }
    constexpr int64_t kKeys = 64;
    const int64_t parts = (Tk + kKeys - 1) / kKeys;
    parallel_range(items * parts, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; w++) {
        const int64_t it = w / parts, j0 = (w % parts) * kKeys, j1 = std::min(count[it], j0 + kKeys);
        if (j0 >= j1) continue;
        scores_avx512(q.data() + it * rep * D, int(rep), D, base(it, ks, sk) + j0 * sk[2], sk[2], j1 - j0,
                      p.data() + it * rep * Tk + j0, Tk);
      }
    });
    // Softmax weights, each row as the per-item path forms them.
    for (int64_t row = 0; row < items * rep; row++) {
      float* pr = p.data() + row * Tk;
      const int64_t n = count[row / rep];
      float mx_ = -INFINITY;
      for (int64_t j = 0; j < n; j++) mx_ = std::max(mx_, pr[j]);
      const float sum = exp_shifted_avx512(pr, n, mx_);
      for (int64_t j = 0; j < n; j++) pr[j] = pr[j] / sum;
    }
    constexpr int64_t kCols = 64;
    const int64_t cparts = (Dv + kCols - 1) / kCols;
    parallel_range(items * cparts, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; w++) {
        const int64_t it = w / cparts, c0 = (w % cparts) * kCols, c1 = std::min(Dv, c0 + kCols);
        const int64_t b = it / (Hkv * Tq), hk = (it / Tq) % Hkv, t = it % Tq;
        for (int64_t r0 = 0; r0 < rep; r0 += 4) {
          const int nh = int(std::min<int64_t>(4, rep - r0));
          float* outs[4];
          for (int h = 0; h < nh; h++) outs[h] = o + ((b * Hq + hk * rep + r0 + h) * Tq + t) * Dv;
          weighted_heads(p.data() + (it * rep + r0) * Tk, Tk, nh, count[it], base(it, vs, sv), sv[2], c0, c1, outs);
        }
      }
    });
  }
  const char* name() const override {
    return "LmspecAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Attention&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_ && firsts_ == o.firsts_;
  }

 private:
  float scale_;
  bool causal_;
  std::vector<int> firsts_;
};

// Weights are evaluated and contiguous already: no Contiguous node then.
static mx::array row_major(const mx::array& a, mx::Stream s) {
  if (a.is_available() && a.flags().row_contiguous) return a;
  return mx::contiguous(a, false, s);
}

static mx::Stream cpu_stream() {
  return mx::default_stream(mx::Device::cpu);
}

// ------------------------------------------------------------- file slice

// Bytes FileSlice has read, for tests and reports.
static std::atomic<uint64_t> file_bytes_read{0};

// A slice of a row-major tensor stored at `base` in a file, read without
// the rest: `outer` segments of `seg_bytes`, the i-th at
// base + i * stride + seg_offset. Read when evaluated, like MLX's Load.
class FileSlice : public mx::UnaryPrimitive {
 public:
  FileSlice(mx::Stream s, std::string path, uint64_t base, int64_t outer, int64_t stride,
            int64_t seg_offset, int64_t seg_bytes)
      : UnaryPrimitive(s),
        path_(std::move(path)),
        base_(base),
        outer_(outer),
        stride_(stride),
        seg_offset_(seg_offset),
        seg_bytes_(seg_bytes) {}
  void eval_cpu(const std::vector<mx::array>&, mx::array& out) override {
    if (int64_t(out.nbytes()) != outer_ * seg_bytes_)
      throw std::runtime_error("lmspec file slice: output size does not match the segments");
    alloc_out(out);
    // Read here, on the evaluating thread, so that a failure reaches the
    // caller of eval as an error naming the file.
    int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw std::runtime_error("cannot open " + path_);
    char* dst = out.data<char>();
    for (int64_t i = 0; i < outer_; ++i) {
      int64_t done = 0;
      off_t at = off_t(base_ + uint64_t(i * stride_ + seg_offset_));
      while (done < seg_bytes_) {
        ssize_t n = ::pread(fd, dst + i * seg_bytes_ + done, size_t(seg_bytes_ - done), at + done);
        if (n <= 0) {
          ::close(fd);
          throw std::runtime_error("cannot read " + path_ + " at byte " + std::to_string(at + done));
        }
        done += n;
      }
    }
    ::close(fd);
    file_bytes_read += uint64_t(outer_ * seg_bytes_);
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("lmspec file slice runs on the CPU only");
  }
  const char* name() const override {
    return "LmspecFileSlice";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const FileSlice&>(other);
    return path_ == o.path_ && base_ == o.base_ && outer_ == o.outer_ && stride_ == o.stride_ &&
           seg_offset_ == o.seg_offset_ && seg_bytes_ == o.seg_bytes_;
  }

 private:
  std::string path_;
  uint64_t base_;
  int64_t outer_, stride_, seg_offset_, seg_bytes_;
};

static mx::Dtype dtype_code(int code) {
  switch (code) {
    case 0: return mx::float32;
    case 1: return mx::float16;
    case 2: return mx::bfloat16;
    case 3: return mx::uint32;
    case 4: return mx::uint8;
    case 5: return mx::int8;
    default: throw std::invalid_argument("unknown dtype code");
  }
}

}  // namespace lmspec

// ------------------------------------------------------------------ C ABI

using mx::array;

static int fail(char* err, size_t len, const char* what) {
  if (err != nullptr && len > 0) {
    std::snprintf(err, len, "%s", what);
  }
  return 1;
}

template <class F>
static int guarded(void** out, char* err, size_t len, F&& f) {
  try {
    *out = new array(f());
    return 0;
  } catch (const std::exception& e) {
    return fail(err, len, e.what());
  } catch (...) {
    return fail(err, len, "unknown C++ exception");
  }
}

static const array& A(const void* p) {
  return *static_cast<const array*>(p);
}

namespace lmspec {

// Bytes that weight arenas (`lmspec_weight_arena`) hold now.
static std::atomic<int64_t> arena_bytes{0};

// One mapping that holds copies of weights; unmapped when the last copy
// that points into it goes.
struct Arena {
  void* base;
  size_t bytes;
  Arena(void* b, size_t n) : base(b), bytes(n) { arena_bytes += int64_t(n); }
  ~Arena() {
    munmap(base, bytes);
    arena_bytes -= int64_t(bytes);
  }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
};

constexpr size_t kHugePage = size_t(2) << 20;

// Whether MLX's allocator lays a buffer out as the CPU one does: a size_t
// holding the size, then the data (`Buffer::raw_ptr` is the pointer past
// it). Then a buffer can be made in memory of lmspec's own; not with
// another allocator (a GPU build), whose buffers are handles.
static bool size_then_data() {
  static const bool yes = [] {
    mx::allocator::Buffer b = mx::allocator::malloc(64);
    const bool ok = b.ptr() != nullptr &&
                    static_cast<char*>(b.raw_ptr()) == static_cast<char*>(b.ptr()) + sizeof(size_t) &&
                    mx::allocator::allocator().size(b) >= 64;
    mx::allocator::free(b);
    return ok;
  }();
  return yes;
}

// Whether the kernel may give advised memory huge pages: not where
// transparent huge pages are switched off (`[never]`), where advice would
// buy nothing for the copy.
static bool huge_pages_on() {
  static const bool on = [] {
    int fd = open("/sys/kernel/mm/transparent_hugepage/enabled", O_RDONLY);
    if (fd < 0) return true;  // madvise decides
    char buf[128] = {};
    const ssize_t got = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    return got <= 0 || std::strstr(buf, "[never]") == nullptr;
  }();
  return on;
}

// `bytes` (a multiple of kHugePage) of fresh memory starting on a 2 MB
// boundary and advised for transparent huge pages; null where the kernel
// refuses either or gives no huge pages.
static void* huge_mapping(size_t bytes) {
  if (!huge_pages_on()) return nullptr;
  void* raw = mmap(nullptr, bytes + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t at = uintptr_t(raw), start = (at + kHugePage - 1) & ~(uintptr_t(kHugePage) - 1);
  if (start > at) munmap(raw, start - at);
  const uintptr_t end = start + bytes, raw_end = at + bytes + kHugePage;
  if (raw_end > end) munmap(reinterpret_cast<void*>(end), raw_end - end);
  if (madvise(reinterpret_cast<void*>(start), bytes, MADV_HUGEPAGE) != 0) {
    munmap(reinterpret_cast<void*>(start), bytes);
    return nullptr;
  }
  return reinterpret_cast<void*>(start);
}

}  // namespace lmspec

extern "C" {

// 0 scalar, 1 AVX2, 2 AVX-512: the path the kernels take on this machine.
int lmspec_cpu_level(void) {
  return int(lmspec::level());
}

int lmspec_cpu_threads(void) {
  return lmspec::pool().size();
}

int lmspec_qmatmul(
    void** out,
    const void* x,
    const void* w,
    const void* scales,
    const void* biases,
    int group,
    int bits,
    int act,
    float bias_of_scale,
    char* err,
    size_t len) {
  return guarded(out, err, len, [&] {
    auto s = lmspec::cpu_stream();
    const array& xa = A(x);
    const array& wa = A(w);
    if (xa.dtype() != mx::float32) throw std::invalid_argument("x must be float32");
    if (wa.ndim() != 2 || wa.dtype() != mx::uint32)
      throw std::invalid_argument("w must be a 2-D uint32 array");
    int64_t k = int64_t(wa.shape(1)) * 32 / bits;
    if (xa.ndim() < 1 || xa.shape(-1) != k)
      throw std::invalid_argument("x's last axis does not match w's packed width");
    if (group <= 0 || k % group != 0) throw std::invalid_argument("group does not divide the input width");
    if (act < 0 || act > 2) throw std::invalid_argument("activations must be 0 (float), 1 (int8) or 2 (int16)");
    auto shape = xa.shape();
    shape.back() = wa.shape(0);
    std::vector<array> ins = {
        xa, lmspec::row_major(wa, s), lmspec::row_major(A(scales), s), lmspec::row_major(A(biases), s)};
    return array(shape, mx::float32, std::make_shared<lmspec::QuantMatmul>(s, group, bits, lmspec::Act(act), bias_of_scale), std::move(ins));
  });
}

// x [..., K] times wt [K, N], the transpose view of an evaluated
// row-major [N, K] float32 weight; returns 2 (and no array) where wt is not
// such a view.
int lmspec_matvec(void** out, const void* x, const void* wt, char* err, size_t len) {
  const array& wa = A(wt);
  if (wa.ndim() != 2 || wa.dtype() != mx::float32 || !wa.is_available() || !wa.flags().col_contiguous ||
      wa.strides()[0] != 1 || wa.strides()[1] != wa.shape(0))
    return 2;
  return guarded(out, err, len, [&] {
    auto s = lmspec::cpu_stream();
    const array& xa = A(x);
    if (xa.dtype() != mx::float32) throw std::invalid_argument("x must be float32");
    if (xa.ndim() < 1 || xa.shape(-1) != wa.shape(0))
      throw std::invalid_argument("x's last axis does not match the weight's input width");
    auto shape = xa.shape();
    shape.back() = wa.shape(1);
    return array(shape, mx::float32, std::make_shared<lmspec::DenseMatvec>(s), std::vector<array>{xa, wa});
  });
}

// kind: 0 SiLU, 1 llama.cpp's float16-table GELU, 2 MLX's tanh GELU, 3 its
// vector sigmoid form.
int lmspec_glu(void** out, const void* gate, const void* up, int kind, char* err, size_t len) {
  return guarded(out, err, len, [&] {
    auto s = lmspec::cpu_stream();
    const array& g = A(gate);
    const array& u = A(up);
    if (g.dtype() != mx::float32 || u.dtype() != mx::float32) throw std::invalid_argument("gate and up must be float32");
    if (g.shape() != u.shape() || g.ndim() == 0) throw std::invalid_argument("gate and up must have one shape");
    if (kind < 0 || kind > 3) throw std::invalid_argument("unknown glu kind");
    return array(g.shape(), mx::float32, std::make_shared<lmspec::Glu>(s, lmspec::GluKind(kind)),
                 std::vector<array>{g, u});
  });
}

int lmspec_dequantize(
    void** out,
    const void* w,
    const void* scales,
    const void* biases,
    int group,
    int bits,
    char* err,
    size_t len) {
  return guarded(out, err, len, [&] {
    auto s = lmspec::cpu_stream();
    const array& wa = A(w);
    if (wa.ndim() != 2 || wa.dtype() != mx::uint32)
      throw std::invalid_argument("w must be a 2-D uint32 array");
    int64_t k = int64_t(wa.shape(1)) * 32 / bits;
    if (group <= 0 || k % group != 0) throw std::invalid_argument("group does not divide the input width");
    mx::Shape shape = {wa.shape(0), int(k)};
    std::vector<array> ins = {
        lmspec::row_major(wa, s), lmspec::row_major(A(scales), s), lmspec::row_major(A(biases), s)};
    return array(shape, mx::float32, std::make_shared<lmspec::Dequantize>(s, group, bits), std::move(ins));
  });
}

int lmspec_rms_norm(void** out, const void* x, const void* w, float eps, char* err, size_t len) {
  return guarded(out, err, len, [&] {
    auto s = lmspec::cpu_stream();
    const array& xa = A(x);
    if (xa.dtype() != mx::float32) throw std::invalid_argument("x must be float32");
    std::vector<array> ins = {xa};
    if (w != nullptr) {
      if (A(w).dtype() != mx::float32 || A(w).ndim() != 1 || A(w).shape(0) != xa.shape(-1))
        throw std::invalid_argument("weight must be float32 of the last axis' size");
      ins.push_back(A(w));
    }
    return array(xa.shape(), mx::float32, std::make_shared<lmspec::RmsNorm>(s, eps, w != nullptr), std::move(ins));
  });
}

int lmspec_rope(
    void** out,
    const void* x,
    int dims,
    int traditional,
    float base,
    float scale,
    const int* offsets,
    size_t n_offsets,
    const void* freqs,
    char* err,
    size_t len) {
  return guarded(out, err, len, [&] {
    auto s = lmspec::cpu_stream();
    const array& xa = A(x);
    if (xa.dtype() != mx::float32 || xa.ndim() != 4)
      throw std::invalid_argument("x must be a 4-D float32 array");
    if (dims <= 0 || dims % 2 != 0 || dims > xa.shape(3))
      throw std::invalid_argument("dims must be even and at most the head size");
    if (n_offsets != 1 && int64_t(n_offsets) != int64_t(xa.shape(0)))
      throw std::invalid_argument("one offset, or one per row of x");
    std::vector<array> ins = {xa};
    if (freqs != nullptr) ins.push_back(mx::astype(A(freqs), mx::float32, s));
    return array(
        xa.shape(),
        mx::float32,
        std::make_shared<lmspec::Rope>(
            s,
            dims,
            traditional != 0,
            base,
            scale,
            std::vector<int>(offsets, offsets + n_offsets),
            freqs != nullptr),
        std::move(ins));
  });
}

int lmspec_attention(
    void** out,
    const void* q,
    const void* k,
    const void* v,
    float scale,
    int causal,
    const int* firsts,
    size_t n_firsts,
    char* err,
    size_t len) {
  return guarded(out, err, len, [&] {
    auto s = lmspec::cpu_stream();
    const array &qa = A(q), &ka = A(k), &va = A(v);
    if (n_firsts != 0 && int64_t(n_firsts) != int64_t(qa.shape(0)))
      throw std::invalid_argument("no first keys, or one per row of q");
    for (auto* a : {&qa, &ka, &va}) {
      if (a->dtype() != mx::float32 || a->ndim() != 4)
        throw std::invalid_argument("q, k and v must be 4-D float32 arrays");
    }
    if (ka.shape(1) == 0 || qa.shape(1) % ka.shape(1) != 0 || ka.shape(1) != va.shape(1) ||
        qa.shape(0) != ka.shape(0) || ka.shape(0) != va.shape(0) || qa.shape(3) != ka.shape(3) ||
        ka.shape(2) != va.shape(2))
      throw std::invalid_argument("q, k and v shapes do not agree");
    mx::Shape shape = {qa.shape(0), qa.shape(1), qa.shape(2), va.shape(3)};
    return array(
        shape,
        mx::float32,
        std::make_shared<lmspec::Attention>(s, scale, causal != 0, std::vector<int>(firsts, firsts + n_firsts)),
        {qa, ka, va});
  });
}

// The identity of an array (its shared description), which every copy of
// the handle shares and any op's result does not.
uintptr_t lmspec_array_id(const void* a) {
  return A(a).id();
}

uint64_t lmspec_file_bytes_read(void) {
  return lmspec::file_bytes_read.load();
}

// A lazy array of `shape` (`ndim` entries) and dtype `dtype` (0 f32, 1 f16,
// 2 bf16, 3 u32, 4 u8, 5 i8) read from `path` as FileSlice describes.
int lmspec_file_slice(
    void** out,
    const char* path,
    uint64_t base,
    int64_t outer,
    int64_t stride,
    int64_t seg_offset,
    int64_t seg_bytes,
    const int* shape,
    int ndim,
    int dtype,
    char* err,
    size_t len) {
  return guarded(out, err, len, [&] {
    if (outer < 0 || stride < 0 || seg_offset < 0 || seg_bytes < 0 || ndim < 0)
      throw std::invalid_argument("negative slice geometry");
    mx::Shape sh(shape, shape + ndim);
    auto s = lmspec::cpu_stream();
    return array(
        sh,
        lmspec::dtype_code(dtype),
        std::make_shared<lmspec::FileSlice>(s, std::string(path), base, outer, stride, seg_offset, seg_bytes),
        {});
  });
}

// Copies of the evaluated, row-contiguous arrays `ins[0..n)` (`outs[i]`
// the copy of `ins[i]`) in one mapping of their own, aligned to 2 MB and
// advised for transparent huge pages: a product that streams its weights
// then walks one page-table entry per 2 MB instead of one per 4 KB. Each
// copy starts on a 64-byte boundary. Answers 2 (no arrays) where the kernel
// gives no such memory (huge pages switched off).
int lmspec_weight_arena(void** outs, const void* const* ins, size_t n, char* err, size_t len) {
  try {
    if (!lmspec::size_then_data()) return 2;
    // Each copy: 64 bytes whose last 8 hold its size (the allocator's
    // header), then its data.
    constexpr size_t kAlign = 64;
    std::vector<size_t> at(n);
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
      const array& x = A(ins[i]);
      if (!x.is_available() || !x.flags().row_contiguous)
        throw std::invalid_argument("weight arena: an array is not evaluated and row-contiguous");
      at[i] = total + kAlign;
      total += kAlign + (x.nbytes() + kAlign - 1) / kAlign * kAlign;
    }
    if (total == 0) return 2;
    const size_t bytes = (total + lmspec::kHugePage - 1) / lmspec::kHugePage * lmspec::kHugePage;
    void* base = lmspec::huge_mapping(bytes);
    if (base == nullptr) return 2;
    auto arena = std::make_shared<lmspec::Arena>(base, bytes);
    std::vector<std::unique_ptr<array>> copies;
    for (size_t i = 0; i < n; i++) {
      const array& x = A(ins[i]);
      char* dst = static_cast<char*>(base) + at[i];
      const size_t size = x.nbytes();
      std::memcpy(dst - sizeof(size_t), &size, sizeof(size_t));
      if (size > 0) std::memcpy(dst, x.data<char>(), size);
      mx::allocator::Buffer buf(dst - sizeof(size_t));
      copies.push_back(std::make_unique<array>(buf, x.shape(), x.dtype(), [arena](mx::allocator::Buffer) {}));
    }
    for (size_t i = 0; i < n; i++) outs[i] = copies[i].release();
    return 0;
  } catch (const std::exception& e) {
    return fail(err, len, e.what());
  } catch (...) {
    return fail(err, len, "unknown C++ exception");
  }
}

// The first byte of evaluated `a`'s data (which arrays share a buffer).
const void* lmspec_data_ptr(const void* a) {
  const array& x = A(a);
  return x.is_available() ? x.data<void>() : nullptr;
}

// Bytes that weight arenas hold now.
int64_t lmspec_arena_bytes(void) {
  return lmspec::arena_bytes.load();
}

}  // extern "C"
