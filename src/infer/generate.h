// Batched generation: a prefill over left-padded prompts, then one decoding step per token for the
// rows still running. Rows that stop are dropped from the batch (the KV cache, positions and tokens
// are compacted) once enough of them have stopped to pay for copying the cache, and with continuous
// batching waiting prompts join the running rows in their place.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/vlm.h"

namespace mlaforge {

struct SamplingOptions {
  int64_t max_new_tokens = 48;
  double temperature = 0.0;  // 0: greedy
  double top_p = 1.0;        // nucleus sampling threshold (with temperature > 0)
  uint64_t seed = 0;
  // Drop stopped rows from the decoding batch (see worth_compacting). Results are the same either
  // way; false keeps every row to the end (for comparison).
  bool compact = true;
  CacheOptions cache;  // how the KV cache stores tokens (--kv-cache, --kv-rope)
};

struct Generation {
  std::vector<int64_t> tokens;  // generated ids, the stop token excluded
  std::string text;             // decoded, special tokens skipped
  bool stopped = false;         // ended by a stop token (not by max_new_tokens)
};

// Sampling (temperature > 0) is deterministic given the seed, and each row has its own random
// stream: row r of the batch (its index in `prompts` / `batch`) starts from rng_streams(seed, B)[r]
// and advances once per token sampled for that row. A row's tokens therefore depend only on the
// seed, its index r and its own logits: not on the other rows, the batch size or compaction.
std::vector<Generation> generate(const Vlm& model, const std::vector<Prompt>& prompts, const SamplingOptions& opts);
// The same from a prepared batch.
std::vector<Generation> generate(const Vlm& model, const Batch& batch, const SamplingOptions& opts);

// Continuous batching over n prompts: at most max_batch rows decode together; as rows stop, the next
// prompts are prepared (`prepare(begin, end)` makes the batch of prompts [begin, end)), prefilled on
// their own and join the running rows. Prompt i's stream is rng_streams(seed, n)[i], so results do
// not depend on max_batch. on_done(i, generation) is called as each prompt finishes.
using PrepareFn = std::function<Batch(int64_t begin, int64_t end)>;
struct SchedulerStats {
  int64_t prefills = 0;     // prefill calls (fresh batches and joining groups)
  int64_t joined_rows = 0;  // rows that joined a running batch
};
std::vector<Generation> generate_continuous(const Vlm& model, int64_t n, const PrepareFn& prepare,
                                            const SamplingOptions& opts, int64_t max_batch,
                                            const std::function<void(int64_t, const Generation&)>& on_done = {},
                                            SchedulerStats* stats = nullptr);

// The initial random states of rows 0..rows-1: the outputs 1..rows of SplitMix64 seeded with `seed`.
std::vector<uint64_t> rng_streams(uint64_t seed, int64_t rows);

// Picks the next token of each row from logits [B, V]: argmax when temperature is 0, else
// softmax(logits / temperature) restricted to the smallest top-p set, sampled with row b's state
// rng_states[b] (B states; each sampled row's state advances; unused when greedy).
std::vector<int64_t> sample_tokens(const at::Tensor& logits, const SamplingOptions& opts,
                                   std::vector<uint64_t>& rng_states);


// Whether dropping `finished` stopped rows from a decoding batch of `batch` rows pays for copying
// the cache: at least a quarter of the rows, or at least 4 of them.
bool worth_compacting(int64_t finished, int64_t batch);

}  // namespace mlaforge
