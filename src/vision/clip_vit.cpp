#include "vision/clip_vit.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/ops.h"
#include "vision/preprocess.h"

namespace mlaforge {

namespace {
// Python-style index into the L+1 hidden states (embeddings, layer 1..L) -> number of layers to run.
int64_t layers_needed(int64_t index, int64_t num_layers) { return index < 0 ? num_layers + 1 + index : index; }
}  // namespace

ClipVisionEncoder::ClipVisionEncoder(const ClipVisionConfig& vcfg, const LlavaConfig& lcfg, int64_t text_hidden,
                                     const WeightStore& store, const std::string& tower_prefix,
                                     const std::string& projector_prefix)
    : vcfg_(vcfg), lcfg_(lcfg) {
  const int64_t D = vcfg.hidden_size, F = vcfg.intermediate_size, P = vcfg.patch_size, C = vcfg.num_channels;
  WeightLoader w(store, tower_prefix);
  patch_w_ = w.get("embeddings.patch_embedding.weight", {D, C, P, P});
  class_emb_ = w.get("embeddings.class_embedding", {D});
  pos_emb_ = w.get("embeddings.position_embedding.weight", {vcfg.num_patches() + 1, D});
  pre_ln_w_ = w.get("pre_layrnorm.weight", {D});
  pre_ln_b_ = w.get("pre_layrnorm.bias", {D});
  int64_t depth = 0;
  for (int64_t f : lcfg.feature_layers) depth = std::max(depth, layers_needed(f, vcfg.num_layers));
  for (int64_t i = 0; i < depth; ++i) {
    WeightLoader l = w.sub("encoder.layers." + std::to_string(i) + ".");
    Layer L;
    L.ln1_w = l.get("layer_norm1.weight", {D});
    L.ln1_b = l.get("layer_norm1.bias", {D});
    L.ln2_w = l.get("layer_norm2.weight", {D});
    L.ln2_b = l.get("layer_norm2.bias", {D});
    L.q_w = l.get("self_attn.q_proj.weight", {D, D});
    L.q_b = l.get("self_attn.q_proj.bias", {D});
    L.k_w = l.get("self_attn.k_proj.weight", {D, D});
    L.k_b = l.get("self_attn.k_proj.bias", {D});
    L.v_w = l.get("self_attn.v_proj.weight", {D, D});
    L.v_b = l.get("self_attn.v_proj.bias", {D});
    L.o_w = l.get("self_attn.out_proj.weight", {D, D});
    L.o_b = l.get("self_attn.out_proj.bias", {D});
    L.fc1_w = l.get("mlp.fc1.weight", {F, D});
    L.fc1_b = l.get("mlp.fc1.bias", {F});
    L.fc2_w = l.get("mlp.fc2.weight", {D, F});
    L.fc2_b = l.get("mlp.fc2.bias", {D});
    layers_.push_back(std::move(L));
  }
  const int64_t in = D * int64_t(lcfg.feature_layers.size());
  WeightLoader pj(store, projector_prefix);
  proj1_w_ = pj.get("linear_1.weight", {text_hidden, in});
  proj1_b_ = pj.maybe("linear_1.bias", {text_hidden});
  proj2_w_ = pj.get("linear_2.weight", {text_hidden, text_hidden});
  proj2_b_ = pj.maybe("linear_2.bias", {text_hidden});
}

void ClipVisionEncoder::to(const at::Device& device, at::ScalarType dtype) {
  for (Layer& L : layers_)
    move_tensors({&L.ln1_w, &L.ln1_b, &L.ln2_w, &L.ln2_b, &L.q_w, &L.q_b, &L.k_w, &L.k_b, &L.v_w, &L.v_b, &L.o_w, &L.o_b,
                  &L.fc1_w, &L.fc1_b, &L.fc2_w, &L.fc2_b},
                 device, dtype);
  move_tensors({&patch_w_, &class_emb_, &pos_emb_, &pre_ln_w_, &pre_ln_b_, &proj1_w_, &proj1_b_, &proj2_w_, &proj2_b_},
               device, dtype);
}

at::Tensor ClipVisionEncoder::forward(const at::Tensor& pixels) const {
  const int64_t n = pixels.size(0), D = vcfg_.hidden_size, P = vcfg_.patch_size, S = vcfg_.image_size,
                C = vcfg_.num_channels, H = vcfg_.num_heads, hd = D / H;
  check(pixels.dim() == 4 && pixels.size(1) == C && pixels.size(2) == S && pixels.size(3) == S, "pixel_values",
        "expected [n, ", C, ", ", S, ", ", S, "] for this CLIP tower, got ", shape_str(pixels.sizes().vec()));
  // The patch convolution (kernel = stride = P) as transformers runs it: [n, D, G, G] -> [n, G*G, D].
  at::Tensor x = at::conv2d(pixels.to(patch_w_.device(), patch_w_.scalar_type()), patch_w_, {}, {P, P})
                     .flatten(2)
                     .transpose(1, 2);
  x = at::cat({class_emb_.view({1, 1, D}).expand({n, 1, D}), x}, 1) + pos_emb_;    // [n, 1+G*G, D]
  x = layer_norm(x, pre_ln_w_, pre_ln_b_, vcfg_.layer_norm_eps);
  std::vector<at::Tensor> states = {x};  // hidden states: embeddings after pre_layrnorm, then each layer
  const int64_t T = x.size(1);
  const double scale = 1.0 / std::sqrt(double(hd));
  for (const Layer& L : layers_) {
    at::Tensor h = layer_norm(x, L.ln1_w, L.ln1_b, vcfg_.layer_norm_eps);
    auto heads = [&](const at::Tensor& w, const at::Tensor& b) { return dense(h, w, b).view({n, T, H, hd}).transpose(1, 2); };
    at::Tensor q = heads(L.q_w, L.q_b), k = heads(L.k_w, L.k_b), v = heads(L.v_w, L.v_b);  // [n, H, T, hd]
    at::Tensor o = full_attention(q, k, v, scale);  // [n, H, T, hd]
    x = x + dense(o.transpose(1, 2).reshape({n, T, D}), L.o_w, L.o_b);
    at::Tensor h2 = layer_norm(x, L.ln2_w, L.ln2_b, vcfg_.layer_norm_eps);
    x = x + dense(activation(dense(h2, L.fc1_w, L.fc1_b), vcfg_.hidden_act), L.fc2_w, L.fc2_b);
    states.push_back(x);
  }
  std::vector<at::Tensor> picked;
  for (int64_t f : lcfg_.feature_layers) {
    at::Tensor s = states[size_t(layers_needed(f, vcfg_.num_layers))];
    picked.push_back(lcfg_.keep_cls ? s : s.narrow(1, 1, T - 1));
  }
  at::Tensor feats = picked.size() == 1 ? picked[0] : at::cat(picked, -1);
  return dense(activation(dense(feats, proj1_w_, proj1_b_), lcfg_.projector_act), proj2_w_, proj2_b_);
}

at::Tensor llava_next_pack_features(const at::Tensor& tiles, int64_t height, int64_t width,
                                    const std::vector<std::array<int64_t, 2>>& pinpoints, int64_t tile_size,
                                    int64_t patch_size, const at::Tensor& newline) {
  const int64_t G = tile_size / patch_size, d = tiles.size(-1);
  const auto [best_h, best_w] = select_best_resolution(height, width, pinpoints);
  const int64_t rows = best_h / tile_size, cols = best_w / tile_size;
  check(tiles.dim() == 3 && tiles.size(0) == 1 + rows * cols && tiles.size(1) == G * G, "pixel_values",
        "an image of ", height, "x", width, " needs 1 + ", rows, "x", cols, " tiles of ", G * G,
        " features (best resolution ", best_h, "x", best_w, "), got ", shape_str(tiles.sizes().vec()));
  at::Tensor base = tiles[0];  // [G*G, d]
  // (rows, cols, G, G, d) -> (d, rows, G, cols, G) -> [d, rows*G, cols*G]: tile rows stacked, each
  // tile's own rows interleaved with its neighbours' as in the picture.
  at::Tensor map = tiles.narrow(0, 1, rows * cols)
                       .reshape({rows, cols, G, G, d})
                       .permute({4, 0, 2, 1, 3})
                       .reshape({d, rows * G, cols * G});
  const auto [h, w] = anyres_unpadded_grid(height, width, rows * G, cols * G);
  map = map.narrow(1, (rows * G - h) / 2, h).narrow(2, (cols * G - w) / 2, w);  // [d, h, w]
  at::Tensor nl = newline.to(map.scalar_type()).view({d, 1, 1}).expand({d, h, 1});
  at::Tensor grid = at::cat({map, nl}, 2).reshape({d, h * (w + 1)}).t();  // [h*(w+1), d]
  return at::cat({base, grid}, 0);
}

}  // namespace mlaforge
