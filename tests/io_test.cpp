// Safetensors, configs and datasets: round trips, both config layouts, and clear errors on bad files.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "io/config.h"
#include "io/dataset.h"
#include "io/safetensors.h"
#include "test_util.h"

using namespace mlaforge;
using namespace mlaforge::test;
namespace fs = std::filesystem;

namespace {

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A raw safetensors file: 8-byte header length, header, data.
std::string raw_safetensors(const std::string& header, size_t data_bytes) {
  uint64_t n = header.size();
  std::string s(reinterpret_cast<const char*>(&n), 8);
  return s + header + std::string(data_bytes, '\0');
}

TEST(Safetensors, RoundTripsDtypes) {
  TempDir d("st");
  at::Tensor a = at::randn({3, 5}), b = at::randn({7}).to(at::kHalf), c = at::randn({2, 2, 2}).to(at::kBFloat16);
  save_safetensors(d / "model.safetensors", {{"a", a}, {"b", b}, {"c", c}}, {{"format", "pt"}});
  WeightStore ws = WeightStore::open_dir(d.path());
  EXPECT_TRUE(ws.load("a").equal(a));
  EXPECT_TRUE(ws.load("b").equal(b.to(at::kFloat)));
  EXPECT_TRUE(ws.load("c", {2, 2, 2}).equal(c.to(at::kFloat)));
  EXPECT_EQ(ws.entry("c").dtype, "BF16");
  EXPECT_TRUE(ws.load("b", {}, at::kHalf).equal(b));
}

TEST(Safetensors, ShardedIndex) {
  const std::string dir = fixture("qwen2vl/tiny-a");
  if (!fs::exists(dir)) GTEST_SKIP();
  WeightStore ws = WeightStore::open_dir(dir);
  EXPECT_TRUE(ws.has("model.embed_tokens.weight"));
  EXPECT_TRUE(ws.has("visual.merger.mlp.2.weight"));
  EXPECT_NE(ws.file_of("lm_head.weight"), ws.file_of("visual.merger.mlp.2.weight"));
}

TEST(Safetensors, Errors) {
  TempDir d("bad");
  const std::string p = d / "x.safetensors";
  write_bytes(p, "abc");
  EXPECT_NE(error_of([&] { SafetensorsFile::open(p); }).find("truncated"), std::string::npos);
  write_bytes(p, raw_safetensors("{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}}", 0).substr(0, 20));
  EXPECT_NE(error_of([&] { SafetensorsFile::open(p); }).find("exceeds the file"), std::string::npos);
  write_bytes(p, raw_safetensors("{not json", 4));
  EXPECT_NE(error_of([&] { SafetensorsFile::open(p); }).find("not valid JSON"), std::string::npos);
  write_bytes(p, raw_safetensors("{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}}", 8));
  std::string e = error_of([&] { SafetensorsFile::open(p); });
  EXPECT_NE(e.find("outside the file"), std::string::npos) << e;
  EXPECT_EQ(e.rfind(p, 0), 0u) << "error names the file first: " << e;
  write_bytes(p, raw_safetensors("{\"a\": {\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 16]}}", 16));
  EXPECT_NE(error_of([&] { SafetensorsFile::open(p); }).find("does not match shape"), std::string::npos);
  write_bytes(p, raw_safetensors("{\"a\": {\"dtype\": \"Q4\", \"shape\": [4], \"data_offsets\": [0, 16]}}", 16));
  EXPECT_NE(error_of([&] { SafetensorsFile::open(p); }).find("unsupported dtype"), std::string::npos);
  EXPECT_NE(error_of([&] { SafetensorsFile::open(d / "none.safetensors"); }).find("cannot open"), std::string::npos);

  save_safetensors(d / "model.safetensors", {{"w", at::zeros({2, 3})}});
  WeightStore ws = WeightStore::open_dir(d.path());
  e = error_of([&] { ws.load("w", {3, 2}); });
  EXPECT_NE(e.find("has shape [2, 3], expected [3, 2]"), std::string::npos) << e;
  EXPECT_NE(error_of([&] { ws.load("missing"); }).find("missing tensor missing"), std::string::npos);
}

TEST(Safetensors, MissingShard) {
  TempDir d("shard");
  save_safetensors(d / "a.safetensors", {{"x", at::zeros({1})}});
  write_bytes(d / "model.safetensors.index.json",
              R"({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}})");
  std::string e = error_of([&] { WeightStore::open_dir(d.path()); });
  EXPECT_NE(e.find("b.safetensors: missing shard"), std::string::npos) << e;
  write_bytes(d / "model.safetensors.index.json", R"({"weight_map": {"z": "a.safetensors"}})");
  e = error_of([&] { WeightStore::open_dir(d.path()); });
  EXPECT_NE(e.find("tensor z is listed"), std::string::npos) << e;
}

TEST(Config, BothLayoutsReadTheSame) {
  if (!fs::exists(fixture("qwen2vl/tiny-a"))) GTEST_SKIP();
  ModelConfig a = load_model_config(fixture("qwen2vl/tiny-a")), b = load_model_config(fixture("qwen2vl/tiny-b"));
  for (const ModelConfig* c : {&a, &b}) {
    EXPECT_EQ(c->text.hidden_size, 64);
    EXPECT_EQ(c->text.num_kv_heads, 2);
    EXPECT_EQ(c->text.head_dim, 16);
    EXPECT_EQ(c->text.mrope_section, (std::vector<int64_t>{2, 3, 3}));
    EXPECT_DOUBLE_EQ(c->text.rope_theta, 1e6);
    EXPECT_EQ(c->vision.embed_dim, 32);
    EXPECT_EQ(c->image_token_id, 5);
    EXPECT_EQ(c->eos_token_ids, std::vector<int64_t>{2});
  }
  ModelConfig s = load_model_config(source_path("models/qwen2vl-shapes"));
  EXPECT_EQ(s.kv_bytes_per_token(2), 2 * 6 * 2 * 64 * 2);
}

TEST(Config, Errors) {
  TempDir d("cfg");
  EXPECT_NE(error_of([&] { load_model_config(d.path()); }).find("config.json: file not found"), std::string::npos);
  write_bytes(d / "config.json", R"({"model_type": "gpt_neox"})");
  EXPECT_NE(error_of([&] { load_model_config(d.path()); }).find("unsupported architecture \"gpt_neox\""),
            std::string::npos);
  std::string cfg = read_bytes(source_path("models/qwen2vl-shapes/config.json"));
  write_bytes(d / "config.json", cfg.replace(cfg.find("\"num_attention_heads\""), 21, "\"num_attention_headz\""));
  EXPECT_NE(error_of([&] { load_model_config(d.path()); }).find("missing key \"num_attention_heads\""),
            std::string::npos);
  write_bytes(d / "config.json", "{");
  EXPECT_NE(error_of([&] { load_model_config(d.path()); }).find("not valid JSON"), std::string::npos);
}

TEST(Dataset, ReadsLlavaJsonl) {
  auto rows = load_conversations(source_path("data/shapes-mini/eval.jsonl"), 5);
  ASSERT_EQ(rows.size(), 5u);
  EXPECT_EQ(rows[0].id, "eval-00000");
  ASSERT_EQ(rows[0].image_paths.size(), 1u);
  EXPECT_TRUE(fs::exists(rows[0].image_paths[0]));
  Prompt p = question_prompt(rows[0]);
  ASSERT_EQ(p.turns.size(), 1u);
  ASSERT_EQ(p.turns[0].items.size(), 2u);
  EXPECT_TRUE(p.turns[0].items[0].is_image);
  EXPECT_EQ(p.turns[0].items[1].text, "Describe the image.");  // the newline after <image> belongs to the marker
  EXPECT_EQ(reference_answer(rows[1]), "a large blue triangle");
}

TEST(Dataset, Errors) {
  TempDir d("data");
  write_bytes(d / "a.jsonl", "{\"id\": 1, \"conversations\": [{\"from\": \"human\", \"value\": \"hi\"}]}\n{oops\n");
  std::string e = error_of([&] { load_conversations(d / "a.jsonl"); });
  EXPECT_NE(e.find("a.jsonl:2: not valid JSON"), std::string::npos) << e;
  write_bytes(d / "b.jsonl",
              "{\"image\": \"x.png\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>\\n<image>\\nhi\"}]}\n");
  e = error_of([&] { load_conversations(d / "b.jsonl"); });
  EXPECT_NE(e.find("b.jsonl:1: more <image> markers (2) than images (1)"), std::string::npos) << e;
  EXPECT_NE(error_of([&] { load_conversations(d / "none.jsonl"); }).find("not found"), std::string::npos);
}

}  // namespace
