// The decoder language model shared by Qwen2 and Llama: pre-norm layers of GQA self-attention
// (optional q/k/v/o biases, rotate_half RoPE or M-RoPE) and a SwiGLU MLP, RMSNorm, lm_head.
// A converted checkpoint's layers use Multi-head Latent Attention instead (DESIGN.md section 3):
// prefill and training expand the latent to keys and values; decoding over a latent cache runs the
// absorbed form.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model/kv_cache.h"
#include "io/config.h"

namespace mlaforge {

struct DecoderLayer {
  at::Tensor q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b;  // [h*dh, d], [g*dh, d], ..., [d, h*dh]
  at::Tensor input_norm, post_norm;                    // [d]
  at::Tensor gate_w, up_w, down_w;                     // [f, d], [f, d], [d, f]
  // MLA (converted checkpoints). q_w rows are permuted per head to [kept pairs' dims | the rest]
  // (the kept dims as [first halves ascending | their partners], so rotate_half still pairs them).
  at::Tensor k_rope_w, k_rope_b;         // [g*2r, d]: rotary keys
  at::Tensor kv_down[2];                 // [R, d] per modality (0 text, 1 image; one tensor when shared)
  at::Tensor kv_up[2];                   // [g*(dh-2r) + g*dh, R]: key-nope rows of every KV head, then values
  at::Tensor kv_up_b;                    // [g*(dh-2r) + g*dh] or undefined
  at::Tensor kv_w;                       // [g*(dh-2r) + g*dh, d]: no latent (stage 1, latent_dim 0)
  at::Tensor rope_dims;                  // [g, 2r] int64: which of the head's dh dims the rotary dims are
  // The absorbed decode's up-projections of both modalities side by side, kept between steps (a per-step
  // concatenation rewrote them every step) and rebuilt when kv_up changes (fine-tuning updates it in place).
  struct AbsorbedUp {
    at::Tensor uk_all;  // [g, dh-2r, M*R]: key-nope rows, text then image latent columns (M = 1 when tied)
    at::Tensor uv_all;  // [g, M*R, dh]: value rows, transposed
    at::Tensor source[2];  // the kv_up tensors they were built from (held, so that no other tensor takes their place)
    int64_t version[2] = {-1, -1};
  };
  mutable AbsorbedUp absorbed;
};

// What calibration sees of one layer's attention in a forward pass of an original (MHA/GQA) model.
struct AttentionTrace {
  int64_t layer = 0;
  at::Tensor input;     // [B, T, d] attention input (after input_layernorm)
  at::Tensor q, k;      // [B, h, T, dh], [B, g, T, dh] before RoPE (biases included); undefined for MLA
  at::Tensor cos, sin;  // [B, T, dh]
  at::Tensor probs;     // [B, g, group, T, S] attention probabilities (S = cached + new positions)
};
using AttentionObserver = std::function<void(const AttentionTrace&)>;

// Optional outputs of a forward pass.
struct ForwardTaps {
  // The embeddings and every layer's output (the last one after the final norm), as transformers'
  // output_hidden_states.
  std::vector<at::Tensor>* hidden = nullptr;
  // Each layer's attention output (after o_proj, before the residual add): [B, T, d].
  std::vector<at::Tensor>* attention = nullptr;
  // Called once per layer with the attention's internals.
  const AttentionObserver* observer = nullptr;
};

// What every layer of one forward pass shares (DecoderLM::begin_layers).
struct LayerContext {
  at::Tensor cos, sin;  // [B, T, dh] in the activations' dtype
  at::Tensor mask;      // [B, 1, 1, T, S] bool: causal, padding keys hidden
  int64_t start = 0, end = 0;  // cache positions [start, end) the pass writes
  // DecoderLM::decode_device: [1] int64 on the device, the position a K/V cache is written at (the whole
  // capacity is then attended through `mask`, [B, 1, 1, 1, capacity]); undefined otherwise.
  at::Tensor kv_write_pos;
  // Fused attention (fused_attention_applies, prefill) needs no mask: no key is padding and the pass
  // is a whole prefill (causal from position 0). transformers then passes no mask either, so the
  // same SDPA kernel runs.
  bool unmasked = false;
};

class DecoderLM {
 public:
  // `mla` describes a converted checkpoint (or is disabled).
  // Where weights come from: (name under the language model's prefix, or kHeadName for lm_head;
  // expected shape; required) -> the tensor, undefined for an absent optional one (or an absent
  // lm_head of tied embeddings).
  using WeightFn = std::function<at::Tensor(const std::string&, const std::vector<int64_t>&, bool)>;
  static constexpr const char* kHeadName = "<lm_head>";
  // with_layers false loads the embeddings, final norm and head only; layers then come one at a time
  // from load_layer (streaming conversion of models too large to hold twice).
  DecoderLM(const TextConfig& cfg, const MlaConfig& mla, const WeightFn& get, bool with_layers = true);
  DecoderLayer load_layer(int64_t layer, const WeightFn& get) const;
  // Random weights of the configuration's shapes (no biases), for benchmarks of full-size models.
  static DecoderLM random(const TextConfig& cfg, const MlaConfig& mla, at::ScalarType dtype, const at::Device& device,
                          uint64_t seed);

  const TextConfig& config() const { return cfg_; }
  at::Tensor embed(const at::Tensor& ids) const;  // [B, T] int64 -> [B, T, d]
  // A paged latent cache for MLA checkpoints with a latent (unless options.expanded), else keys and
  // values (stored as options.latent says: auto or bf16; int8/int4 need a latent).
  KVCache new_cache(int64_t batch, int64_t capacity, const at::Device& device,
                    const CacheOptions& options = CacheOptions()) const;

  // Runs every layer over x [B, T, d] whose tokens sit at positions pos [3, B, T]; keys and values
  // go to cache positions [cache.len, cache.len + T) and cache.len advances by T. `valid` [B, T]
  // marks real (non-padding) tokens, `is_image` [B, T] image tokens (MLA picks their up/down
  // projections by it). Returns the final-norm hidden state [B, T, d].
  at::Tensor forward(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& valid, const at::Tensor& is_image,
                     KVCache& cache, const ForwardTaps& taps = {}) const;
  at::Tensor logits(const at::Tensor& h) const;  // [..., d] -> [..., vocab]

  // One decoding step of text tokens [B] or [B, 1] at positions pos [3, B, 1]: logits [B, vocab];
  // cache.len advances by one. With cache.cuda_graph the device work replays a CUDA graph captured for
  // the cache's current shape (model/decode_graph.h); otherwise forward() then logits().
  at::Tensor decode_step(const at::Tensor& tokens, const at::Tensor& pos, KVCache& cache) const;
  // The device part of a decoding step, after reserve_positions has given the new position its slots
  // (what DecodeGraph captures): embeddings of tokens [B, 1], rotary tables of pos [3, B, 1], every
  // layer, logits [B, vocab]. A K/V cache is written at write_pos ([1] int64 on the device) and
  // attended over its whole capacity through a mask, so no shape or offset depends on the step. No
  // host sync; cache.len is left to the caller.
  at::Tensor decode_device(const at::Tensor& tokens, const at::Tensor& pos, const at::Tensor& write_pos,
                           KVCache& cache) const;

  // forward() one layer at a time: begin_layers reserves cache positions [cache.len, cache.len + T)
  // and builds the rotary tables and mask; run_layer maps layer `i`'s input x [B, T, d] to its
  // output. The caller sets cache.len = ctx.end after the last layer.
  LayerContext begin_layers(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& valid, KVCache& cache) const;
  at::Tensor run_layer(const DecoderLayer& L, size_t i, const at::Tensor& x, const LayerContext& ctx,
                       const at::Tensor& is_image, KVCache& cache, const ForwardTaps& taps = {}) const;

  // Every weight of the decoder layers and the final norm, by checkpoint name relative to the
  // language model's prefix ("layers.3.self_attn.q_proj.weight", "norm.weight"), for training and
  // saving. Tied tensors (shared MLA factors) appear once. Embeddings and lm_head are not listed.
  std::vector<std::pair<std::string, at::Tensor*>> named_weights();
  // Moves every weight to `device` and floating weights to `dtype`.
  void to(const at::Device& device, at::ScalarType dtype);

 private:
  at::Tensor attention(const DecoderLayer& L, const at::Tensor& h, const LayerContext& ctx, const at::Tensor& is_image,
                       KVCache& cache, size_t layer, const ForwardTaps& taps) const;
  // Decoding over the paged latent cache, absorbed (DESIGN.md section 3): q [B, 1, g, group, dh] with
  // its rotary part rotated -> attention output before o_proj [B, 1, h*dh]. Per query head two
  // absorbed queries W_uk^m^T q_nope, the decode kernel's two latent sums, then W_uv^m and the v bias.
  at::Tensor absorbed_decode(const DecoderLayer& L, const at::Tensor& q, const KVCache& cache, size_t layer) const;
  // Softmax attention of q [B, h, T, dh] over K, V [B, g, S, dh] (GQA), then o_proj: [B, T, d].
  // x, q_pre, k_pre: for the attention observer (AttentionTrace).
  at::Tensor attend(const DecoderLayer& L, const at::Tensor& q, const at::Tensor& K, const at::Tensor& V,
                    const LayerContext& ctx, const at::Tensor& x, const at::Tensor& q_pre, const at::Tensor& k_pre,
                    size_t layer, const ForwardTaps& taps) const;
  // latent [B, S, R] with each token's modality [B, S] -> [k_nope | v] [B, S, g*(dh-2r) + g*dh].
  at::Tensor expand_latent(const DecoderLayer& L, const at::Tensor& latent, const at::Tensor& is_image) const;
  // True when one down/up pair serves both modalities (shared conversion or a text-only model).
  static bool tied_latent(const DecoderLayer& L);
  // ctx.cos / ctx.sin [B, T, dh] of positions pos [3, B, T], in the activations' dtype.
  void rotary_tables(LayerContext& ctx, const at::Tensor& pos, at::ScalarType dtype) const;
  TextConfig cfg_;
  MlaConfig mla_;
  at::Tensor embed_w_, final_norm_, head_w_, inv_freq_;
  std::vector<DecoderLayer> layers_;
};

// MLA tensor names under a layer's "self_attn." (mlaforge's converted checkpoint format).
namespace mla_names {
inline const char* k_rope = "k_rope_proj";
inline std::string down(bool decoupled, bool image) { return decoupled ? (image ? "kv_down_proj.image" : "kv_down_proj.text") : "kv_down_proj"; }
inline std::string up(bool decoupled, bool image) { return decoupled ? (image ? "kv_up_proj.image" : "kv_up_proj.text") : "kv_up_proj"; }
inline const char* up_bias = "kv_up_proj.bias";
inline const char* direct = "kv_proj";  // stage 1 (no latent): [k_nope; v] = kv_proj x + kv_up_proj.bias
}  // namespace mla_names

// Index of each rotary dim within a head for kept pairs `kept` (ascending): [k..., k + dh/2...].
std::vector<int64_t> rotary_dims(const std::vector<int64_t>& kept, int64_t head_dim);
// The head's other dims (the pairs that lose rotation), in the same [firsts | partners] order.
std::vector<int64_t> nope_dims(const std::vector<int64_t>& kept, int64_t head_dim);

}  // namespace mlaforge
