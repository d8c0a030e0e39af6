#include "test_util.h"

#include <gtest/gtest.h>

#include "convert/convert.h"
#include "core/error.h"
#include "vision/preprocess.h"

#include <unistd.h>

#include <array>
#include <cstdio>
#include <random>

namespace mlaforge::test {

TempDir::TempDir(const std::string& name) {
  std::random_device rd;
  path_ = (std::filesystem::temp_directory_path() / ("mlaforge-" + name + "-" + std::to_string(getpid()) + "-" +
                                                     std::to_string(rd() % 100000)))
              .string();
  std::filesystem::remove_all(path_);
  std::filesystem::create_directories(path_);
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

CommandResult run_cli(const std::string& args) {
  CommandResult r;
  std::string cmd = std::string("MLAFORGE_NO_PROGRESS=1 ") + MLAFORGE_BINARY + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return {-1, "popen failed"};
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
  int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string convert_quick(const std::string& model, const std::string& out, int64_t rope_pairs, int64_t dkv,
                          bool decoupled) {
  ConvertOptions o;
  o.model_dir = model;
  o.out_dir = out;
  o.calib_path = source_path("data/shapes-mini/calib.jsonl");
  o.calib_samples = 8;
  o.rope_pairs = rope_pairs;
  o.dkv = dkv;
  o.decoupled = decoupled;
  convert_model(o);
  return out;
}


std::vector<std::array<int64_t, 3>> grids_from_sizes(const at::Tensor& sizes, const ModelConfig& cfg) {
  std::vector<std::array<int64_t, 3>> grids;
  const int64_t S = cfg.clip.image_size;
  for (int64_t i = 0; i < sizes.size(0); ++i) {
    const int64_t h = sizes[i][0].item<int64_t>(), w = sizes[i][1].item<int64_t>();
    const auto [bh, bw] = select_best_resolution(h, w, cfg.llava.grid_pinpoints);
    grids.push_back({1 + (bh / S) * (bw / S), h, w});
  }
  return grids;
}

at::Tensor valid_rows(const at::Tensor& x, const at::Tensor& valid) {
  return x.reshape({x.size(0) * x.size(1), -1}).index_select(0, valid.reshape({-1}).nonzero().squeeze(1));
}

Prompt fixture_prompt(const std::vector<std::string>& images, const std::string& question) {
  Prompt p;
  ChatTurn t;
  t.role = "user";
  for (size_t i = 0; i < images.size(); ++i) {
    t.items.push_back({true, ""});
    if (images.size() > 1 && i == 0) t.items.push_back({false, "and then"});
    const bool jpg = images[i].find("photo") != std::string::npos || images[i].find("big") != std::string::npos;
    p.image_paths.push_back(fixture("preprocess/" + images[i] + (jpg ? ".jpg" : ".png")));
  }
  t.items.push_back({false, question});
  p.turns.push_back(t);
  return p;
}

at::Tensor prompt_logits(const Vlm& m, const std::vector<Prompt>& prompts) {
  Batch b = m.prepare(prompts);
  KVCache cache = m.decoder().new_cache(b.batch(), b.length(), at::kCPU);
  return valid_rows(m.decoder().logits(m.prefill(b, cache)), b.valid);
}

void expect_row_ids(const Batch& ours, const std::vector<std::vector<int64_t>>& rows) {
  ASSERT_EQ(ours.batch(), int64_t(rows.size()));
  for (size_t b = 0; b < rows.size(); ++b) {
    at::Tensor row = ours.ids[int64_t(b)].masked_select(ours.valid[int64_t(b)]);
    EXPECT_EQ(std::vector<int64_t>(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + row.numel()), rows[b])
        << "token ids of row " << b;
  }
}

std::string replace_prefix(const std::string& s, const std::string& from, const std::string& to) {
  return s.rfind(from, 0) == 0 ? to + s.substr(from.size()) : s;
}

FixtureCase read_fixture_case(const SafetensorsFile& f, const std::string& name, const ModelConfig& cfg) {
  FixtureCase c;
  at::Tensor ids = f.load(name + ".input_ids", at::kLong), mask = f.load(name + ".attention_mask", at::kLong);
  c.valid = mask.to(at::kBool);
  for (int64_t b = 0; b < ids.size(0); ++b) {
    at::Tensor row = ids[b].masked_select(c.valid[b]);
    c.rows.emplace_back(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + row.numel());
  }
  if (f.has(name + ".pixel_values")) {
    c.pixel_values = f.load(name + ".pixel_values");
    if (f.has(name + ".image_grid_thw")) {
      at::Tensor g = f.load(name + ".image_grid_thw", at::kLong);
      for (int64_t i = 0; i < g.size(0); ++i)
        c.grids.push_back({g[i][0].item<int64_t>(), g[i][1].item<int64_t>(), g[i][2].item<int64_t>()});
    } else {
      const int64_t G = c.pixel_values.size(2) / cfg.clip.patch_size;
      for (int64_t i = 0; i < c.pixel_values.size(0); ++i) c.grids.push_back({1, G, G});
    }
  }
  return c;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const mlaforge::Error& e) {
    return e.what();
  }
  return "";
}

std::string load_error(const std::string& dir) {
  return error_of([&] { Vlm::load(dir); });
}

}  // namespace mlaforge::test
