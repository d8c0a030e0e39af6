#include "infer/generate.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <numeric>
#include <optional>
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

bool worth_compacting(int64_t finished, int64_t batch) { return finished > 0 && (finished >= 4 || 4 * finished >= batch); }

std::vector<Generation> generate(const Vlm& model, const std::vector<Prompt>& prompts, const SamplingOptions& opts) {
  return generate(model, model.prepare(prompts), opts);
}

std::vector<Generation> generate(const Vlm& model, const Batch& batch, const SamplingOptions& opts) {
  const int64_t B = batch.batch();
  return generate_continuous(model, B, [&](int64_t begin, int64_t end) {
    check(begin == 0 && end == B, "generate", "one prepared batch is decoded whole");
    return batch;
  }, opts, std::max<int64_t>(B, 1));
}

std::vector<Generation> generate_continuous(const Vlm& model, int64_t n, const PrepareFn& prepare,
                                            const SamplingOptions& opts, int64_t max_batch,
                                            const std::function<void(int64_t, const Generation&)>& on_done,
                                            SchedulerStats* stats) {
  check(max_batch > 0, "generate", "the batch size must be positive");
  std::vector<Generation> gens(static_cast<size_t>(std::max<int64_t>(n, 0)));
  if (n <= 0 || opts.max_new_tokens <= 0) return gens;
  const auto& eos = model.config().eos_token_ids;
  const at::Device dev = model.device();
  const std::vector<uint64_t> streams = rng_streams(opts.seed, n);
  // The decoding batch: row i of the cache and of `logits` is prompt index[i].
  struct Row {
    int64_t index;     // into the n prompts
    uint64_t rng;      // its random state
    int64_t position;  // where its next fed token goes
    bool done = false;
  };
  std::vector<Row> rows;
  KVCache cache;
  at::Tensor logits;  // [rows, V]
  int64_t next_prompt = 0;
  auto finish = [&](Row& r, bool stopped) {
    r.done = true;
    Generation& g = gens[size_t(r.index)];
    g.stopped = stopped;
    std::vector<int32_t> ids(g.tokens.begin(), g.tokens.end());
    g.text = model.tokenizer().decode(ids, /*skip_special=*/true);
    if (on_done) on_done(r.index, g);
  };
  // The next prompts, prepared (tokenized, images preprocessed) but not yet prefilled.
  std::optional<Batch> pending;
  auto take = [&](int64_t count) -> Batch& {
    if (!pending) {
      pending = prepare(next_prompt, next_prompt + count);
      check(pending->batch() == count, "generate", "prepared ", pending->batch(), " rows for ", count, " prompts");
    }
    return *pending;
  };
  // Prefills the pending prompts into a cache of their own; their rows and the logits of their last tokens.
  auto prefill = [&](KVCache& c, std::vector<Row>& added) {
    Batch b = std::move(*pending);
    pending.reset();
    c = model.decoder().new_cache(b.batch(), b.length() + std::max<int64_t>(opts.max_new_tokens, 1), dev, opts.cache);
    at::Tensor h = model.prefill(b, c);
    for (int64_t i = 0; i < b.batch(); ++i)
      added.push_back(Row{next_prompt + i, streams[size_t(next_prompt + i)], b.next_position[size_t(i)]});
    next_prompt += b.batch();
    if (stats) ++stats->prefills;
    return model.decoder().logits(h.select(1, b.length() - 1));  // [count, V]
  };
  // Rows join when a quarter of the batch is free (or the rest of the prompts fit), and their
  // prompts fit before the running rows' current position.
  auto may_join = [&](int64_t free) {
    return next_prompt < n && free > 0 && (free >= std::max<int64_t>(1, max_batch / 4) || n - next_prompt <= free);
  };
  while (true) {
    if (rows.empty()) {
      if (next_prompt >= n) break;
      take(std::min(max_batch, n - next_prompt));
      logits = prefill(cache, rows);
    }
    // Sample every row's next token; stop rows at a stop token or at max_new_tokens.
    std::vector<uint64_t> rng;
    for (const Row& r : rows) rng.push_back(r.rng);
    std::vector<int64_t> next = sample_tokens(logits, opts, rng);
    int64_t finished = 0, running = 0;
    for (size_t i = 0; i < rows.size(); ++i) {
      Row& r = rows[i];
      r.rng = rng[i];
      if (r.done) {
        ++finished;
        continue;
      }
      Generation& g = gens[size_t(r.index)];
      if (std::find(eos.begin(), eos.end(), next[i]) != eos.end()) {
        finish(r, true);
        ++finished;
        continue;
      }
      g.tokens.push_back(next[i]);
      if (int64_t(g.tokens.size()) >= opts.max_new_tokens) {
        finish(r, false);
        ++finished;
        continue;
      }
      ++running;
    }
    if (running == 0) {  // the whole batch is done: start afresh with the next prompts
      rows.clear();
      cache = KVCache();
      continue;
    }
    at::Tensor tokens = at::tensor(next, at::kLong).to(dev);  // [rows]
    const bool joining = may_join(max_batch - running);
    if (opts.compact && finished > 0 && (joining || worth_compacting(finished, int64_t(rows.size())))) {
      // Keep the running rows. Each row's computation depends only on its own cache rows, so this
      // changes nothing in the results; it saves decoding stopped rows and makes room for new ones.
      std::vector<int64_t> keep;
      std::vector<Row> kept;
      for (size_t i = 0; i < rows.size(); ++i) {
        if (rows[i].done) continue;
        keep.push_back(int64_t(i));
        kept.push_back(rows[i]);
      }
      at::Tensor idx = at::tensor(keep, at::kLong).to(dev);
      select_cache_rows(cache, idx);
      tokens = tokens.index_select(0, idx);
      rows = std::move(kept);
    }
    // Stopped rows that were not dropped decode a harmless token; their outputs are ignored.
    std::vector<int64_t> pos;
    for (Row& r : rows) pos.push_back(r.position++);
    logits = model.decode_step(tokens, at::tensor(pos, at::kLong).to(dev), cache);
    if (opts.compact && may_join(max_batch - int64_t(rows.size()))) {
      // Continuous batching: waiting prompts are prefilled on their own and join the running rows,
      // ending where they are (their padding before that costs no latent blocks).
      const int64_t count = std::min(max_batch - int64_t(rows.size()), n - next_prompt);
      if (take(count).length() <= cache.len) {
        KVCache joining;
        std::vector<Row> added;
        at::Tensor lj = prefill(joining, added);
        append_cache_rows(cache, joining);
        logits = at::cat({logits, lj.to(logits.scalar_type())}, 0);
        rows.insert(rows.end(), added.begin(), added.end());
        if (stats) stats->joined_rows += int64_t(added.size());
      }
    }
  }
  return gens;
}

}  // namespace mlaforge
