// Partial RoPE: which rotary pairs each layer's KV heads keep (DESIGN.md section 1).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "convert/calibrate.h"

namespace mlaforge {

// high: the r highest frequencies (k < r); low: the r lowest; uniform: every (P/r)-th pair;
// 2norm: MHA2MLA's score sum over the group's query heads of mean||q^(k)|| * mean||k^(k)||;
// adaptive (the default): rank pairs by the attention change when each alone loses rotation,
// measured separately for image and text keys, each modality's scores normalised to sum 1 per KV
// head before they are added, so neither modality's scale dominates.
enum class RopeStrategy { High, Low, Uniform, TwoNorm, Adaptive };

RopeStrategy parse_rope_strategy(const std::string& name);  // throws Error listing the choices
std::string rope_strategy_name(RopeStrategy s);

// Per-pair scores [g][P] of a layer for the data-driven strategies (higher = keep).
std::vector<std::vector<double>> pair_scores(const LayerStats& s, RopeStrategy strategy, int64_t num_kv_heads);

// Kept pairs of one layer [kv head][r], each list ascending; `stats` (the layer's) is needed for
// 2norm and adaptive.
std::vector<std::vector<int64_t>> select_layer_pairs(RopeStrategy strategy, int64_t r, const TextConfig& text,
                                                    const LayerStats* stats);
// Kept pairs [layer][kv head][r], each list ascending. `stats` is needed for 2norm and adaptive.
std::vector<std::vector<std::vector<int64_t>>> select_rope_pairs(RopeStrategy strategy, int64_t r,
                                                                 const TextConfig& text,
                                                                 const CalibrationStats* stats);

}  // namespace mlaforge
