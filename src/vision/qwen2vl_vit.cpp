#include "vision/qwen2vl_vit.h"

#include <ATen/ATen.h>

#include <cmath>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/ops.h"
#include "model/rope.h"

namespace mlaforge {

Qwen2VisionTower::Qwen2VisionTower(const Qwen2VisionConfig& cfg, const WeightStore& store, const std::string& prefix)
    : cfg_(cfg) {
  const int64_t E = cfg.embed_dim, M = cfg.mlp_hidden, ps = cfg.patch_size, C = cfg.in_channels,
                tps = cfg.temporal_patch_size, merged = E * cfg.spatial_merge_size * cfg.spatial_merge_size;
  WeightLoader w(store, prefix);
  // Conv3d with kernel = stride = (tps, ps, ps) over one patch is a linear map of its C*tps*ps*ps values.
  patch_w_ = w.get("patch_embed.proj.weight", {E, C, tps, ps, ps}).reshape({E, C * tps * ps * ps});
  for (int64_t i = 0; i < cfg.depth; ++i) {
    WeightLoader b = w.sub("blocks." + std::to_string(i) + ".");
    Block B;
    B.norm1_w = b.get("norm1.weight", {E});
    B.norm1_b = b.get("norm1.bias", {E});
    B.norm2_w = b.get("norm2.weight", {E});
    B.norm2_b = b.get("norm2.bias", {E});
    B.qkv_w = b.get("attn.qkv.weight", {3 * E, E});
    B.qkv_b = b.get("attn.qkv.bias", {3 * E});
    B.proj_w = b.get("attn.proj.weight", {E, E});
    B.proj_b = b.get("attn.proj.bias", {E});
    B.fc1_w = b.get("mlp.fc1.weight", {M, E});
    B.fc1_b = b.get("mlp.fc1.bias", {M});
    B.fc2_w = b.get("mlp.fc2.weight", {E, M});
    B.fc2_b = b.get("mlp.fc2.bias", {E});
    blocks_.push_back(std::move(B));
  }
  ln_q_w_ = w.get("merger.ln_q.weight", {E});
  ln_q_b_ = w.get("merger.ln_q.bias", {E});
  mlp0_w_ = w.get("merger.mlp.0.weight", {merged, merged});
  mlp0_b_ = w.get("merger.mlp.0.bias", {merged});
  mlp2_w_ = w.get("merger.mlp.2.weight", {cfg.out_hidden_size, merged});
  mlp2_b_ = w.get("merger.mlp.2.bias", {cfg.out_hidden_size});
  // Rotary over head_dim/2 dims: head_dim/4 frequencies theta^(-4i/head_dim), shared by both axes.
  inv_freq_ = rope_inv_freq(E / cfg.num_heads / 2, cfg.rope_theta);
}

at::Tensor Qwen2VisionTower::forward(const at::Tensor& patches,
                                     const std::vector<std::array<int64_t, 3>>& grids) const {
  const int64_t E = cfg_.embed_dim, H = cfg_.num_heads, hd = E / H, m = cfg_.spatial_merge_size;
  int64_t total = 0;
  for (auto& g : grids) total += g[0] * g[1] * g[2];
  check(patches.dim() == 2 && patches.size(0) == total && patches.size(1) == patch_w_.size(1), "pixel_values",
        "expected [", total, ", ", patch_w_.size(1), "] patches for the image grids, got ", shape_str(patches.sizes().vec()));
  at::Tensor x = at::matmul(patches.to(patch_w_.scalar_type()), patch_w_.t());  // [N, E]

  // Row and column of every patch, listed in the processor's order (2x2 merge blocks row-major).
  std::vector<int64_t> rows, cols;
  rows.reserve(size_t(total));
  cols.reserve(size_t(total));
  for (auto& g : grids)
    for (int64_t t = 0; t < g[0]; ++t)
      for (int64_t bh = 0; bh < g[1] / m; ++bh)
        for (int64_t bw = 0; bw < g[2] / m; ++bw)
          for (int64_t ih = 0; ih < m; ++ih)
            for (int64_t iw = 0; iw < m; ++iw) {
              rows.push_back(bh * m + ih);
              cols.push_back(bw * m + iw);
            }
  auto opts = at::TensorOptions().dtype(at::kLong);
  at::Tensor r = at::tensor(rows, opts).to(at::kFloat).unsqueeze(1), c = at::tensor(cols, opts).to(at::kFloat).unsqueeze(1);
  at::Tensor inv = inv_freq_.unsqueeze(0);
  at::Tensor angles = at::cat({r * inv, c * inv}, 1);             // [N, hd/2]: rows then columns
  at::Tensor emb = at::cat({angles, angles}, 1).to(x.device());   // [N, hd]
  at::Tensor cos = emb.cos().unsqueeze(1), sin = emb.sin().unsqueeze(1);  // [N, 1, hd]

  const double scale = 1.0 / std::sqrt(double(hd));
  for (const Block& B : blocks_) {
    at::Tensor h = layer_norm(x, B.norm1_w, B.norm1_b, 1e-6);
    at::Tensor qkv = dense(h, B.qkv_w, B.qkv_b).view({total, 3, H, hd});
    at::Tensor q = apply_rotary(qkv.select(1, 0), cos, sin), k = apply_rotary(qkv.select(1, 1), cos, sin);
    at::Tensor v = qkv.select(1, 2);
    // Attention within each frame of each image (transformers' cu_seqlens).
    std::vector<at::Tensor> outs;
    int64_t off = 0;
    for (auto& g : grids)
      for (int64_t t = 0; t < g[0]; ++t) {
        const int64_t n = g[1] * g[2];
        at::Tensor qs = q.narrow(0, off, n).transpose(0, 1), ks = k.narrow(0, off, n).transpose(0, 1),
                   vs = v.narrow(0, off, n).transpose(0, 1);  // [H, n, hd]
        at::Tensor p = at::softmax(at::matmul(qs, ks.transpose(1, 2)) * scale, -1, at::kFloat);
        outs.push_back(at::matmul(p, vs).transpose(0, 1).reshape({n, E}));
        off += n;
      }
    x = x + dense(at::cat(outs, 0), B.proj_w, B.proj_b);
    at::Tensor h2 = layer_norm(x, B.norm2_w, B.norm2_b, 1e-6);
    x = x + dense(activation(dense(h2, B.fc1_w, B.fc1_b), cfg_.hidden_act), B.fc2_w, B.fc2_b);
  }
  // Merger: LayerNorm, then each 2x2 block's 4 consecutive patches concatenated [4E] -> MLP.
  at::Tensor y = layer_norm(x, ln_q_w_, ln_q_b_, 1e-6).view({total / (m * m), E * m * m});
  return dense(at::gelu(dense(y, mlp0_w_, mlp0_b_)), mlp2_w_, mlp2_b_);
}

}  // namespace mlaforge
