// tokenizer.json reader and BPE tokenizer; the pipeline is described in tokenizer.h. Each step
// follows the behaviour of the HF `tokenizers` component of the same name, including its quirks
// (noted where they matter), because the ids must match HF exactly.
#include "text/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "core/error.h"

namespace mlaforge {
namespace {

using json = nlohmann::json;

// ------------------------------------------------------------------------------------------------
// UTF-8
// ------------------------------------------------------------------------------------------------

// Length of the well-formed UTF-8 sequence at s[i], or 0 when ill-formed; then *bad is the length
// of its maximal ill-formed prefix (>= 1), which Rust's from_utf8_lossy replaces by one U+FFFD.
size_t utf8_seq(const std::string& s, size_t i, size_t* bad) {
  const auto c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return 1;
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    need = 1;
  } else if (c == 0xE0) {
    need = 2, lo = 0xA0;
  } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
    need = 2;
  } else if (c == 0xED) {
    need = 2, hi = 0x9F;  // no surrogates
  } else if (c == 0xF0) {
    need = 3, lo = 0x90;
  } else if (c >= 0xF1 && c <= 0xF3) {
    need = 3;
  } else if (c == 0xF4) {
    need = 3, hi = 0x8F;
  } else {
    *bad = 1;
    return 0;
  }
  for (size_t k = 1; k <= need; ++k) {
    if (i + k >= s.size()) {
      *bad = k;
      return 0;
    }
    const auto d = static_cast<unsigned char>(s[i + k]);
    if (d < (k == 1 ? lo : 0x80) || d > (k == 1 ? hi : 0xBF)) {
      *bad = k;
      return 0;
    }
  }
  return need + 1;
}

// Byte offset of the first ill-formed sequence, or npos.
size_t first_invalid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    size_t bad = 0, n = utf8_seq(s, i, &bad);
    if (n == 0) return i;
    i += n;
  }
  return std::string::npos;
}

// Rust's String::from_utf8_lossy, which HF decoders use on raw bytes.
std::string utf8_lossy(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    size_t bad = 0, n = utf8_seq(s, i, &bad);
    if (n) {
      out.append(s, i, n);
      i += n;
    } else {
      out += "\xEF\xBF\xBD";
      i += bad;
    }
  }
  return out;
}

// Length in bytes of the (valid) UTF-8 character starting with byte c.
inline size_t char_len(unsigned char c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

uint32_t decode_char(const std::string& s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  auto cont = [&](size_t k) { return static_cast<uint32_t>(static_cast<unsigned char>(s[i + k]) & 0x3F); };
  switch (char_len(c)) {
    case 1: return c;
    case 2: return ((c & 0x1Fu) << 6) | cont(1);
    case 3: return ((c & 0x0Fu) << 12) | (cont(1) << 6) | cont(2);
    default: return ((c & 0x07u) << 18) | (cont(1) << 12) | (cont(2) << 6) | cont(3);
  }
}

// Start of the character that ends at byte `end` (exclusive).
size_t prev_char_start(const std::string& s, size_t end) {
  size_t i = end - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  return i;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Unicode White_Space, what Rust's char::is_whitespace and regex \s test.
bool is_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

// Rust regex \w: alphabetic, marks, decimal digits, connector punctuation, joiners.
bool is_word_char(uint32_t cp) {
  if (cp == 0x200C || cp == 0x200D) return true;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(cp))) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME: case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_PC:
      return true;
    default:
      return false;
  }
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  if (from.empty()) return;
  std::string out;
  size_t pos = 0;
  for (size_t hit; (hit = s.find(from, pos)) != std::string::npos; pos = hit + from.size()) {
    out.append(s, pos, hit - pos);
    out += to;
  }
  if (pos == 0) return;
  out.append(s, pos, std::string::npos);
  s = std::move(out);
}

// ------------------------------------------------------------------------------------------------
// PCRE2 regex (UTF + Unicode properties), standing in for HF's Oniguruma.
// ------------------------------------------------------------------------------------------------

class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) : where_(where) {
    int err = 0;
    PCRE2_SIZE at = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP,
                          &err, &at, nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      fail(where, "cannot compile regex \"", pattern, "\" at offset ", at, ": ", reinterpret_cast<char*>(msg));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // speed only: without JIT the interpreter runs
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // All non-overlapping matches [begin, end) in s (valid UTF-8), left to right, empty ones included.
  void find_all(const std::string& s, std::vector<std::pair<size_t, size_t>>* out) const {
    std::unique_ptr<pcre2_match_data, void (*)(pcre2_match_data*)> md(
        pcre2_match_data_create_from_pattern(code_, nullptr), pcre2_match_data_free);
    size_t pos = 0;
    while (pos <= s.size()) {
      int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos, PCRE2_NO_UTF_CHECK,
                           md.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) fail(where_, "regex match failed (PCRE2 error ", rc, ")");
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
      out->emplace_back(ov[0], ov[1]);
      if (ov[1] > ov[0]) {
        pos = ov[1];
      } else {  // empty match: step over one character
        if (ov[1] >= s.size()) break;
        pos = ov[1] + char_len(static_cast<unsigned char>(s[ov[1]]));
      }
    }
  }

 private:
  pcre2_code* code_ = nullptr;
  std::string where_;
};

// A "pattern" object of tokenizer.json: {"String": literal} or {"Regex": pcre}.
struct Pattern {
  std::string literal;
  std::shared_ptr<Regex> regex;  // null: literal

  void find_all(const std::string& s, std::vector<std::pair<size_t, size_t>>* out) const {
    if (regex) return regex->find_all(s, out);
    if (literal.empty()) return;
    for (size_t hit = s.find(literal); hit != std::string::npos; hit = s.find(literal, hit + literal.size()))
      out->emplace_back(hit, hit + literal.size());
  }
  void replace_all_in(std::string& s, const std::string& content) const {
    if (!regex) return replace_all(s, literal, content);
    std::vector<std::pair<size_t, size_t>> m;
    regex->find_all(s, &m);
    if (m.empty()) return;
    std::string out;
    size_t pos = 0;
    for (auto [a, b] : m) {
      out.append(s, pos, a - pos);
      out += content;
      pos = b;
    }
    out.append(s, pos, std::string::npos);
    s = std::move(out);
  }
};

// ------------------------------------------------------------------------------------------------
// GPT-2 byte <-> unicode table of the ByteLevel pre-tokenizer and decoder: printable Latin-1 bytes
// stand for themselves, the other 68 bytes map to U+0100.. in byte order.
// ------------------------------------------------------------------------------------------------

struct ByteTable {
  std::string to_char[256];  // byte -> UTF-8 of its stand-in character
  int16_t from_cp[512];      // stand-in code point -> byte, or -1
  ByteTable() {
    std::fill(std::begin(from_cp), std::end(from_cp), int16_t(-1));
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      bool self = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      uint32_t cp = self ? uint32_t(b) : next++;
      append_utf8(to_char[b], cp);
      from_cp[cp] = static_cast<int16_t>(b);
    }
  }
};
const ByteTable& byte_table() {
  static const ByteTable t;
  return t;
}

constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ------------------------------------------------------------------------------------------------
// Components
// ------------------------------------------------------------------------------------------------

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool single_word = false, lstrip = false, rstrip = false, normalized = false, special = false;
};

// Leftmost-longest search over the added tokens' contents (HF uses Aho-Corasick, LeftmostLongest).
class TokenTrie {
 public:
  void add(const std::string& s, int32_t index) {
    int32_t node = 0;
    for (unsigned char c : s) {
      int32_t child = find(node, c);
      if (child < 0) {
        child = static_cast<int32_t>(nodes_.size());
        nodes_[node].next.emplace_back(c, child);
        nodes_.emplace_back();
      }
      node = child;
    }
    if (nodes_[node].token < 0) nodes_[node].token = index;  // first of duplicates wins
  }
  bool empty() const { return nodes_.size() == 1; }
  // The longest token starting at s[i]: its index (or -1) and *len.
  int32_t longest_at(const std::string& s, size_t i, size_t* len) const {
    int32_t node = 0, best = -1;
    for (size_t k = i; k < s.size(); ++k) {
      node = find(node, static_cast<unsigned char>(s[k]));
      if (node < 0) break;
      if (nodes_[node].token >= 0) best = nodes_[node].token, *len = k + 1 - i;
    }
    return best;
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> next;
    int32_t token = -1;
  };
  int32_t find(int32_t node, unsigned char c) const {
    for (const auto& [ch, child] : nodes_[node].next)
      if (ch == c) return child;
    return -1;
  }
  std::vector<Node> nodes_{1};
};

// A piece of the input on its way through the pipeline.
struct Piece {
  std::string text;
  bool at_start = false;  // begins at offset 0 of the original input (Metaspace prepend_scheme "first")
  int32_t id = -1;        // >= 0: an added token, already final
};

struct Normalizer {
  enum Kind { kNFC, kNFD, kNFKC, kNFKD, kLowercase, kPrepend, kReplace, kStrip } kind = kNFC;
  std::string text;  // Prepend: prefix; Replace: content
  Pattern pattern;   // Replace
  bool left = false, right = false;  // Strip
};

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };
enum class Prepend { kAlways, kFirst, kNever };

struct PreTokenizer {
  enum Kind { kSplit, kByteLevel, kMetaspace } kind = kSplit;
  Pattern pattern;  // Split (Metaspace: the replacement as literal)
  Behavior behavior = Behavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false, use_regex = true;  // ByteLevel
  std::shared_ptr<Regex> gpt2;                      // ByteLevel with use_regex
  std::string replacement;                          // Metaspace
  Prepend prepend = Prepend::kAlways;
  bool split = true;
};

struct DecoderStep {
  enum Kind { kByteLevel, kMetaspace, kReplace, kByteFallback, kFuse, kStrip } kind = kFuse;
  Pattern pattern;
  std::string text;  // Replace: content; Strip: content char; Metaspace: replacement
  Prepend prepend = Prepend::kAlways;
  size_t start = 0, stop = 0;  // Strip
};

// Unicode normal forms by utf8proc; `s` is valid UTF-8 (embedded NULs allowed).
std::string unicode_map(const std::string& s, int options, const std::string& where) {
  utf8proc_uint8_t* out = nullptr;
  utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                    static_cast<utf8proc_ssize_t>(s.size()), &out,
                                    static_cast<utf8proc_option_t>(options));
  if (n < 0) fail(where, "unicode normalization failed: ", utf8proc_errmsg(n));
  std::string r(reinterpret_cast<char*>(out), static_cast<size_t>(n));
  std::free(out);
  return r;
}

// Applies HF's split behaviours to a list of (range, is_match) covering a string.
std::vector<std::pair<size_t, size_t>> apply_behavior(const std::vector<std::tuple<size_t, size_t, bool>>& parts,
                                                      Behavior behavior) {
  std::vector<std::pair<size_t, size_t>> out;
  bool prev_match = false;
  switch (behavior) {
    case Behavior::kIsolated:
      for (auto& [a, b, m] : parts) out.emplace_back(a, b);
      break;
    case Behavior::kRemoved:
      for (auto& [a, b, m] : parts)
        if (!m) out.emplace_back(a, b);
      break;
    case Behavior::kMergedWithPrevious:
      for (auto& [a, b, m] : parts) {
        if (m && !prev_match && !out.empty()) out.back().second = b;
        else out.emplace_back(a, b);
        prev_match = m;
      }
      break;
    case Behavior::kMergedWithNext:
      for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
        auto& [a, b, m] = *it;
        if (m && !prev_match && !out.empty()) out.back().first = a;
        else out.emplace_back(a, b);
        prev_match = m;
      }
      std::reverse(out.begin(), out.end());
      break;
    case Behavior::kContiguous:
      for (auto& [a, b, m] : parts) {
        if (m == prev_match && !out.empty()) out.back().second = b;
        else out.emplace_back(a, b);
        prev_match = m;
      }
      break;
  }
  return out;
}

// Splits `piece` by a pattern with a behaviour (HF NormalizedString::split), appending non-empty parts.
void split_piece(const Piece& piece, const Pattern& pattern, Behavior behavior, bool invert,
                 std::vector<Piece>* out) {
  const std::string& s = piece.text;
  std::vector<std::pair<size_t, size_t>> matches;
  pattern.find_all(s, &matches);
  std::vector<std::tuple<size_t, size_t, bool>> parts;
  size_t prev = 0;
  for (auto [a, b] : matches) {
    if (a != prev) parts.emplace_back(prev, a, invert);
    parts.emplace_back(a, b, !invert);
    prev = b;
  }
  if (prev != s.size()) parts.emplace_back(prev, s.size(), invert);
  for (auto [a, b] : apply_behavior(parts, behavior)) {
    if (a == b) continue;
    out->push_back(Piece{s.substr(a, b - a), piece.at_start && a == 0, -1});
  }
}

// ------------------------------------------------------------------------------------------------
// BPE model
// ------------------------------------------------------------------------------------------------

struct Bpe {
  std::unordered_map<std::string, int32_t> vocab;
  // (left id, right id) -> (rank, merged id)
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;
  int32_t unk_id = -1;
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;
  int32_t byte_ids[256];  // <0xNN> ids, or -1

  mutable std::mutex cache_mu;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;
  static constexpr size_t kCacheWords = 10000, kCacheMaxLen = 256;  // HF's limits

  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

  void tokenize(const std::string& word, std::vector<int32_t>* out, const std::string& where) const {
    if (word.empty()) return;
    if (ignore_merges) {
      auto it = vocab.find(word);
      if (it != vocab.end()) {
        out->push_back(it->second);
        return;
      }
    }
    {
      std::lock_guard<std::mutex> lock(cache_mu);
      auto it = cache.find(word);
      if (it != cache.end()) {
        out->insert(out->end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int32_t> ids = merge_word(word, where);
    out->insert(out->end(), ids.begin(), ids.end());
    if (word.size() < kCacheMaxLen) {
      std::lock_guard<std::mutex> lock(cache_mu);
      if (cache.size() < kCacheWords) cache.emplace(word, std::move(ids));
    }
  }

  // One symbol per character (or per byte through byte fallback, or a run of unknown characters
  // as unk), then HF's Word::merge_all: repeatedly apply the pair of lowest merge rank, leftmost
  // first, using a min-heap of candidate pairs whose stale entries are skipped.
  std::vector<int32_t> merge_word(const std::string& w, const std::string& where) const {
    std::vector<int32_t> sym;
    int32_t pending_unk = -1;  // an unk symbol not yet emitted (fuse_unk may extend it)
    for (size_t i = 0; i < w.size();) {
      size_t n = char_len(static_cast<unsigned char>(w[i]));
      auto it = vocab.find(w.substr(i, n));
      if (it != vocab.end()) {
        if (pending_unk >= 0) sym.push_back(pending_unk), pending_unk = -1;
        sym.push_back(it->second);
      } else {
        bool done = false;
        if (byte_fallback) {
          bool all = true;
          for (size_t k = 0; k < n; ++k) all = all && byte_ids[static_cast<unsigned char>(w[i + k])] >= 0;
          if (all) {  // HF does not flush a pending unk here; neither do we
            for (size_t k = 0; k < n; ++k) sym.push_back(byte_ids[static_cast<unsigned char>(w[i + k])]);
            done = true;
          }
        }
        if (!done) {
          if (unk_id < 0)
            fail(where, "character \"", w.substr(i, n), "\" is not in the vocabulary and the model has no unk_token");
          if (pending_unk >= 0 && !fuse_unk) sym.push_back(pending_unk);
          pending_unk = unk_id;
        }
      }
      i += n;
    }
    if (pending_unk >= 0) sym.push_back(pending_unk);
    if (sym.size() < 2 || merges.empty()) return sym;

    struct Cand {
      int32_t rank, pos, new_id;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    const int32_t n = static_cast<int32_t>(sym.size());
    std::vector<int32_t> prev(n), next(n);
    std::vector<char> alive(n, 1);
    for (int32_t i = 0; i < n; ++i) prev[i] = i - 1, next[i] = i + 1 < n ? i + 1 : -1;
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    auto push = [&](int32_t pos) {
      int32_t r = next[pos];
      if (r < 0) return;
      auto it = merges.find(key(sym[pos], sym[r]));
      if (it != merges.end()) heap.push({it->second.first, pos, it->second.second});
    };
    for (int32_t i = 0; i + 1 < n; ++i) push(i);
    while (!heap.empty()) {
      Cand c = heap.top();
      heap.pop();
      if (!alive[c.pos] || next[c.pos] < 0) continue;
      int32_t r = next[c.pos];
      auto it = merges.find(key(sym[c.pos], sym[r]));
      if (it == merges.end() || it->second.second != c.new_id) continue;  // stale entry
      sym[c.pos] = c.new_id;
      alive[r] = 0;
      next[c.pos] = next[r];
      if (next[r] >= 0) prev[next[r]] = c.pos;
      if (prev[c.pos] >= 0) push(prev[c.pos]);
      push(c.pos);
    }
    std::vector<int32_t> ids;
    for (int32_t i = 0; i >= 0; i = next[i]) ids.push_back(sym[i]);
    return ids;
  }
};

// ------------------------------------------------------------------------------------------------
// JSON helpers
// ------------------------------------------------------------------------------------------------

std::string type_of(const json& j) {
  return j.is_object() && j.contains("type") && j["type"].is_string() ? j["type"].get<std::string>() : "";
}

bool get_bool(const json& j, const char* key, bool dflt) {
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? dflt : it->get<bool>();
}

Pattern parse_pattern(const json& j, const std::string& where, const std::string& component) {
  Pattern p;
  if (j.is_object() && j.contains("String")) {
    p.literal = j["String"].get<std::string>();
  } else if (j.is_object() && j.contains("Regex")) {
    p.regex = std::make_shared<Regex>(j["Regex"].get<std::string>(), where);
  } else {
    fail(where, component, " has a pattern that is neither {\"String\": ...} nor {\"Regex\": ...}");
  }
  return p;
}

Prepend parse_prepend(const json& j, const std::string& where) {
  Prepend scheme = Prepend::kAlways;  // HF's default
  if (j.contains("prepend_scheme") && !j["prepend_scheme"].is_null()) {
    std::string s = j["prepend_scheme"].get<std::string>();
    if (s == "always") scheme = Prepend::kAlways;
    else if (s == "first") scheme = Prepend::kFirst;
    else if (s == "never") scheme = Prepend::kNever;
    else fail(where, "Metaspace has unknown prepend_scheme \"", s, "\"");
  }
  if (!get_bool(j, "add_prefix_space", true)) scheme = Prepend::kNever;  // older files
  return scheme;
}

std::string one_char(const json& j, const char* key, const std::string& where, const std::string& component) {
  std::string s = j.at(key).get<std::string>();
  check(!s.empty() && char_len(static_cast<unsigned char>(s[0])) == s.size(), where, component, " \"", key,
        "\" must be one character, got \"", s, "\"");
  return s;
}

void parse_normalizer(const json& j, const std::string& where, std::vector<Normalizer>* out) {
  if (j.is_null()) return;
  std::string t = type_of(j);
  Normalizer n;
  if (t == "Sequence") {
    for (const auto& sub : j.at("normalizers")) parse_normalizer(sub, where, out);
    return;
  } else if (t == "NFC") {
    n.kind = Normalizer::kNFC;
  } else if (t == "NFD") {
    n.kind = Normalizer::kNFD;
  } else if (t == "NFKC") {
    n.kind = Normalizer::kNFKC;
  } else if (t == "NFKD") {
    n.kind = Normalizer::kNFKD;
  } else if (t == "Lowercase") {
    n.kind = Normalizer::kLowercase;
  } else if (t == "Prepend") {
    n.kind = Normalizer::kPrepend, n.text = j.at("prepend").get<std::string>();
  } else if (t == "Replace") {
    n.kind = Normalizer::kReplace, n.pattern = parse_pattern(j.at("pattern"), where, "Replace normalizer");
    n.text = j.at("content").get<std::string>();
  } else if (t == "Strip") {
    n.kind = Normalizer::kStrip, n.left = get_bool(j, "strip_left", false), n.right = get_bool(j, "strip_right", false);
  } else {
    fail(where, "unsupported normalizer \"", t, "\" (supported: Sequence, NFC, NFD, NFKC, NFKD, Lowercase, ",
         "Prepend, Replace, Strip)");
  }
  out->push_back(std::move(n));
}

void parse_pre_tokenizer(const json& j, const std::string& where, std::vector<PreTokenizer>* out) {
  if (j.is_null()) return;
  std::string t = type_of(j);
  PreTokenizer p;
  if (t == "Sequence") {
    for (const auto& sub : j.at("pretokenizers")) parse_pre_tokenizer(sub, where, out);
    return;
  } else if (t == "Split") {
    p.kind = PreTokenizer::kSplit;
    p.pattern = parse_pattern(j.at("pattern"), where, "Split pre-tokenizer");
    std::string b = j.at("behavior").get<std::string>();
    if (b == "Removed") p.behavior = Behavior::kRemoved;
    else if (b == "Isolated") p.behavior = Behavior::kIsolated;
    else if (b == "MergedWithPrevious") p.behavior = Behavior::kMergedWithPrevious;
    else if (b == "MergedWithNext") p.behavior = Behavior::kMergedWithNext;
    else if (b == "Contiguous") p.behavior = Behavior::kContiguous;
    else fail(where, "Split pre-tokenizer has unknown behavior \"", b, "\"");
    p.invert = get_bool(j, "invert", false);
  } else if (t == "ByteLevel") {
    p.kind = PreTokenizer::kByteLevel;
    p.add_prefix_space = get_bool(j, "add_prefix_space", true);
    p.use_regex = get_bool(j, "use_regex", true);
    if (p.use_regex) p.gpt2 = std::make_shared<Regex>(kGpt2Pattern, where);
  } else if (t == "Metaspace") {
    p.kind = PreTokenizer::kMetaspace;
    p.replacement = one_char(j, "replacement", where, "Metaspace pre-tokenizer");
    p.pattern.literal = p.replacement;
    p.prepend = parse_prepend(j, where);
    p.split = get_bool(j, "split", true);
  } else {
    fail(where, "unsupported pre-tokenizer \"", t, "\" (supported: Sequence, Split, ByteLevel, Metaspace)");
  }
  out->push_back(std::move(p));
}

void parse_decoder(const json& j, const std::string& where, std::vector<DecoderStep>* out) {
  std::string t = type_of(j);
  DecoderStep d;
  if (t == "Sequence") {
    for (const auto& sub : j.at("decoders")) parse_decoder(sub, where, out);
    return;
  } else if (t == "ByteLevel") {
    d.kind = DecoderStep::kByteLevel;
  } else if (t == "Metaspace") {
    d.kind = DecoderStep::kMetaspace, d.text = one_char(j, "replacement", where, "Metaspace decoder");
    d.prepend = parse_prepend(j, where);
  } else if (t == "Replace") {
    d.kind = DecoderStep::kReplace, d.pattern = parse_pattern(j.at("pattern"), where, "Replace decoder");
    d.text = j.at("content").get<std::string>();
  } else if (t == "ByteFallback") {
    d.kind = DecoderStep::kByteFallback;
  } else if (t == "Fuse") {
    d.kind = DecoderStep::kFuse;
  } else if (t == "Strip") {
    d.kind = DecoderStep::kStrip, d.text = one_char(j, "content", where, "Strip decoder");
    d.start = j.at("start").get<size_t>(), d.stop = j.at("stop").get<size_t>();
  } else {
    fail(where, "unsupported decoder \"", t, "\" (supported: Sequence, ByteLevel, Metaspace, Replace, ",
         "ByteFallback, Fuse, Strip)");
  }
  out->push_back(std::move(d));
}

// Adds what a post-processor puts around a single sequence: result = prefix + A + suffix.
void parse_post_processor(const json& j, const std::string& where, std::vector<int32_t>* prefix,
                          std::vector<int32_t>* suffix) {
  if (j.is_null()) return;
  std::string t = type_of(j);
  std::vector<int32_t> pre, suf;
  if (t == "Sequence") {
    for (const auto& sub : j.at("processors")) parse_post_processor(sub, where, prefix, suffix);
    return;
  } else if (t == "ByteLevel") {
    return;  // only adjusts offsets
  } else if (t == "TemplateProcessing") {
    bool seen_a = false;
    for (const auto& piece : j.at("single")) {
      if (piece.contains("Sequence")) {
        std::string id = piece["Sequence"].at("id").get<std::string>();
        check(id == "A" && !seen_a, where, "TemplateProcessing single template must hold $A once, got $", id);
        seen_a = true;
      } else if (piece.contains("SpecialToken")) {
        std::string name = piece["SpecialToken"].at("id").get<std::string>();
        const json& specials = j.at("special_tokens");
        check(specials.contains(name), where, "TemplateProcessing uses special token \"", name,
              "\" that its special_tokens do not define");
        for (const auto& id : specials[name].at("ids")) (seen_a ? suf : pre).push_back(id.get<int32_t>());
      } else {
        fail(where, "TemplateProcessing has a piece that is neither Sequence nor SpecialToken");
      }
    }
    check(seen_a, where, "TemplateProcessing single template has no $A");
  } else if (t == "RobertaProcessing" || t == "BertProcessing") {
    pre.push_back(j.at("cls").at(1).get<int32_t>());
    suf.push_back(j.at("sep").at(1).get<int32_t>());
  } else {
    fail(where, "unsupported post-processor \"", t, "\" (supported: TemplateProcessing, ByteLevel, ",
         "RobertaProcessing, BertProcessing, Sequence)");
  }
  // A later processor wraps the output of the earlier ones.
  prefix->insert(prefix->begin(), pre.begin(), pre.end());
  suffix->insert(suffix->end(), suf.begin(), suf.end());
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Tokenizer
// ------------------------------------------------------------------------------------------------

struct Tokenizer::Impl {
  std::string path;
  std::vector<AddedToken> added;                    // in file order
  std::unordered_map<std::string, int32_t> added_by_content;  // -> index into `added`
  std::unordered_map<int32_t, int32_t> added_by_id;           // -> index into `added`
  std::unordered_set<std::string> special_contents;
  TokenTrie raw_trie, normalized_trie;              // tokens matched before / after normalization
  std::vector<Normalizer> normalizers;
  std::vector<PreTokenizer> pre_tokenizers;
  Bpe bpe;
  std::vector<std::string> id_to_vocab;             // model vocabulary by id ("" where absent)
  std::vector<int32_t> post_prefix, post_suffix;
  bool has_decoder = false;
  std::vector<DecoderStep> decoder;
  int64_t vocab_size = 0;

  std::string normalize(std::string s) const {
    for (const auto& n : normalizers) {
      switch (n.kind) {
        case Normalizer::kNFC: s = unicode_map(s, UTF8PROC_STABLE | UTF8PROC_COMPOSE, path); break;
        case Normalizer::kNFD: s = unicode_map(s, UTF8PROC_STABLE | UTF8PROC_DECOMPOSE, path); break;
        case Normalizer::kNFKC:
          s = unicode_map(s, UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT, path);
          break;
        case Normalizer::kNFKD:
          s = unicode_map(s, UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT, path);
          break;
        case Normalizer::kLowercase: {
          std::string out;
          for (size_t i = 0; i < s.size(); i += char_len(static_cast<unsigned char>(s[i])))
            append_utf8(out, static_cast<uint32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(decode_char(s, i)))));
          s = std::move(out);
          break;
        }
        case Normalizer::kPrepend:
          if (!s.empty()) s = n.text + s;  // HF prepends to non-empty strings only
          break;
        case Normalizer::kReplace: n.pattern.replace_all_in(s, n.text); break;
        case Normalizer::kStrip: {
          size_t a = 0, b = s.size();
          if (n.left)
            while (a < b && is_space(decode_char(s, a))) a += char_len(static_cast<unsigned char>(s[a]));
          if (n.right)
            while (b > a && is_space(decode_char(s, prev_char_start(s, b)))) b = prev_char_start(s, b);
          s = s.substr(a, b - a);
          break;
        }
      }
    }
    return s;
  }

  // HF AddedVocabulary::find_matches + split: cuts `piece` around added tokens found by `trie`,
  // honouring single_word, lstrip and rstrip; appends the non-empty parts.
  void split_added(const Piece& piece, const TokenTrie& trie, std::vector<Piece>* out) const {
    const std::string& s = piece.text;
    auto emit = [&](size_t a, size_t b, int32_t id) {
      if (a < b) out->push_back(Piece{s.substr(a, b - a), piece.at_start && a == 0, id});
    };
    if (trie.empty()) return emit(0, s.size(), -1);
    size_t done = 0;  // end of the last emitted part
    for (size_t i = 0; i < s.size();) {
      size_t len = 0;
      int32_t index = trie.longest_at(s, i, &len);
      if (index < 0) {
        ++i;
        continue;
      }
      size_t start = i, stop = i + len;
      i = stop;  // the search goes on after this match even if it is discarded below
      const AddedToken& tok = added[index];
      if (tok.single_word) {
        bool word_before = start > 0 && is_word_char(decode_char(s, prev_char_start(s, start)));
        bool word_after = stop < s.size() && is_word_char(decode_char(s, stop));
        if (word_before || word_after) continue;
      }
      if (tok.lstrip) {
        size_t a = start;
        while (a > 0 && is_space(decode_char(s, prev_char_start(s, a)))) a = prev_char_start(s, a);
        start = std::max(a, done);
      }
      if (tok.rstrip)
        while (stop < s.size() && is_space(decode_char(s, stop))) stop += char_len(static_cast<unsigned char>(s[stop]));
      emit(done, start, -1);
      out->push_back(Piece{s.substr(start, stop - start), piece.at_start && start == 0, tok.id});
      done = stop;
    }
    emit(done, s.size(), -1);
  }

  void pre_tokenize(const PreTokenizer& p, const Piece& piece, std::vector<Piece>* out) const {
    switch (p.kind) {
      case PreTokenizer::kSplit:
        return split_piece(piece, p.pattern, p.behavior, p.invert, out);
      case PreTokenizer::kByteLevel: {
        Piece whole = piece;
        if (p.add_prefix_space && whole.text[0] != ' ') whole.text.insert(0, " ");
        std::vector<Piece> parts;
        if (p.use_regex) {
          Pattern gpt2{{}, p.gpt2};
          split_piece(whole, gpt2, Behavior::kIsolated, false, &parts);
        } else {
          parts.push_back(std::move(whole));
        }
        const ByteTable& table = byte_table();
        for (auto& part : parts) {
          std::string mapped;
          mapped.reserve(part.text.size() * 2);
          for (unsigned char c : part.text) mapped += table.to_char[c];
          part.text = std::move(mapped);
          out->push_back(std::move(part));
        }
        return;
      }
      case PreTokenizer::kMetaspace: {
        Piece whole = piece;
        replace_all(whole.text, " ", p.replacement);
        bool starts = whole.text.compare(0, p.replacement.size(), p.replacement) == 0;
        // "first": only the piece at the very start of the input (HF: original offset 0), so not
        // text that follows a special token.
        if (!starts && (p.prepend == Prepend::kAlways || (p.prepend == Prepend::kFirst && whole.at_start)))
          whole.text.insert(0, p.replacement);
        if (p.split) return split_piece(whole, p.pattern, Behavior::kMergedWithNext, false, out);
        out->push_back(std::move(whole));
        return;
      }
    }
  }

  std::vector<int32_t> encode(const std::string& text, bool add_special_tokens) const {
    size_t bad = first_invalid_utf8(text);
    check(bad == std::string::npos, path, "cannot encode text that is not valid UTF-8 (byte ", bad, ")");
    // 1-2. added tokens on the raw text, then normalization and normalized added tokens per piece.
    std::vector<Piece> raw, pieces;
    split_added(Piece{text, true, -1}, raw_trie, &raw);
    for (auto& piece : raw) {
      if (piece.id >= 0) {
        pieces.push_back(std::move(piece));
        continue;
      }
      if (!normalizers.empty()) piece.text = normalize(piece.text);
      split_added(piece, normalized_trie, &pieces);
    }
    // 3. pre-tokenizers, each over the output of the previous one; added tokens pass through.
    for (const auto& p : pre_tokenizers) {
      std::vector<Piece> next;
      next.reserve(pieces.size() * 2);
      for (auto& piece : pieces) {
        if (piece.id >= 0) next.push_back(std::move(piece));
        else pre_tokenize(p, piece, &next);
      }
      pieces = std::move(next);
    }
    // 4. the model; 5. the post-processor.
    std::vector<int32_t> ids;
    if (add_special_tokens) ids = post_prefix;
    for (const auto& piece : pieces) {
      if (piece.id >= 0) ids.push_back(piece.id);
      else bpe.tokenize(piece.text, &ids, path);
    }
    if (add_special_tokens) ids.insert(ids.end(), post_suffix.begin(), post_suffix.end());
    return ids;
  }

  const std::string* token_string(int32_t id) const {
    auto it = added_by_id.find(id);
    if (it != added_by_id.end()) return &added[it->second].content;
    if (id >= 0 && static_cast<size_t>(id) < id_to_vocab.size() && !id_to_vocab[id].empty()) return &id_to_vocab[id];
    return nullptr;
  }

  std::string decode(const std::vector<int32_t>& ids, bool skip_special) const {
    std::vector<std::string> toks;
    toks.reserve(ids.size());
    for (int32_t id : ids) {
      const std::string* t = token_string(id);
      if (!t) continue;  // HF drops unknown ids
      if (skip_special && special_contents.count(*t)) continue;
      toks.push_back(*t);
    }
    if (!has_decoder) {  // HF joins with spaces when there is no decoder
      std::string out;
      for (size_t i = 0; i < toks.size(); ++i) out += (i ? " " : "") + toks[i];
      return out;
    }
    for (const auto& d : decoder) run_decoder(d, &toks);
    std::string out;
    for (const auto& t : toks) out += t;
    return out;
  }

  static void run_decoder(const DecoderStep& d, std::vector<std::string>* toks) {
    switch (d.kind) {
      case DecoderStep::kByteLevel: {
        // Stand-in characters back to bytes; a token with any other character keeps its own bytes.
        const ByteTable& table = byte_table();
        std::string bytes;
        for (const auto& t : *toks) {
          std::string mine;
          bool ok = true;
          for (size_t i = 0; i < t.size() && ok; i += char_len(static_cast<unsigned char>(t[i]))) {
            uint32_t cp = decode_char(t, i);
            ok = cp < 512 && table.from_cp[cp] >= 0;
            if (ok) mine += static_cast<char>(table.from_cp[cp]);
          }
          bytes += ok ? mine : t;
        }
        *toks = {utf8_lossy(bytes)};
        return;
      }
      case DecoderStep::kMetaspace:
        // HF drops every replacement character of the first token (not only a leading one).
        for (size_t i = 0; i < toks->size(); ++i)
          replace_all((*toks)[i], d.text, i == 0 && d.prepend != Prepend::kNever ? "" : " ");
        return;
      case DecoderStep::kReplace:
        for (auto& t : *toks) d.pattern.replace_all_in(t, d.text);
        return;
      case DecoderStep::kByteFallback: {
        // Runs of <0xNN> tokens become their bytes if those are valid UTF-8, else one U+FFFD per byte.
        std::vector<std::string> out;
        std::string run;
        size_t run_len = 0;
        auto flush = [&]() {
          if (!run_len) return;
          if (first_invalid_utf8(run) == std::string::npos) out.push_back(run);
          else for (size_t k = 0; k < run_len; ++k) out.push_back("\xEF\xBF\xBD");
          run.clear(), run_len = 0;
        };
        for (auto& t : *toks) {
          int byte = -1;
          if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' &&
              std::isxdigit(static_cast<unsigned char>(t[3])) && std::isxdigit(static_cast<unsigned char>(t[4])))
            byte = std::stoi(t.substr(3, 2), nullptr, 16);
          if (byte >= 0) {
            run += static_cast<char>(byte), ++run_len;
          } else {
            flush();
            out.push_back(std::move(t));
          }
        }
        flush();
        *toks = std::move(out);
        return;
      }
      case DecoderStep::kFuse: {
        std::string all;
        for (const auto& t : *toks) all += t;
        *toks = {all};
        return;
      }
      case DecoderStep::kStrip:
        // Up to `start` leading and `stop` trailing copies of the content character, per token.
        for (auto& t : *toks) {
          const size_t w = d.text.size();
          size_t a = 0, b = t.size();
          for (size_t k = 0; k < d.start && a + w <= b && t.compare(a, w, d.text) == 0; ++k) a += w;
          for (size_t k = 0; k < d.stop && b >= a + w && t.compare(b - w, w, d.text) == 0; ++k) b -= w;
          t = t.substr(a, b - a);
        }
        return;
    }
  }
};

Tokenizer Tokenizer::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  check(in.good(), path, "cannot open tokenizer file");
  std::stringstream buf;
  buf << in.rdbuf();
  check(!in.bad(), path, "cannot read tokenizer file");
  return from_json_string(buf.str(), path);
}

Tokenizer Tokenizer::from_json_string(const std::string& text, const std::string& where) {
  auto impl = std::make_shared<Impl>();
  impl->path = where;
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail(where, "invalid JSON: ", e.what());
  }
  try {
    check(j.is_object(), where, "tokenizer.json must hold a JSON object");
    // Model.
    check(j.contains("model") && j["model"].is_object(), where, "no \"model\" object");
    const json& m = j["model"];
    std::string mtype = type_of(m);
    if (mtype.empty() && m.contains("merges")) mtype = "BPE";  // very old files omit the type
    check(mtype == "BPE", where, "unsupported model type \"", mtype, "\" (only BPE is supported)");
    if (m.contains("dropout") && !m["dropout"].is_null())
      check(m["dropout"].get<double>() == 0.0, where, "BPE dropout is not supported (it is random)");
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (m.contains(key) && !m[key].is_null())
        check(m[key].get<std::string>().empty(), where, "BPE ", key, " is not supported");
    Bpe& bpe = impl->bpe;
    int32_t max_id = -1;
    for (const auto& entry : m.at("vocab").items()) {
      const std::string& tok = entry.key();
      int32_t v = entry.value().get<int32_t>();
      check(v >= 0, where, "vocab token \"", tok, "\" has negative id ", v);
      bpe.vocab[tok] = v;
      max_id = std::max(max_id, v);
    }
    impl->id_to_vocab.assign(static_cast<size_t>(max_id + 1), "");
    for (const auto& [tok, id] : bpe.vocab) impl->id_to_vocab[id] = tok;
    auto vocab_id = [&](const std::string& tok, const char* what) {
      auto it = bpe.vocab.find(tok);
      check(it != bpe.vocab.end(), where, what, " \"", tok, "\" is not in the vocabulary");
      return it->second;
    };
    int32_t rank = 0;
    for (const auto& merge : m.value("merges", json::array())) {
      std::string a, b;
      if (merge.is_string()) {  // "a b"
        std::string s = merge.get<std::string>();
        size_t sp = s.find(' ');
        check(sp != std::string::npos && s.find(' ', sp + 1) == std::string::npos, where, "merge ", rank + 1,
              " \"", s, "\" is not two tokens separated by one space");
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else {  // ["a", "b"]
        check(merge.is_array() && merge.size() == 2, where, "merge ", rank + 1, " is not a pair of tokens");
        a = merge[0].get<std::string>(), b = merge[1].get<std::string>();
      }
      bpe.merges[Bpe::key(vocab_id(a, "merge token"), vocab_id(b, "merge token"))] = {rank,
                                                                                     vocab_id(a + b, "merged token")};
      ++rank;
    }
    if (m.contains("unk_token") && !m["unk_token"].is_null())
      bpe.unk_id = vocab_id(m["unk_token"].get<std::string>(), "unk_token");
    bpe.fuse_unk = get_bool(m, "fuse_unk", false);
    bpe.byte_fallback = get_bool(m, "byte_fallback", false);
    bpe.ignore_merges = get_bool(m, "ignore_merges", false);
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof name, "<0x%02X>", b);
      auto it = bpe.vocab.find(name);
      bpe.byte_ids[b] = it == bpe.vocab.end() ? -1 : it->second;
    }

    // Pipeline components.
    if (j.contains("normalizer")) parse_normalizer(j["normalizer"], where, &impl->normalizers);
    if (j.contains("pre_tokenizer")) parse_pre_tokenizer(j["pre_tokenizer"], where, &impl->pre_tokenizers);
    if (j.contains("post_processor"))
      parse_post_processor(j["post_processor"], where, &impl->post_prefix, &impl->post_suffix);
    if (j.contains("decoder") && !j["decoder"].is_null()) {
      impl->has_decoder = true;
      parse_decoder(j["decoder"], where, &impl->decoder);
    }

    // Added tokens. Those with normalized=true are matched against normalized text, so their
    // pattern is their normalized content (as HF does).
    int64_t size = max_id + 1;
    for (const auto& a : j.value("added_tokens", json::array())) {
      AddedToken t;
      t.id = a.at("id").get<int32_t>();
      t.content = a.at("content").get<std::string>();
      t.special = get_bool(a, "special", false);
      t.single_word = get_bool(a, "single_word", false);
      t.lstrip = get_bool(a, "lstrip", false);
      t.rstrip = get_bool(a, "rstrip", false);
      t.normalized = get_bool(a, "normalized", !t.special);
      check(t.id >= 0, where, "added token \"", t.content, "\" has negative id");
      check(first_invalid_utf8(t.content) == std::string::npos, where, "added token ", t.id, " is not UTF-8");
      if (t.content.empty()) continue;  // HF ignores empty added tokens
      int32_t index = static_cast<int32_t>(impl->added.size());
      impl->added_by_content.emplace(t.content, index);
      impl->added_by_id[t.id] = index;
      if (t.special) impl->special_contents.insert(t.content);
      size = std::max<int64_t>(size, t.id + 1);
      impl->added.push_back(t);
    }
    // HF builds the tries from special tokens first, then the others; among equal contents the
    // first one wins.
    for (int pass = 0; pass < 2; ++pass) {
      for (size_t i = 0; i < impl->added.size(); ++i) {
        const AddedToken& t = impl->added[i];
        if (t.special != (pass == 0)) continue;
        if (t.normalized) {
          std::string n = impl->normalizers.empty() ? t.content : impl->normalize(t.content);
          if (!n.empty()) impl->normalized_trie.add(n, static_cast<int32_t>(i));
        } else {
          impl->raw_trie.add(t.content, static_cast<int32_t>(i));
        }
      }
    }
    impl->vocab_size = size;
  } catch (const json::exception& e) {
    fail(where, "malformed tokenizer.json: ", e.what());
  }
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(const std::string& text, bool add_special_tokens) const {
  return impl_->encode(text, add_special_tokens);
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  return impl_->decode(ids, skip_special);
}

int32_t Tokenizer::token_id(const std::string& token) const {
  auto it = impl_->added_by_content.find(token);
  if (it != impl_->added_by_content.end()) return impl_->added[it->second].id;
  auto v = impl_->bpe.vocab.find(token);
  return v == impl_->bpe.vocab.end() ? -1 : v->second;
}

std::string Tokenizer::id_to_token(int32_t id) const {
  const std::string* t = impl_->token_string(id);
  return t ? *t : std::string();
}

bool Tokenizer::is_special(int32_t id) const {
  auto it = impl_->added_by_id.find(id);
  return it != impl_->added_by_id.end() && impl_->added[it->second].special;
}

int64_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

const std::string& Tokenizer::path() const { return impl_->path; }

}  // namespace mlaforge
