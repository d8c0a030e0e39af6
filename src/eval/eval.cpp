#include "eval/eval.h"

#include <ATen/ATen.h>

#include <nlohmann/json.hpp>
#include <numeric>

#include "core/error.h"
#include "core/progress.h"

namespace mlaforge {

std::string normalize_answer(const std::string& s) {
  const char* ws = " \t\r\n\v\f";
  size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(ws);
  return s.substr(b, e - b + 1);
}

std::string EvalReport::to_json() const {
  nlohmann::json j;
  j["accuracy"] = accuracy;
  j["n"] = n;
  j["seconds"] = seconds;
  nlohmann::json kinds = nlohmann::json::object();
  for (auto& [k, s] : by_kind) kinds[k] = s.total ? double(s.correct) / double(s.total) : 0.0;
  j["by_kind"] = kinds;
  nlohmann::json counts = nlohmann::json::object();
  for (auto& [k, s] : by_kind) counts[k] = {{"correct", s.correct}, {"total", s.total}};
  j["by_kind_counts"] = counts;
  nlohmann::json rows = nlohmann::json::array();
  for (size_t i = 0; i < ids.size(); ++i)
    rows.push_back({{"id", ids[i]}, {"answer", answers[i]}, {"reference", references[i]}});
  j["answers"] = rows;
  if (mean_kl) {
    j["mean_kl"] = *mean_kl;
    if (kl_positions) j["kl_positions"] = *kl_positions;
    nlohmann::json kl_kinds = nlohmann::json::object();
    for (auto& [k, v] : kl_by_kind) kl_kinds[k] = v;
    j["kl_by_kind"] = kl_kinds;
  }
  return j.dump(1);
}

void attach_kl(EvalReport& report, const KlReport& kl) {
  report.mean_kl = kl.mean_kl;
  report.kl_positions = kl.positions;
  report.kl_by_kind = kl.by_kind;
}

namespace {

// The question prompts of rows [start, end) as one batch; an Error names the row that fails.
Batch prepare_rows(const Vlm& model, const std::vector<Conversation>& rows, size_t start, size_t end) {
  std::vector<Prompt> prompts;
  for (size_t i = start; i < end; ++i) prompts.push_back(question_prompt(rows[i]));
  try {
    return model.prepare(prompts);
  } catch (const Error& e) {
    // Name the record: re-prepare one by one to find which row failed.
    for (size_t i = start; i < end; ++i) {
      try {
        model.prepare({prompts[i - start]});
      } catch (const Error& e2) {
        throw Error(rows[i].where + ": " + e2.what());
      }
    }
    throw;
  }
}

// Row r's prompt ids without padding.
std::vector<int64_t> row_ids(const Batch& b, int64_t r) {
  at::Tensor ids = b.ids[r].masked_select(b.valid[r]).cpu().contiguous();
  return std::vector<int64_t>(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
}

// KL(p_ref || p_model) of each row of logits [n, V], in float64: [n].
at::Tensor kl_rows(const at::Tensor& model_logits, const at::Tensor& ref_logits) {
  at::Tensor lm = at::log_softmax(model_logits.to(at::kDouble), -1);
  at::Tensor lr = at::log_softmax(ref_logits.to(at::kDouble), -1);
  return (lr.exp() * (lr - lm)).sum(-1).cpu().contiguous();
}

}  // namespace

std::vector<int64_t> answer_ids(const Vlm& model, const Conversation& row) {
  const auto& eos = model.config().eos_token_ids;
  check(!eos.empty(), model.dir(), "no eos_token_id in the config: the end of an answer is unknown");
  std::vector<int32_t> a = model.tokenizer().encode(reference_answer(row), /*add_special_tokens=*/false);
  std::vector<int64_t> ids(a.begin(), a.end());
  ids.push_back(eos[0]);
  return ids;
}

KlReport answer_kl(const Vlm& model, const Vlm& reference, const std::vector<Conversation>& rows, int64_t batch_size,
                   const CacheOptions& cache) {
  check(batch_size > 0, "answer_kl", "batch size must be positive (got ", batch_size, ")");
  const int64_t V = model.config().text.vocab_size;
  check(reference.config().text.vocab_size == V, reference.dir(), "vocabulary size ", reference.config().text.vocab_size,
        " differs from the model's (", V, " in ", model.dir(), "): the KL needs the same vocabulary");
  KlReport rep;
  std::vector<double> row_sum(rows.size(), 0.0);  // KL summed over each row's positions, in order
  rep.row_kl.resize(rows.size());
  rep.row_positions.resize(rows.size());
  Progress bar("kl", int64_t(rows.size()));
  for (size_t start = 0; start < rows.size(); start += size_t(batch_size)) {
    const size_t end = std::min(rows.size(), start + size_t(batch_size));
    const int64_t n = int64_t(end - start);
    Batch mb = prepare_rows(model, rows, start, end), rb = prepare_rows(reference, rows, start, end);
    // Both models must see the same tokens at the same positions.
    std::vector<std::vector<int64_t>> answers;
    for (int64_t r = 0; r < n; ++r) {
      const Conversation& row = rows[start + size_t(r)];
      const std::string why = str(": the model (", model.dir(), ") and the reference (", reference.dir(), ") give ");
      if (row_ids(mb, r) != row_ids(rb, r) || mb.next_position[size_t(r)] != rb.next_position[size_t(r)])
        throw Error(row.where + why + "different prompt ids or positions (different tokenizer, chat template or "
                                      "image preprocessing); answer_kl needs the same tokens");
      answers.push_back(answer_ids(model, row));
      if (answers.back() != answer_ids(reference, row))
        throw Error(row.where + why + "different answer ids (different tokenizer or eos token); answer_kl needs the "
                                      "same tokens");
    }
    check(mb.pos.equal(rb.pos), rows[start].where, "the model and the reference give different M-RoPE positions");
    // Teacher forcing in one pass: prompt + answer (without its last token) through both models; the
    // logits at the prompt's last token and at each fed answer token predict the next answer token.
    // Positions continue the prompt's as generation would (make_batch numbers text after the prompt
    // from its next_position on).
    std::vector<std::vector<int64_t>> forced;
    std::vector<int64_t> prompt_len;
    for (int64_t r = 0; r < n; ++r) {
      std::vector<int64_t> ids = row_ids(mb, r);
      prompt_len.push_back(int64_t(ids.size()));
      const auto& a = answers[size_t(r)];
      ids.insert(ids.end(), a.begin(), a.end() - 1);
      forced.push_back(std::move(ids));
    }
    Batch fb = model.make_batch(forced, mb.pixel_values, mb.grids);
    fb.image_keys = mb.image_keys;
    const int64_t T = fb.length();
    KVCache mc = model.decoder().new_cache(n, T, model.device(), cache), rc = reference.decoder().new_cache(n, T, reference.device());
    at::Tensor mh = model.prefill(fb, mc), rh = reference.prefill(fb, rc);  // [n, T, d]
    std::vector<int64_t> where;  // flat (row, position) of every predicting position, rows in order
    for (int64_t r = 0; r < n; ++r) {
      const int64_t first = T - int64_t(forced[size_t(r)].size()) + prompt_len[size_t(r)] - 1;
      for (size_t j = 0; j < answers[size_t(r)].size(); ++j) where.push_back(r * T + first + int64_t(j));
    }
    at::Tensor idx = at::tensor(where, at::kLong).to(model.device());
    at::Tensor kl = kl_rows(model.decoder().logits(mh.reshape({n * T, -1}).index_select(0, idx)),
                            reference.decoder().logits(rh.reshape({n * T, -1}).index_select(0, idx)));
    const double* kp = kl.data_ptr<double>();
    std::vector<double> sum(static_cast<size_t>(n), 0.0);
    size_t at_pos = 0;
    for (int64_t r = 0; r < n; ++r)
      for (size_t j = 0; j < answers[size_t(r)].size(); ++j) sum[size_t(r)] += kp[at_pos++];
    for (int64_t r = 0; r < n; ++r) {
      const size_t g = start + size_t(r);
      const int64_t np = int64_t(answers[size_t(r)].size());
      row_sum[g] = sum[size_t(r)];
      rep.row_kl[g] = sum[size_t(r)] / double(np);
      rep.row_positions[g] = np;
    }
    bar.advance(n);
  }
  bar.finish();
  // Sums in row order (each row's positions in order), so a row's contribution does not depend on
  // how the rows were batched.
  double total = 0;
  std::map<std::string, std::pair<double, int64_t>> kinds;
  for (size_t g = 0; g < rows.size(); ++g) {
    const double s = row_sum[g];
    total += s;
    rep.positions += rep.row_positions[g];
    auto& k = kinds[rows[g].kind];
    k.first += s;
    k.second += rep.row_positions[g];
  }
  rep.mean_kl = rep.positions ? total / double(rep.positions) : 0.0;
  for (auto& [k, v] : kinds) rep.by_kind[k] = v.second ? v.first / double(v.second) : 0.0;
  rep.seconds = bar.seconds();
  return rep;
}

EvalReport evaluate(const Vlm& model, const std::vector<Conversation>& rows, const EvalOptions& opts) {
  EvalReport rep;
  Progress bar("eval", int64_t(rows.size()));
  SamplingOptions so;
  so.max_new_tokens = opts.max_new_tokens;
  so.cache = opts.cache;
  // Continuous batching: batch_size rows decode together and finished rows are replaced at once.
  int64_t correct = 0, done = 0;
  std::vector<bool> ok(rows.size(), false);
  std::vector<Generation> gens = generate_continuous(
      model, int64_t(rows.size()), [&](int64_t b, int64_t e) { return prepare_rows(model, rows, size_t(b), size_t(e)); },
      so, opts.batch_size, [&](int64_t i, const Generation& g) {
        ok[size_t(i)] = normalize_answer(g.text) == normalize_answer(reference_answer(rows[size_t(i)]));
        correct += ok[size_t(i)];
        ++done;
        bar.advance(1, str("acc ", double(correct) / double(done)));
      });
  for (size_t i = 0; i < rows.size(); ++i) {
    auto& k = rep.by_kind[rows[i].kind];
    k.correct += ok[i];
    k.total += 1;
    rep.ids.push_back(rows[i].id);
    rep.answers.push_back(normalize_answer(gens[i].text));
    rep.references.push_back(normalize_answer(reference_answer(rows[i])));
  }
  rep.n = int64_t(rows.size());
  bar.finish();
  rep.accuracy = rep.n ? double(correct) / double(rep.n) : 0.0;
  rep.seconds = bar.seconds();
  return rep;
}

}  // namespace mlaforge
