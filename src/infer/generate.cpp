#include "infer/generate.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <random>

#include "core/error.h"

namespace mlaforge {

std::vector<int64_t> sample_tokens(const at::Tensor& logits, const SamplingOptions& opts, uint64_t* rng_state) {
  const int64_t B = logits.size(0);
  std::vector<int64_t> out(static_cast<size_t>(B));
  if (opts.temperature <= 0.0) {
    at::Tensor a = logits.argmax(-1).to(at::kCPU);
    for (int64_t b = 0; b < B; ++b) out[size_t(b)] = a[b].item<int64_t>();
    return out;
  }
  at::Tensor probs = at::softmax(logits.to(at::kFloat) / opts.temperature, -1).to(at::kCPU);
  for (int64_t b = 0; b < B; ++b) {
    auto sorted = probs[b].sort(/*dim=*/-1, /*descending=*/true);
    at::Tensor p = std::get<0>(sorted).contiguous(), idx = std::get<1>(sorted).contiguous();
    const float* pp = p.data_ptr<float>();
    const int64_t V = p.size(0);
    // Keep the smallest prefix whose mass reaches top_p (always at least one token).
    int64_t keep = V;
    double cum = 0;
    for (int64_t i = 0; i < V; ++i) {
      cum += pp[i];
      if (cum >= opts.top_p) {
        keep = i + 1;
        break;
      }
    }
    double mass = 0;
    for (int64_t i = 0; i < keep; ++i) mass += pp[i];
    std::mt19937_64 rng(*rng_state);
    *rng_state = rng();
    double u = std::uniform_real_distribution<double>(0.0, mass)(rng);
    int64_t pick = keep - 1;
    double acc = 0;
    for (int64_t i = 0; i < keep; ++i) {
      acc += pp[i];
      if (u < acc) {
        pick = i;
        break;
      }
    }
    out[size_t(b)] = idx[pick].item<int64_t>();
  }
  return out;
}

std::vector<Generation> generate(const Vlm& model, const std::vector<Prompt>& prompts, const SamplingOptions& opts) {
  return generate(model, model.prepare(prompts), opts);
}

std::vector<Generation> generate(const Vlm& model, const Batch& batch, const SamplingOptions& opts) {
  const int64_t B = batch.batch(), T = batch.length();
  const auto& eos = model.config().eos_token_ids;
  KVCache cache = model.decoder().new_cache(B, T + std::max<int64_t>(opts.max_new_tokens, 1), at::kCPU);
  at::Tensor h = model.prefill(batch, cache);
  at::Tensor logits = model.decoder().logits(h.select(1, T - 1));  // [B, V]
  std::vector<Generation> gens(static_cast<size_t>(B));
  std::vector<bool> done(static_cast<size_t>(B), false);
  uint64_t rng_state = opts.seed * 0x9E3779B97F4A7C15ull + 1;
  at::Tensor positions = at::tensor(batch.next_position, at::kLong);
  for (int64_t step = 0; step < opts.max_new_tokens; ++step) {
    std::vector<int64_t> next = sample_tokens(logits, opts, &rng_state);
    bool all_done = true;
    for (int64_t b = 0; b < B; ++b) {
      if (done[size_t(b)]) continue;
      int64_t t = next[size_t(b)];
      if (std::find(eos.begin(), eos.end(), t) != eos.end()) {
        done[size_t(b)] = true;
        gens[size_t(b)].stopped = true;
        continue;
      }
      gens[size_t(b)].tokens.push_back(t);
      all_done = false;
    }
    if (all_done || step + 1 == opts.max_new_tokens) break;
    // Finished rows keep decoding a harmless token; their outputs are ignored.
    logits = model.decode_step(at::tensor(next, at::kLong), positions + step, cache);
  }
  for (auto& g : gens) {
    std::vector<int32_t> ids(g.tokens.begin(), g.tokens.end());
    g.text = model.tokenizer().decode(ids, /*skip_special=*/true);
  }
  return gens;
}

}  // namespace mlaforge
