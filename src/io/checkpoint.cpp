#include "io/checkpoint.h"

#include <ATen/ATen.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/safetensors.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace mlaforge {

ShardWriter::ShardWriter(std::string dir, int64_t limit) : dir_(std::move(dir)), limit_(limit) {}

void ShardWriter::add(const std::string& name, const at::Tensor& t) {
  pending_[name] = t.detach().to(at::kCPU).contiguous();
  bytes_ += t.numel() * t.element_size();
  if (bytes_ >= limit_) flush();
}

void ShardWriter::copy_from(const WeightStore& store, const std::function<bool(const std::string&)>& keep) {
  for (const auto& name : store.names())
    if (keep(name)) add(name, store.load_stored(name));
}

void ShardWriter::flush() {
  if (pending_.empty()) return;
  std::string tmp = dir_ + "/.shard-" + std::to_string(files_.size()) + ".safetensors";
  save_safetensors(tmp, pending_, {{"format", "pt"}});
  std::vector<std::string> names;
  for (auto& kv : pending_) names.push_back(kv.first);
  files_.push_back({tmp, names});
  total_ += bytes_;
  pending_.clear();
  bytes_ = 0;
}

void ShardWriter::finish() {
  flush();
  const size_t n = files_.size();
  // Old weights of another layout in the same directory would confuse loading.
  fs::remove(dir_ + "/model.safetensors.index.json");
  if (n == 1) {
    fs::rename(files_[0].first, dir_ + "/model.safetensors");
    return;
  }
  fs::remove(dir_ + "/model.safetensors");
  json index = {{"metadata", {{"total_size", total_}}}, {"weight_map", json::object()}};
  for (size_t i = 0; i < n; ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, n);
    fs::rename(files_[i].first, dir_ + "/" + name);
    for (const auto& t : files_[i].second) index["weight_map"][t] = name;
  }
  std::ofstream(dir_ + "/model.safetensors.index.json") << index.dump(1) << "\n";
}

void copy_model_files(const std::string& src, const std::string& dst) {
  for (const auto& e : fs::directory_iterator(src)) {
    const std::string name = e.path().filename().string();
    if (name == "config.json" || name.find(".safetensors") != std::string::npos || !e.is_regular_file() ||
        e.path().extension() == ".csv" || e.path().extension() == ".png")
      continue;
    fs::copy_file(e.path(), fs::path(dst) / name, fs::copy_options::overwrite_existing);
  }
}

}  // namespace mlaforge
