// CPU kernel of the absorbed MLA decode (kernels/mla_decode.h).
//
// One pass over each sequence's cached tokens with an online softmax, all query heads at once (the
// latent is shared by every head, the rotary keys by the heads of a KV group), so every token's
// latent and rotary keys are read and dequantized once per call. Work items are (sequence, split of
// the sequence); long sequences are split so that one sequence at long context keeps every thread
// busy, and the splits' partial results (running max, sum, the two latent accumulators) are merged
// with the log-sum-exp rule by whichever thread finishes a sequence's last split.
//
// Per item, tokens go in tiles of kTile:
//   1. dequantize the tile's latents C [tile, R] and rotary keys K [tile, g, 2r] to float32
//      (f32 rows are read in place);
//   2. scores S [tile, Hp] = C Qlat^T + K Qrope^T (a small GEMM; heads padded per KV group, below);
//   3. online softmax across the tile, vectorised over heads: new max, P = 2^(S - max), sums;
//   4. acc[i, m] = alpha_i acc[i, m] + sum over the tile's tokens of modality m of P[t, i] C[t].
//
// Head layout: the heads of KV group k are padded to gp = (heads / kv_heads rounded up to 8) lanes,
// so head i = k * group + j sits in lane slot(i) = k * gp + j of Hp = kv_heads * gp lanes and every
// 8-lane vector of a score row belongs to one KV group (one rotary key). Pad lanes have zero queries
// and are never read back.
//
// The softmax runs in base 2: queries are pre-scaled by scale * log2(e).
//
// Vectorisation: the hot loops use GCC generic vectors (8 floats). Plain loops over fixed-size
// accumulator arrays left the accumulators on the stack (checked in the assembly), so the register
// tiles are written with vector types, which GCC lowers to AVX2/FMA ymm code in the x86-64-v3 clone
// of process_item and to SSE pairs in the baseline clone (target_clones below). "arch=x86-64-v3"
// rather than "avx2,fma": target_clones takes comma-separated entries as separate clones, so the
// latter would give an AVX2 clone without FMA and an FMA clone without AVX2.
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/ops/arange.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "kernels/mla_decode.h"

// The vector helpers below are always inlined; GCC's warning that returning a 32-byte vector from a
// real call would depend on -mavx does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mlaforge {

namespace {

constexpr int kTile = 32;         // tokens per tile: C is kTile * R floats (16 KB at R = 128), in L1
constexpr int64_t kMinSplit = 256;  // the fewest tokens worth a split (merging costs heads * 2R per split)
// The most: keeps the float32 sums short (one thread at 32K tokens: relative error 2e-6 unsplit, 5e-7 split).
constexpr int64_t kMaxSplit = 4096;
constexpr int kItemsPerThread = 8;  // splits aimed at per thread, for balance when threads stall

#define MLA_INLINE inline __attribute__((always_inline))

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

MLA_INLINE v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
MLA_INLINE void store8(float* p, const v8& v) { std::memcpy(p, &v, sizeof v); }
MLA_INLINE v8 splat8(float x) { return v8{} + x; }
MLA_INLINE v8 max8(const v8& a, const v8& b) { return a > b ? a : b; }

// 2^x for x <= 0 (softmax exponents), relative error ~2e-7: x = n + f with n = round(x),
// |f| <= 1/2; 2^f by its degree-6 Taylor polynomial (truncation (ln2 / 2)^7 / 7! ~ 1.2e-7), 2^n put
// into the exponent bits. Clamped at -125, so that the exponent stays normal: such weights (~2e-38
// against the max's 1) are zero for any purpose here, and -inf (an empty running max) gives no NaN.
MLA_INLINE v8 exp2_8(const v8& x_in) {
  const v8 x = max8(x_in, splat8(-125.f));
  const v8 magic = splat8(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const v8 t = x + magic;
  const v8 n = t - magic;
  const v8 f = x - n;
  v8 p = splat8(1.5403530393381606e-4f);
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.f;
  const v8i e = ((v8i)t - (v8i)magic) << 23;  // n, as an exponent-field offset
  return (v8)((v8i)p + e);
}

// IEEE fp16 bits -> float, exact for every value (scales are few per token: a branch is fine).
MLA_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, em = h & 0x7fffu;
  uint32_t bits;
  if (em >= 0x7c00u) {
    bits = 0x7f800000u | (em & 0x3ffu) << 13;  // inf / NaN
  } else if (em >= 0x0400u) {
    bits = (em << 13) + (uint32_t(127 - 15) << 23);  // normal: rebias the exponent
  } else {
    float f = float(em) * 5.9604644775390625e-8f;  // subnormal: m * 2^-24, exact
    uint32_t b;
    std::memcpy(&b, &f, 4);
    bits = b;
  }
  bits |= sign;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// --- Dequantization of one row (a token's latent, or its rotary keys of one KV head) -------------

// bf16 is the top half of a float32.
MLA_INLINE void bf16_row(const uint16_t* __restrict src, int64_t n, float* __restrict out) {
  for (int64_t d = 0; d < n; ++d) out[d] = __builtin_bit_cast(float, uint32_t(src[d]) << 16);
}

// Int8: `n` values in groups of `group`, scale per group.
MLA_INLINE void int8_row(const int8_t* __restrict src, const uint16_t* __restrict sc, int64_t n, int64_t group,
                         float* __restrict out) {
  for (int64_t g0 = 0, k = 0; g0 < n; g0 += group, ++k) {
    const float s = half_to_float(sc[k]);
    for (int64_t d = 0; d < group; ++d) out[g0 + d] = float(src[g0 + d]) * s;
  }
}

// Int4: byte i holds elements 2i (low nibble) and 2i+1 (high), each q + 8; groups are even.
MLA_INLINE void int4_row(const uint8_t* __restrict src, const uint16_t* __restrict sc, int64_t n, int64_t group,
                         float* __restrict out) {
  for (int64_t g0 = 0, k = 0; g0 < n; g0 += group, ++k) {
    const float s = half_to_float(sc[k]);
    const uint8_t* b = src + g0 / 2;
    float* o = out + g0;
    for (int64_t d = 0; d < group / 2; ++d) {
      o[2 * d] = float(int(b[d] & 15) - 8) * s;
      o[2 * d + 1] = float(int(b[d] >> 4) - 8) * s;
    }
  }
}

// --- The call's shared view --------------------------------------------------------------------

struct Item {
  int32_t b;       // sequence
  int32_t t0, t1;  // positions [t0, t1)
};

struct Ctx {
  const MlaDecodeParams* p;
  int64_t h, g, group, gp, Hp, r2, R;
  // Per sequence, pre-scaled by scale * log2(e) and laid out for the score GEMM (head lanes last):
  //   qlat [2][R][Hp] (text, image), qrope [r2][Hp].
  const float* q;
  int64_t q_stride;  // floats per sequence: 2 R Hp + r2 Hp
  // Per item: M [Hp], L [Hp], acc [h][2][R].
  float* part;
  int64_t part_stride;
  const int32_t* head_slot;  // [h] lane of each head
};

// Per-thread scratch, carved from one buffer per call.
struct Scratch {
  float* c;        // [kTile][R] dequantized latents
  float* k;        // [kTile][g * r2] dequantized rotary keys
  float* s;        // [kTile][Hp] scores, then weights
  float* alpha;    // [Hp] this tile's rescaling of the running sums
  const float* crow[kTile];  // latent row of each token (into c, or into the pool for f32)
  const float* krow[kTile];  // rotary keys [g][r2] of each token
  uint8_t img[kTile];
};

// Scores of NR tokens (rows) against NV 8-lane head vectors starting at lane `col`:
//   s[r][col + 8v + l] = sum_d c[r][d] qlat[d][col + 8v + l] + sum_d k[r][kv(v)][d] qrope[d][col + 8v + l]
// with NR * NV accumulators in registers.
template <int NR, int NV>
MLA_INLINE void score_block(const Ctx& x, const float* const* crow, const float* const* krow, const float* qlat,
                            const float* qrope, int64_t col, float* s) {
  const int64_t R = x.R, r2 = x.r2, Hp = x.Hp;
  v8 acc[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = v8{};
  const float* cr[NR];
  for (int r = 0; r < NR; ++r) cr[r] = crow[r];
  for (int64_t d = 0; d < R; ++d) {
    v8 qv[NV];
    for (int v = 0; v < NV; ++v) qv[v] = load8(qlat + d * Hp + col + 8 * v);
    for (int r = 0; r < NR; ++r) {
      const float c = cr[r][d];
      for (int v = 0; v < NV; ++v) acc[r][v] += c * qv[v];
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t koff = ((col + 8 * v) / x.gp) * r2;  // this vector's KV head
    const float* kr[NR];
    for (int r = 0; r < NR; ++r) kr[r] = krow[r] + koff;
    for (int64_t d = 0; d < r2; ++d) {
      const v8 qv = load8(qrope + d * Hp + col + 8 * v);
      for (int r = 0; r < NR; ++r) acc[r][v] += kr[r][d] * qv;
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) store8(s + r * Hp + col + 8 * v, acc[r][v]);
}

// Scores of tokens [j0, j1) of the tile, all of modality m.
template <int NR>
MLA_INLINE void score_rows(const Ctx& x, const Scratch& w, int j0, const float* qlat, const float* qrope) {
  int64_t col = 0;
  for (; col + 16 <= x.Hp; col += 16)
    score_block<NR, 2>(x, w.crow + j0, w.krow + j0, qlat, qrope, col, w.s + j0 * x.Hp);
  if (col < x.Hp) score_block<NR, 1>(x, w.crow + j0, w.krow + j0, qlat, qrope, col, w.s + j0 * x.Hp);
}

// acc rows of NH heads, columns [col, col + 8 NV): acc[i] += sum over n tokens of P[t][slot i] c[t],
// with NH * NV accumulators in registers (4 x 2 measured a little faster than 2 x 4 here).
template <int NH, int NV>
MLA_INLINE void accumulate_block(int n, const float* P, int64_t Hp, const int32_t* slots, const float* const* crow,
                                 int64_t col, float* const* acc_rows) {
  v8 a[NH][NV];
  for (int i = 0; i < NH; ++i)
    for (int v = 0; v < NV; ++v) a[i][v] = load8(acc_rows[i] + col + 8 * v);
  for (int t = 0; t < n; ++t) {
    v8 cv[NV];
    for (int v = 0; v < NV; ++v) cv[v] = load8(crow[t] + col + 8 * v);
    for (int i = 0; i < NH; ++i) {
      const float pw = P[t * Hp + slots[i]];
      for (int v = 0; v < NV; ++v) a[i][v] += pw * cv[v];
    }
  }
  for (int i = 0; i < NH; ++i)
    for (int v = 0; v < NV; ++v) store8(acc_rows[i] + col + 8 * v, a[i][v]);
}

template <int NH>
MLA_INLINE void accumulate_heads(int n, const float* P, int64_t Hp, const int32_t* slots, const float* const* crow,
                                 int64_t R, float* const* acc_rows) {
  int64_t col = 0;
  for (; col + 16 <= R; col += 16) accumulate_block<NH, 2>(n, P, Hp, slots, crow, col, acc_rows);
  if (col + 8 <= R) {
    accumulate_block<NH, 1>(n, P, Hp, slots, crow, col, acc_rows);
    col += 8;
  }
  for (; col < R; ++col)  // R not a multiple of 8
    for (int i = 0; i < NH; ++i) {
      float a = acc_rows[i][col];
      for (int t = 0; t < n; ++t) a += P[t * Hp + slots[i]] * crow[t][col];
      acc_rows[i][col] = a;
    }
}

// One work item: tokens [t0, t1) of sequence b -> its partial M, L, acc. The hot function, compiled
// twice: for x86-64-v3 (AVX2, FMA) and for the baseline, picked once at load time.
__attribute__((target_clones("arch=x86-64-v3", "default"), noinline)) void process_item(const Ctx& x,
                                                                                           const Item& it,
                                                                                           Scratch& w,
                                                                                           float* part) {
  const MlaDecodeParams& p = *x.p;
  const int64_t R = x.R, r2 = x.r2, g = x.g, Hp = x.Hp, h = x.h, bs = p.block_size;
  const int64_t kw = g * r2;  // rotary values per token
  float* M = part;
  float* L = part + Hp;
  float* acc = part + 2 * Hp;  // [h][2][R]
  for (int64_t c = 0; c < Hp; ++c) M[c] = -std::numeric_limits<float>::infinity();
  std::memset(L, 0, sizeof(float) * size_t(Hp));
  std::memset(acc, 0, sizeof(float) * size_t(h * 2 * R));

  const float* qseq = x.q + it.b * x.q_stride;
  const float* qlat[2] = {qseq, qseq + R * Hp};
  const float* qrope = qseq + 2 * R * Hp;
  const int32_t* table = p.block_table + int64_t(it.b) * p.max_blocks;

  for (int64_t t0 = it.t0; t0 < it.t1; t0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, it.t1 - t0));

    // 1. Locate and dequantize the tile's tokens.
    for (int j = 0; j < n; ++j) {
      const int64_t t = t0 + j;
      const int64_t slot = int64_t(table[t / bs]) * bs + t % bs;
      w.img[j] = p.is_image[slot] ? 1 : 0;
      float* c = w.c + j * R;
      switch (p.latent_format) {
        case KvFormat::F32: w.crow[j] = static_cast<const float*>(p.latent) + slot * R; break;
        case KvFormat::BF16:
          bf16_row(static_cast<const uint16_t*>(p.latent) + slot * R, R, c);
          w.crow[j] = c;
          break;
        case KvFormat::Int8:
          int8_row(static_cast<const int8_t*>(p.latent) + slot * R, p.latent_scale + slot * (R / p.latent_group), R,
                   p.latent_group, c);
          w.crow[j] = c;
          break;
        case KvFormat::Int4:
          int4_row(static_cast<const uint8_t*>(p.latent) + slot * (R / 2), p.latent_scale + slot * (R / p.latent_group),
                   R, p.latent_group, c);
          w.crow[j] = c;
          break;
      }
      float* k = w.k + j * kw;
      switch (p.rope_format) {
        case KvFormat::F32: w.krow[j] = static_cast<const float*>(p.k_rope) + slot * kw; break;
        case KvFormat::BF16:
          bf16_row(static_cast<const uint16_t*>(p.k_rope) + slot * kw, kw, k);
          w.krow[j] = k;
          break;
        case KvFormat::Int8:  // one scale per KV head's r2 values
          int8_row(static_cast<const int8_t*>(p.k_rope) + slot * kw, p.k_rope_scale + slot * g, kw, r2, k);
          w.krow[j] = k;
          break;
        case KvFormat::Int4: break;  // not a rotary-key format (LatentPool refuses it)
      }
    }

    // 2. Scores [n, Hp], by runs of one modality (the latent query depends on it) and 4 tokens at a time.
    for (int j0 = 0; j0 < n;) {
      int j1 = j0 + 1;
      while (j1 < n && w.img[j1] == w.img[j0]) ++j1;
      const float* ql = qlat[w.img[j0]];
      int j = j0;
      for (; j + 4 <= j1; j += 4) score_rows<4>(x, w, j, ql, qrope);
      switch (j1 - j) {
        case 3: score_rows<3>(x, w, j, ql, qrope); break;
        case 2: score_rows<2>(x, w, j, ql, qrope); break;
        case 1: score_rows<1>(x, w, j, ql, qrope); break;
        default: break;
      }
      j0 = j1;
    }

    // 3. Online softmax over the tile, 8 head lanes at a time: scores become weights 2^(s - max).
    for (int64_t c = 0; c < Hp; c += 8) {
      const v8 m_old = load8(M + c);
      v8 m_new = m_old;
      for (int j = 0; j < n; ++j) m_new = max8(m_new, load8(w.s + j * Hp + c));
      v8 sum = v8{};
      for (int j = 0; j < n; ++j) {
        const v8 e = exp2_8(load8(w.s + j * Hp + c) - m_new);
        store8(w.s + j * Hp + c, e);
        sum += e;
      }
      const v8 alpha = exp2_8(m_old - m_new);  // 0 (2^-125) on the first tile, where m_old = -inf
      store8(L + c, load8(L + c) * alpha + sum);
      store8(M + c, m_new);
      store8(w.alpha + c, alpha);
    }
    // Rescale the accumulators of the heads whose max grew (none, mostly, after the first tiles).
    for (int64_t i = 0; i < h; ++i) {
      const float alpha = w.alpha[x.head_slot[i]];
      if (alpha == 1.f) continue;
      float* a = acc + i * 2 * R;
      for (int64_t d = 0; d < 2 * R; ++d) a[d] *= alpha;
    }

    // 4. acc[i, m] += P[run, i] C[run] for each run of modality m, four heads at a time.
    for (int j0 = 0; j0 < n;) {
      int j1 = j0 + 1;
      while (j1 < n && w.img[j1] == w.img[j0]) ++j1;
      const int m = w.img[j0];
      const float* P = w.s + j0 * Hp;
      int64_t i = 0;
      for (; i + 4 <= h; i += 4) {
        float* rows[4] = {acc + (i * 2 + m) * R, acc + ((i + 1) * 2 + m) * R, acc + ((i + 2) * 2 + m) * R,
                          acc + ((i + 3) * 2 + m) * R};
        accumulate_heads<4>(j1 - j0, P, Hp, x.head_slot + i, w.crow + j0, R, rows);
      }
      for (; i + 2 <= h; i += 2) {
        float* rows[2] = {acc + (i * 2 + m) * R, acc + ((i + 1) * 2 + m) * R};
        accumulate_heads<2>(j1 - j0, P, Hp, x.head_slot + i, w.crow + j0, R, rows);
      }
      if (i < h) {
        float* rows[1] = {acc + (i * 2 + m) * R};
        accumulate_heads<1>(j1 - j0, P, Hp, x.head_slot + i, w.crow + j0, R, rows);
      }
      j0 = j1;
    }
  }
}

// Combines the partials of sequence b's items [first, first + count) (consecutive) into out[b]:
//   out = sum_k 2^(M_k - M) acc_k / sum_k 2^(M_k - M) L_k,  M = max_k M_k.
void merge_sequence(const Ctx& x, int64_t b, int64_t first, int64_t count) {
  const int64_t h = x.h, R = x.R;
  float* out = x.p->out + b * h * 2 * R;
  for (int64_t i = 0; i < h; ++i) {
    const int64_t slot = x.head_slot[i];
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t k = 0; k < count; ++k) mx = std::max(mx, x.part[(first + k) * x.part_stride + slot]);
    float denom = 0;
    float* o = out + i * 2 * R;
    std::fill(o, o + 2 * R, 0.f);
    for (int64_t k = 0; k < count; ++k) {
      const float* part = x.part + (first + k) * x.part_stride;
      const float wk = std::exp2(part[slot] - mx);
      denom += wk * part[x.Hp + slot];
      const float* a = part + 2 * x.Hp + i * 2 * R;
      for (int64_t d = 0; d < 2 * R; ++d) o[d] += wk * a[d];
    }
    const float inv = 1.f / denom;  // denom >= 1: the max token's weight
    for (int64_t d = 0; d < 2 * R; ++d) o[d] *= inv;
    if (x.p->lse != nullptr) {
      x.p->lse[(b * h + i) * 2] = mx;
      x.p->lse[(b * h + i) * 2 + 1] = denom;
    }
  }
}

// Sequence b's queries in the layout of Ctx::q, scaled by scale * log2(e) (the softmax is in base 2);
// pad lanes zero. Written lane-contiguous: q_latent [h][2][R] -> [2][R][Hp], q_rope [h][r2] -> [r2][Hp].
void prepare_queries(const Ctx& x, int64_t b, float* q) {
  const MlaDecodeParams& p = *x.p;
  const int64_t h = x.h, R = x.R, r2 = x.r2, Hp = x.Hp;
  const float qs = p.scale * 1.4426950408889634f;
  std::memset(q, 0, sizeof(float) * size_t(x.q_stride));
  const float* ql = p.q_latent + b * h * 2 * R;
  const float* qr = p.q_rope + b * h * r2;
  for (int64_t m = 0; m < 2; ++m)
    for (int64_t d = 0; d < R; ++d) {
      float* row = q + (m * R + d) * Hp;
      for (int64_t i = 0; i < h; ++i) row[x.head_slot[i]] = ql[(i * 2 + m) * R + d] * qs;
    }
  for (int64_t d = 0; d < r2; ++d) {
    float* row = q + (2 * R + d) * Hp;
    for (int64_t i = 0; i < h; ++i) row[x.head_slot[i]] = qr[i * r2 + d] * qs;
  }
}

// Runs f(worker) for worker in [0, n) on ATen's intra-op threads. at::parallel_for is an inline
// template whose OpenMP body exists only where this file is compiled with -fopenmp; without it (the
// project's flags) it runs everything on the calling thread. TensorIterator::for_each is compiled
// inside libtorch, with its OpenMP, and hands out index ranges of a small tensor in parallel.
template <typename F>
void run_workers(int64_t n, const F& f) {
  if (n <= 1) {
    f(0);
    return;
  }
#ifdef _OPENMP
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) f(i);
  });
#else
  at::Tensor ids = at::arange(n, at::kLong);
  at::TensorIterator iter =
      at::TensorIteratorConfig().add_output(ids).resize_outputs(false).check_all_same_dtype(false).build();
  iter.for_each(
      [&](char** data, const int64_t* strides, int64_t n0, int64_t n1) {
        for (int64_t j = 0; j < n1; ++j)
          for (int64_t i = 0; i < n0; ++i)
            f(*reinterpret_cast<const int64_t*>(data[0] + j * strides[1] + i * strides[0]));
      },
      /*grain_size=*/1);
#endif
}

// 64-byte aligned float buffer.
struct Buffer {
  std::unique_ptr<float[]> raw;
  float* data = nullptr;
  explicit Buffer(int64_t n) : raw(new float[size_t(n) + 16]) {
    data = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(raw.get()) + 63) & ~uintptr_t(63));
  }
};

int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

}  // namespace

void mla_decode_cpu(const MlaDecodeParams& p) {
  Ctx x;
  x.p = &p;
  x.h = p.heads;
  x.g = p.kv_heads;
  x.group = x.h / x.g;
  x.gp = round_up(x.group, 8);
  x.Hp = x.g * x.gp;
  x.r2 = p.rope_dim;
  x.R = p.latent_dim;
  const int64_t B = p.batch, h = x.h, R = x.R, r2 = x.r2, Hp = x.Hp;

  std::vector<int32_t> head_slot(static_cast<size_t>(h));
  for (int64_t i = 0; i < h; ++i) head_slot[size_t(i)] = int32_t((i / x.group) * x.gp + i % x.group);
  x.head_slot = head_slot.data();

  // Queries, per sequence, in the layout of Ctx::q; prepared by the first worker that needs them.
  x.q_stride = 2 * R * Hp + r2 * Hp;
  Buffer qbuf(B * x.q_stride);
  x.q = qbuf.data;
  std::unique_ptr<std::atomic<int>[]> q_state(new std::atomic<int>[size_t(B)]);  // 0 todo, 1 being written, 2 ready
  for (int64_t b = 0; b < B; ++b) q_state[size_t(b)].store(0, std::memory_order_relaxed);
  auto need_queries = [&](int64_t b) {
    std::atomic<int>& st = q_state[size_t(b)];
    int expected = 0;
    if (st.compare_exchange_strong(expected, 1, std::memory_order_acquire)) {
      prepare_queries(x, b, qbuf.data + b * x.q_stride);
      st.store(2, std::memory_order_release);
    } else {
      while (st.load(std::memory_order_acquire) != 2) std::this_thread::yield();  // a few microseconds at most
    }
  };

  // Work items: each sequence in splits of about `chunk` tokens (a multiple of the tile), enough of
  // them for every thread to get several when the batch alone does not.
  const int64_t threads = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += std::max(0, p.seq_end[b] - p.seq_begin[b]);
  const int64_t want = (total + threads * kItemsPerThread - 1) / (threads * kItemsPerThread);
  const int64_t chunk = threads == 1 ? kMaxSplit : round_up(std::min(kMaxSplit, std::max(kMinSplit, want)), kTile);
  std::vector<Item> items;
  std::vector<int64_t> first(size_t(B) + 1, 0);  // items of sequence b: [first[b], first[b + 1]) in `items`
  for (int64_t b = 0; b < B; ++b) {
    const int64_t begin = p.seq_begin[b], len = std::max<int64_t>(0, p.seq_end[b] - begin);
    first[size_t(b)] = int64_t(items.size());
    if (len == 0) continue;
    const int64_t splits = (len + chunk - 1) / chunk, size = round_up((len + splits - 1) / splits, kTile);
    for (int64_t t = begin; t < begin + len; t += size)
      items.push_back({int32_t(b), int32_t(t), int32_t(std::min(begin + len, t + size))});
  }
  first[size_t(B)] = int64_t(items.size());
  const int64_t n_items = int64_t(items.size());

  // Sequences without tokens: zeros.
  for (int64_t b = 0; b < B; ++b)
    if (first[size_t(b)] == first[size_t(b) + 1]) {
      std::fill(p.out + b * h * 2 * R, p.out + (b + 1) * h * 2 * R, 0.f);
      if (p.lse != nullptr)
        for (int64_t i = 0; i < h; ++i) {
          p.lse[(b * h + i) * 2] = -std::numeric_limits<float>::infinity();
          p.lse[(b * h + i) * 2 + 1] = 0.f;
        }
    }
  if (n_items == 0) return;

  // Longest items first, handed out dynamically.
  std::vector<int64_t> order(static_cast<size_t>(n_items));
  for (int64_t k = 0; k < n_items; ++k) order[size_t(k)] = k;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) {
    return items[size_t(a)].t1 - items[size_t(a)].t0 > items[size_t(c)].t1 - items[size_t(c)].t0;
  });

  x.part_stride = round_up(2 * Hp + h * 2 * R, 16);
  Buffer part(n_items * x.part_stride);
  x.part = part.data;

  const int64_t workers = std::min(threads, n_items);
  const int64_t kw = x.g * r2;
  const int64_t scratch_floats = round_up(kTile * R, 16) + round_up(kTile * kw, 16) + kTile * Hp + round_up(Hp, 16);
  Buffer scratch(workers * scratch_floats);

  std::unique_ptr<std::atomic<int64_t>[]> left(new std::atomic<int64_t>[size_t(B)]);
  for (int64_t b = 0; b < B; ++b) left[size_t(b)].store(first[size_t(b) + 1] - first[size_t(b)]);
  std::atomic<int64_t> next{0};

  run_workers(workers, [&](int64_t wid) {
    Scratch w;
    float* base = scratch.data + wid * scratch_floats;
    w.c = base;
    w.k = w.c + round_up(kTile * R, 16);
    w.s = w.k + round_up(kTile * kw, 16);
    w.alpha = w.s + kTile * Hp;
    for (;;) {
      const int64_t k = next.fetch_add(1, std::memory_order_relaxed);
      if (k >= n_items) break;
      const int64_t idx = order[size_t(k)];
      const Item& it = items[size_t(idx)];
      need_queries(it.b);
      process_item(x, it, w, x.part + idx * x.part_stride);
      // The thread that completes a sequence's last split merges it (acq_rel: it sees the other splits' partials).
      if (left[size_t(it.b)].fetch_sub(1, std::memory_order_acq_rel) == 1)
        merge_sequence(x, it.b, first[size_t(it.b)], first[size_t(it.b) + 1] - first[size_t(it.b)]);
    }
  });
}

}  // namespace mlaforge
