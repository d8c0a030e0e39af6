// The paged latent KV cache of an MLA model (DESIGN.md section 3): per layer, blocks of tokens holding
// the rotated rotary keys and the latent, bf16/f32 or quantized with per-token group scales, plus one
// modality byte per token shared by all layers. Sequences own blocks through block tables, so many
// sequences share one pool and a finished sequence's blocks go back to it.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/mla_decode.h"

namespace mlaforge {

// "auto" (the model's compute dtype: f32 on CPU), "f32", "bf16", "int8", "int4"; fails naming `what`.
KvFormat parse_kv_format(const std::string& name, const std::string& what);

// Symmetric quantization of the last dimension in groups of `group` values (one fp16 scale per group):
// x [..., D] -> values int8 [..., D] (Int8) or uint8 [..., D/2] (Int4, see KvFormat), scales fp16
// [..., D/group]. Scales are absmax/127 (Int8) or absmax/7 (Int4), rounded to fp16 before use.
struct QuantizedRows {
  at::Tensor values, scales;
};
QuantizedRows quantize_rows(const at::Tensor& x, KvFormat format, int64_t group);
// Inverse of quantize_rows: -> [..., D] in `dtype`.
at::Tensor dequantize_rows(const at::Tensor& values, const at::Tensor& scales, KvFormat format, int64_t group,
                           at::ScalarType dtype);

struct LatentPoolOptions {
  KvFormat latent = KvFormat::F32;  // storage of the latent c
  KvFormat rope = KvFormat::F32;    // storage of the rotary keys (F32, BF16 or Int8)
  int64_t block_size = 64;          // tokens per block
  int64_t latent_group = 32;        // latent values per scale (clamped to a divisor of R)
};

class LatentPool {
 public:
  // Storage for `num_blocks` blocks of every layer on `device`. rope_dim is 2r (per KV head).
  LatentPool(int64_t layers, int64_t kv_heads, int64_t rope_dim, int64_t latent_dim, int64_t num_blocks,
             const LatentPoolOptions& options, const at::Device& device);

  const LatentPoolOptions& options() const { return opt_; }
  int64_t layers() const { return int64_t(k_rope_.size()); }
  int64_t kv_heads() const { return kv_heads_; }
  int64_t rope_dim() const { return rope_dim_; }
  int64_t latent_dim() const { return latent_dim_; }
  int64_t block_size() const { return opt_.block_size; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t free_blocks() const { return int64_t(free_.size()); }
  at::Device device() const { return is_image_.device(); }

  // Takes n free blocks (fails when the pool is exhausted) / gives blocks back.
  std::vector<int32_t> allocate(int64_t n);
  void release(const std::vector<int32_t>& blocks);

  // Stores N tokens at flat slots (block * block_size + offset), [N] int64: rotary keys [N, g, 2r]
  // and latents [N, R] of `layer`, quantized to the pool's formats.
  void write(int64_t layer, const at::Tensor& slots, const at::Tensor& k_rope, const at::Tensor& latent);
  void write_modality(const at::Tensor& slots, const at::Tensor& is_image);  // [N] bool
  // Reads slots [...] back, dequantized: k_rope [..., g, 2r], latent [..., R] in `dtype`; modality [...] bool.
  at::Tensor read_k_rope(int64_t layer, const at::Tensor& slots, at::ScalarType dtype) const;
  at::Tensor read_latent(int64_t layer, const at::Tensor& slots, at::ScalarType dtype) const;
  at::Tensor read_modality(const at::Tensor& slots) const;

  // Copies the stored bytes (values, scales, modality) of `src` slots [N] to this pool's `dst` slots
  // [N] in every layer; both pools have the same shapes and formats.
  void copy_slots(const LatentPool& src, const at::Tensor& src_slots, const at::Tensor& dst_slots);

  // The kernel view of one layer (pointers only; the caller fills queries, tables and out).
  MlaDecodeParams kernel_params(int64_t layer) const;

  // Allocated bytes of every layer's tensors and the modality bytes; per cached token.
  int64_t bytes() const;
  double bytes_per_token() const { return double(bytes()) / double(num_blocks_ * opt_.block_size); }

 private:
  LatentPoolOptions opt_;
  int64_t kv_heads_, rope_dim_, latent_dim_, num_blocks_;
  // Per layer: [NB, bs, g, 2r] (+ scales [NB, bs, g]); [NB, bs, R or R/2] (+ scales [NB, bs, R/group]).
  std::vector<at::Tensor> k_rope_, k_rope_scale_, latent_, latent_scale_;
  at::Tensor is_image_;  // [NB, bs] uint8
  std::vector<int32_t> free_;
};

// The batch's view of the pool for one decoding step: block tables [B, max_blocks] int32 and the
// attended positions [seq_begin, seq_end) of each sequence, [B] int32, on the pool's device.
struct PagedBatch {
  at::Tensor block_table, seq_begin, seq_end;
};

// Flat pool slots (block * block_size + offset) of positions 0..S-1 through block tables
// [B, max_blocks] (entries < 0 read as block 0): [B, S] int64.
at::Tensor position_slots(const at::Tensor& block_table, int64_t block_size, int64_t S);

// Absorbed decode over one layer of the pool: q_rope [B, h, 2r], q_latent [B, h, 2, R] (absorbed
// queries for text and image keys) -> [B, h, 2, R], the softmax-weighted latent sums over text and
// image keys. The plain ATen reference: reads the cache back dequantized and computes in q's dtype
// (float64 for kernel tests).
at::Tensor mla_decode_reference(const LatentPool& pool, int64_t layer, const at::Tensor& q_rope,
                                const at::Tensor& q_latent, const PagedBatch& batch, double scale);
// The same through the CPU or CUDA kernel (by the pool's device), in float32. With `lse`, also each
// (sequence, head)'s log-sum-exp in base 2 (MlaDecodeParams::lse) as [B, h, 2].
at::Tensor mla_decode(const LatentPool& pool, int64_t layer, const at::Tensor& q_rope, const at::Tensor& q_latent,
                      const PagedBatch& batch, double scale, at::Tensor* lse = nullptr);

// What one decoding step attends through `batch`, read back from one layer of the pool in bf16 (dequantized)
// and laid out as a dense pool of its own: sequence b's positions [0, max_blocks * block_size) in blocks
// b * max_blocks .. (b + 1) * max_blocks - 1, which `block_table` [B, max_blocks] int32 names. For quantized
// caches that only the CUDA-core kernel takes in their stored format while their bf16 twin takes the two-pass
// kernels (Int8/Int4 latents too wide for the one-pass kernels, on a GPU or a rotary width the quantized two-pass
// kernels do not cover: they need a Hopper and 16 or 32 rotary values per KV head): the bf16 two-pass kernels run
// over this copy instead of the CUDA-core kernel.
struct DenseBf16Copy {
  at::Tensor k_rope;       // [B * max_blocks, block_size, kv_heads, rope_dim] bf16
  at::Tensor latent;       // [B * max_blocks, block_size, latent_dim] bf16
  at::Tensor is_image;     // [B * max_blocks, block_size] uint8
  at::Tensor block_table;  // [B, max_blocks] int32
  // `p` (the pool's kernel parameters for the layer) redirected to this copy.
  MlaDecodeParams params(MlaDecodeParams p) const;
};
DenseBf16Copy dense_bf16_copy(const LatentPool& pool, int64_t layer, const PagedBatch& batch);

// Recent positions kept unquantized beside the pool (--kv-window), one layer's view: rope [B, W, g, 2r],
// latent [B, W, R] in any float dtype, img [B, W] bool, valid [B, W] bool (the slots attended, none of
// them inside the pool range of the same decode).
struct DecodeWindow {
  at::Tensor rope, latent, img, valid;
};

// Absorbed decode over the pool's positions [seq_begin, seq_end) (the kernel) and the window's valid
// slots (ATen, float32), merged with the log-sum-exp rule: the same [B, h, 2, R] as if all those tokens
// were in one cache.
at::Tensor mla_decode_window(const LatentPool& pool, int64_t layer, const at::Tensor& q_rope, const at::Tensor& q_latent,
                             const PagedBatch& batch, double scale, const DecodeWindow& window);

}  // namespace mlaforge
