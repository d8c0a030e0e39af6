// Absorbed MLA decode attention over the paged latent cache (DESIGN.md section 3): the kernels'
// parameter block and entry points. Plain C++ (no ATen) so that the CUDA kernel compiles with nvcc
// alone; the checks and the ATen-facing API live in infer/latent_pool.h.
#pragma once
#include <cstdint>

namespace mlaforge {

// Storage format of a cache tensor.
//  F32, BF16: the values.
//  Int8: int8 values q with one scale per group: x ~= q * scale, q in [-127, 127].
//  Int4: two values per byte, element 2i in the low nibble, stored as q + 8 with q in [-7, 7]:
//        x ~= q * scale.
// Scales are IEEE fp16 bit patterns (uint16_t).
enum class KvFormat : int32_t { F32 = 0, BF16 = 1, Int8 = 2, Int4 = 3 };

// "f32", "bf16", "int8", "int4" (the names --kv-cache takes).
inline const char* kv_format_name(KvFormat f) {
  switch (f) {
    case KvFormat::F32: return "f32";
    case KvFormat::BF16: return "bf16";
    case KvFormat::Int8: return "int8";
    case KvFormat::Int4: return "int4";
  }
  return "?";
}

// One layer of the paged latent cache and one decoding step of a batch: query i of sequence b
// attends to positions [seq_begin[b], seq_end[b]) of that sequence. Position p of sequence b lives
// in pool block block_table[b * max_blocks + p / block_size], slot p % block_size.
//
//   s_t = scale * (q_rope[b,i] . k_rope[t, i / (heads / kv_heads)] + q_latent[b,i,m(t)] . c_t)
//   p_t = softmax_t(s_t)
//   out[b,i,m] = sum over tokens t of modality m of p_t c_t         (m = 0 text, 1 image)
//
// Every pointer is on the device the kernel runs on; all arrays are dense and row-major.
struct MlaDecodeParams {
  int32_t batch = 0, heads = 0, kv_heads = 0;
  int32_t rope_dim = 0;    // 2r: rotary values per KV head
  int32_t latent_dim = 0;  // R
  int32_t block_size = 0, max_blocks = 0;
  int32_t num_blocks = 0;    // pool blocks: k_rope, latent and is_image hold num_blocks * block_size rows
  int32_t latent_group = 0;  // latent values per scale (Int8/Int4); divides latent_dim
  float scale = 1.f;         // softmax scale, dh^-1/2 of the original model

  const float* q_rope = nullptr;    // [batch, heads, rope_dim], rotated
  const float* q_latent = nullptr;  // [batch, heads, 2, latent_dim]: absorbed queries for text (0) and image (1) keys

  KvFormat rope_format = KvFormat::F32;
  const void* k_rope = nullptr;             // [num_blocks, block_size, kv_heads, rope_dim] (F32, BF16 or Int8)
  const uint16_t* k_rope_scale = nullptr;   // Int8: [num_blocks, block_size, kv_heads], one per head's rope_dim values
  KvFormat latent_format = KvFormat::F32;
  const void* latent = nullptr;             // [num_blocks, block_size, latent_dim] (Int4: latent_dim / 2 bytes)
  const uint16_t* latent_scale = nullptr;   // Int8/Int4: [num_blocks, block_size, latent_dim / latent_group]
  const uint8_t* is_image = nullptr;        // [num_blocks, block_size]: 1 for image tokens

  const int32_t* block_table = nullptr;  // [batch, max_blocks]
  const int32_t* seq_begin = nullptr;    // [batch]
  const int32_t* seq_end = nullptr;      // [batch]; seq_end > seq_begin

  float* out = nullptr;  // [batch, heads, 2, latent_dim]
  // Optional: [batch, heads, 2] = (max over the tokens of scale * log2(e) * s_t, sum of
  // 2^(scale * log2(e) * s_t - max)), so that another part of the sequence can be merged in; (-inf, 0)
  // for a sequence without tokens.
  float* lse = nullptr;
};

// CPU kernel (kernels/cpu/mla_decode_cpu.cpp): multithreaded over sequences and, for long contexts,
// splits of the sequence (all heads of a sequence in one pass).
void mla_decode_cpu(const MlaDecodeParams& p);

#ifdef MLAFORGE_WITH_CUDA
// CUDA kernel (kernels/cuda/mla_decode.cu): split over the sequence with a combine step. `workspace`
// holds at least mla_decode_cuda_workspace_bytes(p) bytes of device memory; `stream` is a cudaStream_t.
int64_t mla_decode_cuda_workspace_bytes(const MlaDecodeParams& p);
void mla_decode_cuda(const MlaDecodeParams& p, void* workspace, void* stream);
// Which kernel mla_decode_cuda runs for p on the current device (the first that applies, as it launches them).
enum class MlaCudaKernel { RowPair, TensorCore, TwoPass, CudaCore, None };
MlaCudaKernel mla_decode_cuda_kernel(const MlaDecodeParams& p);
#endif

}  // namespace mlaforge
