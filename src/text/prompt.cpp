#include "text/prompt.h"

namespace mlaforge {

ChatTurn user_turn_from_text(const std::string& text) {
  ChatTurn turn;
  turn.role = "user";
  const std::string marker = "<image>";
  size_t at = 0;
  while (true) {
    size_t hit = text.find(marker, at);
    std::string piece = text.substr(at, hit == std::string::npos ? std::string::npos : hit - at);
    if (!piece.empty()) turn.items.push_back({false, piece});
    if (hit == std::string::npos) break;
    turn.items.push_back({true, ""});
    at = hit + marker.size();
    if (at < text.size() && text[at] == '\n') ++at;
  }
  return turn;
}

}  // namespace mlaforge
