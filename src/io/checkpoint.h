// Writing checkpoints: weights in safetensors shards written as they come (never the whole model in
// memory), and the small files of a model directory copied beside them.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace mlaforge {

class WeightStore;

// Collects tensors into shards of about `limit` bytes and writes each as it fills; finish() names
// them model-0000i-of-0000n.safetensors with model.safetensors.index.json, or model.safetensors
// when there is one.
class ShardWriter {
 public:
  ShardWriter(std::string dir, int64_t limit = int64_t(2) << 30);
  void add(const std::string& name, const at::Tensor& t);
  // Adds every tensor of `store` that `keep` accepts, in its stored dtype and bit for bit.
  void copy_from(const WeightStore& store, const std::function<bool(const std::string&)>& keep);
  void finish();

 private:
  void flush();
  std::string dir_;
  int64_t limit_, bytes_ = 0, total_ = 0;
  std::map<std::string, at::Tensor> pending_;
  std::vector<std::pair<std::string, std::vector<std::string>>> files_;  // temporary file, its tensors
};

// Copies the non-weight files of a model directory (tokenizer, chat template, processor and
// generation configs, ...) to `dst`, except config.json (the caller writes its own), weights, and
// training logs (*.csv, *.png).
void copy_model_files(const std::string& src, const std::string& dst);

}  // namespace mlaforge
