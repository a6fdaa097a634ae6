// Native CPU kernels of effalg's weight-only linear (``effalg::weight_only_linear``), JIT-built at first use by
// effalg/kernels/weight_only_cpu.py (torch.utils.cpp_extension; loaded as the op namespace effalg_wo_native).
// Semantics: y = x @ W.T + bias with W[n, k] = (u[n, k] - zero[n, g]) * scale[n, g], g = k / group_size, u the codes of
// effalg's canonical packing (a little-endian bit stream along K: 3-bit = 8 codes in 3 bytes, 4-bit = two per byte,
// 8-bit = bytes). AVX-512 paths (VBMI + BF16: vpermb, vpmultishiftqb, vdpbf16ps) are compiled with target attributes
// and chosen at run time; portable loops cover other CPUs, group sizes and 8-bit codes.
//
// * gemv (decode and small M, canonical layout): 32 codes at a time become bf16 words holding O + u (O = 8 for 3-bit,
//   16 for 4-bit: the code lands in the mantissa; one vpermb, one vpmultishiftqb, one ternary-logic op), multiplied
//   exactly with the activations (split into 1 (bf16), 2 (fp16) or 3 (fp32) bf16 terms whose sum is exactly x) by
//   vdpbf16ps with fp32 accumulation in register tiles of rows x tokens; per group the partial sums are scaled, and
//   the zero point enters once per output: y = sum_g scale (sum_k (O + u) x - (O + zero) sum_k x).
// * dequant_linear (prefill, canonical layout): each thread dequantizes tiles of up to 256 output channels into a
//   buffer it keeps across calls, through a lookup table per row and group ((u - zero) * scale in fp32, one rounding
//   to x's dtype: the values of the PyTorch fallback; fp32 tiles by FMA), then at::mm_out into the tile's columns.
// * the "blocked" runtime layout (to_blocked / from_blocked): channel blocks of 16, each k-pair's 32 codes one chunk,
//   so that an expanded chunk is a vector of 16 channels x 2 bf16 weights: blocked_linear (fused, register tiles of
//   up to 4 x 16 channels x 12 tokens, activation pairs broadcast) and blocked_dequant_linear (K-major tiles + GEMM).
// * dequant: the whole canonical weight in a float dtype.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EFFALG_X86 1
#define EFFALG_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16")))
#else
#define EFFALG_X86 0
#endif

namespace {

constexpr int64_t kChunk = 32;  // codes per vector step (one zmm of bf16 words)

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool cpu_has_avx512_vbmi_bf16() {
#if EFFALG_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Scalar helpers

inline uint32_t code_at(const uint8_t* row, int64_t row_bytes, int bits, int64_t k) {
  if (bits == 8) return row[k];
  const int64_t bit = k * bits;
  const int64_t b = bit >> 3;
  uint32_t v = row[b];
  if (b + 1 < row_bytes) v |= uint32_t(row[b + 1]) << 8;
  return (v >> (bit & 7)) & ((1u << bits) - 1);
}

// Codes u[k0, k0 + len) of one canonical row, as floats.
void decode_row(const uint8_t* row, int64_t row_bytes, int bits, int64_t k0, int64_t len, float* out) {
  int64_t k = k0;
  const int64_t end = k0 + len;
  if (bits == 8) {
    for (; k < end; ++k) out[k - k0] = float(row[k]);
    return;
  }
  const int64_t per = bits == 4 ? 2 : 8;  // codes per whole-byte group
  for (; k < end && (k % per); ++k) out[k - k0] = float(code_at(row, row_bytes, bits, k));
  if (bits == 4) {
    for (; k + 2 <= end; k += 2) {
      const uint8_t b = row[k >> 1];
      out[k - k0] = float(b & 15);
      out[k - k0 + 1] = float(b >> 4);
    }
  } else {
    for (; k + 8 <= end && (k / 8) * 3 + 3 <= row_bytes; k += 8) {
      const uint8_t* p = row + (k / 8) * 3;
      const uint32_t v = uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16);
      for (int j = 0; j < 8; ++j) out[k - k0 + j] = float((v >> (3 * j)) & 7);
    }
  }
  for (; k < end; ++k) out[k - k0] = float(code_at(row, row_bytes, bits, k));
}

template <typename T>
inline T from_f(float v) {
  return static_cast<T>(v);  // c10::BFloat16 / c10::Half: round to nearest even, like Tensor.to
}

// ---------------------------------------------------------------------------------------------------------------
// GEMV

struct Gemv {
  const uint8_t* w;
  int64_t row_bytes, N, K, G, gs;  // gs: codes per group (K for one group per channel)
  int bits;
  const float* scale;  // [N, G]
  const float* zero;   // [N, G]
  int64_t M;
  const float* xf;     // portable path: fp32 activations [M, K]
  const uint16_t* xb;  // AVX-512 path: bf16 terms [T, M, Kpad], zero padded
  int T;
  int64_t Kpad;
  const float* xsum;  // AVX-512 path: per-group sums of the terms [M, G]
  float* y;           // [M, N]
};

void gemv_rows_portable(const Gemv& a, int64_t n0, int64_t n1) {
  std::vector<float> u(a.gs);
  std::vector<float> xs(a.M * a.G);
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t g = 0; g < a.G; ++g) {
      double s = 0;
      for (int64_t k = g * a.gs; k < (g + 1) * a.gs; ++k) s += a.xf[m * a.K + k];
      xs[m * a.G + g] = float(s);
    }
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.w + n * a.row_bytes;
    for (int64_t m = 0; m < a.M; ++m) a.y[m * a.N + n] = 0.f;
    for (int64_t g = 0; g < a.G; ++g) {
      decode_row(row, a.row_bytes, a.bits, g * a.gs, a.gs, u.data());
      const float s = a.scale[n * a.G + g], z = a.zero[n * a.G + g];
      for (int64_t m = 0; m < a.M; ++m) {
        const float* x = a.xf + m * a.K + g * a.gs;
        float d = 0.f;
        for (int64_t k = 0; k < a.gs; ++k) d += u[k] * x[k];
        a.y[m * a.N + n] += s * (d - z * xs[m * a.G + g]);
      }
    }
  }
}

#if EFFALG_X86
// vpermb / vpmultishiftqb controls that turn 12 (3-bit) or 16 (4-bit) packed bytes (32 codes) into 32 words, word w
// holding code c(w) at bits [7 - bits, 7) of its low byte (the top mantissa bits of a bf16 with exponent log2(O)), or
// with raw at bits [0, bits). c(w) = w, or with deinterleave c(w) = 2 w for w < 16 and 2 (w - 16) + 1 above (even
// codes in the low 256 bits).
struct Expand {
  alignas(64) uint8_t perm[64];
  alignas(64) uint8_t shift[64];
  Expand(int bits, bool deinterleave, bool raw) {
    for (int j = 0; j < 8; ++j) {  // qword j holds words 4j .. 4j + 3
      int code[4], lo = 1 << 30;
      for (int t = 0; t < 4; ++t) {
        const int w = 4 * j + t;
        code[t] = deinterleave ? (w < 16 ? 2 * w : 2 * (w - 16) + 1) : w;
        lo = std::min(lo, code[t] * bits);
      }
      const int b = lo >> 3;  // first source byte of this qword; its codes span < 56 bits from there
      for (int i = 0; i < 8; ++i) {
        perm[8 * j + i] = uint8_t(std::min(b + i, 15));
        shift[8 * j + i] = (i % 2) ? 0 : uint8_t((code[i / 2] * bits - 8 * b - (raw ? 0 : 7 - bits)) & 63);
      }
    }
  }
};
const Expand kExpand[2][2][2] = {  // [bits == 4][deinterleave][raw]
    {{Expand(3, false, false), Expand(3, false, true)}, {Expand(3, true, false), Expand(3, true, true)}},
    {{Expand(4, false, false), Expand(4, false, true)}, {Expand(4, true, false), Expand(4, true, true)}}};

// Words of the deinterleaved raw expansion: w -> channel (w % 16) * 2^bits, the offset of its lookup-table entries.
struct ChannelOffsets {
  alignas(64) uint16_t v[2][32];
  ChannelOffsets() {
    for (int w = 0; w < 32; ++w) {
      v[0][w] = uint16_t((w % 16) << 3);
      v[1][w] = uint16_t((w % 16) << 4);
    }
  }
};
const ChannelOffsets kChannelOffsets;

template <int BITS, bool DEINT = false, bool RAW = false>
struct ExpandRegs {
  __m512i perm, shift, andm, orm;
  EFFALG_AVX512 ExpandRegs() {
    const Expand& e = kExpand[BITS == 4][DEINT][RAW];
    perm = _mm512_load_si512(e.perm);
    shift = _mm512_load_si512(e.shift);
    if (RAW) {  // code, plus (deinterleaved) the channel's lookup-table offset
      andm = _mm512_set1_epi16((1 << BITS) - 1);
      orm = DEINT ? _mm512_load_si512(kChannelOffsets.v[BITS == 4]) : _mm512_setzero_si512();
    } else {
      andm = _mm512_set1_epi16(BITS == 3 ? 0x0070 : 0x0078);
      orm = _mm512_set1_epi16(BITS == 3 ? 0x4100 : 0x4180);  // bf16 8.0 / 16.0
    }
  }
  // 32 codes from the 16 bytes at p (byte aligned, all readable) -> 32 words.
  EFFALG_AVX512 inline __m512i operator()(const uint8_t* p) const {
    return expand(_mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // Same with only rem (< 16) bytes readable.
  EFFALG_AVX512 inline __m512i operator()(const uint8_t* p, int64_t rem) const {
    const __mmask16 lm = rem >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rem) - 1);
    return expand(_mm512_castsi128_si512(_mm_maskz_loadu_epi8(lm, p)));
  }
  EFFALG_AVX512 inline __m512i expand(__m512i v) const {  // only the low 16 bytes of v are used
    v = _mm512_permutexvar_epi8(perm, v);
    v = _mm512_multishift_epi64_epi8(shift, v);
    return _mm512_ternarylogic_epi32(v, andm, orm, 0xEA);  // (v & andm) | orm
  }
};

// bf16 words O + u (16 of them) -> fp32 (u - zero) * scale as fma(O + u, scale, -(O + zero) * scale): one rounding
// of the product-sum (the exact (u - zero) * scale of the PyTorch fallback can differ in the last fp32 bit).
EFFALG_AVX512 inline __m512 deq16(__m256i words, __m512 sv, __m512 nzo) {
  return _mm512_fmadd_ps(_mm512_cvtpbh_ps((__m256bh)words), sv, nzo);
}

// NR rows from n0 times MB activation rows from m0: NR * MB independent accumulator chains.
// NR rows from n0 times MB activation rows from m0: a register tile of NR * MB accumulators (a zmm of 16 partial sums
// each, over one group). Their scaled per-group sums stay in registers for small tiles, else in a small L1 array;
// one horizontal sum per output at the end.
template <int BITS, int MB, int NR, int T>
EFFALG_AVX512 void gemv_rows_avx512(const Gemv& a, int64_t m0, int64_t n0) {
  constexpr int64_t CB = BITS * 4;  // bytes per 32 codes
  constexpr float O = BITS == 3 ? 8.f : 16.f;
  constexpr bool REG = NR * MB <= 8;
  const ExpandRegs<BITS> ex;
  const int64_t cpg = a.G == 1 ? cdiv(a.K, kChunk) : a.gs / kChunk;  // chunks per group
  const int64_t c_safe = a.row_bytes >= 16 ? (a.row_bytes - 16) / CB + 1 : 0;  // chunks with 16 readable bytes
  const int64_t xt = a.M * a.Kpad;                                            // stride between terms
  const uint8_t* row[NR];
  __m512 totr[REG ? NR : 1][REG ? MB : 1];
  alignas(64) float totm[REG ? 1 : NR][REG ? 1 : MB][16];
  for (int i = 0; i < NR; ++i) {
    row[i] = a.w + (n0 + i) * a.row_bytes;
    for (int m = 0; m < MB; ++m) {
      if constexpr (REG)
        totr[i][m] = _mm512_setzero_ps();
      else
        _mm512_store_ps(totm[i][m], _mm512_setzero_ps());
    }
  }
  for (int64_t g = 0; g < a.G; ++g) {
    __m512 acc[NR][MB];
    for (int i = 0; i < NR; ++i)
      for (int m = 0; m < MB; ++m) acc[i][m] = _mm512_setzero_ps();
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      __m512bh wv[NR];
      if ((c & 3) == 0)  // the next NR rows (short row streams defeat the hardware prefetchers)
        for (int i = 0; i < NR; ++i) _mm_prefetch((const char*)(row[i] + NR * a.row_bytes + c * CB), _MM_HINT_T0);
      if (c < c_safe) {
        for (int i = 0; i < NR; ++i) wv[i] = (__m512bh)ex(row[i] + c * CB);
      } else {
        for (int i = 0; i < NR; ++i) wv[i] = (__m512bh)ex(row[i] + c * CB, a.row_bytes - c * CB);
      }
      const uint16_t* xp = a.xb + m0 * a.Kpad + c * kChunk;
      for (int t = 0; t < T; ++t)
        for (int m = 0; m < MB; ++m) {
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + t * xt + m * a.Kpad);
          for (int i = 0; i < NR; ++i) acc[i][m] = _mm512_dpbf16_ps(acc[i][m], wv[i], xv);
        }
    }
    for (int i = 0; i < NR; ++i) {
      const __m512 sv = _mm512_set1_ps(a.scale[(n0 + i) * a.G + g]);
      for (int m = 0; m < MB; ++m) {
        if constexpr (REG)
          totr[i][m] = _mm512_fmadd_ps(acc[i][m], sv, totr[i][m]);
        else
          _mm512_store_ps(totm[i][m], _mm512_fmadd_ps(acc[i][m], sv, _mm512_load_ps(totm[i][m])));
      }
    }
  }
  // zero-point term, once per output: sum_g scale (O + zero) * sum_k x, vectorized over the groups
  for (int i = 0; i < NR; ++i) {
    const float* sr = a.scale + (n0 + i) * a.G;
    const float* zr = a.zero + (n0 + i) * a.G;
    __m512 zs[MB];
    for (int m = 0; m < MB; ++m) zs[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < a.G; g += 16) {
      const __mmask16 mk = a.G - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (a.G - g)) - 1);
      const __m512 zo = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, sr + g),
                                      _mm512_add_ps(_mm512_set1_ps(O), _mm512_maskz_loadu_ps(mk, zr + g)));
      for (int m = 0; m < MB; ++m)
        zs[m] = _mm512_fmadd_ps(zo, _mm512_maskz_loadu_ps(mk, a.xsum + (m0 + m) * a.G + g), zs[m]);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512 tv = REG ? totr[REG ? i : 0][REG ? m : 0] : _mm512_load_ps(totm[REG ? 0 : i][REG ? 0 : m]);
      a.y[(m0 + m) * a.N + n0 + i] = _mm512_reduce_add_ps(_mm512_sub_ps(tv, zs[m]));
    }
  }
}

template <int BITS, int MB, int T>
void gemv_block_t(const Gemv& a, int64_t m0, int64_t r0, int64_t r1) {
  // 8 independent accumulator chains at M = 1 (vdpbf16ps latency); scaled sums in registers (REG) up to 8, else L1
  constexpr int NR = MB == 1 ? 8 : (MB == 2 ? 4 : 2);
  int64_t n = r0;
  for (; n + NR <= r1; n += NR) gemv_rows_avx512<BITS, MB, NR, T>(a, m0, n);
  for (; n < r1; ++n) gemv_rows_avx512<BITS, MB, 1, T>(a, m0, n);
}

template <int BITS, int MB>
void gemv_block(const Gemv& a, int64_t m0, int64_t r0, int64_t r1) {
  if (a.T == 1)
    gemv_block_t<BITS, MB, 1>(a, m0, r0, r1);
  else if (a.T == 2)
    gemv_block_t<BITS, MB, 2>(a, m0, r0, r1);
  else
    gemv_block_t<BITS, MB, 3>(a, m0, r0, r1);
}

constexpr int64_t kMaxMB = 12;      // activation rows per register tile of the blocked kernel
constexpr int64_t kMaxMBGemv = 8;   // and of the canonical GEMV

template <int BITS>
void gemv_avx512_dispatch(const Gemv& a, int64_t n0, int64_t n1) {
  constexpr int64_t RB = 16;                                           // rows whose bytes stay in L1 across M blocks
  const int64_t nmb = cdiv(a.M, kMaxMBGemv), mbs = cdiv(a.M, nmb);  // balanced activation blocks
  for (int64_t r0 = n0; r0 < n1; r0 += RB) {
    const int64_t r1 = std::min(n1, r0 + RB);
    for (int64_t m0 = 0; m0 < a.M; m0 += mbs) {
      switch (std::min(mbs, a.M - m0)) {
        case 1: gemv_block<BITS, 1>(a, m0, r0, r1); break;
        case 2: gemv_block<BITS, 2>(a, m0, r0, r1); break;
        case 3: gemv_block<BITS, 3>(a, m0, r0, r1); break;
        case 4: gemv_block<BITS, 4>(a, m0, r0, r1); break;
        case 5: gemv_block<BITS, 5>(a, m0, r0, r1); break;
        case 6: gemv_block<BITS, 6>(a, m0, r0, r1); break;
        case 7: gemv_block<BITS, 7>(a, m0, r0, r1); break;
        default: gemv_block<BITS, 8>(a, m0, r0, r1); break;
      }
    }
  }
}
#endif  // EFFALG_X86

void check_common(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                  int64_t bits) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "effalg weight_only native: x must be a contiguous [M, K] tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf || x.scalar_type() == at::kFloat,
              "effalg weight_only native: x must be bf16, fp16 or fp32");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), "w must be contiguous uint8 [N, *]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && zero.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  zero.is_contiguous() && scale.sizes() == zero.sizes() && scale.dim() == 2,
              "scale and zero must be contiguous fp32 [N, G]");
  TORCH_CHECK(bits == 3 || bits == 4 || bits == 8, "bits must be 3, 4 or 8");
}

template <typename T>
void finish_rows(const float* y, const float* bias, int64_t M, int64_t N, T* out) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) out[m * N + n] = from_f<T>(y[m * N + n] + (bias ? bias[n] : 0.f));
}

// Whether the AVX-512 GEMV handles this problem on this CPU.
bool gemv_fast_ok(int64_t bits, int64_t K, int64_t G) {
  if (!(bits == 3 || bits == 4) || !cpu_has_avx512_vbmi_bf16()) return false;
  return G == 1 || (K / G) % kChunk == 0;
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                const c10::optional<at::Tensor>& bias, int64_t bits, bool portable) {
  check_common(x, w, scale, zero, bits);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = scale.size(1);
  TORCH_CHECK(scale.size(0) == N && K % G == 0, "scale must be [N, G] with G dividing K");
  TORCH_CHECK(w.size(1) == (K * bits + 7) / 8, "w must be [N, ceil(K * bits / 8)]");
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    b32 = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b32.numel() == N, "bias must have N elements");
  }
  Gemv a{};
  a.w = w.data_ptr<uint8_t>();
  a.row_bytes = w.size(1);
  a.N = N;
  a.K = K;
  a.G = G;
  a.gs = K / G;
  a.bits = int(bits);
  a.scale = scale.data_ptr<float>();
  a.zero = zero.data_ptr<float>();
  a.M = M;
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  a.y = y.data_ptr<float>();
  at::Tensor xf, xb, xsum;
  bool fast = !portable && gemv_fast_ok(bits, K, G);
#if EFFALG_X86
  if (fast) {
    // bf16 terms whose sum is x exactly: 1 for bf16, 2 for fp16 (11 bits), 3 for fp32 (24 bits).
    const int T = x.scalar_type() == at::kBFloat16 ? 1 : (x.scalar_type() == at::kHalf ? 2 : 3);
    const int64_t Kpad = cdiv(K, kChunk) * kChunk;
    xb = at::zeros({T, M, Kpad}, x.options().dtype(at::kBFloat16));
    xsum = at::empty({M, G}, x.options().dtype(at::kFloat));
    const at::Tensor x32 = x.to(at::kFloat);
    const float* xp = x32.data_ptr<float>();
    c10::BFloat16* bp = xb.data_ptr<c10::BFloat16>();
    float* sp = xsum.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t g = 0; g < G; ++g) {
        double s = 0;
        for (int64_t k = g * a.gs; k < (g + 1) * a.gs; ++k) {
          float r = xp[m * K + k];
          for (int t = 0; t < T; ++t) {
            const c10::BFloat16 h(r);
            bp[(t * M + m) * Kpad + k] = h;
            s += double(float(h));
            r -= float(h);
          }
        }
        sp[m * G + g] = float(s);
      }
    }
    a.xb = reinterpret_cast<const uint16_t*>(bp);
    a.T = T;
    a.Kpad = Kpad;
    a.xsum = sp;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      if (bits == 3)
        gemv_avx512_dispatch<3>(a, n0, n1);
      else
        gemv_avx512_dispatch<4>(a, n0, n1);
    });
  }
#else
  fast = false;
#endif
  if (!fast) {
    xf = x.to(at::kFloat).contiguous();
    a.xf = xf.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { gemv_rows_portable(a, n0, n1); });
  }
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat) {
    if (bp) y.add_(b32);
    return y;
  }
  at::Tensor out = at::empty({M, N}, x.options());
  if (x.scalar_type() == at::kBFloat16)
    finish_rows(a.y, bp, M, N, out.data_ptr<c10::BFloat16>());
  else
    finish_rows(a.y, bp, M, N, out.data_ptr<c10::Half>());
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Dequantization

struct Deq {
  const uint8_t* w;
  int64_t row_bytes, N, K, G, gs;
  int bits;
  const float* scale;
  const float* zero;
};

// Canonical rows [n0, n1) -> out[(n - n0) * ld + k] (fp32 math (u - z) * s, one rounding to T).
template <typename T>
void dequant_rows_portable(const Deq& d, int64_t n0, int64_t n1, T* out, int64_t ld) {
  std::vector<float> u(d.K);
  for (int64_t n = n0; n < n1; ++n) {
    decode_row(d.w + n * d.row_bytes, d.row_bytes, d.bits, 0, d.K, u.data());
    T* o = out + (n - n0) * ld;
    for (int64_t k = 0; k < d.K; ++k) {
      const int64_t g = k / d.gs;
      o[k] = from_f<T>((u[k] - d.zero[n * d.G + g]) * d.scale[n * d.G + g]);
    }
  }
}

#if EFFALG_X86
template <typename T>
EFFALG_AVX512 inline void store16(T* p, __m512 v, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, m, v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
  } else {
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

template <int BITS, typename T>
EFFALG_AVX512 void dequant_rows_avx512(const Deq& d, int64_t n0, int64_t n1, T* out, int64_t ld) {
  constexpr int64_t CB = BITS * 4;
  constexpr float O = BITS == 3 ? 8.f : 16.f;
  const ExpandRegs<BITS> ex;
  const int64_t cpg = d.G == 1 ? cdiv(d.K, kChunk) : d.gs / kChunk;
  const int64_t c_safe = d.row_bytes >= 16 ? (d.row_bytes - 16) / CB + 1 : 0;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = d.w + n * d.row_bytes;
    T* o = out + (n - n0) * ld;
    for (int64_t g = 0; g < d.G; ++g) {
      const float s = d.scale[n * d.G + g];
      const __m512 sv = _mm512_set1_ps(s), nzo = _mm512_set1_ps(-(O + d.zero[n * d.G + g]) * s);
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        const __m512i v = c < c_safe ? ex(row + c * CB) : ex(row + c * CB, d.row_bytes - c * CB);
        const int64_t k0 = c * kChunk;
        for (int h = 0; h < 2; ++h) {
          const __m512 wv = deq16(h ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v), sv, nzo);
          const int64_t left = d.K - k0 - 16 * h;
          if (left >= 16) {
            store16<T>(o + k0 + 16 * h, wv, __mmask16(0xFFFF));
          } else if (left > 0) {
            store16<T>(o + k0 + 16 * h, wv, __mmask16((1u << left) - 1));
          }
        }
      }
    }
  }
}
// 16 floats -> 16 bf16 / fp16 words, round to nearest even (as Tensor.to).
template <typename T>
EFFALG_AVX512 inline __m256i cvt16(__m512 v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return (__m256i)_mm512_cvtneps_pbh(v);
  } else {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
}

// bf16 / fp16 rows through a lookup table per (row, group): its 2^bits values (u - zero) * scale are computed in fp32
// and rounded once (the PyTorch fallback's values, bit for bit), then each 32 codes are one vpermw.
template <int BITS, typename T>
EFFALG_AVX512 void dequant_rows_lut(const Deq& d, int64_t n0, int64_t n1, T* out, int64_t ld) {
  constexpr int64_t CB = BITS * 4;
  const ExpandRegs<BITS, false, true> ex;
  const __m512 uv = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t cpg = d.G == 1 ? cdiv(d.K, kChunk) : d.gs / kChunk;
  const int64_t c_safe = d.row_bytes >= 16 ? (d.row_bytes - 16) / CB + 1 : 0;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = d.w + n * d.row_bytes;
    T* o = out + (n - n0) * ld;
    for (int64_t g = 0; g < d.G; ++g) {
      const __m512 lf = _mm512_mul_ps(_mm512_sub_ps(uv, _mm512_set1_ps(d.zero[n * d.G + g])),
                                      _mm512_set1_ps(d.scale[n * d.G + g]));
      const __m512i lut = _mm512_castsi256_si512(cvt16<T>(lf));
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        const __m512i idx = c < c_safe ? ex(row + c * CB) : ex(row + c * CB, d.row_bytes - c * CB);
        const __m512i v = _mm512_permutexvar_epi16(idx, lut);
        const int64_t left = d.K - c * kChunk;
        if (left >= 32)
          _mm512_storeu_si512(o + c * kChunk, v);
        else
          _mm512_mask_storeu_epi16(o + c * kChunk, __mmask32((1ull << left) - 1), v);
      }
    }
  }
}
#endif  // EFFALG_X86

bool dequant_fast_ok(int64_t bits, int64_t K, int64_t G) { return gemv_fast_ok(bits, K, G); }

template <typename T>
void dequant_rows(const Deq& d, int64_t n0, int64_t n1, T* out, int64_t ld, bool fast) {
#if EFFALG_X86
  if (fast) {
    if constexpr (std::is_same_v<T, float>) {
      if (d.bits == 3)
        dequant_rows_avx512<3, T>(d, n0, n1, out, ld);
      else
        dequant_rows_avx512<4, T>(d, n0, n1, out, ld);
    } else {
      if (d.bits == 3)
        dequant_rows_lut<3, T>(d, n0, n1, out, ld);
      else
        dequant_rows_lut<4, T>(d, n0, n1, out, ld);
    }
    return;
  }
#endif
  dequant_rows_portable<T>(d, n0, n1, out, ld);
}

Deq make_deq(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero, int64_t bits, int64_t K) {
  Deq d{};
  d.w = w.data_ptr<uint8_t>();
  d.row_bytes = w.size(1);
  d.N = w.size(0);
  d.K = K;
  d.G = scale.size(1);
  d.gs = K / d.G;
  d.bits = int(bits);
  d.scale = scale.data_ptr<float>();
  d.zero = zero.data_ptr<float>();
  return d;
}

// Whole canonical weight -> [N, K] in dtype.
at::Tensor dequant(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero, int64_t bits, int64_t K,
                   at::ScalarType dtype, bool portable) {
  check_common(at::empty({1, K}, w.options().dtype(at::kFloat)), w, scale, zero, bits);
  TORCH_CHECK(w.size(1) == (K * bits + 7) / 8 && K % scale.size(1) == 0, "dequant: bad shapes");
  const Deq d = make_deq(w, scale, zero, bits, K);
  const bool fast = !portable && dequant_fast_ok(bits, K, d.G);
  at::Tensor out = at::empty({d.N, K}, w.options().dtype(dtype));
  auto run = [&](auto* o) {
    at::parallel_for(0, d.N, 16, [&](int64_t n0, int64_t n1) { dequant_rows(d, n0, n1, o + n0 * K, K, fast); });
  };
  if (dtype == at::kBFloat16)
    run(out.data_ptr<c10::BFloat16>());
  else if (dtype == at::kHalf)
    run(out.data_ptr<c10::Half>());
  else if (dtype == at::kFloat)
    run(out.data_ptr<float>());
  else
    TORCH_CHECK(false, "dequant: dtype must be bf16, fp16 or fp32");
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Prefill driver: tiles of tile_n output channels, each filled (dequantized) by one thread into a buffer kept per thread
// across calls (no fresh pages per call) and multiplied with at::mm_out / addmm_out into its output columns.
// fill(raw, n0, tn) writes the tile and returns whether it is K-major ([K, tn]) rather than channel-major ([tn, K]).

template <typename Fill>
at::Tensor tiled_linear(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t N, int64_t tile_n,
                        const Fill& fill) {
  TORCH_CHECK(tile_n > 0, "tile_n must be positive");
  at::NoGradGuard no_grad;
  const at::Tensor xd = x.detach();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(x.scalar_type()).contiguous();
  const int64_t tiles = cdiv(N, tile_n);
  const size_t need = size_t(tile_n * K * x.element_size()) + 64;
  const at::ThreadLocalState tls;  // grad / inference mode of the caller, for the ATen calls of the worker threads
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    const at::ThreadLocalStateGuard tls_guard(tls);
    static thread_local std::vector<uint8_t> store;
    if (store.size() < need) store.resize(need);
    void* raw = store.data() + ((64 - reinterpret_cast<uintptr_t>(store.data()) % 64) % 64);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * tile_n, tn = std::min(tile_n, N - n0);
      const bool kmajor = fill(raw, n0, tn);
      const at::Tensor wt = kmajor ? at::from_blob(raw, {K, tn}, {tile_n, 1}, x.options())
                                   : at::from_blob(raw, {tn, K}, x.options()).t();
      at::Tensor o = out.narrow(1, n0, tn);
      if (b.defined())
        at::addmm_out(o, b.narrow(0, n0, tn), xd, wt);
      else
        at::mm_out(o, xd, wt);
    }
  });
  return out;
}

template <typename F>
void with_dtype(at::ScalarType dt, void* raw, const F& f) {
  if (dt == at::kBFloat16)
    f(static_cast<c10::BFloat16*>(raw));
  else if (dt == at::kHalf)
    f(static_cast<c10::Half*>(raw));
  else
    f(static_cast<float*>(raw));
}

// Canonical layout, large M.
at::Tensor dequant_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                          const c10::optional<at::Tensor>& bias, int64_t bits, int64_t tile_n, bool portable) {
  check_common(x, w, scale, zero, bits);
  const int64_t K = x.size(1), N = w.size(0), G = scale.size(1);
  TORCH_CHECK(scale.size(0) == N && K % G == 0, "scale must be [N, G] with G dividing K");
  TORCH_CHECK(w.size(1) == (K * bits + 7) / 8, "w must be [N, ceil(K * bits / 8)]");
  const Deq d = make_deq(w, scale, zero, bits, K);
  const bool fast = !portable && dequant_fast_ok(bits, K, G);
  return tiled_linear(x, bias, N, tile_n, [&](void* raw, int64_t n0, int64_t tn) {
    with_dtype(x.scalar_type(), raw, [&](auto* buf) { dequant_rows(d, n0, n0 + tn, buf, K, fast); });
    return false;
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Blocked runtime layout (prepacked modules). Channel block b holds channels 16b .. 16b + 15; for each k-pair p
// (k = 2p, 2p + 1) its 32 codes, code i = 2j + q being channel 16b + j at k = 2p + q, form a bits-bit little-endian
// stream of CB = 4 * bits bytes at byte (b * KP + p) * CB of a flat uint8 tensor (KP = ceil(K / 2)), followed by 16
// zero bytes (so every chunk can be loaded as 16 bytes). Codes of padding channels (>= N) and of k = K are 0.
// Expanded, one chunk is a zmm of 16 (channel) lanes, each a (k, k + 1) bf16 pair: one vdpbf16ps against the
// broadcast activation pair updates 16 channels, the group scale is a vector, and a 16-channel block streams
// linearly through memory.

inline int64_t blocked_numel(int64_t N, int64_t K, int64_t bits) { return cdiv(N, 16) * cdiv(K, 2) * 4 * bits + 16; }

inline uint32_t chunk_code(const uint8_t* chunk, int bits, int i) {
  const int bp = i * bits;
  const uint32_t v = uint32_t(chunk[bp >> 3]) | (uint32_t(chunk[(bp >> 3) + 1]) << 8);
  return (v >> (bp & 7)) & ((1u << bits) - 1);
}

at::Tensor to_blocked(const at::Tensor& w, int64_t bits, int64_t K) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), "w must be contiguous uint8 [N, *]");
  TORCH_CHECK((bits == 3 || bits == 4) && w.size(1) == (K * bits + 7) / 8, "to_blocked: bits 3 or 4, w [N, ceil(K*bits/8)]");
  const int64_t N = w.size(0), KP = cdiv(K, 2), CB = 4 * bits, rb = w.size(1);
  at::Tensor out = at::zeros({blocked_numel(N, K, bits)}, w.options());
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, cdiv(N, 16), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t p = 0; p < KP; ++p) {
        uint8_t* o = dst + (b * KP + p) * CB;
        for (int i = 0; i < 32; ++i) {
          const int64_t n = 16 * b + i / 2, k = 2 * p + i % 2;
          if (n >= N || k >= K) continue;
          const uint32_t c = code_at(src + n * rb, rb, int(bits), k);
          const int bp = i * int(bits);
          o[bp >> 3] |= uint8_t(c << (bp & 7));
          if ((bp & 7) + bits > 8) o[(bp >> 3) + 1] |= uint8_t(c >> (8 - (bp & 7)));
        }
      }
  });
  return out;
}

at::Tensor from_blocked(const at::Tensor& wb, int64_t bits, int64_t N, int64_t K) {
  TORCH_CHECK(wb.scalar_type() == at::kByte && wb.is_contiguous() && wb.numel() == blocked_numel(N, K, bits),
              "from_blocked: wb must be the blocked layout of an [N, K] weight");
  const int64_t KP = cdiv(K, 2), CB = 4 * bits, rb = (K * bits + 7) / 8;
  at::Tensor out = at::zeros({N, rb}, wb.options());
  const uint8_t* src = wb.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      uint8_t* o = dst + n * rb;
      for (int64_t k = 0; k < K; ++k) {
        const uint32_t c = chunk_code(src + ((n / 16) * KP + k / 2) * CB, int(bits), int(2 * (n % 16) + k % 2));
        const int64_t bp = k * bits;
        o[bp >> 3] |= uint8_t(c << (bp & 7));
        if ((bp & 7) + bits > 8) o[(bp >> 3) + 1] |= uint8_t(c >> (8 - (bp & 7)));
      }
    }
  });
  return out;
}

struct Blk {
  const uint8_t* w;
  int64_t N, K, KP, G, gpp, NBLK;  // gpp: k-pairs per group
  int bits;
  const float* scale;  // [N, G]
  const float* zero;   // [N, G]
  const float* bias;   // fp32 [N] or null
  int64_t M;
  int T;
  const uint32_t* xp;  // fast path: bf16 pairs of the terms [T, M, KP]
  const float* xsum;   // fast path: per-group sums of the terms [M, G]
  const float* xf;     // portable path: fp32 activations [M, 2 * KP], zero padded
  void* out;           // [M, N] in out_dtype
  at::ScalarType out_dtype;
};

template <typename T>
inline void store_out_scalar(void* out, int64_t idx, float v) {
  static_cast<T*>(out)[idx] = from_f<T>(v);
}

void blk_rows_portable(const Blk& a, int64_t b0, int64_t b1) {
  const int64_t CB = 4 * a.bits;
  std::vector<float> xs(a.M * a.G);
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t g = 0; g < a.G; ++g) {
      double s = 0;
      for (int64_t k = 2 * g * a.gpp; k < std::min(2 * a.KP, 2 * (g + 1) * a.gpp); ++k) s += a.xf[m * 2 * a.KP + k];
      xs[m * a.G + g] = float(s);
    }
  float u[32];
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.xf + m * 2 * a.KP;
      float y[16] = {0};
      for (int64_t g = 0; g < a.G; ++g) {
        float d[16] = {0};
        for (int64_t p = g * a.gpp; p < std::min(a.KP, (g + 1) * a.gpp); ++p) {
          const uint8_t* chunk = a.w + (b * a.KP + p) * CB;
          for (int i = 0; i < 32; ++i) u[i] = float(chunk_code(chunk, a.bits, i));
          for (int j = 0; j < 16; ++j) d[j] += u[2 * j] * x[2 * p] + u[2 * j + 1] * x[2 * p + 1];
        }
        for (int j = 0; j < 16; ++j) {
          const int64_t n = std::min(16 * b + j, a.N - 1);
          y[j] += a.scale[n * a.G + g] * (d[j] - a.zero[n * a.G + g] * xs[m * a.G + g]);
        }
      }
      for (int j = 0; j < 16 && 16 * b + j < a.N; ++j) {
        const int64_t n = 16 * b + j;
        const float v = y[j] + (a.bias ? a.bias[n] : 0.f);
        if (a.out_dtype == at::kBFloat16)
          store_out_scalar<c10::BFloat16>(a.out, m * a.N + n, v);
        else if (a.out_dtype == at::kHalf)
          store_out_scalar<c10::Half>(a.out, m * a.N + n, v);
        else
          store_out_scalar<float>(a.out, m * a.N + n, v);
      }
    }
}

#if EFFALG_X86
// Scale and zero of the 16 channels of block b in group g (padding channels repeat channel N - 1).
EFFALG_AVX512 inline void blk_qparams(const Blk& a, int64_t b, int64_t g, __m512& sv, __m512& zv) {
  const int64_t n0 = 16 * b;
  if (n0 + 16 <= a.N) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(int(a.G)));
    sv = _mm512_i32gather_ps(idx, a.scale + n0 * a.G + g, 4);
    zv = _mm512_i32gather_ps(idx, a.zero + n0 * a.G + g, 4);
  } else {
    alignas(64) float s[16], z[16];
    for (int j = 0; j < 16; ++j) {
      const int64_t n = std::min(n0 + j, a.N - 1);
      s[j] = a.scale[n * a.G + g];
      z[j] = a.zero[n * a.G + g];
    }
    sv = _mm512_load_ps(s);
    zv = _mm512_load_ps(z);
  }
}

constexpr int64_t kPrefetchPairs = 256;  // software prefetch distance of the blocked kernel, in k-pairs

// NBK channel blocks from b0 times MB activation rows from m0: a register tile of NBK * MB accumulators (one zmm of
// 16 channels each); the running per-group-scaled sums live in a small L1 array, so the registers hold only the
// accumulators, the expanded weights and the broadcast activation pair.
template <int BITS, int MB, int NBK, int T>
EFFALG_AVX512 void blk_kernel(const Blk& a, int64_t m0, int64_t b0) {
  constexpr int64_t CB = BITS * 4;
  const __m512 O = _mm512_set1_ps(BITS == 3 ? 8.f : 16.f);
  const ExpandRegs<BITS> ex;
  const uint8_t* base[NBK];
  alignas(64) float tot[NBK][MB][16];
  for (int i = 0; i < NBK; ++i) {
    base[i] = a.w + (b0 + i) * a.KP * CB;
    for (int m = 0; m < MB; ++m) _mm512_store_ps(tot[i][m], _mm512_setzero_ps());
  }
  const int64_t tstride = a.M * a.KP;
  for (int64_t g = 0; g < a.G; ++g) {
    __m512 acc[NBK][MB];
    for (int i = 0; i < NBK; ++i)
      for (int m = 0; m < MB; ++m) acc[i][m] = _mm512_setzero_ps();
    const int64_t p1 = std::min(a.KP, (g + 1) * a.gpp);
    for (int64_t p = g * a.gpp; p < p1; ++p) {
      __m512bh wv[NBK];
      if ((p & 3) == 0)  // NBK streams at once: help the hardware prefetchers (past a block's end: the next one)
        for (int i = 0; i < NBK; ++i) _mm_prefetch((const char*)(base[i] + (p + kPrefetchPairs) * CB), _MM_HINT_T0);
      for (int i = 0; i < NBK; ++i) wv[i] = (__m512bh)ex(base[i] + p * CB);
      const uint32_t* xq = a.xp + m0 * a.KP + p;
      for (int t = 0; t < T; ++t)
        for (int m = 0; m < MB; ++m) {
          const __m512bh xv = (__m512bh)_mm512_set1_epi32(int(xq[t * tstride + m * a.KP]));
          for (int i = 0; i < NBK; ++i) acc[i][m] = _mm512_dpbf16_ps(acc[i][m], wv[i], xv);
        }
    }
    for (int i = 0; i < NBK; ++i) {
      __m512 sv, zv;
      blk_qparams(a, b0 + i, g, sv, zv);
      const __m512 zo = _mm512_mul_ps(sv, _mm512_add_ps(O, zv));
      for (int m = 0; m < MB; ++m) {
        __m512 r = _mm512_fmadd_ps(acc[i][m], sv, _mm512_load_ps(tot[i][m]));
        r = _mm512_fnmadd_ps(zo, _mm512_set1_ps(a.xsum[(m0 + m) * a.G + g]), r);
        _mm512_store_ps(tot[i][m], r);
      }
    }
  }
  for (int i = 0; i < NBK; ++i) {
    const int64_t n0 = 16 * (b0 + i);
    const int64_t left = a.N - n0;
    const __mmask16 mk = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    const __m512 bv = a.bias ? _mm512_maskz_loadu_ps(mk, a.bias + n0) : _mm512_setzero_ps();
    for (int m = 0; m < MB; ++m) {
      const __m512 v = _mm512_add_ps(_mm512_load_ps(tot[i][m]), bv);
      const int64_t off = (m0 + m) * a.N + n0;
      if (a.out_dtype == at::kBFloat16)
        store16(static_cast<c10::BFloat16*>(a.out) + off, v, mk);
      else if (a.out_dtype == at::kHalf)
        store16(static_cast<c10::Half*>(a.out) + off, v, mk);
      else
        store16(static_cast<float*>(a.out) + off, v, mk);
    }
  }
}

template <int BITS, int MB, int T>
void blk_span_t(const Blk& a, int64_t m0, int64_t b0, int64_t b1) {
  constexpr int NBK = MB <= 4 ? 4 : (MB <= 6 ? 3 : 2);  // at most 24 accumulators
  int64_t b = b0;
  for (; b + NBK <= b1; b += NBK) blk_kernel<BITS, MB, NBK, T>(a, m0, b);
  for (; b < b1; ++b) blk_kernel<BITS, MB, 1, T>(a, m0, b);
}

template <int BITS, int MB>
void blk_span(const Blk& a, int64_t m0, int64_t b0, int64_t b1) {
  if (a.T == 1)
    blk_span_t<BITS, MB, 1>(a, m0, b0, b1);
  else if (a.T == 2)
    blk_span_t<BITS, MB, 2>(a, m0, b0, b1);
  else
    blk_span_t<BITS, MB, 3>(a, m0, b0, b1);
}

template <int BITS>
void blk_dispatch(const Blk& a, int64_t b0, int64_t b1) {
  const int64_t nmb = cdiv(a.M, kMaxMB), mbs = cdiv(a.M, nmb);  // balanced activation blocks
  constexpr int64_t SB = 4;                                        // channel blocks whose bytes stay hot across them
  for (int64_t s0 = b0; s0 < b1; s0 += SB) {
    const int64_t s1 = std::min(b1, s0 + SB);
    for (int64_t m0 = 0; m0 < a.M; m0 += mbs) {
      switch (std::min(mbs, a.M - m0)) {
        case 1: blk_span<BITS, 1>(a, m0, s0, s1); break;
        case 2: blk_span<BITS, 2>(a, m0, s0, s1); break;
        case 3: blk_span<BITS, 3>(a, m0, s0, s1); break;
        case 4: blk_span<BITS, 4>(a, m0, s0, s1); break;
        case 5: blk_span<BITS, 5>(a, m0, s0, s1); break;
        case 6: blk_span<BITS, 6>(a, m0, s0, s1); break;
        case 7: blk_span<BITS, 7>(a, m0, s0, s1); break;
        case 8: blk_span<BITS, 8>(a, m0, s0, s1); break;
        case 9: blk_span<BITS, 9>(a, m0, s0, s1); break;
        case 10: blk_span<BITS, 10>(a, m0, s0, s1); break;
        case 11: blk_span<BITS, 11>(a, m0, s0, s1); break;
        default: blk_span<BITS, 12>(a, m0, s0, s1); break;
      }
    }
  }
}

// Blocked chunks -> K-major tile out[k * ld + 16 * (b - b0) + j] for blocks [b0, b1).
template <int BITS, typename T>
EFFALG_AVX512 void blk_dequant_avx512(const Blk& a, int64_t b0, int64_t b1, T* out, int64_t ld) {
  constexpr int64_t CB = BITS * 4;
  constexpr int MAXB = 4;  // blocks interleaved per k-pair: whole cache lines per k row
  const ExpandRegs<BITS, true> ex;
  const __m512 O = _mm512_set1_ps(BITS == 3 ? 8.f : 16.f);
  for (int64_t c0 = b0; c0 < b1; c0 += MAXB) {
    const int nb = int(std::min<int64_t>(MAXB, b1 - c0));
    for (int64_t g = 0; g < a.G; ++g) {
      __m512 sv[MAXB], nzo[MAXB];
      for (int i = 0; i < nb; ++i) {
        __m512 zv;
        blk_qparams(a, c0 + i, g, sv[i], zv);
        nzo[i] = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(_mm512_add_ps(O, zv), sv[i]));
      }
      const int64_t p1 = std::min(a.KP, (g + 1) * a.gpp);
      for (int64_t p = g * a.gpp; p < p1; ++p) {
        const bool odd = 2 * p + 1 < a.K;
        if ((p & 3) == 0)
          for (int i = 0; i < nb; ++i)
            _mm_prefetch((const char*)(a.w + ((c0 + i) * a.KP + p + kPrefetchPairs) * CB), _MM_HINT_T0);
        for (int i = 0; i < nb; ++i) {
          const __m512i v = ex(a.w + ((c0 + i) * a.KP + p) * CB);  // low half: k = 2p, high half: k = 2p + 1
          T* col = out + 16 * (c0 + i - b0);
          store16(col + (2 * p) * ld, deq16(_mm512_castsi512_si256(v), sv[i], nzo[i]), 0xFFFF);
          if (odd) store16(col + (2 * p + 1) * ld, deq16(_mm512_extracti64x4_epi64(v, 1), sv[i], nzo[i]), 0xFFFF);
        }
      }
    }
  }
}
// Per-(block, group) lookup tables of the blocked K-major dequantization: entry e = channel * 2^bits + code, in
// 16 * 2^bits / 32 zmm of words; constants: for each fp32 half of each table zmm, the entries' channels and codes.
template <int BITS>
struct BlkLut {
  static constexpr int NC = 1 << BITS, NT = 16 * NC / 32;
  alignas(64) int32_t chan[NT][2][16];
  alignas(64) float code[NT][2][16];
  alignas(64) uint32_t pick[NT / 2];  // word lanes served by table pair r (their channel's entries in [64r, 64r + 64))
  BlkLut() {
    for (int q = 0; q < NT; ++q)
      for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 16; ++l) {
          const int e = 32 * q + 16 * h + l;
          chan[q][h][l] = e / NC;
          code[q][h][l] = float(e % NC);
        }
    for (int r = 0; r < NT / 2; ++r) {
      pick[r] = 0;
      for (int w = 0; w < 32; ++w)
        if ((w % 16) * NC / 64 == r) pick[r] |= 1u << w;
    }
  }
};
const BlkLut<3> kBlkLut3;
const BlkLut<4> kBlkLut4;

template <int BITS>
const BlkLut<BITS>& blk_lut() {
  if constexpr (BITS == 3) {
    return kBlkLut3;
  } else {
    return kBlkLut4;
  }
}

// bf16 / fp16 K-major tiles from the blocked layout through per-(block, group) lookup tables (values computed in fp32
// as (u - zero) * scale and rounded once: the PyTorch fallback's values, bit for bit).
template <int BITS, typename T>
EFFALG_AVX512 void blk_dequant_lut(const Blk& a, int64_t b0, int64_t b1, T* out, int64_t ld) {
  constexpr int64_t CB = BITS * 4;
  constexpr int MAXB = 16;  // blocks per pass: each k row of the tile is written whole, left to right
  using L = BlkLut<BITS>;
  const L& lt = blk_lut<BITS>();
  const ExpandRegs<BITS, true, true> ex;  // word: channel * 2^bits + code; low half k = 2p, high half k = 2p + 1
  alignas(64) uint16_t tabs[MAXB][L::NT][32];
  for (int64_t c0 = b0; c0 < b1; c0 += MAXB) {
    const int nb = int(std::min<int64_t>(MAXB, b1 - c0));
    for (int64_t g = 0; g < a.G; ++g) {
      for (int i = 0; i < nb; ++i) {
        __m512 sv, zv;
        blk_qparams(a, c0 + i, g, sv, zv);
        for (int q = 0; q < L::NT; ++q)
          for (int h = 0; h < 2; ++h) {
            const __m512i jv = _mm512_load_si512(lt.chan[q][h]);
            const __m512 f = _mm512_mul_ps(
                _mm512_sub_ps(_mm512_load_ps(lt.code[q][h]), _mm512_permutexvar_ps(jv, zv)),
                _mm512_permutexvar_ps(jv, sv));
            _mm256_store_si256(reinterpret_cast<__m256i*>(&tabs[i][q][16 * h]), cvt16<T>(f));
          }
      }
      const int64_t p1 = std::min(a.KP, (g + 1) * a.gpp);
      for (int64_t p = g * a.gpp; p < p1; ++p) {
        T* r0 = out + (2 * p) * ld + 16 * (c0 - b0);
        T* r1 = r0 + ld;
        const bool odd = 2 * p + 1 < a.K;
        if ((p & 3) == 0)
          for (int i = 0; i < nb; ++i)
            _mm_prefetch((const char*)(a.w + ((c0 + i) * a.KP + p + kPrefetchPairs) * CB), _MM_HINT_T0);
        for (int i = 0; i < nb; ++i) {
          const __m512i idx = ex(a.w + ((c0 + i) * a.KP + p) * CB);
          const __m512i* tb = reinterpret_cast<const __m512i*>(tabs[i]);
          __m512i v = _mm512_permutex2var_epi16(_mm512_load_si512(tb), idx, _mm512_load_si512(tb + 1));
          for (int r = 1; r < L::NT / 2; ++r)
            v = _mm512_mask_blend_epi16(
                __mmask32(lt.pick[r]), v,
                _mm512_permutex2var_epi16(_mm512_load_si512(tb + 2 * r), idx, _mm512_load_si512(tb + 2 * r + 1)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(r0 + 16 * i), _mm512_castsi512_si256(v));
          if (odd) _mm256_storeu_si256(reinterpret_cast<__m256i*>(r1 + 16 * i), _mm512_extracti64x4_epi64(v, 1));
        }
      }
    }
  }
}
#endif  // EFFALG_X86

template <typename T>
void blk_dequant_portable(const Blk& a, int64_t b0, int64_t b1, T* out, int64_t ld) {
  const int64_t CB = 4 * a.bits;
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t p = 0; p < a.KP; ++p) {
      const int64_t g = p / a.gpp;
      const uint8_t* chunk = a.w + (b * a.KP + p) * CB;
      for (int i = 0; i < 32; ++i) {
        const int64_t j = i / 2, k = 2 * p + i % 2, n = std::min(16 * b + j, a.N - 1);
        if (k >= a.K) continue;
        out[k * ld + 16 * (b - b0) + j] =
            from_f<T>((float(chunk_code(chunk, a.bits, i)) - a.zero[n * a.G + g]) * a.scale[n * a.G + g]);
      }
    }
}

bool blocked_fast_ok(int64_t bits) { return (bits == 3 || bits == 4) && cpu_has_avx512_vbmi_bf16(); }

Blk make_blk(const at::Tensor& wb, const at::Tensor& scale, const at::Tensor& zero, int64_t bits, int64_t N,
             int64_t K) {
  TORCH_CHECK(bits == 3 || bits == 4, "blocked layout: bits must be 3 or 4");
  TORCH_CHECK(wb.scalar_type() == at::kByte && wb.is_contiguous() && wb.numel() == blocked_numel(N, K, bits),
              "wb must be the blocked layout of an [N, K] weight");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && zero.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  zero.is_contiguous() && scale.sizes() == zero.sizes() && scale.dim() == 2 && scale.size(0) == N,
              "scale and zero must be contiguous fp32 [N, G]");
  const int64_t G = scale.size(1);
  TORCH_CHECK(K % G == 0 && (G == 1 || (K / G) % 2 == 0), "blocked layout: group size must be even (or one group)");
  Blk a{};
  a.w = wb.data_ptr<uint8_t>();
  a.N = N;
  a.K = K;
  a.KP = cdiv(K, 2);
  a.G = G;
  a.gpp = G == 1 ? a.KP : (K / G) / 2;
  a.NBLK = cdiv(N, 16);
  a.bits = int(bits);
  a.scale = scale.data_ptr<float>();
  a.zero = zero.data_ptr<float>();
  return a;
}

// Blocked layout, small and medium M: the fused kernel.
at::Tensor blocked_linear(const at::Tensor& x, const at::Tensor& wb, const at::Tensor& scale, const at::Tensor& zero,
                          const c10::optional<at::Tensor>& bias, int64_t bits, int64_t N, bool portable) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf || x.scalar_type() == at::kFloat,
              "x must be bf16, fp16 or fp32");
  const int64_t M = x.size(0), K = x.size(1);
  Blk a = make_blk(wb, scale, zero, bits, N, K);
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    b32 = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b32.numel() == N, "bias must have N elements");
    a.bias = b32.data_ptr<float>();
  }
  a.M = M;
  at::Tensor out = at::empty({M, N}, x.options());
  a.out = out.data_ptr();
  a.out_dtype = x.scalar_type();
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const float* xv = x32.data_ptr<float>();
  at::Tensor xp, xsum, xf;
  const bool fast = !portable && blocked_fast_ok(bits);
  if (fast) {
    const int T = x.scalar_type() == at::kBFloat16 ? 1 : (x.scalar_type() == at::kHalf ? 2 : 3);
    xp = at::zeros({T, M, 2 * a.KP}, x.options().dtype(at::kBFloat16));
    xsum = at::empty({M, a.G}, x.options().dtype(at::kFloat));
    c10::BFloat16* bp = xp.data_ptr<c10::BFloat16>();
    float* sp = xsum.data_ptr<float>();
    const int64_t gs = K / a.G;
    at::parallel_for(0, M, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t m = r0; m < r1; ++m)
        for (int64_t g = 0; g < a.G; ++g) {
          double s = 0;
          for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
            float r = xv[m * K + k];
            for (int t = 0; t < T; ++t) {
              const c10::BFloat16 h(r);
              bp[(t * M + m) * 2 * a.KP + k] = h;
              s += double(float(h));
              r -= float(h);
            }
          }
          sp[m * a.G + g] = float(s);
        }
    });
    a.T = T;
    a.xp = reinterpret_cast<const uint32_t*>(bp);
    a.xsum = sp;
#if EFFALG_X86
    at::parallel_for(0, a.NBLK, 1, [&](int64_t b0, int64_t b1) {
      if (bits == 3)
        blk_dispatch<3>(a, b0, b1);
      else
        blk_dispatch<4>(a, b0, b1);
    });
#endif
  } else {
    xf = at::zeros({M, 2 * a.KP}, x.options().dtype(at::kFloat));
    xf.narrow(1, 0, K).copy_(x32);
    a.xf = xf.data_ptr<float>();
    at::parallel_for(0, a.NBLK, 1, [&](int64_t b0, int64_t b1) { blk_rows_portable(a, b0, b1); });
  }
  return out;
}

// Blocked layout, large M: dequantized K-major tiles of tile_blocks * 16 channels and at::mm.
at::Tensor blocked_dequant_linear(const at::Tensor& x, const at::Tensor& wb, const at::Tensor& scale,
                                  const at::Tensor& zero, const c10::optional<at::Tensor>& bias, int64_t bits,
                                  int64_t N, int64_t tile_blocks, bool portable) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] tensor");
  const int64_t K = x.size(1);
  const Blk a = make_blk(wb, scale, zero, bits, N, K);
  const bool fast = !portable && blocked_fast_ok(bits);
  const int64_t tile_n = 16 * std::max<int64_t>(1, tile_blocks);
  return tiled_linear(x, bias, N, tile_n, [&](void* raw, int64_t n0, int64_t tn) {
    const int64_t b0 = n0 / 16, b1 = cdiv(n0 + tn, 16);
    with_dtype(x.scalar_type(), raw, [&](auto* buf) {
      using T = std::remove_pointer_t<decltype(buf)>;
#if EFFALG_X86
      if (fast) {
        if constexpr (std::is_same_v<T, float>) {
          if (bits == 3)
            blk_dequant_avx512<3, T>(a, b0, b1, buf, tile_n);
          else
            blk_dequant_avx512<4, T>(a, b0, b1, buf, tile_n);
        } else {
          if (bits == 3)
            blk_dequant_lut<3, T>(a, b0, b1, buf, tile_n);
          else
            blk_dequant_lut<4, T>(a, b0, b1, buf, tile_n);
        }
        return;
      }
#endif
      blk_dequant_portable<T>(a, b0, b1, buf, tile_n);
    });
    return true;
  });
}

bool native_fast_available() { return cpu_has_avx512_vbmi_bf16(); }

}  // namespace

// Loaded with torch.ops.load_library: the functions are ops of the effalg_wo_native namespace (internal; called by
// effalg/kernels/weight_only_cpu.py, which validates arguments first).
TORCH_LIBRARY(effalg_wo_native, m) {
  m.def("fast_available() -> bool", &native_fast_available);
  m.def("gemv_fast_ok(int bits, int K, int G) -> bool", &gemv_fast_ok);
  m.def("gemv(Tensor x, Tensor w, Tensor scale, Tensor zero, Tensor? bias, int bits, bool portable) -> Tensor", &gemv);
  m.def("dequant_linear(Tensor x, Tensor w, Tensor scale, Tensor zero, Tensor? bias, int bits, int tile_n, "
        "bool portable) -> Tensor",
        &dequant_linear);
  m.def("dequant(Tensor w, Tensor scale, Tensor zero, int bits, int K, ScalarType dtype, bool portable) -> Tensor",
        &dequant);
  m.def("blocked_numel(int N, int K, int bits) -> int", &blocked_numel);
  m.def("to_blocked(Tensor w, int bits, int K) -> Tensor", &to_blocked);
  m.def("from_blocked(Tensor wb, int bits, int N, int K) -> Tensor", &from_blocked);
  m.def("blocked_linear(Tensor x, Tensor wb, Tensor scale, Tensor zero, Tensor? bias, int bits, int N, "
        "bool portable) -> Tensor",
        &blocked_linear);
  m.def("blocked_dequant_linear(Tensor x, Tensor wb, Tensor scale, Tensor zero, Tensor? bias, int bits, int N, "
        "int tile_blocks, bool portable) -> Tensor",
        &blocked_dequant_linear);
}
