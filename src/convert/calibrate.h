// Calibration: run N conversations through the original model and gather, per layer and split by
// modality (image tokens incl. vision start/end markers, text tokens), the statistics that
// conversion needs. Streams: memory is independent of N.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "io/dataset.h"
#include "model/vlm.h"

namespace mlaforge {

enum Modality : int { kText = 0, kImage = 1 };

// Sums over calibration tokens for one layer; m indexes Modality. h query heads, g KV heads,
// P = head_dim / 2 rotary pairs, d hidden size. All float64.
struct LayerStats {
  at::Tensor gram[2];      // [d, d]: sum of x x^T over tokens of modality m (x: the attention input)
  int64_t tokens[2] = {0, 0};
  at::Tensor q_norm[2];    // [h, P]: sum over tokens of modality m of ||q_i^(k)|| (pre-RoPE)
  at::Tensor k_norm[2];    // [g, P]: the same for keys
  // [h, P]: sum over queries t of sum over keys u of modality m of p_tu * ds_tu(k)^2, where ds(k) is the
  // change of the attention logit when pair k alone loses its rotation and p the original probabilities.
  at::Tensor rope_err[2];
  int64_t queries = 0;     // queries summed in rope_err
};

struct CalibrationStats {
  std::vector<LayerStats> layers;
  int64_t samples = 0;
  std::string model;  // the calibrated model's directory, for the record
};

// A zeroed LayerStats for a model of this shape.
LayerStats empty_layer_stats(const TextConfig& text, const at::Device& device = at::kCPU);
// Adds one layer's attention trace of a prefill batch (valid, is_image [B, T]) to its statistics.
void accumulate_trace(LayerStats& stats, const AttentionTrace& trace, const at::Tensor& valid, const at::Tensor& is_image);

// Calibration one layer at a time, so a model need never be held whole (streaming conversion):
// every batch of rows (whole conversations, teacher-forced) is embedded once; next_layer runs one
// layer over all batches, gathers its statistics, and keeps its outputs as the next layer's inputs.
// Memory: the rows' hidden states (N x T x d in the decoder's dtype, 0.8 MB a 100-token row of a
// 7B model in bf16) plus one layer and its statistics; the statistics live on the decoder's device.
class LayerwiseCalibration {
 public:
  LayerwiseCalibration(const Vlm& model, const std::vector<Conversation>& rows, int64_t batch_size);
  // Layer `layer`'s statistics; layers must come in order 0, 1, ... with their weights `L`.
  LayerStats next_layer(const DecoderLayer& L, int64_t layer);
  int64_t samples() const { return samples_; }

 private:
  struct Piece {
    at::Tensor x;                    // [B, T, d] the next layer's input
    at::Tensor pos, valid, is_image;  // [3, B, T], [B, T], [B, T]
  };
  const Vlm& model_;
  std::vector<Piece> pieces_;
  int64_t next_ = 0, samples_ = 0;
};

// All layers' statistics of rows run through `model` (its layers loaded or not).
CalibrationStats calibrate(const Vlm& model, const std::vector<Conversation>& rows, int64_t batch_size);

void save_stats(const std::string& path, const CalibrationStats& stats);
// Loads stats saved for a model of this shape; errors name the file when they do not fit.
CalibrationStats load_stats(const std::string& path, const TextConfig& text);

}  // namespace mlaforge
