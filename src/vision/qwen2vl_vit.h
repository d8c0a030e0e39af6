// The Qwen2-VL and Qwen2.5-VL vision towers: patch embedding (a linear over 1176 values), blocks of
// self-attention with a 2-D rotary embedding and an MLP, then the 2x2 patch merger.
//  - Qwen2-VL: LayerNorm, quick_gelu MLP (fc1, fc2); every block attends within each frame of each image.
//  - Qwen2.5-VL: RMSNorm, SwiGLU MLP with biases (gate, up, down); the merged tokens are reordered window
//    by window before the blocks, blocks attend within each window except the fullatt_block_indexes
//    blocks (within each frame), and the merger's output is put back into the processor's order.
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <string>
#include <vector>

#include "io/config.h"

namespace mlaforge {

class WeightStore;

// Qwen2.5-VL's window order for images of patch grids (t, h, w): the merged tokens (merge x merge
// patch groups, processor order: image, frame, row, column of the merged grid) listed window by
// window. Per image and frame, the (h/merge) x (w/merge) merged grid is cut into squares of `window`
// merged tokens per side from the top left; windows at the right and bottom edges are smaller when the
// grid is not a multiple of `window`. Windows go row-major over the window grid, tokens row-major
// within each window.
struct WindowOrder {
  std::vector<int64_t> order;    // [merged tokens]: order[i] = processor-order index of the i-th token
  std::vector<int64_t> lengths;  // merged tokens per window, in window order (sums to order.size())
};
WindowOrder qwen25_window_order(const std::vector<std::array<int64_t, 3>>& grids, int64_t merge, int64_t window);

class Qwen2VisionTower {
 public:
  Qwen2VisionTower(const Qwen2VisionConfig& cfg, const WeightStore& store, const std::string& prefix);

  // patches [N, C*tps*ps*ps] for all images concatenated, N = sum over images of t*h*w (patch grids);
  // returns [N / merge^2, out_hidden] merged tokens in the same order.
  at::Tensor forward(const at::Tensor& patches, const std::vector<std::array<int64_t, 3>>& grids) const;
  // Moves the weights to `device` in `dtype` (the forward pass then runs there, in that dtype).
  void to(const at::Device& device, at::ScalarType dtype);

 private:
  struct Block {
    at::Tensor norm1_w, norm1_b, norm2_w, norm2_b, qkv_w, qkv_b, proj_w, proj_b;  // norm biases: Qwen2-VL only
    at::Tensor fc1_w, fc1_b, fc2_w, fc2_b;                                         // Qwen2-VL MLP
    at::Tensor gate_w, gate_b, up_w, up_b, down_w, down_b;                         // Qwen2.5-VL SwiGLU MLP
    bool full_attention = true;  // Qwen2.5-VL: false for windowed blocks
  };
  // LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL, weight only), eps 1e-6 in both.
  at::Tensor norm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) const;
  at::Tensor mlp(const Block& B, const at::Tensor& x) const;

  Qwen2VisionConfig cfg_;
  at::Tensor patch_w_;  // [E, C, tps, ps, ps]
  std::vector<Block> blocks_;
  at::Tensor ln_q_w_, ln_q_b_, mlp0_w_, mlp0_b_, mlp2_w_, mlp2_b_;
  at::Tensor inv_freq_;  // [head_dim/4]
};

}  // namespace mlaforge
