#include "vision/qwen2vl_vit.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/ops.h"
#include "model/rope.h"

namespace mlaforge {

namespace {

// Attention of q, k, v [N, H, hd] within consecutive segments of `lengths` tokens (summing to N);
// returns [N, H*hd]. Runs of equal-length segments (the full windows of an image, the frames of a
// video) go through one batched call [s, H, n, hd] instead of one per segment (transformers calls
// SDPA per segment; each (segment, head) is computed on its own either way).
at::Tensor segment_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::vector<int64_t>& lengths, double scale) {
  const int64_t H = q.size(1), hd = q.size(2);
  std::vector<at::Tensor> outs;
  int64_t off = 0;
  for (size_t i = 0; i < lengths.size();) {
    const int64_t n = lengths[i];
    size_t j = i;
    while (j < lengths.size() && lengths[j] == n) ++j;
    const int64_t s = int64_t(j - i);
    auto split = [&](const at::Tensor& x) { return x.narrow(0, off, s * n).reshape({s, n, H, hd}).transpose(1, 2); };
    at::Tensor o = full_attention(split(q), split(k), split(v), scale);  // [s, H, n, hd]
    outs.push_back(o.transpose(1, 2).reshape({s * n, H * hd}));
    off += s * n;
    i = j;
  }
  return outs.size() == 1 ? outs[0] : at::cat(outs, 0);
}

}  // namespace

WindowOrder qwen25_window_order(const std::vector<std::array<int64_t, 3>>& grids, int64_t merge, int64_t window) {
  check(merge > 0 && window > 0, "vision_config", "window of ", window, " merged tokens and merge size ", merge,
        " must be positive");
  WindowOrder wo;
  int64_t base = 0;  // processor-order index of the current frame's first merged token
  for (const auto& g : grids) {
    const int64_t lh = g[1] / merge, lw = g[2] / merge;  // merged grid of one frame
    for (int64_t t = 0; t < g[0]; ++t, base += lh * lw)
      for (int64_t wy = 0; wy < lh; wy += window)
        for (int64_t wx = 0; wx < lw; wx += window) {
          const int64_t y_end = std::min(wy + window, lh), x_end = std::min(wx + window, lw);
          for (int64_t y = wy; y < y_end; ++y)
            for (int64_t x = wx; x < x_end; ++x) wo.order.push_back(base + y * lw + x);
          wo.lengths.push_back((y_end - wy) * (x_end - wx));
        }
  }
  return wo;
}

Qwen2VisionTower::Qwen2VisionTower(const Qwen2VisionConfig& cfg, const WeightStore& store, const std::string& prefix)
    : cfg_(cfg) {
  const int64_t E = cfg.embed_dim, M = cfg.mlp_hidden, ps = cfg.patch_size, C = cfg.in_channels,
                tps = cfg.temporal_patch_size, merged = E * cfg.spatial_merge_size * cfg.spatial_merge_size;
  WeightLoader w(store, prefix);
  // Conv3d with kernel = stride = (tps, ps, ps), run per patch as transformers does.
  patch_w_ = w.get("patch_embed.proj.weight", {E, C, tps, ps, ps});
  for (int64_t i = 0; i < cfg.depth; ++i) {
    WeightLoader b = w.sub("blocks." + std::to_string(i) + ".");
    Block B;
    B.norm1_w = b.get("norm1.weight", {E});
    B.norm2_w = b.get("norm2.weight", {E});
    B.qkv_w = b.get("attn.qkv.weight", {3 * E, E});
    B.qkv_b = b.get("attn.qkv.bias", {3 * E});
    B.proj_w = b.get("attn.proj.weight", {E, E});
    B.proj_b = b.get("attn.proj.bias", {E});
    if (cfg.windowed) {
      B.gate_w = b.get("mlp.gate_proj.weight", {M, E});
      B.gate_b = b.get("mlp.gate_proj.bias", {M});
      B.up_w = b.get("mlp.up_proj.weight", {M, E});
      B.up_b = b.get("mlp.up_proj.bias", {M});
      B.down_w = b.get("mlp.down_proj.weight", {E, M});
      B.down_b = b.get("mlp.down_proj.bias", {E});
      const auto& full = cfg.fullatt_block_indexes;
      B.full_attention = std::find(full.begin(), full.end(), i) != full.end();
    } else {
      B.norm1_b = b.get("norm1.bias", {E});
      B.norm2_b = b.get("norm2.bias", {E});
      B.fc1_w = b.get("mlp.fc1.weight", {M, E});
      B.fc1_b = b.get("mlp.fc1.bias", {M});
      B.fc2_w = b.get("mlp.fc2.weight", {E, M});
      B.fc2_b = b.get("mlp.fc2.bias", {E});
    }
    blocks_.push_back(std::move(B));
  }
  ln_q_w_ = w.get("merger.ln_q.weight", {E});
  if (!cfg.windowed) ln_q_b_ = w.get("merger.ln_q.bias", {E});
  mlp0_w_ = w.get("merger.mlp.0.weight", {merged, merged});
  mlp0_b_ = w.get("merger.mlp.0.bias", {merged});
  mlp2_w_ = w.get("merger.mlp.2.weight", {cfg.out_hidden_size, merged});
  mlp2_b_ = w.get("merger.mlp.2.bias", {cfg.out_hidden_size});
  // Rotary over head_dim/2 dims: head_dim/4 frequencies theta^(-4i/head_dim), shared by both axes.
  inv_freq_ = rope_inv_freq(E / cfg.num_heads / 2, cfg.rope_theta);
}

void Qwen2VisionTower::to(const at::Device& device, at::ScalarType dtype) {
  for (Block& B : blocks_)
    move_tensors({&B.norm1_w, &B.norm1_b, &B.norm2_w, &B.norm2_b, &B.qkv_w, &B.qkv_b, &B.proj_w, &B.proj_b, &B.fc1_w,
                  &B.fc1_b, &B.fc2_w, &B.fc2_b, &B.gate_w, &B.gate_b, &B.up_w, &B.up_b, &B.down_w, &B.down_b},
                 device, dtype);
  move_tensors({&patch_w_, &ln_q_w_, &ln_q_b_, &mlp0_w_, &mlp0_b_, &mlp2_w_, &mlp2_b_}, device, dtype);
  // inv_freq_ stays on the CPU in float32: the angles are computed there and moved.
}

at::Tensor Qwen2VisionTower::norm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) const {
  return cfg_.windowed ? rms_norm(x, w, 1e-6) : layer_norm(x, w, b, 1e-6);
}

at::Tensor Qwen2VisionTower::mlp(const Block& B, const at::Tensor& x) const {
  if (cfg_.windowed)
    return dense(activation(dense(x, B.gate_w, B.gate_b), cfg_.hidden_act) * dense(x, B.up_w, B.up_b), B.down_w,
                 B.down_b);
  return dense(activation(dense(x, B.fc1_w, B.fc1_b), cfg_.hidden_act), B.fc2_w, B.fc2_b);
}

at::Tensor Qwen2VisionTower::forward(const at::Tensor& patches,
                                     const std::vector<std::array<int64_t, 3>>& grids) const {
  const int64_t E = cfg_.embed_dim, H = cfg_.num_heads, hd = E / H, m = cfg_.spatial_merge_size, mm = m * m;
  int64_t total = 0;
  for (auto& g : grids) {
    check(g[0] > 0 && g[1] > 0 && g[2] > 0 && g[1] % m == 0 && g[2] % m == 0, "image_grid_thw", "patch grid (", g[0],
          ", ", g[1], ", ", g[2], ") must be positive with h and w multiples of spatial_merge_size ", m);
    total += g[0] * g[1] * g[2];
  }
  const int64_t C = cfg_.in_channels, tps = cfg_.temporal_patch_size, ps = cfg_.patch_size;
  check(patches.dim() == 2 && patches.size(0) == total && patches.size(1) == C * tps * ps * ps, "pixel_values",
        "expected [", total, ", ", C * tps * ps * ps, "] patches for the image grids, got ",
        shape_str(patches.sizes().vec()));
  at::Tensor px = patches.to(patch_w_.device(), patch_w_.scalar_type()).reshape({total, C, tps, ps, ps});
  at::Tensor x = at::conv3d(px, patch_w_, {}, {tps, ps, ps}).view({total, E});  // [N, E]

  // Row and column of every patch, listed in the processor's order (2x2 merge blocks row-major).
  std::vector<int64_t> rows, cols, frames;  // frames: patches per frame of each image (attention segments)
  rows.reserve(size_t(total));
  cols.reserve(size_t(total));
  for (auto& g : grids)
    for (int64_t t = 0; t < g[0]; ++t) {
      frames.push_back(g[1] * g[2]);
      for (int64_t bh = 0; bh < g[1] / m; ++bh)
        for (int64_t bw = 0; bw < g[2] / m; ++bw)
          for (int64_t ih = 0; ih < m; ++ih)
            for (int64_t iw = 0; iw < m; ++iw) {
              rows.push_back(bh * m + ih);
              cols.push_back(bw * m + iw);
            }
    }
  auto opts = at::TensorOptions().dtype(at::kLong);
  at::Tensor r = at::tensor(rows, opts).to(at::kFloat).unsqueeze(1), c = at::tensor(cols, opts).to(at::kFloat).unsqueeze(1);
  at::Tensor inv = inv_freq_.unsqueeze(0);
  at::Tensor angles = at::cat({r * inv, c * inv}, 1);             // [N, hd/2]: rows then columns
  at::Tensor emb = at::cat({angles, angles}, 1).to(x.device());   // [N, hd] float32

  // Qwen2.5-VL: merged tokens (groups of mm consecutive patches) in window order, their rotary angles
  // with them; windows of wo.lengths[i] * mm patches.
  at::Tensor window_index;  // [N / mm]
  std::vector<int64_t> windows;
  if (cfg_.windowed) {
    WindowOrder wo = qwen25_window_order(grids, m, cfg_.window_merged_tokens());
    window_index = at::tensor(wo.order, opts).to(x.device());
    x = x.view({total / mm, mm, E}).index_select(0, window_index).view({total, E});
    emb = emb.view({total / mm, mm, hd}).index_select(0, window_index).view({total, hd});
    for (int64_t n : wo.lengths) windows.push_back(n * mm);
  }
  at::Tensor cos = emb.cos().unsqueeze(1), sin = emb.sin().unsqueeze(1);  // [N, 1, hd] float32
  // Rotation in float32, rounded back to the activations' dtype (as transformers).
  auto rotate = [&](const at::Tensor& t) { return apply_rotary(t.to(at::kFloat), cos, sin).to(x.scalar_type()); };

  const double scale = 1.0 / std::sqrt(double(hd));
  for (const Block& B : blocks_) {
    at::Tensor h = norm(x, B.norm1_w, B.norm1_b);
    at::Tensor qkv = dense(h, B.qkv_w, B.qkv_b).view({total, 3, H, hd});
    at::Tensor q = rotate(qkv.select(1, 0)), k = rotate(qkv.select(1, 1));
    at::Tensor v = qkv.select(1, 2);
    // Within each frame of each image (transformers' cu_seqlens; window order keeps frames contiguous)
    // or within each window (cu_window_seqlens).
    at::Tensor a = segment_attention(q, k, v, B.full_attention ? frames : windows, scale);
    x = x + dense(a, B.proj_w, B.proj_b);
    x = x + mlp(B, norm(x, B.norm2_w, B.norm2_b));
  }
  // Merger: norm, then each 2x2 block's 4 consecutive patches concatenated [4E] -> MLP.
  at::Tensor y = norm(x, ln_q_w_, ln_q_b_).view({total / mm, E * mm});
  y = dense(at::gelu(dense(y, mlp0_w_, mlp0_b_)), mlp2_w_, mlp2_b_);  // [N / mm, out_hidden]
  if (!cfg_.windowed) return y;
  // Back to the processor's order: row window_index[i] of the result is y[i].
  return at::empty_like(y).index_copy_(0, window_index, y);
}

}  // namespace mlaforge
