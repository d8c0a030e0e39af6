// LLaVA's image encoder: the CLIP ViT (patch + class + position embeddings, pre-LayerNorm, encoder
// layers of LayerNorm / attention / quick_gelu MLP) and the two-layer projector into the LLM width.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "io/config.h"

namespace mlaforge {

class WeightStore;

class ClipVisionEncoder {
 public:
  // tower_prefix: e.g. "vision_tower.vision_model."; projector_prefix: e.g. "multi_modal_projector.".
  ClipVisionEncoder(const ClipVisionConfig& vcfg, const LlavaConfig& lcfg, int64_t text_hidden,
                    const WeightStore& store, const std::string& tower_prefix, const std::string& projector_prefix);

  // pixels [n, C, S, S] (S = image_size) -> projected features [n, tokens_per_image, text_hidden].
  at::Tensor forward(const at::Tensor& pixels) const;

 private:
  struct Layer {
    at::Tensor ln1_w, ln1_b, ln2_w, ln2_b, q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, fc1_w, fc1_b, fc2_w, fc2_b;
  };
  ClipVisionConfig vcfg_;
  LlavaConfig lcfg_;
  at::Tensor patch_w_;  // [D, C*P*P]
  at::Tensor class_emb_, pos_emb_, pre_ln_w_, pre_ln_b_;
  std::vector<Layer> layers_;  // only as many as the deepest feature layer needs
  at::Tensor proj1_w_, proj1_b_, proj2_w_, proj2_b_;
};

}  // namespace mlaforge
