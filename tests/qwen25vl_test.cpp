// Qwen2.5-VL against transformers 5.17 fixtures (tests/fixtures/qwen25vl: a tiny random checkpoint
// saved by save_pretrained, vision depth 4 width 32, windows of 2x2 merged tokens, full attention in
// blocks 1 and 3; its outputs in tiny.safetensors, and get_rope_index's positions for the same prompts in
// tiny.positions.safetensors): the window order against transformers' padded algorithm, prompts, pixel
// values, 3-D positions, image features, logits, hidden states and greedy tokens; the Hub's flat config
// and in-memory weight names; config errors; conversion at full rank, fine-tuning and the CLI.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>

#include "convert/convert.h"
#include "convert/lowrank.h"
#include "core/error.h"
#include "infer/generate.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "model/vlm.h"
#include "train/finetune.h"
#include "vision/qwen2vl_vit.h"
#include "test_util.h"

using namespace mlaforge;
using namespace mlaforge::test;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

constexpr double kTol = 1e-4;
const std::string kTiny = "qwen25vl/tiny";

std::string read_text_file(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// transformers' get_window_index written with its own padding scheme, as an independent reference:
// pad each frame's merged grid with -100 up to whole windows (always at least one more row and column
// of windows' worth, as transformers does), cut into windows, drop the padding.
std::pair<std::vector<int64_t>, std::vector<int64_t>> padded_window_index(
    const std::vector<std::array<int64_t, 3>>& grids, int64_t merge, int64_t ws) {
  std::vector<int64_t> order, lengths;
  int64_t base = 0;
  for (const auto& g : grids) {
    const int64_t t = g[0], lh = g[1] / merge, lw = g[2] / merge;
    const int64_t ph = ws - lh % ws, pw = ws - lw % ws, nh = (lh + ph) / ws, nw = (lw + pw) / ws;
    at::Tensor index = at::arange(t * lh * lw, at::kLong).view({t, lh, lw});
    at::Tensor padded = at::constant_pad_nd(index, {0, pw, 0, ph}, -100);
    padded = padded.view({t, nh, ws, nw, ws}).permute({0, 1, 3, 2, 4}).reshape({t, nh * nw, ws, ws});
    at::Tensor counts = (padded != -100).sum({2, 3}).reshape({-1});
    at::Tensor flat = padded.reshape({-1});
    at::Tensor kept = flat.masked_select(flat != -100) + base;
    order.insert(order.end(), kept.data_ptr<int64_t>(), kept.data_ptr<int64_t>() + kept.numel());
    for (int64_t i = 0; i < counts.numel(); ++i)
      if (counts[i].item<int64_t>() > 0) lengths.push_back(counts[i].item<int64_t>());
    base += t * lh * lw;
  }
  return {order, lengths};
}

TEST(Qwen25Window, PartialWindowsAtTheEdges) {
  // One 6x10 patch grid = 3x5 merged tokens, windows of 2x2 merged tokens: a 2x3 window grid whose
  // right column is 1 wide and bottom row 1 high.
  WindowOrder wo = qwen25_window_order({{1, 6, 10}}, 2, 2);
  EXPECT_EQ(wo.order, (std::vector<int64_t>{0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14}));
  EXPECT_EQ(wo.lengths, (std::vector<int64_t>{4, 4, 2, 2, 2, 1}));
  // A grid that is a whole number of windows keeps every window full (transformers' padding adds an
  // empty row and column of windows there, which it then drops).
  wo = qwen25_window_order({{1, 8, 8}}, 2, 2);
  EXPECT_EQ(wo.lengths, (std::vector<int64_t>(4, 4)));
  EXPECT_EQ(wo.order, (std::vector<int64_t>{0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15}));
}

TEST(Qwen25Window, MatchesTransformersPaddedIndex) {
  // Several images (two frames in one), sides multiples of the window and not, windows of 1 to 4.
  const std::vector<std::array<int64_t, 3>> grids = {{1, 6, 10}, {2, 4, 4}, {1, 16, 2}, {1, 22, 14}, {1, 2, 2}};
  for (int64_t ws : {1, 2, 3, 4}) {
    SCOPED_TRACE("window " + std::to_string(ws));
    WindowOrder wo = qwen25_window_order(grids, 2, ws);
    auto [order, lengths] = padded_window_index(grids, 2, ws);
    EXPECT_EQ(wo.order, order);
    EXPECT_EQ(wo.lengths, lengths);
    // A permutation of all merged tokens.
    std::vector<int64_t> sorted = wo.order;
    std::sort(sorted.begin(), sorted.end());
    for (size_t i = 0; i < sorted.size(); ++i) ASSERT_EQ(sorted[i], int64_t(i));
  }
}

class Qwen25Fixture : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(fixture(kTiny))) GTEST_SKIP() << "no fixture " << fixture(kTiny);
  }
};

// Logits, hidden states, image features, ids, pixel values and greedy tokens of every case are
// checked with the other families' tiny checkpoints (Checkpoints/TinyModels.MatchTransformers/qwen25vl_tiny,
// tests/model_test.cpp). Here: the 3-D positions, which transformers 5.17's get_rope_index computes
// from the processor's mm_token_type_ids (made separately, with the same prompts' ids and masks).
TEST_F(Qwen25Fixture, PositionsMatchTransformers) {
  auto m = Vlm::load(fixture(kTiny));
  ASSERT_EQ(m->config().family, Family::Qwen25VL);
  auto f = SafetensorsFile::open(fixture(kTiny + ".safetensors"));
  auto positions = SafetensorsFile::open(fixture(kTiny + ".positions.safetensors"));
  json meta = json::parse(read_text_file(fixture(kTiny + ".cases.json")));
  ASSERT_EQ(meta["cases"].size(), 4u);
  for (const json& jc : meta["cases"]) {
    const std::string name = jc["name"];
    SCOPED_TRACE(name);
    FixtureCase c = read_fixture_case(*f, name, m->config());
    Batch batch = m->make_batch(c.rows, c.pixel_values, c.grids);
    // Positions on real tokens (transformers fills padding with 1), and the first generated token's
    // position max + 1: transformers 5.17's rope_delta is max + 1 minus the row's real (unpadded) length.
    ASSERT_TRUE(positions->load(name + ".input_ids", at::kLong).equal(f->load(name + ".input_ids", at::kLong)));
    at::Tensor ref_pos = positions->load(name + ".position_ids", at::kLong);  // [3, B, T]
    for (int64_t a = 0; a < 3; ++a)
      EXPECT_TRUE(batch.pos[a].masked_select(c.valid).equal(ref_pos[a].masked_select(c.valid))) << "position axis " << a;
    at::Tensor deltas = positions->load(name + ".rope_deltas", at::kLong);
    for (int64_t b = 0; b < batch.batch(); ++b)
      EXPECT_EQ(batch.next_position[size_t(b)], int64_t(c.rows[size_t(b)].size()) + deltas[b].item<int64_t>())
          << "row " << b;
  }
}

// Images whose merged grids are not whole windows (the multi case: 300x200 and 70x100 resize to odd
// grids) go through the tower one at a time and together with the same result: windows never cross
// images and the inverse order restores the processor's order.
TEST_F(Qwen25Fixture, WindowsStayWithinEachImage) {
  auto m = Vlm::load(fixture(kTiny));
  auto f = SafetensorsFile::open(fixture(kTiny + ".safetensors"));
  FixtureCase c = read_fixture_case(*f, "multi", m->config());
  ASSERT_EQ(c.grids.size(), 2u);
  const int64_t ws = m->config().vision.window_merged_tokens(), merge = m->config().vision.spatial_merge_size;
  int64_t partial = 0;
  for (const auto& g : c.grids) partial += (g[1] / merge) % ws != 0 || (g[2] / merge) % ws != 0;
  EXPECT_GT(partial, 0) << "the case should have an image with partial windows";
  at::Tensor both = m->image_features(c.pixel_values, c.grids);
  const int64_t n0 = c.grids[0][0] * c.grids[0][1] * c.grids[0][2];
  at::Tensor first = m->image_features(c.pixel_values.narrow(0, 0, n0), {c.grids[0]});
  at::Tensor second = m->image_features(c.pixel_values.narrow(0, n0, c.pixel_values.size(0) - n0), {c.grids[1]});
  EXPECT_LE(rel_err(both, at::cat({first, second}, 0)), 1e-6);
}

std::string rewritten_copy(const TempDir& d, const std::function<void(json&)>& edit_config,
                           const std::function<std::string(const std::string&)>& rename);

// The fixture's features depend on the windows: the same weights with full attention in every block
// (or windows in every block) are far from transformers' features, so the fixture match (TinyModels) is a test of
// the window attention and of the full-attention blocks.
TEST_F(Qwen25Fixture, FeaturesDependOnWindowsAndFullAttentionBlocks) {
  auto f = SafetensorsFile::open(fixture(kTiny + ".safetensors"));
  FixtureCase c = read_fixture_case(*f, "multi", Vlm::load(fixture(kTiny))->config());
  at::Tensor want = f->load("multi.image_embeds");
  for (const json& blocks : {json{0, 1, 2, 3}, json::array()}) {
    TempDir d("q25-full");
    auto m = Vlm::load(rewritten_copy(d, [&](json& cfg) { cfg["vision_config"]["fullatt_block_indexes"] = blocks; },
                                      nullptr));
    const double err = rel_err(m->image_features(c.pixel_values, c.grids), want);
    std::printf("qwen25vl/multi with full attention in blocks %s: image features relative error %.2e\n",
                blocks.dump().c_str(), err);
    EXPECT_GT(err, 1e-2);
  }
}

// A copy of the fixture with config.json and weight names rewritten.
std::string rewritten_copy(const TempDir& d, const std::function<void(json&)>& edit_config,
                           const std::function<std::string(const std::string&)>& rename) {
  const std::string dst = d / "m";
  fs::copy(fixture(kTiny), dst, fs::copy_options::recursive);
  json cfg = json::parse(read_text_file(dst + "/config.json"));
  edit_config(cfg);
  std::ofstream(dst + "/config.json") << cfg.dump(1);
  if (rename) {
    WeightStore ws = WeightStore::open_dir(dst);
    std::map<std::string, at::Tensor> renamed;
    for (const auto& name : ws.names()) renamed[rename(name)] = ws.load_stored(name);
    for (const auto& e : fs::directory_iterator(dst))
      if (e.path().extension() == ".safetensors" || e.path().filename() == "model.safetensors.index.json")
        fs::remove(e.path());
    save_safetensors(dst + "/model.safetensors", renamed);
  }
  return dst;
}

at::Tensor single_logits(const Vlm& m) {
  return prompt_logits(m, {fixture_prompt({"wide300x200", "odd70x100"}, "Compare the two images.")});
}


// The Hub's flat config (text keys at the top, rope_scaling + rope_theta) and the in-memory weight names
// (model.visual.*, model.language_model.*) give the same logits as the nested save_pretrained layout.
TEST_F(Qwen25Fixture, HubFlatConfigAndInMemoryNamesLoad) {
  at::Tensor want = single_logits(*Vlm::load(fixture(kTiny)));
  TempDir d("q25-flat");
  auto flatten = [](json& cfg) {
    json text = cfg["text_config"];
    cfg.erase("text_config");
    json rp = text.contains("rope_parameters") ? text["rope_parameters"] : json::object();
    text.erase("rope_parameters");
    for (auto& [k, v] : text.items())
      if (k != "model_type" && k != "architectures" && k != "dtype" && !cfg.contains(k)) cfg[k] = v;
    cfg["rope_theta"] = rp.value("rope_theta", 1000000.0);
    cfg["rope_scaling"] = {{"type", "mrope"}, {"mrope_section", rp["mrope_section"]}};
    // The Hub's vision_config says in_chans.
    cfg["vision_config"].erase("in_channels");
    cfg["vision_config"]["in_chans"] = 3;
  };
  // save_pretrained's names are the Hub's (visual.*, model.*, lm_head.*).
  auto in_memory = [](const std::string& n) {
    if (n.rfind("visual.", 0) == 0) return "model." + n;
    return replace_prefix(n, "model.", "model.language_model.");
  };
  const std::string dir = rewritten_copy(d, flatten, in_memory);
  json cfg = json::parse(read_text_file(dir + "/config.json"));
  ASSERT_FALSE(cfg.contains("text_config"));
  auto m = Vlm::load(dir);
  ASSERT_EQ(m->lm_prefix(), "model.language_model.");
  EXPECT_TRUE(single_logits(*m).equal(want));
}

std::string config_error(const std::function<void(json&)>& edit) {
  TempDir d("q25-cfg");
  const std::string dir = rewritten_copy(d, edit, nullptr);
  return error_of([&] { load_model_config(dir); });
}

TEST_F(Qwen25Fixture, BadConfigErrors) {
  auto expect = [](const std::function<void(json&)>& edit, const std::string& want) {
    const std::string e = config_error(edit);
    EXPECT_NE(e.find("config.json: " + want), std::string::npos) << "got: " << e;
  };
  expect([](json& c) { c["vision_config"]["hidden_act"] = "relu6"; },
         "unsupported vision hidden_act \"relu6\" (supported: silu, gelu, quick_gelu)");
  expect([](json& c) { c["vision_config"]["fullatt_block_indexes"] = {1, 4}; },
         "vision_config.fullatt_block_indexes lists block 4, outside the 4 blocks");
  expect([](json& c) { c["vision_config"]["fullatt_block_indexes"] = "all"; },
         "vision_config.fullatt_block_indexes must be a list of block indices");
  expect([](json& c) { c["vision_config"]["window_size"] = 42; },
         "vision_config.window_size 42 must be a positive multiple of patch_size * spatial_merge_size = 28");
  expect([](json& c) { c["vision_config"]["window_size"] = 0; }, "vision_config.window_size 0 must be");
  expect([](json& c) { c["vision_config"]["out_hidden_size"] = 48; },
         "vision_config.out_hidden_size (48) must equal the language model's hidden_size (64)");
  expect([](json& c) { c["vision_config"].erase("intermediate_size"); }, "missing key \"intermediate_size\"");
  // A Qwen2-VL vision_config (embed_dim, hidden_size = LLM width) under model_type qwen2_5_vl.
  expect(
      [](json& c) {
        c["vision_config"].erase("out_hidden_size");
        c["vision_config"]["embed_dim"] = 32;
      },
      "vision_config has Qwen2-VL's \"embed_dim\" but no \"out_hidden_size\"");
  // Omitted optional keys take transformers' defaults (window 112 px, full attention in 7, 15, 23, 31),
  // which a 4-block tower cannot have.
  expect([](json& c) { c["vision_config"].erase("fullatt_block_indexes"); },
         "vision_config.fullatt_block_indexes lists block 7, outside the 4 blocks");
  // The fixture's own config reads back its values.
  ModelConfig ok = load_model_config(fixture(kTiny));
  EXPECT_EQ(ok.model_type, "qwen2_5_vl");
  EXPECT_TRUE(ok.vision.windowed);
  EXPECT_EQ(ok.vision.embed_dim, 32);
  EXPECT_EQ(ok.vision.mlp_hidden, 64);
  EXPECT_EQ(ok.vision.out_hidden_size, 64);
  EXPECT_EQ(ok.vision.window_merged_tokens(), 2);
  EXPECT_EQ(ok.vision.fullatt_block_indexes, (std::vector<int64_t>{1, 3}));
  EXPECT_EQ(ok.vision.hidden_act, "silu");
}

TEST_F(Qwen25Fixture, VideoTokensAreRejected) {
  auto m = Vlm::load(fixture(kTiny));
  const int64_t video = m->config().video_token_id;
  ASSERT_GE(video, 0);
  try {
    m->make_batch({{1, 2, video, 7}}, at::Tensor(), {});
    FAIL() << "expected an error";
  } catch (const mlaforge::Error& e) {
    EXPECT_NE(std::string(e.what()).find("videos are not supported"), std::string::npos) << e.what();
  }
}

// Logits of an image prompt, a two-image prompt and a text prompt in one batch, real positions only.
at::Tensor batch_logits(const Vlm& m) {
  return prompt_logits(m, {fixture_prompt({"square224"}, "What color is the circle?"),
                       fixture_prompt({"wide300x200", "odd70x100"}, "Compare the two images."),
                       fixture_prompt({}, "What is 3 + 4?")});
}

// Conversion keeping every rotary pair reproduces the original: without a latent (--dkv full) and
// with a full-rank latent; the converted model then fine-tunes and loads.
TEST_F(Qwen25Fixture, ConvertAtFullRankIsIdentityAndFinetunes) {
  auto original = Vlm::load(fixture(kTiny));
  at::Tensor want = batch_logits(*original);
  const TextConfig& t = original->config().text;
  TempDir d("q25-convert");
  const std::string direct = convert_quick(fixture(kTiny), d / "direct", -1, -1);
  double err = rel_err(batch_logits(*Vlm::load(direct)), want);
  std::printf("qwen25vl identity (--dkv full, no latent): logits relative error %.2e\n", err);
  EXPECT_LE(err, kTol);
  const int64_t full_dkv = full_rank(t.num_kv_heads * t.head_dim, 0, t.hidden_size, KvLatent::Joint) / t.num_kv_heads;
  const std::string latent = convert_quick(fixture(kTiny), d / "latent", -1, full_dkv);
  auto converted = Vlm::load(latent);
  ASSERT_TRUE(converted->config().mla.enabled);
  EXPECT_EQ(converted->config().family, Family::Qwen25VL);
  err = rel_err(batch_logits(*converted), want);
  std::printf("qwen25vl identity (full-rank latent %lld): logits relative error %.2e\n",
              (long long)(full_dkv * t.num_kv_heads), err);
  EXPECT_LE(err, kTol);

  // Fine-tuning a compressed conversion (4 of 8 pairs, latent 8) against the original as teacher.
  const std::string mla = convert_quick(fixture(kTiny), d / "mla", 4, 4);
  FinetuneOptions o;
  o.model_dir = mla;
  o.teacher_dir = fixture(kTiny);
  o.data_path = source_path("data/shapes-mini/eval.jsonl");
  o.out_dir = d / "ft";
  o.limit = 8;
  o.batch = 4;
  o.steps = 2;
  o.lr = 1e-3;
  o.eval_before = false;
  FinetuneResult r = finetune(o);
  EXPECT_EQ(r.steps, 2);
  EXPECT_TRUE(std::isfinite(r.final_loss));
  EXPECT_GT(r.trainable_parameters, 0);
  auto tuned = Vlm::load(o.out_dir);
  EXPECT_EQ(tuned->config().family, Family::Qwen25VL);
  EXPECT_TRUE(batch_logits(*tuned).isfinite().all().item<bool>());
}

TEST_F(Qwen25Fixture, CliInspectAndGenerate) {
  CommandResult r = run_cli("inspect " + fixture(kTiny));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("qwen2_5_vl (vision: Qwen2.5-VL ViT depth 4 width 32, windows of 56 px, 2 full-attention "
                          "blocks"),
            std::string::npos)
      << r.output;
  r = run_cli("generate --model " + fixture(kTiny) +
              " --max-new-tokens 3 --image tests/fixtures/preprocess/wide300x200.png --prompt '<image>hi'");
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

}  // namespace
