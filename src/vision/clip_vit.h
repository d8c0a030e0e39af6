// LLaVA's image encoder: the CLIP ViT (patch + class + position embeddings, pre-LayerNorm, encoder
// layers of LayerNorm / attention / quick_gelu MLP) and the two-layer projector into the LLM width;
// for LLaVA-NeXT also the packing of an image's tile features into one sequence.
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
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
  // Moves the weights to `device` in `dtype` (the forward pass then runs there, in that dtype).
  void to(const at::Device& device, at::ScalarType dtype);

 private:
  struct Layer {
    at::Tensor ln1_w, ln1_b, ln2_w, ln2_b, q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, fc1_w, fc1_b, fc2_w, fc2_b;
  };
  ClipVisionConfig vcfg_;
  LlavaConfig lcfg_;
  at::Tensor patch_w_;  // [D, C, P, P]
  at::Tensor class_emb_, pos_emb_, pre_ln_w_, pre_ln_b_;
  std::vector<Layer> layers_;  // only as many as the deepest feature layer needs
  at::Tensor proj1_w_, proj1_b_, proj2_w_, proj2_b_;
};

// LLaVA-NeXT's pack_image_features for one image of height x width (its original size) cut into
// the tiles of its best resolution among `pinpoints`:
//   tiles [1 + rows*cols, G*G, d] projected features (G = tile_size / patch_size), base tile first;
//   newline [d] (the image_newline weight).
// The grid tiles are laid out as one feature map [d, rows*G, cols*G], the rows or columns of the
// centred padding are cut (anyres_unpadded_grid), a newline column is appended and the map is read
// row-major. Returns [G*G + h' * (w' + 1), d]: the base tile's tokens, then the map's.
at::Tensor llava_next_pack_features(const at::Tensor& tiles, int64_t height, int64_t width,
                                    const std::vector<std::array<int64_t, 2>>& pinpoints, int64_t tile_size,
                                    int64_t patch_size, const at::Tensor& newline);

}  // namespace mlaforge
