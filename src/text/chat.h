// Chat prompts: renders conversation turns the way a checkpoint's Jinja chat template would, for
// the template families mlaforge knows. There is no Jinja engine: the family is recognised from
// the template's text and a few facts are read off it (default system prompt, image placeholder).
//
// Families:
//   ChatML (Qwen2-VL, Qwen2.5-VL; template contains "<|im_start|>"):
//     [<|im_start|>system\n{default}<|im_end|>\n]   only if the template injects a default system
//                                                   turn and the first turn is not a system turn
//     <|im_start|>{role}\n{items}<|im_end|>\n        per turn; an image item is
//                                                   <|vision_start|><|image_pad|><|vision_end|>
//     <|im_start|>assistant\n                        generation prompt
//   LLaVA-1.5 (template contains "ASSISTANT:"; llava-hf's template):
//     {ROLE}: {images}{text} ...                     per turn, ROLE upper-cased and omitted for
//                                                   system; each image "<image>\n", all images of
//                                                   a turn before its texts; each text + " "
//     ASSISTANT:                                     generation prompt
//   e.g. "USER: <image>\nWhat is this? ASSISTANT:".
//   Llama-3 (LLaVA-NeXT llama3; template contains "<|start_header_id|>"):
//     [<|begin_of_text|>]                             only if the template writes it literally
//     <|start_header_id|>{role}<|end_header_id|>\n\n  per turn, then its images (the placeholder
//                                                     each: "<image>\n" or "<image>") and its texts,
//     {texts}<|eot_id|>                               back to back, then <|eot_id|> (trimmed if the
//                                                     template says "| trim"); templates writing
//                                                     '\n' + content['text'] + '<|eot_id|>' (llava-hf's
//                                                     llama3-llava-next) give each text that form and
//                                                     no <|eot_id|> of the turn's own
//     <|start_header_id|>assistant<|end_header_id|>\n\n generation prompt
//   Mistral [INST] (LLaVA-NeXT mistral; template contains "[INST]"), in two forms:
//     the fixtures' template:
//       [INST] {images}{text + " " ...}[/INST]        per user turn, images first
//        {text}</s>                                   per text of an assistant turn; no system turns
//     llava-hf's llava-v1.6-mistral (the template has "<<SYS>>" and ' [/INST]'):
//       <<SYS>>\n{text}\n<</SYS>>\n\n                  a system turn
//       [INST] {images}{texts} [/INST]                per user turn
//        {first text}</s>{" " if the template has '</s> '}   per assistant turn
//     Neither has a generation prompt.
// The families write no BOS of their own (Llama-3 only where its template does): encode the
// rendered prompt with add_special_tokens=true, so the tokenizer's post-processor adds what the
// checkpoint expects (Llama's "<s>" or "<|begin_of_text|>"; nothing for Qwen), as transformers'
// processors do.
#pragma once
#include <string>
#include <vector>

namespace mlaforge {

struct ChatItem {
  bool is_image = false;
  std::string text;
};
struct ChatTurn {
  std::string role;  // system / user / assistant
  std::vector<ChatItem> items;
};

class ChatFormat {
 public:
  enum class Family { kChatML, kLlava, kLlama3, kMistral };

  // Reads the chat template from <dir>/chat_template.jinja, else <dir>/chat_template.json
  // {"chat_template": ...}, else tokenizer_config.json's "chat_template" (a string, or a list of
  // {"name", "template"} where "default" is taken). Errors name the file (or the directory).
  static ChatFormat from_model_dir(const std::string& dir);
  // Recognises a template text; `where` names its source in errors.
  static ChatFormat from_template(const std::string& template_text, const std::string& where);

  // Renders turns as the template would with add_generation_prompt.
  std::string render(const std::vector<ChatTurn>& turns, bool add_generation_prompt = true) const;

  Family family() const { return family_; }
  const std::string& image_placeholder() const { return image_placeholder_; }  // "" if none
  const std::string& default_system() const { return default_system_; }        // "" if none
  const std::string& source() const { return source_; }

 private:
  Family family_ = Family::kChatML;
  std::string image_placeholder_;
  std::string default_system_;
  bool images_first_ = false;  // LLaVA, Llama-3, Mistral: a turn's images are rendered before its texts
  bool bos_ = false;           // Llama-3: the template writes <|begin_of_text|> itself
  bool trim_text_ = false;     // Llama-3: texts are stripped of surrounding whitespace
  std::string text_prefix_;    // before each text (Llama-3 of llava-hf: "\n")
  std::string text_suffix_;    // after each text (Mistral fixtures: " "; Llama-3 of llava-hf: "<|eot_id|>")
  std::string turn_end_;       // Llama-3: after a turn's texts ("<|eot_id|>", or "" when each text has it)
  std::string inst_close_;     // Mistral: "[/INST]" or " [/INST]"
  bool system_block_ = false;  // Mistral: system turns as <<SYS>> blocks (else not rendered)
  bool assistant_first_text_ = false;  // Mistral: an assistant turn renders its first text only
  std::string assistant_end_;  // Mistral: after an assistant text ("</s>" or "</s> ")
  std::string source_;
};

}  // namespace mlaforge
