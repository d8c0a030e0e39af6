// Batched generation: one prefill over the left-padded prompts, then one decoding step per token
// for the whole batch until every row has stopped.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/vlm.h"

namespace mlaforge {

struct SamplingOptions {
  int64_t max_new_tokens = 48;
  double temperature = 0.0;  // 0: greedy
  double top_p = 1.0;        // nucleus sampling threshold (with temperature > 0)
  uint64_t seed = 0;
};

struct Generation {
  std::vector<int64_t> tokens;  // generated ids, the stop token excluded
  std::string text;             // decoded, special tokens skipped
  bool stopped = false;         // ended by a stop token (not by max_new_tokens)
};

std::vector<Generation> generate(const Vlm& model, const std::vector<Prompt>& prompts, const SamplingOptions& opts);
// The same from a prepared batch.
std::vector<Generation> generate(const Vlm& model, const Batch& batch, const SamplingOptions& opts);

// Picks the next token of each row from logits [B, V]: argmax when temperature is 0, else
// softmax(logits / temperature) restricted to the smallest top-p set, sampled with `rng_state`.
std::vector<int64_t> sample_tokens(const at::Tensor& logits, const SamplingOptions& opts, uint64_t* rng_state);

}  // namespace mlaforge
