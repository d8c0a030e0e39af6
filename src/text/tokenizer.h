// Hugging Face tokenizer.json reader and BPE tokenizer, giving the ids HF `tokenizers` gives.
//
// Pipeline of encode(text), as in HF tokenizers:
//   1. added tokens ("added_tokens") are cut out of the raw text, leftmost-longest; tokens marked
//      normalized=true are looked for again in each piece after normalization;
//   2. each remaining piece is normalized on its own (so Llama's legacy Prepend("▁") gives every
//      piece after a special token its own "▁");
//   3. the pre-tokenizer splits pieces into words (Split regex, ByteLevel, Metaspace);
//   4. the BPE model turns each word into ids (byte fallback, unk);
//   5. with add_special_tokens, the post-processor wraps the ids (e.g. "<s> $A").
// decode(ids) maps ids to token strings (added tokens first), drops special ones on request and
// runs the decoder chain (ByteLevel, Metaspace, Replace/ByteFallback/Fuse/Strip).
//
// Supported components: model BPE; normalizers NFC/NFD/NFKC/NFKD, Lowercase, Prepend, Replace,
// Strip, Sequence; pre-tokenizers Split, ByteLevel, Metaspace, Sequence; post-processors
// TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing, Sequence; decoders ByteLevel,
// Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence. Anything else is an Error naming the
// file and the component. No ATen.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace mlaforge {

class Tokenizer {
 public:
  // Reads a tokenizer.json; every error names the file.
  static Tokenizer from_file(const std::string& tokenizer_json_path);
  // Same, from the JSON text itself; `where` names the source in errors.
  static Tokenizer from_json_string(const std::string& json_text, const std::string& where);

  // HF `encode(text, add_special_tokens=...)`. `text` must be valid UTF-8.
  std::vector<int32_t> encode(const std::string& text, bool add_special_tokens = false) const;
  // HF `decode(ids, skip_special_tokens=...)`: ids unknown to the tokenizer are dropped, as HF does.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = true) const;

  int32_t token_id(const std::string& token) const;  // -1 if absent (vocab or added tokens)
  std::string id_to_token(int32_t id) const;         // "" if absent
  bool is_special(int32_t id) const;                 // an added token marked special
  int64_t vocab_size() const;                        // max id + 1 over vocab and added tokens
  const std::string& path() const;                   // the file (or `where`) it came from

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  // Shared and immutable except for an internal, mutex-guarded BPE word cache: copies are cheap
  // and one Tokenizer may be used from several threads.
  std::shared_ptr<const Impl> impl_;
};

}  // namespace mlaforge
