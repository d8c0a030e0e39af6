// Tests of src/text: tokenizer.json BPE against HF tokenizers' own ids (fixtures under
// tests/fixtures/tokenizer/<name>/, made by tools/make_fixtures.py), hand-checked cases on the
// bundled qwen2vl-shapes tokenizer and small hand-written Llama-style tokenizers, and chat formats.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "test_paths.h"
#include "text/chat.h"
#include "text/tokenizer.h"

namespace mlaforge {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Ids = std::vector<int32_t>;

const std::string kRoot = MLAFORGE_SOURCE_DIR;
const std::string kShapes = kRoot + "/models/qwen2vl-shapes";
const std::string kFixtures = kRoot + "/tests/fixtures/tokenizer";

// A fresh directory for files a test writes.
std::string temp_dir(const std::string& name) {
  fs::path d = fs::temp_directory_path() / ("mlaforge_text_test_" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d.string();
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// The message of the Error `f` throws ("" and a test failure if it throws none).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected mlaforge::Error";
  return "";
}

// ---------------------------------------------------------------------------------------------
// Fixtures made with HF tokenizers: every string, ids exact with and without special tokens,
// and both decodes.
// ---------------------------------------------------------------------------------------------

void check_fixture(const std::string& name) {
  const std::string dir = kFixtures + "/" + name;
  if (!fs::exists(dir + "/tokenizer.json") || !fs::exists(dir + "/cases.json"))
    GTEST_SKIP() << "fixture " << dir << " is absent (tools/make_fixtures.py makes it)";
  Tokenizer tok = Tokenizer::from_file(dir + "/tokenizer.json");
  json cases = json::parse(std::ifstream(dir + "/cases.json"));
  const auto& strings = cases.at("strings");
  ASSERT_GT(strings.size(), 0u);
  int bad = 0;
  for (size_t i = 0; i < strings.size(); ++i) {
    const std::string s = strings[i].get<std::string>();
    const Ids want = cases["ids"][i].get<Ids>();
    const Ids got = tok.encode(s, false);
    const Ids got_special = tok.encode(s, true);
    const std::string dec = tok.decode(want, false), dec_skip = tok.decode(want, true);
    bool ok = got == want && got_special == cases["ids_with_special"][i].get<Ids>() &&
              dec == cases["decoded"][i].get<std::string>() &&
              dec_skip == cases["decoded_skip_special"][i].get<std::string>();
    if (!ok && ++bad <= 5) {
      EXPECT_EQ(got, want) << name << " string " << i << ": " << json(s).dump();
      EXPECT_EQ(got_special, cases["ids_with_special"][i].get<Ids>()) << name << " string " << i;
      EXPECT_EQ(dec, cases["decoded"][i].get<std::string>()) << name << " string " << i;
      EXPECT_EQ(dec_skip, cases["decoded_skip_special"][i].get<std::string>()) << name << " string " << i;
    }
  }
  EXPECT_EQ(bad, 0) << name << ": " << bad << " of " << strings.size() << " strings differ from HF";
}

TEST(Tokenizer, FixtureQwen2vlShapes) { check_fixture("qwen2vl-shapes"); }
TEST(Tokenizer, FixtureQwen2Nfc) { check_fixture("qwen2-nfc"); }
TEST(Tokenizer, FixtureLlamaLegacy) { check_fixture("llama-legacy"); }
TEST(Tokenizer, FixtureLlamaMetaspaceFirst) { check_fixture("llama-metaspace-first"); }
TEST(Tokenizer, FixtureLlamaMetaspaceAlways) { check_fixture("llama-metaspace-always"); }
TEST(Tokenizer, FixtureLlamaTransformers5) { check_fixture("llama-transformers5"); }

// Any other fixture directory that appears is checked too.
TEST(Tokenizer, FixturesOthers) {
  const std::vector<std::string> named = {"qwen2vl-shapes", "qwen2-nfc", "llama-legacy", "llama-metaspace-first",
                                          "llama-metaspace-always", "llama-transformers5"};
  int checked = 0;
  if (fs::is_directory(kFixtures)) {
    for (const auto& e : fs::directory_iterator(kFixtures)) {
      std::string name = e.path().filename().string();
      if (!e.is_directory() || std::find(named.begin(), named.end(), name) != named.end()) continue;
      SCOPED_TRACE(name);
      check_fixture(name);
      ++checked;
    }
  }
  if (!checked) GTEST_SKIP() << "no further fixtures under " << kFixtures;
}

// ---------------------------------------------------------------------------------------------
// The bundled qwen2vl-shapes tokenizer, checked by hand against its merges list.
// ---------------------------------------------------------------------------------------------

TEST(Tokenizer, QwenShapesPrompt) {
  Tokenizer tok = Tokenizer::from_file(kShapes + "/tokenizer.json");
  const std::string prompt =
      "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What color is the circle?<|im_end|>\n"
      "<|im_start|>assistant\n";
  // Pieces: <|im_start|> | "user" "\n" | 3 5 4 | "What" " color" " is" " the" " circle" "?" | <|im_end|>
  // | "\n" | <|im_start|> | "assistant" "\n". "What": merges (h,a)=16, (W,ha)=21, (Wha,t)=22.
  // "user" only merges to us+er, "assistant" to a s s i s t an t (the vocab has no longer pieces).
  const Ids want = {1,   407, 303, 205, 3,  5,  4,  285, 383, 280, 265, 335, 37,
                    2,   205, 1,   71,  89, 89, 79, 89,  90,  286, 90,  205};
  EXPECT_EQ(tok.encode(prompt), want);
  EXPECT_EQ(tok.encode(prompt, true), want);  // Qwen's post-processor adds nothing
  EXPECT_EQ(tok.decode(want, false), prompt);
  EXPECT_EQ(tok.decode(want, true), "user\nWhat color is the circle?\nassistant\n");

  EXPECT_EQ(tok.encode("How many objects are there?"), (Ids{291, 294, 315, 293, 281, 37}));
  // Two spaces: "\s+(?!\S)" takes the first alone, the second joins " world".
  EXPECT_EQ(tok.encode("hello  world\n\n"), (Ids{264, 277, 85, 227, 406, 358, 82, 74, 205, 205}));
  EXPECT_EQ(tok.encode("What is 12 + 34?"), (Ids{285, 280, 227, 23, 24, 227, 17, 227, 25, 26, 37}));
  EXPECT_EQ(tok.encode(""), Ids{});
}

TEST(Tokenizer, QwenShapesVocabulary) {
  Tokenizer tok = Tokenizer::from_file(kShapes + "/tokenizer.json");
  EXPECT_EQ(tok.vocab_size(), 523);
  EXPECT_EQ(tok.token_id("<|im_start|>"), 1);
  EXPECT_EQ(tok.token_id("<|image_pad|>"), 5);
  EXPECT_EQ(tok.token_id("What"), 285);
  EXPECT_EQ(tok.token_id("no such token"), -1);
  EXPECT_EQ(tok.id_to_token(2), "<|im_end|>");
  EXPECT_EQ(tok.id_to_token(383), "\xC4\xA0" "color");  // "Ġcolor"
  EXPECT_EQ(tok.id_to_token(100000), "");
  EXPECT_TRUE(tok.is_special(0));
  EXPECT_TRUE(tok.is_special(6));
  EXPECT_FALSE(tok.is_special(285));
  // Unknown ids are dropped, as HF does; bytes that are not UTF-8 decode to U+FFFD.
  EXPECT_EQ(tok.decode({285, 100000, 37}), "What?");
}

TEST(Tokenizer, QwenShapesUnicodeAndSpeed) {
  Tokenizer tok = Tokenizer::from_file(kShapes + "/tokenizer.json");
  for (const std::string s : {"café naïve 東京 🙂", "tab\tline\r\nx  \n", "  leading and trailing  "}) {
    Ids ids = tok.encode(s);
    EXPECT_EQ(tok.decode(ids), s);
  }
  // A 100-odd token prompt must encode in well under a millisecond once words are cached.
  std::string prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>";
  for (int i = 0; i < 8; ++i) prompt += "How many small red circles are there in the top left of the image? ";
  prompt += "<|im_end|>\n<|im_start|>assistant\n";
  ASSERT_GT(tok.encode(prompt).size(), 100u);
  const int reps = 200;
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) tok.encode(prompt);
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps;
  EXPECT_LT(ms, 1.0) << "encoding took " << ms << " ms";
}

// ---------------------------------------------------------------------------------------------
// Small hand-written tokenizers.
// ---------------------------------------------------------------------------------------------

// A Llama-style BPE with byte fallback: <unk> <s> </s>, <0x00>..<0xFF> (ids 3..258), then
// "▁" h i t e r ▁h ▁hi er he ▁t (259..269). Merge ranks: (▁,h) (▁h,i) (e,r) (h,e) (▁,t).
json llama_json(const json& normalizer, const json& pre_tokenizer, const json& decoder) {
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    vocab[name] = 3 + b;
  }
  int id = 259;
  for (const char* t : {"▁", "h", "i", "t", "e", "r", "▁h", "▁hi", "er", "he", "▁t"}) vocab[t] = id++;
  json added = json::array();
  int aid = 0;
  for (const char* t : {"<unk>", "<s>", "</s>"})
    added.push_back({{"id", aid++}, {"content", t}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                     {"normalized", false}, {"special", true}});
  return {
      {"version", "1.0"},
      {"added_tokens", added},
      {"normalizer", normalizer},
      {"pre_tokenizer", pre_tokenizer},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single",
         {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}}},
      {"decoder", decoder},
      {"model",
       {{"type", "BPE"},
        {"unk_token", "<unk>"},
        {"fuse_unk", true},
        {"byte_fallback", true},
        {"vocab", vocab},
        // json::array: a brace list of string pairs would become an object
        {"merges", json::array({json::array({"▁", "h"}), json::array({"▁h", "i"}), json::array({"e", "r"}),
                                json::array({"h", "e"}), json::array({"▁", "t"})})}}}};
}

const json kLegacyNormalizer = {{"type", "Sequence"},
                                {"normalizers",
                                 {{{"type", "Prepend"}, {"prepend", "▁"}},
                                  {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "▁"}}}}};
const json kSequenceDecoder = {{"type", "Sequence"},
                               {"decoders",
                                {{{"type", "Replace"}, {"pattern", {{"String", "▁"}}}, {"content", " "}},
                                 {{"type", "ByteFallback"}},
                                 {{"type", "Fuse"}},
                                 {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}};
json metaspace(const char* scheme, bool split) {
  return {{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", scheme}, {"split", split}};
}

// ids of the hand-written vocab
constexpr int32_t kH = 260, kI = 261, kT = 262, kE = 263, kHi = 266, kEr = 267, kSpT = 269;
int32_t byte_id(int b) { return 3 + b; }

TEST(Tokenizer, LlamaLegacyHandWritten) {
  Tokenizer tok = Tokenizer::from_json_string(llama_json(kLegacyNormalizer, nullptr, kSequenceDecoder).dump(),
                                              "legacy.json");
  // "▁hi▁there": (▁,h) then (▁h,i); in "there" (e,r) ranks before (h,e), which is then stale.
  const Ids there = {kHi, kSpT, kH, kEr, kE};
  EXPECT_EQ(tok.encode("hi there"), there);
  EXPECT_EQ(tok.encode("hi there", true), (Ids{1, kHi, kSpT, kH, kEr, kE}));
  // "é" is not in the vocabulary: its UTF-8 bytes C3 A9 fall back to <0xC3> <0xA9>.
  EXPECT_EQ(tok.encode("hé"), (Ids{kHi - 1, byte_id(0xC3), byte_id(0xA9)}));
  // Legacy form: text right after a special token gets its own "▁".
  EXPECT_EQ(tok.encode("<s>hi"), (Ids{1, kHi}));
  EXPECT_EQ(tok.encode("hi</s>hi"), (Ids{kHi, 2, kHi}));
  EXPECT_EQ(tok.encode(""), Ids{});
  EXPECT_EQ(tok.encode("", true), Ids{1});

  EXPECT_EQ(tok.decode(there), "hi there");
  EXPECT_EQ(tok.decode({1, kHi}, false), "<s> hi");
  EXPECT_EQ(tok.decode({1, kHi}, true), "hi");
  EXPECT_EQ(tok.decode({kHi - 1, byte_id(0xC3), byte_id(0xA9)}), "hé");
  // A lone lead byte is not UTF-8: one U+FFFD per byte.
  EXPECT_EQ(tok.decode({kHi, byte_id(0xC3), kT}), "hi\xEF\xBF\xBDt");
  EXPECT_EQ(tok.vocab_size(), 270);
  EXPECT_EQ(tok.token_id("<0x0A>"), byte_id(0x0A));
}

TEST(Tokenizer, LlamaMetaspaceHandWritten) {
  Tokenizer first = Tokenizer::from_json_string(
      llama_json(nullptr, metaspace("first", false), metaspace("first", false)).dump(), "first.json");
  Tokenizer always = Tokenizer::from_json_string(
      llama_json(nullptr, metaspace("always", false), metaspace("always", false)).dump(), "always.json");
  Tokenizer split = Tokenizer::from_json_string(
      llama_json(nullptr, metaspace("always", true), kSequenceDecoder).dump(), "split.json");
  const Ids there = {kHi, kSpT, kH, kEr, kE};
  EXPECT_EQ(first.encode("hi there"), there);
  EXPECT_EQ(always.encode("hi there"), there);
  EXPECT_EQ(split.encode("hi there"), there);
  EXPECT_EQ(first.encode(" hi"), (Ids{kHi}));  // already starts with "▁": nothing prepended
  // "first": only the piece at the very start of the input gets "▁", not text after a special token.
  EXPECT_EQ(first.encode("<s>hi"), (Ids{1, kH, kI}));
  EXPECT_EQ(first.encode("hi</s>there"), (Ids{kHi, 2, kT, kH, kEr, kE}));
  EXPECT_EQ(always.encode("<s>hi"), (Ids{1, kHi}));
  EXPECT_EQ(always.encode("hi</s>there"), (Ids{kHi, 2, kSpT, kH, kEr, kE}));
  // Metaspace decoder: replacement characters of the first token vanish, later ones become spaces;
  // it does no byte fallback.
  EXPECT_EQ(first.decode(there), "hi there");
  EXPECT_EQ(first.decode({1, kHi}, false), "<s> hi");
  EXPECT_EQ(first.decode({byte_id(0x41)}), "<0x41>");
}

TEST(Tokenizer, ByteLevelGpt2Regex) {
  // A bare ByteLevel pre-tokenizer with its own GPT-2 regex, merges written as "a b" strings.
  json vocab = json::object();
  // Stand-in characters in byte order: the ByteLevel alphabet, ids 0..255.
  std::vector<std::string> chars(256);
  int next = 256;
  for (int b = 0; b < 256; ++b) {
    bool self = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    int cp = self ? b : next++;
    std::string s;
    if (cp < 0x80) s += static_cast<char>(cp);
    else s += static_cast<char>(0xC0 | (cp >> 6)), s += static_cast<char>(0x80 | (cp & 0x3F));
    vocab[s] = b;
  }
  vocab["\xC4\xA0w"] = 256;  // "Ġw"
  json j = {{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array({"\xC4\xA0 w"})}}},
            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
            {"decoder", {{"type", "ByteLevel"}}}};
  Tokenizer tok = Tokenizer::from_json_string(j.dump(), "gpt2.json");
  EXPECT_EQ(tok.encode("a world"), (Ids{'a', 256, 'o', 'r', 'l', 'd'}));
  // "a  w": the first space stands alone (\s+(?!\S)), the second joins "w".
  EXPECT_EQ(tok.encode("a  w"), (Ids{'a', 0x20, 256}));
  EXPECT_EQ(tok.decode({'a', 256}), "a w");
  EXPECT_EQ(tok.decode({0xC3}), "\xEF\xBF\xBD");  // a lone lead byte
  EXPECT_EQ(tok.vocab_size(), 257);
}

TEST(Tokenizer, AddedTokenFlags) {
  json j = llama_json(kLegacyNormalizer, nullptr, kSequenceDecoder);
  // lstrip/rstrip take the surrounding whitespace into the token.
  j["added_tokens"].push_back({{"id", 270}, {"content", "<image>"}, {"single_word", false}, {"lstrip", true},
                               {"rstrip", true}, {"normalized", false}, {"special", true}});
  Tokenizer tok = Tokenizer::from_json_string(j.dump(), "flags.json");
  EXPECT_EQ(tok.encode("hi <image> hi"), (Ids{kHi, 270, kHi}));
  EXPECT_EQ(tok.encode("hi<image>hi"), (Ids{kHi, 270, kHi}));
  EXPECT_EQ(tok.decode({kHi, 270, kHi}, true), "hi hi");
  EXPECT_EQ(tok.decode({kHi, 270, kHi}, false), "hi<image> hi");
}

// ---------------------------------------------------------------------------------------------
// Errors name the file and the problem.
// ---------------------------------------------------------------------------------------------

TEST(Tokenizer, Errors) {
  const std::string dir = temp_dir("tokenizer_errors");
  const std::string missing = dir + "/missing/tokenizer.json";
  EXPECT_NE(error_of([&] { Tokenizer::from_file(missing); }).find(missing), std::string::npos);

  const std::string invalid = dir + "/invalid.json";
  write_file(invalid, "{\"model\": ");
  std::string msg = error_of([&] { Tokenizer::from_file(invalid); });
  EXPECT_NE(msg.find(invalid), std::string::npos) << msg;
  EXPECT_NE(msg.find("invalid JSON"), std::string::npos) << msg;

  const std::string wordpiece = dir + "/wordpiece.json";
  write_file(wordpiece, R"({"model": {"type": "WordPiece", "vocab": {"a": 0}}})");
  msg = error_of([&] { Tokenizer::from_file(wordpiece); });
  EXPECT_NE(msg.find(wordpiece), std::string::npos) << msg;
  EXPECT_NE(msg.find("WordPiece"), std::string::npos) << msg;

  const std::string bert = dir + "/bert.json";
  json j = llama_json({{"type", "BertNormalizer"}}, nullptr, kSequenceDecoder);
  write_file(bert, j.dump());
  msg = error_of([&] { Tokenizer::from_file(bert); });
  EXPECT_NE(msg.find(bert), std::string::npos) << msg;
  EXPECT_NE(msg.find("BertNormalizer"), std::string::npos) << msg;

  const std::string bad_merge = dir + "/bad_merge.json";
  j = llama_json(kLegacyNormalizer, nullptr, kSequenceDecoder);
  j["model"]["merges"].push_back(json::array({"x", "y"}));
  write_file(bad_merge, j.dump());
  msg = error_of([&] { Tokenizer::from_file(bad_merge); });
  EXPECT_NE(msg.find(bad_merge), std::string::npos) << msg;

  Tokenizer tok = Tokenizer::from_file(kShapes + "/tokenizer.json");
  msg = error_of([&] { tok.encode("bad \xC3 utf8"); });
  EXPECT_NE(msg.find("UTF-8"), std::string::npos) << msg;
  fs::remove_all(dir);
}

// ---------------------------------------------------------------------------------------------
// Chat formats.
// ---------------------------------------------------------------------------------------------

// Qwen2-VL's official template (as in its chat_template.json), with the default system turn.
const char* kQwen2VLTemplate =
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string "
    "%}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if "
    "content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = "
    "image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif "
    "%}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content "
    "%}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value "
    "}}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] "
    "}}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt "
    "%}<|im_start|>assistant\n{% endif %}";

// llava-hf/llava-1.5-7b-hf's template; "\\n" is the Jinja escape as stored in its JSON.
const char* kLlavaTemplate =
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% "
    "endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ "
    "content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif "
    "%}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";

ChatTurn user_turn(bool image, const std::string& text) {
  ChatTurn t{"user", {}};
  if (image) t.items.push_back({true, ""});
  t.items.push_back({false, text});
  return t;
}

TEST(Chat, QwenShapesBundled) {
  ChatFormat chat = ChatFormat::from_model_dir(kShapes);
  EXPECT_EQ(chat.family(), ChatFormat::Family::kChatML);
  EXPECT_EQ(chat.default_system(), "");
  EXPECT_EQ(chat.source(), kShapes + "/chat_template.jinja");
  const std::string prompt = chat.render({user_turn(true, "What color is the circle?")});
  EXPECT_EQ(prompt,
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What color is the circle?<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(chat.render({user_turn(false, "Hi")}, false), "<|im_start|>user\nHi<|im_end|>\n");
  // Rendered and encoded with add_special_tokens=true, as a processor would.
  Tokenizer tok = Tokenizer::from_file(kShapes + "/tokenizer.json");
  Ids ids = tok.encode(prompt, true);
  ASSERT_GE(ids.size(), 7u);
  EXPECT_EQ((Ids(ids.begin(), ids.begin() + 7)), (Ids{1, 407, 303, 205, 3, 5, 4}));
}

TEST(Chat, QwenDefaultSystem) {
  ChatFormat chat = ChatFormat::from_template(kQwen2VLTemplate, "qwen2vl.jinja");
  EXPECT_EQ(chat.default_system(), "You are a helpful assistant.");
  EXPECT_EQ(chat.image_placeholder(), "<|vision_start|><|image_pad|><|vision_end|>");
  EXPECT_EQ(chat.render({user_turn(true, "Describe.")}),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n"
            "<|im_start|>assistant\n");
  ChatTurn sys{"system", {{false, "Be brief."}}};
  ChatTurn answer{"assistant", {{false, "A cat."}}};
  EXPECT_EQ(chat.render({sys, user_turn(false, "Q1"), answer, user_turn(false, "Q2")}),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
            "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n");

  // Qwen2.5's style: the default sits in a Jinja string with "\n" escapes, after other
  // "<|im_start|>system" occurrences that hold code.
  const std::string qwen25 =
      "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
      "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
      "helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{{- '<|im_start|>' + "
      "message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}";
  EXPECT_EQ(ChatFormat::from_template(qwen25, "qwen25").default_system(),
            "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.");
}

TEST(Chat, Llava) {
  ChatFormat chat = ChatFormat::from_template(kLlavaTemplate, "llava.json");
  EXPECT_EQ(chat.family(), ChatFormat::Family::kLlava);
  EXPECT_EQ(chat.image_placeholder(), "<image>\n");
  EXPECT_EQ(chat.render({user_turn(true, "What is shown?")}), "USER: <image>\nWhat is shown? ASSISTANT:");
  // Images come first within a turn whatever their position; each text gets a trailing space.
  ChatTurn mixed{"user", {{false, "Compare"}, {true, ""}, {false, "this."}}};
  EXPECT_EQ(chat.render({mixed}, false), "USER: <image>\nCompare this. ");
  ChatTurn sys{"system", {{false, "Be brief."}}};
  ChatTurn answer{"assistant", {{false, "A cat."}}};
  EXPECT_EQ(chat.render({sys, user_turn(true, "Q1"), answer, user_turn(false, "Q2")}),
            "Be brief. USER: <image>\nQ1 ASSISTANT: A cat. USER: Q2 ASSISTANT:");
}

TEST(Chat, TemplateSources) {
  const std::string dir = temp_dir("chat_sources");
  // chat_template.json
  write_file(dir + "/chat_template.json", json({{"chat_template", kLlavaTemplate}}).dump());
  EXPECT_EQ(ChatFormat::from_model_dir(dir).source(), dir + "/chat_template.json");
  EXPECT_EQ(ChatFormat::from_model_dir(dir).family(), ChatFormat::Family::kLlava);
  // tokenizer_config.json, named-template list
  fs::remove(dir + "/chat_template.json");
  json named = json::array(
      {{{"name", "tool_use"}, {"template", "x"}}, {{"name", "default"}, {"template", kQwen2VLTemplate}}});
  write_file(dir + "/tokenizer_config.json", json({{"chat_template", named}}).dump());
  ChatFormat chat = ChatFormat::from_model_dir(dir);
  EXPECT_EQ(chat.family(), ChatFormat::Family::kChatML);
  EXPECT_EQ(chat.default_system(), "You are a helpful assistant.");
  // chat_template.jinja wins over the others
  write_file(dir + "/chat_template.jinja", kLlavaTemplate);
  EXPECT_EQ(ChatFormat::from_model_dir(dir).family(), ChatFormat::Family::kLlava);
  fs::remove_all(dir);
}

TEST(Chat, Errors) {
  const std::string dir = temp_dir("chat_errors");
  std::string msg = error_of([&] { ChatFormat::from_model_dir(dir); });
  EXPECT_NE(msg.find(dir), std::string::npos) << msg;

  write_file(dir + "/chat_template.jinja", "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}");
  msg = error_of([&] { ChatFormat::from_model_dir(dir); });
  EXPECT_NE(msg.find(dir + "/chat_template.jinja"), std::string::npos) << msg;
  EXPECT_NE(msg.find("unrecognised"), std::string::npos) << msg;

  fs::remove(dir + "/chat_template.jinja");
  write_file(dir + "/tokenizer_config.json", "{not json");
  msg = error_of([&] { ChatFormat::from_model_dir(dir); });
  EXPECT_NE(msg.find(dir + "/tokenizer_config.json"), std::string::npos) << msg;

  // A ChatML template without vision markers cannot place an image.
  ChatFormat text_only = ChatFormat::from_template("<|im_start|>{{ m['role'] }}", "text_only.jinja");
  msg = error_of([&] { text_only.render({user_turn(true, "x")}); });
  EXPECT_NE(msg.find("text_only.jinja"), std::string::npos) << msg;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace mlaforge
