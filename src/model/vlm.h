// A vision-language model assembled from a Hugging Face checkpoint directory: config, tokenizer,
// chat format, image preprocessing, vision tower and decoder. Turns prompts into batches and runs them.
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/config.h"
#include "io/safetensors.h"
#include "model/decoder.h"
#include "text/chat.h"
#include "text/prompt.h"
#include "text/tokenizer.h"
#include "vision/preprocess.h"
#include "vision/clip_vit.h"
#include "vision/qwen2vl_vit.h"

namespace mlaforge {

// A left-padded batch ready for the decoder.
struct Batch {
  at::Tensor ids;    // [B, T] int64, padding = pad id
  at::Tensor valid;  // [B, T] bool, false on left padding
  at::Tensor is_image;  // [B, T] bool: image tokens and the vision start/end markers (MLA's modality)
  at::Tensor pos;    // [3, B, T] int64 positions: M-RoPE axes (t, h, w), all equal for text and 1-D RoPE
  // Images of all rows in order, or undefined without images:
  // Qwen2-VL and Qwen2.5-VL [N, C*tps*ps*ps] patches of all images; LLaVA [n, C, S, S]; LLaVA-NeXT
  // [tiles of all images, C, S, S].
  at::Tensor pixel_values;
  // Per image, what its rows of pixel_values are: Qwen2-VL the patch grid (t, h, w); LLaVA
  // (1, S/P, S/P); LLaVA-NeXT (tiles, height, width): its tile count and original size in pixels
  // (the processor's image_sizes), which set its token count.
  std::vector<std::array<int64_t, 3>> grids;
  std::vector<std::string> image_keys;        // per image: its file, when known (keys the feature cache)
  std::vector<int64_t> next_position;         // [B]: position of each row's first generated token
  int64_t batch() const { return ids.size(0); }
  int64_t length() const { return ids.size(1); }
};

// Where and how Vlm::load puts the model: the decoder, and the vision tower in the decoder's dtype.
struct LoadOptions {
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;  // floating decoder weights, converted tensor by tensor as they load
  // true: keep the checkpoint's own half-precision dtype (bf16 or f16 stays as stored), else `dtype`.
  bool stored_half = false;
  // false: embeddings, final norm and head only; the layers come one at a time from load_layer.
  bool decoder_layers = true;
};

class Vlm {
 public:
  // Loads everything from `dir`; every problem is an Error naming the file.
  static std::unique_ptr<Vlm> load(const std::string& dir, const LoadOptions& options = LoadOptions());
  // Decoder layer `i` from the checkpoint, on the load options' device and dtype.
  DecoderLayer load_layer(int64_t i) const;

  const std::string& dir() const { return dir_; }
  const ModelConfig& config() const { return cfg_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const DecoderLM& decoder() const { return *decoder_; }
  DecoderLM& mutable_decoder() { return *decoder_; }
  const WeightStore& weights() const { return *store_; }
  // Where the model runs; batches from prepare()/make_batch() live there (pixel values stay on the
  // CPU in float32 until the vision tower takes them).
  const at::Device& device() const { return device_; }
  // Moves the decoder and the vision tower to `device` with floating weights in `dtype`.
  void to(const at::Device& device, at::ScalarType dtype = at::kFloat);
  const std::string& lm_prefix() const { return lm_prefix_; }  // e.g. "model." (the decoder's weights)
  int64_t parameter_count(const std::string& part) const;  // "vision", "language", "all"

  // Renders, tokenizes and preprocesses prompts into one left-padded batch; with
  // add_generation_prompt false the turns are rendered as they are (whole conversations, for
  // calibration and training).
  Batch prepare(const std::vector<Prompt>& prompts, bool add_generation_prompt = true) const;
  // Builds a batch from token ids whose image tokens are already expanded, with given pixel values.
  // LLaVA-NeXT also takes the processor's [n, max_tiles, C, S, S] (tiles past an image's own count
  // are padding); the batch holds the images' tiles concatenated.
  Batch make_batch(const std::vector<std::vector<int64_t>>& ids, const at::Tensor& pixel_values,
                   const std::vector<std::array<int64_t, 3>>& grids) const;

  // Image features [n_image_tokens, d] for a batch's images (LLaVA-NeXT: each image's tiles packed,
  // images concatenated).
  at::Tensor image_features(const at::Tensor& pixel_values, const std::vector<std::array<int64_t, 3>>& grids) const;
  // The same, reusing features of images seen before in this process (keyed by file and by a hash
  // of the vision weights, so models sharing a vision tower - an original and its conversions - share
  // them; the tower is frozen in every use). The process keeps at most 1 GiB of features.
  at::Tensor image_features_cached(const Batch& batch) const;
  // Token embeddings with image features scattered into the image-token positions: [B, T, d].
  at::Tensor input_embeddings(const Batch& batch) const;
  // Runs the prompt through the decoder into `cache`; returns the final hidden state [B, T, d].
  // `observer` sees every layer's attention (calibration).
  at::Tensor prefill(const Batch& batch, KVCache& cache, const ForwardTaps& taps = {}) const;
  // One decoding step: tokens [B] at positions [B] (all three axes). Returns logits [B, vocab].
  at::Tensor decode_step(const at::Tensor& tokens, const at::Tensor& positions, KVCache& cache) const;

 private:
  Vlm() = default;
  std::string dir_;
  ModelConfig cfg_;
  std::unique_ptr<WeightStore> store_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<ChatFormat> chat_;
  // Tokens an image of this patch grid becomes in the prompt.
  int64_t image_tokens(const std::array<int64_t, 3>& grid) const;
  Qwen2VLImageConfig qwen_image_cfg_;      // Qwen2-VL and Qwen2.5-VL
  // Moves the vision tower, projector and image_newline (loaded on the CPU in float32).
  void move_vision(const at::Device& device, at::ScalarType dtype);
  std::unique_ptr<Qwen2VisionTower> qwen_vision_;
  ClipImageConfig clip_image_cfg_;         // Family::Llava
  std::unique_ptr<ClipVisionEncoder> clip_vision_;
  at::Tensor image_newline_;               // LLaVA-NeXT [text hidden]: ends each row of tile features
  std::unique_ptr<DecoderLM> decoder_;
  int64_t pad_id_ = 0;
  std::string lm_prefix_, head_name_;
  LoadOptions load_options_;
  DecoderLM::WeightFn decoder_weights() const;  // checkpoint tensors by decoder name, per load_options_
  std::string vision_hash_;  // of the vision tower's and projector's weights
  at::Device device_ = at::kCPU;
};

}  // namespace mlaforge
