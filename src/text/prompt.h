// A conversation to complete, with the images its image items refer to.
#pragma once
#include <string>
#include <vector>

#include "text/chat.h"

namespace mlaforge {

// One conversation to complete. Image items of the turns take `image_paths` in order.
struct Prompt {
  std::vector<ChatTurn> turns;
  std::vector<std::string> image_paths;
};

// Splits text at "<image>" markers into a user turn: each marker (and one newline right after it,
// as LLaVA-style data writes "<image>\nQUESTION") becomes an image item.
ChatTurn user_turn_from_text(const std::string& text);

}  // namespace mlaforge
