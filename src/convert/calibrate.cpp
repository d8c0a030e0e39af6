#include "convert/calibrate.h"

#include <ATen/ATen.h>

#include <cmath>

#include "core/error.h"
#include "core/progress.h"
#include "io/safetensors.h"
#include "model/ops.h"

namespace mlaforge {
namespace {

const char* kModalityName[2] = {"text", "image"};

}  // namespace

LayerStats empty_layer_stats(const TextConfig& t, const at::Device& device) {
  LayerStats s;
  auto f64 = at::TensorOptions().dtype(at::kDouble).device(device);
  const int64_t P = t.head_dim / 2;
  for (int m = 0; m < 2; ++m) {
    s.gram[m] = at::zeros({t.hidden_size, t.hidden_size}, f64);
    s.q_norm[m] = at::zeros({t.num_heads, P}, f64);
    s.k_norm[m] = at::zeros({t.num_kv_heads, P}, f64);
    s.rope_err[m] = at::zeros({t.num_heads, P}, f64);
  }
  return s;
}

namespace {

// Per-pair norms ||x^(k)|| = sqrt(x_k^2 + x_{k+P}^2): [B, H, T, dh] -> [B, H, T, P].
at::Tensor pair_norms(const at::Tensor& x) {
  const int64_t P = x.size(-1) / 2;
  return (x.narrow(-1, 0, P).pow(2) + x.narrow(-1, P, P).pow(2)).sqrt();
}

}  // namespace

void accumulate_trace(LayerStats& s, const AttentionTrace& tr, const at::Tensor& valid, const at::Tensor& is_image) {
  const int64_t B = tr.input.size(0), T = tr.input.size(1), S = tr.probs.size(-1);
  check(S == T, "calibration", "expects prefill without a cache");
  at::Tensor sel[2] = {valid & is_image.logical_not(), valid & is_image};  // [B, T]
  for (int m = 0; m < 2; ++m) {
    at::Tensor idx = sel[m].reshape({-1}).nonzero().squeeze(1);
    s.tokens[m] += idx.numel();
    if (idx.numel() == 0) continue;
    at::Tensor X = tr.input.reshape({B * T, -1}).index_select(0, idx).to(s.gram[m].device(), at::kDouble);  // [n, d]
    s.gram[m].addmm_(X.t(), X);
  }
  // A converted model (stage 1 -> 2) has no per-pair q/k: only its Gram matrices are gathered.
  if (!tr.q.defined()) return;
  const int64_t h = tr.q.size(1), dh = tr.q.size(3), g = tr.k.size(1), group = h / g, P = dh / 2;
  at::Tensor qn = pair_norms(tr.q.to(at::kDouble)), kn = pair_norms(tr.k.to(at::kDouble));  // [B, h|g, T, P]
  for (int m = 0; m < 2; ++m) {
    at::Tensor w = sel[m].to(at::kDouble).view({B, 1, T, 1});
    s.q_norm[m] += (qn * w).sum(at::IntArrayRef{0, 2}).to(s.q_norm[m].device());
    s.k_norm[m] += (kn * w).sum(at::IntArrayRef{0, 2}).to(s.k_norm[m].device());
  }

  // Logit change when pair k alone loses rotation:
  //   ds_tu(k) = scale * (q_t^(k) . k_u^(k) - (R_t q_t^(k)) . (R_u k_u^(k))) = scale * z_t(k) . y_u(k)
  // with 4-vectors z_t = [q_t^(k), -R_t q_t^(k)] and y_u = [k_u^(k), R_u k_u^(k)]. Then
  //   sum_u w_tu ds_tu^2 = scale^2 * z_t^T (sum_u w_tu y_u y_u^T) z_t,
  // one batched matmul over keys instead of a [T, S, P] tensor per pair.
  const double scale2 = 1.0 / double(dh);
  at::Tensor q = tr.q.to(at::kFloat), k = tr.k.to(at::kFloat);
  at::Tensor c = tr.cos.unsqueeze(1), sn = tr.sin.unsqueeze(1);
  at::Tensor qr = apply_rotary(q, c, sn), kr = apply_rotary(k, c, sn);
  auto halves = [P](const at::Tensor& x) { return std::make_pair(x.narrow(-1, 0, P), x.narrow(-1, P, P)); };
  auto [qa, qb] = halves(q);
  auto [qra, qrb] = halves(qr);
  auto [ka, kb] = halves(k);
  auto [kra, krb] = halves(kr);
  at::Tensor z = at::stack({qa, qb, -qra, -qrb}, -1).view({B, g, group, T, P, 4});            // queries
  at::Tensor y = at::stack({ka, kb, kra, krb}, -1);                                          // [B, g, S, P, 4]
  at::Tensor Y = (y.unsqueeze(-1) * y.unsqueeze(-2)).view({B, g, S, P * 16});               // y y^T per key
  // Weights p_tu for valid queries, split by the key's modality: [B, g, group*T, S].
  at::Tensor p = tr.probs * valid.view({B, 1, 1, T, 1});
  s.queries += valid.sum().item<int64_t>() * h;
  for (int m = 0; m < 2; ++m) {
    at::Tensor w = (p * sel[m].view({B, 1, 1, 1, S})).to(at::kFloat).view({B, g, group * T, S});
    at::Tensor M = at::matmul(w, Y).view({B, g, group, T, P, 4, 4});
    at::Tensor e = (at::matmul(M, z.unsqueeze(-1)).squeeze(-1) * z).sum(-1);  // [B, g, group, T, P]
    s.rope_err[m] += (e.sum(at::IntArrayRef{0, 3}).reshape({h, P}) * scale2).to(s.rope_err[m].device(), at::kDouble);
  }
}

LayerwiseCalibration::LayerwiseCalibration(const Vlm& model, const std::vector<Conversation>& rows,
                                           int64_t batch_size)
    : model_(model) {
  Progress bar("embed calibration rows", int64_t(rows.size()));
  for (size_t start = 0; start < rows.size(); start += size_t(batch_size)) {
    size_t end = std::min(rows.size(), start + size_t(batch_size));
    std::vector<Prompt> prompts;
    for (size_t i = start; i < end; ++i) prompts.push_back(Prompt{rows[i].turns, rows[i].image_paths});
    Batch batch;
    try {
      batch = model.prepare(prompts, /*add_generation_prompt=*/false);
    } catch (const Error& e) {
      throw Error(rows[start].where + " (batch from here): " + e.what());
    }
    Piece p;
    p.x = model.input_embeddings(batch);  // [B, T, d] on the decoder's device, in its dtype
    p.pos = batch.pos;
    p.valid = batch.valid;
    p.is_image = batch.is_image;
    pieces_.push_back(std::move(p));
    samples_ += int64_t(end - start);
    bar.advance(int64_t(end - start));
  }
  bar.finish();
}

LayerStats LayerwiseCalibration::next_layer(const DecoderLayer& L, int64_t layer) {
  check(layer == next_, "calibration", "layers must come in order (expected layer ", next_, ", got ", layer, ")");
  const DecoderLM& dec = model_.decoder();
  LayerStats stats = empty_layer_stats(dec.config(), model_.device());
  for (Piece& p : pieces_) {
    // A fresh cache per batch: positions [0, T) of every layer's slot; only slot `layer` gets written.
    KVCache cache = dec.new_cache(p.x.size(0), p.x.size(1), model_.device());
    const LayerContext ctx = dec.begin_layers(p.x, p.pos, p.valid, cache);
    AttentionObserver obs = [&](const AttentionTrace& tr) { accumulate_trace(stats, tr, p.valid, p.is_image); };
    ForwardTaps taps;
    taps.observer = &obs;
    p.x = dec.run_layer(L, size_t(layer), p.x, ctx, p.is_image, cache, taps);
  }
  ++next_;
  return stats;
}

CalibrationStats calibrate(const Vlm& model, const std::vector<Conversation>& rows, int64_t batch_size) {
  LayerwiseCalibration calib(model, rows, batch_size);
  CalibrationStats stats;
  stats.model = model.dir();
  stats.samples = calib.samples();
  const int64_t n = model.config().text.num_layers;
  Progress bar("calibrate", n);
  for (int64_t l = 0; l < n; ++l) {
    stats.layers.push_back(calib.next_layer(model.load_layer(l), l));
    bar.advance(1);
  }
  bar.finish();
  return stats;
}

void save_stats(const std::string& path, const CalibrationStats& stats) {
  std::map<std::string, at::Tensor> t;
  std::map<std::string, std::string> meta = {{"samples", std::to_string(stats.samples)}, {"model", stats.model},
                                             {"layers", std::to_string(stats.layers.size())}};
  for (size_t l = 0; l < stats.layers.size(); ++l) {
    const LayerStats& s = stats.layers[l];
    const std::string p = "layers." + std::to_string(l) + ".";
    for (int m = 0; m < 2; ++m) {
      const std::string mod = kModalityName[m];
      t[p + "gram." + mod] = s.gram[m];
      t[p + "q_norm." + mod] = s.q_norm[m];
      t[p + "k_norm." + mod] = s.k_norm[m];
      t[p + "rope_err." + mod] = s.rope_err[m];
      meta[p + "tokens." + mod] = std::to_string(s.tokens[m]);
    }
    meta[p + "queries"] = std::to_string(s.queries);
  }
  save_safetensors(path, t, meta);
}

CalibrationStats load_stats(const std::string& path, const TextConfig& text) {
  auto f = SafetensorsFile::open(path);
  const auto& meta = f->metadata();
  auto get = [&](const std::string& key) -> int64_t {
    auto it = meta.find(key);
    if (it == meta.end()) fail(path, "calibration statistics lack \"", key, "\"");
    return std::stoll(it->second);
  };
  CalibrationStats stats;
  stats.samples = get("samples");
  stats.model = meta.count("model") ? meta.at("model") : "";
  check(get("layers") == text.num_layers, path, "statistics are for ", get("layers"), " layers, the model has ",
        text.num_layers);
  const int64_t d = text.hidden_size, h = text.num_heads, g = text.num_kv_heads, P = text.head_dim / 2;
  for (int64_t l = 0; l < text.num_layers; ++l) {
    LayerStats s;
    const std::string p = "layers." + std::to_string(l) + ".";
    for (int m = 0; m < 2; ++m) {
      const std::string mod = kModalityName[m];
      auto load = [&](const std::string& name, std::vector<int64_t> shape) {
        const auto& e = f->entries();
        auto it = e.find(p + name + "." + mod);
        if (it == e.end()) fail(path, "missing tensor ", p + name + "." + mod);
        if (it->second.shape != shape)
          fail(path, "tensor ", p + name + "." + mod, " has shape ", shape_str(it->second.shape), ", expected ",
               shape_str(shape), " (statistics of another model?)");
        return f->load(p + name + "." + mod, at::kDouble);
      };
      s.gram[m] = load("gram", {d, d});
      s.q_norm[m] = load("q_norm", {h, P});
      s.k_norm[m] = load("k_norm", {g, P});
      s.rope_err[m] = load("rope_err", {h, P});
      s.tokens[m] = get(p + "tokens." + mod);
    }
    s.queries = get(p + "queries");
    stats.layers.push_back(std::move(s));
  }
  return stats;
}

}  // namespace mlaforge
