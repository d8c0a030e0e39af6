#include "convert/rope_select.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <numeric>

#include "core/error.h"

namespace mlaforge {

RopeStrategy parse_rope_strategy(const std::string& name) {
  if (name == "high") return RopeStrategy::High;
  if (name == "low") return RopeStrategy::Low;
  if (name == "uniform") return RopeStrategy::Uniform;
  if (name == "2norm") return RopeStrategy::TwoNorm;
  if (name == "adaptive") return RopeStrategy::Adaptive;
  throw Error("--rope-strategy: unknown strategy \"" + name + "\" (choose high, low, uniform, 2norm or adaptive)");
}

std::string rope_strategy_name(RopeStrategy s) {
  switch (s) {
    case RopeStrategy::High: return "high";
    case RopeStrategy::Low: return "low";
    case RopeStrategy::Uniform: return "uniform";
    case RopeStrategy::TwoNorm: return "2norm";
    case RopeStrategy::Adaptive: return "adaptive";
  }
  return "?";
}

std::vector<std::vector<double>> pair_scores(const LayerStats& stats, RopeStrategy strategy, int64_t g) {
  // Small [h|g, P] sums: scored on the CPU wherever calibration ran.
  LayerStats s;
  for (int m = 0; m < 2; ++m) {
    s.q_norm[m] = stats.q_norm[m].cpu();
    s.k_norm[m] = stats.k_norm[m].cpu();
    s.rope_err[m] = stats.rope_err[m].cpu();
    s.tokens[m] = stats.tokens[m];
  }
  const int64_t h = s.q_norm[0].size(0), P = s.q_norm[0].size(1), group = h / g;
  at::Tensor score;  // [g, P]
  if (strategy == RopeStrategy::TwoNorm) {
    const double n = double(std::max<int64_t>(1, s.tokens[0] + s.tokens[1]));
    at::Tensor q = (s.q_norm[0] + s.q_norm[1]) / n, k = (s.k_norm[0] + s.k_norm[1]) / n;  // means over tokens
    score = q.view({g, group, P}).sum(1) * k;
  } else if (strategy == RopeStrategy::Adaptive) {
    score = at::zeros({g, P}, at::kDouble);
    for (int m = 0; m < 2; ++m) {
      at::Tensor e = s.rope_err[m].view({g, group, P}).sum(1);  // [g, P]
      at::Tensor total = e.sum(1, /*keepdim=*/true);
      // A modality whose keys never appeared contributes nothing.
      score += at::where(total > 0, e / total.clamp_min(1e-300), at::zeros_like(e));
    }
  } else {
    throw Error("pair_scores: strategy has no scores");
  }
  score = score.contiguous();
  std::vector<std::vector<double>> out(static_cast<size_t>(g), std::vector<double>(static_cast<size_t>(P)));
  for (int64_t j = 0; j < g; ++j)
    for (int64_t k = 0; k < P; ++k) out[size_t(j)][size_t(k)] = score[j][k].item<double>();
  return out;
}

std::vector<std::vector<int64_t>> select_layer_pairs(RopeStrategy strategy, int64_t r, const TextConfig& text,
                                                    const LayerStats* stats) {
  const int64_t P = text.head_dim / 2, g = text.num_kv_heads;
  check(r >= 0 && r <= P, "--rope-pairs", r, " is outside 0..", P, " (head_dim ", text.head_dim, " has ", P,
        " rotary pairs)");
  std::vector<int64_t> fixed;  // the data-free strategies pick the same pairs everywhere
  if (strategy == RopeStrategy::High) {
    for (int64_t k = 0; k < r; ++k) fixed.push_back(k);
  } else if (strategy == RopeStrategy::Low) {
    for (int64_t k = P - r; k < P; ++k) fixed.push_back(k);
  } else if (strategy == RopeStrategy::Uniform) {
    // r pairs spread evenly from the highest frequency: k = floor(i * P / r).
    for (int64_t i = 0; i < r; ++i) fixed.push_back(i * P / r);
  }
  if (strategy == RopeStrategy::High || strategy == RopeStrategy::Low || strategy == RopeStrategy::Uniform)
    return std::vector<std::vector<int64_t>>(size_t(g), fixed);
  check(stats != nullptr, "rope selection", "strategy ", rope_strategy_name(strategy), " needs calibration statistics");
  auto scores = pair_scores(*stats, strategy, g);
  std::vector<std::vector<int64_t>> kept;
  for (int64_t j = 0; j < g; ++j) {
    std::vector<int64_t> order(static_cast<size_t>(P));
    std::iota(order.begin(), order.end(), 0);
    // Highest score first; ties to the higher frequency (lower k) for determinism.
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return scores[size_t(j)][size_t(a)] > scores[size_t(j)][size_t(b)]; });
    std::vector<int64_t> pick(order.begin(), order.begin() + r);
    std::sort(pick.begin(), pick.end());
    kept.push_back(pick);
  }
  return kept;
}

std::vector<std::vector<std::vector<int64_t>>> select_rope_pairs(RopeStrategy strategy, int64_t r,
                                                                 const TextConfig& text,
                                                                 const CalibrationStats* stats) {
  std::vector<std::vector<std::vector<int64_t>>> kept;
  for (int64_t l = 0; l < text.num_layers; ++l)
    kept.push_back(select_layer_pairs(strategy, r, text, stats ? &stats->layers.at(size_t(l)) : nullptr));
  return kept;
}

}  // namespace mlaforge
