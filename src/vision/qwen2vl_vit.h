// The Qwen2-VL vision tower: patch embedding (a linear over 1176 values), blocks of LayerNorm,
// self-attention with a 2-D rotary embedding (within each image), quick_gelu MLP, then the 2x2 patch merger.
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <string>
#include <vector>

#include "io/config.h"

namespace mlaforge {

class WeightStore;

class Qwen2VisionTower {
 public:
  Qwen2VisionTower(const Qwen2VisionConfig& cfg, const WeightStore& store, const std::string& prefix);

  // patches [N, C*tps*ps*ps] for all images concatenated, N = sum over images of t*h*w (patch grids);
  // returns [N / merge^2, out_hidden] merged tokens in the same order.
  at::Tensor forward(const at::Tensor& patches, const std::vector<std::array<int64_t, 3>>& grids) const;

 private:
  struct Block {
    at::Tensor norm1_w, norm1_b, norm2_w, norm2_b, qkv_w, qkv_b, proj_w, proj_b, fc1_w, fc1_b, fc2_w, fc2_b;
  };
  Qwen2VisionConfig cfg_;
  at::Tensor patch_w_;  // [E, C*tps*ps*ps]
  std::vector<Block> blocks_;
  at::Tensor ln_q_w_, ln_q_b_, mlp0_w_, mlp0_b_, mlp2_w_, mlp2_b_;
  at::Tensor inv_freq_;  // [head_dim/4]
};

}  // namespace mlaforge
