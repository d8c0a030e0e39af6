// The runtime against transformers 5.17 fixtures (tools/make_fixtures.py): logits, hidden states, image
// features and greedy tokens of tiny random Qwen2-VL and LLaVA-1.5 checkpoints in several layouts, and
// the bundled qwen2vl-shapes model's logits and greedy answers.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "eval/eval.h"
#include "infer/generate.h"
#include "io/dataset.h"
#include "io/safetensors.h"
#include "model/ops.h"
#include "model/vlm.h"
#include "test_util.h"

using namespace mlaforge;
using namespace mlaforge::test;
using json = nlohmann::json;

namespace {

constexpr double kTol = 1e-4;

// Tiny random checkpoints of each family and layout, with transformers' outputs beside them.
class TinyModels : public ::testing::TestWithParam<std::string> {};

TEST_P(TinyModels, MatchTransformers) {
  const std::string model = GetParam();
  const std::string dir = fixture(model);
  if (!std::filesystem::exists(dir)) GTEST_SKIP() << "no fixture " << dir;
  auto m = Vlm::load(dir);
  auto f = SafetensorsFile::open(fixture(model + ".safetensors"));
  std::ifstream in(fixture(model + ".cases.json"));
  json meta = json::parse(in);
  for (const json& jc : meta["cases"]) {
    const std::string name = jc["name"];
    SCOPED_TRACE(model + "/" + name);
    FixtureCase c = read_fixture_case(*f, name, m->config());

    // Our prompt rendering, tokenizer and preprocessing give the fixture's ids and pixel values.
    std::vector<Prompt> prompts;
    for (size_t i = 0; i < jc["questions"].size(); ++i)
      prompts.push_back(fixture_prompt(jc["images"][i].get<std::vector<std::string>>(), jc["questions"][i]));
    Batch ours = m->prepare(prompts);
    expect_row_ids(ours, c.rows);
    if (c.pixel_values.defined()) {
      ASSERT_EQ(ours.grids, c.grids);
      EXPECT_LT((ours.pixel_values - c.pixel_values).abs().max().item<double>(), 1e-5);
    }

    // The model fed the fixture's own ids and pixel_values.
    Batch batch = m->make_batch(c.rows, c.pixel_values, c.grids);
    ASSERT_TRUE(batch.valid.equal(c.valid));
    if (c.pixel_values.defined()) {
      at::Tensor feats = m->image_features(c.pixel_values, c.grids);
      EXPECT_LE(rel_err(feats, f->load(name + ".image_embeds")), kTol) << "image features";
    }
    KVCache cache = m->decoder().new_cache(batch.batch(), batch.length(), at::kCPU);
    std::vector<at::Tensor> hidden;
    ForwardTaps taps;
    taps.hidden = &hidden;
    at::Tensor h = m->prefill(batch, cache, taps);
    at::Tensor logits = m->decoder().logits(h);
    at::Tensor ref_logits = f->load(name + ".logits"), ref_hidden = f->load(name + ".hidden_states");
    const double logit_err = rel_err(valid_rows(logits, c.valid), valid_rows(ref_logits, c.valid));
    std::printf("%s/%s: logits relative error %.2e\n", model.c_str(), name.c_str(), logit_err);
    EXPECT_LE(logit_err, kTol) << "logits";
    ASSERT_EQ(int64_t(hidden.size()), ref_hidden.size(0));
    for (size_t l = 0; l < hidden.size(); ++l)
      EXPECT_LE(rel_err(valid_rows(hidden[l], c.valid), valid_rows(ref_hidden[int64_t(l)], c.valid)), kTol)
          << "hidden state " << l;

    // Greedy decoding with the KV cache gives transformers' tokens (8 steps, no stop token in them).
    SamplingOptions so;
    so.max_new_tokens = 8;
    auto gens = generate(*m, batch, so);
    at::Tensor ref_gen = f->load(name + ".generated", at::kLong);
    const auto& eos = m->config().eos_token_ids;
    for (size_t b = 0; b < gens.size(); ++b) {
      // transformers' tokens up to its first stop token (ours exclude the stop token).
      std::vector<int64_t> want;
      for (int64_t i = 0; i < ref_gen.size(1); ++i) {
        int64_t t = ref_gen[int64_t(b)][i].item<int64_t>();
        if (std::find(eos.begin(), eos.end(), t) != eos.end()) break;
        want.push_back(t);
      }
      EXPECT_EQ(gens[b].tokens, want) << "generated tokens of row " << b;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Checkpoints, TinyModels,
                         ::testing::Values("qwen2vl/tiny-a", "qwen2vl/tiny-b", "qwen25vl/tiny", "llava/llava-mha",
                                           "llava/llava-gqa"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& ch : n)
                             if (ch == '-' || ch == '/') ch = '_';
                           return n;
                         });

TEST(ShapesModel, BatchLogitsMatchTransformers) {
  const std::string dir = source_path("models/qwen2vl-shapes");
  auto m = Vlm::load(dir);
  auto f = SafetensorsFile::open(fixture("shapes/batch.safetensors"));
  at::Tensor ids = f->load("input_ids", at::kLong), valid = f->load("attention_mask", at::kLong).to(at::kBool);
  std::vector<std::vector<int64_t>> rows;
  for (int64_t b = 0; b < ids.size(0); ++b) {
    at::Tensor r = ids[b].masked_select(valid[b]);
    rows.emplace_back(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + r.numel());
  }
  at::Tensor g = f->load("image_grid_thw", at::kLong);
  std::vector<std::array<int64_t, 3>> grids;
  for (int64_t i = 0; i < g.size(0); ++i) grids.push_back({g[i][0].item<int64_t>(), g[i][1].item<int64_t>(), g[i][2].item<int64_t>()});
  Batch batch = m->make_batch(rows, f->load("pixel_values"), grids);
  KVCache cache = m->decoder().new_cache(batch.batch(), batch.length(), at::kCPU);
  at::Tensor logits = m->decoder().logits(m->prefill(batch, cache));
  const double err = rel_err(valid_rows(logits, valid), valid_rows(f->load("logits"), valid));
  std::printf("qwen2vl-shapes batch of %lld: logits relative error %.2e\n", (long long)batch.batch(), err);
  EXPECT_LE(err, kTol);
}

TEST(ShapesModel, GreedyAnswersMatchTransformers) {
  // transformers' float32 answers for every eval row; check the first 48 here (eval covers all).
  std::ifstream in(fixture("shapes/eval_answers.json"));
  json ref = json::parse(in);
  auto m = Vlm::load(source_path("models/qwen2vl-shapes"));
  auto rows = load_conversations(source_path("data/shapes-mini/eval.jsonl"), 48);
  ASSERT_EQ(rows.size(), 48u);
  std::vector<Prompt> prompts;
  for (auto& r : rows) prompts.push_back(question_prompt(r));
  SamplingOptions so;
  so.max_new_tokens = 48;
  auto gens = generate(*m, prompts, so);
  int same = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    std::string want = ref["answers"][rows[i].id], got = normalize_answer(gens[i].text);
    EXPECT_EQ(got, want) << rows[i].id;
    same += got == want;
  }
  EXPECT_EQ(same, 48);
}

}  // namespace

namespace {

std::string read_text_file(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Copies the llava-mha fixture with its weights renamed by `rename` (applied to every tensor name).
std::string llava_with_names(const TempDir& d, const std::function<std::string(const std::string&)>& rename) {
  const std::string src = fixture("llava/llava-mha"), dst = d / "m";
  std::filesystem::copy(src, dst, std::filesystem::copy_options::recursive);
  auto st = SafetensorsFile::open(src + "/model.safetensors");
  std::map<std::string, at::Tensor> renamed;
  for (auto& [name, e] : st->entries()) renamed[rename(name)] = st->load(name);
  save_safetensors(dst + "/model.safetensors", renamed);
  return dst;
}


at::Tensor first_logits(const Vlm& m) {
  return prompt_logits(m, {fixture_prompt({"square224"}, "What color is the circle?")});
}

TEST(Llava, AllWeightLayoutsLoad) {
  if (!std::filesystem::exists(fixture("llava/llava-mha"))) GTEST_SKIP();
  // The fixture has transformers 5.17's saved names: language_model.model.*, vision_tower.embeddings.*.
  auto base = Vlm::load(fixture("llava/llava-mha"));
  at::Tensor want = first_logits(*base);
  TempDir hub("llava-hub"), mem("llava-mem");
  // Hub names: vision_tower.vision_model.*
  auto hub_dir = llava_with_names(hub, [](const std::string& n) {
    return replace_prefix(n, "vision_tower.", "vision_tower.vision_model.");
  });
  // transformers' in-memory names: model.language_model.*, lm_head, model.vision_tower.vision_model.*, ...
  auto mem_dir = llava_with_names(mem, [](const std::string& n) {
    std::string r = replace_prefix(n, "language_model.model.", "model.language_model.");
    r = replace_prefix(r, "language_model.lm_head.", "lm_head.");
    r = replace_prefix(r, "vision_tower.", "model.vision_tower.vision_model.");
    return replace_prefix(r, "multi_modal_projector.", "model.multi_modal_projector.");
  });
  EXPECT_TRUE(first_logits(*Vlm::load(hub_dir)).equal(want));
  EXPECT_TRUE(first_logits(*Vlm::load(mem_dir)).equal(want));
}

TEST(Llava, BadConfigErrors) {
  if (!std::filesystem::exists(fixture("llava/llava-mha"))) GTEST_SKIP();
  TempDir d("llava-cfg");
  std::filesystem::copy(fixture("llava/llava-mha"), d / "m", std::filesystem::copy_options::recursive);
  const std::string cfg_path = d / "m/config.json";
  json cfg = json::parse(read_text_file(cfg_path));
  auto write = [&](const json& j) { std::ofstream(cfg_path) << j.dump(); };

  json bad = cfg;
  bad["vision_feature_layer"] = -5;  // 3 layers: hidden states -4..3
  write(bad);
  std::string e = load_error(d / "m");
  EXPECT_NE(e.find("config.json: vision_feature_layer -5 is out of range for a vision tower of 3 layers"),
            std::string::npos) << e;

  bad = cfg;
  bad["image_seq_length"] = 20;  // the tower gives 16 patches
  write(bad);
  e = load_error(d / "m");
  EXPECT_NE(e.find("config.json: image_seq_length 20 does not match the vision features: 16 patches"),
            std::string::npos) << e;

  bad = cfg;
  bad["vision_config"]["model_type"] = "siglip_vision_model";
  write(bad);
  e = load_error(d / "m");
  EXPECT_NE(e.find("unsupported vision tower \"siglip_vision_model\""), std::string::npos) << e;
}

TEST(Llava, ImageTokenCountMustMatchFeatures) {
  if (!std::filesystem::exists(fixture("llava/llava-mha"))) GTEST_SKIP();
  auto m = Vlm::load(fixture("llava/llava-mha"));
  const int64_t img = m->config().image_token_id;
  at::Tensor pixels = at::zeros({1, 3, 56, 56});
  std::vector<int64_t> ids = {1, 10, 11};
  ids.insert(ids.end(), 15, img);  // one image gives 16 features, not 15
  try {
    m->make_batch({ids}, pixels, {{1, 4, 4}});
    FAIL() << "expected an error";
  } catch (const mlaforge::Error& e) {
    EXPECT_NE(std::string(e.what()).find("image token count (15 in row 0) does not match the image features"),
              std::string::npos) << e.what();
  }
  ids.push_back(img);
  EXPECT_NO_THROW(m->make_batch({ids}, pixels, {{1, 4, 4}}));
}

}  // namespace

// The fused RMSNorm that inference takes on CUDA (kernels/rms_norm.h) against float64, and against the ATen
// composition it replaces (which a gradient-tracking input still takes).
TEST(Ops, FusedRmsNormMatchesFloat64AndAten) {
  if (!at::hasCUDA()) GTEST_SKIP() << "needs CUDA";
  at::manual_seed(5);
  for (auto t : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (int64_t dim : {4096, 37}) {
      at::Tensor x = (at::randn({3, 5, dim}, at::kDouble) * 3).to(t).to(at::kCUDA);
      at::Tensor w = (at::rand({dim}, at::kDouble) + 0.5).to(t).to(at::kCUDA);
      at::Tensor fused = rms_norm(x, w, 1e-6);
      at::Tensor aten = rms_norm(x.clone().requires_grad_(true), w, 1e-6).detach();
      at::Tensor xd = x.to(at::kDouble).cpu(), wd = w.to(at::kDouble).cpu();
      at::Tensor ref = wd * xd * at::rsqrt(xd.pow(2).mean(-1, true) + 1e-6);
      const double err = rel_err(fused.to(at::kDouble).cpu(), ref);
      const double vs_aten = rel_err(fused.to(at::kDouble).cpu(), aten.to(at::kDouble).cpu());
      std::printf("fused rms_norm %s dim %lld: vs float64 %.2e, vs ATen %.2e\n", c10::toString(t), (long long)dim, err,
                  vs_aten);
      // Two roundings to the input type (as ATen does): bf16 and f16 ~2^-8 and 2^-11 of each value.
      EXPECT_LE(err, t == at::kFloat ? 1e-6 : 1e-2);
      EXPECT_LE(vs_aten, t == at::kFloat ? 1e-6 : 1e-2);
      EXPECT_EQ(fused.sizes(), x.sizes());
    }
  }
}

