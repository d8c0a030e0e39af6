// LLaVA-NeXT (llava_next) against transformers 5.17 fixtures (tests/fixtures/llava_next/, made on the
// GPU machine): anyres preprocessing, packed image features, logits, hidden states and greedy tokens
// of tiny Llama-3 and Mistral checkpoints; prompt rendering and tokenization; config errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "infer/generate.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "model/vlm.h"
#include "test_util.h"
#include "vision/image.h"
#include "vision/preprocess.h"

using namespace mlaforge;
using namespace mlaforge::test;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

constexpr double kTol = 1e-4;
using Pair = std::pair<int64_t, int64_t>;

// llava-hf/llava-v1.6-*'s pinpoints, (height, width).
const std::vector<std::array<int64_t, 2>> kHubPinpoints = {{336, 672}, {672, 336}, {672, 672}, {1008, 336}, {336, 1008}};

TEST(LlavaNextAnyres, SelectBestResolution) {
  // 480x640 (h x w): 672x672 keeps all 307200 pixels (scale 1.05); the 336-high ones keep 448x336.
  EXPECT_EQ(select_best_resolution(480, 640, kHubPinpoints), Pair(672, 672));
  // A wide strip: 1008 wide keeps the most.
  EXPECT_EQ(select_best_resolution(100, 1000, kHubPinpoints), Pair(336, 1008));
  // A tiny image fits every pinpoint whole (effective = its own area): the least waste wins.
  EXPECT_EQ(select_best_resolution(20, 30, kHubPinpoints), Pair(336, 672));
  // A tall strip: 1008 high keeps 90000 of its pixels, 672x336 only 74x672.
  EXPECT_EQ(select_best_resolution(900, 100, kHubPinpoints), Pair(1008, 336));
  // Equal effective and waste: the first listed.
  EXPECT_EQ(select_best_resolution(10, 10, {{84, 42}, {42, 84}}), Pair(84, 42));
}

TEST(LlavaNextAnyres, ResizeSizeKeepsAspect) {
  // get_patch_output_size: the limiting side takes the target's, the other ceil(side * scale).
  EXPECT_EQ(anyres_resize_size(480, 640, 672, 672), std::make_pair(504, 672));
  EXPECT_EQ(anyres_resize_size(100, 70, 84, 42), std::make_pair(60, 42));   // 100 * 0.6 = 60
  EXPECT_EQ(anyres_resize_size(250, 333, 84, 84), std::make_pair(64, 84));  // ceil(63.06)
  EXPECT_EQ(anyres_resize_size(200, 300, 42, 84), std::make_pair(42, 63));
}

TEST(LlavaNextAnyres, UnpadRoundsLikeTransformers) {
  // 480x640 into a 48x48 grid: 36 rows of image, 6 of padding each side.
  EXPECT_EQ(anyres_unpadded_grid(480, 640, 48, 48), Pair(36, 48));
  // Portrait: columns are cut.
  EXPECT_EQ(anyres_unpadded_grid(640, 480, 48, 48), Pair(48, 36));
  // 55 * (24 / 88) is 14.999999999999998 in doubles; round(x, 7) makes it 15, so the padding is
  // (24 - 15) // 2 = 4 a side and 16 rows stay (plain truncation would give 14).
  EXPECT_EQ(anyres_unpadded_grid(55, 88, 24, 24), Pair(16, 24));
  // Same aspect as the grid: nothing is cut.
  EXPECT_EQ(anyres_unpadded_grid(100, 200, 24, 48), Pair(24, 48));
}

TEST(LlavaNextAnyres, TokenCount) {
  // llava-v1.6 (336 px tiles of 24x24 patches) on 480x640: 576 base + 36 rows of (48 + newline).
  EXPECT_EQ(llava_next_image_tokens(480, 640, kHubPinpoints, 336, 14), 576 + 36 * 49);
  // A square image on the 2x2 grid: nothing is cut.
  EXPECT_EQ(llava_next_image_tokens(500, 500, kHubPinpoints, 336, 14), 576 + 48 * 49);
}

TEST(LlavaNextAnyres, TilesArePaddedCentredAndRowMajor) {
  // A 30 (h) x 84 (w) image on pinpoints [[42, 84]]: stays 30x84 (scale 1), padded 6 rows above and
  // 6 below to 42x84, cut into two 42x42 tiles after the base tile.
  Image img;
  img.width = 84;
  img.height = 30;
  img.rgb.resize(size_t(84) * 30 * 3);
  for (int y = 0; y < 30; ++y)
    for (int x = 0; x < 84; ++x)
      for (int c = 0; c < 3; ++c) img.rgb[(size_t(y) * 84 + x) * 3 + c] = uint8_t(1 + (x + 2 * y + c) % 250);
  ClipImageConfig cfg;
  cfg.shortest_edge = 42;
  cfg.crop_h = cfg.crop_w = 42;
  cfg.grid_pinpoints = {{42, 84}};
  const std::vector<Image> tiles = llava_next_tiles(img, cfg);
  ASSERT_EQ(tiles.size(), 3u);
  for (const Image& t : tiles) {
    EXPECT_EQ(t.width, 42);
    EXPECT_EQ(t.height, 42);
  }
  auto px = [](const Image& t, int y, int x, int c) { return int(t.rgb[(size_t(y) * t.width + x) * 3 + c]); };
  for (int tile = 0; tile < 2; ++tile)
    for (int y = 0; y < 42; ++y)
      for (int x = 0; x < 42; ++x) {
        const int sy = y - 6, sx = x + 42 * tile;
        const int want = sy < 0 || sy >= 30 ? 0 : px(img, sy, sx, 1);
        ASSERT_EQ(px(tiles[size_t(1 + tile)], y, x, 1), want) << "tile " << tile << " at " << y << "," << x;
      }
  // Padding is black before normalisation: -mean/std after it.
  int64_t n = 0;
  const std::vector<float> v = llava_next_preprocess(img, cfg, &n);
  ASSERT_EQ(n, 3);
  ASSERT_EQ(v.size(), size_t(3) * 3 * 42 * 42);
  const float pad_red = v[size_t(1) * 3 * 42 * 42];  // tile 1, red, (0, 0)
  EXPECT_NEAR(pad_red, -kClipMean[0] / kClipStd[0], 1e-5);
}

// ---------------------------------------------------------------------------------------------
// The tiny checkpoints against transformers
// ---------------------------------------------------------------------------------------------
std::string model_dir(const std::string& variant) { return fixture("llava_next/llava-next-" + variant); }




json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

class LlavaNextModels : public ::testing::TestWithParam<std::string> {};

TEST_P(LlavaNextModels, MatchTransformers) {
  const std::string variant = GetParam(), dir = model_dir(variant);
  auto m = Vlm::load(dir);
  const ModelConfig& cfg = m->config();
  ASSERT_TRUE(cfg.llava.anyres());
  auto f = SafetensorsFile::open(dir + ".safetensors");
  const json meta = read_json(dir + ".cases.json");
  const ChatFormat chat = ChatFormat::from_model_dir(dir);
  int cases = 0;
  for (const json& jc : meta["cases"]) {
    const std::string name = jc["name"];
    SCOPED_TRACE(variant + "/" + name);
    at::Tensor ids = f->load(name + ".input_ids", at::kLong);
    const at::Tensor valid = f->load(name + ".attention_mask", at::kLong).to(at::kBool);
    std::vector<std::vector<int64_t>> rows;
    for (int64_t b = 0; b < ids.size(0); ++b) {
      at::Tensor r = ids[b].masked_select(valid[b]);
      rows.emplace_back(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + r.numel());
    }
    at::Tensor pixels;  // [n, max_tiles, 3, S, S], zero tiles past each image's own
    std::vector<std::array<int64_t, 3>> grids;
    if (f->has(name + ".pixel_values")) {
      pixels = f->load(name + ".pixel_values");
      grids = test::grids_from_sizes(f->load(name + ".image_sizes", at::kLong), cfg);
    }

    // Rendering, tokenization and image token expansion give the processor's ids.
    std::vector<Prompt> prompts;
    for (size_t i = 0; i < jc["questions"].size(); ++i) {
      prompts.push_back(fixture_prompt(jc["images"][i].get<std::vector<std::string>>(), jc["questions"][i]));
      EXPECT_EQ(chat.render(prompts.back().turns), jc["prompts"][i].get<std::string>()) << "prompt " << i;
    }
    Batch ours = m->prepare(prompts);
    expect_row_ids(ours, rows);
    EXPECT_EQ((ids == cfg.image_token_id).sum().item<int64_t>(), jc["image_tokens"].get<int64_t>());

    // Our anyres preprocessing gives the processor's pixel values within one grey level.
    ASSERT_EQ(ours.grids, grids);
    if (pixels.defined()) {
      std::vector<at::Tensor> own;
      for (size_t i = 0; i < grids.size(); ++i) own.push_back(pixels[int64_t(i)].narrow(0, 0, grids[i][0]));
      at::Tensor want = at::cat(own, 0);  // [tiles, 3, S, S]
      ASSERT_EQ(ours.pixel_values.sizes(), want.sizes());
      // One grey level is 1/255/std in normalised units, per channel.
      at::Tensor std_ = at::tensor(std::vector<float>(kClipStd, kClipStd + 3)).view({1, 3, 1, 1});
      const double grey = ((ours.pixel_values - want).abs() * std_ * 255.0).max().item<double>();
      std::printf("%s/%s: pixel_values max diff %.4f grey levels over %lld tiles\n", variant.c_str(), name.c_str(), grey,
                  (long long)want.size(0));
      EXPECT_LE(grey, 1.0 + 1e-3);
      // Pillow's bicubic (the processor's pil backend) stays within one grey level of the same values.
      ClipImageConfig pil = load_clip_image_config(image_processor_config_path(dir));
      pil.backend = ResizeBackend::Pil;
      std::vector<at::Tensor> pil_tiles;
      for (const Prompt& p : prompts)
        for (const std::string& path : p.image_paths) {
          int64_t n = 0;
          std::vector<float> v = llava_next_preprocess(load_image(path), pil, &n);
          pil_tiles.push_back(at::from_blob(v.data(), {n, 3, want.size(2), want.size(3)}, at::kFloat).clone());
        }
      const double pil_grey = ((at::cat(pil_tiles, 0) - want).abs() * std_ * 255.0).max().item<double>();
      std::printf("%s/%s: pil backend max diff %.4f grey levels\n", variant.c_str(), name.c_str(), pil_grey);
      EXPECT_LE(pil_grey, 1.0 + 1e-3);
    }

    // The model fed the processor's ids and pixel values.
    Batch batch = m->make_batch(rows, pixels, grids);
    ASSERT_TRUE(batch.valid.equal(valid));
    if (pixels.defined()) {
      const double err = rel_err(m->image_features(batch.pixel_values, grids), f->load(name + ".image_embeds"));
      std::printf("%s/%s: image features relative error %.2e\n", variant.c_str(), name.c_str(), err);
      EXPECT_LE(err, kTol) << "image features";
    }
    KVCache cache = m->decoder().new_cache(batch.batch(), batch.length(), at::kCPU);
    std::vector<at::Tensor> hidden;
    ForwardTaps taps;
    taps.hidden = &hidden;
    at::Tensor logits = m->decoder().logits(m->prefill(batch, cache, taps));
    const double logit_err = rel_err(valid_rows(logits, valid), valid_rows(f->load(name + ".logits"), valid));
    std::printf("%s/%s: logits relative error %.2e\n", variant.c_str(), name.c_str(), logit_err);
    EXPECT_LE(logit_err, kTol) << "logits";
    const at::Tensor ref_hidden = f->load(name + ".hidden_states");
    ASSERT_EQ(int64_t(hidden.size()), ref_hidden.size(0));
    for (size_t l = 0; l < hidden.size(); ++l)
      EXPECT_LE(rel_err(valid_rows(hidden[l], valid), valid_rows(ref_hidden[int64_t(l)], valid)), kTol)
          << "hidden state " << l;

    // Greedy decoding with the KV cache gives transformers' tokens, up to its first stop token.
    SamplingOptions so;
    so.max_new_tokens = 8;
    const auto gens = generate(*m, batch, so);
    const at::Tensor ref_gen = f->load(name + ".generated", at::kLong);
    const auto& eos = cfg.eos_token_ids;
    for (size_t b = 0; b < gens.size(); ++b) {
      std::vector<int64_t> want;
      for (int64_t i = 0; i < ref_gen.size(1); ++i) {
        const int64_t t = ref_gen[int64_t(b)][i].item<int64_t>();
        if (std::find(eos.begin(), eos.end(), t) != eos.end()) break;
        want.push_back(t);
      }
      EXPECT_EQ(gens[b].tokens, want) << "generated tokens of row " << b;
    }
    ++cases;
  }
  EXPECT_EQ(cases, 4);
}

INSTANTIATE_TEST_SUITE_P(LlavaNext, LlavaNextModels, ::testing::Values("llama3", "mistral"),
                         [](const auto& info) { return info.param; });

// ---------------------------------------------------------------------------------------------
// Weight layouts, errors, chat formats, the command line
// ---------------------------------------------------------------------------------------------
at::Tensor single_logits(const Vlm& m) {
  return prompt_logits(m, {fixture_prompt({"wide300x200"}, "What is this?")});
}

TEST(LlavaNextLoad, InMemoryWeightNames) {
  // The fixtures have the Hub names (language_model.model.*, vision_tower.*, image_newline);
  // transformers' in-memory names (model.language_model.*, lm_head, model.vision_tower.*,
  // model.multi_modal_projector.*, model.image_newline) must give the same model.
  const std::string src = model_dir("llama3");
  TempDir d("llava-next-mem");
  fs::copy(src, d / "m", fs::copy_options::recursive);
  auto st = SafetensorsFile::open(src + "/model.safetensors");
  std::map<std::string, at::Tensor> renamed;
  for (auto& [name, e] : st->entries()) {
    std::string r = replace_prefix(name, "language_model.model.", "model.language_model.");
    r = replace_prefix(r, "language_model.lm_head.", "lm_head.");
    r = replace_prefix(r, "vision_tower.", "model.vision_tower.");
    r = replace_prefix(r, "multi_modal_projector.", "model.multi_modal_projector.");
    r = replace_prefix(r, "image_newline", "model.image_newline");
    renamed[r] = st->load(name);
  }
  ASSERT_TRUE(renamed.count("model.image_newline"));
  save_safetensors(d / "m/model.safetensors", renamed);
  EXPECT_TRUE(single_logits(*Vlm::load(d / "m")).equal(single_logits(*Vlm::load(src))));
}

TEST(LlavaNextLoad, BadConfigErrors) {
  TempDir d("llava-next-cfg");
  fs::copy(model_dir("llama3"), d / "m", fs::copy_options::recursive);
  const std::string cfg_path = d / "m/config.json";
  const json cfg = read_json(cfg_path);
  auto error_with = [&](const std::function<void(json&)>& edit) {
    json bad = cfg;
    edit(bad);
    std::ofstream(cfg_path) << bad.dump();
    return load_error(d / "m");
  };
  auto expect_has = [](const std::string& e, const std::string& want) {
    EXPECT_NE(e.find(want), std::string::npos) << "error: \"" << e << "\" lacks \"" << want << "\"";
  };
  expect_has(error_with([](json& j) { j.erase("image_grid_pinpoints"); }),
             "config.json: llava_next needs \"image_grid_pinpoints\"");
  expect_has(error_with([](json& j) { j["image_grid_pinpoints"] = json::array({json::array({42, 50})}); }),
             "config.json: image_grid_pinpoints entry [42, 50] is not a positive multiple of the vision tower's image_size 42");
  expect_has(error_with([](json& j) { j["image_grid_pinpoints"] = json::array({42, 84}); }),
             "config.json: image_grid_pinpoints entries must be [height, width] integer pairs");
  expect_has(error_with([](json& j) { j["vision_config"]["model_type"] = "siglip_vision_model"; }),
             "config.json: unsupported vision tower \"siglip_vision_model\"");
  expect_has(error_with([](json& j) { j["vision_feature_select_strategy"] = "full"; }),
             "config.json: vision_feature_select_strategy \"full\" is not supported for llava_next");
  expect_has(error_with([](json& j) { j["model_type"] = "llava_next_video"; }),
             "config.json: unsupported architecture \"llava_next_video\" (video inputs are not supported");
  expect_has(error_with([](json& j) { j["text_config"]["model_type"] = "gemma"; }),
             "config.json: unsupported llava text model \"gemma\"");
  expect_has(error_with([](json& j) {
               j["text_config"]["model_type"] = "mistral";
               j["text_config"]["sliding_window"] = 256;
             }),
             "config.json: text_config.sliding_window 256 is shorter than max_position_embeddings 1024");
  // The processor must tile with the model's pinpoints.
  std::ofstream(cfg_path) << cfg.dump();
  const std::string proc_path = d / "m/processor_config.json";
  json proc = read_json(proc_path);
  proc["image_processor"]["image_grid_pinpoints"] = json::array({json::array({42, 84})});
  std::ofstream(proc_path) << proc.dump();
  expect_has(load_error(d / "m"), "processor_config.json: image_grid_pinpoints differ from config.json's");
  // A checkpoint without the newline weight.
  fs::copy(model_dir("llama3") + "/processor_config.json", proc_path, fs::copy_options::overwrite_existing);
  auto st = SafetensorsFile::open(model_dir("llama3") + "/model.safetensors");
  std::map<std::string, at::Tensor> tensors;
  for (auto& [name, e] : st->entries())
    if (name != "image_newline") tensors[name] = st->load(name);
  save_safetensors(d / "m/model.safetensors", tensors);
  expect_has(load_error(d / "m"), "missing tensor for the LLaVA-NeXT image_newline (looked for image_newline, "
                                  "model.image_newline)");
}

TEST(LlavaNextLoad, ImageTokenCountMustMatchFeatures) {
  auto m = Vlm::load(model_dir("mistral"));
  const int64_t img = m->config().image_token_id;
  // A 224x224 image: 2x2 tiles of 3x3 patches, 9 base + 6 rows of (6 + newline) = 51 tokens.
  const std::vector<std::array<int64_t, 3>> grids = {{5, 224, 224}};
  at::Tensor pixels = at::zeros({5, 3, 42, 42});
  std::vector<int64_t> ids = {1, 10, 11};
  ids.insert(ids.end(), 50, img);
  try {
    m->make_batch({ids}, pixels, grids);
    FAIL() << "expected an error";
  } catch (const mlaforge::Error& e) {
    EXPECT_NE(std::string(e.what()).find("image token count (50 in row 0) does not match the image features"),
              std::string::npos) << e.what();
  }
  ids.push_back(img);
  Batch b = m->make_batch({ids}, pixels, grids);
  EXPECT_EQ(m->image_features(b.pixel_values, b.grids).size(0), 51);
  // Too few tiles for the image's grid.
  try {
    m->image_features(pixels.narrow(0, 0, 3), {{3, 224, 224}});
    FAIL() << "expected an error";
  } catch (const mlaforge::Error& e) {
    EXPECT_NE(std::string(e.what()).find("an image of 224x224 needs 1 + 2x2 tiles"), std::string::npos) << e.what();
  }
}

TEST(LlavaNextChat, TemplatesRecognised) {
  const ChatFormat llama = ChatFormat::from_model_dir(model_dir("llama3"));
  EXPECT_EQ(llama.family(), ChatFormat::Family::kLlama3);
  EXPECT_EQ(llama.image_placeholder(), "<image>\n");
  const ChatFormat mistral = ChatFormat::from_model_dir(model_dir("mistral"));
  EXPECT_EQ(mistral.family(), ChatFormat::Family::kMistral);
  // A whole conversation (no generation prompt): assistant turns as the templates write them.
  std::vector<ChatTurn> conv = {{"user", {{true, ""}, {false, "Hi?"}}}, {"assistant", {{false, "Hello."}}}};
  EXPECT_EQ(llama.render(conv, false),
            "<|start_header_id|>user<|end_header_id|>\n\n<image>\nHi?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>");
  EXPECT_EQ(mistral.render(conv, false), "[INST] <image>\nHi? [/INST] Hello.</s>");
  // The Mistral template has no system branch and no generation prompt.
  std::vector<ChatTurn> with_system = {{"system", {{false, "Be brief."}}}, {"user", {{false, "Hi?"}}}};
  EXPECT_EQ(mistral.render(with_system, true), "[INST] Hi? [/INST]");
  EXPECT_EQ(llama.render(with_system, true),
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  // A Llama-3 template that writes its own BOS and trims texts.
  const ChatFormat bos = ChatFormat::from_template(
      "{% for message in messages %}{% if loop.index0 == 0 %}{{ '<|begin_of_text|>' }}{% endif %}"
      "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
      "'<|eot_id|>' }}{% endfor %}",
      "t.jinja");
  EXPECT_EQ(bos.render({{"user", {{false, "  Hi?\n"}}}}, true),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

// llava-hf's own LLaVA-NeXT templates (as stored in JSON: "\\n" is the Jinja escape).
const char* kHubLlama3Template =
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] + '<|eot_id|>' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";
const char* kHubMistralTemplate =
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + "
    "message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif "
    "message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

TEST(LlavaNextChat, HubTemplates) {
  const std::vector<ChatTurn> conv = {{"system", {{false, "Be brief."}}},
                                      {"user", {{true, ""}, {false, "Hi?"}}},
                                      {"assistant", {{false, "Hello."}}},
                                      {"user", {{false, "And?"}}}};
  const ChatFormat llama = ChatFormat::from_template(kHubLlama3Template, "llama3.json");
  EXPECT_EQ(llama.family(), ChatFormat::Family::kLlama3);
  EXPECT_EQ(llama.image_placeholder(), "<image>");
  EXPECT_EQ(llama.render(conv, true),
            "<|start_header_id|>system<|end_header_id|>\n\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n<image>\nHi?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n\nHello.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n\nAnd?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  const ChatFormat mistral = ChatFormat::from_template(kHubMistralTemplate, "mistral.json");
  EXPECT_EQ(mistral.family(), ChatFormat::Family::kMistral);
  EXPECT_EQ(mistral.image_placeholder(), "<image>\n");
  EXPECT_EQ(mistral.render(conv, true),
            "<<SYS>>\nBe brief.\n<</SYS>>\n\n[INST] <image>\nHi? [/INST] Hello.</s> [INST] And? [/INST]");
}

TEST(LlavaNextCli, GenerateAndEval) {
  // `mlaforge generate` renders, tiles and expands the prompt itself: its answer is the fixture's
  // greedy tokens for the same question and image.
  const std::string dir = model_dir("llama3");
  auto m = Vlm::load(dir);
  auto f = SafetensorsFile::open(dir + ".safetensors");
  at::Tensor gen = f->load("single.generated", at::kLong)[0];
  std::vector<int32_t> want;
  for (int64_t i = 0; i < gen.size(0); ++i) {
    const int64_t t = gen[i].item<int64_t>();
    if (std::find(m->config().eos_token_ids.begin(), m->config().eos_token_ids.end(), t) !=
        m->config().eos_token_ids.end())
      break;
    want.push_back(int32_t(t));
  }
  CommandResult r = run_cli("generate --model " + dir + " --max-new-tokens 8 --image " +
                            fixture("preprocess/square224.png") + " --prompt '<image>\nWhat color is the circle?'");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output, m->tokenizer().decode(want) + "\n");
  // eval over real rows (images of other sizes, batched).
  r = run_cli("eval --model " + model_dir("mistral") + " --data " + source_path("data/shapes-mini/eval.jsonl") + " --limit 3");
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

}  // namespace
