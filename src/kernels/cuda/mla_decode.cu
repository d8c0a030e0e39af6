// CUDA kernels of the absorbed MLA decode over the paged latent cache (kernels/mla_decode.h).
//
// Flash-decoding: grid (split, sequence[, head group]). One CTA takes every query head of its sequence over
// one chunk of the sequence's positions, so each cached token is read from memory once per CTA; it keeps
// per head a running max and sum and two latent accumulators (text, image), and writes them, normalised, to
// the workspace. A combine kernel merges the splits with the log-sum-exp rule. With one split the main
// kernel writes `out` itself and there is no combine; the row-pair kernels, launched cooperatively where the
// whole grid fits on the device at once, merge the splits themselves after a grid barrier
// (merge_splits_in_grid) and there is no combine either.
//
// Five main kernels, the first that applies:
//  - row-pair kernel (cache of the Qwen2.5-VL-7B shape at dr = dkv = 32: 128 rotary values and latent
//    128 per token, at most 32 heads, blocks of a power-of-two multiple of 64 tokens): see its own comment;
//    warpgroup MMA (wgmma) where built for sm_90a and run on a Hopper, else mma.sync (bf16 only). With wgmma
//    also Int8 rotary keys and an Int8/Int4 latent, dequantised per tile into bf16 in shared memory.
//  - MHA row-pair kernel (sm_90a; bf16 cache of 32 heads over 32 KV heads, 8 or 16 rotary values per head and
//    latent 256, e.g. llava-1.5-7b at --rope-pairs 4|8 --dkv 8): two warpgroups share each tile, see its comment.
//  - tensor-core kernel (BF16/Int8 rotary keys x BF16/Int8/Int4 latent, shapes that fit): 64-token tiles
//    are copied to shared memory with cp.async (a ring of stages), dequantised there into bf16, and both
//    products run on tensor cores (ldmatrix + mma.sync m16n8k16 bf16, fp32 accumulation):
//        S[Hpad x 64]  = Qrope_blockdiag[Hpad x KRpad] . Krope^T + Q_m[Hpad x R] . C^T   (m = modality of the
//                        token's column: Q_text.C^T and Q_image.C^T are both computed, except for a modality
//                        absent from a 16-token group)
//        O_m[Hpad x R] += P_m[Hpad x 64] . C[64 x R]   (P_m: P with the other modality's columns zeroed; skipped
//                        per 16-token group where P_m is all zero)
//    Hpad = heads rounded up to 16 (kHT row tiles); the rotary product only visits the column blocks of the KV
//    heads a row tile uses. Queries are rounded to bf16 here, so this kernel serves the bf16/quantised caches
//    (~2e-3 relative to float64); F32 caches go to the CUDA-core kernel.
//  - two-pass kernels (latents too wide for the tensor-core kernel's accumulators, e.g. llava-1.5-7b at the
//    default conversion: latent 1024): scores first, then the latent columns in groups of 128; bf16, and on a
//    Hopper also Int8 rotary keys and an Int8/Int4 latent, dequantised per chunk in shared memory; see their
//    comment.
//  - CUDA-core kernel (everything else, and every F32 cache): fp32 throughout, generic shapes.
//
// Scores are kept in log2 units (scale * log2(e) folded in) so that exp2f does the softmax.
#ifndef MLAFORGE_WITH_CUDA
#define MLAFORGE_WITH_CUDA
#endif
#include "kernels/mla_decode.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>  // CUtensorMap, PFN_cuTensorMapEncodeTiled (the driver entry point, no -lcuda)
#include <cooperative_groups.h>

#include <cuda/std/atomic>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

namespace mlaforge {

namespace {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 256;        // 8 warps per CTA, both main kernels
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;            // tokens per pipeline stage of the tensor-core kernel
constexpr int kCcTile = 32;          // tokens per step of the CUDA-core kernel (one per lane)
constexpr int kMinSplitTokens = 256; // a split shorter than this is not worth its partial result
constexpr int kMaxSplits = 256;
constexpr int kMaxStages = 4;
constexpr int kMaxSide = 4;          // register-staged scales per thread and array: <= 16 scales per token
constexpr int kCombineThreads = 128;
constexpr int kTwoCtaSmem = 113 * 1024;  // dynamic smem that still lets 2 CTAs share an H100 SM (228 KiB)
constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------------------
// Split of a sequence: every split of sequence b covers `split_chunk` positions (a multiple of the tile,
// at least kMinSplitTokens) from seq_begin; trailing splits of short sequences are empty. The combine kernel
// uses the same function to know how many splits hold tokens.
__host__ __device__ inline int split_chunk(int len, int num_splits) {
  int per = (len + num_splits - 1) / num_splits;
  if (per < kMinSplitTokens) per = kMinSplitTokens;
  return (per + kTile - 1) / kTile * kTile;
}

__device__ __forceinline__ float half_bits_to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

// Byte k of w as a signed int8.
__device__ __forceinline__ int sext_byte(uint32_t w, int k) { return static_cast<int>(w << (24 - 8 * k)) >> 24; }

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

// The 32-bit shared-memory address of a generic pointer into shared memory, as PTX's .shared operands take it.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async of `bytes` (16, 8 or 4; both addresses aligned to it). When !valid nothing is read and the
// destination is zero-filled (src-size 0), so tokens past the end of a chunk contribute exact zeros.
__device__ __forceinline__ void cp_async(void* smem_dst, const void* gmem_src, int bytes, bool valid) {
  const uint32_t dst = smem_addr(smem_dst);
  const size_t src = __cvta_generic_to_global(gmem_src);
  const int src_bytes = valid ? bytes : 0;
  if (bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
  } else if (bytes == 8) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
  }
}

// Transaction barriers and the tensor memory accelerator (sm_90): one thread starts a tile's copies, and the
// copies themselves count their bytes into the stage's mbarrier, which every thread waits on.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, unsigned arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals) : "memory");
}
// Makes the initialised barriers visible to the async proxy (the copies that complete on them).
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// The single arrival of this phase, announcing `bytes` of copies that complete it.
__device__ __forceinline__ void mbarrier_arrive_expect(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
// Waits for the phase of parity `parity` to complete (its copies' bytes are then visible to this thread).
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
#endif
}
// A 2-D box of a tensor map (box origin: element x of row y) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int x, int y, uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(smem_addr(bar))
      : "memory");
#endif
}
// `bytes` (a multiple of 16; both addresses 16-byte aligned) from global to shared memory, completing on `bar`.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, unsigned bytes, uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(smem_addr(dst)),
      "l"(__cvta_generic_to_global(src)), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `pending` (0 .. 4) of this thread's cp.async groups are in flight.
__device__ __forceinline__ void cp_async_wait(int pending) {
  if (pending <= 0) {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  } else if (pending == 1) {
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
  } else if (pending == 2) {
    asm volatile("cp.async.wait_group 2;\n" ::: "memory");
  } else if (pending == 3) {
    asm volatile("cp.async.wait_group 3;\n" ::: "memory");
  } else {
    asm volatile("cp.async.wait_group 4;\n" ::: "memory");
  }
}

// Tensor-core fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), with
// g = lane / 4, q = lane % 4:
//   A (16x16, row-major) a[0..3]: (g, 2q..2q+1), (g+8, 2q..), (g, 2q+8..), (g+8, 2q+8..)
//   B (16x8) b0, b1: (k = 2q..2q+1, n = g), (k = 2q+8.., n = g)
//   C/D (16x8 f32) c[0..3]: (g, 2q), (g, 2q+1), (g+8, 2q), (g+8, 2q+1)
// ldmatrix .x4 loads four 8x8 bf16 matrices; lanes 8j..8j+7 give the row addresses of matrix j, and register j
// receives matrix j's elements (row g, columns 2q, 2q+1), or with .trans (rows 2q, 2q+1, column g).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr) {
  const uint32_t addr = smem_addr(row_ptr);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_ptr) {
  const uint32_t addr = smem_addr(row_ptr);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a . b for one 16x8x16 block.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Programmatic dependent launch (sm_90): a main kernel lets the combine kernel launch while it runs (the
// combine's CTAs take the SMs main CTAs leave), and the combine waits for the main kernel's completion and
// memory before it reads the workspace. Elsewhere (and without the launch attribute) both are no-ops.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_prerequisite_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

#ifdef MLAFORGE_PROBE_TIMELINE
// Diagnostic build only: per-CTA global-timer stamps at the MHA row-pair kernel's phases (thread 0 of each CTA).
__device__ unsigned long long g_probe[1024][8];
__device__ __forceinline__ void probe_stamp(int k) {
  if (threadIdx.x == 0) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    g_probe[blockIdx.y * gridDim.x + blockIdx.x][k] = t;
  }
}
#define MLAFORGE_PROBE(k) probe_stamp(k)
#else
#define MLAFORGE_PROBE(k)
#endif

// Max of v[0..7] over the 8 lanes 8k..8k+7 that share a softmax row (all 32 lanes take part).
__device__ __forceinline__ float max_over_8_lanes(const float (&v)[8]) {
  float mx = v[0];
#pragma unroll
  for (int e = 1; e < 8; ++e) mx = fmaxf(mx, v[e]);
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  return fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
}

// Pool row (block * block_size + slot) of position `pos` of the sequence whose block-table row is `table`.
__device__ __forceinline__ int64_t pool_row(const int32_t* table, int block_size, int pos) {
  return static_cast<int64_t>(table[pos / block_size]) * block_size + pos % block_size;
}

// Where a split's results go: normalised accumulators [heads, 2, R] and (max, sum) per head.
struct SplitOutput {
  float* acc;  // out + b*heads*2R when there is one split, else the workspace row of (b, split)
  float2* ml;  // one split: p.lse + b*heads (nullptr when the caller wants no log-sum-exp); else the workspace's
};

// The splits of one launch and their workspace (every main kernel's arguments hold one).
struct Splits {
  int num_splits = 1;
  float* part_acc = nullptr;  // [batch, splits, heads, 2, R]
  float2* part_ml = nullptr;  // [batch, splits, heads]: (running max in log2 units, sum of exponentials)
};

__device__ __forceinline__ SplitOutput split_output(const MlaDecodeParams& p, const Splits& sp, int b, int split) {
  const int64_t row_floats = static_cast<int64_t>(p.heads) * 2 * p.latent_dim;
  if (sp.num_splits == 1)
    return {p.out + b * row_floats, p.lse == nullptr ? nullptr : reinterpret_cast<float2*>(p.lse) + static_cast<int64_t>(b) * p.heads};
  const int64_t slot = static_cast<int64_t>(b) * sp.num_splits + split;
  return {sp.part_acc + slot * row_floats, sp.part_ml + slot * p.heads};
}

// What a split with no tokens writes for heads [h0, h0 + heads): a weight of zero for the merge, or zeros when
// this CTA writes `out` (and lse) itself (one split: an empty sequence still defines them). Threads [0, threads)
// of the CTA share the work.
__device__ __forceinline__ void write_empty_split(const SplitOutput& dst, const Splits& sp, int heads, int R, int tid,
                                                  int threads, int h0 = 0) {
  if (sp.num_splits == 1)
    for (int i = tid; i < heads * 2 * R; i += threads) dst.acc[h0 * 2 * R + i] = 0.f;
  if (dst.ml != nullptr)
    for (int h = tid; h < heads; h += threads) dst.ml[h0 + h] = make_float2(-INFINITY, 0.f);
}

// Positions [c0, c1) of sequence b that split `split` covers: split_chunk positions each from the sequence's
// begin (c0 >= c1: an empty split).
struct SplitSpan {
  int seq_begin, seq_end, c0, c1;
};
__device__ __forceinline__ SplitSpan split_span(const MlaDecodeParams& p, int num_splits, int b, int split) {
  SplitSpan s;
  s.seq_begin = p.seq_begin[b];
  s.seq_end = p.seq_end[b];
  const int chunk = split_chunk(s.seq_end - s.seq_begin, num_splits);
  s.c0 = s.seq_begin + split * chunk;
  s.c1 = min(s.seq_end, s.c0 + chunk);
  return s;
}

// A split's weight in the merge of splits: sum * 2^(max - mx) for its (max, sum) against the merged max mx, 0 for an
// empty split (max -inf).
__device__ __forceinline__ float split_weight(float2 m_l, float mx) {
  return m_l.x == -INFINITY ? 0.f : m_l.y * exp2f(m_l.x - mx);
}
// acc += w * v, with v selected away (never multiplied) where w is 0: an empty split's accumulators may be anything.
__device__ __forceinline__ void add_weighted(float4& acc, float w, const float4& v) {
  acc.x += w != 0.f ? w * v.x : 0.f;
  acc.y += w != 0.f ? w * v.y : 0.f;
  acc.z += w != 0.f ? w * v.z : 0.f;
  acc.w += w != 0.f ? w * v.w : 0.f;
}

// Shared memory merge_splits_in_grid uses (the ring's, free by then): the weights of the CTA's rows' splits,
// each row's 1/total, and one float4 per thread for the split-group partial sums. At most 2*heads + splits
// weights (rows of a CTA: ceil((2*heads - split) / splits)).
constexpr int merge_rows_per_cta(int heads, int splits) { return (2 * heads + splits - 1) / splits; }
// float4s of the weights and 1/totals of `rows` rows: where the per-thread partial sums start.
__host__ __device__ constexpr int merge_weight_float4s(int rows, int splits) { return (rows * splits + rows + 3) / 4; }
inline int merge_smem_bytes(int heads, int splits, int threads) {
  return merge_weight_float4s(merge_rows_per_cta(heads, splits), splits) * 16 + threads * 16;
}

// merge_splits_in_grid where a sequence has at most kMergeBurst splits (the batch-16 calls): a thread per (row,
// float4 column), two at a time, loads every split's (max, sum) of its rows and every split's values at once (one
// L2 round trip, ~100 registers), and finds the max, the weights and the total itself (the 64 threads of a row
// repeat that arithmetic rather than wait for shared memory).
constexpr int kMergeBurst = 8;
template <int kR>
__device__ __forceinline__ void merge_few_splits(const MlaDecodeParams& p, const Splits& sp, int heads, int b, int split, int rows,
                                                 int tid, int threads) {
  constexpr int kVec = kR / 4;
  const int splits = sp.num_splits;
  const int64_t slot0 = static_cast<int64_t>(b) * splits;
  const int64_t split_stride = static_cast<int64_t>(heads) * 2 * kR;
  const float2* ml = sp.part_ml + slot0 * heads;  // [splits][heads]
  float* out_b = p.out + static_cast<int64_t>(b) * heads * 2 * kR;
  const int items = rows * kVec;
  for (int i0 = tid; i0 < items; i0 += 2 * threads) {
    int row[2], c4[2];
    bool live[2];
    float2 m_l[2][kMergeBurst];
    float4 v[2][kMergeBurst];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int i = i0 + u * threads;
      live[u] = i < items;
      row[u] = split + splits * (live[u] ? i / kVec : 0);
      c4[u] = i % kVec;
      const float4* x = reinterpret_cast<const float4*>(sp.part_acc + slot0 * split_stride + static_cast<int64_t>(row[u]) * kR) + c4[u];
#pragma unroll
      for (int s = 0; s < kMergeBurst; ++s) {
        const bool ok = live[u] && s < splits;
        m_l[u][s] = ok ? __ldcg(ml + s * heads + (row[u] >> 1)) : make_float2(-INFINITY, 0.f);
        v[u][s] = ok ? __ldcg(x + s * (split_stride / 4)) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (!live[u]) continue;
      float mx = -INFINITY;
#pragma unroll
      for (int s = 0; s < kMergeBurst; ++s) mx = fmaxf(mx, m_l[u][s].x);
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
      float total = 0.f;
#pragma unroll
      for (int s = 0; s < kMergeBurst; ++s) {
        const float w = split_weight(m_l[u][s], mx);
        total += w;
        add_weighted(acc, w, v[u][s]);
      }
      const float f = total > 0.f ? 1.f / total : 0.f;
      reinterpret_cast<float4*>(out_b + static_cast<int64_t>(row[u]) * kR)[c4[u]] =
          make_float4(acc.x * f, acc.y * f, acc.z * f, acc.w * f);
      if (p.lse != nullptr && (row[u] & 1) == 0 && c4[u] == 0)
        reinterpret_cast<float2*>(p.lse)[static_cast<int64_t>(b) * heads + (row[u] >> 1)] = make_float2(mx, total);
    }
  }
}

// The combine's merge inside a main kernel launched cooperatively (every CTA resident at once): after a grid-wide
// barrier (all partial results written), the CTA of split `split` of sequence b merges rows split, split +
// splits, ... of b's [heads, 2, kR] output from the partial results, as mla_combine_kernel does (every split
// written: empty ones hold (-inf, 0)), and for even rows the log-sum-exp. `smem` is the kernel's shared memory
// (merge_smem_bytes of it), free once the CTA is past its main loop. All threads of every CTA call it.
//
// Latency is what it costs (a few MB at most, read from L2), so it is laid out for few dependent L2 round trips.
// With at most kMergeBurst splits (batch 16) merge_few_splits takes one. With more (batch 1: up to 128 splits):
//  1. every thread loads at most a couple of the CTA's rows' (max, sum) pairs into shared memory, all at once;
//  2. a warp per row turns them into weights w_s = sum_s * 2^(max_s - max) and 1/total, in shared memory;
//  3. a thread per (row, float4 column, group of splits) issues its splits' value loads 8 at a time; where the
//     CTA has fewer (row, column) items than threads (batch 1: 128 splits, one row per CTA) the splits are
//     divided among groups of threads summed through shared memory (32K x 1: 21-22 us a call, 30 before).
// Each split's rows were written by another CTA: __ldcg reads them from L2, never a stale L1 line. A split of
// weight 0 (empty, or its max -inf) is loaded but selected away, never multiplied (its accumulators may be
// anything).
template <int kR>
__device__ __noinline__ void merge_splits_in_grid(const MlaDecodeParams& p, const Splits& sp, int heads, int b, int split, int tid,
                                                  int threads, unsigned char* smem) {
  cooperative_groups::this_grid().sync();  // orders every CTA's partial results before the reads below
  MLAFORGE_PROBE(5);
  constexpr int kVec = kR / 4;             // float4 per row
  const int splits = sp.num_splits;
  const int rows = split < 2 * heads ? (2 * heads - split + splits - 1) / splits : 0;  // this CTA's rows
  if (rows == 0) return;                                                               // uniform over the CTA
  const int64_t slot0 = static_cast<int64_t>(b) * splits;
  const int64_t split_stride = static_cast<int64_t>(heads) * 2 * kR;  // floats between two splits' rows
  if (splits <= kMergeBurst) {
    merge_few_splits<kR>(p, sp, heads, b, split, rows, tid, threads);
    return;
  }
  float* weight = reinterpret_cast<float*>(smem);                     // [rows][splits], then [rows] 1/total
  float* inv_total = weight + rows * splits;
  float4* partial = reinterpret_cast<float4*>(smem) + merge_weight_float4s(rows, splits);  // [threads]
  const float2* ml = sp.part_ml + slot0 * heads;                                      // [splits][heads]

  // 1. (max, sum) of row k's head in split s -> staged[k * splits + s] (in `partial`'s space).
  float2* staged = reinterpret_cast<float2*>(partial);  // [rows * splits] <= threads * 2 float2
  for (int i = tid; i < rows * splits; i += threads) {
    const int k = i / splits, s = i % splits, h = (split + splits * k) >> 1;
    staged[i] = __ldcg(ml + static_cast<int64_t>(s) * heads + h);
  }
  __syncthreads();
  // 2. A warp per row: the max over splits, the weights, 1/total; the log-sum-exp for even rows.
  const int warp = tid >> 5, lane = tid & 31;
  for (int k = warp; k < rows; k += threads / 32) {
    float mx = -INFINITY;
    for (int s = lane; s < splits; s += 32) mx = fmaxf(mx, staged[k * splits + s].x);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float total = 0.f;
    for (int s = lane; s < splits; s += 32) {
      const float w = split_weight(staged[k * splits + s], mx);
      weight[k * splits + s] = w;
      total += w;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
    if (lane == 0) {
      inv_total[k] = total > 0.f ? 1.f / total : 0.f;
      const int row = split + splits * k;
      if (p.lse != nullptr && (row & 1) == 0)
        reinterpret_cast<float2*>(p.lse)[static_cast<int64_t>(b) * heads + (row >> 1)] = make_float2(mx, total);
    }
  }
  __syncthreads();  // weights ready; `staged` (in `partial`) is free again

  // 3. The weighted sums. groups: split groups per (row, column) item, a power of two, each >= kMergeBurst splits.
  const int items = rows * kVec;
  int groups = 1;
  while (2 * groups * items <= threads && 2 * groups * kMergeBurst <= splits) groups *= 2;
  const int per_group = (splits + groups - 1) / groups;
  float* out_b = p.out + static_cast<int64_t>(b) * heads * 2 * kR;
  for (int i = tid; i < items * groups; i += threads) {  // one pass when groups > 1
    const int item = i % items, grp = i / items, k = item / kVec, c4 = item % kVec;
    const int row = split + splits * k;
    const float4* x = reinterpret_cast<const float4*>(sp.part_acc + slot0 * split_stride + static_cast<int64_t>(row) * kR) + c4;
    const float* w_row = weight + k * splits;
    const int s_end = min(splits, (grp + 1) * per_group);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = grp * per_group; s0 < s_end; s0 += kMergeBurst) {
      float4 v[kMergeBurst];
#pragma unroll
      for (int j = 0; j < kMergeBurst; ++j)
        v[j] = s0 + j < s_end ? __ldcg(x + (s0 + j) * (split_stride / 4)) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int j = 0; j < kMergeBurst; ++j) {
        add_weighted(acc, s0 + j < s_end ? w_row[s0 + j] : 0.f, v[j]);
      }
    }
    if (groups == 1) {
      const float f = inv_total[k];
      reinterpret_cast<float4*>(out_b + static_cast<int64_t>(row) * kR)[c4] = make_float4(acc.x * f, acc.y * f, acc.z * f, acc.w * f);
    } else {
      partial[i] = acc;
    }
  }
  if (groups == 1) return;
  __syncthreads();
  for (int item = tid; item < items; item += threads) {
    const int k = item / kVec, c4 = item % kVec, row = split + splits * k;
    float4 acc = partial[item];
    for (int grp = 1; grp < groups; ++grp) {
      const float4 v = partial[grp * items + item];
      acc.x += v.x, acc.y += v.y, acc.z += v.z, acc.w += v.w;
    }
    const float f = inv_total[k];
    reinterpret_cast<float4*>(out_b + static_cast<int64_t>(row) * kR)[c4] = make_float4(acc.x * f, acc.y * f, acc.z * f, acc.w * f);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tensor-core kernel.

struct TcArgs {
  MlaDecodeParams p;
  Splits sp;
  float score_scale;  // p.scale * log2(e)
  int stages;         // cp.async ring depth, 2..kMaxStages
  int smem_bytes;     // multiple of 16
  int kr;             // kv_heads * rope_dim: rotary values per token
  int ldr;            // smem row stride (bf16) of Q rope and K rope operands: roundup(kr, 16) + 8
  int ldl;            // smem row stride (bf16) of Q latent and latent operands: R + 8
  int lds;            // smem row stride (fp32) of the score tile: kTile + 4
  int ng;             // latent scales per token (Int8/Int4)
  int rope_row_bytes, lat_row_bytes;  // one token's stored row in the pool
  int rope_st_ld, lat_st_ld;          // smem row stride (bytes) of the copied rows in a stage
  int rope_granule, lat_granule;      // cp.async size for each (16, 8 or 4)
  // Shared-memory carve-up (byte offsets, 128-aligned).
  int off_q_rope;   // bf16 [Hpad][ldr]: block-diagonal rotary queries (head h in the columns of its KV head)
  int off_q_lat;    // bf16 [2][Hpad][ldl]: absorbed queries, text then image
  int off_stage;    // stages x stage_bytes
  int stage_bytes;
  int st_rope;      // in a stage: BF16 -> bf16 [kTile][ldr] (the operand itself); Int8 -> int8 [kTile][kr]
  int st_lat;       // BF16 -> bf16 [kTile][ldl]; Int8 -> int8 [kTile][R]; Int4 -> uint8 [kTile][R/2]
  int st_img;       // uint8 [kTile]
  int st_lsc;       // fp16 bits [kTile][ng]
  int st_rsc;       // fp16 bits [kTile][kv_heads]
  int off_rope_op;  // bf16 [kTile][ldr], dequantised rotary keys (Int8 only)
  int off_lat_op;   // bf16 [kTile][ldl], dequantised latent (Int8/Int4 only)
  int off_s;        // fp32 [Hpad][lds] scores; reused in place as bf16 P_text/P_img [Hpad][2*lds]
  int off_alpha;    // fp32 [Hpad]: this tile's rescale factor of each row
  int off_m, off_l; // fp32 [Hpad]: final row max and sum
};

// Scales and modality bits of one token, loaded into registers when its tile's copy is issued and written to
// the stage at the end of the iteration (these rows are 1-32 bytes, too narrow for cp.async).
struct SideRegs {
  uint32_t img;
  uint16_t lsc[kMaxSide];
  uint16_t rsc[kMaxSide];
};

// Two CTAs per SM (<= 128 registers) where the output accumulators are at most 4 fragments per warp.
template <KvFormat RF, KvFormat LF, int kHT, int kCTW>
__global__ void __launch_bounds__(kThreads, kHT * kCTW <= 2 ? 2 : 1) mla_decode_tc_kernel(const __grid_constant__ TcArgs a) {
  constexpr int kHpad = kHT * 16;                 // query heads padded to whole 16-row tiles
  constexpr int kScoreUnits = (kHT + 1) / 2;      // score row tiles per warp (warps 0-3 even, 4-7 odd tiles)
  constexpr int kRowsPerThread = (kHpad + 31) / 32;  // softmax rows per 8-lane group
  constexpr bool kRopeQuant = RF != KvFormat::BF16;
  constexpr bool kLatQuant = LF != KvFormat::BF16;
  static_assert(RF == KvFormat::BF16 || RF == KvFormat::Int8, "rotary keys: BF16 or Int8");
  static_assert(LF == KvFormat::BF16 || LF == KvFormat::Int8 || LF == KvFormat::Int4, "latent: BF16/Int8/Int4");

  extern __shared__ __align__(1024) unsigned char smem[];
  const MlaDecodeParams& p = a.p;
  allow_dependent_launch();
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, q4 = lane & 3;  // fragment row group and column pair (see mma_bf16_16816)
  const int split = blockIdx.x, b = blockIdx.y;
  const int H = p.heads, R = p.latent_dim, kv = p.kv_heads, bs = p.block_size;
  const int ldr = a.ldr, ldl = a.ldl, lds = a.lds;
  // ldmatrix row addresses of this lane: A tiles [16 rows][16 k] (row-major), B tiles stored [n][k] (score:
  // tokens x features) and B tiles stored [k][n] (accumulation: tokens x latent columns, loaded transposed).
  const int a_row = lane & 15, a_col = (lane >> 4) * 8;
  const int bn_row = ((lane >> 4) << 3) + (lane & 7), bn_col = ((lane >> 3) & 1) * 8;
  const int bk_row = (((lane >> 3) & 1) << 3) + (lane & 7), bk_col = (lane >> 4) * 8;
  const int lat_tiles = R / 16;

  const SplitSpan span = split_span(p, a.sp.num_splits, b, split);
  const int c0 = span.c0, c1 = span.c1;
  const SplitOutput dst = split_output(p, a.sp, b, split);
  if (c0 >= c1) {
    write_empty_split(dst, a.sp, H, R, tid, kThreads);
    return;
  }
  const int num_tiles = (c1 - c0 + kTile - 1) / kTile;
  const int32_t* table = p.block_table + static_cast<int64_t>(b) * p.max_blocks;

  bf16* q_rope_s = reinterpret_cast<bf16*>(smem + a.off_q_rope);
  bf16* q_lat_s = reinterpret_cast<bf16*>(smem + a.off_q_lat);
  float* s_buf = reinterpret_cast<float*>(smem + a.off_s);
  bf16* p_buf = reinterpret_cast<bf16*>(smem + a.off_s);  // P_text(h, t) = p_buf[h*ldp + t], P_img at +kTile
  const int ldp = 2 * lds;
  float* alpha_s = reinterpret_cast<float*>(smem + a.off_alpha);

  // Everything starts at zero: the pad columns of the rotary operands (kr..roundup(kr,16)), the pad query rows
  // (heads..Hpad) and the off-diagonal blocks of the rotary queries are read by the MMAs and must be finite.
  {
    uint4* s4 = reinterpret_cast<uint4*>(smem);
    for (int i = tid; i < a.smem_bytes / 16; i += kThreads) s4[i] = make_uint4(0u, 0u, 0u, 0u);
  }
  __syncthreads();

  // Copy plan: 4 threads per token (kTile * 4 == kThreads); thread `part` copies chunks part, part+4, ...
  const int tok = tid >> 2, part = tid & 3;
  static_assert(kTile * 4 == kThreads, "4 threads per token");
  auto stage_ptr = [&](int tile) { return smem + a.off_stage + (tile % a.stages) * a.stage_bytes; };
  auto issue_copies = [&](int tile, int64_t row, bool valid) {
    unsigned char* st = stage_ptr(tile);
    {
      const unsigned char* src = static_cast<const unsigned char*>(p.k_rope) + row * a.rope_row_bytes;
      unsigned char* d = st + a.st_rope + tok * a.rope_st_ld;
      const int gran = a.rope_granule;
      for (int c = part * gran; c < a.rope_row_bytes; c += 4 * gran) cp_async(d + c, src + c, gran, valid);
    }
    {
      const unsigned char* src = static_cast<const unsigned char*>(p.latent) + row * a.lat_row_bytes;
      unsigned char* d = st + a.st_lat + tok * a.lat_st_ld;
      const int gran = a.lat_granule;
      for (int c = part * gran; c < a.lat_row_bytes; c += 4 * gran) cp_async(d + c, src + c, gran, valid);
    }
  };
  auto load_side = [&](int64_t row, bool valid, SideRegs& s) {
    s.img = (valid && part == 0) ? static_cast<uint32_t>(p.is_image[row]) : 0u;
    if constexpr (kLatQuant) {
#pragma unroll
      for (int k = 0; k < kMaxSide; ++k) {
        const int e = part + 4 * k;
        s.lsc[k] = (valid && e < a.ng) ? p.latent_scale[row * a.ng + e] : static_cast<uint16_t>(0);
      }
    }
    if constexpr (kRopeQuant) {
#pragma unroll
      for (int k = 0; k < kMaxSide; ++k) {
        const int e = part + 4 * k;
        s.rsc[k] = (valid && e < kv) ? p.k_rope_scale[row * kv + e] : static_cast<uint16_t>(0);
      }
    }
  };
  auto store_side = [&](int tile, const SideRegs& s) {
    unsigned char* st = stage_ptr(tile);
    if (part == 0) st[a.st_img + tok] = s.img != 0u ? 1 : 0;
    if constexpr (kLatQuant) {
      uint16_t* lsc = reinterpret_cast<uint16_t*>(st + a.st_lsc) + tok * a.ng;
#pragma unroll
      for (int k = 0; k < kMaxSide; ++k)
        if (part + 4 * k < a.ng) lsc[part + 4 * k] = s.lsc[k];
    }
    if constexpr (kRopeQuant) {
      uint16_t* rsc = reinterpret_cast<uint16_t*>(st + a.st_rsc) + tok * kv;
#pragma unroll
      for (int k = 0; k < kMaxSide; ++k)
        if (part + 4 * k < kv) rsc[part + 4 * k] = s.rsc[k];
    }
  };

  // Prologue: tiles 0 .. stages-2 in flight, one commit group per tile (empty groups keep the count uniform).
  for (int tile = 0; tile < a.stages - 1; ++tile) {
    if (tile < num_tiles) {
      const int pos = c0 + tile * kTile + tok;
      const bool valid = pos < c1;
      const int64_t row = valid ? pool_row(table, bs, pos) : 0;
      issue_copies(tile, row, valid);
      SideRegs side;
      load_side(row, valid, side);
      store_side(tile, side);
    }
    cp_async_commit();
  }
  // Block id of this thread's token in the next tile to fetch, loaded one iteration ahead of its use.
  int next_block = 0;
  {
    const int pos = c0 + (a.stages - 1) * kTile + tok;
    if (a.stages - 1 < num_tiles && pos < c1) next_block = table[pos / bs];
  }

  // Queries to bf16 while the first tiles land.
  {
    const int group = H / kv;
    const float* qr = p.q_rope + static_cast<int64_t>(b) * H * p.rope_dim;
    for (int i = tid; i < H * p.rope_dim; i += kThreads) {
      const int h = i / p.rope_dim, k = i - h * p.rope_dim;
      q_rope_s[h * ldr + (h / group) * p.rope_dim + k] = __float2bfloat16_rn(qr[i]);
    }
    const float* ql = p.q_latent + static_cast<int64_t>(b) * H * 2 * R;
    for (int i = tid; i < H * 2 * R; i += kThreads) {
      const int h = i / (2 * R), rem = i - h * 2 * R, m = rem / R, r = rem - m * R;
      q_lat_s[(m * kHpad + h) * ldl + r] = __float2bfloat16_rn(ql[i]);
    }
  }
  // Rotary k-steps of each score row tile: only the column blocks of the KV heads its query heads use.
  int rope_k_lo[kScoreUnits], rope_k_hi[kScoreUnits];
#pragma unroll
  for (int u = 0; u < kScoreUnits; ++u) {
    const int rt = (warp >> 2) + 2 * u;
    const int h_lo = rt * 16, h_hi = min(rt * 16 + 15, H - 1);
    if (h_lo < H) {
      const int group = H / kv;
      rope_k_lo[u] = (h_lo / group) * p.rope_dim / 16;
      rope_k_hi[u] = ((h_hi / group + 1) * p.rope_dim - 1) / 16;
    } else {
      rope_k_lo[u] = 0;
      rope_k_hi[u] = -1;
    }
  }

  // O_m for row tile rt and latent columns 16*ct + 8*nb .. +7, ct = warp + 8*cw, in the C fragment layout.
  float acc_o[kCTW][kHT][2][2][4];
#pragma unroll
  for (int cw = 0; cw < kCTW; ++cw)
#pragma unroll
    for (int rt = 0; rt < kHT; ++rt)
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int nb = 0; nb < 2; ++nb)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc_o[cw][rt][m][nb][i] = 0.f;
  float m_run[kRowsPerThread], l_run[kRowsPerThread];
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    m_run[q] = -INFINITY;
    l_run[q] = 0.f;
  }

  for (int tile = 0; tile < num_tiles; ++tile) {
    cp_async_wait(a.stages - 2);  // this thread's copies of `tile` are done
    __syncthreads();              // ... and everyone's; everyone is also done with tile-1's buffers

    // Refill the stage that tile-1 used with tile + stages - 1.
    const int fetch = tile + a.stages - 1;
    SideRegs side_next;
    const bool fetching = fetch < num_tiles;
    if (fetching) {
      const int pos = c0 + fetch * kTile + tok;
      const bool valid = pos < c1;
      const int64_t row = valid ? static_cast<int64_t>(next_block) * bs + pos % bs : 0;
      issue_copies(fetch, row, valid);
      load_side(row, valid, side_next);
      const int pos_next = pos + kTile;
      if (fetch + 1 < num_tiles && pos_next < c1) next_block = table[pos_next / bs];
    }
    cp_async_commit();

    const unsigned char* st = stage_ptr(tile);
    const unsigned char* img_s = st + a.st_img;
    const int n_valid = min(kTile, c1 - (c0 + tile * kTile));

    // Dequantise into the bf16 operands (BF16 tiles are used in place): warp w takes token rows w, w+8, ...,
    // lane l the 4 columns 4l.. (+128); pairs of values share a scale (rope_dim and latent_group are even),
    // and a column's scale index is computed once for all its rows.
    const bf16* rope_op;
    const bf16* lat_op;
    if constexpr (kRopeQuant) {
      const int8_t* raw = reinterpret_cast<const int8_t*>(st + a.st_rope);      // [kTile][kr], kr % 4 == 0
      const uint16_t* rsc = reinterpret_cast<const uint16_t*>(st + a.st_rsc);   // [kTile][kv]
      bf16* out = reinterpret_cast<bf16*>(smem + a.off_rope_op);
      for (int c = lane * 4; c < a.kr; c += 128) {
        const int head0 = c / p.rope_dim, head1 = (c + 2) / p.rope_dim;
        for (int t = warp; t < kTile; t += kWarps) {
          const uint32_t w = *reinterpret_cast<const uint32_t*>(raw + t * a.kr + c);
          const float s0 = half_bits_to_float(rsc[t * kv + head0]), s1 = half_bits_to_float(rsc[t * kv + head1]);
          *reinterpret_cast<uint2*>(out + t * ldr + c) =
              make_uint2(pack_bf16x2(sext_byte(w, 0) * s0, sext_byte(w, 1) * s0),
                         pack_bf16x2(sext_byte(w, 2) * s1, sext_byte(w, 3) * s1));
        }
      }
      rope_op = out;
    } else {
      rope_op = reinterpret_cast<const bf16*>(st + a.st_rope);
    }
    if constexpr (kLatQuant) {
      const unsigned char* raw = st + a.st_lat;                                 // [kTile][lat_row_bytes]
      const uint16_t* lsc = reinterpret_cast<const uint16_t*>(st + a.st_lsc);   // [kTile][ng]
      bf16* out = reinterpret_cast<bf16*>(smem + a.off_lat_op);
      for (int c = lane * 4; c < R; c += 128) {
        const int grp0 = c / p.latent_group, grp1 = (c + 2) / p.latent_group;
        for (int t = warp; t < kTile; t += kWarps) {
          int q[4];
          if constexpr (LF == KvFormat::Int8) {
            const uint32_t w = *reinterpret_cast<const uint32_t*>(raw + t * R + c);
#pragma unroll
            for (int e = 0; e < 4; ++e) q[e] = sext_byte(w, e);
          } else {
            // Element 2i in the low nibble of byte i: element e of the 16-bit word sits at bits 4e..4e+3.
            const uint32_t w = *reinterpret_cast<const uint16_t*>(raw + t * (R / 2) + c / 2);
#pragma unroll
            for (int e = 0; e < 4; ++e) q[e] = static_cast<int>((w >> (4 * e)) & 15u) - 8;
          }
          const float s0 = half_bits_to_float(lsc[t * a.ng + grp0]), s1 = half_bits_to_float(lsc[t * a.ng + grp1]);
          *reinterpret_cast<uint2*>(out + t * ldl + c) =
              make_uint2(pack_bf16x2(q[0] * s0, q[1] * s0), pack_bf16x2(q[2] * s1, q[3] * s1));
        }
      }
      lat_op = out;
    } else {
      lat_op = reinterpret_cast<const bf16*>(st + a.st_lat);
    }
    if constexpr (kRopeQuant || kLatQuant) __syncthreads();

    // Scores. Warp w: token tile w&3, row tiles (w>>2) + 2u. Rotary part first, then the accumulator is copied
    // so that the text and image latent products both start from it; each element then keeps the product of
    // its token's modality. A modality absent from the warp's 16 tokens is skipped (images come in long runs).
    {
      const int tt = warp & 3;
      const int my_t = tt * 16 + (lane & 15);
      const unsigned present = __ballot_sync(
          0xffffffffu, my_t < n_valid && (lane < 16 ? img_s[my_t] == 0 : img_s[my_t] != 0));
      const bool any_text = (present & 0xffffu) != 0u, any_image = (present >> 16) != 0u;
#pragma unroll
      for (int u = 0; u < kScoreUnits; ++u) {
        const int rt = (warp >> 2) + 2 * u;
        if (rt >= kHT) break;
        // [n-block of 8 tokens][C fragment]
        float acc_t[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll 1
        for (int k = rope_k_lo[u]; k <= rope_k_hi[u]; ++k) {
          uint32_t qa[4], kb[4];
          ldmatrix_x4(qa, q_rope_s + (rt * 16 + a_row) * ldr + k * 16 + a_col);
          ldmatrix_x4(kb, rope_op + (tt * 16 + bn_row) * ldr + k * 16 + bn_col);
          mma_bf16_16816(acc_t[0], qa, kb[0], kb[1]);
          mma_bf16_16816(acc_t[1], qa, kb[2], kb[3]);
        }
        float acc_i[2][4];
#pragma unroll
        for (int nb = 0; nb < 2; ++nb)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc_i[nb][i] = acc_t[nb][i];
        if (rt * 16 < H) {
#pragma unroll 2
          for (int k = 0; k < lat_tiles; ++k) {
            uint32_t cb[4], qa[4];
            ldmatrix_x4(cb, lat_op + (tt * 16 + bn_row) * ldl + k * 16 + bn_col);
            if (any_text) {
              ldmatrix_x4(qa, q_lat_s + (rt * 16 + a_row) * ldl + k * 16 + a_col);
              mma_bf16_16816(acc_t[0], qa, cb[0], cb[1]);
              mma_bf16_16816(acc_t[1], qa, cb[2], cb[3]);
            }
            if (any_image) {
              ldmatrix_x4(qa, q_lat_s + (kHpad + rt * 16 + a_row) * ldl + k * 16 + a_col);
              mma_bf16_16816(acc_i[0], qa, cb[0], cb[1]);
              mma_bf16_16816(acc_i[1], qa, cb[2], cb[3]);
            }
          }
        }
#pragma unroll
        for (int nb = 0; nb < 2; ++nb)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int h = rt * 16 + g + 8 * half, t = tt * 16 + nb * 8 + 2 * q4;
            const float v0 = img_s[t] ? acc_i[nb][2 * half] : acc_t[nb][2 * half];
            const float v1 = img_s[t + 1] ? acc_i[nb][2 * half + 1] : acc_t[nb][2 * half + 1];
            *reinterpret_cast<float2*>(s_buf + h * lds + t) =
                make_float2(t < n_valid ? v0 * a.score_scale : -INFINITY, t + 1 < n_valid ? v1 * a.score_scale : -INFINITY);
          }
      }
    }
    __syncthreads();

    // Online softmax, 8 lanes per row, 8 tokens per lane. Every tile has a valid first token, so the new max is
    // finite and exp2f(-inf - m) = 0 covers both the first tile (m_run = -inf) and masked tokens.
    {
      const int j = tid & 7;
#pragma unroll
      for (int q = 0; q < kRowsPerThread; ++q) {
        const int h = (tid >> 3) + 32 * q;
        if (h < kHpad) {  // uniform per warp: a warp holds rows 4w..4w+3 (+32q)
          const float4 v0 = *reinterpret_cast<const float4*>(s_buf + h * lds + j * 8);
          const float4 v1 = *reinterpret_cast<const float4*>(s_buf + h * lds + j * 8 + 4);
          const float v[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
          const float mx = max_over_8_lanes(v);
          const float m_new = fmaxf(m_run[q], mx);
          const float alpha = exp2f(m_run[q] - m_new);
          const uint2 img8 = *reinterpret_cast<const uint2*>(img_s + j * 8);
          float sum = 0.f;
          uint32_t pt[4], pi[4];
#pragma unroll
          for (int e = 0; e < 8; e += 2) {
            // Round first so the normaliser sums exactly the weights the MMA uses.
            const float p0 = __bfloat162float(__float2bfloat16_rn(exp2f(v[e] - m_new)));
            const float p1 = __bfloat162float(__float2bfloat16_rn(exp2f(v[e + 1] - m_new)));
            sum += p0 + p1;
            const uint32_t word = e < 4 ? img8.x : img8.y;
            const bool i0 = ((word >> (8 * (e & 3))) & 0xffu) != 0u;
            const bool i1 = ((word >> (8 * ((e + 1) & 3))) & 0xffu) != 0u;
            pt[e / 2] = pack_bf16x2(i0 ? 0.f : p0, i1 ? 0.f : p1);
            pi[e / 2] = pack_bf16x2(i0 ? p0 : 0.f, i1 ? p1 : 0.f);
          }
          sum += __shfl_xor_sync(0xffffffffu, sum, 1);
          sum += __shfl_xor_sync(0xffffffffu, sum, 2);
          sum += __shfl_xor_sync(0xffffffffu, sum, 4);
          __syncwarp();  // the 8 lanes of row h have read its scores; P overwrites them in place
          *reinterpret_cast<uint4*>(p_buf + h * ldp + j * 8) = make_uint4(pt[0], pt[1], pt[2], pt[3]);
          *reinterpret_cast<uint4*>(p_buf + h * ldp + kTile + j * 8) = make_uint4(pi[0], pi[1], pi[2], pi[3]);
          l_run[q] = l_run[q] * alpha + sum;
          m_run[q] = m_new;
          if (j == 0) alpha_s[h] = alpha;
        }
      }
    }
    __syncthreads();

    // Rescale the running outputs, then O_m += P_m . C. Warp w owns latent column tiles w, w+8, ...
    if (warp < lat_tiles) {
#pragma unroll
      for (int rt = 0; rt < kHT; ++rt) {
        const float al_lo = alpha_s[rt * 16 + g], al_hi = alpha_s[rt * 16 + g + 8];
#pragma unroll
        for (int cw = 0; cw < kCTW; ++cw)
#pragma unroll
          for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int nb = 0; nb < 2; ++nb) {
              acc_o[cw][rt][m][nb][0] *= al_lo;
              acc_o[cw][rt][m][nb][1] *= al_lo;
              acc_o[cw][rt][m][nb][2] *= al_hi;
              acc_o[cw][rt][m][nb][3] *= al_hi;
            }
      }
#pragma unroll 1  // one k-step of P fragments live at a time keeps the kernel within 128 registers
      for (int k = 0; k < kTile / 16; ++k) {
        // Which modalities tokens 16k..16k+15 hold; P of an absent one is all zero and its MMAs are skipped.
        const int my_t = k * 16 + (lane & 15);
        const unsigned present = __ballot_sync(
            0xffffffffu, my_t < n_valid && (lane < 16 ? img_s[my_t] == 0 : img_s[my_t] != 0));
        if (present == 0u) break;  // past the last valid token (uniform over the CTA)
        const bool need[2] = {(present & 0xffffu) != 0u, (present >> 16) != 0u};
        uint32_t pa[kHT][2][4];  // P_text, P_img of each row tile, tokens 16k..16k+15
#pragma unroll
        for (int rt = 0; rt < kHT; ++rt) {
          if (need[0]) ldmatrix_x4(pa[rt][0], p_buf + (rt * 16 + a_row) * ldp + k * 16 + a_col);
          if (need[1]) ldmatrix_x4(pa[rt][1], p_buf + (rt * 16 + a_row) * ldp + kTile + k * 16 + a_col);
        }
#pragma unroll
        for (int cw = 0; cw < kCTW; ++cw) {
          const int ct = warp + kWarps * cw;
          if (ct < lat_tiles) {
            uint32_t cb[4];  // latent rows 16k.., columns 16ct..: n-block 0 in cb[0..1], n-block 1 in cb[2..3]
            ldmatrix_x4_trans(cb, lat_op + (k * 16 + bk_row) * ldl + ct * 16 + bk_col);
#pragma unroll
            for (int rt = 0; rt < kHT; ++rt)
#pragma unroll
              for (int m = 0; m < 2; ++m)
                if (need[m]) {
                  mma_bf16_16816(acc_o[cw][rt][m][0], pa[rt][m], cb[0], cb[1]);
                  mma_bf16_16816(acc_o[cw][rt][m][1], pa[rt][m], cb[2], cb[3]);
                }
          }
        }
      }
    }

    if (fetching) store_side(fetch, side_next);  // its stage is not read before the next loop barrier
  }
  cp_async_wait(0);  // nothing useful is pending (only empty groups), but leave no copy behind

  // Epilogue: rows' (max, sum) to shared memory, then the normalised outputs.
  float* m_s = reinterpret_cast<float*>(smem + a.off_m);
  float* l_s = reinterpret_cast<float*>(smem + a.off_l);
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int h = (tid >> 3) + 32 * q;
    if (h < kHpad && (tid & 7) == 0) {
      m_s[h] = m_run[q];
      l_s[h] = l_run[q];
    }
  }
  __syncthreads();
  if (dst.ml != nullptr)
    for (int h = tid; h < H; h += kThreads) dst.ml[h] = make_float2(m_s[h], l_s[h]);
#pragma unroll
  for (int cw = 0; cw < kCTW; ++cw) {
    const int ct = warp + kWarps * cw;
    if (ct < lat_tiles) {
#pragma unroll
      for (int rt = 0; rt < kHT; ++rt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int h = rt * 16 + g + 8 * half;
          if (h < H) {
            const float inv_l = 1.f / l_s[h];  // l >= 1: the row max contributes exp2(0)
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
              for (int nb = 0; nb < 2; ++nb) {
                const int col = ct * 16 + nb * 8 + 2 * q4;  // even, and R is even: 8-byte aligned
                *reinterpret_cast<float2*>(dst.acc + (h * 2 + m) * R + col) =
                    make_float2(acc_o[cw][rt][m][nb][2 * half] * inv_l, acc_o[cw][rt][m][nb][2 * half + 1] * inv_l);
              }
          }
        }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Row-pair kernel (bf16 rotary keys and latent; kv_heads * rope_dim == kKR, latent_dim == kR; block_size a
// power of two and a multiple of kTile). The tensor-core kernel above spends most of its time between the
// products (scores through shared memory, three CTA barriers per tile, 4 warps per scheduler mostly
// waiting); this one keeps everything between the two products in registers:
//  - The MMA rows are (head, modality) pairs: row tile j (a warp) holds heads 8j..8j+7 as rows 0-7 with
//    their text queries and rows 8-15 with their image queries, so in the C fragment lane (g, q) holds the
//    text score (row g) and the image score (row g+8) of the same head and picks per token the one of the
//    token's modality. The online softmax runs in registers (a head's row is spread over the 4 lanes of a
//    quad), and P converts in place into the A fragments of O += P . C: the text row of P keeps the weights
//    of text tokens, the image row those of image tokens, so one product yields both latent accumulators.
//  - Queries live in registers for the whole kernel (A fragments, loaded once from global memory).
//  - Tiles are aligned to kTile positions, so each tile is kTile consecutive rows of one pool block: one
//    block-table read per tile and fully contiguous 16-byte cp.async copies (rows outside [begin, end) are
//    zero-filled and masked).
//  - Shared memory: see tile_offset (padded rows for ldmatrix; Hopper's 128-byte swizzle for wgmma, which
//    reads the same tile as the K-major B of the scores (tokens x features) and as the MN-major B of the
//    accumulation (tokens x latent columns)).
//  - kWgmma (sm_90a): the 4 warps of a consumer are one warpgroup and both products are asynchronous
//    warpgroup MMAs (wgmma m64n64k16 for the scores, m64n128k16 for O) from register A fragments and shared
//    memory B descriptors; otherwise mma.sync m16n8k16 with ldmatrix.
//  - The CTA holds kRvConsumers independent consumers of kRowWarps warps; consumer c streams tiles
//    c, c + kRvConsumers, ... of the split through its own cp.async ring with its own named barrier and its
//    own softmax state, and the consumers merge their states at the end.
// One CTA per SM (the rings take ~200 KB of shared memory); grid (split, sequence).

constexpr int kRvConsumers = 2;
constexpr int kRvStages = 3;

// The 64-position tiles [kTile t, kTile t + kTile) of a row-pair kernel's split: tiles from the one holding
// seq_begin[b] on, split s taking a contiguous run of them; lo >= hi when the split holds no token.
struct SplitTiles {
  int begin, end;  // the sequence's positions
  int lo, hi;      // tiles
};
__device__ __forceinline__ SplitTiles split_tiles(const MlaDecodeParams& p, const Splits& sp, int b, int split) {
  SplitTiles s;
  s.begin = p.seq_begin[b];
  s.end = p.seq_end[b];
  const int first = s.begin / kTile;
  const int count = s.end > s.begin ? (s.end + kTile - 1) / kTile - first : 0;
  const int per_split = (count + sp.num_splits - 1) / sp.num_splits;
  s.lo = first + split * per_split;
  s.hi = min(first + count, s.lo + per_split);
  return s;
}

// Latent queries of one head as the A fragments of the row-pair scores: row g the text query, row g + 8 the
// image query, columns 16 ks + 2 q (+1, +8, +9). `pair(f)`: floats f, f + 1 (f even) of the head's [2, R] (text,
// image); zeros where !ok.
template <int kLatSteps, int kR, typename Pair>
__device__ __forceinline__ void load_query_fragments(uint32_t (&qa)[kLatSteps][4], const Pair& pair, int q4, bool ok) {
#pragma unroll
  for (int ks = 0; ks < kLatSteps; ++ks) {
    const int f = 16 * ks + 2 * q4;
    const float2 t0 = pair(f), i0 = pair(kR + f), t1 = pair(f + 8), i1 = pair(kR + f + 8);
    qa[ks][0] = ok ? pack_bf16x2(t0.x, t0.y) : 0u;
    qa[ks][1] = ok ? pack_bf16x2(i0.x, i0.y) : 0u;
    qa[ks][2] = ok ? pack_bf16x2(t1.x, t1.y) : 0u;
    qa[ks][3] = ok ? pack_bf16x2(i1.x, i1.y) : 0u;
  }
}

// Sequence b's queries copied to shared memory with cp.async in one group (16-byte chunks; the query arrays and
// `lat_dst`, `rope_dst` 16-byte aligned): the latent queries [heads][2][kR] to lat_dst, each head's chunks
// XOR-swizzled by head % 8 (the row-pair kernels' fragment reads, 8 heads per warp, then hit distinct banks:
// swizzled_query_pair), and the rotary queries [heads][rope_dim] as they are to rope_dst. Threads tid of
// `threads` share it.
template <int kR>
__device__ __forceinline__ void copy_queries(const MlaDecodeParams& p, int b, int heads, int rope_dim, float* lat_dst,
                                             float* rope_dst, int tid, int threads) {
  constexpr int kHeadChunks = 2 * kR / 4;
  const float* ql = p.q_latent + static_cast<int64_t>(b) * heads * 2 * kR;
  const float* qr = p.q_rope + static_cast<int64_t>(b) * heads * rope_dim;
  for (int e = tid; e < heads * kHeadChunks; e += threads) {
    const int h = e / kHeadChunks, c = e % kHeadChunks;
    cp_async(lat_dst + 4 * (h * kHeadChunks + (c ^ (h & 7))), ql + 4 * e, 16, true);
  }
  for (int e = tid; e < heads * rope_dim / 4; e += threads) cp_async(rope_dst + 4 * e, qr + 4 * e, 16, true);
  cp_async_commit();
}
// Floats f, f + 1 (f even) of head h's [2][kR] latent queries as copy_queries placed them (`row`: the
// head's 2 kR floats, `swz` = h % 8).
__device__ __forceinline__ float2 swizzled_query_pair(const float* row, int swz, int f) {
  return *reinterpret_cast<const float2*>(row + 4 * ((f >> 2) ^ swz) + (f & 3));
}

// Byte offsets in a row-pair stage of a quantised cache (wgmma kernel, 128-value rows): each part is the
// stored rows (int8: 128 bytes per token, int4: 64) and their fp16 scales, or a bf16 tile in the swizzled
// layout (1024-byte aligned); then the modality bytes.
struct RowPairLayout {
  int rope = 0, rope_scales = 0, lat = 0, lat_scales = 0, img = 0;
};

struct RvArgs {
  MlaDecodeParams p;
  Splits sp;
  float score_scale;  // p.scale * log2(e)
  int block_shift;    // log2(block_size)
  int stage_bytes;    // one stage: rope [kTile x kKR] bf16, latent [kTile x kR] bf16 (tile_offset), is_image [kTile]
  int smem_bytes;     // kRvConsumers * kRvStages * stage_bytes
  bool merge;         // launched cooperatively: the CTAs merge the splits themselves (merge_splits_in_grid)
  int consumer_bytes; // one consumer's shared memory: its ring, then two sets of dequantised tiles (quantised)
  RowPairLayout layout;  // a stage's parts when one is stored quantised
  // The MHA kernel's tiles: the pool's rotary keys and latent as [rows, values] bf16 tensor maps, boxes of
  // kTile rows x 64 values in Hopper's 128-byte swizzle (tile_offset<true>'s layout).
  CUtensorMap rope_map, lat_map;
};

__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Shared-memory layout of a tile of kTile rows x `chunks` 16-byte chunks (byte offset of chunk `chunk` of row
// `row`). mma.sync: rows padded by 16 bytes (ldmatrix and the row-contiguous copies are free of bank
// conflicts). wgmma: Hopper's 128-byte swizzle (Swizzle<3,4,3>): the columns in halves of 64 bf16 (half h at
// h * kTile * 128, 1024-byte aligned), row r at 128 r in its half, chunk c at 16 (c ^ (r % 8)); the warpgroup
// MMA reads this as the K-major B of the scores and the MN-major B of the accumulation.
template <bool kSwizzled>
__device__ __forceinline__ int tile_offset(int row, int chunk, int chunks) {
  if constexpr (kSwizzled) {
    return (chunk >> 3) * (kTile * 128) + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
  } else {
    return row * (chunks * 16 + 16) + chunk * 16;
  }
}
template <bool kSwizzled>
__host__ __device__ constexpr int tile_bytes(int chunks) {
  return kSwizzled ? kTile * chunks * 16 : kTile * (chunks * 16 + 16);
}

// Descriptor strides of the MN-major accumulation operand in the swizzled layout (next 64 columns, next 8
// rows), as bench/cuda/wgmma_probe.cu finds them on the device.
#ifndef MLAFORGE_RV_MN_LBO
#define MLAFORGE_RV_MN_LBO 8192
#define MLAFORGE_RV_MN_SBO 1024
#endif

// Warpgroup MMA (sm_90a) shared-memory descriptor with the 128-byte swizzle: start address, leading and
// stride byte offsets (all >> 4), layout type 1 in bits 62-63. A K-major B takes SBO = 1024 (next 8 rows)
// and no LBO (one swizzle atom spans the k-step); the k-step's columns are selected by advancing the start
// address by 32 bytes per 16 columns inside the atom.
__device__ __forceinline__ uint64_t wgmma_desc(const void* smem_ptr, int lbo, int sbo) {
  const uint32_t addr = smem_addr(smem_ptr);
  return static_cast<uint64_t>((addr >> 4) & 0x3fff) | (static_cast<uint64_t>((lbo >> 4) & 0x3fff) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3fff) << 32) | (static_cast<uint64_t>(1) << 62);
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_wait_all() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}

// d[64 x 64] (= or +=) a[64 x 16] . B[16 x 64], B K-major in shared memory; `accumulate` 0 overwrites d.
__device__ __forceinline__ void wgmma_64x64(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc, int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,"
      "%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),
        "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]),
        "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]),
        "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
#else
  __trap();
#endif
}

// d[64 x 128] += a[64 x 16] . B[16 x 128], B MN-major in shared memory.
__device__ __forceinline__ void wgmma_64x128_mn(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,"
      "%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,"
      "%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, 1, 1, 1, 1;\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),
        "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]),
        "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]),
        "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]),
        "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]),
        "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
        "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]),
        "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
        "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
#else
  __trap();
#endif
}

// Stored bytes per token of a 128-value row in format F.
__host__ __device__ constexpr int row_bytes_128(KvFormat F) {
  return F == KvFormat::Int8 ? 128 : F == KvFormat::Int4 ? 64 : 256;
}

// One 32-bit word of stored values (Int8: 4, Int4: 8, low nibble first, q = nibble - 8) times their scale, as
// bf16 pairs: out[0 .. 1] (Int8) or out[0 .. 3] (Int4). No integer-to-float conversion (a quarter-rate
// instruction, the two-pass kernels' bottleneck): the float with bits 0x4B400000 + q is 1.5 * 2^23 + q exactly,
// and fma(it, sc, -1.5 * 2^23 * sc) rounds q * sc once, as float(q) * sc does (1.5 * 2^23 * sc is exact: sc, an
// fp16 scale, has 11 significant bits).
template <KvFormat F>
__device__ __forceinline__ void scaled_bf16_pairs(uint32_t w, float sc, uint32_t* out) {
  static_assert(F == KvFormat::Int8 || F == KvFormat::Int4, "a quantised format");
  constexpr int kN = F == KvFormat::Int8 ? 4 : 8;
  const float bias = -12582912.f * sc;
  float v[kN];
#pragma unroll
  for (int e = 0; e < kN; ++e) {
    int q;
    if constexpr (F == KvFormat::Int8) {  // byte e, sign-extended (prmt: a selector nibble's bit 3 replicates the sign)
      const uint32_t sign = 8u | static_cast<uint32_t>(e),
                     selector = static_cast<uint32_t>(e) | sign << 4 | sign << 8 | sign << 12;
      asm("prmt.b32 %0, %1, 0, %2;" : "=r"(q) : "r"(w), "r"(selector));
    } else {
      q = static_cast<int>((w >> (4 * e)) & 15u) - 8;
    }
    v[e] = fmaf(__int_as_float(0x4B400000 + q), sc, bias);
  }
#pragma unroll
  for (int e = 0; e < kN / 2; ++e) out[e] = pack_bf16x2(v[2 * e], v[2 * e + 1]);
}

// One 64-token tile of an Int8/Int4 array of 128 values per token (the latent, or the rotary keys of all KV
// heads), dequantised into bf16 in the swizzled layout (tile_offset<true>) by the 128 threads of a consumer:
// thread t takes token t / 2, values 64 (t % 2) .. +63, 8 per 16-byte store. raw: [64][128] int8 or [64][64]
// bytes of two int4 (low nibble first, q = nibble - 8); scales: [64][128 / group] fp16 bits (the rotary keys:
// one per KV head, group = rope_dim). Tokens outside [v_lo, v_hi) become zeros (their rows were zero-filled
// but their scales may be anything).
template <KvFormat F>
__device__ __forceinline__ void dequantise_tile_128(const unsigned char* raw, const uint16_t* scales, unsigned char* out,
                                                    int group, int t, int v_lo, int v_hi) {
  constexpr int kRawRow = F == KvFormat::Int8 ? 128 : 64;
  const int tok = t >> 1, half = t & 1, ng = 128 / group;
  const bool valid = tok >= v_lo && tok < v_hi;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int c0 = 64 * half + 8 * j;  // first of this store's 8 values (one group: group % 8 == 0)
    const float sc = valid ? half_bits_to_float(scales[tok * ng + c0 / group]) : 0.f;
    uint32_t packed[4];  // the 8 values' bf16 pairs
    if constexpr (F == KvFormat::Int8) {
      const uint2 w = *reinterpret_cast<const uint2*>(raw + tok * kRawRow + c0);
      scaled_bf16_pairs<F>(w.x, sc, packed);
      scaled_bf16_pairs<F>(w.y, sc, packed + 2);
    } else {
      scaled_bf16_pairs<F>(*reinterpret_cast<const uint32_t*>(raw + tok * kRawRow + c0 / 2), sc, packed);
    }
    *reinterpret_cast<uint4*>(out + tile_offset<true>(tok, 8 * half + j, 16)) =
        make_uint4(packed[0], packed[1], packed[2], packed[3]);
  }
}

// Where row `row` of a quantised chunk of 64 tokens x 128 values lies inside the bf16 tile it is dequantised into
// (tile_offset<kSwizzled>; the two-pass kernels' stages): its stored values (Int8: 128 bytes, Int4: 64) at the
// start of the row's own bytes (swizzled: the row's 128-byte line in the first 64-column half; padded: its 272-byte
// row), its scales (at most 16 fp16) after them (swizzled: the row's line in the second half). Dequantising a row
// then reads and writes only that row's bytes.
template <bool kSwizzled>
__host__ __device__ constexpr int q_row_bytes_offset(int row) {
  return row * (kSwizzled ? 128 : 272);
}
template <bool kSwizzled, KvFormat F>
__host__ __device__ constexpr int q_row_scales_offset(int row) {
  return kSwizzled ? kTile * 128 + row * 128 : row * 272 + row_bytes_128(F);
}

// The two-pass kernels' dequantisation of a 64-token chunk of 128 values, in place: the stored rows and their
// scales ([ng] fp16 per row, ng = 128 >> group_shift) lie inside `tile`'s own rows as q_row_bytes_offset and
// q_row_scales_offset say, and become the bf16 tile (tile_offset<kSwizzled>). Warp w of kCtaWarps takes rows w,
// w + kCtaWarps, ... (Int4: pairs of rows), each lane 4 stored bytes of a row (Int8: 4 values, Int4: 8), so that a
// warp reads whole stored rows and writes whole bf16 rows (no bank conflicts) at offsets fixed per thread, and
// touches no other warp's rows: its loads, __syncwarp, its stores (no CTA barrier). Rows from v_hi on become zeros.
// The chunk must be visible to every thread (the CTA barrier after the copies' wait).
template <KvFormat F, bool kSwizzled, int kCtaWarps>
__device__ __forceinline__ void dequantise_chunk_in_place(unsigned char* tile, int ng, int group_shift, int warp,
                                                          int lane, int v_hi) {
  constexpr int kV = F == KvFormat::Int8 ? 4 : 8;  // values per lane and row
  constexpr int kLanesPerRow = 128 / kV;           // 32 or 16
  constexpr int kRowsPerStep = kCtaWarps * (32 / kLanesPerRow);
  constexpr int kSteps = kTile / kRowsPerStep;
  constexpr int kStep = kRowsPerStep * q_row_bytes_offset<kSwizzled>(1);  // bytes between a lane's rows
  static_assert(kRowsPerStep % 8 == 0, "a thread's rows keep their swizzle phase (row % 8)");
  static_assert(4 * kLanesPerRow == row_bytes_128(F), "4 stored bytes per lane");
  static_assert(
      q_row_bytes_offset<kSwizzled>(1) == q_row_scales_offset<kSwizzled, F>(1) - q_row_scales_offset<kSwizzled, F>(0),
      "rows' values and scales advance alike");
  const int row0 = warp * (32 / kLanesPerRow) + lane / kLanesPerRow, cl = lane % kLanesPerRow;
  const unsigned char* raw = tile + q_row_bytes_offset<kSwizzled>(row0) + 4 * cl;
  const unsigned char* scales = tile + q_row_scales_offset<kSwizzled, F>(row0) + 2 * ((kV * cl) >> group_shift);
  uint32_t w[kSteps];
  float sc[kSteps];
#pragma unroll
  for (int i = 0; i < kSteps; ++i) {
    w[i] = *reinterpret_cast<const uint32_t*>(raw + i * kStep);
    sc[i] = row0 + i * kRowsPerStep < v_hi ? half_bits_to_float(*reinterpret_cast<const uint16_t*>(scales + i * kStep))
                                           : 0.f;
  }
  __syncwarp();
  const int byte0 = 2 * kV * cl;  // of the bf16 row: 8 or 16 bytes per lane
  unsigned char* out = tile + tile_offset<kSwizzled>(row0, byte0 / 16, 16) + byte0 % 16;
#pragma unroll
  for (int i = 0; i < kSteps; ++i) {
    uint32_t packed[kV / 2];
    scaled_bf16_pairs<F>(w[i], sc[i], packed);
    unsigned char* dst = out + i * kStep;
    if constexpr (kV == 4) {
      *reinterpret_cast<uint2*>(dst) = make_uint2(packed[0], packed[1]);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
  }
}

template <int kRowWarps, int kKR, int kR, bool kWgmma, KvFormat RF = KvFormat::BF16, KvFormat LF = KvFormat::BF16>
__global__ void __launch_bounds__(kRvConsumers * kRowWarps * 32, 1) mla_decode_rowpair_kernel(const __grid_constant__ RvArgs a) {
  constexpr bool kRopeQ = RF == KvFormat::Int8, kLatQ = LF == KvFormat::Int8 || LF == KvFormat::Int4;
  constexpr bool kAnyQ = kRopeQ || kLatQ;
  static_assert(!kAnyQ || (kWgmma && kKR == 128 && kR == 128), "quantised caches: wgmma, 128-value rows");
  static_assert(RF == KvFormat::BF16 || kRopeQ, "bf16 or int8 rotary keys");
  static_assert(LF == KvFormat::BF16 || kLatQ, "bf16, int8 or int4 latent");
  constexpr int kThreadsC = kRowWarps * 32;           // threads per consumer
  constexpr int kRopeChunks = kKR / 8, kLatChunks = kR / 8;  // 16-byte chunks per row
  constexpr int kRopeBytes = tile_bytes<kWgmma>(kRopeChunks), kLatBytes = tile_bytes<kWgmma>(kLatChunks);
  constexpr int kLatSteps = kR / 16;  // k-steps of the latent score; pairs of O column blocks
  constexpr int kOBlocks = kR / 8;
  constexpr int kRopeSteps = kKR / 16;  // rotary k-steps; an mma.sync row tile visits only its KV heads'
  static_assert(kKR % 16 == 0 && kR % 16 == 0, "rope and latent widths: multiples of 16");
  static_assert((kTile * kRopeChunks) % kThreadsC == 0 && (kTile * kLatChunks) % kThreadsC == 0, "copy split");
  static_assert(!kWgmma || (kRowWarps == 4 && kR == 128 && kTile == 64), "wgmma: one warpgroup, n64 scores, n128 O");

  extern __shared__ __align__(1024) unsigned char smem[];  // swizzle atoms are 1024-byte aligned
  const MlaDecodeParams& p = a.p;
  allow_dependent_launch();
  const int tid = threadIdx.x, lane = tid & 31;
  const int consumer = tid / kThreadsC, tid_c = tid % kThreadsC, warp_c = tid_c >> 5;
  const int g = lane >> 2, q4 = lane & 3;
  const int split = blockIdx.x, b = blockIdx.y;
  const int H = p.heads, group = H / p.kv_heads, rd = p.rope_dim, bs = p.block_size;

  const SplitTiles tiles = split_tiles(p, a.sp, b, split);
  const int begin = tiles.begin, end = tiles.end, t_lo = tiles.lo, t_hi = tiles.hi;
  // The sequence's queries go to shared memory through cp.async, issued while the bounds load and ahead of the
  // first tiles (as in the MHA kernel, whose comment says why): the latent queries [H][2][kR] (each head's 16-byte
  // chunks XOR-swizzled by head % 8) into consumer 0's last stage and what follows it (its dequantised tiles),
  // the rotary queries [H][rd] into consumer 1's; both are free until the main loop (plan_rowpair checks the
  // sizes).
  static_assert(kRvConsumers == 2, "latent queries in consumer 0's free span, rotary queries in consumer 1's");
  float* q_lat_s = reinterpret_cast<float*>(smem + (kRvStages - 1) * a.stage_bytes);
  float* q_rope_s = reinterpret_cast<float*>(smem + a.consumer_bytes + (kRvStages - 1) * a.stage_bytes);
  copy_queries<kR>(p, b, H, rd, q_lat_s, q_rope_s, tid, kRvConsumers * kThreadsC);
  const SplitOutput dst = split_output(p, a.sp, b, split);
  if (t_lo >= t_hi) {
    cp_async_wait(0);
    write_empty_split(dst, a.sp, H, kR, tid, kRvConsumers * kThreadsC);
    if (a.merge) merge_splits_in_grid<kR>(p, a.sp, H, b, split, tid, kRvConsumers * kThreadsC, smem);
    return;
  }
  const int n_mine = (t_hi - t_lo - consumer + kRvConsumers - 1) / kRvConsumers;  // may be 0 for consumer 1
  const int32_t* table = p.block_table + static_cast<int64_t>(b) * p.max_blocks;
  unsigned char* ring = smem + static_cast<size_t>(consumer) * a.consumer_bytes;
  // Where a stage's parts are: the bf16/bf16 kernel's fixed layout, or the plan's (RowPairLayout) when a part is
  // stored quantised; then the consumer's two sets of dequantised tiles (rotary, latent) after its ring.
  const int off_rope = kAnyQ ? a.layout.rope : 0, off_lat = kAnyQ ? a.layout.lat : kRopeBytes;
  const int off_img = kAnyQ ? a.layout.img : kRopeBytes + kLatBytes;
  unsigned char* dq = ring + kRvStages * a.stage_bytes;
  constexpr int kDqBytes = (kRopeQ ? kRopeBytes : 0) + (kLatQ ? kLatBytes : 0);  // one set

  // No zeroing of the rings: every byte the products read is written by a copy first (rows outside the
  // sequence are zero-filled; the padding of the mma.sync layout is never read).

  auto tile_of = [&](int i) { return t_lo + consumer + kRvConsumers * i; };
  auto issue = [&](int i, int blk) {
    unsigned char* st = ring + (i % kRvStages) * a.stage_bytes;
    const int pos0 = tile_of(i) * kTile;
    const int64_t row0 = static_cast<int64_t>(blk) * bs + (pos0 & (bs - 1));
    // Interior tiles (the common case) skip the per-row bounds test.
    const bool interior = pos0 >= begin && pos0 + kTile <= end;
    // A bf16 tile into its swizzled (or padded) layout. Copy e takes row e / chunks, chunk e % chunks: a warp
    // copies whole 128-byte global lines into 128 distinct shared-memory bytes per 8 lanes.
    // (Sizes as std::integral_constant, so that the loops unroll.)
    auto copy_tile = [&](unsigned char* dst, const void* base, auto chunks_c) {
      constexpr int chunks = decltype(chunks_c)::value;
      const unsigned char* src = static_cast<const unsigned char*>(base) + row0 * (16 * chunks);
#pragma unroll
      for (int k = 0; k < kTile * chunks / kThreadsC; ++k) {
        const int e = tid_c + k * kThreadsC, tok = e / chunks, col = e % chunks;
        const bool valid = interior || (pos0 + tok >= begin && pos0 + tok < end);
        cp_async(dst + tile_offset<kWgmma>(tok, col, chunks), src + e * 16, 16, valid);
      }
    };
    // Quantised rows and their scales as stored (a tile's 64 slots are consecutive in one block, so its scales
    // are contiguous); rows outside the sequence are zero-filled, and the dequantisation zeroes them whatever
    // their scales hold.
    auto copy_quantised = [&](unsigned char* dst, const void* base, auto row_bytes_c, unsigned char* sc_dst,
                              const uint16_t* scales, int ng) {
      constexpr int row_bytes = decltype(row_bytes_c)::value;
      const unsigned char* src = static_cast<const unsigned char*>(base) + row0 * row_bytes;
#pragma unroll
      for (int k = 0; k < kTile * row_bytes / 16 / kThreadsC; ++k) {
        const int e = tid_c + k * kThreadsC, tok = e / (row_bytes / 16);
        const bool valid = interior || (pos0 + tok >= begin && pos0 + tok < end);
        cp_async(dst + e * 16, src + e * 16, 16, valid);
      }
      if (tid_c < kTile * ng * 2 / 16)
        cp_async(sc_dst + tid_c * 16, reinterpret_cast<const unsigned char*>(scales) + row0 * ng * 2 + tid_c * 16, 16, true);
    };
    if constexpr (kRopeQ) {
      copy_quantised(st + off_rope, p.k_rope, std::integral_constant<int, row_bytes_128(RF)>{}, st + a.layout.rope_scales,
                     p.k_rope_scale, p.kv_heads);
    } else {
      copy_tile(st + off_rope, p.k_rope, std::integral_constant<int, kRopeChunks>{});
    }
    if constexpr (kLatQ) {
      copy_quantised(st + off_lat, p.latent, std::integral_constant<int, row_bytes_128(LF)>{}, st + a.layout.lat_scales,
                     p.latent_scale, kR / p.latent_group);
    } else {
      copy_tile(st + off_lat, p.latent, std::integral_constant<int, kLatChunks>{});
    }
    // Modality bytes: the whole 64-slot run of the block (in bounds); bytes of masked tokens are never used.
    if (tid_c < kTile / 16) cp_async(st + off_img + tid_c * 16, p.is_image + row0 + tid_c * 16, 16, true);
  };

  // The first tiles in flight (the queries' group was committed first), then the queries from shared memory.
  for (int i = 0; i < kRvStages - 1; ++i) {
    if (i < n_mine) issue(i, table[(tile_of(i) * kTile) >> a.block_shift]);
    cp_async_commit();
  }
  cp_async_wait(kRvStages - 1);  // the queries' group (the tiles' may still be in flight)
  __syncthreads();

  // Queries as A fragments, in registers for the whole kernel. Row g: text query of head 8*warp_c + g;
  // row g + 8: its image query. Rotary part: the block-diagonal rotary query (head h in the columns of its
  // KV head), both rows the same.
  const int head = 8 * warp_c + g;
  const bool rows_live = 8 * warp_c < H;  // warp-uniform
  uint32_t qa[kLatSteps][4];
  {
    const int h = min(head, H - 1);
    const float* row = q_lat_s + h * 2 * kR;
    load_query_fragments<kLatSteps, kR>(qa, [&](int f) { return swizzled_query_pair(row, h & 7, f); }, q4, head < H);
  }
  // mma.sync visits only the rotary k-steps of this warp's KV heads; the warpgroup MMA takes all of them.
  const int kv_lo = min(8 * warp_c, H - 1) / group, kv_hi = min(8 * warp_c + 7, H - 1) / group;
  const int rope_ks0 = kWgmma ? 0 : kv_lo * rd / 16;
  const int rope_steps = kWgmma ? kRopeSteps : ((kv_hi + 1) * rd + 15) / 16 - rope_ks0;
  uint32_t qr[kRopeSteps][4];
  {
    const int my_kv = min(head, H - 1) / group;
    const float* q = q_rope_s + min(head, H - 1) * rd;
    auto val = [&](int col) {
      const int d = col - my_kv * rd;
      return head < H && d >= 0 && d < rd ? q[d] : 0.f;
    };
#pragma unroll
    for (int i = 0; i < kRopeSteps; ++i) {
      const int c = 16 * (rope_ks0 + i) + 2 * q4;
      qr[i][0] = qr[i][1] = pack_bf16x2(val(c), val(c + 1));  // rows g and g+8 (same head)
      qr[i][2] = qr[i][3] = pack_bf16x2(val(c + 8), val(c + 9));
    }
  }
  __syncthreads();  // every consumer has its queries before either refills its last stage or dequantises
  // The block of the next tile to issue, read ahead.
  int next_blk = kRvStages - 1 < n_mine ? table[(tile_of(kRvStages - 1) * kTile) >> a.block_shift] : 0;
  // ldmatrix row addresses of this lane: score B tiles (tokens x features, 4 matrices: tokens 0-7 / 8-15 x
  // chunks 0 / 1 of the k-step) and accumulation B tiles (the same storage read transposed).
  const int bn_row = ((lane >> 4) << 3) + (lane & 7), bn_chunk = (lane >> 3) & 1;
  const int bk_row = (((lane >> 3) & 1) << 3) + (lane & 7), bk_chunk = lane >> 4;

  float o[kOBlocks][4];  // O: rows g (text accumulator) and g+8 (image accumulator) of head `head`
#pragma unroll
  for (int j = 0; j < kOBlocks; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[j][e] = 0.f;
  float m_run = -INFINITY, l_run = 0.f;  // l_run: this lane's share of the row sum (summed over the quad at the end)

  // Refill of the stage of tile i-1 with tile i + kRvStages - 1, once every warp of the consumer is done with
  // tile i-1: right after the loop barrier for mma.sync; for wgmma after the wait that completes tile i-1's
  // asynchronous accumulation.
  auto refill = [&](int i) {
    const int f = i + kRvStages - 1;
    if (f < n_mine) {
      issue(f, next_blk);
      if (f + 1 < n_mine) next_blk = table[(tile_of(f + 1) * kTile) >> a.block_shift];
    }
    cp_async_commit();
  };

  for (int i = 0; i < n_mine; ++i) {
    cp_async_wait(kRvStages - 2);
    named_barrier(1 + consumer, kThreadsC);  // tile i has landed for all; all are done with tile i-1's stage
    if constexpr (!kWgmma) refill(i);
    const unsigned char* st = ring + (i % kRvStages) * a.stage_bytes;
    // Dequantised tiles: set i % 2 (tile i-1's accumulation may still read the other).
    unsigned char* dq_set = dq + (i & 1) * kDqBytes;
    const unsigned char* rope_t = kRopeQ ? dq_set : st + off_rope;
    const unsigned char* lat_t = kLatQ ? dq_set + (kRopeQ ? kRopeBytes : 0) : st + off_lat;
    const unsigned char* img = st + off_img;
    const int pos0 = tile_of(i) * kTile;
    const int v_lo = max(begin - pos0, 0), v_hi = min(end - pos0, kTile);  // valid token range of the tile
    const bool full = v_lo == 0 && v_hi == kTile;
    if constexpr (kAnyQ) {
      if constexpr (kRopeQ)
        dequantise_tile_128<RF>(st + off_rope, reinterpret_cast<const uint16_t*>(st + a.layout.rope_scales), dq_set, rd,
                                tid_c, v_lo, v_hi);
      if constexpr (kLatQ)
        dequantise_tile_128<LF>(st + off_lat, reinterpret_cast<const uint16_t*>(st + a.layout.lat_scales),
                                dq_set + (kRopeQ ? kRopeBytes : 0), p.latent_group, tid_c, v_lo, v_hi);
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the stores, before wgmma reads them
      named_barrier(1 + consumer, kThreadsC);
    }
    const unsigned img_lo = __ballot_sync(0xffffffffu, img[lane] != 0);
    const unsigned img_hi = __ballot_sync(0xffffffffu, img[32 + lane] != 0);

    // S = Qrope . Krope^T + [Q_text; Q_image] . C^T for 64 tokens: 8 column blocks of 8 tokens.
    float s[8][4];
    if constexpr (kWgmma) {
      wgmma_fence();
#pragma unroll
      for (int r = 0; r < kRopeSteps; ++r)
        wgmma_64x64(s, qr[r], wgmma_desc(rope_t + (r >> 2) * (kTile * 128) + (r & 3) * 32, 16, 1024), r > 0 ? 1 : 0);
#pragma unroll
      for (int ks = 0; ks < kLatSteps; ++ks)
        wgmma_64x64(s, qa[ks], wgmma_desc(lat_t + (ks >> 2) * (kTile * 128) + (ks & 3) * 32, 16, 1024), 1);
      wgmma_commit();
      wgmma_wait_all();  // also the previous tile's accumulation, which read the stage refilled next
      refill(i);
    } else {
      if (!rows_live) continue;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nb][e] = 0.f;
#pragma unroll
      for (int r = 0; r < kRopeSteps; ++r) {
        if (r < rope_steps) {
#pragma unroll
          for (int np = 0; np < 4; ++np) {
            uint32_t kb[4];
            ldmatrix_x4(kb, rope_t + tile_offset<kWgmma>(16 * np + bn_row, 2 * (rope_ks0 + r) + bn_chunk, kRopeChunks));
            mma_bf16_16816(s[2 * np], qr[r], kb[0], kb[1]);
            mma_bf16_16816(s[2 * np + 1], qr[r], kb[2], kb[3]);
          }
        }
      }
#pragma unroll
      for (int ks = 0; ks < kLatSteps; ++ks) {
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          uint32_t kb[4];
          ldmatrix_x4(kb, lat_t + tile_offset<kWgmma>(16 * np + bn_row, 2 * ks + bn_chunk, kLatChunks));
          mma_bf16_16816(s[2 * np], qa[ks], kb[0], kb[1]);
          mma_bf16_16816(s[2 * np + 1], qa[ks], kb[2], kb[3]);
        }
      }
    }
    {
      // Each token's score from the row of its modality; masked tokens -inf. Token of (nb, e): 8nb + 2q + e.
      float v[8][2];
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int t = 8 * nb + 2 * q4 + e;
          const bool is_img = (((nb < 4 ? img_lo : img_hi) >> (t & 31)) & 1u) != 0u;
          const float x = (is_img ? s[nb][2 + e] : s[nb][e]) * a.score_scale;
          v[nb][e] = full || (t >= v_lo && t < v_hi) ? x : -INFINITY;
          mx = fmaxf(mx, v[nb][e]);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run, mx);  // finite: every tile holds a valid token
      const float alpha = exp2f(m_run - m_new);
      m_run = m_new;
      // P as the A fragments of the accumulation, k-step kk = tokens 16kk..16kk+15 = column blocks 2kk, 2kk+1.
      uint32_t pa[4][4];
      float sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) {
        // Rounded first so that the normaliser sums exactly the weights the MMA uses.
        const float p0 = __bfloat162float(__float2bfloat16_rn(exp2f(v[nb][0] - m_new)));
        const float p1 = __bfloat162float(__float2bfloat16_rn(exp2f(v[nb][1] - m_new)));
        sum += p0 + p1;
        const int t = 8 * nb + 2 * q4;
        const unsigned bits = ((nb < 4 ? img_lo : img_hi) >> (t & 31)) & 3u;
        pa[nb / 2][(nb & 1) * 2] = pack_bf16x2((bits & 1u) ? 0.f : p0, (bits & 2u) ? 0.f : p1);      // text row
        pa[nb / 2][(nb & 1) * 2 + 1] = pack_bf16x2((bits & 1u) ? p0 : 0.f, (bits & 2u) ? p1 : 0.f);  // image row
      }
      l_run = l_run * alpha + sum;
      // Skipped while no head of the warp has a new max (mma.sync); the warpgroup MMA's accumulators are never
      // touched under a branch, which would make ptxas serialise the wgmmas.
      if (kWgmma || __any_sync(0xffffffffu, alpha != 1.f)) {
#pragma unroll
        for (int j = 0; j < kOBlocks; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[j][e] *= alpha;
      }
      // O += P . C over the tile's 4 k-steps; k-steps past the last valid token are skipped.
      if constexpr (kWgmma) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)  // all 4 (no branch): past the end P is 0 and the rows zero-filled
          wgmma_64x128_mn(o, pa[kk], wgmma_desc(lat_t + kk * 16 * 128, MLAFORGE_RV_MN_LBO, MLAFORGE_RV_MN_SBO));
        wgmma_commit();  // completes before the next tile's scores are read (wgmma_wait_all above)
      } else {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          if (16 * kk >= v_hi) break;
#pragma unroll
          for (int cp = 0; cp < kLatSteps; ++cp) {
            uint32_t cb[4];
            ldmatrix_x4_trans(cb, lat_t + tile_offset<kWgmma>(16 * kk + bk_row, 2 * cp + bk_chunk, kLatChunks));
            mma_bf16_16816(o[2 * cp], pa[kk], cb[0], cb[1]);
            mma_bf16_16816(o[2 * cp + 1], pa[kk], cb[2], cb[3]);
          }
        }
      }
    }
  }
  if constexpr (kWgmma) wgmma_wait_all();
  cp_async_wait(0);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);

  // Merge the consumers: consumer c > 0 leaves (m, l, O) in its own ring (once all its warps are done reading
  // it), consumer 0 folds them in.
  float* xchg = reinterpret_cast<float*>(ring);  // [consumer's ring] [kOBlocks*4 + 2][kThreadsC]
  if (consumer > 0) {
    named_barrier(1 + consumer, kThreadsC);
#pragma unroll
    for (int j = 0; j < kOBlocks; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) xchg[(j * 4 + e) * kThreadsC + tid_c] = o[j][e];
    xchg[(kOBlocks * 4) * kThreadsC + tid_c] = m_run;
    xchg[(kOBlocks * 4 + 1) * kThreadsC + tid_c] = l_run;
  }
  __syncthreads();
  if (consumer == 0 && rows_live) {
    for (int c = 1; c < kRvConsumers; ++c) {
      const float* x = reinterpret_cast<const float*>(smem + static_cast<size_t>(c) * a.consumer_bytes);
      const float m_other = x[(kOBlocks * 4) * kThreadsC + tid_c], l_other = x[(kOBlocks * 4 + 1) * kThreadsC + tid_c];
      const float m_new = fmaxf(m_run, m_other);
      const float a_self = exp2f(m_run - m_new), a_other = exp2f(m_other - m_new);  // m_run is finite
      l_run = l_run * a_self + l_other * a_other;
      m_run = m_new;
#pragma unroll
      for (int j = 0; j < kOBlocks; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[j][e] = o[j][e] * a_self + x[(j * 4 + e) * kThreadsC + tid_c] * a_other;
    }
    if (head < H) {
      if (dst.ml != nullptr && q4 == 0) dst.ml[head] = make_float2(m_run, l_run);
      const float inv_l = 1.f / l_run;  // l >= 1: the row max contributes exp2(0)
      float* out = dst.acc + static_cast<int64_t>(head) * 2 * kR;
#pragma unroll
      for (int j = 0; j < kOBlocks; ++j) {
        const int col = 8 * j + 2 * q4;
        *reinterpret_cast<float2*>(out + col) = make_float2(o[j][0] * inv_l, o[j][1] * inv_l);
        *reinterpret_cast<float2*>(out + kR + col) = make_float2(o[j][2] * inv_l, o[j][3] * inv_l);
      }
    }
  }
  if (a.merge) merge_splits_in_grid<kR>(p, a.sp, H, b, split, tid, kRvConsumers * kThreadsC, smem);
}

// ---------------------------------------------------------------------------------------------------------
// MHA row-pair kernel (sm_90a only; bf16 cache of an MHA model at 4 or 8 rotary pairs and dkv 8 per head: 32
// heads over 32 KV heads, kRopeDim = 8 or 16 rotary values per head (256 or 512 per token) and latent 256, e.g.
// llava-1.5-7b converted with --rope-pairs 4|8 --dkv 8). The row-pair layout of the kernel above, with the
// changes its shape forces:
//  - O [64 rows x 256] in fp32 is 128 registers per thread of a warpgroup, on top of the latent queries (64).
//    The CTA runs two warpgroups over the same tiles, and each accumulates half of O's columns (warpgroup w:
//    latent columns 128w..128w+127) over all 64 tokens of a tile.
//  - The scores are split the other way: warpgroup w scores tokens 32w..32w+31 (wgmma m64n32). The two halves
//    meet through shared memory twice per tile: the per-head maxima (so both apply the same running max), then
//    the probabilities, as the A fragments of O += P . C (a thread's fragment of the other half is what the
//    thread of the same rank in the other warpgroup computed: both warpgroups map rows to threads alike) with
//    their row sums. Scoring all 64 tokens in both warpgroups instead made the tile's tensor work 1.5x.
//  - Each head has its own rotary values: as a product the rotary score would be block-diagonal (at most 2 of
//    16 or 32 k-steps nonzero per row). It runs on CUDA cores instead, while the latent score's wgmma is in
//    flight: lane (g, q) reads head 8 warp + g's 16-byte rotary chunks of each of its 8 tokens.
//  - Thread 0 starts each tile's copies through the tensor memory accelerator (tensor maps of the pool, an
//    mbarrier per stage), so the warps spend no issue slots on copies and hold no copy addresses: 236 registers
//    at 4 pairs, 254 at 8, no spills (with 16-byte cp.async by every thread: 255 and 76 bytes of spills at 8).
// Both tiles use the row-pair kernel's swizzled layout (tile_offset<true>: 64-value column blocks of kTile rows
// of 128 bytes, chunk c of row t at 16 (c ^ (t % 8))), which is what the tensor maps' 128-byte swizzle writes:
// the 8 lanes of a rotary load phase (heads 8w + {0, 1} x tokens 2q + e) hit 8 distinct bank groups at 4 pairs.
// Stages of 65 KB (3) or 97 KB (2); one CTA per SM.
constexpr int kMhaHeads = 32, kMhaR = 256, kMhaThreads = 256;
constexpr int kMhaLatBytes = kTile * kMhaR * 2;  // 32 KB
constexpr int kMhaBoxBytes = kTile * 128;        // one tensor-map box: kTile rows x 64 bf16 values
template <int kRopeDim>
struct MhaShape {
  static constexpr int kRopeBytes = kTile * kMhaHeads * kRopeDim * 2;            // 32 or 64 KB
  static constexpr int kStageBytes = kRopeBytes + kMhaLatBytes + 1024;          // + the 64 modality bytes, 1024-aligned
  static constexpr int kStages = kRopeDim == 8 ? 3 : 2;
  // After the stages: per warpgroup, the 128 threads' maxima, then their 8 P registers and row sum ([9][128]);
  // then the stages' mbarriers.
  static constexpr int kBarOffset = kStages * kStageBytes + 2 * (128 + 9 * 128) * 4;
  static constexpr int kSmemBytes = kBarOffset + 8 * kStages;
};

// The 16 fp32 accumulators of an m64n32 warpgroup MMA, d[4][4], as asm operands %0..%15.
#define MLAFORGE_WGMMA_D16(d)                                                                                   \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),        \
      "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]),    \
      "+f"(d[3][2]), "+f"(d[3][3])

// d[64 x 32] (= or +=) a[64 x 16] . B[16 x 32], B K-major in shared memory; `accumulate` 0 overwrites d.
__device__ __forceinline__ void wgmma_64x32(float (&d)[4][4], const uint32_t (&a)[4], uint64_t desc, int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, p, 1, 1, 0;\n}\n"
      : MLAFORGE_WGMMA_D16(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
#else
  __trap();
#endif
}

template <int kRopeDim>
__global__ void __launch_bounds__(kMhaThreads, 1) mla_decode_rowpair_mha_kernel(const __grid_constant__ RvArgs a) {
  using Shape = MhaShape<kRopeDim>;
  constexpr int kMhaStages = Shape::kStages, kMhaStageBytes = Shape::kStageBytes, kMhaRopeBytes = Shape::kRopeBytes;
  constexpr int kRowBytes = kMhaR * 2;  // 512: one token's latent
  constexpr int kChunks = kRowBytes / 16;
  constexpr int kRopeRowBytes = kMhaHeads * kRopeDim * 2;  // one token's rotary keys
  constexpr int kRopeChunks = kRopeRowBytes / 16, kHeadChunks = kRopeDim / 8;
  constexpr int kLatSteps = kMhaR / 16;    // k-steps of the latent score
  constexpr int kOBlocks = kMhaR / 2 / 8;  // this warpgroup's 128 columns of O, 8 per block
  constexpr int kHalf = kTile / 2;         // tokens a warpgroup scores
  static_assert(kRopeDim == 8 || kRopeDim == 16, "one or two 16-byte rotary chunks per head");
  extern __shared__ __align__(1024) unsigned char smem[];
  const MlaDecodeParams& p = a.p;
  allow_dependent_launch();
  MLAFORGE_PROBE(0);
  const int tid = threadIdx.x, lane = tid & 31;
  const int wg = tid >> 7, tid_w = tid & 127, warp = tid_w >> 5;
  const int g = lane >> 2, q4 = lane & 3;
  const int head = 8 * warp + g;
  const int split = blockIdx.x, b = blockIdx.y, bs = p.block_size;
  float* x_max = reinterpret_cast<float*>(smem + kMhaStages * kMhaStageBytes);  // [2][128]
  uint32_t* x_p = reinterpret_cast<uint32_t*>(x_max + 2 * 128);                // [2][9][128]

  const SplitTiles tiles = split_tiles(p, a.sp, b, split);
  const int begin = tiles.begin, end = tiles.end, t_lo = tiles.lo, t_hi = tiles.hi;
  // The sequence's queries go to the last stage (free until iteration 0 refills it) through cp.async, issued
  // while the bounds load and ahead of the first tiles, so that no thread waits for them before the tiles are in
  // flight. (Loaded into registers after the bounds, they held the copies back for a DRAM round trip: the
  // prologue took 4.6 us at 8K x 16.) Latent queries [heads][2][R], each head's 16-byte chunks XOR-swizzled by
  // head % 8 (the fragment reads below, 8 heads per warp, are then free of bank conflicts), then the rotary
  // queries [heads][rope_dim].
  constexpr int kQlChunks = kMhaHeads * 2 * kMhaR / 4, kQrChunks = kMhaHeads * kRopeDim / 4;
  static_assert((kQlChunks + kQrChunks) * 16 <= kMhaStageBytes, "the queries fit in one stage");
  float* qs = reinterpret_cast<float*>(smem + (kMhaStages - 1) * kMhaStageBytes);
  copy_queries<kMhaR>(p, b, kMhaHeads, kRopeDim, qs, qs + 4 * kQlChunks, tid, kMhaThreads);
  const SplitOutput dst = split_output(p, a.sp, b, split);
  if (t_lo >= t_hi) {
    cp_async_wait(0);
    write_empty_split(dst, a.sp, kMhaHeads, kMhaR, tid, kMhaThreads);
    if (a.merge) merge_splits_in_grid<kMhaR>(p, a.sp, kMhaHeads, b, split, tid, kMhaThreads, smem);
    return;
  }
  const int n = t_hi - t_lo;
  const int32_t* table = p.block_table + static_cast<int64_t>(b) * p.max_blocks;

  // Thread 0 starts every tile's copies: its rotary keys and latent as tensor-map boxes of 64 values (the
  // 128-byte swizzle puts them in tile_offset<true>'s layout), its modality bytes as one bulk copy, all counted
  // into the stage's mbarrier. (As 16-byte cp.async by every thread, issuing a tile took each warp ~0.5 us of a
  // ~1.9 us iteration.) Tokens of a tile outside [begin, end) are copied too; the loop masks them.
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + Shape::kBarOffset);  // [kMhaStages]
  auto issue = [&](int i, int blk) {
    unsigned char* st = smem + (i % kMhaStages) * kMhaStageBytes;
    uint64_t* bar = full + i % kMhaStages;
    const int row0 = blk * bs + (((t_lo + i) * kTile) & (bs - 1));
    mbarrier_arrive_expect(bar, kMhaRopeBytes + kMhaLatBytes + kTile);
#pragma unroll
    for (int j = 0; j < kMhaRopeBytes / kMhaBoxBytes; ++j)
      tma_load_2d(st + j * kMhaBoxBytes, &a.rope_map, 64 * j, row0, bar);
#pragma unroll
    for (int j = 0; j < kMhaLatBytes / kMhaBoxBytes; ++j)
      tma_load_2d(st + kMhaRopeBytes + j * kMhaBoxBytes, &a.lat_map, 64 * j, row0, bar);
    bulk_load(st + kMhaRopeBytes + kMhaLatBytes, p.is_image + row0, kTile, bar);
  };
  // The first tiles in flight, then the queries.
  int next_blk = 0;  // thread 0: the block of the next tile to issue
  if (tid == 0) {
    for (int s = 0; s < kMhaStages; ++s) mbarrier_init(full + s, 1);
    mbarrier_init_fence();
    for (int i = 0; i < kMhaStages - 1 && i < n; ++i) issue(i, table[((t_lo + i) * kTile) >> a.block_shift]);
    if (kMhaStages - 1 < n) next_blk = table[((t_lo + kMhaStages - 1) * kTile) >> a.block_shift];
  }
  cp_async_wait(0);  // the queries
  __syncthreads();   // and the barriers' initialisation
  // Latent queries as A fragments (row g: text query of `head`, row g + 8: its image query), and the head's
  // rotary query in fp32.
  uint32_t qa[kLatSteps][4];
  {
    const float* row = qs + head * 2 * kMhaR;
    load_query_fragments<kLatSteps, kMhaR>(qa, [&](int f) { return swizzled_query_pair(row, head & 7, f); }, q4, true);
  }
  // This head's rotary query: fp32 at 4 pairs; bf16 pairs at 8 pairs, where fp32 spills more (packed, the
  // inner loop's unpacking measured 5% slower at 4 pairs).
  constexpr bool kPackedQ = kRopeDim > 8;
  float qf[kPackedQ ? 1 : kRopeDim];
  uint32_t qp[kPackedQ ? kRopeDim / 2 : 1];
  {
    const float2* q = reinterpret_cast<const float2*>(qs + 4 * kQlChunks + head * kRopeDim);
#pragma unroll
    for (int d = 0; d < kRopeDim / 2; ++d) {
      const float2 v = q[d];
      if constexpr (kPackedQ) {
        qp[d] = pack_bf16x2(v.x, v.y);
      } else {
        qf[2 * d] = v.x;
        qf[2 * d + 1] = v.y;
      }
    }
  }
  float o[kOBlocks][4];
#pragma unroll
  for (int j = 0; j < kOBlocks; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[j][e] = 0.f;
  float m_run = -INFINITY, l_run = 0.f;
  MLAFORGE_PROBE(1);

  for (int i = 0; i < n; ++i) {
    mbarrier_wait(full + i % kMhaStages, (i / kMhaStages) & 1);  // tile i has landed
#ifdef MLAFORGE_PROBE_TIMELINE
    if (i == 0) MLAFORGE_PROBE(2);
#endif
    unsigned char* st = smem + (i % kMhaStages) * kMhaStageBytes;
    unsigned char* lat_t = st + kMhaRopeBytes;
    const unsigned char* img = lat_t + kMhaLatBytes;
    const int pos0 = (t_lo + i) * kTile;
    const int v_lo = max(begin - pos0, 0), v_hi = min(end - pos0, kTile);
    const bool whole = v_lo == 0 && v_hi == kTile;  // uniform over the CTA
    if (!whole) {
      // The first or last tile of the split: latent rows outside [begin, end) to zero, so that their zero
      // probabilities multiply finite values in O += P . C (their scores are masked below).
      for (int e = tid; e < kTile * kChunks; e += kMhaThreads) {
        const int tok = e / kChunks;
        if (tok < v_lo || tok >= v_hi)
          *reinterpret_cast<uint4*>(lat_t + tile_offset<true>(tok, e % kChunks, kChunks)) = uint4{};
      }
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the stores, before wgmma reads them
      __syncthreads();
    }
    const unsigned img_bits = __ballot_sync(0xffffffffu, img[kHalf * wg + lane] != 0);  // this half's tokens

    // S = [Q_text; Q_image] . C^T for this warpgroup's 32 tokens (asynchronous), and meanwhile their rotary scores.
    float s[4][4];
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kLatSteps; ++ks)
      wgmma_64x32(s, qa[ks], wgmma_desc(lat_t + (ks >> 2) * (kTile * 128) + kHalf * wg * 128 + (ks & 3) * 32, 16, 1024),
                  ks > 0 ? 1 : 0);
    wgmma_commit();
    float rs[4][2];
#pragma unroll
    for (int nb = 0; nb < 4; ++nb)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int t = kHalf * wg + 8 * nb + 2 * q4 + e;
        float acc = 0.f;
#pragma unroll
        for (int c = 0; c < kHeadChunks; ++c) {
          const int chunk = head * kHeadChunks + c;
          const uint4 k = *reinterpret_cast<const uint4*>(st + tile_offset<true>(t, chunk, kRopeChunks));
          const uint32_t w[4] = {k.x, k.y, k.z, k.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            float q0, q1;  // query values 8c + 2j, 8c + 2j + 1
            if constexpr (kPackedQ) {
              q0 = __uint_as_float(qp[4 * c + j] << 16);
              q1 = __uint_as_float(qp[4 * c + j] & 0xffff0000u);
            } else {
              q0 = qf[8 * c + 2 * j];
              q1 = qf[8 * c + 2 * j + 1];
            }
            acc = fmaf(q0, __uint_as_float(w[j] << 16), acc);
            acc = fmaf(q1, __uint_as_float(w[j] & 0xffff0000u), acc);
          }
        }
        rs[nb][e] = acc;
      }
    wgmma_wait_all();  // also this warpgroup's accumulation of tile i-1

    float v[4][2];
    float mx = -INFINITY;
#pragma unroll
    for (int nb = 0; nb < 4; ++nb)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int t = 8 * nb + 2 * q4 + e;  // within the half
        const bool is_img = ((img_bits >> t) & 1u) != 0u;
        const float x = ((is_img ? s[nb][2 + e] : s[nb][e]) + rs[nb][e]) * a.score_scale;
        const int ta = kHalf * wg + t;
        v[nb][e] = whole || (ta >= v_lo && ta < v_hi) ? x : -INFINITY;
        mx = fmaxf(mx, v[nb][e]);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    x_max[wg * 128 + tid_w] = mx;
    __syncthreads();  // both halves' maxima are in; both warpgroups are done with tile i-1's stage: refill it
    if (tid == 0) {
      const int f = i + kMhaStages - 1;
      if (f < n) {
        issue(f, next_blk);
        if (f + 1 < n) next_blk = table[((t_lo + f + 1) * kTile) >> a.block_shift];
      }
    }
    // The same running max in both warpgroups (fmaxf is exact and commutative); finite: the tile holds a
    // valid token.
    const float m_new = fmaxf(m_run, fmaxf(mx, x_max[(1 - wg) * 128 + tid_w]));
    const float alpha = exp2f(m_run - m_new);
    m_run = m_new;
    uint32_t own[2][4];  // P of this half's 32 tokens: k-steps 2 wg, 2 wg + 1 of O += P . C
    float sum = 0.f;
#pragma unroll
    for (int nb = 0; nb < 4; ++nb) {
      const float p0 = __bfloat162float(__float2bfloat16_rn(exp2f(v[nb][0] - m_new)));
      const float p1 = __bfloat162float(__float2bfloat16_rn(exp2f(v[nb][1] - m_new)));
      sum += p0 + p1;
      const unsigned bits = (img_bits >> (8 * nb + 2 * q4)) & 3u;
      own[nb / 2][(nb & 1) * 2] = pack_bf16x2((bits & 1u) ? 0.f : p0, (bits & 2u) ? 0.f : p1);      // text row
      own[nb / 2][(nb & 1) * 2 + 1] = pack_bf16x2((bits & 1u) ? p0 : 0.f, (bits & 2u) ? p1 : 0.f);  // image row
    }
    uint32_t* mine = x_p + wg * 9 * 128 + tid_w;
#pragma unroll
    for (int r = 0; r < 8; ++r) mine[r * 128] = own[r / 4][r % 4];
    mine[8 * 128] = __float_as_uint(sum);
    __syncthreads();  // both halves' probabilities are in
    const uint32_t* theirs = x_p + (1 - wg) * 9 * 128 + tid_w;
    uint32_t other[2][4];
#pragma unroll
    for (int r = 0; r < 8; ++r) other[r / 4][r % 4] = theirs[r * 128];
    // Warpgroup 0's half first in both warpgroups (float addition commutes), so that both hold the same l.
    const float sum_other = __uint_as_float(theirs[8 * 128]);
    l_run = l_run * alpha + (wg == 0 ? sum + sum_other : sum_other + sum);
#pragma unroll
    for (int j = 0; j < kOBlocks; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[j][e] *= alpha;
    uint32_t pa[4][4];  // tokens 0-31 from warpgroup 0, 32-63 from warpgroup 1
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        pa[j][r] = wg == 0 ? own[j][r] : other[j][r];
        pa[2 + j][r] = wg == 0 ? other[j][r] : own[j][r];
      }
    // O[:, 128 wg ..] += P . C[:, 128 wg ..]: column blocks 2 wg and 2 wg + 1 of the swizzled latent tile.
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_64x128_mn(o, pa[kk], wgmma_desc(lat_t + 2 * wg * (kTile * 128) + kk * 16 * 128, MLAFORGE_RV_MN_LBO, MLAFORGE_RV_MN_SBO));
    wgmma_commit();  // completes at the next tile's wait
  }
  wgmma_wait_all();
  MLAFORGE_PROBE(3);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
  if (dst.ml != nullptr && wg == 0 && q4 == 0) dst.ml[head] = make_float2(m_run, l_run);
  const float inv_l = 1.f / l_run;  // l >= 1: the row max contributes exp2(0)
  float* out = dst.acc + static_cast<int64_t>(head) * 2 * kMhaR;
#pragma unroll
  for (int j = 0; j < kOBlocks; ++j) {
    const int col = 128 * wg + 8 * j + 2 * q4;
    *reinterpret_cast<float2*>(out + col) = make_float2(o[j][0] * inv_l, o[j][1] * inv_l);
    *reinterpret_cast<float2*>(out + kMhaR + col) = make_float2(o[j][2] * inv_l, o[j][3] * inv_l);
  }
  MLAFORGE_PROBE(4);
  if (a.merge) merge_splits_in_grid<kMhaR>(p, a.sp, kMhaHeads, b, split, tid, kMhaThreads, smem);
  MLAFORGE_PROBE(6);
}

// ---------------------------------------------------------------------------------------------------------
// CUDA-core kernel: fp32 end to end (the F32 path must match a float64 reference to ~1e-5), any shape.
// Grid (split, sequence, head group); 32-token steps; lane t of a warp handles token t when scoring.

struct CcArgs {
  MlaDecodeParams p;
  Splits sp;
  float score_scale;
  int head_group;  // query heads per CTA
  int kv_span;     // KV heads one head group can touch
  int ldk;         // row stride (floats) of the rotary tile: kv_span*rope_dim rounded up to odd
  int ldc;         // row stride (floats) of the latent tile and of each query row: R + 1 (odd)
  int off_q_rope;  // fp32 [head_group][rope_dim]
  int off_q_lat;   // fp32 [head_group][2][ldc]
  int off_k;       // fp32 [kCcTile][ldk]: the group's KV heads' rotary keys
  int off_c;       // fp32 [kCcTile][ldc]
  int off_row;     // int64 [kCcTile]: pool row, -1 past the chunk
  int off_img;     // int32 [kCcTile]
  int off_s;       // fp32 [head_group][kCcTile]: scores, then weights
  int off_o;       // fp32 [head_group][2][R]
  int off_alpha, off_m, off_l;  // fp32 [head_group]
};

// Two consecutive stored values (elements 2i, 2i+1 of a row) as floats, before the group scale.
template <KvFormat F>
__device__ __forceinline__ float2 load_pair(const void* base, int64_t first_elem) {
  if constexpr (F == KvFormat::F32) {
    const float* s = static_cast<const float*>(base) + first_elem;
    return make_float2(s[0], s[1]);
  } else if constexpr (F == KvFormat::BF16) {
    const bf16* s = static_cast<const bf16*>(base) + first_elem;
    return make_float2(__bfloat162float(s[0]), __bfloat162float(s[1]));
  } else if constexpr (F == KvFormat::Int8) {
    const int8_t* s = static_cast<const int8_t*>(base) + first_elem;
    return make_float2(static_cast<float>(s[0]), static_cast<float>(s[1]));
  } else {
    const uint8_t byte = static_cast<const uint8_t*>(base)[first_elem / 2];
    return make_float2(static_cast<float>(static_cast<int>(byte & 15u) - 8),
                       static_cast<float>(static_cast<int>(byte >> 4) - 8));
  }
}

template <KvFormat RF, KvFormat LF>
__global__ void __launch_bounds__(kThreads) mla_decode_cc_kernel(const __grid_constant__ CcArgs a) {
  constexpr bool kRopeQuant = RF == KvFormat::Int8 || RF == KvFormat::Int4;
  constexpr bool kLatQuant = LF == KvFormat::Int8 || LF == KvFormat::Int4;
  extern __shared__ __align__(1024) unsigned char smem[];
  const MlaDecodeParams& p = a.p;
  allow_dependent_launch();
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int split = blockIdx.x, b = blockIdx.y;
  const int H = p.heads, R = p.latent_dim, kv = p.kv_heads, rd = p.rope_dim, bs = p.block_size;
  const int group = H / kv;
  const int h0 = blockIdx.z * a.head_group;
  const int hg = min(a.head_group, H - h0);
  const int kv_lo = h0 / group, kv_hi = (h0 + hg - 1) / group;
  const int kw = (kv_hi - kv_lo + 1) * rd;  // rotary values per token this CTA needs
  const int ldk = a.ldk, ldc = a.ldc;

  const SplitSpan span = split_span(p, a.sp.num_splits, b, split);
  const int c0 = span.c0, c1 = span.c1;
  const SplitOutput dst = split_output(p, a.sp, b, split);
  if (c0 >= c1) {
    write_empty_split(dst, a.sp, hg, R, tid, kThreads, h0);
    return;
  }
  const int32_t* table = p.block_table + static_cast<int64_t>(b) * p.max_blocks;

  float* q_rope_s = reinterpret_cast<float*>(smem + a.off_q_rope);
  float* q_lat_s = reinterpret_cast<float*>(smem + a.off_q_lat);
  float* k_s = reinterpret_cast<float*>(smem + a.off_k);
  float* c_s = reinterpret_cast<float*>(smem + a.off_c);
  int64_t* row_s = reinterpret_cast<int64_t*>(smem + a.off_row);
  int* img_s = reinterpret_cast<int*>(smem + a.off_img);
  float* s_s = reinterpret_cast<float*>(smem + a.off_s);
  float* o_s = reinterpret_cast<float*>(smem + a.off_o);
  float* alpha_s = reinterpret_cast<float*>(smem + a.off_alpha);
  float* m_s = reinterpret_cast<float*>(smem + a.off_m);
  float* l_s = reinterpret_cast<float*>(smem + a.off_l);

  for (int i = tid; i < hg * rd; i += kThreads)
    q_rope_s[i] = p.q_rope[(static_cast<int64_t>(b) * H + h0) * rd + i];
  for (int i = tid; i < hg * 2 * R; i += kThreads) {
    const int hm = i / R, r = i - hm * R;  // hm = 2*h + m
    q_lat_s[hm * ldc + r] = p.q_latent[(static_cast<int64_t>(b) * H + h0) * 2 * R + i];
    o_s[i] = 0.f;
  }
  for (int h = tid; h < hg; h += kThreads) {
    m_s[h] = -INFINITY;
    l_s[h] = 0.f;
  }

  for (int pos0 = c0; pos0 < c1; pos0 += kCcTile) {
    const int n_valid = min(kCcTile, c1 - pos0);
    __syncthreads();  // the previous step is done with every tile buffer
    if (tid < kCcTile) {
      const bool valid = tid < n_valid;
      const int64_t row = valid ? pool_row(table, bs, pos0 + tid) : -1;
      row_s[tid] = row;
      img_s[tid] = valid && p.is_image[row] != 0 ? 1 : 0;
    }
    __syncthreads();

    // Tiles to fp32, a pair of values per thread and step (all widths are even). Rows past the chunk are 0.
    {
      const int pairs = kw / 2;
      for (int i = tid; i < kCcTile * pairs; i += kThreads) {
        const int t = i / pairs, c = 2 * (i - t * pairs);
        const int64_t row = row_s[t];
        float2 v = make_float2(0.f, 0.f);
        if (row >= 0) {
          const int64_t first = (row * kv + kv_lo) * rd + c;
          v = load_pair<RF>(p.k_rope, first);
          if constexpr (kRopeQuant) {
            const float sc = half_bits_to_float(p.k_rope_scale[row * kv + kv_lo + c / rd]);
            v.x *= sc;
            v.y *= sc;
          }
        }
        k_s[t * ldk + c] = v.x;
        k_s[t * ldk + c + 1] = v.y;
      }
    }
    {
      const int pairs = R / 2;
      for (int i = tid; i < kCcTile * pairs; i += kThreads) {
        const int t = i / pairs, c = 2 * (i - t * pairs);
        const int64_t row = row_s[t];
        float2 v = make_float2(0.f, 0.f);
        if (row >= 0) {
          v = load_pair<LF>(p.latent, row * R + c);
          if constexpr (kLatQuant) {
            const int ng = R / p.latent_group;
            const float sc = half_bits_to_float(p.latent_scale[row * ng + c / p.latent_group]);
            v.x *= sc;
            v.y *= sc;
          }
        }
        c_s[t * ldc + c] = v.x;
        c_s[t * ldc + c + 1] = v.y;
      }
    }
    __syncthreads();

    // Scores: thread (h, t) with t = lane, so a warp shares its head (broadcast query reads) and walks 32 rows
    // of odd stride (conflict-free).
    for (int i = tid; i < hg * kCcTile; i += kThreads) {
      const int h = i / kCcTile, t = i - h * kCcTile;
      float s = -INFINITY;
      if (t < n_valid) {
        const float* qr = q_rope_s + h * rd;
        const float* kr = k_s + t * ldk + ((h0 + h) / group - kv_lo) * rd;
        const float* ql = q_lat_s + (h * 2 + img_s[t]) * ldc;
        const float* c = c_s + t * ldc;
        float dot_r = 0.f, dot_l = 0.f;
        for (int k = 0; k < rd; ++k) dot_r = fmaf(qr[k], kr[k], dot_r);
        for (int k = 0; k < R; ++k) dot_l = fmaf(ql[k], c[k], dot_l);
        s = (dot_r + dot_l) * a.score_scale;
      }
      s_s[h * kCcTile + t] = s;
    }
    __syncthreads();

    // Online softmax: a warp per head row, a lane per token. n_valid >= 1 keeps the new max finite.
    for (int h = warp; h < hg; h += kWarps) {
      const float x = s_s[h * kCcTile + lane];
      float mx = x;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_old = m_s[h];
      const float m_new = fmaxf(m_old, mx);
      const float pv = exp2f(x - m_new);
      float sum = pv;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      s_s[h * kCcTile + lane] = pv;
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_new);
        alpha_s[h] = alpha;
        l_s[h] = l_s[h] * alpha + sum;
        m_s[h] = m_new;
      }
    }
    __syncthreads();

    // O[h][m][r] = alpha_h O[h][m][r] + sum over tokens of modality m of p_t c_t[r].
    for (int i = tid; i < hg * R; i += kThreads) {
      const int h = i / R, r = i - h * R;
      const float alpha = alpha_s[h];
      float o_txt = o_s[(h * 2 + 0) * R + r] * alpha, o_img = o_s[(h * 2 + 1) * R + r] * alpha;
      const float* w = s_s + h * kCcTile;
      for (int t = 0; t < n_valid; ++t) {
        const float pc = w[t] * c_s[t * ldc + r];
        if (img_s[t]) {
          o_img += pc;
        } else {
          o_txt += pc;
        }
      }
      o_s[(h * 2 + 0) * R + r] = o_txt;
      o_s[(h * 2 + 1) * R + r] = o_img;
    }
  }
  __syncthreads();

  for (int i = tid; i < hg * 2 * R; i += kThreads) dst.acc[h0 * 2 * R + i] = o_s[i] / l_s[i / (2 * R)];
  if (dst.ml != nullptr)
    for (int h = tid; h < hg; h += kThreads) dst.ml[h0 + h] = make_float2(m_s[h], l_s[h]);
}

// ---------------------------------------------------------------------------------------------------------
// Two-pass kernels for wide latents: bf16 rotary keys and latent (with wgmma and 16 or 32 rotary values per KV
// head also Int8 rotary keys and an Int8/Int4 latent in groups of 8 to 64), at most 32 heads, latent_dim a
// multiple of 128, kv_heads * rope_dim a multiple of 128, rope_dim a multiple of 8 dividing 128. The case: llava-1.5-7b
// at the default conversion (32 heads over 32 KV heads, 32 rotary values per head, latent 1024: 4 KB per
// token). One CTA cannot hold O for 64 (head, modality) rows x 1024 latent columns (256 KB of fp32, the whole
// register file), so the work is cut in two:
//  pass 1, scores (grid (split, sequence), one CTA per SM): streams each 64-token tile through shared memory
//    in chunks of 64 tokens x 128 values, the rotary keys' chunks first, then the latent's, and computes
//        S[h, t] = scale * log2(e) * (q_rope[h] . k_rope[t, kv(h)] + q_latent[h, m(t)] . c_t)
//    with the absorbed queries in shared memory as bf16 [64 rows: text heads 0..31, image heads 32..63][R] (a
//    token keeps the product of its modality's row): rotary dots on CUDA cores and latent products with
//    mma.sync, or on a Hopper both as warpgroup MMAs (see the kernel's comment). Keeps per head a running max and sum
//    of 2^S and writes, per 64-token tile, the weights 2^(S - tile max) as bf16 in a text row and an image row per head
//    (zero for the other modality's tokens) and the tile max; at the end the split's (max, sum) per head.
//  pass 2, values (grid (128-column group of the latent, split, sequence)): streams its split's weight rows,
//    tile maxima and the group's 128 latent columns; scales each row's weights by 2^(tile max - split max)
//    (no exponentials here: the column groups would repeat them) and accumulates O_m += P_m . C on tensor
//    cores; writes O / sum as the split's result for those columns (the combine kernel merges the splits as for
//    the other kernels).
// The latent is read twice and the rotary keys once: 1.5x the bytes of a single pass when they are the same
// size, about 2.6x fewer than the MHA original's K and V at that conversion.
constexpr int kWideRows = 64;     // MMA rows: text heads 0..31, image heads 32..63
constexpr int kWideHeads = 32;
constexpr int kWideChunk = 128;   // bf16 values per token in one pipeline stage
constexpr int kWideLd = kWideChunk + 8;  // smem row stride (bf16) of a chunk: 272 bytes, ldmatrix conflict-free
constexpr int kWideLds = kTile + 4;      // fp32 row stride of the scores pass's score tile
constexpr int kWideLdp = kTile + 8;      // bf16 row stride of the values pass's weight rows in a stage
constexpr int kWideStages = 4;  // pass 2's ring: 107 KB, two CTAs per SM (3 stages: 1% slower; 5: one CTA, 16%)
constexpr int kWideMaxStages = 6;        // pass 1's deepest ring

struct WideArgs {
  MlaDecodeParams p;
  Splits sp;
  float score_scale;  // p.scale * log2(e)
  int capacity;       // positions per sequence in the score workspace: max_blocks * block_size rounded up to kTile
  // Position seq_begin + i at i, per 64-token tile of a split (tile = i / 64):
  bf16* probs;        // [batch, 2, heads, capacity]: 2^(S - tile max) of text (0) and image (1) tokens, else 0
  float* tile_max;    // [batch, capacity / 64, heads]: the tile's max of S
  float2* split_ml;   // [batch, splits, heads]: (max of S, sum of 2^(S - max)) of each split
  int stages;         // pass 1's ring depth (3 .. kWideMaxStages)
  int smem_bytes;
  // Pass 1's shared memory (byte offsets).
  int off_q_lat;      // bf16 [kWideRows][R] in tile_offset<kWgmma>'s layout
  int off_q_rope;     // fp32 [heads][rope_dim]
  int off_stage;      // stages x bf16 [kTile][kWideChunk] in tile_offset<kWgmma>'s layout; a quantised chunk lands
                      // in its rows (q_row_bytes_offset) and is dequantised in place
  int off_img;        // uint8 [4][kTile]: modality of the tiles in flight (tile % 4)
  int off_s;          // fp32 [kWideHeads][kWideLds]: the current tile's rotary scores, then (in place) its scores
};

// Pass 2's stage: the latent columns, the weight rows, then the tile max of each head. A quantised latent lands
// in the columns' rows (q_row_bytes_offset) and is dequantised in place.
constexpr int kWideStageC = kTile * kWideLd * 2;                         // 17408: latent columns [64][136]
constexpr int kWideStageP = kWideRows * kWideLdp * 2;                    // 9216: bf16 P [64 rows][72]
constexpr int kWideStageBytes = kWideStageC + kWideStageP + kWideHeads * 4;
constexpr int kWideValuesSmem = kWideStages * kWideStageBytes;

// Token `tok`'s share (4 threads per token: `part`) of a quantised 128-value chunk, into the rows of a two-pass
// stage's bf16 tile `tile` (q_row_bytes_offset, q_row_scales_offset): its stored row from `src`, its `ng` scales
// (at most 16) from `scale_src` (2 ng bytes, aligned to min(2 ng, 16)). valid == false zero-fills both, so the
// dequantised row is exact zeros.
template <KvFormat F, bool kSwizzled>
__device__ __forceinline__ void copy_wide_q_chunk(unsigned char* tile, const unsigned char* src,
                                                  const uint16_t* scale_src, int ng, int tok, int part, bool valid) {
  constexpr int kRow = row_bytes_128(F);
  unsigned char* dst = tile + q_row_bytes_offset<kSwizzled>(tok);
#pragma unroll
  for (int i = 0; i < kRow / 64; ++i) cp_async(dst + (part + 4 * i) * 16, src + (part + 4 * i) * 16, 16, valid);
  const int bytes = 2 * ng, unit = bytes < 16 ? bytes : 16;
  if (part * unit < bytes)
    cp_async(tile + q_row_scales_offset<kSwizzled, F>(tok) + part * unit,
             reinterpret_cast<const unsigned char*>(scale_src) + part * unit, unit, valid);
}

// copy_wide_q_chunk of latent chunk kc (values 128 kc ..) of pool row `row`, an Int8/Int4 latent of R values
// per token (p.latent_dim, passed as the kernel holds it): the stored row's kc-th 128 values and their 128 /
// latent_group scales.
template <KvFormat LF, bool kSwizzled>
__device__ __forceinline__ void copy_wide_q_latent_chunk(unsigned char* tile, const MlaDecodeParams& p, int R,
                                                         int64_t row, int kc, int tok, int part, bool valid) {
  constexpr int kRow = row_bytes_128(LF);  // stored bytes of 128 values
  const int ng = kWideChunk / p.latent_group;
  copy_wide_q_chunk<LF, kSwizzled>(
      tile, static_cast<const unsigned char*>(p.latent) + row * (R / kWideChunk * kRow) + kc * kRow,
      p.latent_scale + row * (R / p.latent_group) + kc * ng, ng, tok, part, valid);
}

// d[64 x 32] (= or +=) A[64 x 16] . B[16 x 32], both K-major in shared memory; `accumulate` 0 overwrites d.
__device__ __forceinline__ void wgmma_64x32_ss(float (&d)[4][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      : MLAFORGE_WGMMA_D16(d)
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
#else
  __trap();
#endif
}

// kWgmma (sm_90a): the queries and the ring in Hopper's 128-byte swizzle (tile_offset<true>), and the latent
// product as warpgroup MMAs reading both operands from shared memory (warpgroup w: tokens 32 w.., m64n32k16),
// which spares the ldmatrix traffic and instructions of mma.sync (96 KB of shared-memory reads per 16 KB chunk);
// otherwise padded rows (tile_offset<false>) and mma.sync.
// kRopeMma (kWgmma only; the rope dimension, 16 or 32): the rotary part too as warpgroup MMAs into the same
// accumulator, A from registers: row r's query is q_rope[head(r)] in the columns of that head's KV head and zero
// elsewhere, so each lane keeps its two rows' rotary queries (rd / 4 bf16 pairs) and selects them per k-step.
// The zeros cost tensor-core time that is idle anyway; the CUDA-core dots (0) cost issue slots the step lacks.
// RF, LF: the stored rotary keys (BF16, Int8) and latent (BF16, Int8, Int4); quantised ones need kRopeMma. A
// quantised chunk lands as stored (copy_wide_q_chunk) in the rows of its ring slot, and each warp dequantises
// its rows of it in place (dequantise_chunk_in_place) one step ahead: while the warpgroup MMAs of chunk i run,
// chunk i + 1 (landed: the ring waits one chunk further ahead) is dequantised.
template <bool kWgmma, int kRopeMma, KvFormat RF = KvFormat::BF16, KvFormat LF = KvFormat::BF16>
__global__ void __launch_bounds__(kThreads, 1) mla_wide_scores_kernel(const __grid_constant__ WideArgs a) {
  static_assert(kRopeMma == 0 || (kWgmma && (kRopeMma == 16 || kRopeMma == 32)), "rotary MMA: wgmma, rd 16 or 32");
  constexpr bool kRopeQ = RF != KvFormat::BF16, kLatQ = LF != KvFormat::BF16;
  static_assert(RF == KvFormat::BF16 || RF == KvFormat::Int8, "rotary keys bf16 or int8");
  static_assert(!(kRopeQ || kLatQ) || kRopeMma > 0, "quantised chunks: the rotary MMA path");
  static_assert(kThreads == 4 * kTile, "4 threads per token copy a chunk");
  extern __shared__ __align__(1024) unsigned char smem[];
  const MlaDecodeParams& p = a.p;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, q4 = lane & 3;
  const int split = blockIdx.x, b = blockIdx.y;
  const int H = p.heads, R = p.latent_dim, rd = p.rope_dim, bs = p.block_size;
  const int group = H / p.kv_heads;
  const int kr = p.kv_heads * rd;
  const int n_rope = kr / kWideChunk, n_lat = R / kWideChunk, per_tile = n_rope + n_lat;
  const int q_pieces = R / 8;  // 16-byte pieces per query row
  const int a_row = lane & 15, a_col = (lane >> 4) * 8;
  const int bn_row = ((lane >> 4) << 3) + (lane & 7), bn_col = ((lane >> 3) & 1) * 8;

  const SplitSpan span = split_span(p, a.sp.num_splits, b, split);
  const int seq_begin = span.seq_begin, c0 = span.c0, c1 = span.c1;
  float2* ml_out = a.split_ml + (static_cast<int64_t>(b) * a.sp.num_splits + split) * H;
  if (c0 >= c1) {
    for (int h = tid; h < H; h += kThreads) ml_out[h] = make_float2(-INFINITY, 0.f);
    return;
  }
  const int num_tiles = (c1 - c0 + kTile - 1) / kTile;
  const int32_t* table = p.block_table + static_cast<int64_t>(b) * p.max_blocks;
  const int rel0 = c0 - seq_begin;  // a multiple of kTile

  unsigned char* q_lat_s = smem + a.off_q_lat;
  float* q_rope_s = reinterpret_cast<float*>(smem + a.off_q_rope);
  uint8_t* img_s = smem + a.off_img;
  float* s_buf = reinterpret_cast<float*>(smem + a.off_s);
  constexpr int kPieces = kWideChunk / 8;  // 16-byte pieces per token row of a chunk
  constexpr int kChunkBytes = tile_bytes<kWgmma>(kPieces);  // a ring slot
  auto stage_ptr = [&](int slot) { return smem + a.off_stage + slot * kChunkBytes; };

  // Copy plan: 4 threads per token, each 4 of the chunk's 16 pieces of 16 bytes. A token's pool row is looked
  // up when its tile's first chunk is issued, from a block id loaded one tile ahead; its modality byte is
  // loaded then and stored to shared memory at the next step (read no earlier than two steps later).
  const int tok = tid >> 2, part = tid & 3;
  int64_t row = 0;
  bool valid = false;
  int next_block = 0;
  {
    const int pos = c0 + tok;
    if (pos < c1) next_block = table[pos / bs];
  }
  uint32_t pend_img = 0;
  int pend_tile = -1;
  const int total_steps = num_tiles * per_tile;
  auto flush_img = [&]() {
    if (pend_tile >= 0) {
      img_s[(pend_tile & 3) * kTile + tok] = static_cast<uint8_t>(pend_img);
      pend_tile = -1;
    }
  };
  // The next chunk to issue (tile, chunk in it, ring slot), advanced by each issue: no divisions per step.
  int i_tile = 0, i_k = 0, i_slot = 0;
  auto issue = [&]() {
    const int tile = i_tile, k = i_k;
    if (k == 0) {
      flush_img();  // only in the prologue does a tile's first chunk follow the previous one's within a step
      const int pos = c0 + tile * kTile + tok;
      valid = pos < c1;
      row = valid ? static_cast<int64_t>(next_block) * bs + pos % bs : 0;
      const int pos_next = pos + kTile;
      if (tile + 1 < num_tiles && pos_next < c1) next_block = table[pos_next / bs];
      if (part == 0) {
        pend_img = valid ? static_cast<uint32_t>(p.is_image[row]) : 0u;
        pend_tile = tile;
      }
    }
    unsigned char* dst = stage_ptr(i_slot);
    if (++i_k == per_tile) {
      i_k = 0;
      ++i_tile;
    }
    if (++i_slot == a.stages) i_slot = 0;
    const bool rope_chunk = k < n_rope;
    if (rope_chunk && kRopeQ) {  // int8: kr bytes per token; chunk k holds KV heads k (128 / rd) ..
      if constexpr (kRopeQ)
        copy_wide_q_chunk<RF, kWgmma>(dst, static_cast<const unsigned char*>(p.k_rope) + row * kr + k * kWideChunk,
                                      p.k_rope_scale + row * p.kv_heads + k * (kWideChunk / rd), kWideChunk / rd, tok,
                                      part, valid);
      return;
    }
    if (!rope_chunk && kLatQ) {
      if constexpr (kLatQ) copy_wide_q_latent_chunk<LF, kWgmma>(dst, p, R, row, k - n_rope, tok, part, valid);
      return;
    }
    const bf16* src = rope_chunk ? static_cast<const bf16*>(p.k_rope) + row * kr + k * kWideChunk
                                 : static_cast<const bf16*>(p.latent) + row * R + (k - n_rope) * kWideChunk;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      cp_async(dst + tile_offset<kWgmma>(tok, part + 4 * i, kPieces), src + (part + 4 * i) * 8, 16, valid);
  };
  for (int s = 0; s < a.stages - 1; ++s) {
    if (s < total_steps) issue();
    cp_async_commit();
  }
  // Queries: latent ones to bf16 rows (zero rows for absent heads), rotary ones as floats.
  {
    const float* ql = p.q_latent + static_cast<int64_t>(b) * H * 2 * R;
    for (int i = tid; i < kWideRows * q_pieces; i += kThreads) {
      const int r = i / q_pieces, piece = i - r * q_pieces, h = r & (kWideHeads - 1), m = r >> 5;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (h < H) {
        const float4* src = reinterpret_cast<const float4*>(ql + (h * 2 + m) * R + piece * 8);
        const float4 x0 = src[0], x1 = src[1];
        v = make_uint4(pack_bf16x2(x0.x, x0.y), pack_bf16x2(x0.z, x0.w), pack_bf16x2(x1.x, x1.y), pack_bf16x2(x1.z, x1.w));
      }
      *reinterpret_cast<uint4*>(q_lat_s + tile_offset<kWgmma>(r, piece, q_pieces)) = v;
    }
    const float* qr = p.q_rope + static_cast<int64_t>(b) * H * rd;
    for (int i = tid; i < H * rd; i += kThreads) q_rope_s[i] = qr[i];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (kWgmma) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // for wgmma's reads
#endif
  }

  // Warp w: MMA row tile rt = w & 3 (rows 16 rt..: text heads for rt < 2, image heads otherwise), tokens
  // 32 th.. of the tile (th = w >> 2); four 8-token n-blocks.
  const int rt = warp & 3, th = warp >> 2;
  const bool rows_image = rt >= 2;
  const bool rows_used = 16 * (rt & 1) < H;
  float acc[4][4];
  bool any_mine = false;
  float m_run = -INFINITY, l_run = 0.f;  // head tid >> 3 (8 lanes per head)
  // kRopeMma: this lane's rows g and g + 8 of its warp's row tile are heads h_lo, h_hi (rows past 32: the same
  // heads' image rows, with the same rotary query); pair j holds query dims 8 j + 2 q, +1.
  constexpr int kRopePairs = kRopeMma > 0 ? kRopeMma / 8 : 1;
  uint32_t q_pair[2][kRopePairs];
  int kv_of_row[2];
  if constexpr (kRopeMma > 0) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int h = (rt & 1) * 16 + g + 8 * half;
      kv_of_row[half] = h < H ? h / group : -1;
      const float* qr = p.q_rope + (static_cast<int64_t>(b) * H + (h < H ? h : 0)) * kRopeMma;
#pragma unroll
      for (int j = 0; j < kRopePairs; ++j) q_pair[half][j] = h < H ? pack_bf16x2(qr[8 * j + 2 * q4], qr[8 * j + 2 * q4 + 1]) : 0u;
    }
  }
  const int sh = tid >> 3, sj = tid & 7;

  // A chunk (tile, k) in ring slot `slot`, stored quantised, dequantised over itself (every warp its rows; a no-op
  // for bf16 chunks), fenced for the warpgroup MMAs that read it after the next CTA barrier.
  const int rope_shift = 31 - __clz(rd), lat_shift = kLatQ ? 31 - __clz(p.latent_group) : 0;  // log2 of the groups
  auto dequantise_chunk = [&](int tile, int k, int slot) {
    if constexpr (kRopeQ || kLatQ) {
      const bool rope_chunk = k < n_rope;
      if (!(rope_chunk ? kRopeQ : kLatQ)) return;
      unsigned char* st = stage_ptr(slot);
      const int n_valid = min(kTile, c1 - (c0 + tile * kTile));
      if (rope_chunk) {  // one scale per KV head (rd values)
        if constexpr (kRopeQ)
          dequantise_chunk_in_place<RF, kWgmma, kWarps>(st, kWideChunk / rd, rope_shift, warp, lane, n_valid);
      } else {
        if constexpr (kLatQ)
          dequantise_chunk_in_place<LF, kWgmma, kWarps>(st, kWideChunk / p.latent_group, lat_shift, warp, lane,
                                                        n_valid);
      }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the stores, before wgmma reads them
#endif
    }
  };
  constexpr bool kAnyQ = kRopeQ || kLatQ;
  if constexpr (kAnyQ) {  // chunk 0 now; each step then dequantises the next one while its own MMAs run
    cp_async_wait(a.stages - 2);
    __syncthreads();
    dequantise_chunk(0, 0, 0);
  }

  int c_tile = 0, c_k = 0, c_slot = 0;  // the chunk this step consumes
  for (int step = 0; step < total_steps; ++step) {
    cp_async_wait(kAnyQ ? a.stages - 3 : a.stages - 2);  // quantised: the next chunk too, to dequantise it ahead
    __syncthreads();
    flush_img();  // the byte's load has had a whole step to land
    if (step + a.stages - 1 < total_steps) issue();
    cp_async_commit();

    const int tile = c_tile, k = c_k;
    const int n_valid = min(kTile, c1 - (c0 + tile * kTile));
    const unsigned char* st = stage_ptr(c_slot);
    if (++c_k == per_tile) {
      c_k = 0;
      ++c_tile;
    }
    if (++c_slot == a.stages) c_slot = 0;
    const uint8_t* img = img_s + (tile & 3) * kTile;
    if constexpr (kRopeMma > 0) {
      if (k < n_rope) {
        // Columns 16 ks.. of this chunk belong to KV head kv0 + 16 ks / rd, dims 16 ks % rd + 2 q (+1) and + 8.
        const int kv0 = k * (kWideChunk / kRopeMma);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kWideChunk / 16; ++ks) {
          const int kvh = kv0 + ks * 16 / kRopeMma;
          const int j0 = (ks * 16 % kRopeMma) / 8;
          uint32_t qa[4];
          qa[0] = kv_of_row[0] == kvh ? q_pair[0][j0] : 0u;
          qa[1] = kv_of_row[1] == kvh ? q_pair[1][j0] : 0u;
          qa[2] = kv_of_row[0] == kvh ? q_pair[0][j0 + 1] : 0u;
          qa[3] = kv_of_row[1] == kvh ? q_pair[1][j0 + 1] : 0u;
          const uint64_t db = wgmma_desc(st + (ks >> 2) * (kTile * 128) + th * 32 * 128 + (ks & 3) * 32, 16, 1024);
          wgmma_64x32(acc, qa, db, k > 0 || ks > 0 ? 1 : 0);
        }
        wgmma_commit();
        if (step + 1 < total_steps) dequantise_chunk(c_tile, c_k, c_slot);  // the next chunk (c_*: advanced above)
        wgmma_wait_all();
        continue;
      }
    } else if (k < n_rope) {
      // Rotary dots of the query heads whose KV heads lie in this chunk: (head, token) pairs, a warp per head
      // and 32 tokens, 16-byte reads (conflict-free: 272-byte rows).
      const int kv0 = k * kWideChunk / rd;
      const int nh = (kWideChunk / rd) * group;
      for (int i = tid; i < nh * kTile; i += kThreads) {
        const int h = kv0 * group + i / kTile, t = i % kTile;
        const int piece0 = (h / group - kv0) * rd / 8;
        const float* qp = q_rope_s + h * rd;
        float s = 0.f;
        for (int d = 0; d < rd; d += 8) {
          const uint4 raw = *reinterpret_cast<const uint4*>(st + tile_offset<kWgmma>(t, piece0 + d / 8, kPieces));
          const __nv_bfloat162* kv2 = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 kf = __bfloat1622float2(kv2[e]);
            s += qp[d + 2 * e] * kf.x + qp[d + 2 * e + 1] * kf.y;
          }
        }
        s_buf[h * kWideLds + t] = s;
      }
      continue;
    }
    const int kc = k - n_rope;
    if constexpr (kWgmma) {
      // Warpgroup th: all 64 rows x its 32 tokens; the k-step's 16 columns are 32 bytes into a 128-byte atom.
      any_mine = rows_used;
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kWideChunk / 16; ++ks) {
        const int kq = kc * (kWideChunk / 16) + ks;  // k-step in the query row
        const uint64_t da = wgmma_desc(q_lat_s + (kq >> 2) * (kWideRows * 128) + (kq & 3) * 32, 16, 1024);
        const uint64_t db = wgmma_desc(st + (ks >> 2) * (kTile * 128) + th * 32 * 128 + (ks & 3) * 32, 16, 1024);
        wgmma_64x32_ss(acc, da, db, kRopeMma > 0 || kc > 0 || ks > 0 ? 1 : 0);
      }
      wgmma_commit();
      if (step + 1 < total_steps) dequantise_chunk(c_tile, c_k, c_slot);  // the next chunk (c_*: advanced above)
      wgmma_wait_all();  // the stage is refilled after the next step's barrier
    } else {
      if (kc == 0) {
        // Does any valid token among this warp's 32 have the modality of its rows? (Images come in long runs:
        // half the warps usually skip the latent product.)
        const int t = th * 32 + lane;
        any_mine = rows_used && __any_sync(0xffffffffu, t < n_valid && (img[t] != 0) == rows_image);
#pragma unroll
        for (int nb = 0; nb < 4; ++nb)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[nb][i] = 0.f;
      }
      if (any_mine) {
#pragma unroll
        for (int ks = 0; ks < kWideChunk / 16; ++ks) {
          uint32_t qa[4];
          ldmatrix_x4(qa, q_lat_s + tile_offset<false>(rt * 16 + a_row, (kc * kWideChunk + ks * 16 + a_col) / 8, q_pieces));
#pragma unroll
          for (int nb2 = 0; nb2 < 2; ++nb2) {
            uint32_t kb[4];
            ldmatrix_x4(kb, st + tile_offset<false>(th * 32 + nb2 * 16 + bn_row, (ks * 16 + bn_col) / 8, kPieces));
            mma_bf16_16816(acc[2 * nb2], qa, kb[0], kb[1]);
            mma_bf16_16816(acc[2 * nb2 + 1], qa, kb[2], kb[3]);
          }
        }
      }
    }
    if (kc != n_lat - 1) continue;

    // Tile done: each (head, token) takes the row of the token's modality, plus its rotary part (in place: one
    // thread per element).
    if (any_mine) {
#pragma unroll
      for (int nb = 0; nb < 4; ++nb)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int h = (rt & 1) * 16 + g + 8 * half;
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int t = th * 32 + nb * 8 + 2 * q4 + e;
            if (h < H && t < n_valid && (img[t] != 0) == rows_image)
              s_buf[h * kWideLds + t] = (acc[nb][2 * half + e] + (kRopeMma > 0 ? 0.f : s_buf[h * kWideLds + t])) * a.score_scale;
          }
        }
    }
    __syncthreads();
    // Running max and sum per head (8 lanes per head, 8 tokens per lane), and the scores to global memory.
    {
      const bool used = sh < H;
      float v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int t = sj * 8 + e;
        v[e] = used && t < n_valid ? s_buf[sh * kWideLds + t] : -INFINITY;
      }
      const float mx = max_over_8_lanes(v);
      if (used) {  // the tile's first token is valid: mx is finite
        // The tile's weights 2^(S - tile max), to global memory as bf16 in a text row and an image row (zero
        // for the other modality's tokens and past the end); the running sum takes them unrounded.
        float pw[8], sum = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          pw[e] = exp2f(v[e] - mx);
          sum += pw[e];
        }
        const float m_new = fmaxf(m_run, mx);
        l_run = l_run * exp2f(m_run - m_new) + sum * exp2f(mx - m_new);  // this lane's share; summed at the end
        m_run = m_new;
        uint32_t pt[4], pi[4];
#pragma unroll
        for (int e = 0; e < 8; e += 2) {
          const bool i0 = img[sj * 8 + e] != 0, i1 = img[sj * 8 + e + 1] != 0;
          pt[e / 2] = pack_bf16x2(i0 ? 0.f : pw[e], i1 ? 0.f : pw[e + 1]);
          pi[e / 2] = pack_bf16x2(i0 ? pw[e] : 0.f, i1 ? pw[e + 1] : 0.f);
        }
        const int64_t rel = rel0 + tile * kTile + sj * 8;
        bf16* dst = a.probs + (static_cast<int64_t>(b) * 2 * H + sh) * a.capacity + rel;
        *reinterpret_cast<uint4*>(dst) = make_uint4(pt[0], pt[1], pt[2], pt[3]);
        *reinterpret_cast<uint4*>(dst + static_cast<int64_t>(H) * a.capacity) = make_uint4(pi[0], pi[1], pi[2], pi[3]);
        if (sj == 0) a.tile_max[(static_cast<int64_t>(b) * (a.capacity / kTile) + (rel0 / kTile + tile)) * H + sh] = mx;
      }
    }
  }
  cp_async_wait(0);
  // Each lane's l_run is its 8 tokens' share under the common running max: sum over the 8 lanes.
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 4);
  if (sh < H && sj == 0) ml_out[sh] = make_float2(m_run, l_run);
}

// LF: the stored latent (BF16, Int8, Int4); a quantised tile lands as stored in the rows of its columns' bf16 tile
// (copy_wide_q_chunk) and each warp dequantises its rows of it in place one tile ahead (the ring waits one tile
// further ahead), as pass 1 does.
template <KvFormat LF = KvFormat::BF16>
__global__ void __launch_bounds__(kThreads, 2) mla_wide_values_kernel(const __grid_constant__ WideArgs a) {
  constexpr bool kQ = LF != KvFormat::BF16;
  static_assert(kThreads == 4 * kTile, "4 threads per token copy a tile");
  extern __shared__ __align__(1024) unsigned char smem[];
  const MlaDecodeParams& p = a.p;
  allow_dependent_launch();
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, q4 = lane & 3;
  const int cg = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int H = p.heads, R = p.latent_dim, bs = p.block_size;
  const int col0 = cg * kWideChunk;

  const SplitSpan span = split_span(p, a.sp.num_splits, b, split);
  const int seq_begin = span.seq_begin, c0 = span.c0, c1 = span.c1;
  const SplitOutput dst = split_output(p, a.sp, b, split);
  if (c0 >= c1) {  // an empty split: the combine skips it; a lone one (empty sequence) still defines out and lse
    if (a.sp.num_splits == 1) {
      for (int i = tid; i < H * 2 * kWideChunk; i += kThreads) dst.acc[(i / kWideChunk) * R + col0 + i % kWideChunk] = 0.f;
      if (cg == 0 && dst.ml != nullptr)
        for (int h = tid; h < H; h += kThreads) dst.ml[h] = make_float2(-INFINITY, 0.f);
    }
    return;
  }
  const int num_tiles = (c1 - c0 + kTile - 1) / kTile;
  const int32_t* table = p.block_table + static_cast<int64_t>(b) * p.max_blocks;
  const int rel0 = c0 - seq_begin;
  const float2* ml = a.split_ml + (static_cast<int64_t>(b) * a.sp.num_splits + split) * H;
  const bf16* p_src = a.probs + static_cast<int64_t>(b) * 2 * H * a.capacity + rel0;
  const float* tmax_src = a.tile_max + (static_cast<int64_t>(b) * (a.capacity / kTile) + rel0 / kTile) * H;
  auto stage_ptr = [&](int tile) { return smem + (tile % kWideStages) * kWideStageBytes; };

  // Per tile: the latent columns (4 threads per token), the 64 probability rows (text heads, then image heads;
  // absent heads zero-filled) and the heads' tile maxima.
  const int tok = tid >> 2, part = tid & 3;
  int next_block = 0;
  if (c0 + tok < c1) next_block = table[(c0 + tok) / bs];
  auto issue = [&](int tile) {
    unsigned char* st = stage_ptr(tile);
    const int pos = c0 + tile * kTile + tok;
    const bool valid = pos < c1;
    const int64_t row = valid ? static_cast<int64_t>(next_block) * bs + pos % bs : 0;
    if (tile + 1 < num_tiles && pos + kTile < c1) next_block = table[(pos + kTile) / bs];
    if constexpr (kQ) {
      copy_wide_q_latent_chunk<LF, false>(st, p, R, row, cg, tok, part, valid);
    } else {
      const bf16* src = static_cast<const bf16*>(p.latent) + row * R + col0;
      bf16* d = reinterpret_cast<bf16*>(st) + tok * kWideLd;
#pragma unroll
      for (int i = 0; i < 4; ++i) cp_async(d + (part + 4 * i) * 8, src + (part + 4 * i) * 8, 16, valid);
    }
    bf16* pd = reinterpret_cast<bf16*>(st + kWideStageC);
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // 64 rows x 8 pieces of 16 bytes
      const int q = tid + kThreads * i, r = q >> 3, piece = q & 7, h = r & (kWideHeads - 1), m = r >> 5;
      const bool used = h < H;
      cp_async(pd + r * kWideLdp + piece * 8,
               p_src + (static_cast<int64_t>(m) * H + (used ? h : 0)) * a.capacity + tile * kTile + piece * 8, 16, used);
    }
    if (tid < H) cp_async(st + kWideStageC + kWideStageP + 4 * tid, tmax_src + static_cast<int64_t>(tile) * H + tid, 4, true);
  };
  for (int t = 0; t < kWideStages - 1; ++t) {
    if (t < num_tiles) issue(t);
    cp_async_commit();
  }

  const int rt = warp & 3, ch = warp >> 2;  // MMA: rows 16 rt.., latent columns 64 ch.. of the group
  const bool rows_used = 16 * (rt & 1) < H;
  // This lane's rows g and g + 8: heads h_lo, h_hi and their split maxima.
  int head[2];
  float m_split[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    head[half] = (rt & 1) * 16 + g + 8 * half;
    m_split[half] = head[half] < H ? ml[head[half]].x : 0.f;
  }
  const int a_row = lane & 15, a_col = (lane >> 4) * 8;
  const int bk_row = (((lane >> 3) & 1) << 3) + (lane & 7), bk_col = (lane >> 4) * 8;
  float acc[8][4];
#pragma unroll
  for (int nb = 0; nb < 8; ++nb)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nb][i] = 0.f;

  // kQ: tile t's columns dequantised over themselves (each warp its rows).
  const int lat_shift = kQ ? 31 - __clz(p.latent_group) : 0;  // log2 of the latent's group
  auto dequantise_tile = [&](int tile) {
    if constexpr (kQ) {
      dequantise_chunk_in_place<LF, false, kWarps>(stage_ptr(tile), kWideChunk / p.latent_group, lat_shift, warp, lane,
                                                   min(kTile, c1 - (c0 + tile * kTile)));
    }
  };
  if constexpr (kQ) {  // tile 0 now; each step then dequantises the next tile before its own products
    cp_async_wait(kWideStages - 2);
    __syncthreads();
    dequantise_tile(0);
  }

  for (int tile = 0; tile < num_tiles; ++tile) {
    cp_async_wait(kQ ? kWideStages - 3 : kWideStages - 2);  // quantised: the next tile too
    __syncthreads();  // the tile has landed everywhere; everyone is done with the stage refilled below
    if (tile + kWideStages - 1 < num_tiles) issue(tile + kWideStages - 1);
    cp_async_commit();
    if (kQ && tile + 1 < num_tiles) dequantise_tile(tile + 1);  // read by the products after the next barrier
    if (!rows_used) continue;
    const unsigned char* st = stage_ptr(tile);
    const bf16* cs = reinterpret_cast<const bf16*>(st);
    const bf16* ps = reinterpret_cast<const bf16*>(st + kWideStageC);
    const float* tmax = reinterpret_cast<const float*>(st + kWideStageC + kWideStageP);
    // P = 2^(S - split max) = 2^(S - tile max) * 2^(tile max - split max): the second factor per row, <= 1.
    float alpha[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) alpha[half] = head[half] < H ? exp2f(tmax[head[half]] - m_split[half]) : 0.f;
#pragma unroll
    for (int ks = 0; ks < kTile / 16; ++ks) {
      uint32_t pa[4];  // rows g, g + 8, g, g + 8 (tokens +8 in the last two)
      ldmatrix_x4(pa, ps + (rt * 16 + a_row) * kWideLdp + ks * 16 + a_col);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&pa[i]));
        pa[i] = pack_bf16x2(f.x * alpha[i & 1], f.y * alpha[i & 1]);
      }
#pragma unroll
      for (int cb = 0; cb < 4; ++cb) {
        uint32_t c4[4];  // latent rows 16 ks.., columns 64 ch + 16 cb..: n-block 2cb in c4[0..1], 2cb+1 in c4[2..3]
        ldmatrix_x4_trans(c4, cs + (ks * 16 + bk_row) * kWideLd + ch * 64 + cb * 16 + bk_col);
        mma_bf16_16816(acc[2 * cb], pa, c4[0], c4[1]);
        mma_bf16_16816(acc[2 * cb + 1], pa, c4[2], c4[3]);
      }
    }
  }
  cp_async_wait(0);

  if (rows_used) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int h = head[half], m = rt >> 1;
      if (h < H) {
        const float inv_l = 1.f / ml[h].y;  // >= 1: the split's max contributes 2^0
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
          const int col = col0 + ch * 64 + nb * 8 + 2 * q4;
          *reinterpret_cast<float2*>(dst.acc + (h * 2 + m) * R + col) =
              make_float2(acc[nb][2 * half] * inv_l, acc[nb][2 * half + 1] * inv_l);
        }
      }
    }
  }
  if (cg == 0 && dst.ml != nullptr)
    for (int h = tid; h < H; h += kThreads) dst.ml[h] = ml[h];
}

// ---------------------------------------------------------------------------------------------------------
// Combine: out[b,h] = sum_s w_s acc_s / sum_s w_s with w_s = l_s 2^(m_s - max m), and lse[b,h] = (max m, sum_s w_s);
// splits past the end of the sequence hold nothing (they were never written) and are not read. Grid (heads, batch).
struct CombineArgs {
  const float* part_acc;  // [batch, splits, heads, 2, R]
  const float2* part_ml;  // [batch, splits, heads]
  float* out;             // [batch, heads, 2, R]
  float2* lse;            // [batch, heads]: the merged (max, sum), or nullptr
  const int32_t* seq_begin;
  const int32_t* seq_end;
  int heads, latent_dim, num_splits;
  bool every_split_written;  // the row-pair kernel writes (-inf, 0) for empty splits; the others skip them
};

__global__ void __launch_bounds__(kCombineThreads) mla_combine_kernel(const __grid_constant__ CombineArgs a) {
  __shared__ float weight_s[kMaxSplits];
  __shared__ float red_s[kCombineThreads / 32];
  __shared__ float total_s;
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  wait_for_prerequisite_grid();
  const int len = a.seq_end[b] - a.seq_begin[b];
  const int chunk = split_chunk(len, a.num_splits);
  const int active = a.every_split_written ? a.num_splits : len > 0 ? min(a.num_splits, (len + chunk - 1) / chunk) : 0;
  const int64_t slot0 = static_cast<int64_t>(b) * a.num_splits;

  float mx = -INFINITY;
  for (int s = tid; s < active; s += kCombineThreads) mx = fmaxf(mx, a.part_ml[(slot0 + s) * a.heads + h].x);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (lane == 0) red_s[warp] = mx;
  __syncthreads();
  mx = red_s[0];
#pragma unroll
  for (int w = 1; w < kCombineThreads / 32; ++w) mx = fmaxf(mx, red_s[w]);
  __syncthreads();  // red_s is reused below

  float sum = 0.f;
  for (int s = tid; s < active; s += kCombineThreads) {
    const float w = split_weight(a.part_ml[(slot0 + s) * a.heads + h], mx);
    weight_s[s] = w;
    sum += w;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) red_s[warp] = sum;
  __syncthreads();
  if (tid == 0) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < kCombineThreads / 32; ++w) t += red_s[w];
    total_s = t;
    if (a.lse != nullptr) a.lse[static_cast<int64_t>(b) * a.heads + h] = make_float2(mx, t);
  }
  __syncthreads();
  const float inv_total = total_s > 0.f ? 1.f / total_s : 0.f;

  // out = sum_s w_s acc_s / total. A split with weight 0 may hold no accumulators at all (never written):
  // its values are loaded but selected away, never multiplied (0 * NaN). Four splits' loads are issued
  // before their sums, so a thread waits on memory once per four splits rather than once per split.
  const int width = 2 * a.latent_dim;
  const int64_t split_stride = static_cast<int64_t>(a.heads) * width;
  const float* src = a.part_acc + (slot0 * a.heads + h) * width;
  float* out = a.out + (static_cast<int64_t>(b) * a.heads + h) * width;
  if (width % 4 == 0) {  // rows of 16-byte multiples at 16-byte aligned bases (workspace, ATen allocations)
    for (int c4 = tid; c4 < width / 4; c4 += kCombineThreads) {
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int s0 = 0; s0 < active; s0 += 4) {
        float4 x[4];
#pragma unroll
        for (int u = 0; u < 4; ++u)
          x[u] = s0 + u < active ? reinterpret_cast<const float4*>(src + (s0 + u) * split_stride)[c4] : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          add_weighted(acc, s0 + u < active ? weight_s[s0 + u] : 0.f, x[u]);
        }
      }
      reinterpret_cast<float4*>(out)[c4] = make_float4(acc.x * inv_total, acc.y * inv_total, acc.z * inv_total, acc.w * inv_total);
    }
    return;
  }
  for (int col = tid; col < width; col += kCombineThreads) {
    float acc = 0.f;
    for (int s = 0; s < active; ++s) {
      const float w = weight_s[s];
      if (w != 0.f) acc += w * src[s * split_stride + col];
    }
    out[col] = acc * inv_total;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side.

using TcKernel = void (*)(TcArgs);
using CcKernel = void (*)(CcArgs);

// (row tiles, column tiles per warp) pairs that have a tensor-core instantiation.
template <KvFormat RF, KvFormat LF>
TcKernel tc_kernel_for(int ht, int ctw) {
  if (ctw == 1) {
    if (ht == 1) return mla_decode_tc_kernel<RF, LF, 1, 1>;
    if (ht == 2) return mla_decode_tc_kernel<RF, LF, 2, 1>;
    if (ht == 4) return mla_decode_tc_kernel<RF, LF, 4, 1>;
  } else if (ctw == 2) {
    if (ht == 1) return mla_decode_tc_kernel<RF, LF, 1, 2>;
    if (ht == 2) return mla_decode_tc_kernel<RF, LF, 2, 2>;
  }
  return nullptr;
}

// fn(rf, lf) with the stored formats as std::integral_constant types, for those the tensor-core paths take
// (BF16/Int8 rotary keys x BF16/Int8/Int4 latent); nullptr for the others.
template <typename Kernel, typename Fn>
Kernel for_tensor_core_formats(KvFormat rf, KvFormat lf, Fn&& fn) {
  using F = KvFormat;
  auto with_latent = [&](auto r) -> Kernel {
    if (lf == F::BF16) return fn(r, std::integral_constant<F, F::BF16>{});
    if (lf == F::Int8) return fn(r, std::integral_constant<F, F::Int8>{});
    if (lf == F::Int4) return fn(r, std::integral_constant<F, F::Int4>{});
    return nullptr;
  };
  if (rf == F::BF16) return with_latent(std::integral_constant<F, F::BF16>{});
  if (rf == F::Int8) return with_latent(std::integral_constant<F, F::Int8>{});
  return nullptr;
}

TcKernel tc_kernel(KvFormat rf, KvFormat lf, int ht, int ctw) {
  return for_tensor_core_formats<TcKernel>(
      rf, lf, [&](auto r, auto l) { return tc_kernel_for<decltype(r)::value, decltype(l)::value>(ht, ctw); });
}

using RvKernel = void (*)(RvArgs);
using WideKernel = void (*)(WideArgs);

// Row-pair instantiations for kKR = kR = 128: warps per consumer (row tiles of 8 heads), wgmma or mma.sync;
// quantised caches (Int8 rotary keys, Int8/Int4 latent) with wgmma only.
RvKernel rowpair_kernel(int row_warps, bool wgmma, KvFormat rf = KvFormat::BF16, KvFormat lf = KvFormat::BF16) {
  if (wgmma) {
    if (row_warps != 4) return nullptr;
    return for_tensor_core_formats<RvKernel>(rf, lf, [](auto r, auto l) -> RvKernel {
      return mla_decode_rowpair_kernel<4, 128, 128, true, decltype(r)::value, decltype(l)::value>;
    });
  }
  if (rf != KvFormat::BF16 || lf != KvFormat::BF16) return nullptr;
  if (row_warps == 2) return mla_decode_rowpair_kernel<2, 128, 128, false>;
  if (row_warps == 4) return mla_decode_rowpair_kernel<4, 128, 128, false>;
  return nullptr;
}

// The MHA row-pair kernel where this build has sm_90a code (its wgmma traps elsewhere; the plan checks the device).
RvKernel rowpair_mha_kernel(int rope_dim) {
#ifdef MLAFORGE_CUDA_SM90A
  if (rope_dim == 8) return mla_decode_rowpair_mha_kernel<8>;
  if (rope_dim == 16) return mla_decode_rowpair_mha_kernel<16>;
#endif
  (void)rope_dim;
  return nullptr;
}

// The two-pass scores kernel for a build with (or without) sm_90a code, rotary width rd and stored formats;
// nullptr where none is instantiated (quantised parts: the rotary MMA path only, rd 16 or 32).
template <KvFormat RF, KvFormat LF>
WideKernel wide_scores_kernel_for(bool wgmma, int rd) {
  constexpr bool kAnyQ = RF != KvFormat::BF16 || LF != KvFormat::BF16;
  if (wgmma && rd == 32) return mla_wide_scores_kernel<true, 32, RF, LF>;
  if (wgmma && rd == 16) return mla_wide_scores_kernel<true, 16, RF, LF>;
  if constexpr (!kAnyQ) return wgmma ? mla_wide_scores_kernel<true, 0> : mla_wide_scores_kernel<false, 0>;
  return nullptr;
}
WideKernel wide_scores_kernel(bool wgmma, int rd, KvFormat rf, KvFormat lf) {
  return for_tensor_core_formats<WideKernel>(rf, lf, [&](auto r, auto l) {
    return wide_scores_kernel_for<decltype(r)::value, decltype(l)::value>(wgmma, rd);
  });
}
WideKernel wide_values_kernel(KvFormat lf) {
  if (lf == KvFormat::BF16) return mla_wide_values_kernel<KvFormat::BF16>;
  if (lf == KvFormat::Int8) return mla_wide_values_kernel<KvFormat::Int8>;
  if (lf == KvFormat::Int4) return mla_wide_values_kernel<KvFormat::Int4>;
  return nullptr;
}

template <KvFormat RF>
CcKernel cc_kernel_for(KvFormat lf) {
  switch (lf) {
    case KvFormat::F32: return mla_decode_cc_kernel<RF, KvFormat::F32>;
    case KvFormat::BF16: return mla_decode_cc_kernel<RF, KvFormat::BF16>;
    case KvFormat::Int8: return mla_decode_cc_kernel<RF, KvFormat::Int8>;
    case KvFormat::Int4: return mla_decode_cc_kernel<RF, KvFormat::Int4>;
  }
  return nullptr;
}

CcKernel cc_kernel(KvFormat rf, KvFormat lf) {
  switch (rf) {
    case KvFormat::F32: return cc_kernel_for<KvFormat::F32>(lf);
    case KvFormat::BF16: return cc_kernel_for<KvFormat::BF16>(lf);
    case KvFormat::Int8: return cc_kernel_for<KvFormat::Int8>(lf);
    case KvFormat::Int4: break;  // rotary keys are never Int4 (LatentPool refuses it)
  }
  return nullptr;
}

constexpr int kMaxDevices = 64;

struct DeviceInfo {
  int sms = 0;
  int max_smem = 0;  // opt-in dynamic shared memory per block
  int cc = 0;        // compute capability, 10 * major + minor
};

// SM count and shared-memory limit of the current device, queried once per device. The first call on a
// device also raises every kernel's dynamic shared-memory limit to that maximum (each launch then asks only
// for what it needs) and asks for the largest shared-memory carveout (the kernels stream through cp.async.cg
// and barely use L1; two tensor-core CTAs of ~105 KB need the full 228 KB), so no launch pays for
// cudaFuncSetAttribute.
DeviceInfo device_info() {
  static cuda::std::atomic<int> sms_cache[kMaxDevices];
  static cuda::std::atomic<int> smem_cache[kMaxDevices];
  static cuda::std::atomic<int> cc_cache[kMaxDevices];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) dev = 0;
  DeviceInfo info;
  if (dev < kMaxDevices) {
    info.sms = sms_cache[dev].load(cuda::std::memory_order_acquire);
    info.max_smem = smem_cache[dev].load(cuda::std::memory_order_acquire);
    info.cc = cc_cache[dev].load(cuda::std::memory_order_acquire);
    if (info.sms > 0) return info;
  }
  cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&info.max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  info.cc = 10 * major + minor;
  if (info.sms <= 0) info.sms = 1;
  if (info.max_smem <= 0) info.max_smem = 48 * 1024;
  for (RvKernel k : {rowpair_kernel(2, false), rowpair_kernel(4, false), rowpair_kernel(4, true),
                     rowpair_kernel(4, true, KvFormat::BF16, KvFormat::Int8), rowpair_kernel(4, true, KvFormat::BF16, KvFormat::Int4),
                     rowpair_kernel(4, true, KvFormat::Int8, KvFormat::BF16), rowpair_kernel(4, true, KvFormat::Int8, KvFormat::Int8),
                     rowpair_kernel(4, true, KvFormat::Int8, KvFormat::Int4), rowpair_mha_kernel(8),
                     rowpair_mha_kernel(16)}) {
    if (k == nullptr) continue;
    cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, info.max_smem);
    cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  }
  const KvFormat all[4] = {KvFormat::F32, KvFormat::BF16, KvFormat::Int8, KvFormat::Int4};
  for (KvFormat rf : all)
    for (KvFormat lf : all)
      for (WideKernel k : {wide_scores_kernel(false, 0, rf, lf), wide_scores_kernel(true, 0, rf, lf),
                           wide_scores_kernel(true, 16, rf, lf), wide_scores_kernel(true, 32, rf, lf),
                           rf == KvFormat::BF16 ? wide_values_kernel(lf) : nullptr}) {
        if (k == nullptr) continue;
        cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, info.max_smem);
        cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
      }
  const int tiles[5][2] = {{1, 1}, {2, 1}, {4, 1}, {1, 2}, {2, 2}};
  for (KvFormat rf : all)
    for (KvFormat lf : all) {
      if (CcKernel k = cc_kernel(rf, lf)) {
        cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, info.max_smem);
        cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
      }
      for (const auto& t : tiles)
        if (TcKernel k = tc_kernel(rf, lf, t[0], t[1])) {
          cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, info.max_smem);
          cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
        }
    }
  if (dev < kMaxDevices) {
    smem_cache[dev].store(info.max_smem, cuda::std::memory_order_release);
    cc_cache[dev].store(info.cc, cuda::std::memory_order_release);
    sms_cache[dev].store(info.sms, cuda::std::memory_order_release);
  }
  return info;
}

// Splits per sequence: about `ctas_per_sm` CTAs per SM over the batch (one full wave when that many fit on an
// SM: two for the tensor-core and CUDA-core kernels, one for the row-pair and two-pass ones), each split at
// least kMinSplitTokens of the longest possible sequence (max_blocks * block_size; the host does not see the
// actual lengths, which live on the device).
int choose_splits(const MlaDecodeParams& p, int sms, int ctas_per_sm = 2) {
  const int64_t capacity = static_cast<int64_t>(p.max_blocks) * p.block_size;
  const int64_t by_length = (capacity + kMinSplitTokens - 1) / kMinSplitTokens;
  const int64_t by_sms = (ctas_per_sm * static_cast<int64_t>(sms)) / (p.batch > 0 ? p.batch : 1);
  int64_t s = by_length < by_sms ? by_length : by_sms;
  if (s > kMaxSplits) s = kMaxSplits;
  return s < 1 ? 1 : static_cast<int>(s);
}

int align128(int x) { return (x + 127) / 128 * 128; }

// Largest of 16, 8, 4 dividing the row size and the base address; 0 when none does.
int copy_granule(int row_bytes, const void* base) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(base);
  for (int g = 16; g >= 4; g /= 2)
    if (row_bytes % g == 0 && addr % g == 0) return g;
  return 0;
}

// Forced path for testing and comparison: MLAFORGE_MLA_CUDA_PATH=cc runs the CUDA-core kernel, =tc the
// tensor-core kernel (where it applies), =mma the row-pair kernel with mma.sync instead of wgmma, even where a
// faster one applies; =combine merges the row-pair kernel's splits in the combine kernel instead of in the
// kernel after a grid-wide barrier.
bool forced_path(const char* name) {
  const char* v = std::getenv("MLAFORGE_MLA_CUDA_PATH");
  return v != nullptr && std::strcmp(v, name) == 0;
}

struct TcPlan {
  TcKernel kernel = nullptr;
  TcArgs args{};
};

// The tensor-core kernel's launch, or kernel == nullptr where it does not apply.
TcPlan plan_tc(const MlaDecodeParams& p, const DeviceInfo& dev, int num_splits) {
  TcPlan plan;
  const KvFormat rf = p.rope_format, lf = p.latent_format;
  if (!(rf == KvFormat::BF16 || rf == KvFormat::Int8)) return plan;
  if (!(lf == KvFormat::BF16 || lf == KvFormat::Int8 || lf == KvFormat::Int4)) return plan;
  const int H = p.heads, R = p.latent_dim, kv = p.kv_heads;
  if (H <= 0 || H > 64 || kv <= 0 || H % kv != 0 || R <= 0 || R % 16 != 0) return plan;
  int ht = (H + 15) / 16;
  if (ht == 3) ht = 4;
  const int ctw = (R / 16 + kWarps - 1) / kWarps;
  if (ht * ctw > 4) return plan;
  const bool rope_quant = rf == KvFormat::Int8, lat_quant = lf != KvFormat::BF16;
  if (rope_quant && kv > 4 * kMaxSide) return plan;
  int ng = 0;
  if (lat_quant) {
    const int grp = p.latent_group;
    if (grp <= 0 || grp % 2 != 0 || R % grp != 0) return plan;
    ng = R / grp;
    if (ng > 4 * kMaxSide) return plan;
    if ((rope_quant && p.k_rope_scale == nullptr) || p.latent_scale == nullptr) return plan;
  }
  if (rope_quant && p.k_rope_scale == nullptr) return plan;
  const int kr = kv * p.rope_dim;
  if (kr <= 0 || p.rope_dim % 2 != 0) return plan;

  TcArgs& a = plan.args;
  a.p = p;
  a.kr = kr;
  a.ng = ng;
  const int kr_pad = (kr + 15) / 16 * 16;
  a.ldr = kr_pad + 8;
  a.ldl = R + 8;
  a.lds = kTile + 4;
  a.rope_row_bytes = rope_quant ? kr : 2 * kr;
  a.lat_row_bytes = lf == KvFormat::BF16 ? 2 * R : lf == KvFormat::Int8 ? R : R / 2;
  a.rope_granule = copy_granule(a.rope_row_bytes, p.k_rope);
  a.lat_granule = copy_granule(a.lat_row_bytes, p.latent);
  if (a.rope_granule == 0 || a.lat_granule == 0) return plan;
  a.rope_st_ld = rope_quant ? a.rope_row_bytes : 2 * a.ldr;
  a.lat_st_ld = lat_quant ? a.lat_row_bytes : 2 * a.ldl;

  const int hpad = 16 * ht;
  int off = 0;
  a.off_q_rope = off;
  off += align128(hpad * a.ldr * 2);
  a.off_q_lat = off;
  off += align128(2 * hpad * a.ldl * 2);
  a.off_s = off;
  off += align128(hpad * a.lds * 4);
  a.off_alpha = off;
  off += align128(hpad * 4);
  a.off_m = off;
  off += align128(hpad * 4);
  a.off_l = off;
  off += align128(hpad * 4);
  a.off_rope_op = off;
  if (rope_quant) off += align128(kTile * a.ldr * 2);
  a.off_lat_op = off;
  if (lat_quant) off += align128(kTile * a.ldl * 2);
  // One stage.
  int st = 0;
  a.st_rope = st;
  st += align128(kTile * a.rope_st_ld);
  a.st_lat = st;
  st += align128(kTile * a.lat_st_ld);
  a.st_img = st;
  st += align128(kTile);
  a.st_lsc = st;
  if (lat_quant) st += align128(kTile * ng * 2);
  a.st_rsc = st;
  if (rope_quant) st += align128(kTile * kv * 2);
  a.stage_bytes = st;
  a.off_stage = off;

  // Deepest ring that keeps two CTAs per SM; failing that, or when the grid leaves SMs idle anyway (small
  // batch, short context: each CTA then needs more bytes in flight), the deepest that fits at all.
  const bool few_ctas = static_cast<int64_t>(num_splits) * p.batch <= dev.sms;
  int stages = 0;
  for (int s = kMaxStages; s >= 2 && stages == 0 && !few_ctas; --s)
    if (off + s * st <= kTwoCtaSmem) stages = s;
  for (int s = kMaxStages; s >= 2 && stages == 0; --s)
    if (off + s * st <= dev.max_smem) stages = s;
  if (stages == 0) return plan;
  a.stages = stages;
  a.smem_bytes = off + stages * st;
  a.score_scale = p.scale * kLog2e;
  plan.kernel = tc_kernel(rf, lf, ht, ctw);
  return plan;
}

struct CcPlan {
  CcKernel kernel = nullptr;
  CcArgs args{};
  int smem_bytes = 0;
  int groups = 1;
};

CcPlan plan_cc(const MlaDecodeParams& p, const DeviceInfo& dev) {
  CcPlan plan;
  const int H = p.heads, R = p.latent_dim, kv = p.kv_heads, rd = p.rope_dim;
  if (H <= 0 || kv <= 0 || H % kv != 0 || R <= 0 || R % 2 != 0 || rd <= 0 || rd % 2 != 0) return plan;
  if ((p.latent_format == KvFormat::Int8 || p.latent_format == KvFormat::Int4) &&
      (p.latent_group <= 0 || R % p.latent_group != 0 || p.latent_group % 2 != 0))
    return plan;
  const int group = H / kv;
  CcArgs& a = plan.args;
  a.p = p;
  a.ldc = R + 1;
  auto layout = [&](int hg) {
    const int kv_span = hg == H ? kv : (kv < (hg - 1) / group + 2 ? kv : (hg - 1) / group + 2);
    a.head_group = hg;
    a.kv_span = kv_span;
    a.ldk = kv_span * rd + 1;  // rd even: odd stride
    int off = 0;
    a.off_q_rope = off;
    off += align128(hg * rd * 4);
    a.off_q_lat = off;
    off += align128(hg * 2 * a.ldc * 4);
    a.off_k = off;
    off += align128(kCcTile * a.ldk * 4);
    a.off_c = off;
    off += align128(kCcTile * a.ldc * 4);
    a.off_row = off;
    off += align128(kCcTile * 8);
    a.off_img = off;
    off += align128(kCcTile * 4);
    a.off_s = off;
    off += align128(hg * kCcTile * 4);
    a.off_o = off;
    off += align128(hg * 2 * R * 4);
    a.off_alpha = off;
    off += align128(hg * 4);
    a.off_m = off;
    off += align128(hg * 4);
    a.off_l = off;
    off += align128(hg * 4);
    return off;
  };
  int hg = H;
  int smem = layout(hg);
  while (smem > dev.max_smem && hg > 1) {
    hg = (hg + 1) / 2;
    smem = layout(hg);
  }
  if (smem > dev.max_smem) return plan;
  plan.smem_bytes = smem;
  plan.groups = (H + hg - 1) / hg;
  a.score_scale = p.scale * kLog2e;
  plan.kernel = cc_kernel(p.rope_format, p.latent_format);
  return plan;
}

struct RvPlan {
  RvKernel kernel = nullptr;
  RvArgs args{};
  int threads = 0;
  int splits = 1;
};

// Whether `ctas` CTAs of `kernel` can all be resident at once, as a cooperative launch (merge_splits_in_grid's
// grid barrier) needs: the device supports cooperative launches and SMs x resident CTAs per SM >= ctas. Not
// under MLAFORGE_MLA_CUDA_PATH=combine, which keeps the combine kernel, for comparison. The occupancy is
// cached per (device, kernel, threads, shared memory).
bool grid_fits_at_once(RvKernel kernel, int ctas, int threads, int smem_bytes, const DeviceInfo& dev) {
  if (forced_path("combine")) return false;
  struct Entry {
    int device, threads, smem;
    RvKernel kernel;
    int per_sm;  // resident CTAs per SM; 0 without cooperative launches
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : cache)
    if (e.device == device && e.kernel == kernel && e.threads == threads && e.smem == smem_bytes)
      return e.per_sm * dev.sms >= ctas;
  int cooperative = 0, per_sm = 0;
  if (cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device) != cudaSuccess || cooperative == 0 ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_bytes) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it so that the launch reports its own
    per_sm = 0;
  }
  cache.push_back({device, threads, smem_bytes, kernel, per_sm});
  return per_sm * dev.sms >= ctas;
}

// cuTensorMapEncodeTiled, found once through the runtime (no -lcuda at link time); null where the driver lacks it.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return PFN_cuTensorMapEncodeTiled_v12000{nullptr};
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// `map` over a [rows, values] bf16 array at `base` (rows of `values` * 2 bytes), in boxes of kTile rows x 64
// values stored in Hopper's 128-byte swizzle. False where the driver cannot make it. No L2 promotion: with the
// 256-byte one the llava r4/dkv8 32K x 16 stream was 8% slower (154-155 us against 143).
bool encode_tile_map(CUtensorMap* map, const void* base, int64_t rows, int values) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr || rows <= 0) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(values), static_cast<cuuint64_t>(rows)};
  const cuuint64_t row_stride[1] = {static_cast<cuuint64_t>(values) * 2};
  const cuuint32_t box[2] = {64, kTile};
  const cuuint32_t element_strides[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, row_stride, box,
                element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The row-pair kernel's launch, or kernel == nullptr where it does not apply: rotary keys and a latent of 128
// values per token each, bf16 (on Hopper also Int8 rotary keys and an Int8/Int4 latent in groups of a multiple
// of 8 values), at most 32 heads, power-of-two blocks of whole tiles, 16-byte aligned cache arrays; or the MHA
// shape (bf16, with the pool's num_blocks for its tensor maps); 16-byte aligned queries.
RvPlan plan_rowpair(const MlaDecodeParams& p, const DeviceInfo& dev) {
  RvPlan plan;
  const int H = p.heads, kv = p.kv_heads, rd = p.rope_dim;
  const KvFormat rf = p.rope_format, lf = p.latent_format;
  const bool rope_q = rf == KvFormat::Int8, lat_q = lf == KvFormat::Int8 || lf == KvFormat::Int4;
  const bool quant = rope_q || lat_q;
  if (!(rf == KvFormat::BF16 || rope_q) || !(lf == KvFormat::BF16 || lat_q)) return plan;
  const bool mha = !quant && H == kMhaHeads && kv == kMhaHeads && (rd == 8 || rd == 16) && p.latent_dim == kMhaR;
  if (!mha && (kv * rd != 128 || p.latent_dim != 128 || H <= 0 || H > 32 || H % kv != 0 || rd % 2 != 0)) return plan;
  if (lat_q && (p.latent_group <= 0 || p.latent_group % 8 != 0 || 128 % p.latent_group != 0)) return plan;
  if (rope_q && rd % 8 != 0) return plan;  // a dequantised 16-byte store stays within one KV head's scale
  const int bs = p.block_size;
  if (bs < kTile || bs % kTile != 0 || (bs & (bs - 1)) != 0) return plan;
  for (const void* ptr : {p.k_rope, p.latent, static_cast<const void*>(p.is_image),
                          rope_q ? static_cast<const void*>(p.k_rope_scale) : p.latent,
                          lat_q ? static_cast<const void*>(p.latent_scale) : p.latent})
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return plan;
  if (reinterpret_cast<uintptr_t>(p.q_latent) % 16 != 0 || reinterpret_cast<uintptr_t>(p.q_rope) % 16 != 0)
    return plan;  // the kernels copy their queries to shared memory in 16-byte chunks
  // wgmma where this build has sm_90a code and the device is a Hopper (MLAFORGE_MLA_CUDA_PATH=mma forces mma.sync).
#ifdef MLAFORGE_CUDA_SM90A
  const bool wgmma = dev.cc == 90 && !forced_path("mma");
#else
  const bool wgmma = false;
#endif
  if ((mha || quant) && !wgmma) return plan;  // no mma.sync twins: the tensor-core kernel takes these
  const int row_warps = wgmma || H > 16 ? 4 : 2;
  RvArgs& a = plan.args;
  a.p = p;
  if (mha) {                                                       // its tiles come through tensor maps of the pool
    const int64_t rows = static_cast<int64_t>(p.num_blocks) * bs;  // box origins are int32 row numbers
    if (rows > INT32_MAX || !encode_tile_map(&a.rope_map, p.k_rope, rows, kMhaHeads * rd) ||
        !encode_tile_map(&a.lat_map, p.latent, rows, kMhaR))
      return plan;
  }
  // Stage: rope and latent tiles, then the modality bytes; 1024-byte multiples keep the swizzle atoms aligned.
  // Quantised: bf16 tiles first (1024-aligned), then the stored rows with their scales, then the modality
  // bytes (RowPairLayout); after each consumer's ring its two sets of dequantised bf16 tiles.
  const int tiles = wgmma ? 2 * kTile * 128 * 2 : 2 * kTile * (128 * 2 + 16);
  constexpr int kTile128 = kTile * 128 * 2;  // a bf16 tile of 128 values per token
  if (quant) {
    RowPairLayout& l = a.layout;
    int off = 0;
    if (!rope_q) { l.rope = off; off += kTile128; }
    if (!lat_q) { l.lat = off; off += kTile128; }
    if (rope_q) {
      l.rope = off;
      off += kTile * row_bytes_128(rf);
      l.rope_scales = off;
      off += align128(kTile * kv * 2);
    }
    if (lat_q) {
      l.lat = off;
      off += kTile * row_bytes_128(lf);
      l.lat_scales = off;
      off += align128(kTile * (128 / p.latent_group) * 2);
    }
    l.img = off;
    off += kTile;
    a.stage_bytes = (off + 1023) / 1024 * 1024;
  } else {
    a.stage_bytes = mha ? (rd == 8 ? MhaShape<8>::kStageBytes : MhaShape<16>::kStageBytes)
                    : wgmma ? (tiles + kTile + 1023) / 1024 * 1024 : align128(tiles + kTile);
  }
  a.consumer_bytes = kRvStages * a.stage_bytes + 2 * ((rope_q ? kTile128 : 0) + (lat_q ? kTile128 : 0));
  a.smem_bytes = mha ? (rd == 8 ? MhaShape<8>::kSmemBytes : MhaShape<16>::kSmemBytes) : kRvConsumers * a.consumer_bytes;
  if (a.smem_bytes > dev.max_smem) return plan;
  // The queries' places during the prologue (not the MHA kernel's: its static_assert): each consumer's last stage
  // and dequantised tiles, the latent queries in consumer 0's, the rotary queries in consumer 1's.
  const int free_span = a.consumer_bytes - (kRvStages - 1) * a.stage_bytes;
  if (!mha && (H * 2 * p.latent_dim * 4 > free_span || H * rd * 4 > free_span)) return plan;
  int shift = 0;
  while ((1 << shift) < bs) ++shift;
  a.block_shift = shift;
  a.score_scale = p.scale * kLog2e;
  plan.splits = choose_splits(p, dev.sms, 1);  // one CTA per SM
  plan.threads = mha ? kMhaThreads : kRvConsumers * row_warps * 32;
  plan.kernel = mha ? rowpair_mha_kernel(rd) : rowpair_kernel(row_warps, wgmma, rf, lf);
  a.merge = plan.kernel != nullptr && plan.splits > 1 &&
            merge_smem_bytes(p.heads, plan.splits, plan.threads) <= a.smem_bytes &&
            merge_rows_per_cta(p.heads, plan.splits) * plan.splits <= 2 * plan.threads &&  // (max, sum) staging
            grid_fits_at_once(plan.kernel, plan.splits * p.batch, plan.threads, a.smem_bytes, dev);
  return plan;
}

// Launches kernel(args) on `s` with one launch attribute (cooperative, programmatic dependent launch, ...).
template <typename Args>
void launch_with(void (*kernel)(Args), dim3 grid, int threads, int smem_bytes, cudaStream_t s, cudaLaunchAttribute attr,
                 const Args& args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem_bytes;
  cfg.stream = s;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, kernel, args);
}

// Launches the row-pair kernel on grid (splits, batch); cooperatively when its CTAs merge the splits.
void launch_rowpair(const RvPlan& plan, int batch, cudaStream_t s) {
  if (!plan.args.merge) {
    plan.kernel<<<dim3(plan.splits, batch), plan.threads, plan.args.smem_bytes, s>>>(plan.args);
    return;
  }
  cudaLaunchAttribute attr = {};
  attr.id = cudaLaunchAttributeCooperative;
  attr.val.cooperative = 1;
  launch_with(plan.kernel, dim3(plan.splits, batch), plan.threads, plan.args.smem_bytes, s, attr, plan.args);
}

// Bytes of the combine's partial results for `splits` splits (none for one split): part_acc [batch, splits,
// heads, 2, R] floats, then part_ml [batch, splits, heads] float2.
int64_t partial_bytes(const MlaDecodeParams& p, int splits) {
  if (splits <= 1) return 0;
  const int64_t rows = static_cast<int64_t>(p.batch) * splits * p.heads;
  return rows * 2 * p.latent_dim * 4 + rows * 8;
}

struct WidePlan {
  bool ok = false;
  WideKernel scores_kernel = nullptr;
  WideKernel values_kernel = nullptr;
  WideArgs args{};
  int splits = 1;
  int64_t bytes = 0;  // the scores, modality bytes and split (max, sum) in the workspace
};

// The two-pass kernels' launch (ok == false where they do not apply: see their comment). Their workspace
// follows the partial results sized for choose_splits, in mla_decode_cuda_workspace_bytes as in the launch.
WidePlan plan_wide(const MlaDecodeParams& p, const DeviceInfo& dev) {
  WidePlan plan;
  const int H = p.heads, kv = p.kv_heads, rd = p.rope_dim, R = p.latent_dim;
#ifdef MLAFORGE_CUDA_SM90A
  const bool wgmma = dev.cc == 90 && !forced_path("mma");
#else
  const bool wgmma = false;
#endif
  const KvFormat rf = p.rope_format, lf = p.latent_format;
  const bool lat_q = lf != KvFormat::BF16;
  if (H <= 0 || H > kWideHeads || kv <= 0 || H % kv != 0 || R <= 0 || R % kWideChunk != 0) return plan;
  if (rd <= 0 || rd % 8 != 0 || kWideChunk % rd != 0 || (kv * rd) % kWideChunk != 0) return plan;
  plan.scores_kernel = wide_scores_kernel(wgmma, rd, rf, lf);
  plan.values_kernel = wide_values_kernel(lf);
  if (plan.scores_kernel == nullptr || plan.values_kernel == nullptr) return plan;
  // A quantised latent chunk's scales: 128 / group of them per token, 4 to 32 bytes (cp.async sizes; group 8..64).
  if (lat_q && (p.latent_group < 8 || p.latent_group > 64 || kWideChunk % p.latent_group != 0)) return plan;
  for (const void* ptr :
       {p.k_rope, p.latent, static_cast<const void*>(p.k_rope_scale), static_cast<const void*>(p.latent_scale)})
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return plan;
  WideArgs& a = plan.args;
  a.p = p;
  a.score_scale = p.scale * kLog2e;
  // Queries, then the ring (both in 1024-byte multiples: the swizzle atoms stay aligned), then the small arrays.
  const int q_bytes = wgmma ? tile_bytes<true>(R / 8) : tile_bytes<false>(R / 8);  // [kWideRows = kTile][R] bf16
  const int stage = wgmma ? tile_bytes<true>(kWideChunk / 8) : tile_bytes<false>(kWideChunk / 8);
  const int small = align128(H * rd * 4) + align128(4 * kTile) + align128(kWideHeads * kWideLds * 4);
  a.off_q_lat = 0;
  a.off_stage = q_bytes;
  // The deepest ring that fits (5 stages at latent 1024 on a Hopper): one CTA per SM, so the bytes in flight
  // per SM are the stages' (stages - 1 chunks of 16 KB; quantised ones are smaller, and one fewer is in flight).
  a.stages = std::min(kWideMaxStages, (dev.max_smem - q_bytes - small) / stage);
  if (a.stages < 3) return plan;
  int off = q_bytes + a.stages * stage;
  a.off_q_rope = off;
  off += align128(H * rd * 4);
  a.off_img = off;
  off += align128(4 * kTile);
  a.off_s = off;
  off += align128(kWideHeads * kWideLds * 4);
  a.smem_bytes = off;
  if (a.smem_bytes > dev.max_smem || kWideValuesSmem > dev.max_smem) return plan;
  const int64_t capacity = static_cast<int64_t>(p.max_blocks) * p.block_size;
  a.capacity = static_cast<int>((capacity + kTile - 1) / kTile * kTile);
  plan.splits = choose_splits(p, dev.sms, 1);  // one scores CTA per SM
  const int64_t probs = static_cast<int64_t>(p.batch) * 2 * H * a.capacity * 2;
  const int64_t tile_max = static_cast<int64_t>(p.batch) * (a.capacity / kTile) * H * 4;
  plan.bytes = probs + (tile_max + 15) / 16 * 16 + static_cast<int64_t>(p.batch) * plan.splits * H * 8;
  plan.ok = true;
  return plan;
}

// Where the two-pass kernels' arrays start in the workspace: after the partial results sized for choose_splits
// (the row-pair and two-pass kernels' one-CTA-per-SM split counts never exceed it), 16-byte aligned.
int64_t wide_offset(const MlaDecodeParams& p, const DeviceInfo& dev) {
  return (partial_bytes(p, choose_splits(p, dev.sms)) + 15) / 16 * 16;
}

// Points the two-pass kernels' arrays into the workspace, from byte `offset` (16-byte aligned).
void place_wide(WidePlan& plan, const MlaDecodeParams& p, void* workspace, int64_t offset) {
  unsigned char* base = static_cast<unsigned char*>(workspace) + offset;
  WideArgs& a = plan.args;
  a.probs = reinterpret_cast<bf16*>(base);
  base += static_cast<int64_t>(p.batch) * 2 * p.heads * a.capacity * 2;
  a.tile_max = reinterpret_cast<float*>(base);
  base += (static_cast<int64_t>(p.batch) * (a.capacity / kTile) * p.heads * 4 + 15) / 16 * 16;
  a.split_ml = reinterpret_cast<float2*>(base);
}

bool params_usable(const MlaDecodeParams& p) {
  return p.batch > 0 && p.heads > 0 && p.kv_heads > 0 && p.latent_dim > 0 && p.rope_dim > 0 &&
         p.block_size > 0 && p.max_blocks > 0;
}

// The first main kernel that applies, in launch order: row-pair, tensor-core, two-pass (then the CUDA-core
// kernel, planned at launch). MLAFORGE_MLA_CUDA_PATH=tc skips the row-pair kernel, =cc all three.
struct MainPlans {
  RvPlan rv;
  TcPlan tc;
  WidePlan wide;
};

MainPlans plan_main(const MlaDecodeParams& p, const DeviceInfo& dev) {
  MainPlans m;
  if (!forced_path("cc") && !forced_path("tc")) m.rv = plan_rowpair(p, dev);
  if (m.rv.kernel == nullptr && !forced_path("cc")) {
    m.tc = plan_tc(p, dev, choose_splits(p, dev.sms));
    if (m.tc.kernel == nullptr) m.wide = plan_wide(p, dev);
  }
  return m;
}

}  // namespace

int64_t mla_decode_cuda_workspace_bytes(const MlaDecodeParams& p) {
  if (!params_usable(p)) return 0;
  const DeviceInfo dev = device_info();
  // The row-pair and two-pass kernels' split counts (one CTA per SM) never exceed this one (two per SM).
  const WidePlan wide = plan_wide(p, dev);
  return wide.ok ? wide_offset(p, dev) + wide.bytes : partial_bytes(p, choose_splits(p, dev.sms));
}

MlaCudaKernel mla_decode_cuda_kernel(const MlaDecodeParams& p) {
  if (!params_usable(p)) return MlaCudaKernel::None;
  const DeviceInfo dev = device_info();
  const MainPlans m = plan_main(p, dev);
  if (m.rv.kernel != nullptr) return MlaCudaKernel::RowPair;
  if (m.tc.kernel != nullptr) return MlaCudaKernel::TensorCore;
  if (m.wide.ok) return MlaCudaKernel::TwoPass;
  return plan_cc(p, dev).kernel != nullptr ? MlaCudaKernel::CudaCore : MlaCudaKernel::None;
}

// Launches on `stream` without synchronising. Parameters the kernels cannot handle (heads not a multiple of
// kv_heads, odd sizes, latent_dim > what fits in shared memory) launch nothing; the ATen entry point checks
// them before calling.
void mla_decode_cuda(const MlaDecodeParams& p, void* workspace, void* stream) {
  if (!params_usable(p)) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const DeviceInfo dev = device_info();
  // The first kernel that applies: row-pair, tensor-core, two-pass, CUDA-core.
  MainPlans m = plan_main(p, dev);
  RvPlan& rv = m.rv;
  TcPlan& tc = m.tc;
  WidePlan& wide = m.wide;
  const int two_per_sm = choose_splits(p, dev.sms);  // the tensor-core and CUDA-core kernels' splits
  const int splits = rv.kernel != nullptr ? rv.splits : wide.ok ? wide.splits : two_per_sm;
  float* part_acc = nullptr;
  float2* part_ml = nullptr;
  if (splits > 1 || wide.ok) {
    if (workspace == nullptr) return;
    const int64_t rows = static_cast<int64_t>(p.batch) * splits * p.heads;
    part_acc = static_cast<float*>(workspace);
    part_ml = reinterpret_cast<float2*>(static_cast<char*>(workspace) + rows * 2 * p.latent_dim * 4);
  }

  const Splits sp{splits, part_acc, part_ml};
  bool launched = false;
  if (rv.kernel != nullptr) {
    rv.args.sp = sp;
    launch_rowpair(rv, p.batch, s);
    launched = true;
  } else if (tc.kernel != nullptr) {
    tc.args.sp = sp;
    tc.kernel<<<dim3(splits, p.batch), kThreads, tc.args.smem_bytes, s>>>(tc.args);
    launched = true;
  } else if (wide.ok) {
    place_wide(wide, p, workspace, wide_offset(p, dev));
    wide.args.sp = sp;
    wide.scores_kernel<<<dim3(splits, p.batch), kThreads, wide.args.smem_bytes, s>>>(wide.args);
    wide.values_kernel<<<dim3(p.latent_dim / kWideChunk, splits, p.batch), kThreads, kWideValuesSmem, s>>>(wide.args);
    launched = true;
  }
  if (!launched) {
    CcPlan cc = plan_cc(p, dev);
    if (cc.kernel == nullptr) return;
    cc.args.sp = sp;
    cc.kernel<<<dim3(splits, p.batch, cc.groups), kThreads, cc.smem_bytes, s>>>(cc.args);
  }
  if (splits > 1 && !(rv.kernel != nullptr && rv.args.merge)) {
    CombineArgs c;
    c.part_acc = part_acc;
    c.part_ml = part_ml;
    c.out = p.out;
    c.lse = reinterpret_cast<float2*>(p.lse);
    c.seq_begin = p.seq_begin;
    c.seq_end = p.seq_end;
    c.heads = p.heads;
    c.latent_dim = p.latent_dim;
    c.num_splits = splits;
    c.every_split_written = rv.kernel != nullptr;
    if (dev.cc >= 90) {  // launched while the main kernel runs (programmatic dependent launch)
      cudaLaunchAttribute attr = {};
      attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr.val.programmaticStreamSerializationAllowed = 1;
      launch_with(mla_combine_kernel, dim3(p.heads, p.batch), kCombineThreads, 0, s, attr, c);
    } else {
      mla_combine_kernel<<<dim3(p.heads, p.batch), kCombineThreads, 0, s>>>(c);
    }
  }
}

#ifdef MLAFORGE_PROBE_TIMELINE
// Prints, for each stamp of the last launch, min / median / max over CTAs of (stamp - earliest CTA start), us.
void mla_probe_timeline_dump(int ctas) {
  static unsigned long long h[1024][8];
  cudaDeviceSynchronize();
  cudaMemcpyFromSymbol(h, g_probe, sizeof(h));
  unsigned long long t0 = ~0ull;
  for (int c = 0; c < ctas; ++c)
    if (h[c][0] != 0) t0 = std::min(t0, h[c][0]);
  static const char* names[7] = {"start", "prologue done", "tile 0 landed", "loop done", "partials written", "barrier passed", "merge done"};
  for (int k = 0; k < 7; ++k) {
    std::vector<double> v;
    for (int c = 0; c < ctas; ++c)
      if (h[c][k] >= t0 && h[c][k] - t0 < 10000000ull) v.push_back((h[c][k] - t0) * 1e-3);
    if (v.empty()) continue;
    std::sort(v.begin(), v.end());
    std::printf("    probe %-20s min %7.2f  median %7.2f  max %7.2f us (%zu CTAs)\n", names[k], v.front(), v[v.size() / 2], v.back(), v.size());
  }
  std::memset(h, 0, sizeof(h));
  cudaMemcpyToSymbol(g_probe, h, sizeof(h));
}
#endif

}  // namespace mlaforge
