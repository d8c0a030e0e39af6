// The command line: each bad input gives one line "error: <file>: <problem>" and a non-zero exit,
// never a crash; inspect and generate work on the bundled model.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "io/safetensors.h"
#include "test_util.h"

using namespace mlaforge;
using namespace mlaforge::test;
namespace fs = std::filesystem;

namespace {

// A copy of the tiny sharded fixture checkpoint we may break.
std::string copy_tiny(const TempDir& d) {
  fs::copy(fixture("qwen2vl/tiny-a"), d / "m", fs::copy_options::recursive);
  return d / "m";
}

void expect_one_line_error(const CommandResult& r, const std::string& must_contain) {
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_EQ(r.output.rfind("error: ", 0), 0u) << r.output;
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << "one line: " << r.output;
  EXPECT_NE(r.output.find(must_contain), std::string::npos) << r.output;
}

const std::string kImage = "tests/fixtures/preprocess/square224.png";

std::string generate_args(const std::string& model, const std::string& rest) {
  return "generate --model " + model + " --max-new-tokens 2 " + rest;
}

class CliErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(fixture("qwen2vl/tiny-a"))) GTEST_SKIP();
  }
};

TEST_F(CliErrors, MissingShard) {
  TempDir d("cli");
  std::string m = copy_tiny(d);
  fs::remove(m + "/model-00002-of-00004.safetensors");
  expect_one_line_error(run_cli("inspect " + m), "model-00002-of-00004.safetensors: missing shard");
}

TEST_F(CliErrors, TruncatedSafetensors) {
  TempDir d("cli");
  std::string m = copy_tiny(d), f = m + "/model-00001-of-00004.safetensors";
  fs::resize_file(f, fs::file_size(f) / 2);
  expect_one_line_error(run_cli("inspect " + m), f + ": tensor ");
}

TEST_F(CliErrors, CorruptHeader) {
  TempDir d("cli");
  std::string m = copy_tiny(d), f = m + "/model-00001-of-00004.safetensors";
  {
    std::fstream io(f, std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(8);
    io.write("#garbage#", 9);
  }
  expect_one_line_error(run_cli("inspect " + m), f + ": corrupt safetensors header");
}

TEST_F(CliErrors, HeaderPointsOutsideFile) {
  TempDir d("cli");
  std::string m = copy_tiny(d), f = m + "/model-00001-of-00004.safetensors";
  {
    // Header length far beyond the file size.
    std::fstream io(f, std::ios::in | std::ios::out | std::ios::binary);
    uint64_t huge = uint64_t(1) << 40;
    io.write(reinterpret_cast<const char*>(&huge), 8);
  }
  expect_one_line_error(run_cli("inspect " + m), f + ": corrupt safetensors header: header length");
}

TEST_F(CliErrors, WrongTensorShape) {
  TempDir d("cli");
  fs::copy(fixture("qwen2vl/tiny-b"), d / "m", fs::copy_options::recursive);
  std::string f = d / "m/model.safetensors";
  std::map<std::string, at::Tensor> tensors;
  {
    auto st = SafetensorsFile::open(f);
    for (auto& [name, e] : st->entries()) tensors[name] = st->load(name, at::kBFloat16);
  }
  tensors["model.language_model.layers.0.self_attn.o_proj.weight"] =
      tensors["model.language_model.layers.0.self_attn.o_proj.weight"].narrow(1, 0, 32).contiguous();
  save_safetensors(f, tensors);
  expect_one_line_error(run_cli("inspect " + d / "m"),
                        "model.language_model.layers.0.self_attn.o_proj.weight has shape [64, 32], expected [64, 64]");
}

TEST_F(CliErrors, UnknownArchitecture) {
  TempDir d("cli");
  std::string m = copy_tiny(d);
  std::ifstream in(m + "/config.json");
  std::string cfg((std::istreambuf_iterator<char>(in)), {});
  cfg.replace(cfg.find("\"qwen2_vl\""), 10, "\"mamba_vl\"");
  std::ofstream(m + "/config.json") << cfg;
  expect_one_line_error(run_cli("inspect " + m), "config.json: unsupported architecture \"mamba_vl\"");
}

TEST_F(CliErrors, MissingImage) {
  expect_one_line_error(run_cli(generate_args(fixture("qwen2vl/tiny-a"), "--image /nonexistent/x.png --prompt '<image>hi'")),
                        "/nonexistent/x.png");
}

TEST_F(CliErrors, CorruptImage) {
  TempDir d("cli");
  std::ofstream(d / "bad.png") << "\x89PNG\r\n\x1a\n this is not really a png";
  expect_one_line_error(run_cli(generate_args(fixture("qwen2vl/tiny-a"), "--image " + d / "bad.png" + " --prompt '<image>hi'")),
                        d / "bad.png");
}

TEST_F(CliErrors, MoreImageMarkersThanImages) {
  expect_one_line_error(
      run_cli(generate_args(fixture("qwen2vl/tiny-a"), "--image " + kImage + " --prompt '<image><image>two?'")),
      "2 <image> markers for 1 --image files");
  TempDir d("cli");
  std::ofstream(d / "q.jsonl") << "{\"id\": \"a\", \"image\": \"x.png\", \"conversations\": [{\"from\": \"human\", "
                                  "\"value\": \"<image>\\n<image>\\nhi\"}, {\"from\": \"gpt\", \"value\": \"x\"}]}\n";
  expect_one_line_error(run_cli("eval --model " + fixture("qwen2vl/tiny-a") + " --data " + d / "q.jsonl"),
                        d / "q.jsonl:1: more <image> markers (2) than images (1)");
}

TEST(Cli, InspectAndGenerateOnBundledModel) {
  CommandResult r = run_cli("inspect models/qwen2vl-shapes");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("3072 bytes/token in bf16"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("12.74M total"), std::string::npos) << r.output;
  // --model, as every other command spells it, names the same directory.
  const CommandResult flagged = run_cli("inspect --model models/qwen2vl-shapes");
  ASSERT_EQ(flagged.exit_code, 0) << flagged.output;
  EXPECT_EQ(flagged.output, r.output);
  r = run_cli("generate --model models/qwen2vl-shapes --image data/shapes-mini/images/eval/00001.png "
              "--prompt '<image>\nWhat is in the bottom right?'");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output, "a large blue triangle\n");
  r = run_cli("eval --model models/qwen2vl-shapes --data data/shapes-mini/eval.jsonl --limit 1");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(run_cli("--help").exit_code, 0);
  EXPECT_NE(run_cli("frobnicate").exit_code, 0);
}

}  // namespace
