// Fine-tuning: autograd gradients of the MLA attention against finite differences in float64, frozen
// weights untouched, trained ones moved (Qwen2-VL and LLaVA-1.5 checkpoints), and a killed run resuming to the
// same loss curve.
#include "train/finetune.h"

#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "convert/convert.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "model/vlm.h"
#include "test_util.h"

using namespace mlaforge;
using namespace mlaforge::test;
namespace fs = std::filesystem;

namespace {

// tiny-a converted to MLA: 4 of 8 pairs kept, latent 8 (decoupled, whitened).
std::string tiny_mla(const TempDir& d) { return convert_quick(fixture("qwen2vl/tiny-a"), d / "mla", 4, 4); }

std::string read_file(const std::string& p) {
  std::ifstream in(p);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The rows of a CSV log (train_log.csv, eval_log.csv), header first, each split at its commas.
std::vector<std::vector<std::string>> csv_rows(const std::string& path) {
  std::vector<std::vector<std::string>> rows;
  std::istringstream in(read_file(path));
  std::string line;
  while (std::getline(in, line)) {
    std::vector<std::string> cells;
    std::istringstream ls(line);
    std::string c;
    while (std::getline(ls, c, ',')) cells.push_back(c);
    rows.push_back(cells);
  }
  return rows;
}

TEST(Finetune, MlaAttentionGradientsMatchFiniteDifferences) {
  if (!fs::exists(fixture("qwen2vl/tiny-a"))) GTEST_SKIP();
  TempDir d("grad");
  auto m = Vlm::load(tiny_mla(d));
  DecoderLM& dec = m->mutable_decoder();
  dec.to(at::kCPU, at::kDouble);
  at::manual_seed(0);
  const int64_t B = 2, T = 5, D = m->config().text.hidden_size;
  at::Tensor x = at::randn({B, T, D}, at::kDouble);
  at::Tensor pos = at::arange(T, at::kLong).view({1, 1, T}).expand({3, B, T}).clone();
  pos[1] += at::tensor({0, 2}, at::kLong).view({B, 1});  // distinct M-RoPE axes
  at::Tensor valid = at::ones({B, T}, at::kBool);
  valid[0][0] = false;  // left padding
  at::Tensor img = at::zeros({B, T}, at::kBool);
  img[1][1] = img[1][2] = true;  // both modalities' factors in play
  at::Tensor w = at::randn({B, T, D}, at::kDouble);
  CacheOptions expanded;  // the training path
  expanded.expanded = true;
  auto loss = [&]() {
    KVCache c = dec.new_cache(B, T, at::kCPU, expanded);
    at::Tensor h = dec.forward(x, pos, valid, img, c);
    return (h * w * valid.unsqueeze(-1)).sum();
  };
  int checked = 0;
  for (auto& [name, t] : dec.named_weights()) {
    if (name.find("layers.0.self_attn.") != 0 && name.find("layers.1.self_attn.") != 0) continue;
    t->requires_grad_(true);
    if (t->grad().defined()) t->mutable_grad().zero_();
    loss().backward();
    at::Tensor g = t->grad().clone();
    at::NoGradGuard ng;
    at::Tensor flat = t->view({-1});
    for (int64_t k : {int64_t(0), flat.numel() / 3, flat.numel() - 1}) {
      const double eps = 1e-6, orig = flat[k].item<double>();
      flat[k] = orig + eps;
      const double up = loss().item<double>();
      flat[k] = orig - eps;
      const double down = loss().item<double>();
      flat[k] = orig;
      const double fd = (up - down) / (2 * eps), ag = g.view({-1})[k].item<double>();
      EXPECT_NEAR(ag, fd, 1e-6 * std::max(1.0, std::abs(fd))) << name << "[" << k << "]";
      ++checked;
    }
    t->requires_grad_(false);
  }
  EXPECT_GE(checked, 3 * 12);  // q, k_rope, two down, two up, up bias, o (weights and biases) in 2 layers
}

FinetuneOptions tiny_options(const std::string& model, const std::string& out) {
  FinetuneOptions o;
  o.model_dir = model;
  o.teacher_dir = fixture("qwen2vl/tiny-a");
  o.data_path = source_path("data/shapes-mini/eval.jsonl");
  o.out_dir = out;
  o.limit = 24;
  o.batch = 4;
  o.grad_accum = 2;
  o.steps = 4;
  o.save_every = 2;
  o.lr = 1e-3;
  return o;
}

// Of two checkpoints' weights: how many of those `trained` names changed, and how many others there are.
struct WeightChanges {
  int trained = 0, frozen = 0;
};

// Compares every weight of two checkpoints, which must have the same names (a fatal failure otherwise: call it
// under ASSERT_NO_FATAL_FAILURE); fails for any weight outside `trained` that changed value or dtype.
void compare_weights(const std::string& before_dir, const std::string& after_dir,
                     const std::function<bool(const std::string&)>& trained, WeightChanges* changes) {
  WeightStore before = WeightStore::open_dir(before_dir), after = WeightStore::open_dir(after_dir);
  ASSERT_EQ(before.names(), after.names());
  for (const auto& name : before.names()) {
    at::Tensor a = before.load(name, {}, at::kDouble), b = after.load(name, {}, at::kDouble);
    if (trained(name)) {
      changes->trained += !a.equal(b);
    } else {
      EXPECT_TRUE(a.equal(b)) << name << " is frozen but changed";
      EXPECT_EQ(before.entry(name).dtype, after.entry(name).dtype) << name;
      ++changes->frozen;
    }
  }
}

// tiny-a converted (tiny_mla) and fine-tuned with tiny_options, this loss and choice of trainable weights.
FinetuneResult tiny_finetune(const TempDir& d, const std::string& loss, const std::string& trainable,
                             FinetuneOptions* o, double mse_weight = 1) {
  *o = tiny_options(tiny_mla(d), d / "out");
  o->loss = loss;
  o->trainable = trainable;
  o->mse_weight = mse_weight;
  return finetune(*o);
}

TEST(Finetune, FrozenWeightsStayBitIdentical) {
  if (!fs::exists(fixture("qwen2vl/tiny-a"))) GTEST_SKIP();
  TempDir d("frozen");
  FinetuneOptions o;
  FinetuneResult r = tiny_finetune(d, "ce+attn-mse", "attn", &o);
  EXPECT_EQ(r.steps, 4);
  EXPECT_GT(r.trainable_parameters, 0);
  WeightChanges w;
  ASSERT_NO_FATAL_FAILURE(compare_weights(
      o.model_dir, o.out_dir,
      [](const std::string& name) {
        return name.find(".self_attn.") != std::string::npos && name.find("model.layers.") == 0;
      },
      &w));
  EXPECT_GT(w.trained, 10);
  EXPECT_GT(w.frozen, 20);
  // The saved model loads and runs with generate / eval.
  auto m = Vlm::load(o.out_dir);
  EXPECT_TRUE(m->config().mla.enabled);
  EXPECT_TRUE(fs::exists(o.out_dir + "/train_log.csv"));
}

// --trainable latent moves the per-modality latent projections alone (query, rotary-key and output projections
// and the norms stay bit-identical), and --loss ce+kl+attn-mse logs a loss of ce + kl_weight kl + mse_weight mse.
TEST(Finetune, LatentOnlyUnderBothDistillationTerms) {
  if (!fs::exists(fixture("qwen2vl/tiny-a"))) GTEST_SKIP();
  TempDir d("latent");
  FinetuneOptions o;
  tiny_finetune(d, "ce+kl+attn-mse", "latent", &o, /*mse_weight=*/3);
  WeightChanges w;
  ASSERT_NO_FATAL_FAILURE(compare_weights(
      o.model_dir, o.out_dir,
      [](const std::string& name) {
        return name.find(".self_attn.kv_down_proj.") != std::string::npos ||
               name.find(".self_attn.kv_up_proj.") != std::string::npos;
      },
      &w));
  EXPECT_EQ(w.trained, 2 * 5);  // 2 layers: down and up per modality, and the up bias
  EXPECT_GT(w.frozen, 20);
  const auto rows = csv_rows(o.out_dir + "/train_log.csv");  // step, epoch, loss, ce, kl, mse, ...
  ASSERT_EQ(rows.size(), 5u);
  for (size_t i = 1; i < rows.size(); ++i) {
    ASSERT_GT(rows[i].size(), 5u);
    const double loss = std::stod(rows[i][2]), ce = std::stod(rows[i][3]), kl = std::stod(rows[i][4]),
                 mse = std::stod(rows[i][5]);
    EXPECT_GT(kl, 0);
    EXPECT_GT(mse, 0);
    EXPECT_NEAR(loss, ce + o.kl_weight * kl + o.mse_weight * mse, 1e-6 * loss);
  }
}

// Issue 5's recipe on LLaVA-1.5 checkpoints (MHA and GQA, tiny random weights; the real test is an unseen
// checkpoint): convert, then fine-tune with the defaults (ce+kl from the original, attention + norms) on the
// shapes training rows, LLaVA's preprocessing and its language model's weight names. Only the decoder's attention
// and norm weights move; the vision tower, projector, embeddings, MLPs and head stay bit-identical; the model
// loads and evaluates (accuracy and KL against the original before and after), and the training loss falls.
TEST(Finetune, LlavaCheckpointsTrainWithTheDefaultRecipe) {
  for (const char* name : {"llava/llava-mha", "llava/llava-gqa"}) {
    SCOPED_TRACE(name);
    if (!fs::exists(fixture(name))) GTEST_SKIP();
    TempDir d("ftllava");
    const std::string mla = convert_quick(fixture(name), d / "mla", 4, 4);
    FinetuneOptions o;
    o.model_dir = mla;
    o.teacher_dir = fixture(name);
    o.data_path = source_path("data/shapes-mini/train.jsonl");
    o.eval_path = source_path("data/shapes-mini/eval.jsonl");
    o.eval_limit = 8;
    o.out_dir = d / "out";
    o.limit = 8;  // one batch, seen at every step: its loss must fall
    o.batch = 8;
    o.steps = 6;
    o.lr = 1e-3;
    const FinetuneResult r = finetune(o);
    EXPECT_EQ(r.steps, 6);
    EXPECT_GT(r.trainable_parameters, 0);
    EXPECT_TRUE(std::isfinite(r.final_loss));
    const std::string lm = Vlm::load(mla)->lm_prefix() + "layers.";
    WeightChanges w;
    ASSERT_NO_FATAL_FAILURE(compare_weights(
        mla, o.out_dir,
        [&](const std::string& t) {
          return t.rfind(lm, 0) == 0 &&
                 (t.find(".self_attn.") != std::string::npos || t.find("layernorm") != std::string::npos);
        },
        &w));
    EXPECT_GT(w.trained, 8);
    EXPECT_GT(w.frozen, 20);  // vision tower, projector, embeddings, MLPs, head
    EXPECT_TRUE(Vlm::load(o.out_dir)->config().mla.enabled);
    // eval_log.csv: header, then step, accuracy, KL against the teacher, before and after training.
    const auto evals = csv_rows(o.out_dir + "/eval_log.csv");
    ASSERT_EQ(evals.size(), 3u);
    for (size_t i = 1; i < evals.size(); ++i) {
      ASSERT_FALSE(evals[i].empty());
      EXPECT_TRUE(std::isfinite(std::stod(evals[i].back()))) << evals[i].back();
    }
    // train_log.csv: header, then step, epoch, loss, ...
    const auto steps = csv_rows(o.out_dir + "/train_log.csv");
    ASSERT_EQ(steps.size(), 7u);
    ASSERT_GT(steps[1].size(), 2u);
    ASSERT_GT(steps.back().size(), 2u);
    EXPECT_LT(std::stod(steps.back()[2]), std::stod(steps[1][2]));
  }
}

TEST(Finetune, KilledRunResumesToTheSameLossCurve) {
  if (!fs::exists(fixture("qwen2vl/tiny-a"))) GTEST_SKIP();
  TempDir d("resume");
  const std::string mla = tiny_mla(d);
  FinetuneOptions whole = tiny_options(mla, d / "whole");
  finetune(whole);
  FinetuneOptions killed = tiny_options(mla, d / "killed");
  killed.stop_after = 3;  // dies after step 3; its last checkpoint is step 2
  finetune(killed);
  FinetuneOptions resumed = killed;
  resumed.stop_after = 0;
  resumed.resume_dir = killed.out_dir;
  finetune(resumed);
  EXPECT_EQ(read_file(resumed.out_dir + "/train_log.csv").size() > 0, true);
  // Same losses, learning rates and gradient norms, step for step (wall-clock columns aside).
  auto columns = [](const std::string& path) {
    std::vector<std::vector<std::string>> rows = csv_rows(path);
    for (auto& cells : rows)
      if (cells.size() >= 8) cells = {cells[0], cells[2], cells[3], cells[4], cells[6], cells[7]};
    return rows;
  };
  auto a = columns(whole.out_dir + "/train_log.csv"), b = columns(resumed.out_dir + "/train_log.csv");
  EXPECT_EQ(a, b);
  EXPECT_EQ(a.size(), 5u);  // header + 4 steps
  WeightStore wa = WeightStore::open_dir(whole.out_dir), wb = WeightStore::open_dir(resumed.out_dir);
  for (const auto& name : wa.names()) EXPECT_TRUE(wa.load(name).equal(wb.load(name))) << name;
}

TEST(Finetune, BadOptions) {
  if (!fs::exists(fixture("qwen2vl/tiny-a"))) GTEST_SKIP();
  TempDir d("ftbad");
  const std::string mla = tiny_mla(d);
  auto err = [](const FinetuneOptions& o) {
    try {
      finetune(o);
    } catch (const mlaforge::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  // Without --teacher the distillation loss uses the model the checkpoint was converted from ...
  FinetuneOptions o = tiny_options(mla, d / "o");
  o.teacher_dir.clear();
  o.steps = 1;
  EXPECT_EQ(err(o), "");
  // ... and says so when the checkpoint does not record one.
  {
    std::ifstream in(mla + "/config.json");
    std::string cfg((std::istreambuf_iterator<char>(in)), {});
    const std::string key = "\"source\": \"";
    size_t at = cfg.find(key);
    ASSERT_NE(at, std::string::npos);
    cfg.insert(at + key.size(), "/nonexistent");
    std::ofstream(mla + "/config.json") << cfg;
  }
  o = tiny_options(mla, d / "o2");
  o.teacher_dir.clear();
  EXPECT_NE(err(o).find("--teacher"), std::string::npos) << err(o);
  o = tiny_options(mla, d / "o");
  o.stage = 1;
  EXPECT_NE(err(o).find("--stage 1 trains a partial-RoPE model without a latent"), std::string::npos) << err(o);
  o = tiny_options(mla, d / "o");
  o.loss = "mse";
  EXPECT_NE(err(o).find("--loss"), std::string::npos);
  o = tiny_options(mla, d / "o");
  o.kl_positions = "all";
  EXPECT_NE(err(o).find("--kl-positions"), std::string::npos) << err(o);
  // Distillation over every text position (the prompt's too) measures another KL than over the answers.
  auto first_kl = [&](const std::string& positions, const std::string& out) {
    FinetuneOptions k = tiny_options(mla, d / out);
    k.kl_positions = positions;
    k.steps = 1;
    EXPECT_EQ(err(k), "") << positions;
    const auto rows = csv_rows(k.out_dir + "/train_log.csv");  // header, then step, epoch, loss, ce, kl, ...
    return rows.size() > 1 && rows[1].size() > 4 ? std::stod(rows[1][4]) : -1.0;
  };
  const double kl_answers = first_kl("answers", "o3"), kl_text = first_kl("text", "o4");
  EXPECT_GT(kl_answers, 0.0);
  EXPECT_GT(kl_text, 0.0);
  EXPECT_NE(kl_answers, kl_text);
  o = tiny_options(mla, d / "o");
  o.resume_dir = d / "nowhere";
  EXPECT_NE(err(o).find("no checkpoint to resume from"), std::string::npos) << err(o);
}

}  // namespace
