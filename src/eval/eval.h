// Exact-match evaluation of greedy answers on LLaVA-style question data.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "infer/generate.h"
#include "io/dataset.h"

namespace mlaforge {

struct EvalOptions {
  int64_t max_new_tokens = 48;
  int64_t batch_size = 16;
  CacheOptions cache;  // the evaluated model's KV cache (the KL reference keeps the default)
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
  // KL against a reference model (answer_kl), when measured: written to JSON only when set.
  std::optional<double> mean_kl;
  std::optional<int64_t> kl_positions;
  std::map<std::string, double> kl_by_kind;
  // {"accuracy", "n", "by_kind": {kind: accuracy}, "seconds", ..., and "mean_kl", "kl_positions",
  // "kl_by_kind" when mean_kl is set}
  std::string to_json() const;
};

// The answer as compared: special tokens skipped (by the decoder) and surrounding whitespace stripped.
std::string normalize_answer(const std::string& s);

EvalReport evaluate(const Vlm& model, const std::vector<Conversation>& rows, const EvalOptions& opts);

// Mean KL(reference || model) of the next-token distribution over answer tokens: each row's
// question + reference answer (+ the end-of-turn token the chat format puts after it) is teacher-forced
// through both models; at every position that predicts an answer token (and the end token) the KL of
// the two softmax distributions is computed in float64; the mean is over all such positions of all rows.
//
// A row's answer ids are tokenizer().encode(reference_answer(row), add_special_tokens=false) followed
// by config().eos_token_ids[0]: after the generation prompt, ChatML renders an assistant turn as
// "ANSWER<|im_end|>\n" and <|im_end|> is Qwen2-VL's eos (tests/eval_test.cpp checks this against the
// bundled model's template); LLaVA-1.5's template ends the assistant turn with nothing, so the eos that
// generation stops on stands in for the end of the turn there (not checked against a LLaVA template). The prompt is Vlm::prepare(question_prompt(row)); prompt + answer
// go through each model in one teacher-forced pass, the answer tokens at the positions generation
// would give them (M-RoPE included), batch_size rows at a time.
// Both models must give the same prompt and answer ids (the same tokenizer, chat format and image
// token counts) and the same vocabulary size and eos id; otherwise an Error names the first
// differing row. The KL is exactly 0 when both are the same checkpoint.
struct KlReport {
  double mean_kl = 0;
  int64_t positions = 0;                 // sum over rows of (answer tokens + 1)
  std::map<std::string, double> by_kind; // mean KL over the positions of each kind's rows
  double seconds = 0;
  std::vector<double> row_kl;            // per row: mean KL over its positions
  std::vector<int64_t> row_positions;    // per row: answer tokens + 1
};
KlReport answer_kl(const Vlm& model, const Vlm& reference, const std::vector<Conversation>& rows, int64_t batch_size,
                   const CacheOptions& cache = CacheOptions());

// The ids answer_kl teacher-forces after a row's prompt: the reference answer, then the end token.
std::vector<int64_t> answer_ids(const Vlm& model, const Conversation& row);

// Copies a KL report's mean, positions and by-kind means into an eval report (for to_json).
void attach_kl(EvalReport& report, const KlReport& kl);

}  // namespace mlaforge
