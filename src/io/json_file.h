// Reading a JSON file with errors that name it.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

namespace mlaforge {
// Parses `path`; a missing file or invalid JSON is an Error naming the path.
nlohmann::json read_json_file(const std::string& path);
}  // namespace mlaforge
