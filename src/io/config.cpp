#include "io/config.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json_file.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace mlaforge {
namespace {

// Looks a key up in `primary` (e.g. text_config) and then in `fallback` (the top level).
const json* lookup(const json& primary, const json& fallback, const std::string& key) {
  if (primary.is_object() && primary.contains(key) && !primary[key].is_null()) return &primary[key];
  if (fallback.is_object() && fallback.contains(key) && !fallback[key].is_null()) return &fallback[key];
  return nullptr;
}

template <typename T>
T get_or(const json& primary, const json& fallback, const std::string& key, T def) {
  const json* v = lookup(primary, fallback, key);
  if (!v) return def;
  try {
    return v->get<T>();
  } catch (const json::exception&) {
    return def;
  }
}

template <typename T>
T require(const json& primary, const json& fallback, const std::string& key, const std::string& path) {
  const json* v = lookup(primary, fallback, key);
  if (!v) fail(path, "missing key \"", key, "\"");
  try {
    return v->get<T>();
  } catch (const json::exception&) {
    fail(path, "key \"", key, "\" has the wrong type");
  }
}

std::vector<int64_t> id_list(const json* v) {
  std::vector<int64_t> out;
  if (!v) return out;
  if (v->is_number_integer()) out.push_back(v->get<int64_t>());
  if (v->is_array())
    for (auto& x : *v)
      if (x.is_number_integer()) out.push_back(x.get<int64_t>());
  return out;
}

// transformers' LlamaConfig defaults, which a LLaVA config's text_config falls back to.
TextConfig llama_defaults() {
  TextConfig t;
  t.vocab_size = 32000;
  t.hidden_size = 4096;
  t.intermediate_size = 11008;
  t.num_layers = 32;
  t.num_heads = 32;
  t.num_kv_heads = 0;  // = num_heads
  t.rms_norm_eps = 1e-6;
  t.rope_theta = 10000.0;
  return t;
}

// `defaults`: class defaults for omitted keys, or null when the keys are required (Qwen2-VL).
void read_text(const json& tc, const json& top, const std::string& path, TextConfig& t, const TextConfig* defaults) {
  auto size = [&](const char* key, int64_t def) {
    return defaults ? get_or<int64_t>(tc, top, key, def) : require<int64_t>(tc, top, key, path);
  };
  const TextConfig d = defaults ? *defaults : TextConfig();
  t.vocab_size = size("vocab_size", d.vocab_size);
  t.hidden_size = size("hidden_size", d.hidden_size);
  t.intermediate_size = size("intermediate_size", d.intermediate_size);
  t.num_layers = size("num_hidden_layers", d.num_layers);
  t.num_heads = size("num_attention_heads", d.num_heads);
  t.num_kv_heads = get_or<int64_t>(tc, top, "num_key_value_heads", t.num_heads);
  t.head_dim = get_or<int64_t>(tc, top, "head_dim", t.num_heads > 0 ? t.hidden_size / t.num_heads : 0);
  t.rms_norm_eps = get_or<double>(tc, top, "rms_norm_eps", defaults ? d.rms_norm_eps : 1e-6);
  t.tie_word_embeddings = get_or<bool>(tc, top, "tie_word_embeddings", false);
  t.hidden_act = get_or<std::string>(tc, top, "hidden_act", "silu");
  check(t.num_heads > 0 && t.num_kv_heads > 0 && t.num_heads % t.num_kv_heads == 0, path,
        "num_attention_heads (", t.num_heads, ") must be a positive multiple of num_key_value_heads (",
        t.num_kv_heads, ")");
  check(t.head_dim > 0 && t.head_dim % 2 == 0, path, "head_dim must be positive and even, got ", t.head_dim);
  check(t.hidden_act == "silu", path, "unsupported text hidden_act \"", t.hidden_act, "\" (only silu)");

  // RoPE: transformers 5 "rope_parameters", or older "rope_theta" + "rope_scaling".
  t.rope_theta = get_or<double>(tc, top, "rope_theta", defaults ? d.rope_theta : 10000.0);
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    const json* rp = lookup(tc, top, key);
    if (!rp || !rp->is_object()) continue;
    if (rp->contains("rope_theta")) t.rope_theta = (*rp)["rope_theta"].get<double>();
    // M-RoPE is detected by mrope_section; transformers 5 keeps rope_type "default" beside it.
    if (rp->contains("mrope_section")) t.mrope_section = (*rp)["mrope_section"].get<std::vector<int64_t>>();
    std::string type = rp->value("rope_type", rp->value("type", std::string("default")));
    if (type != "default" && type != "mrope")
      fail(path, "unsupported RoPE scaling type \"", type, "\"");
  }
  if (!t.mrope_section.empty()) {
    int64_t pairs = 0;
    for (int64_t s : t.mrope_section) pairs += s;
    check(t.mrope_section.size() == 3 && pairs == t.head_dim / 2, path, "mrope_section must have 3 entries summing to ",
          "head_dim/2 = ", t.head_dim / 2);
  }
}

void read_qwen2_vision(const json& vc, const std::string& path, Qwen2VisionConfig& v, int64_t text_hidden) {
  const json none = json::object();
  v.depth = require<int64_t>(vc, none, "depth", path);
  v.embed_dim = require<int64_t>(vc, none, "embed_dim", path);
  v.num_heads = require<int64_t>(vc, none, "num_heads", path);
  // Qwen2-VL calls the LLM width "hidden_size" inside vision_config.
  v.out_hidden_size = get_or<int64_t>(vc, none, "hidden_size", text_hidden);
  double ratio = get_or<double>(vc, none, "mlp_ratio", 4.0);
  v.mlp_hidden = int64_t(double(v.embed_dim) * ratio);
  v.patch_size = get_or<int64_t>(vc, none, "patch_size", 14);
  v.temporal_patch_size = get_or<int64_t>(vc, none, "temporal_patch_size", 2);
  v.spatial_merge_size = get_or<int64_t>(vc, none, "spatial_merge_size", 2);
  v.in_channels = get_or<int64_t>(vc, none, "in_channels", 3);
  v.hidden_act = get_or<std::string>(vc, none, "hidden_act", "quick_gelu");
  if (vc.contains("rope_parameters") && vc["rope_parameters"].is_object())
    v.rope_theta = vc["rope_parameters"].value("rope_theta", v.rope_theta);
  check(v.num_heads > 0 && v.embed_dim % v.num_heads == 0, path, "vision embed_dim ", v.embed_dim,
        " is not divisible by num_heads ", v.num_heads);
  check((v.embed_dim / v.num_heads) % 4 == 0, path, "vision head dim must be a multiple of 4 for its 2-D RoPE");
  check(v.hidden_act == "quick_gelu" || v.hidden_act == "gelu", path, "unsupported vision hidden_act \"",
        v.hidden_act, "\"");
  check(v.out_hidden_size == text_hidden, path, "vision_config.hidden_size (", v.out_hidden_size,
        ") must equal the language model's hidden_size (", text_hidden, ")");
}

// Qwen2.5-VL's vision_config: "hidden_size" is the ViT width and "out_hidden_size" the LLM width
// (Qwen2-VL used "embed_dim" and "hidden_size"). Omitted optional keys take transformers'
// Qwen2_5_VLVisionConfig defaults; "tokens_per_second" only scales video time indices and is ignored.
void read_qwen25_vision(const json& vc, const std::string& path, Qwen2VisionConfig& v, int64_t text_hidden) {
  const json none = json::object();
  // A Qwen2-VL vision_config under model_type qwen2_5_vl would be read with its widths swapped.
  check(!vc.contains("embed_dim") || vc.contains("out_hidden_size"), path,
        "vision_config has Qwen2-VL's \"embed_dim\" but no \"out_hidden_size\": qwen2_5_vl names the ViT width ",
        "\"hidden_size\" and the LLM width \"out_hidden_size\" (is model_type meant to be qwen2_vl?)");
  v.windowed = true;
  v.depth = require<int64_t>(vc, none, "depth", path);
  v.embed_dim = require<int64_t>(vc, none, "hidden_size", path);
  v.mlp_hidden = require<int64_t>(vc, none, "intermediate_size", path);
  v.num_heads = require<int64_t>(vc, none, "num_heads", path);
  v.out_hidden_size = require<int64_t>(vc, none, "out_hidden_size", path);
  v.patch_size = get_or<int64_t>(vc, none, "patch_size", 14);
  v.temporal_patch_size = get_or<int64_t>(vc, none, "temporal_patch_size", 2);
  v.spatial_merge_size = get_or<int64_t>(vc, none, "spatial_merge_size", 2);
  // Hub files say "in_chans", transformers "in_channels".
  v.in_channels = get_or<int64_t>(vc, none, "in_channels", get_or<int64_t>(vc, none, "in_chans", 3));
  v.hidden_act = get_or<std::string>(vc, none, "hidden_act", "silu");
  v.window_size = get_or<int64_t>(vc, none, "window_size", 112);
  // transformers 5 records the 2-D rotary's theta (10000, its only value) in rope_parameters.
  if (vc.contains("rope_parameters") && vc["rope_parameters"].is_object())
    v.rope_theta = vc["rope_parameters"].value("rope_theta", v.rope_theta);
  const json* full = lookup(vc, none, "fullatt_block_indexes");
  if (!full) {
    v.fullatt_block_indexes = {7, 15, 23, 31};
  } else {
    try {
      v.fullatt_block_indexes = full->get<std::vector<int64_t>>();
    } catch (const json::exception&) {
      fail(path, "vision_config.fullatt_block_indexes must be a list of block indices");
    }
  }
  check(v.depth > 0, path, "vision_config.depth must be positive, got ", v.depth);
  check(v.num_heads > 0 && v.embed_dim % v.num_heads == 0, path, "vision hidden_size ", v.embed_dim,
        " is not divisible by num_heads ", v.num_heads);
  check((v.embed_dim / v.num_heads) % 4 == 0, path, "vision head dim must be a multiple of 4 for its 2-D RoPE");
  check(v.hidden_act == "silu" || v.hidden_act == "gelu" || v.hidden_act == "quick_gelu", path,
        "unsupported vision hidden_act \"", v.hidden_act, "\" (supported: silu, gelu, quick_gelu)");
  check(v.patch_size > 0 && v.spatial_merge_size > 0, path, "vision patch_size and spatial_merge_size must be positive");
  const int64_t unit = v.patch_size * v.spatial_merge_size;
  check(v.window_size >= unit && v.window_size % unit == 0, path, "vision_config.window_size ", v.window_size,
        " must be a positive multiple of patch_size * spatial_merge_size = ", unit,
        " (a window is a square of whole merged tokens)");
  for (int64_t b : v.fullatt_block_indexes)
    check(b >= 0 && b < v.depth, path, "vision_config.fullatt_block_indexes lists block ", b,
          ", outside the ", v.depth, " blocks");
  check(v.out_hidden_size == text_hidden, path, "vision_config.out_hidden_size (", v.out_hidden_size,
        ") must equal the language model's hidden_size (", text_hidden, ")");
}

// generation_config.json's stop and pad tokens override config.json's.
void read_generation_config(const std::string& dir, ModelConfig& c) {
  fs::path gen = fs::path(dir) / "generation_config.json";
  if (!fs::exists(gen)) return;
  json g = read_json_file(gen.string());
  auto ids = id_list(g.contains("eos_token_id") ? &g["eos_token_id"] : nullptr);
  if (!ids.empty()) c.eos_token_ids = ids;
  if (g.contains("pad_token_id") && g["pad_token_id"].is_number_integer()) c.pad_token_id = g["pad_token_id"];
}

void read_clip_vision(const json& vc, const std::string& path, ClipVisionConfig& v) {
  const json none = json::object();
  std::string type = vc.value("model_type", std::string("clip_vision_model"));
  if (type != "clip_vision_model") fail(path, "unsupported vision tower \"", type, "\" for llava (supported: clip_vision_model)");
  v.hidden_size = get_or<int64_t>(vc, none, "hidden_size", v.hidden_size);
  v.intermediate_size = get_or<int64_t>(vc, none, "intermediate_size", v.intermediate_size);
  v.num_layers = get_or<int64_t>(vc, none, "num_hidden_layers", v.num_layers);
  v.num_heads = get_or<int64_t>(vc, none, "num_attention_heads", v.num_heads);
  v.image_size = get_or<int64_t>(vc, none, "image_size", v.image_size);
  v.patch_size = get_or<int64_t>(vc, none, "patch_size", v.patch_size);
  v.num_channels = get_or<int64_t>(vc, none, "num_channels", v.num_channels);
  v.layer_norm_eps = get_or<double>(vc, none, "layer_norm_eps", v.layer_norm_eps);
  v.hidden_act = get_or<std::string>(vc, none, "hidden_act", v.hidden_act);
  check(v.num_heads > 0 && v.hidden_size % v.num_heads == 0, path, "vision hidden_size ", v.hidden_size,
        " is not divisible by num_attention_heads ", v.num_heads);
  check(v.patch_size > 0 && v.image_size % v.patch_size == 0, path, "vision image_size ", v.image_size,
        " is not a multiple of patch_size ", v.patch_size);
  check(v.hidden_act == "quick_gelu" || v.hidden_act == "gelu", path, "unsupported vision hidden_act \"",
        v.hidden_act, "\"");
}

// LLaVA-NeXT's extras over LLaVA-1.5: the anyres tile grids. The packing of tile features
// (transformers' pack_image_features) assumes a square token grid per tile, so the CLS token must be
// dropped ("default" strategy), and a grid of whole tiles, so every pinpoint is a multiple of the
// tower's image_size.
void read_llava_next(const json& top, ModelConfig& c) {
  const std::string& path = c.path;
  LlavaConfig& l = c.llava;
  check(!l.keep_cls, path, "vision_feature_select_strategy \"full\" is not supported for llava_next (the tile ",
        "features must form a square grid; use \"default\")");
  if (!top.contains("image_grid_pinpoints") || top["image_grid_pinpoints"].is_null())
    fail(path, "llava_next needs \"image_grid_pinpoints\" (a list of [height, width])");
  const json& pp = top["image_grid_pinpoints"];
  check(pp.is_array() && !pp.empty(), path, "image_grid_pinpoints must be a non-empty list of [height, width], got ",
        pp.dump());
  const int64_t S = c.clip.image_size;
  for (const json& p : pp) {
    check(p.is_array() && p.size() == 2 && p[0].is_number_integer() && p[1].is_number_integer(), path,
          "image_grid_pinpoints entries must be [height, width] integer pairs, got ", p.dump());
    const int64_t h = p[0].get<int64_t>(), w = p[1].get<int64_t>();
    check(h > 0 && w > 0 && h % S == 0 && w % S == 0, path, "image_grid_pinpoints entry [", h, ", ", w,
          "] is not a positive multiple of the vision tower's image_size ", S);
    l.grid_pinpoints.push_back({h, w});
  }
}

void read_llava(const json& top, ModelConfig& c) {
  const json none = json::object();
  const std::string& path = c.path;
  const json tc = top.contains("text_config") && top["text_config"].is_object() ? top["text_config"] : json::object();
  std::string text_type = tc.value("model_type", std::string("llama"));
  if (text_type != "llama" && text_type != "mistral" && text_type != "qwen2")
    fail(path, "unsupported llava text model \"", text_type, "\" (supported: llama, mistral, qwen2)");
  TextConfig defaults = llama_defaults();
  read_text(tc, none, path, c.text, &defaults);
  check(c.text.mrope_section.empty(), path, "llava text models use 1-D RoPE, found an mrope_section");
  // Mistral's sliding-window attention is not implemented; a window at least as long as the longest
  // sequence the model takes (max_position_embeddings) is plain causal attention.
  if (text_type == "mistral") {
    const json* win = lookup(tc, none, "sliding_window");
    if (win && win->is_number_integer()) {
      const int64_t max_pos = get_or<int64_t>(tc, none, "max_position_embeddings", 32768);
      check(win->get<int64_t>() >= max_pos, path, "text_config.sliding_window ", win->get<int64_t>(),
            " is shorter than max_position_embeddings ", max_pos, ": sliding-window attention is not supported");
    }
  }
  // LlavaConfig's own default vision tower is CLIP ViT-L/14 at 336 px; a given dict falls back to
  // CLIPVisionConfig's class defaults instead.
  if (top.contains("vision_config") && top["vision_config"].is_object()) {
    read_clip_vision(top["vision_config"], path, c.clip);
  } else {
    c.clip.hidden_size = 1024;
    c.clip.intermediate_size = 4096;
    c.clip.num_layers = 24;
    c.clip.num_heads = 16;
    c.clip.image_size = 336;
    c.clip.patch_size = 14;
  }
  LlavaConfig& l = c.llava;
  const json* layer = lookup(top, none, "vision_feature_layer");
  if (layer && layer->is_number_integer()) l.feature_layers = {layer->get<int64_t>()};
  else if (layer && layer->is_array()) l.feature_layers = layer->get<std::vector<int64_t>>();
  else if (layer) fail(path, "vision_feature_layer must be an integer or a list of integers");
  const int64_t states = c.clip.num_layers + 1;  // embeddings, then one per layer
  check(!l.feature_layers.empty(), path, "vision_feature_layer is an empty list");
  for (int64_t f : l.feature_layers)
    check(f >= -states && f < states, path, "vision_feature_layer ", f, " is out of range for a vision tower of ",
          c.clip.num_layers, " layers (valid: ", -states, " to ", states - 1, ")");
  std::string strategy = get_or<std::string>(top, none, "vision_feature_select_strategy", "default");
  check(strategy == "default" || strategy == "full", path, "unknown vision_feature_select_strategy \"", strategy, "\"");
  l.keep_cls = strategy == "full";
  l.projector_act = get_or<std::string>(top, none, "projector_hidden_act", "gelu");
  check(l.projector_act == "gelu" || l.projector_act == "silu" || l.projector_act == "quick_gelu", path,
        "unsupported projector_hidden_act \"", l.projector_act, "\"");
  l.image_seq_length = get_or<int64_t>(top, none, "image_seq_length", l.tokens_per_image(c.clip));
  // LLaVA-NeXT's token count depends on the image size (its image_seq_length, default 576, is unused).
  if (c.model_type == "llava_next") l.image_seq_length = l.tokens_per_image(c.clip);
  check(l.image_seq_length == l.tokens_per_image(c.clip), path, "image_seq_length ", l.image_seq_length,
        " does not match the vision features: ", c.clip.num_patches(), " patches",
        l.keep_cls ? " + CLS" : "", " = ", l.tokens_per_image(c.clip), " tokens per image");
  if (c.model_type == "llava_next") read_llava_next(top, c);
  c.image_token_id = get_or<int64_t>(top, none, "image_token_index", get_or<int64_t>(top, none, "image_token_id", 32000));
  c.pad_token_id = get_or<int64_t>(tc, top, "pad_token_id", -1);
  c.eos_token_ids = id_list(lookup(tc, top, "eos_token_id"));
  if (c.eos_token_ids.empty()) c.eos_token_ids = {2};
}

void read_mla(const json& top, ModelConfig& c) {
  if (!top.contains("mla")) return;
  const json& m = top["mla"];
  const std::string& path = c.path;
  const TextConfig& t = c.text;
  if (!m.is_object()) fail(path, "\"mla\" must be an object");
  MlaConfig& a = c.mla;
  a.enabled = true;
  try {
    a.rope_pairs = m.at("rope_pairs").get<int64_t>();
    a.latent_dim = m.at("latent_dim").get<int64_t>();
    a.decoupled = m.value("modality", std::string("decoupled")) == "decoupled";
    a.kept_pairs = m.at("kept_pairs").get<std::vector<std::vector<std::vector<int64_t>>>>();
    a.rope_strategy = m.value("rope_strategy", std::string());
    a.lowrank = m.value("lowrank", std::string());
    a.kv = m.value("kv", std::string());
    a.calib_samples = m.value("calib_samples", int64_t(0));
    a.source = m.value("source", std::string());
  } catch (const json::exception& e) {
    fail(path, "malformed \"mla\" section (", e.what(), ")");
  }
  const int64_t P = t.head_dim / 2;
  check(a.rope_pairs >= 0 && a.rope_pairs <= P, path, "mla.rope_pairs ", a.rope_pairs, " outside 0..", P);
  check(a.latent_dim >= 0, path, "mla.latent_dim must not be negative");
  check(int64_t(a.kept_pairs.size()) == t.num_layers, path, "mla.kept_pairs has ", a.kept_pairs.size(),
        " layers, the model ", t.num_layers);
  for (const auto& layer : a.kept_pairs) {
    check(int64_t(layer.size()) == t.num_kv_heads, path, "mla.kept_pairs needs one list per KV head (",
          t.num_kv_heads, ")");
    for (const auto& head : layer) {
      check(int64_t(head.size()) == a.rope_pairs, path, "mla.kept_pairs lists must hold rope_pairs = ", a.rope_pairs,
            " pairs");
      for (size_t i = 0; i < head.size(); ++i)
        check(head[i] >= 0 && head[i] < P && (i == 0 || head[i] > head[i - 1]), path,
              "mla.kept_pairs must be ascending pair indices below ", P);
    }
  }
}

}  // namespace

ModelConfig load_model_config(const std::string& dir) {
  ModelConfig c;
  c.path = (fs::path(dir) / "config.json").string();
  if (!fs::is_directory(dir)) fail(dir, "model directory not found");
  json top = read_json_file(c.path);
  if (!top.is_object()) fail(c.path, "not a JSON object");
  c.model_type = top.value("model_type", std::string());
  if (c.model_type == "qwen2_vl") {
    c.family = Family::Qwen2VL;
  } else if (c.model_type == "qwen2_5_vl") {
    c.family = Family::Qwen25VL;
  } else if (c.model_type == "llava" || c.model_type == "llava_next") {
    c.family = Family::Llava;
  } else if (c.model_type.empty()) {
    fail(c.path, "no \"model_type\"");
  } else if (c.model_type == "llava_next_video" || c.model_type == "llava_onevision") {
    fail(c.path, "unsupported architecture \"", c.model_type, "\" (video inputs are not supported; supported: ",
         "qwen2_vl, llava, llava_next)");
  } else {
    fail(c.path, "unsupported architecture \"", c.model_type, "\" (supported: qwen2_vl, qwen2_5_vl, llava, llava_next)");
  }
  if (c.family == Family::Llava) {
    read_llava(top, c);
    read_mla(top, c);
    read_generation_config(dir, c);
    check(c.image_token_id >= 0 && c.image_token_id < c.text.vocab_size, c.path,
          "image_token_index ", c.image_token_id, " is outside the vocabulary (", c.text.vocab_size, ")");
    return c;
  }
  const json tc = top.contains("text_config") && top["text_config"].is_object() ? top["text_config"] : json::object();
  read_text(tc, top, c.path, c.text, nullptr);
  if (!top.contains("vision_config") || !top["vision_config"].is_object()) fail(c.path, "missing \"vision_config\"");
  if (c.family == Family::Qwen25VL)
    read_qwen25_vision(top["vision_config"], c.path, c.vision, c.text.hidden_size);
  else
    read_qwen2_vision(top["vision_config"], c.path, c.vision, c.text.hidden_size);
  check(!c.text.mrope_section.empty(), c.path, c.model_type,
        " needs an mrope_section in rope_scaling or rope_parameters");

  c.image_token_id = get_or<int64_t>(top, tc, "image_token_id", -1);
  c.video_token_id = get_or<int64_t>(top, tc, "video_token_id", -1);
  c.vision_start_token_id = get_or<int64_t>(top, tc, "vision_start_token_id", -1);
  c.vision_end_token_id = get_or<int64_t>(top, tc, "vision_end_token_id", -1);
  check(c.image_token_id >= 0 && c.image_token_id < c.text.vocab_size, c.path, "image_token_id missing or outside the vocabulary");
  c.pad_token_id = get_or<int64_t>(tc, top, "pad_token_id", -1);
  c.eos_token_ids = id_list(lookup(tc, top, "eos_token_id"));

  read_mla(top, c);
  read_generation_config(dir, c);
  return c;
}

}  // namespace mlaforge
