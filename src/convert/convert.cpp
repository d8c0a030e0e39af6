#include "convert/convert.h"

#include <ATen/ATen.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <nlohmann/json.hpp>

#include "core/device.h"
#include "core/error.h"
#include "core/memory.h"
#include "core/progress.h"
#include "io/checkpoint.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "model/vlm.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace mlaforge {
namespace {

double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Rows `idx` of w [rows, ...] (or undefined when w is).
at::Tensor rows_of(const at::Tensor& w, const std::vector<int64_t>& idx) {
  return w.defined() ? w.index_select(0, at::tensor(idx, at::kLong).to(w.device())) : at::Tensor();
}

}  // namespace

ConvertReport convert_model(const ConvertOptions& o) {
  const auto t_start = std::chrono::steady_clock::now();
  ConvertReport rep;
  check(!o.out_dir.empty(), "--out", "an output directory is needed");
  check(fs::absolute(o.out_dir).lexically_normal() != fs::absolute(o.model_dir).lexically_normal(), o.out_dir,
        "the output directory must differ from the input model");
  const at::Device dev = parse_device(o.device);
  reset_peak_device_bytes();
  // Streaming: the decoder's layers are never all loaded; each comes from the checkpoint when its
  // turn comes (calibration, then factorisation), in the compute dtype (bf16 on cuda by default).
  LoadOptions lopt;
  lopt.device = dev;
  lopt.dtype = parse_dtype(o.dtype, dev);
  lopt.decoder_layers = false;
  auto model = Vlm::load(o.model_dir, lopt);
  const ModelConfig& cfg = model->config();
  // A stage-1 checkpoint (partial RoPE, no latent) goes on to stage 2 with its own rotary pairs.
  const bool from_stage1 = cfg.mla.enabled && cfg.mla.latent_dim == 0;
  check(!cfg.mla.enabled || from_stage1, cfg.path,
        "this checkpoint is already converted (config.json has an \"mla\" section with a latent of ",
        cfg.mla.latent_dim, ")");
  const TextConfig& t = cfg.text;
  const int64_t d = t.hidden_size, h = t.num_heads, g = t.num_kv_heads, dh = t.head_dim, P = dh / 2, group = h / g;

  // Options against the model's shape.
  int64_t r = o.rope_pairs < 0 ? P : o.rope_pairs;
  check(r <= P, "--rope-pairs", r, " is above the ", P, " rotary pairs of a head (head_dim ", dh, ")");
  if (from_stage1) {
    check(o.rope_pairs < 0 || o.rope_pairs == cfg.mla.rope_pairs, "--rope-pairs",
          "a stage-1 model keeps its ", cfg.mla.rope_pairs, " rotary pairs per KV head in stage 2");
    check(o.dkv > 0, "--dkv", "converting a stage-1 model on to stage 2 needs a latent width (--dkv N)");
    r = cfg.mla.rope_pairs;
  }
  check(o.dkv != 0, "--dkv", "must be positive (or \"full\")");
  const int64_t k_rows = g * (dh - 2 * r), rows = k_rows + g * dh;
  const int64_t full = full_rank(rows, k_rows, d, o.kv);
  // --dkv full: no latent at all (stage 1), [k_nope; v] straight from x, exactly the original.
  const int64_t R = o.dkv < 0 ? 0 : g * o.dkv;
  check(R <= full, "--dkv", o.dkv, " gives a latent of ", R, " (", g, " KV heads x ", o.dkv,
        ") above the full rank ", full, " of this layer's [k_nope; v] (at most ", full / g, " per KV head)");
  rep.latent_dim = R;
  rep.rope_pairs = r;

  // Calibration rows: a VLM needs images to see image tokens.
  auto rows_data = load_conversations(o.calib_path, o.calib_samples);
  check(!rows_data.empty(), o.calib_path, "no calibration records");
  size_t with_images = 0;
  for (const auto& c : rows_data) with_images += !c.image_paths.empty();
  check(with_images > 0, o.calib_path, "calibration data has no images: a vision-language model needs image ",
        "tokens for its image statistics (use rows like ../shared/data/shapes/calib.jsonl)");

  auto t0 = std::chrono::steady_clock::now();
  const bool data_free_pairs = o.strategy == RopeStrategy::High || o.strategy == RopeStrategy::Low ||
                               o.strategy == RopeStrategy::Uniform;
  // Statistics are needed unless nothing is factorised and the pairs are fixed by rule.
  const bool need_stats = !(R == 0 && (data_free_pairs || from_stage1));
  CalibrationStats loaded, to_save;  // from --stats, or gathered here to be saved there
  std::unique_ptr<LayerwiseCalibration> calib;
  if (need_stats && !o.stats_path.empty() && fs::exists(o.stats_path)) {
    loaded = load_stats(o.stats_path, t);
    std::fprintf(stderr, "calibration statistics from %s (%lld samples)\n", o.stats_path.c_str(),
                 (long long)loaded.samples);
    rep.calib_samples = loaded.samples;
  } else if (need_stats) {
    calib = std::make_unique<LayerwiseCalibration>(*model, rows_data, o.batch_size);
    rep.calib_samples = calib->samples();
    to_save.samples = calib->samples();
    to_save.model = model->dir();
  }
  rep.calib_seconds = since(t0);

  // Output: every tensor that stays as it was, then the new attention tensors layer by layer.
  fs::create_directories(o.out_dir);
  const WeightStore& ws = model->weights();
  const std::string lm = model->lm_prefix();
  ShardWriter out(o.out_dir, int64_t(2) << 30);
  auto attn = [&](int64_t l) { return lm + "layers." + std::to_string(l) + ".self_attn."; };
  std::set<std::string> replaced;
  for (int64_t l = 0; l < t.num_layers; ++l) {
    const std::vector<std::string> names =
        from_stage1 ? std::vector<std::string>{std::string(mla_names::direct) + ".weight"}
                    : std::vector<std::string>{"q_proj.weight", "q_proj.bias", "k_proj.weight",
                                               "k_proj.bias",   "v_proj.weight", "v_proj.bias"};
    for (const auto& n : names) replaced.insert(attn(l) + n);
  }
  out.copy_from(ws, [&](const std::string& name) { return replaced.count(name) == 0; });

  LowRankOptions lo;
  lo.method = o.method;
  lo.kv = o.kv;
  lo.decoupled = o.decoupled;
  lo.ridge = o.ridge;
  lo.rank = R;
  Progress bar(calib ? "calibrate + factorise" : "factorise", t.num_layers);
  // New tensors are written in the compute dtype: float32 on the CPU (the identity holds to 1e-7),
  // the checkpoint's bf16 on cuda.
  auto emit = [&](const std::string& name, const at::Tensor& x) { out.add(name, x.to(at::kCPU, lopt.dtype)); };
  std::vector<std::vector<std::vector<int64_t>>> kept;
  for (int64_t l = 0; l < t.num_layers; ++l) {
    const std::string a = attn(l);
    // This layer's statistics: run it over the calibration rows (whose hidden states then move on
    // to the next layer), or take them from the --stats file.
    auto tl = std::chrono::steady_clock::now();
    LayerStats s;
    if (calib) {
      s = calib->next_layer(model->load_layer(l), l);
      if (!o.stats_path.empty()) {
        LayerStats c = s;
        for (int m = 0; m < 2; ++m)
          for (at::Tensor* x : {&c.gram[m], &c.q_norm[m], &c.k_norm[m], &c.rope_err[m]}) *x = x->cpu();
        to_save.layers.push_back(std::move(c));
      }
    } else if (need_stats) {
      s = loaded.layers[size_t(l)];
      for (int m = 0; m < 2; ++m) s.gram[m] = s.gram[m].to(dev);
    }
    const double layer_calib_s = since(tl);
    if (calib) rep.calib_seconds += layer_calib_s;
    if (l == 0 && need_stats) {
      rep.calib_tokens[0] = s.tokens[kText];
      rep.calib_tokens[1] = s.tokens[kImage];
    }
    kept.push_back(from_stage1 ? cfg.mla.kept_pairs[size_t(l)]
                               : select_layer_pairs(o.strategy, r, t, need_stats ? &s : nullptr));
    tl = std::chrono::steady_clock::now();
    const auto& kl = kept.back();  // [g][r]
    auto load = [&](const std::string& n, std::vector<int64_t> shape) {
      return ws.has(a + n) ? ws.load(a + n, shape, at::kDouble).to(dev) : at::Tensor();
    };
    at::Tensor W;  // [k_nope; v] of every KV head: [rows, d]; its bias stays outside the latent
    if (from_stage1) {
      W = load(std::string(mla_names::direct) + ".weight", {rows, d});
    } else {
      // q rows per head: [its group's rotary dims | the rest]; k rows split into rotary / nope.
      std::vector<int64_t> q_idx, kr_idx, kn_idx;
      for (int64_t i = 0; i < h; ++i) {
        auto rd = rotary_dims(kl[size_t(i / group)], dh), nd = nope_dims(kl[size_t(i / group)], dh);
        for (int64_t x : rd) q_idx.push_back(i * dh + x);
        for (int64_t x : nd) q_idx.push_back(i * dh + x);
      }
      for (int64_t j = 0; j < g; ++j) {
        for (int64_t x : rotary_dims(kl[size_t(j)], dh)) kr_idx.push_back(j * dh + x);
        for (int64_t x : nope_dims(kl[size_t(j)], dh)) kn_idx.push_back(j * dh + x);
      }
      at::Tensor qw = load("q_proj.weight", {h * dh, d}), qb = load("q_proj.bias", {h * dh});
      at::Tensor kw = load("k_proj.weight", {g * dh, d}), kb = load("k_proj.bias", {g * dh});
      at::Tensor vw = load("v_proj.weight", {g * dh, d}), vb = load("v_proj.bias", {g * dh});
      check(qw.defined() && kw.defined() && vw.defined(), ws.dir(), "layer ", l, " lacks q/k/v projections");
      emit(a + "q_proj.weight", rows_of(qw, q_idx));
      if (qb.defined()) emit(a + "q_proj.bias", rows_of(qb, q_idx));
      emit(a + mla_names::k_rope + ".weight", rows_of(kw, kr_idx));
      if (kb.defined()) emit(a + mla_names::k_rope + ".bias", rows_of(kb, kr_idx));
      W = k_rows > 0 ? at::cat({rows_of(kw, kn_idx), vw}, 0) : vw;
      if (kb.defined() || vb.defined()) {
        auto f64 = at::TensorOptions().dtype(at::kDouble).device(dev);
        at::Tensor kbn = kb.defined() ? rows_of(kb, kn_idx) : at::zeros({k_rows}, f64);
        at::Tensor vbb = vb.defined() ? vb : at::zeros({g * dh}, f64);
        emit(a + mla_names::up_bias, at::cat({kbn, vbb}, 0));
      }
    }
    check(W.defined(), ws.dir(), "layer ", l, " lacks ", a, mla_names::direct, ".weight");
    if (R == 0) {
      emit(a + mla_names::direct + ".weight", W);
      LayerReport lr;
      lr.kept = kl;
      lr.damping = "none (no latent)";
      lr.calib_seconds = layer_calib_s;
      lr.factor_seconds = since(tl);
      rep.factor_seconds += lr.factor_seconds;
      rep.layers.push_back(lr);
      bar.advance(1);
      continue;
    }
    LowRankResult f = factorize_kv(W, k_rows, {s.gram[kImage], s.tokens[kImage]}, {s.gram[kText], s.tokens[kText]},
                                   lo, str(cfg.path, ": layer ", l));
    if (o.decoupled) {
      emit(a + mla_names::down(true, true) + ".weight", f.image.down);
      emit(a + mla_names::up(true, true) + ".weight", f.image.up);
      emit(a + mla_names::down(true, false) + ".weight", f.text.down);
      emit(a + mla_names::up(true, false) + ".weight", f.text.up);
    } else {
      emit(a + mla_names::down(false, false) + ".weight", f.text.down);
      emit(a + mla_names::up(false, false) + ".weight", f.text.up);
    }
    LayerReport lr;
    lr.kept = kl;
    lr.rel_error_image = f.rel_error_image;
    lr.rel_error_text = f.rel_error_text;
    lr.key_error_image = f.key_error_image;
    lr.key_error_text = f.key_error_text;
    lr.value_error_image = f.value_error_image;
    lr.value_error_text = f.value_error_text;
    lr.damping = f.damping;
    lr.calib_seconds = layer_calib_s;
    lr.factor_seconds = since(tl);
    rep.factor_seconds += lr.factor_seconds;
    rep.layers.push_back(lr);
    bar.advance(1, str("layer ", l, " err img ", f.rel_error_image, " txt ", f.rel_error_text));
  }
  bar.finish();
  out.finish();
  if (calib && !o.stats_path.empty()) save_stats(o.stats_path, to_save);
  rep.peak_host_bytes = peak_host_bytes();
  rep.peak_device_bytes = peak_device_bytes();

  // config.json with the "mla" section; the other small files as they are.
  json config = read_json_file(cfg.path);
  const std::string strategy = from_stage1 ? cfg.mla.rope_strategy : rope_strategy_name(o.strategy);
  config["mla"] = {{"version", 1},
                   {"rope_pairs", r},
                   {"latent_dim", R},
                   {"dkv", o.dkv < 0 ? json("full") : json(o.dkv)},
                   {"rope_strategy", strategy},
                   {"lowrank", o.method == LowRankMethod::Whitened ? "whitened" : "svd"},
                   {"kv", o.kv == KvLatent::Joint ? "joint" : "split"},
                   {"modality", o.decoupled ? "decoupled" : "shared"},
                   {"ridge", o.ridge},
                   {"calib_samples", rep.calib_samples},
                   {"source", from_stage1 ? cfg.mla.source : fs::absolute(o.model_dir).lexically_normal().string()},
                   {"kept_pairs", kept}};
  std::ofstream(o.out_dir + "/config.json") << config.dump(2) << "\n";
  copy_model_files(o.model_dir, o.out_dir);
  rep.kv_bytes_before = cfg.mha_kv_bytes_per_token(2);
  rep.kv_bytes_after = t.num_layers * (g * 2 * r + (R > 0 ? R : rows)) * 2;
  rep.total_seconds = since(t_start);

  // The per-layer report beside the model.
  json layers = json::array();
  for (size_t l = 0; l < rep.layers.size(); ++l)
    layers.push_back({{"layer", l}, {"kept_pairs", rep.layers[l].kept},
                      {"rel_error_image", rep.layers[l].rel_error_image},
                      {"rel_error_text", rep.layers[l].rel_error_text},
                      {"key_error_image", rep.layers[l].key_error_image},
                      {"key_error_text", rep.layers[l].key_error_text},
                      {"value_error_image", rep.layers[l].value_error_image},
                      {"value_error_text", rep.layers[l].value_error_text}, {"damping", rep.layers[l].damping},
                      {"seconds", {{"calibration", rep.layers[l].calib_seconds},
                                   {"factorisation", rep.layers[l].factor_seconds}}}});
  json report = {{"source", o.model_dir}, {"calib", o.calib_path}, {"mla", config["mla"]},
                 {"kv_bytes_per_token_bf16", {{"before", rep.kv_bytes_before}, {"after", rep.kv_bytes_after}}},
                 {"calib_tokens", {{"text", rep.calib_tokens[0]}, {"image", rep.calib_tokens[1]}}},
                 {"seconds", {{"calibration", rep.calib_seconds}, {"factorisation", rep.factor_seconds},
                              {"total", rep.total_seconds}}},
                 {"device", o.device}, {"dtype", lopt.dtype == at::kBFloat16 ? "bf16" : "f32"},
                 {"peak_bytes", {{"host_rss", rep.peak_host_bytes}, {"device_allocated", rep.peak_device_bytes}}},
                 {"layers", layers}};
  report["mla"].erase("kept_pairs");
  std::ofstream(o.out_dir + "/conversion_report.json") << report.dump(1) << "\n";
  return rep;
}

}  // namespace mlaforge
