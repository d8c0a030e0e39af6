// Correctness and bandwidth check of the CUDA MLA decode kernel (src/kernels/cuda/mla_decode.cu) against a
// float64 host reference; standalone (nvcc, no torch). From the repository root:
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -DMLAFORGE_CUDA_SM90A -Isrc -o /tmp/mla_check bench/cuda/mla_decode_check.cu src/kernels/cuda/mla_decode.cu && /tmp/mla_check
//
// Options: --quick (small cases only, no timing), --filter SUBSTRING (cases whose name contains it).
// One line per case and path; exit status 1 if any case fails.
//
// Every case runs with the kernel's own path choice ("auto": tensor cores for BF16/Int8 rotary keys with
// BF16/Int8/Int4 latent where the shape allows, else CUDA cores) and, for the small cases, again with
// MLAFORGE_MLA_CUDA_PATH=cc (CUDA cores forced); "combine" is auto with the row-pair kernels' splits merged by
// the combine kernel instead of by the kernel's own CTAs after a grid barrier. The reference dequantises the stored cache exactly as
// kernels/mla_decode.h says, so quantisation error is not counted; tolerance on ||out - ref|| / ||ref||:
// 1e-5 when queries, rotary keys and latent are all F32, else 1e-2.
//
// Bandwidth: bytes read = k_rope + its scales + latent + its scales + is_image of the attended tokens; the
// kernel is timed with cudaEvents around mla_decode_cuda (split kernel + combine) with the L2 flushed before
// each repetition; median of 30. Copy bandwidth: cudaMemcpyAsync device-to-device of 1 GiB, counted as
// 2 x bytes / time (read + write), median of 20.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#ifndef MLAFORGE_WITH_CUDA
#define MLAFORGE_WITH_CUDA  // declares the CUDA entry points
#endif
#include "kernels/mla_decode.h"

using mlaforge::KvFormat;
using mlaforge::kv_format_name;
using mlaforge::MlaDecodeParams;

#define CUDA_CHECK(expr)                                                                          \
  do {                                                                                            \
    cudaError_t err_ = (expr);                                                                    \
    if (err_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(2);                                                                               \
    }                                                                                             \
  } while (0)

#ifdef MLAFORGE_PROBE_TIMELINE
namespace mlaforge { void mla_probe_timeline_dump(int ctas); }
#endif
namespace {

// ---- host number formats --------------------------------------------------------------------------------

float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

uint16_t float_to_bf16(float f) {  // round to nearest even (values here are finite)
  const uint32_t u = float_to_bits(f);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

float half_to_float(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 31, mant = h & 1023;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(mant), -24);
  } else if (exp == 31) {
    v = mant ? NAN : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(mant + 1024), exp - 25);
  }
  return sign ? -v : v;
}

// Nearest fp16 (ties to even) of a finite non-negative float below 65504; enough for scales.
uint16_t float_to_half(float f) {
  if (!(f > 0.f)) return 0;
  int e;
  std::frexp(f, &e);  // f = m * 2^e, m in [0.5, 1)
  // fp16 normal: value = (1024 + mant) * 2^(exp - 25) with exp in [1, 30], i.e. 2^(exp-15) <= f.
  int exp = e - 1 + 15;
  if (exp < 1) {  // subnormal: mant * 2^-24
    const float q = std::nearbyint(std::ldexp(f, 24));
    return static_cast<uint16_t>(q);  // q <= 1024; 1024 is the smallest normal's bit pattern
  }
  float q = std::nearbyint(std::ldexp(f, 25 - exp));  // in [1024, 2048]
  if (q >= 2048.f) {
    q = 1024.f;
    ++exp;
  }
  if (exp >= 31) return 0x7bff;
  return static_cast<uint16_t>((exp << 10) | (static_cast<int>(q) - 1024));
}

// Bytes one row of `width` values takes in format f.
int64_t row_bytes(KvFormat f, int64_t width) {
  switch (f) {
    case KvFormat::F32: return 4 * width;
    case KvFormat::BF16: return 2 * width;
    case KvFormat::Int8: return width;
    case KvFormat::Int4: return width / 2;
  }
  return 0;
}

bool quantized(KvFormat f) { return f == KvFormat::Int8 || f == KvFormat::Int4; }

struct Rng {  // splitmix64: fast, reproducible
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uniform() { return static_cast<float>(next() >> 40) * (1.f / 16777216.f); }  // [0, 1)
  float symmetric() { return 2.f * uniform() - 1.f; }                                 // [-1, 1)
  int below(int n) { return static_cast<int>(next() % static_cast<uint64_t>(n)); }
};

// ---- stored cache rows -----------------------------------------------------------------------------------

// Rows of `width` values in format f with a scale per `group` values (quantized formats): values, scales.
struct StoredRows {
  KvFormat format = KvFormat::F32;
  int64_t width = 0, group = 0;
  std::vector<uint8_t> values;   // rows * row_bytes(format, width)
  std::vector<uint16_t> scales;  // rows * width / group fp16 bits (quantized formats)

  void init(KvFormat f, int64_t rows, int64_t w, int64_t g) {
    format = f;
    width = w;
    group = g;
    values.assign(static_cast<size_t>(rows * row_bytes(f, w)), 0);
    if (quantized(f)) scales.assign(static_cast<size_t>(rows * (w / g)), 0);
  }

  // Stores row `row` from x[width], quantizing per the header: Int8 q in [-127,127], Int4 q in [-7,7] stored
  // as q + 8 with element 2i in the low nibble; scale = fp16(max|x| / qmax), q = round(x / scale).
  void store(int64_t row, const float* x) {
    uint8_t* dst = values.data() + row * row_bytes(format, width);
    if (format == KvFormat::F32) {
      std::memcpy(dst, x, static_cast<size_t>(4 * width));
      return;
    }
    if (format == KvFormat::BF16) {
      for (int64_t i = 0; i < width; ++i) {
        const uint16_t b = float_to_bf16(x[i]);
        std::memcpy(dst + 2 * i, &b, 2);
      }
      return;
    }
    const float qmax = format == KvFormat::Int8 ? 127.f : 7.f;
    const int64_t ng = width / group;
    for (int64_t gi = 0; gi < ng; ++gi) {
      float amax = 0.f;
      for (int64_t i = 0; i < group; ++i) amax = std::max(amax, std::fabs(x[gi * group + i]));
      const uint16_t sbits = float_to_half(amax / qmax);
      scales[static_cast<size_t>(row * ng + gi)] = sbits;
      const float s = half_to_float(sbits);
      for (int64_t i = 0; i < group; ++i) {
        const int64_t e = gi * group + i;
        int q = s > 0.f ? static_cast<int>(std::nearbyint(x[e] / s)) : 0;
        q = std::min(std::max(q, -static_cast<int>(qmax)), static_cast<int>(qmax));
        if (format == KvFormat::Int8) {
          dst[e] = static_cast<uint8_t>(static_cast<int8_t>(q));
        } else {
          const uint8_t nib = static_cast<uint8_t>(q + 8);
          dst[e / 2] = e % 2 == 0 ? static_cast<uint8_t>((dst[e / 2] & 0xf0) | nib)
                                  : static_cast<uint8_t>((dst[e / 2] & 0x0f) | (nib << 4));
        }
      }
    }
  }

  // Dequantized value of element e of row `row` (what the kernel must use).
  float load(int64_t row, int64_t e) const {
    const uint8_t* src = values.data() + row * row_bytes(format, width);
    switch (format) {
      case KvFormat::F32: {
        float v;
        std::memcpy(&v, src + 4 * e, 4);
        return v;
      }
      case KvFormat::BF16: {
        uint16_t b;
        std::memcpy(&b, src + 2 * e, 2);
        return bf16_to_float(b);
      }
      case KvFormat::Int8:
        return static_cast<float>(static_cast<int8_t>(src[e])) *
               half_to_float(scales[static_cast<size_t>(row * (width / group) + e / group)]);
      case KvFormat::Int4: {
        const int nib = e % 2 == 0 ? (src[e / 2] & 15) : (src[e / 2] >> 4);
        return static_cast<float>(nib - 8) * half_to_float(scales[static_cast<size_t>(row * (width / group) + e / group)]);
      }
    }
    return 0.f;
  }
};

// ---- cases -----------------------------------------------------------------------------------------------

struct Case {
  std::string name;
  int heads, kv_heads, rope_dim, latent_dim, latent_group, block_size;
  KvFormat rope_format, latent_format;
  std::vector<int> seq_begin, seq_end;
  float image_fraction;  // share of tokens in image runs (0 = all text, 1 = all image)
  bool large;            // timed; only `check_seqs` sequences verified
  int check_seqs;        // sequences compared with the reference (from both ends of the batch)
};

struct HostCase {
  MlaDecodeParams p;  // pointers unset
  int num_blocks = 0;
  std::vector<int32_t> block_table, seq_begin, seq_end;
  std::vector<float> q_rope, q_latent;
  StoredRows k_rope;  // rows: num_blocks * block_size * kv_heads, width rope_dim, group rope_dim
  StoredRows latent;  // rows: num_blocks * block_size, width latent_dim
  std::vector<uint8_t> is_image;
  int64_t bytes_read = 0;
};

HostCase make_host_case(const Case& c, uint64_t seed) {
  Rng rng(seed);
  HostCase h;
  const int B = static_cast<int>(c.seq_end.size()), bs = c.block_size;
  MlaDecodeParams& p = h.p;
  p.batch = B;
  p.heads = c.heads;
  p.kv_heads = c.kv_heads;
  p.rope_dim = c.rope_dim;
  p.latent_dim = c.latent_dim;
  p.block_size = bs;
  p.latent_group = c.latent_group;
  p.rope_format = c.rope_format;
  p.latent_format = c.latent_format;
  p.scale = 1.f / std::sqrt(128.f);
  int max_blocks = 1;
  int needed = 0;
  for (int b = 0; b < B; ++b) {
    const int nb = (c.seq_end[b] + bs - 1) / bs;
    max_blocks = std::max(max_blocks, nb);
    needed += nb;
  }
  p.max_blocks = max_blocks;
  h.num_blocks = needed + 3;  // a few blocks nobody uses
  p.num_blocks = h.num_blocks;
  // Shuffled pool blocks; entries past a sequence's end are -1 (never read).
  std::vector<int32_t> perm(static_cast<size_t>(h.num_blocks));
  for (int i = 0; i < h.num_blocks; ++i) perm[static_cast<size_t>(i)] = i;
  for (int i = h.num_blocks - 1; i > 0; --i) std::swap(perm[static_cast<size_t>(i)], perm[static_cast<size_t>(rng.below(i + 1))]);
  h.block_table.assign(static_cast<size_t>(B) * max_blocks, -1);
  int next = 0;
  for (int b = 0; b < B; ++b) {
    const int nb = (c.seq_end[b] + bs - 1) / bs;
    for (int i = 0; i < nb; ++i) h.block_table[static_cast<size_t>(b) * max_blocks + i] = perm[static_cast<size_t>(next++)];
  }
  h.seq_begin = c.seq_begin;
  h.seq_end = c.seq_end;

  const int64_t tokens = static_cast<int64_t>(h.num_blocks) * bs;
  const int kv = c.kv_heads, rd = c.rope_dim, R = c.latent_dim;
  h.k_rope.init(c.rope_format, tokens * kv, rd, rd);
  h.latent.init(c.latent_format, tokens, R, c.latent_group);
  h.is_image.assign(static_cast<size_t>(tokens), 0);
  std::vector<float> row(static_cast<size_t>(std::max(rd, R)));
  for (int64_t t = 0; t < tokens; ++t) {
    for (int j = 0; j < kv; ++j) {
      for (int i = 0; i < rd; ++i) row[static_cast<size_t>(i)] = rng.symmetric();
      h.k_rope.store(t * kv + j, row.data());
    }
    // Latent rows with varying magnitude so that group scales differ.
    const float mag = 0.25f + 1.75f * rng.uniform();
    for (int i = 0; i < R; ++i) row[static_cast<size_t>(i)] = mag * rng.symmetric();
    h.latent.store(t, row.data());
  }
  // Modality: image tokens come in runs (as an image's patches do), covering about image_fraction.
  for (int b = 0; b < B; ++b) {
    for (int pos = 0; pos < c.seq_end[b];) {
      const int run = 1 + rng.below(48);
      const bool img = c.image_fraction >= 1.f || (c.image_fraction > 0.f && rng.uniform() < c.image_fraction);
      for (int i = 0; i < run && pos < c.seq_end[b]; ++i, ++pos) {
        const int64_t slot = static_cast<int64_t>(h.block_table[static_cast<size_t>(b) * max_blocks + pos / bs]) * bs + pos % bs;
        h.is_image[static_cast<size_t>(slot)] = img ? 1 : 0;
      }
    }
  }
  h.q_rope.resize(static_cast<size_t>(B) * c.heads * rd);
  h.q_latent.resize(static_cast<size_t>(B) * c.heads * 2 * R);
  for (float& v : h.q_rope) v = 4.f * rng.symmetric();
  for (float& v : h.q_latent) v = 4.f * rng.symmetric();

  const int64_t per_token = kv * row_bytes(c.rope_format, rd) + (quantized(c.rope_format) ? 2 * kv : 0) +
                            row_bytes(c.latent_format, R) +
                            (quantized(c.latent_format) ? 2 * (R / c.latent_group) : 0) + 1;
  for (int b = 0; b < B; ++b) h.bytes_read += per_token * (c.seq_end[b] - c.seq_begin[b]);
  return h;
}

// float64 reference of sequence b: out[h][m][r].
std::vector<double> reference(const HostCase& h, int b) {
  const MlaDecodeParams& p = h.p;
  const int H = p.heads, kv = p.kv_heads, rd = p.rope_dim, R = p.latent_dim, group = H / kv;
  const int begin = h.seq_begin[static_cast<size_t>(b)], end = h.seq_end[static_cast<size_t>(b)], n = end - begin;
  std::vector<double> out(static_cast<size_t>(H) * 2 * R, 0.0);
  if (n <= 0) return out;
  std::vector<float> c(static_cast<size_t>(n) * R), kr(static_cast<size_t>(kv) * rd);
  std::vector<int> img(static_cast<size_t>(n));
  std::vector<double> s(static_cast<size_t>(H) * n);
  for (int t = 0; t < n; ++t) {
    const int pos = begin + t;
    const int64_t slot = static_cast<int64_t>(h.block_table[static_cast<size_t>(b) * p.max_blocks + pos / p.block_size]) * p.block_size +
                         pos % p.block_size;
    for (int r = 0; r < R; ++r) c[static_cast<size_t>(t) * R + r] = h.latent.load(slot, r);
    for (int j = 0; j < kv; ++j)
      for (int i = 0; i < rd; ++i) kr[static_cast<size_t>(j) * rd + i] = h.k_rope.load(slot * kv + j, i);
    const int m = h.is_image[static_cast<size_t>(slot)] ? 1 : 0;
    img[static_cast<size_t>(t)] = m;
    for (int i = 0; i < H; ++i) {
      const float* qr = h.q_rope.data() + (static_cast<size_t>(b) * H + i) * rd;
      const float* ql = h.q_latent.data() + ((static_cast<size_t>(b) * H + i) * 2 + m) * R;
      const float* k = kr.data() + static_cast<size_t>(i / group) * rd;
      double acc = 0.0;
      for (int d = 0; d < rd; ++d) acc += static_cast<double>(qr[d]) * k[d];
      for (int d = 0; d < R; ++d) acc += static_cast<double>(ql[d]) * c[static_cast<size_t>(t) * R + d];
      s[static_cast<size_t>(i) * n + t] = acc * p.scale;
    }
  }
  for (int i = 0; i < H; ++i) {
    double* si = s.data() + static_cast<size_t>(i) * n;
    const double mx = *std::max_element(si, si + n);
    double sum = 0.0;
    for (int t = 0; t < n; ++t) sum += (si[t] = std::exp(si[t] - mx));
    double* o = out.data() + static_cast<size_t>(i) * 2 * R;
    for (int t = 0; t < n; ++t) {
      const double w = si[t] / sum;
      double* om = o + static_cast<size_t>(img[static_cast<size_t>(t)]) * R;
      const float* ct = c.data() + static_cast<size_t>(t) * R;
      for (int r = 0; r < R; ++r) om[r] += w * ct[r];
    }
  }
  return out;
}

// ---- device side -----------------------------------------------------------------------------------------

template <typename T>
T* to_device(const std::vector<T>& v) {
  if (v.empty()) return nullptr;
  T* d = nullptr;
  CUDA_CHECK(cudaMalloc(&d, v.size() * sizeof(T)));
  CUDA_CHECK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

struct DeviceCase {
  MlaDecodeParams p;
  std::vector<void*> allocations;
  void* workspace = nullptr;
  size_t out_floats = 0;

  template <typename T>
  T* put(const std::vector<T>& v) {
    T* d = to_device(v);
    if (d != nullptr) allocations.push_back(d);
    return d;
  }
  explicit DeviceCase(const HostCase& h) : p(h.p) {
    p.q_rope = put(h.q_rope);
    p.q_latent = put(h.q_latent);
    p.k_rope = put(h.k_rope.values);
    p.k_rope_scale = quantized(h.k_rope.format) ? put(h.k_rope.scales) : nullptr;
    p.latent = put(h.latent.values);
    p.latent_scale = quantized(h.latent.format) ? put(h.latent.scales) : nullptr;
    p.is_image = put(h.is_image);
    p.block_table = put(h.block_table);
    p.seq_begin = put(h.seq_begin);
    p.seq_end = put(h.seq_end);
    out_floats = static_cast<size_t>(p.batch) * p.heads * 2 * p.latent_dim;
    float* out = nullptr;
    CUDA_CHECK(cudaMalloc(&out, out_floats * sizeof(float)));
    allocations.push_back(out);
    p.out = out;
  }
  ~DeviceCase() {
    for (void* a : allocations) cudaFree(a);
    if (workspace != nullptr) cudaFree(workspace);
  }
  // Workspace for the current path choice (its size does not depend on the path).
  void ensure_workspace() {
    if (workspace != nullptr) return;
    const int64_t bytes = mlaforge::mla_decode_cuda_workspace_bytes(p);
    if (bytes > 0) CUDA_CHECK(cudaMalloc(&workspace, static_cast<size_t>(bytes)));
  }
  std::vector<float> run(cudaStream_t stream) {
    ensure_workspace();
    // NaN-fill so that an output the kernel forgets to write fails the check.
    CUDA_CHECK(cudaMemsetAsync(p.out, 0xff, out_floats * sizeof(float), stream));
    mlaforge::mla_decode_cuda(p, workspace, stream);
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<float> out(out_floats);
    CUDA_CHECK(cudaMemcpy(out.data(), p.out, out_floats * sizeof(float), cudaMemcpyDeviceToHost));
    return out;
  }
};

// ||out - ref|| / ||ref|| over the checked sequences; +inf when the output holds a non-finite value, or a
// nonzero value where the reference row is exactly zero (a modality without tokens must give exact zeros).
double relative_error(const HostCase& h, const std::vector<float>& out, const std::vector<int>& seqs) {
  const size_t R = static_cast<size_t>(h.p.latent_dim), per_seq = static_cast<size_t>(h.p.heads) * 2 * R;
  double diff2 = 0.0, ref2 = 0.0;
  for (int b : seqs) {
    const std::vector<double> ref = reference(h, b);
    for (size_t row = 0; row < per_seq / R; ++row) {
      bool ref_zero = true;
      for (size_t r = 0; r < R; ++r) ref_zero = ref_zero && ref[row * R + r] == 0.0;
      for (size_t r = 0; r < R; ++r) {
        const size_t i = row * R + r;
        const double o = out[static_cast<size_t>(b) * per_seq + i];
        if (!std::isfinite(o) || (ref_zero && o != 0.0)) return INFINITY;
        diff2 += (o - ref[i]) * (o - ref[i]);
        ref2 += ref[i] * ref[i];
      }
    }
  }
  return ref2 > 0.0 ? std::sqrt(diff2 / ref2) : std::sqrt(diff2);
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Device-to-device copy bandwidth on 1 GiB, as 2 * bytes / time (read + write), GB/s.
double copy_bandwidth(cudaStream_t stream) {
  const size_t bytes = size_t(1) << 30;
  void *src = nullptr, *dst = nullptr;
  CUDA_CHECK(cudaMalloc(&src, bytes));
  CUDA_CHECK(cudaMalloc(&dst, bytes));
  CUDA_CHECK(cudaMemsetAsync(src, 1, bytes, stream));
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 2; ++i) CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream));
  std::vector<float> ms;
  for (int i = 0; i < 20; ++i) {
    CUDA_CHECK(cudaEventRecord(start, stream));
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream));
    CUDA_CHECK(cudaEventRecord(stop, stream));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float t = 0.f;
    CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  CUDA_CHECK(cudaFree(src));
  CUDA_CHECK(cudaFree(dst));
  return 2.0 * static_cast<double>(bytes) / (median(ms) * 1e-3) / 1e9;
}

// Median time of mla_decode_cuda in microseconds, L2 flushed before each repetition.
double time_kernel(DeviceCase& d, cudaStream_t stream, void* flush, size_t flush_bytes) {
  d.ensure_workspace();
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) mlaforge::mla_decode_cuda(d.p, d.workspace, stream);
  std::vector<float> ms;
  for (int i = 0; i < 30; ++i) {
    if (flush != nullptr) CUDA_CHECK(cudaMemsetAsync(flush, i & 0xff, flush_bytes, stream));
    CUDA_CHECK(cudaEventRecord(start, stream));
    mlaforge::mla_decode_cuda(d.p, d.workspace, stream);
    CUDA_CHECK(cudaEventRecord(stop, stream));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float t = 0.f;
    CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  return 1e3 * median(ms);
}

// ---- the case list ---------------------------------------------------------------------------------------

std::vector<Case> make_cases(bool quick) {
  using F = KvFormat;
  std::vector<Case> cases;
  const F rope_formats[3] = {F::F32, F::BF16, F::Int8};
  const F latent_formats[4] = {F::F32, F::BF16, F::Int8, F::Int4};
  struct Shape {
    const char* name;
    int heads, kv, rope, R, group, bs;
    std::vector<int> begin, end;
    float image;
  };
  const std::vector<Shape> small = {
      // GQA with left padding, lengths from a few tokens to several splits; 1104 positions -> 5 splits.
      {"gqa_h4_kv2_r8_R32", 4, 2, 8, 32, 8, 16, {0, 5, 100}, {37, 300, 1100}, 0.5f},
      // MHA.
      {"mha_h4_kv4_r4_R16", 4, 4, 4, 16, 4, 8, {3, 0}, {700, 64}, 0.4f},
      // Sizes that are not multiples of 16 (CUDA-core path for every format).
      {"odd_h6_kv3_r6_R24", 6, 3, 6, 24, 6, 5, {0, 17, 2}, {9, 600, 333}, 0.5f},
      {"tiny_h2_kv1_r2_R8", 2, 1, 2, 8, 2, 4, {0, 1}, {1, 290}, 0.5f},
      // Heads that leave padded query rows in a tensor-core row tile (20 of 32; 40 of 64).
      {"gqa_h20_kv4_r8_R48", 20, 4, 8, 48, 8, 32, {0, 64}, {1500, 2000}, 0.3f},
      {"gqa_h40_kv8_r4_R32", 40, 8, 4, 32, 16, 16, {10}, {900}, 0.5f},
      // One split: capacity 16 blocks * 16 = 256 positions; the main kernel writes `out` itself.
      {"onesplit_h8_kv2_r16_R64", 8, 2, 16, 64, 16, 16, {0, 30, 0, 100, 255}, {256, 31, 17, 230, 256}, 0.5f},
      // One row tile with two latent column tiles per warp (R = 256).
      {"h8_kv2_r16_R256", 8, 2, 16, 256, 32, 16, {0, 40}, {700, 333}, 0.5f},
      // The largest sizes the contract allows per head (CUDA-core kernel, one head per CTA).
      {"mha_h2_kv2_r256_R1024", 2, 2, 256, 1024, 64, 16, {0, 5}, {300, 90}, 0.5f},
      // Modality extremes: all text, all image.
      {"text_h8_kv2_r16_R64", 8, 2, 16, 64, 16, 32, {0, 7}, {800, 2100}, 0.f},
      {"image_h8_kv2_r16_R64", 8, 2, 16, 64, 16, 32, {0, 7}, {800, 2100}, 1.f},
      // Row-pair kernel shapes (128 rotary values and latent 128 per token, bf16): 1, 2 and 4 warps per consumer,
      // blocks of two tiles, a batch row shorter than one tile, a split whose second consumer gets no tile.
      {"h8_kv2_r64_R128", 8, 2, 64, 128, 32, 64, {0, 3}, {500, 60}, 0.5f},
      {"h12_kv2_r64_R128", 12, 2, 64, 128, 32, 64, {70, 0}, {1300, 2000}, 0.4f},
      {"h16_kv4_r32_R128_bs128", 16, 4, 32, 128, 32, 128, {5, 0, 130}, {900, 3000, 190}, 0.4f},
      {"h28_kv4_r32_R128_short", 28, 4, 32, 128, 32, 64, {0, 10, 63}, {1, 70, 64}, 0.5f},
      // The MHA row-pair kernel's shape (llava-1.5-7b at 4 rotary pairs, dkv 8): left padding, a row of one tile.
      {"mha_h32_kv32_r8_R256", 32, 32, 8, 256, 32, 64, {0, 70, 5}, {1300, 2000, 64}, 0.4f},
      {"mha_h32_kv32_r16_R256", 32, 32, 16, 256, 32, 64, {3, 0, 64}, {900, 2100, 130}, 0.4f},
      // The two-pass kernels (bf16): llava-1.5-7b's default conversion (latent 1024, 32 rotary values per head),
      // and GQA with fewer heads than the 32-row halves, 32-token blocks, a sequence of one token.
      {"mha_h32_kv32_r32_R1024", 32, 32, 32, 1024, 64, 64, {0, 70, 5}, {1300, 2000, 64}, 0.4f},
      {"gqa_h20_kv4_r32_R512", 20, 4, 32, 512, 32, 32, {0, 9, 40}, {1, 777, 2500}, 0.5f},
      // Their rotary widths: 16 values per KV head (rotary MMA), 8 (rotary dots on CUDA cores).
      {"gqa_h24_kv8_r16_R384", 24, 8, 16, 384, 32, 64, {5, 0}, {1700, 600}, 0.4f},
      {"mha_h32_kv32_r8_R512", 32, 32, 8, 512, 32, 64, {0, 64}, {900, 1000}, 0.4f},
  };
  for (const Shape& s : small)
    for (F rf : rope_formats)
      for (F lf : latent_formats)
        cases.push_back({s.name, s.heads, s.kv, s.rope, s.R, s.group, s.bs, rf, lf, s.begin, s.end, s.image, false,
                         static_cast<int>(s.end.size())});
  // Target shapes at moderate length, every format the tensor-core path takes and F32.
  const std::vector<std::pair<F, F>> target_formats = {
      {F::BF16, F::BF16}, {F::BF16, F::Int8}, {F::BF16, F::Int4}, {F::Int8, F::Int4}, {F::Int8, F::Int8}, {F::F32, F::F32}};
  for (const auto& f : target_formats) {
    cases.push_back({"qwen7b_h28_kv4_r32_R128", 28, 4, 32, 128, 32, 64, f.first, f.second, {0, 300, 0},
                     {1000, 2500, 4001}, 0.4f, false, 3});
    cases.push_back({"h32_kv8_r32_R256", 32, 8, 32, 256, 32, 64, f.first, f.second, {0, 50}, {1200, 3000}, 0.4f,
                     false, 2});
  }
  // More CTAs than SMs (24 sequences x 11 splits): the shallow cp.async rings that keep two CTAs per SM
  // (2 stages for bf16, 3 for int8 keys + int4 latent).
  {
    std::vector<int> begin(24, 0), end(24, 0);
    Rng rng(7);
    for (int b = 0; b < 24; ++b) {
      begin[static_cast<size_t>(b)] = rng.below(40);
      end[static_cast<size_t>(b)] = b == 0 ? 2900 : 50 + rng.below(1500);
    }
    for (const auto& f : std::vector<std::pair<F, F>>{{F::BF16, F::BF16}, {F::Int8, F::Int4}, {F::F32, F::F32}})
      cases.push_back({"qwen7b_b24", 28, 4, 32, 128, 32, 64, f.first, f.second, begin, end, 0.4f, false, 4});
  }
  if (quick) return cases;

  // Timed: Qwen2.5-VL-7B at dr = dkv = 32, bf16 cache, and the quantised caches at 8K x 16.
  for (int ctx : {1024, 8192, 32768})
    for (int batch : {1, 16}) {
      Case c{"qwen7b_ctx" + std::to_string(ctx) + "_b" + std::to_string(batch), 28, 4, 32, 128, 32, 64, F::BF16,
             F::BF16, std::vector<int>(static_cast<size_t>(batch), 0), std::vector<int>(static_cast<size_t>(batch), ctx),
             0.4f, true, std::min(batch, 2)};
      cases.push_back(c);
    }
  for (const auto& f : std::vector<std::pair<F, F>>{{F::BF16, F::Int8}, {F::BF16, F::Int4}, {F::Int8, F::Int4}, {F::F32, F::F32}})
    cases.push_back({"qwen7b_ctx8192_b16", 28, 4, 32, 128, 32, 64, f.first, f.second, std::vector<int>(16, 0),
                     std::vector<int>(16, 8192), 0.4f, true, 2});
  // Left-padded, uneven batch at 8K.
  {
    std::vector<int> begin, end;
    for (int b = 0; b < 16; ++b) {
      begin.push_back(b * 37);
      end.push_back(8192 - b * 211);
    }
    cases.push_back({"qwen7b_ragged8k_b16", 28, 4, 32, 128, 32, 64, F::BF16, F::BF16, begin, end, 0.4f, true, 2});
  }
  cases.push_back({"h32_kv8_r32_R256_ctx8192_b16", 32, 8, 32, 256, 32, 64, F::BF16, F::BF16,
                   std::vector<int>(16, 0), std::vector<int>(16, 8192), 0.4f, true, 2});
  // llava-1.5-7b (MHA) at 4 (and 8) rotary pairs and dkv 8 per head: the MHA row-pair kernel, 1K to 32K x 16 (the
  // time against the context gives the kernel's fixed cost per call and its streaming rate).
  for (int ctx : {1024, 2048, 4096, 8192, 16384, 32768})
    cases.push_back({"llava7b_r4d8_ctx" + std::to_string(ctx) + "_b16", 32, 32, 8, 256, 32, 64, F::BF16, F::BF16,
                     std::vector<int>(16, 0), std::vector<int>(16, ctx), 0.4f, true, 2});
  cases.push_back({"llava7b_r8d8_ctx8192_b16", 32, 32, 16, 256, 32, 64, F::BF16, F::BF16, std::vector<int>(16, 0),
                   std::vector<int>(16, 8192), 0.4f, true, 2});
  // llava-1.5-7b at the default conversion (16 pairs, dkv 32: latent 1024): the two-pass kernels, bf16 and the
  // quantised caches (latent groups of 32, the pool's default).
  for (int ctx : {8192, 32768})
    cases.push_back({"llava7b_r16d32_ctx" + std::to_string(ctx) + "_b16", 32, 32, 32, 1024, 64, 64, F::BF16, F::BF16,
                     std::vector<int>(16, 0), std::vector<int>(16, ctx), 0.4f, true, 2});
  for (const auto& f : std::vector<std::pair<F, F>>{{F::BF16, F::Int8}, {F::BF16, F::Int4}, {F::Int8, F::Int8}, {F::Int8, F::Int4}})
    cases.push_back({"llava7b_r16d32_ctx8192_b16", 32, 32, 32, 1024, 32, 64, f.first, f.second, std::vector<int>(16, 0),
                     std::vector<int>(16, 8192), 0.4f, true, 2});
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  std::string filter;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      quick = true;
    } else if (a == "--filter" && i + 1 < argc) {
      filter = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--filter SUBSTRING]\n", argv[0]);
      return 2;
    }
  }
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s, %d SMs, L2 %d MiB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreate(&stream));

  double copy_gbs = 0.0;
  void* flush = nullptr;
  size_t flush_bytes = 0;
  if (!quick) {
    copy_gbs = copy_bandwidth(stream);
    std::printf("device-to-device cudaMemcpyAsync, 1 GiB: %.0f GB/s (counted as 2 x bytes copied / time: read + write)\n",
                copy_gbs);
    flush_bytes = static_cast<size_t>(std::max(prop.l2CacheSize, 1 << 20)) * 2;
    CUDA_CHECK(cudaMalloc(&flush, flush_bytes));
  }

  int failures = 0, run_count = 0;
  uint64_t seed = 1;
  for (const Case& c : make_cases(quick)) {
    ++seed;
    const std::string label = c.name + " rope=" + kv_format_name(c.rope_format) + " latent=" + kv_format_name(c.latent_format);
    if (!filter.empty() && label.find(filter) == std::string::npos) continue;
    const HostCase h = make_host_case(c, seed);
    DeviceCase d(h);
    const int B = h.p.batch;
    std::vector<int> seqs;
    if (c.check_seqs >= B) {
      for (int b = 0; b < B; ++b) seqs.push_back(b);
    } else {
      for (int i = 0; i < c.check_seqs; ++i) seqs.push_back(i % 2 == 0 ? i / 2 : B - 1 - i / 2);
    }
    const bool all_f32 = c.rope_format == KvFormat::F32 && c.latent_format == KvFormat::F32;
    const double tol = all_f32 ? 1e-5 : 1e-2;
    for (const char* path : {"auto", "combine", "mma", "tc", "cc"}) {
      if (std::strcmp(path, "auto") == 0) {
        unsetenv("MLAFORGE_MLA_CUDA_PATH");
      } else {
        if (c.large && std::strcmp(path, "cc") == 0) continue;
        setenv("MLAFORGE_MLA_CUDA_PATH", path, 1);
      }
      const std::vector<float> out = d.run(stream);
      const double err = relative_error(h, out, seqs);
      const bool pass = err <= tol;
      failures += pass ? 0 : 1;
      ++run_count;
      std::printf("[%s] %-30s rope=%-4s latent=%-4s B=%-2d path=%-4s rel_err=%.2e (tol %.0e, %zu seqs)", pass ? "PASS" : "FAIL",
                  c.name.c_str(), kv_format_name(c.rope_format), kv_format_name(c.latent_format), B, path, err, tol, seqs.size());
      if (c.large) {
        const double us = time_kernel(d, stream, flush, flush_bytes);
        const double gbs = static_cast<double>(h.bytes_read) / (us * 1e-6) / 1e9;
        std::printf("  %8.1f us  read %7.1f MB  %6.0f GB/s  copy %5.0f GB/s  ratio %.2f", us, h.bytes_read / 1e6, gbs,
                    copy_gbs, gbs / copy_gbs);
#ifdef MLAFORGE_PROBE_TIMELINE
        std::printf("\n");
        mlaforge::mla_probe_timeline_dump(1024);
#endif
      }
      std::printf("\n");
      std::fflush(stdout);
    }
    unsetenv("MLAFORGE_MLA_CUDA_PATH");
  }
  if (flush != nullptr) CUDA_CHECK(cudaFree(flush));
  CUDA_CHECK(cudaStreamDestroy(stream));
  std::printf("%d of %d runs failed\n", failures, run_count);
  return failures == 0 ? 0 : 1;
}
