#include "infer/generate.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <numeric>
#include <random>

#include "core/error.h"

namespace mlaforge {

namespace {

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

std::vector<uint64_t> rng_streams(uint64_t seed, int64_t rows) {
  std::vector<uint64_t> s(static_cast<size_t>(std::max<int64_t>(rows, 0)));
  uint64_t x = seed;
  for (auto& v : s) v = splitmix64(x);
  return s;
}

std::vector<int64_t> sample_tokens(const at::Tensor& logits, const SamplingOptions& opts,
                                   std::vector<uint64_t>& rng_states) {
  const int64_t B = logits.size(0);
  std::vector<int64_t> out(static_cast<size_t>(B));
  if (opts.temperature <= 0.0) {
    at::Tensor a = logits.argmax(-1).to(at::kCPU).contiguous();
    std::copy(a.data_ptr<int64_t>(), a.data_ptr<int64_t>() + B, out.begin());
    return out;
  }
  check(int64_t(rng_states.size()) == B, "sampling", "got ", rng_states.size(), " random states for ", B, " rows");
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
    std::mt19937_64 rng(rng_states[size_t(b)]);
    rng_states[size_t(b)] = rng();
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

// Every per-row tensor of KVCache is selected here. A new per-row cache tensor (e.g. a latent
// cache) MUST be added to this function, or compacted batches will pair rows with the wrong cache.
void select_cache_rows(KVCache& cache, const at::Tensor& rows) {
  for (auto* list : {&cache.k, &cache.v})
    for (auto& t : *list) t = t.index_select(0, rows);  // [B, ...] -> [n, ...]
  if (cache.is_latent()) {
    // Kept rows keep their blocks; the others' go back to the pool.
    at::Tensor r = rows.to(at::kCPU).contiguous();
    std::vector<bool> kept(cache.blocks.size(), false);
    std::vector<std::vector<int32_t>> blocks;
    for (int64_t i = 0; i < r.numel(); ++i) {
      const int64_t row = r.data_ptr<int64_t>()[i];
      check(!kept[size_t(row)], "kv cache", "row ", row, " selected twice");
      kept[size_t(row)] = true;
      blocks.push_back(cache.blocks[size_t(row)]);
    }
    for (size_t row = 0; row < kept.size(); ++row)
      if (!kept[row]) cache.pool->release(cache.blocks[row]);
    cache.blocks = std::move(blocks);
    cache.block_table = cache.block_table.index_select(0, rows.to(cache.block_table.device()));
  }
  cache.key_valid = cache.key_valid.index_select(0, rows);  // [B, capacity] -> [n, capacity]
}

bool worth_compacting(int64_t finished, int64_t batch) { return finished > 0 && (finished >= 4 || 4 * finished >= batch); }

std::vector<Generation> generate(const Vlm& model, const std::vector<Prompt>& prompts, const SamplingOptions& opts) {
  return generate(model, model.prepare(prompts), opts);
}

std::vector<Generation> generate(const Vlm& model, const Batch& batch, const SamplingOptions& opts) {
  const int64_t B = batch.batch(), T = batch.length();
  std::vector<Generation> gens(static_cast<size_t>(B));
  if (B == 0) return gens;
  const auto& eos = model.config().eos_token_ids;
  KVCache cache = model.decoder().new_cache(B, T + std::max<int64_t>(opts.max_new_tokens, 1), model.device(), opts.cache);
  at::Tensor h = model.prefill(batch, cache);
  // The decoding batch holds rows[i] (an index into `batch`) at row i; logits, positions, the
  // random states and every cache tensor follow that order.
  std::vector<int64_t> rows(static_cast<size_t>(B));
  std::iota(rows.begin(), rows.end(), 0);
  at::Tensor logits = model.decoder().logits(h.select(1, T - 1));  // [n, V]
  const at::Device dev = model.device();
  at::Tensor positions = at::tensor(batch.next_position, at::kLong).to(dev);  // [n]: first generated token's
  std::vector<uint64_t> rng = rng_streams(opts.seed, B);
  std::vector<bool> done(static_cast<size_t>(B), false);  // by row of `batch`
  int64_t finished = 0;  // rows of the decoding batch that stopped since it was last compacted
  for (int64_t step = 0; step < opts.max_new_tokens; ++step) {
    std::vector<int64_t> next = sample_tokens(logits, opts, rng);
    bool all_done = true;
    for (size_t i = 0; i < rows.size(); ++i) {
      const size_t b = size_t(rows[i]);
      if (done[b]) continue;
      int64_t t = next[i];
      if (std::find(eos.begin(), eos.end(), t) != eos.end()) {
        done[b] = true;
        gens[b].stopped = true;
        ++finished;
        continue;
      }
      gens[b].tokens.push_back(t);
      all_done = false;
    }
    if (all_done || step + 1 == opts.max_new_tokens) break;
    at::Tensor tokens = at::tensor(next, at::kLong).to(dev);  // [n]
    if (opts.compact && worth_compacting(finished, int64_t(rows.size()))) {
      // Keep the running rows. Each row's computation depends only on its own cache rows, so
      // this changes nothing in the results; it saves the decoding of stopped rows.
      std::vector<int64_t> keep;
      std::vector<int64_t> kept_rows;
      std::vector<uint64_t> kept_rng;
      for (size_t i = 0; i < rows.size(); ++i) {
        if (done[size_t(rows[i])]) continue;
        keep.push_back(int64_t(i));
        kept_rows.push_back(rows[i]);
        kept_rng.push_back(rng[i]);
      }
      at::Tensor idx = at::tensor(keep, at::kLong).to(dev);
      select_cache_rows(cache, idx);
      positions = positions.index_select(0, idx);
      tokens = tokens.index_select(0, idx);
      // logits need no selection: the next decoding step replaces them.
      rows = std::move(kept_rows);
      rng = std::move(kept_rng);
      finished = 0;
    }
    // Without compaction, stopped rows keep decoding a harmless token; their outputs are ignored.
    logits = model.decode_step(tokens, positions + step, cache);
  }
  for (auto& g : gens) {
    std::vector<int32_t> ids(g.tokens.begin(), g.tokens.end());
    g.text = model.tokenizer().decode(ids, /*skip_special=*/true);
  }
  return gens;
}

}  // namespace mlaforge
