// Chat template families, recognised by their text (see chat.h for what each renders).
#include "text/chat.h"

#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"

namespace mlaforge {
namespace {

using json = nlohmann::json;

bool read_file(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in.good()) return false;
  std::stringstream buf;
  buf << in.rdbuf();
  check(!in.bad(), path, "cannot read file");
  *out = buf.str();
  return true;
}

bool contains(const std::string& s, const char* needle) { return s.find(needle) != std::string::npos; }

// Jinja's trim filter: surrounding whitespace removed.
std::string trim(const std::string& s) {
  const char* ws = " \t\n\r\f\v";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

// The system text a ChatML template injects when the conversation has none, as in Qwen2-VL's
// "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful
// assistant.<|im_end|>\n{% endif %}". The first "<|im_start|>system" + newline (literal, or "\n"
// inside a Jinja string) followed by plain text up to "<|im_end|>" counts; occurrences whose text
// holds Jinja code or quotes (e.g. "+ messages[0]['content'] +") are skipped.
std::string default_system_text(const std::string& t) {
  const std::string head = "<|im_start|>system";
  for (size_t at = t.find(head); at != std::string::npos; at = t.find(head, at + 1)) {
    size_t p = at + head.size();
    bool escaped;
    if (t.compare(p, 1, "\n") == 0) {
      escaped = false, p += 1;
    } else if (t.compare(p, 2, "\\n") == 0) {
      escaped = true, p += 2;
    } else {
      continue;
    }
    size_t end = t.find("<|im_end|>", p);
    if (end == std::string::npos) continue;
    std::string text = t.substr(p, end - p);
    if (text.empty() || text.find_first_of("{}'\"+") != std::string::npos) continue;
    if (escaped) {  // undo Jinja string escapes of the usual kind
      std::string out;
      for (size_t i = 0; i < text.size(); ++i) {
        if (text[i] == '\\' && i + 1 < text.size()) {
          char c = text[++i];
          out += c == 'n' ? '\n' : c == 't' ? '\t' : c;
        } else {
          out += text[i];
        }
      }
      text = out;
    }
    return text;
  }
  return "";
}

}  // namespace

ChatFormat ChatFormat::from_template(const std::string& t, const std::string& where) {
  ChatFormat f;
  f.source_ = where;
  if (contains(t, "<|im_start|>")) {
    f.family_ = Family::kChatML;
    if (contains(t, "<|vision_start|><|image_pad|><|vision_end|>"))
      f.image_placeholder_ = "<|vision_start|><|image_pad|><|vision_end|>";
    f.default_system_ = default_system_text(t);
  } else if (contains(t, "<|start_header_id|>")) {
    f.family_ = Family::kLlama3;
    f.bos_ = contains(t, "<|begin_of_text|>");
    f.trim_text_ = contains(t, "| trim") || contains(t, "|trim");
    // '\n' + content['text'] (a Jinja escape or a literal newline) puts a newline before each text.
    if (contains(t, "'\\n' + content['text']") || contains(t, "'\n' + content['text']")) f.text_prefix_ = "\n";
    if (contains(t, "content['text'] + '<|eot_id|>'")) {
      f.text_suffix_ = "<|eot_id|>";  // each text ends with it, the turn itself does not
    } else {
      f.turn_end_ = "<|eot_id|>";
    }
  } else if (contains(t, "[INST]")) {
    f.family_ = Family::kMistral;
    // "content['text'] + ' '": each text of a user turn is followed by a space.
    if (contains(t, "content['text'] + ' '")) f.text_suffix_ = " ";
    f.inst_close_ = contains(t, "' [/INST]'") ? " [/INST]" : "[/INST]";
    f.system_block_ = contains(t, "<<SYS>>");
    // llava-hf: ' ' + message['content'][0]['text'] + '</s> ' for an assistant turn.
    f.assistant_first_text_ = contains(t, "message['content'][0]['text'] + '</s>");
    f.assistant_end_ = contains(t, "+ '</s> '") ? "</s> " : "</s>";
  } else if (contains(t, "ASSISTANT:") && (contains(t, "USER:") || contains(t, ".upper()"))) {
    f.family_ = Family::kLlava;
  } else {
    fail(where, "unrecognised chat template: neither ChatML (\"<|im_start|>\"), Llama-3 (\"<|start_header_id|>\"), ",
         "Mistral (\"[INST]\") nor LLaVA-1.5 (\"USER:\" ... \"ASSISTANT:\")");
  }
  if (f.family_ != Family::kChatML) {
    // llava-hf writes {{ '<image>\n' }} (a Jinja escape); accept a literal newline too.
    size_t at = t.find("<image>");
    if (at != std::string::npos) {
      bool newline = t.compare(at + 7, 2, "\\n") == 0 || t.compare(at + 7, 1, "\n") == 0;
      f.image_placeholder_ = newline ? "<image>\n" : "<image>";
    }
    // "selectattr('type', 'equalto', 'image')": a turn's images are rendered before its texts.
    f.images_first_ = contains(t, "selectattr");
  }
  return f;
}

ChatFormat ChatFormat::from_model_dir(const std::string& dir) {
  std::string text;
  const std::string jinja = dir + "/chat_template.jinja";
  if (read_file(jinja, &text)) return from_template(text, jinja);

  // A JSON file's "chat_template": a string, or a list of named templates.
  auto from_json = [&](const std::string& path, std::string* out) {
    json j;
    try {
      j = json::parse(text);
    } catch (const json::exception& e) {
      fail(path, "invalid JSON: ", e.what());
    }
    if (!j.is_object() || !j.contains("chat_template") || j["chat_template"].is_null()) return false;
    const json& ct = j["chat_template"];
    if (ct.is_string()) {
      *out = ct.get<std::string>();
      return true;
    }
    if (ct.is_array()) {
      for (const auto& entry : ct) {
        if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template") &&
            entry["template"].is_string()) {
          *out = entry["template"].get<std::string>();
          return true;
        }
      }
      fail(path, "\"chat_template\" is a list without a template named \"default\"");
    }
    fail(path, "\"chat_template\" is neither a string nor a list of named templates");
  };
  std::string tmpl;
  for (const char* name : {"/chat_template.json", "/tokenizer_config.json"}) {
    const std::string path = dir + name;
    if (read_file(path, &text) && from_json(path, &tmpl)) return from_template(tmpl, path);
  }
  fail(dir, "no chat template: looked for chat_template.jinja, chat_template.json and \"chat_template\" in ",
       "tokenizer_config.json");
}

std::string ChatFormat::render(const std::vector<ChatTurn>& turns, bool add_generation_prompt) const {
  auto image = [&]() -> const std::string& {
    check(!image_placeholder_.empty(), source_,
          "this chat template has no image placeholder, but a turn holds an image");
    return image_placeholder_;
  };
  std::string out;
  if (family_ == Family::kChatML) {
    if (!turns.empty() && turns[0].role != "system" && !default_system_.empty())
      out += "<|im_start|>system\n" + default_system_ + "<|im_end|>\n";
    for (const auto& turn : turns) {
      out += "<|im_start|>" + turn.role + "\n";
      for (const auto& item : turn.items) out += item.is_image ? image() : item.text;
      out += "<|im_end|>\n";
    }
    if (add_generation_prompt) out += "<|im_start|>assistant\n";
    return out;
  }
  // A turn's items, images first where the template renders them so; `text` formats each text.
  auto items = [&](const ChatTurn& turn, const std::function<std::string(const std::string&)>& text) {
    std::string r;
    if (images_first_) {
      for (const auto& item : turn.items)
        if (item.is_image) r += image();
      for (const auto& item : turn.items)
        if (!item.is_image) r += text(item.text);
    } else {
      for (const auto& item : turn.items) r += item.is_image ? image() : text(item.text);
    }
    return r;
  };
  if (family_ == Family::kLlama3) {
    if (bos_) out += "<|begin_of_text|>";
    for (const auto& turn : turns)
      out += "<|start_header_id|>" + turn.role + "<|end_header_id|>\n\n" + items(turn, [&](const std::string& x) {
               return text_prefix_ + (trim_text_ ? trim(x) : x) + text_suffix_;
             }) + turn_end_;
    if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
    return out;
  }
  if (family_ == Family::kMistral) {
    auto texts = [](const ChatTurn& turn) {
      std::vector<std::string> r;
      for (const auto& item : turn.items)
        if (!item.is_image) r.push_back(item.text);
      return r;
    };
    for (const auto& turn : turns) {
      if (turn.role == "user") {
        out += "[INST] " + items(turn, [&](const std::string& x) { return x + text_suffix_; }) + inst_close_;
      } else if (turn.role == "assistant") {
        std::vector<std::string> t = texts(turn);
        if (assistant_first_text_ && t.size() > 1) t.resize(1);
        for (const auto& x : t) out += " " + x + assistant_end_;
      } else if (turn.role == "system" && system_block_) {
        std::vector<std::string> t = texts(turn);  // the template takes the first item's text
        out += "<<SYS>>\n" + (t.empty() ? std::string() : t[0]) + "\n<</SYS>>\n\n";
      }
    }
    return out;
  }
  // LLaVA-1.5.
  for (const auto& turn : turns) {
    if (turn.role != "system") {
      for (char c : turn.role) out += static_cast<char>(c >= 'a' && c <= 'z' ? c - 'a' + 'A' : c);
      out += ": ";
    }
    out += items(turn, [](const std::string& x) { return x + " "; });
  }
  if (add_generation_prompt) out += "ASSISTANT:";
  return out;
}

}  // namespace mlaforge
