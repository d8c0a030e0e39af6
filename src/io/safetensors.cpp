#include "io/safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace mlaforge {
namespace {

struct DtypeInfo {
  at::ScalarType type;
  size_t bytes;
};

bool dtype_info(const std::string& name, DtypeInfo* out) {
  static const std::map<std::string, DtypeInfo> table = {
      {"F32", {at::kFloat, 4}}, {"F16", {at::kHalf, 2}},    {"BF16", {at::kBFloat16, 2}},
      {"F64", {at::kDouble, 8}}, {"I64", {at::kLong, 8}},   {"I32", {at::kInt, 4}},
      {"I16", {at::kShort, 2}}, {"I8", {at::kChar, 1}},     {"U8", {at::kByte, 1}},
      {"BOOL", {at::kBool, 1}}};
  auto it = table.find(name);
  if (it == table.end()) return false;
  *out = it->second;
  return true;
}

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "F32";
    case at::kHalf: return "F16";
    case at::kBFloat16: return "BF16";
    case at::kDouble: return "F64";
    case at::kLong: return "I64";
    case at::kInt: return "I32";
    case at::kShort: return "I16";
    case at::kChar: return "I8";
    case at::kByte: return "U8";
    case at::kBool: return "BOOL";
    default: throw Error(mlaforge::str("safetensors: cannot store dtype ", t));
  }
}

}  // namespace

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail(path, "cannot open (", std::strerror(errno), ")");
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    fail(path, "cannot stat");
  }
  f->size_ = size_t(st.st_size);
  if (f->size_ < 8) {
    ::close(fd);
    fail(path, "truncated safetensors file: ", f->size_, " bytes, no header length");
  }
  f->map_ = mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (f->map_ == MAP_FAILED) {
    f->map_ = nullptr;
    fail(path, "cannot map file");
  }
  const uint8_t* base = static_cast<const uint8_t*>(f->map_);
  uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);  // little-endian u64
  if (header_len > f->size_ - 8)
    fail(path, "corrupt safetensors header: header length ", header_len, " exceeds the file (", f->size_,
         " bytes)");
  json header;
  try {
    header = json::parse(base + 8, base + 8 + header_len);
  } catch (const json::exception& e) {
    fail(path, "corrupt safetensors header: not valid JSON (", e.what(), ")");
  }
  if (!header.is_object()) fail(path, "corrupt safetensors header: not a JSON object");
  f->data_ = base + 8 + header_len;
  const uint64_t data_size = f->size_ - 8 - header_len;
  for (auto& [name, v] : header.items()) {
    if (name == "__metadata__") {
      if (v.is_object())
        for (auto& [k, mv] : v.items())
          if (mv.is_string()) f->metadata_[k] = mv.get<std::string>();
      continue;
    }
    try {
      TensorEntry e;
      e.dtype = v.at("dtype").get<std::string>();
      e.shape = v.at("shape").get<std::vector<int64_t>>();
      auto off = v.at("data_offsets").get<std::vector<uint64_t>>();
      if (off.size() != 2) fail(path, "tensor ", name, ": data_offsets must have 2 entries");
      e.begin = off[0];
      e.end = off[1];
      DtypeInfo di{};
      if (!dtype_info(e.dtype, &di)) fail(path, "tensor ", name, ": unsupported dtype ", e.dtype);
      uint64_t numel = 1;
      for (int64_t d : e.shape) {
        if (d < 0) fail(path, "tensor ", name, ": negative dimension in shape ", shape_str(e.shape));
        numel *= uint64_t(d);
      }
      if (e.begin > e.end || e.end > data_size)
        fail(path, "tensor ", name, ": data range [", e.begin, ", ", e.end, ") points outside the file (data section is ",
             data_size, " bytes; truncated or corrupt file)");
      if (e.end - e.begin != numel * di.bytes)
        fail(path, "tensor ", name, ": data range of ", e.end - e.begin, " bytes does not match shape ",
             shape_str(e.shape), " of ", e.dtype, " (", numel * di.bytes, " bytes)");
      f->entries_[name] = std::move(e);
    } catch (const json::exception& ex) {
      fail(path, "corrupt safetensors header entry for ", name, " (", ex.what(), ")");
    }
  }
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) munmap(map_, size_);
}

at::Tensor SafetensorsFile::load(const std::string& name, at::ScalarType dtype) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) fail(path_, "no tensor named ", name);
  const TensorEntry& e = it->second;
  DtypeInfo di{};
  dtype_info(e.dtype, &di);
  // from_blob needs a non-const pointer; the mapping is read-only and we copy out at once.
  void* ptr = const_cast<uint8_t*>(data_ + e.begin);
  at::Tensor view = at::from_blob(ptr, e.shape, at::TensorOptions().dtype(di.type));
  at::Tensor out = view.to(dtype, /*non_blocking=*/false, /*copy=*/true);
  // The copy is all we keep: drop the mapped pages from the process's resident set (the kernel's
  // page cache keeps them; a later load faults them back). Streaming a 16 GB checkpoint through
  // convert then holds about what it converts, not the whole file.
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t first = reinterpret_cast<uintptr_t>(data_ + e.begin) & ~(page - 1);
  const uintptr_t last = reinterpret_cast<uintptr_t>(data_ + e.end);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
  return out;
}

at::Tensor SafetensorsFile::load_stored(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) fail(path_, "no tensor named ", name);
  DtypeInfo di{};
  dtype_info(it->second.dtype, &di);
  return load(name, di.type);
}

WeightStore WeightStore::open_dir(const std::string& dir) {
  WeightStore ws;
  ws.dir_ = dir;
  if (!fs::is_directory(dir)) fail(dir, "model directory not found");
  fs::path index = fs::path(dir) / "model.safetensors.index.json";
  fs::path single = fs::path(dir) / "model.safetensors";
  if (fs::exists(index)) {
    json j;
    std::ifstream in(index);
    try {
      j = json::parse(in);
    } catch (const json::exception& e) {
      fail(index.string(), "not valid JSON (", e.what(), ")");
    }
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      fail(index.string(), "no \"weight_map\" object");
    std::map<std::string, size_t> file_index;
    for (auto& [name, file] : j["weight_map"].items()) {
      if (!file.is_string()) fail(index.string(), "weight_map entry for ", name, " is not a file name");
      std::string fname = file.get<std::string>();
      if (!file_index.count(fname)) {
        fs::path p = fs::path(dir) / fname;
        if (!fs::exists(p)) fail(p.string(), "missing shard (listed in model.safetensors.index.json)");
        file_index[fname] = ws.files_.size();
        ws.files_.push_back(SafetensorsFile::open(p.string()));
      }
      size_t fi = file_index[fname];
      if (!ws.files_[fi]->has(name))
        fail(ws.files_[fi]->path(), "tensor ", name, " is listed in model.safetensors.index.json but absent");
      ws.where_[name] = fi;
    }
  } else if (fs::exists(single)) {
    ws.files_.push_back(SafetensorsFile::open(single.string()));
    for (auto& kv : ws.files_[0]->entries()) ws.where_[kv.first] = 0;
  } else {
    fail(dir, "no model.safetensors or model.safetensors.index.json");
  }
  return ws;
}

std::vector<std::string> WeightStore::names() const {
  std::vector<std::string> out;
  for (auto& kv : where_) out.push_back(kv.first);
  return out;
}

std::string WeightStore::file_of(const std::string& name) const {
  auto it = where_.find(name);
  return it == where_.end() ? dir_ : files_[it->second]->path();
}

const TensorEntry& WeightStore::entry(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) fail(dir_, "missing tensor ", name);
  return files_[it->second]->entries().at(name);
}

at::Tensor WeightStore::load(const std::string& name, const std::vector<int64_t>& expected_shape,
                             at::ScalarType dtype) const {
  auto it = where_.find(name);
  if (it == where_.end()) fail(dir_, "missing tensor ", name);
  const auto& f = files_[it->second];
  const TensorEntry& e = f->entries().at(name);
  if (!expected_shape.empty() && e.shape != expected_shape)
    fail(f->path(), "tensor ", name, " has shape ", shape_str(e.shape), ", expected ", shape_str(expected_shape));
  return f->load(name, dtype);
}

at::Tensor WeightStore::load_stored(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) fail(dir_, "missing tensor ", name);
  return files_[it->second]->load_stored(name);
}

void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::vector<at::Tensor> contiguous;
  for (auto& [name, t] : tensors) {
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    uint64_t bytes = uint64_t(c.numel()) * c.element_size();
    header[name] = {{"dtype", dtype_name(c.scalar_type())},
                    {"shape", c.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    contiguous.push_back(c);
  }
  std::string h = header.dump();
  while ((h.size() + 8) % 8 != 0) h.push_back(' ');  // align the data section to 8 bytes
  std::ofstream out(path, std::ios::binary);
  if (!out) fail(path, "cannot write");
  uint64_t hl = h.size();
  out.write(reinterpret_cast<const char*>(&hl), 8);
  out.write(h.data(), std::streamsize(h.size()));
  for (auto& c : contiguous) out.write(static_cast<const char*>(c.data_ptr()), std::streamsize(c.numel() * c.element_size()));
  if (!out) fail(path, "write failed");
}

}  // namespace mlaforge
