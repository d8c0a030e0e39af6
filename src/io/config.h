// Model configuration read from a Hugging Face checkpoint's config.json (and generation_config.json).
//
// Both layouts are accepted: text keys flat at the top level (Hub files) or nested in "text_config"
// (transformers 5), and RoPE given as "rope_parameters" or as "rope_theta" + "rope_scaling".
// Qwen2-VL and Qwen2.5-VL share the decoder, the prompt format and the preprocessing; they differ in
// the vision tower (Qwen2VisionConfig) and in the temporal M-RoPE index of images.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace mlaforge {

enum class Family { Qwen2VL, Qwen25VL, Llava };

struct TextConfig {
  int64_t vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_layers = 0;
  int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  // M-RoPE: frequency pairs per axis (temporal, height, width); empty means 1-D RoPE.
  std::vector<int64_t> mrope_section;
  bool tie_word_embeddings = false;
  std::string hidden_act = "silu";
};

// The vision tower of Qwen2-VL and of Qwen2.5-VL (windowed = true). embed_dim is the ViT width
// (Qwen2-VL's "embed_dim", Qwen2.5-VL's "hidden_size"), out_hidden_size the LLM width (Qwen2-VL's
// "hidden_size", Qwen2.5-VL's "out_hidden_size"), mlp_hidden the MLP width (embed_dim * mlp_ratio or
// "intermediate_size").
struct Qwen2VisionConfig {
  int64_t depth = 0, embed_dim = 0, num_heads = 0, out_hidden_size = 0, mlp_hidden = 0;
  int64_t patch_size = 14, temporal_patch_size = 2, spatial_merge_size = 2, in_channels = 3;
  double rope_theta = 10000.0;
  std::string hidden_act = "quick_gelu";
  // Qwen2.5-VL: RMSNorm (norm1, norm2, merger.ln_q), SwiGLU MLP with biases, and window attention:
  // every block but those in fullatt_block_indexes attends within windows of window_size pixels
  // (window_size / patch_size / spatial_merge_size merged tokens per side).
  bool windowed = false;
  int64_t window_size = 0;
  std::vector<int64_t> fullatt_block_indexes;
  int64_t window_merged_tokens() const { return window_size / patch_size / spatial_merge_size; }
};

// CLIP vision tower of LLaVA (transformers' CLIPVisionConfig; omitted keys take its class defaults).
struct ClipVisionConfig {
  int64_t hidden_size = 768, intermediate_size = 3072, num_layers = 12, num_heads = 12;
  int64_t image_size = 224, patch_size = 32, num_channels = 3;
  double layer_norm_eps = 1e-5;
  std::string hidden_act = "quick_gelu";
  int64_t num_patches() const { return (image_size / patch_size) * (image_size / patch_size); }
};

// LLaVA-1.5 and LLaVA-NeXT: which CLIP hidden states feed the projector and how.
struct LlavaConfig {
  // Indices into (embeddings, layer 1, ..., layer L), Python-style (negative from the end); several
  // are concatenated along features.
  std::vector<int64_t> feature_layers = {-2};
  bool keep_cls = false;  // select strategy "full" (true) or "default" (drops CLS)
  std::string projector_act = "gelu";
  int64_t image_seq_length = 576;
  // LLaVA-NeXT ("anyres"): the tile grids an image may be cut into, as (height, width) in pixels,
  // multiples of the tower's image_size. Empty for LLaVA-1.5 (one tile per image).
  std::vector<std::array<int64_t, 2>> grid_pinpoints;
  bool anyres() const { return !grid_pinpoints.empty(); }
  // Tokens of one tile (for LLaVA-1.5 of one image; for LLaVA-NeXT of the base tile).
  int64_t tokens_per_image(const ClipVisionConfig& v) const { return v.num_patches() + (keep_cls ? 1 : 0); }
};

// A converted (MLA) checkpoint's "mla" section of config.json, written by mlaforge convert.
// Per layer and KV head, `kept_pairs` lists the rotary pairs (ascending) that keep their rotation;
// the other pairs lose it and go into the latent with the values (DESIGN.md sections 1-3).
struct MlaConfig {
  bool enabled = false;
  int64_t rope_pairs = 0;  // r: kept pairs per KV head (the rotary keys have 2r dims per KV head)
  int64_t latent_dim = 0;  // R: latent width per token and layer; 0: no latent (stage 1: partial RoPE only)
  bool decoupled = true;   // one down/up pair per modality (image, text) or one shared
  std::vector<std::vector<std::vector<int64_t>>> kept_pairs;  // [layer][kv head][r]
  std::string rope_strategy, lowrank, kv;                     // the options used, for the record
  int64_t calib_samples = 0;
  std::string source;  // the original model's directory (fine-tuning's default teacher)
};

struct ModelConfig {
  std::string path;        // config.json path, for error messages
  std::string model_type;  // "qwen2_vl", "qwen2_5_vl", "llava", "llava_next"
  Family family = Family::Qwen2VL;
  TextConfig text;
  Qwen2VisionConfig vision;  // Family::Qwen2VL and Family::Qwen25VL
  ClipVisionConfig clip;      // Family::Llava (llava and llava_next)
  LlavaConfig llava;          // Family::Llava (llava and llava_next)
  int64_t image_token_id = -1, video_token_id = -1, vision_start_token_id = -1, vision_end_token_id = -1;
  int64_t pad_token_id = -1;
  std::vector<int64_t> eos_token_ids;  // generation stops at any of these
  MlaConfig mla;                       // enabled for converted checkpoints

  // Qwen2-VL or Qwen2.5-VL: the same decoder, prompts and preprocessing, the Qwen vision tower.
  bool qwen_vl() const { return family == Family::Qwen2VL || family == Family::Qwen25VL; }

  // KV-cache bytes per token over all layers for an element size in bytes (2 for bf16): keys and
  // values of the original attention, or the rotary keys and the latent of MLA (the modality bit not
  // counted).
  int64_t kv_bytes_per_token(int64_t element_bytes) const {
    if (mla.enabled) {
      const int64_t g = text.num_kv_heads, r2 = 2 * mla.rope_pairs;
      // Without a latent the cache holds the rotary keys, the other key dims and the values.
      const int64_t latent = mla.latent_dim > 0 ? mla.latent_dim : g * (text.head_dim - r2) + g * text.head_dim;
      return text.num_layers * (g * r2 + latent) * element_bytes;
    }
    return mha_kv_bytes_per_token(element_bytes);
  }
  int64_t mha_kv_bytes_per_token(int64_t element_bytes) const {
    return 2 * text.num_layers * text.num_kv_heads * text.head_dim * element_bytes;
  }
};

// Reads <dir>/config.json and, when present, <dir>/generation_config.json. Unknown architectures,
// missing keys and inconsistent sizes are errors naming config.json.
ModelConfig load_model_config(const std::string& dir);

}  // namespace mlaforge
