// mlaforge convert: MHA/GQA -> Multi-head Latent Attention (DESIGN.md sections 1-3).
//
// Calibrate the original model, choose the rotary pairs each KV head keeps, factorise the rest of the
// keys and the values into a per-token latent (per modality, activation-aware), and write a checkpoint
// in mlaforge's MLA format: config.json gains an "mla" section; each layer's self_attn gets k_rope_proj,
// kv_down_proj{.image,.text}, kv_up_proj{.image,.text} (+ kv_up_proj.bias) in place of k_proj and v_proj,
// and q_proj's rows are permuted per head to [rotary dims | the rest].
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "convert/lowrank.h"
#include "convert/rope_select.h"

namespace mlaforge {

struct ConvertOptions {
  std::string model_dir, out_dir, calib_path;
  int64_t rope_pairs = -1;  // r per KV head; -1: all pairs (no partial RoPE)
  int64_t dkv = -1;         // latent width per KV head (R = g * dkv); -1: full rank (no compression)
  RopeStrategy strategy = RopeStrategy::Adaptive;
  LowRankMethod method = LowRankMethod::Whitened;
  KvLatent kv = KvLatent::Joint;
  bool decoupled = true;
  double ridge = 0.0;  // see LowRankOptions::ridge
  int64_t calib_samples = 512;
  int64_t batch_size = 8;
  std::string stats_path;  // when set: load calibration statistics from here if present, else save them here
  std::string device = "cpu";  // cpu or cuda: where calibration and the factorisations run
  std::string dtype = "auto";  // decoder weights and new tensors: auto (f32 on cpu, bf16 on cuda), f32, bf16
};

struct LayerReport {
  std::vector<std::vector<int64_t>> kept;  // [kv head][r]
  double rel_error_image = 0, rel_error_text = 0;
  double key_error_image = 0, key_error_text = 0, value_error_image = 0, value_error_text = 0;
  std::string damping;
  double calib_seconds = 0, factor_seconds = 0;  // this layer's share
};

struct ConvertReport {
  int64_t latent_dim = 0, rope_pairs = 0;
  int64_t kv_bytes_before = 0, kv_bytes_after = 0;  // per token, bf16
  double calib_seconds = 0, factor_seconds = 0, total_seconds = 0;
  int64_t calib_samples = 0, calib_tokens[2] = {0, 0};
  int64_t peak_host_bytes = 0, peak_device_bytes = 0;  // resident set; CUDA allocator (0 on cpu)
  std::vector<LayerReport> layers;
};

ConvertReport convert_model(const ConvertOptions& opts);

}  // namespace mlaforge
