// Generation with stopped rows dropped from the batch (compaction), and the answer KL between two models.
#include <gtest/gtest.h>

#include <tuple>

#include <cmath>
#include <memory>
#include <set>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "convert/convert.h"
#include "eval/eval.h"
#include "infer/generate.h"
#include "io/dataset.h"
#include "model/vlm.h"
#include "text/chat.h"
#include "text/tokenizer.h"
#include "test_util.h"

using namespace mlaforge;
using namespace mlaforge::test;

namespace {

const std::string kShapes = source_path("models/qwen2vl-shapes");

const Vlm& shapes_model() {
  static std::unique_ptr<Vlm> m = Vlm::load(kShapes);
  return *m;
}

// The first `first` rows of the mini eval set (image questions of every kind, captions among them)
// followed by every text-only row after them.
std::vector<Conversation> mixed_rows(size_t first) {
  auto all = load_conversations(source_path("data/shapes-mini/eval.jsonl"));
  std::vector<Conversation> out(all.begin(), all.begin() + long(std::min(first, all.size())));
  for (size_t i = first; i < all.size(); ++i)
    if (all[i].image_paths.empty()) out.push_back(all[i]);
  return out;
}

std::vector<Prompt> prompts_of(const std::vector<Conversation>& rows) {
  std::vector<Prompt> p;
  for (auto& r : rows) p.push_back(question_prompt(r));
  return p;
}

size_t count_kind(const std::vector<Conversation>& rows, const std::string& prefix) {
  size_t n = 0;
  for (auto& r : rows) n += r.kind.rfind(prefix, 0) == 0;
  return n;
}

TEST(Generate, WorthCompacting) {
  EXPECT_FALSE(worth_compacting(0, 16));
  EXPECT_FALSE(worth_compacting(3, 16));
  EXPECT_TRUE(worth_compacting(4, 16));
  EXPECT_TRUE(worth_compacting(4, 100));
  EXPECT_TRUE(worth_compacting(1, 4));
  EXPECT_FALSE(worth_compacting(1, 5));
  EXPECT_TRUE(worth_compacting(2, 5));
  EXPECT_TRUE(worth_compacting(1, 1));
}

TEST(Generate, SelectCacheRowsKeepsEveryPerRowTensor) {
  const Vlm& m = shapes_model();
  KVCache c = m.decoder().new_cache(4, 7, at::kCPU);
  for (auto& t : c.k) t.normal_();
  for (auto& t : c.v) t.normal_();
  c.key_valid = at::rand({4, 7}) > 0.5;
  c.len = 5;
  KVCache orig = c;
  for (size_t l = 0; l < c.k.size(); ++l) orig.k[l] = c.k[l].clone(), orig.v[l] = c.v[l].clone();
  orig.key_valid = c.key_valid.clone();
  at::Tensor rows = at::tensor(std::vector<int64_t>{3, 1}, at::kLong);
  select_cache_rows(c, rows);
  EXPECT_EQ(c.len, 5);
  EXPECT_EQ(c.capacity, 7);
  ASSERT_EQ(c.k.size(), orig.k.size());
  for (size_t l = 0; l < c.k.size(); ++l) {
    ASSERT_EQ(c.k[l].size(0), 2);
    EXPECT_TRUE(c.k[l][0].equal(orig.k[l][3]) && c.k[l][1].equal(orig.k[l][1])) << "layer " << l;
    EXPECT_TRUE(c.v[l][0].equal(orig.v[l][3]) && c.v[l][1].equal(orig.v[l][1])) << "layer " << l;
  }
  EXPECT_TRUE(c.key_valid[0].equal(orig.key_valid[3]) && c.key_valid[1].equal(orig.key_valid[1]));
}

// Greedy answers of a batch mixing 1-token answers, captions and text-only questions: compacting
// the batch as rows stop gives, token for token, what the uncompacted batch and each prompt alone give.
TEST(Generate, CompactionMatchesUncompactedAndAlone) {
  const Vlm& m = shapes_model();
  auto rows = mixed_rows(16);
  ASSERT_GE(count_kind(rows, "caption"), 2u);
  ASSERT_GE(count_kind(rows, "text_"), 4u);
  auto prompts = prompts_of(rows);
  SamplingOptions so;
  so.max_new_tokens = 48;
  std::vector<Generation> compact = generate(m, prompts, so);
  so.compact = false;
  std::vector<Generation> full = generate(m, prompts, so);
  ASSERT_EQ(compact.size(), rows.size());
  size_t shortest = 1000, longest = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    SamplingOptions one;
    one.max_new_tokens = 48;
    Generation alone = generate(m, {prompts[i]}, one).at(0);
    EXPECT_EQ(compact[i].tokens, full[i].tokens) << rows[i].id;
    EXPECT_EQ(compact[i].tokens, alone.tokens) << rows[i].id;
    EXPECT_EQ(compact[i].stopped, full[i].stopped) << rows[i].id;
    EXPECT_EQ(compact[i].stopped, alone.stopped) << rows[i].id;
    EXPECT_EQ(compact[i].text, full[i].text) << rows[i].id;
    shortest = std::min(shortest, compact[i].tokens.size());
    longest = std::max(longest, compact[i].tokens.size());
  }
  // Rows stop at very different steps, so the batch was compacted several times.
  EXPECT_LE(shortest, 3u);
  EXPECT_GE(longest, 20u);
}

// Continuous batching: 3 rows at a time over 12 prompts, finished rows replaced by prefilled
// newcomers, gives token for token what each prompt gives alone (greedy), and what one batch of all
// gives when sampling (streams follow the prompt index); for the original (key/value cache) and a
// converted model (paged latent cache, also int8, and int8 with --kv-window 8).
TEST(Generate, ContinuousBatchingMatchesAlone) {
  TempDir d("continuous");
  auto mla = Vlm::load(convert_quick(source_path("models/qwen2vl-shapes"), d / "mla", 8, 16));
  auto rows = mixed_rows(12);
  auto prompts = prompts_of(rows);
  // The last: int8 with a window of 8 unquantized recent positions (rows join with shifted positions).
  for (auto [model, format, window] : {std::tuple<const Vlm*, std::string, int64_t>{&shapes_model(), "auto", 0},
                                       {mla.get(), "auto", 0}, {mla.get(), "int8", 0}, {mla.get(), "int8", 8}}) {
    SamplingOptions so;
    so.max_new_tokens = 24;
    so.cache.latent = format;
    so.cache.window = window;
    SchedulerStats stats;
    int64_t callbacks = 0;
    auto prepare = [&](int64_t b, int64_t e) {
      return model->prepare(std::vector<Prompt>(prompts.begin() + b, prompts.begin() + e));
    };
    auto gens = generate_continuous(*model, int64_t(prompts.size()), prepare, so, 3,
                                    [&](int64_t, const Generation&) { ++callbacks; }, &stats);
    EXPECT_EQ(callbacks, int64_t(prompts.size()));
    EXPECT_GT(stats.joined_rows, 0) << "no row joined a running batch";
    for (size_t i = 0; i < prompts.size(); ++i) {
      Generation alone = generate(*model, {prompts[i]}, so).at(0);
      EXPECT_EQ(gens[i].tokens, alone.tokens) << rows[i].id << " " << format;
      EXPECT_EQ(gens[i].stopped, alone.stopped) << rows[i].id << " " << format;
    }
    so.temperature = 1.2;
    so.seed = 7;
    auto sampled = generate_continuous(*model, int64_t(prompts.size()), prepare, so, 3);
    auto together = generate(*model, prompts, so);
    for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(sampled[i].tokens, together[i].tokens) << rows[i].id;
    std::printf("%s cache %s, window %lld: %lld prefills, %lld rows joined a running batch\n",
                model == mla.get() ? "MLA" : "original", format.c_str(), (long long)window, (long long)stats.prefills,
                (long long)stats.joined_rows);
  }
}

// Sampling: each row has its own random stream (seed, row index), so compaction, which changes the
// batch under a row, does not change what it samples; the same seed gives the same answers.
TEST(Generate, SamplingStreamsArePerRow) {
  const Vlm& m = shapes_model();
  auto rows = mixed_rows(8);
  auto prompts = prompts_of(rows);
  SamplingOptions so;
  so.max_new_tokens = 32;
  so.temperature = 1.5;
  so.top_p = 0.95;
  so.seed = 1234;
  Batch b = m.prepare(prompts);
  auto a = generate(m, b, so);
  auto again = generate(m, b, so);
  so.compact = false;
  auto full = generate(m, b, so);
  so.seed = 99;
  so.compact = true;
  auto other = generate(m, b, so);
  bool differs = false;
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(a[i].tokens, again[i].tokens) << rows[i].id;
    EXPECT_EQ(a[i].tokens, full[i].tokens) << rows[i].id;
    differs |= a[i].tokens != other[i].tokens;
  }
  EXPECT_TRUE(differs) << "another seed should change some answer at temperature 1.5";
  // Row r's stream does not depend on the batch size.
  auto s5 = rng_streams(7, 5), s3 = rng_streams(7, 3);
  EXPECT_TRUE(std::equal(s3.begin(), s3.end(), s5.begin()));
  EXPECT_NE(s5[0], s5[1]);
}

std::set<std::string> kinds_of(const std::vector<Conversation>& rows) {
  std::set<std::string> s;
  for (auto& r : rows) s.insert(r.kind);
  return s;
}

int64_t expected_positions(const Vlm& m, const std::vector<Conversation>& rows) {
  int64_t n = 0;
  for (auto& r : rows) n += int64_t(m.tokenizer().encode(reference_answer(r), false).size()) + 1;
  return n;
}

// The ids answer_kl teacher-forces are what the bundled model's chat template renders for the
// assistant turn: prompt (with generation prompt) + answer + <|im_end|> (its eos), then "\n".
TEST(AnswerKl, AnswerIdsFollowTheChatTemplate) {
  const Vlm& m = shapes_model();
  ASSERT_FALSE(m.config().eos_token_ids.empty());
  EXPECT_EQ(m.tokenizer().decode({int32_t(m.config().eos_token_ids[0])}, false), "<|im_end|>");
  ChatFormat chat = ChatFormat::from_model_dir(kShapes);
  auto rows = load_conversations(source_path("data/shapes-mini/eval.jsonl"));
  ASSERT_EQ(rows.size(), 100u);
  for (auto& r : rows) {
    std::vector<ChatTurn> turns;
    for (auto& t : r.turns) {
      turns.push_back(t);
      if (t.role == "assistant") break;
    }
    std::vector<int32_t> full = m.tokenizer().encode(chat.render(turns, /*add_generation_prompt=*/false), true);
    std::vector<int32_t> want = m.tokenizer().encode(chat.render(question_prompt(r).turns, true), true);
    for (int64_t id : answer_ids(m, r)) want.push_back(int32_t(id));
    for (int32_t id : m.tokenizer().encode("\n", false)) want.push_back(id);
    EXPECT_EQ(full, want) << r.id;
  }
}

TEST(AnswerKl, ZeroForTheSameCheckpoint) {
  const Vlm& m = shapes_model();
  auto again = Vlm::load(kShapes);
  auto rows = mixed_rows(10);
  KlReport same = answer_kl(m, m, rows, 4);
  KlReport copy = answer_kl(m, *again, rows, 4);
  for (const KlReport* k : {&same, &copy}) {
    EXPECT_EQ(k->mean_kl, 0.0);
    EXPECT_EQ(k->positions, expected_positions(m, rows));
    ASSERT_EQ(k->row_kl.size(), rows.size());
    for (size_t i = 0; i < rows.size(); ++i) EXPECT_EQ(k->row_kl[i], 0.0) << rows[i].id;
    for (auto& [kind, v] : k->by_kind) EXPECT_EQ(v, 0.0) << kind;
    EXPECT_EQ(k->by_kind.size(), kinds_of(rows).size());
  }
}

TEST(AnswerKl, PositiveForDifferentWeights) {
  auto a = Vlm::load(fixture("qwen2vl/tiny-a")), b = Vlm::load(fixture("qwen2vl/tiny-b"));
  auto rows = mixed_rows(8);
  KlReport k = answer_kl(*a, *b, rows, 16);
  std::printf("tiny-a vs tiny-b: mean KL %.6f over %lld positions\n", k.mean_kl, (long long)k.positions);
  EXPECT_TRUE(std::isfinite(k.mean_kl));
  EXPECT_GT(k.mean_kl, 0.0);
  EXPECT_EQ(k.positions, expected_positions(*a, rows));
  int64_t sum = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_GT(k.row_kl[i], 0.0) << rows[i].id;
    EXPECT_TRUE(std::isfinite(k.row_kl[i])) << rows[i].id;
    sum += k.row_positions[i];
  }
  EXPECT_EQ(sum, k.positions);
  EXPECT_EQ(k.by_kind.size(), kinds_of(rows).size());
}

// A row's KL does not depend on the rows batched with it (beyond float32 rounding of the logits,
// which left padding changes in the last bits).
TEST(AnswerKl, BatchedRowEqualsAlone) {
  auto a = Vlm::load(fixture("qwen2vl/tiny-a")), b = Vlm::load(fixture("qwen2vl/tiny-b"));
  auto rows = mixed_rows(6);
  KlReport all = answer_kl(*a, *b, rows, 16), threes = answer_kl(*a, *b, rows, 3);
  double weighted = 0, worst = 0;
  int64_t positions = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    KlReport one = answer_kl(*a, *b, {rows[i]}, 1);
    ASSERT_EQ(one.positions, all.row_positions[i]);
    const double err = std::abs(all.row_kl[i] - one.mean_kl) / one.mean_kl;
    worst = std::max(worst, err);
    EXPECT_LE(err, 1e-6) << rows[i].id << " batched " << all.row_kl[i] << " alone " << one.mean_kl;
    EXPECT_LE(std::abs(threes.row_kl[i] - one.mean_kl) / one.mean_kl, 1e-6) << rows[i].id;
    weighted += one.mean_kl * double(one.positions);
    positions += one.positions;
  }
  std::printf("row KL batched vs alone: worst relative difference %.2e\n", worst);
  EXPECT_EQ(positions, all.positions);
  EXPECT_NEAR(all.mean_kl, weighted / double(positions), 1e-6 * all.mean_kl);
  EXPECT_NEAR(threes.mean_kl, all.mean_kl, 1e-6 * all.mean_kl);
}

// The models must see the same tokens: the bundled model resizes images to more tokens than the
// tiny fixtures, so image rows are refused with the row named; text-only rows are comparable.
TEST(AnswerKl, DifferentTokensAreAnError) {
  const Vlm& m = shapes_model();
  auto tiny = Vlm::load(fixture("qwen2vl/tiny-a"));
  auto rows = load_conversations(source_path("data/shapes-mini/eval.jsonl"), 2);
  ASSERT_FALSE(rows[0].image_paths.empty());
  try {
    answer_kl(m, *tiny, rows, 2);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    std::string what = e.what();
    EXPECT_NE(what.find(rows[0].where), std::string::npos) << what;
    EXPECT_NE(what.find("same tokens"), std::string::npos) << what;
  }
  std::vector<Conversation> text;
  for (auto& r : mixed_rows(0)) text.push_back(r);
  ASSERT_FALSE(text.empty());
  KlReport k = answer_kl(m, *tiny, text, 8);
  EXPECT_GT(k.mean_kl, 0.0);
  EXPECT_TRUE(std::isfinite(k.mean_kl));
  EXPECT_THROW(answer_kl(m, m, text, 0), Error);
}

TEST(AnswerKl, EvalReportJsonHasKlOnlyWhenSet) {
  EvalReport rep;
  rep.n = 1;
  rep.by_kind["color"] = {1, 1};
  rep.ids = {"x"};
  rep.answers = {"red"};
  rep.references = {"red"};
  auto j = nlohmann::json::parse(rep.to_json());
  EXPECT_FALSE(j.contains("mean_kl"));
  EXPECT_FALSE(j.contains("kl_positions"));
  KlReport kl;
  kl.mean_kl = 0.25;
  kl.positions = 8;
  kl.by_kind["color"] = 0.25;
  attach_kl(rep, kl);
  j = nlohmann::json::parse(rep.to_json());
  EXPECT_EQ(j["mean_kl"].get<double>(), 0.25);
  EXPECT_EQ(j["kl_positions"].get<int64_t>(), 8);
  EXPECT_EQ(j["kl_by_kind"]["color"].get<double>(), 0.25);
}

}  // namespace
