// LLaVA-style conversation data: JSONL (one record per line) or a JSON array of records
// {"id", "kind", "image" (path relative to the file's folder), "conversations": [{"from", "value"}...]}.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "text/prompt.h"

namespace mlaforge {

struct Conversation {
  std::string id, kind;
  std::string where;                    // "file:line" for error messages
  std::vector<std::string> image_paths; // resolved against the data file's folder
  std::vector<ChatTurn> turns;          // roles user/assistant; "<image>\n" at a human turn's start is an image item
};

// Reads up to `limit` records (all when limit <= 0). Errors name the file and line.
std::vector<Conversation> load_conversations(const std::string& path, int64_t limit = 0);

// The prompt for a conversation's first human turn (what eval asks) and the reference answer
// (the following assistant turn).
Prompt question_prompt(const Conversation& c);
std::string reference_answer(const Conversation& c);

}  // namespace mlaforge
