// The decoder language model shared by Qwen2 and Llama: pre-norm layers of GQA self-attention
// (optional q/k/v/o biases, rotate_half RoPE or M-RoPE) and a SwiGLU MLP, RMSNorm, lm_head.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "io/config.h"

namespace mlaforge {

class WeightStore;

// Keys and values of every layer for a batch, preallocated to `capacity` positions.
// k[l], v[l]: [B, g, capacity, dh]. key_valid [B, capacity]: false for left padding.
struct KVCache {
  std::vector<at::Tensor> k, v;
  at::Tensor key_valid;
  int64_t len = 0;       // positions written so far
  int64_t capacity = 0;
  int64_t bytes() const;
};

struct DecoderLayer {
  at::Tensor q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b;  // [h*dh, d], [g*dh, d], ..., [d, h*dh]
  at::Tensor input_norm, post_norm;                    // [d]
  at::Tensor gate_w, up_w, down_w;                     // [f, d], [f, d], [d, f]
};

class DecoderLM {
 public:
  // lm_prefix: e.g. "model." or "model.language_model."; head: "lm_head.weight" (falls back to
  // the embedding when tie_word_embeddings).
  DecoderLM(const TextConfig& cfg, const WeightStore& store, const std::string& lm_prefix,
            const std::string& head_name);

  const TextConfig& config() const { return cfg_; }
  at::Tensor embed(const at::Tensor& ids) const;  // [B, T] int64 -> [B, T, d]
  KVCache new_cache(int64_t batch, int64_t capacity, const at::Device& device) const;

  // Runs every layer over x [B, T, d] whose tokens sit at positions pos [3, B, T]; keys and values
  // go to cache positions [cache.len, cache.len + T) and cache.len advances by T. `valid` [B, T]
  // marks real (non-padding) tokens. Returns the final-norm hidden state [B, T, d]. When `hidden`
  // is given it receives the embeddings and every layer's output (the last one after the norm),
  // as transformers' output_hidden_states.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& valid, KVCache& cache,
                     std::vector<at::Tensor>* hidden = nullptr) const;
  at::Tensor logits(const at::Tensor& h) const;  // [..., d] -> [..., vocab]

 private:
  at::Tensor attention(const DecoderLayer& L, const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& mask, KVCache& cache, size_t layer) const;
  TextConfig cfg_;
  at::Tensor embed_w_, final_norm_, head_w_, inv_freq_;
  std::vector<DecoderLayer> layers_;
};

}  // namespace mlaforge
