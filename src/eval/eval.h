// Exact-match evaluation of greedy answers on LLaVA-style question data.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "infer/generate.h"
#include "io/dataset.h"

namespace mlaforge {

struct EvalOptions {
  int64_t max_new_tokens = 48;
  int64_t batch_size = 16;
};

struct KindScore {
  int64_t correct = 0, total = 0;
};

struct EvalReport {
  double accuracy = 0;
  int64_t n = 0;
  std::map<std::string, KindScore> by_kind;
  double seconds = 0;
  std::vector<std::string> ids, answers, references;
  std::string to_json() const;  // {"accuracy", "n", "by_kind": {kind: accuracy}, "seconds", ...}
};

// The answer as compared: special tokens skipped (by the decoder) and surrounding whitespace stripped.
std::string normalize_answer(const std::string& s);

EvalReport evaluate(const Vlm& model, const std::vector<Conversation>& rows, const EvalOptions& opts);

}  // namespace mlaforge
