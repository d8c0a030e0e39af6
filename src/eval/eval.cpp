#include "eval/eval.h"

#include <nlohmann/json.hpp>

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
  return j.dump(1);
}

EvalReport evaluate(const Vlm& model, const std::vector<Conversation>& rows, const EvalOptions& opts) {
  EvalReport rep;
  Progress bar("eval", int64_t(rows.size()));
  SamplingOptions so;
  so.max_new_tokens = opts.max_new_tokens;
  int64_t correct = 0;
  for (size_t start = 0; start < rows.size(); start += size_t(opts.batch_size)) {
    size_t end = std::min(rows.size(), start + size_t(opts.batch_size));
    std::vector<Prompt> prompts;
    for (size_t i = start; i < end; ++i) prompts.push_back(question_prompt(rows[i]));
    Batch batch;
    try {
      batch = model.prepare(prompts);
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
    std::vector<Generation> gens = generate(model, batch, so);
    for (size_t i = start; i < end; ++i) {
      std::string answer = normalize_answer(gens[i - start].text);
      std::string ref = normalize_answer(reference_answer(rows[i]));
      bool ok = answer == ref;
      correct += ok;
      auto& k = rep.by_kind[rows[i].kind];
      k.correct += ok;
      k.total += 1;
      rep.ids.push_back(rows[i].id);
      rep.answers.push_back(answer);
      rep.references.push_back(ref);
    }
    rep.n = int64_t(end);
    bar.advance(int64_t(end - start), str("acc ", double(correct) / double(end)));
  }
  bar.finish();
  rep.accuracy = rep.n ? double(correct) / double(rep.n) : 0.0;
  rep.seconds = bar.seconds();
  return rep;
}

}  // namespace mlaforge
