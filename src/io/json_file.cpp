#include "io/json_file.h"

#include <fstream>

#include "core/error.h"

namespace mlaforge {

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail(path, "file not found");
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail(path, "not valid JSON (", e.what(), ")");
  }
}

}  // namespace mlaforge
