// Safetensors reading (memory-mapped, every header bound checked) and writing.
//
// A checkpoint is a directory holding either model.safetensors or shards listed in
// model.safetensors.index.json; WeightStore hides the difference.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace mlaforge {

struct TensorEntry {
  std::string dtype;           // safetensors dtype name: "BF16", "F16", "F32", ...
  std::vector<int64_t> shape;  // row-major
  uint64_t begin = 0, end = 0; // byte range inside the data section
};

// One .safetensors file, mapped read-only. Opening checks the header completely:
// its length, JSON, dtypes, and that every tensor's byte range lies inside the file
// and matches its shape.
class SafetensorsFile {
 public:
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool has(const std::string& name) const { return entries_.count(name) != 0; }
  // Copies the tensor out of the mapping, converted to `dtype` (default: float32).
  at::Tensor load(const std::string& name, at::ScalarType dtype = at::kFloat) const;
  at::Tensor load_stored(const std::string& name) const;  // in its own dtype

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data section
  std::map<std::string, TensorEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

// All weights of a checkpoint directory (single file or sharded).
class WeightStore {
 public:
  static WeightStore open_dir(const std::string& dir);

  const std::string& dir() const { return dir_; }
  bool has(const std::string& name) const { return where_.count(name) != 0; }
  std::vector<std::string> names() const;
  const TensorEntry& entry(const std::string& name) const;
  // Loads `name` as `dtype`; when `expected_shape` is non-empty, a different shape is an error
  // naming the file, the tensor and both shapes.
  at::Tensor load(const std::string& name, const std::vector<int64_t>& expected_shape = {},
                  at::ScalarType dtype = at::kFloat) const;
  // Loads `name` in the dtype it is stored in (a bit-exact copy).
  at::Tensor load_stored(const std::string& name) const;
  // The file a tensor lives in (for error messages).
  std::string file_of(const std::string& name) const;

 private:
  std::string dir_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // tensor name -> index into files_
};

// Writes tensors (any of f32/f16/bf16/i8/u8/i32/i64) to one .safetensors file.
void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace mlaforge
