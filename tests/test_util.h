// Helpers shared by the tests: fixture paths, error norms, temporary directories, running the CLI.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <filesystem>
#include <functional>
#include <string>

#include "io/config.h"
#include "io/safetensors.h"
#include "model/vlm.h"
#include "text/prompt.h"
#include "test_paths.h"

namespace mlaforge::test {

inline std::string source_path(const std::string& rel) { return std::string(MLAFORGE_SOURCE_DIR) + "/" + rel; }
inline std::string fixture(const std::string& rel) { return source_path("tests/fixtures/" + rel); }

// ||a - b|| / ||b|| in float64.
inline double rel_err(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor ad = a.to(at::kDouble), bd = b.to(at::kDouble);
  return (ad - bd).norm().item<double>() / std::max(bd.norm().item<double>(), 1e-30);
}

// A fresh empty directory under the system temp dir, removed by the destructor.
class TempDir {
 public:
  explicit TempDir(const std::string& name);
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& rel) const { return path_ + "/" + rel; }

 private:
  std::string path_;
};

struct CommandResult {
  int exit_code = 0;
  std::string output;  // stdout and stderr together
};
// Valid positions of x [B, T, ...] flattened to [n, ...].
at::Tensor valid_rows(const at::Tensor& x, const at::Tensor& valid);
// As tools/make_fixtures.py's qwen_messages: the images (from fixtures/preprocess), "and then" after the
// first of several, the question.
Prompt fixture_prompt(const std::vector<std::string>& images, const std::string& question);

// The message of the mlaforge::Error that f throws, or "" when it throws none.
std::string error_of(const std::function<void()>& f);
// The error loading a model directory gives, or "".
std::string load_error(const std::string& dir);

// One case of a model fixture (tools/make_fixtures.py): unpadded ids, the mask, and the pixel values
// with their grids (Qwen: image_grid_thw; LLaVA: [n, 3, S, S], one (1, S/P, S/P) grid per image).
struct FixtureCase {
  std::vector<std::vector<int64_t>> rows;  // unpadded ids
  at::Tensor valid;                        // [B, T] as in the fixture
  at::Tensor pixel_values;                 // undefined for text only
  std::vector<std::array<int64_t, 3>> grids;
};
FixtureCase read_fixture_case(const SafetensorsFile& f, const std::string& name, const ModelConfig& cfg);

// Logits of prompts run through m's prefill in one left-padded batch, real positions only: [n, vocab].
at::Tensor prompt_logits(const Vlm& m, const std::vector<Prompt>& prompts);
// Expects each row of `ours` (without its padding) to hold the ids `rows`.
void expect_row_ids(const Batch& ours, const std::vector<std::vector<int64_t>>& rows);
// s with a leading `from` replaced by `to` (weight renaming).
std::string replace_prefix(const std::string& s, const std::string& from, const std::string& to);

// LLaVA-NeXT: per image (tiles, height, width) from the processor's image_sizes [n, 2], the batch's grids.
std::vector<std::array<int64_t, 3>> grids_from_sizes(const at::Tensor& sizes, const ModelConfig& cfg);

// Runs the mlaforge binary with `args` (shell-quoted by the caller).
CommandResult run_cli(const std::string& args);

// Converts `model` to MLA in `out` (8 calibration rows of the bundled calib set, whitened, joint);
// returns `out`.
std::string convert_quick(const std::string& model, const std::string& out, int64_t rope_pairs, int64_t dkv,
                          bool decoupled = true);

}  // namespace mlaforge::test
