#include "io/dataset.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace mlaforge {
namespace {

Conversation parse_record(const json& r, const std::string& where, const fs::path& base) {
  Conversation c;
  c.where = where;
  if (!r.is_object()) fail(where, "record is not a JSON object");
  c.id = r.contains("id") ? (r["id"].is_string() ? r["id"].get<std::string>() : r["id"].dump()) : where;
  c.kind = r.value("kind", std::string());
  if (r.contains("image")) {
    const json& im = r["image"];
    auto add = [&](const json& v) {
      if (!v.is_string()) fail(where, "\"image\" must be a path or a list of paths");
      c.image_paths.push_back((base / v.get<std::string>()).string());
    };
    if (im.is_array())
      for (auto& v : im) add(v);
    else
      add(im);
  }
  if (!r.contains("conversations") || !r["conversations"].is_array() || r["conversations"].empty())
    fail(where, "missing \"conversations\" list");
  size_t markers = 0;
  for (const json& t : r["conversations"]) {
    if (!t.is_object() || !t.contains("from") || !t.contains("value") || !t["value"].is_string())
      fail(where, "each conversation turn needs \"from\" and a string \"value\"");
    std::string from = t["from"].get<std::string>();
    std::string role = from == "human" || from == "user" ? "user"
                       : from == "gpt" || from == "assistant" ? "assistant"
                       : from == "system" ? "system" : "";
    if (role.empty()) fail(where, "unknown turn role \"", from, "\"");
    ChatTurn turn = role == "user" ? user_turn_from_text(t["value"].get<std::string>())
                                   : ChatTurn{role, {{false, t["value"].get<std::string>()}}};
    turn.role = role;
    for (auto& it : turn.items) markers += it.is_image;
    c.turns.push_back(std::move(turn));
  }
  if (markers > c.image_paths.size())
    fail(where, "more <image> markers (", markers, ") than images (", c.image_paths.size(), ")");
  if (markers < c.image_paths.size())
    fail(where, "more images (", c.image_paths.size(), ") than <image> markers (", markers, ")");
  return c;
}

}  // namespace

std::vector<Conversation> load_conversations(const std::string& path, int64_t limit) {
  std::ifstream in(path);
  if (!in) fail(path, "data file not found");
  fs::path base = fs::path(path).parent_path();
  std::vector<Conversation> out;
  // A JSON array file, or JSONL.
  int first = in.peek();
  while (first == ' ' || first == '\n' || first == '\r' || first == '\t') {
    in.get();
    first = in.peek();
  }
  if (first == '[') {
    json arr;
    try {
      arr = json::parse(in);
    } catch (const json::exception& e) {
      fail(path, "not valid JSON (", e.what(), ")");
    }
    for (size_t i = 0; i < arr.size() && (limit <= 0 || int64_t(out.size()) < limit); ++i)
      out.push_back(parse_record(arr[i], str(path, "[", i, "]"), base));
    return out;
  }
  std::string line;
  int64_t lineno = 0;
  while (std::getline(in, line) && (limit <= 0 || int64_t(out.size()) < limit)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json r;
    std::string where = str(path, ":", lineno);
    try {
      r = json::parse(line);
    } catch (const json::exception& e) {
      fail(where, "not valid JSON (", e.what(), ")");
    }
    out.push_back(parse_record(r, where, base));
  }
  return out;
}

Prompt question_prompt(const Conversation& c) {
  Prompt p;
  for (const auto& t : c.turns) {
    if (t.role == "assistant") break;
    p.turns.push_back(t);
  }
  size_t used = 0;
  for (auto& t : p.turns)
    for (auto& it : t.items) used += it.is_image;
  p.image_paths.assign(c.image_paths.begin(), c.image_paths.begin() + long(std::min(used, c.image_paths.size())));
  return p;
}

std::string reference_answer(const Conversation& c) {
  bool asked = false;
  for (const auto& t : c.turns) {
    if (t.role == "user") asked = true;
    if (t.role == "assistant" && asked) return t.items.empty() ? "" : t.items[0].text;
  }
  return "";
}

}  // namespace mlaforge
