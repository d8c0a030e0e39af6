#include "model/decoder.h"

#include <ATen/ATen.h>

#include <cmath>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/decode_graph.h"
#include "model/ops.h"
#include "model/rope.h"

namespace mlaforge {


std::vector<int64_t> rotary_dims(const std::vector<int64_t>& kept, int64_t head_dim) {
  std::vector<int64_t> dims;
  for (int64_t k : kept) dims.push_back(k);
  for (int64_t k : kept) dims.push_back(k + head_dim / 2);
  return dims;
}

std::vector<int64_t> nope_dims(const std::vector<int64_t>& kept, int64_t head_dim) {
  std::vector<bool> is_kept(size_t(head_dim / 2), false);
  for (int64_t k : kept) is_kept[size_t(k)] = true;
  std::vector<int64_t> rest;
  for (int64_t k = 0; k < head_dim / 2; ++k)
    if (!is_kept[size_t(k)]) rest.push_back(k);
  return rotary_dims(rest, head_dim);
}

DecoderLM DecoderLM::random(const TextConfig& cfg, const MlaConfig& mla, at::ScalarType dtype,
                            const at::Device& device, uint64_t seed) {
  at::manual_seed(int64_t(seed));
  auto opts = at::TensorOptions().dtype(dtype).device(device);
  return DecoderLM(cfg, mla, [&](const std::string& name, const std::vector<int64_t>& shape, bool required) {
    if (!required) return at::Tensor();  // no biases
    if (name.find("norm") != std::string::npos) return at::ones(shape, opts);
    return at::randn(shape, opts) * (1.0 / std::sqrt(double(shape.back())));  // unit-scale outputs
  });
}

namespace {
// WeightLoader's interface over a WeightFn, under a name prefix.
struct FnLoader {
  const DecoderLM::WeightFn& get;
  std::string prefix;
  FnLoader sub(const std::string& more) const { return FnLoader{get, prefix + more}; }
  at::Tensor get_required(const std::string& n, const std::vector<int64_t>& s) const { return get(prefix + n, s, true); }
  at::Tensor maybe(const std::string& n, const std::vector<int64_t>& s) const { return get(prefix + n, s, false); }
};

// Which keys each query attends: causal, padding keys hidden, and every query its own key so that padded
// rows stay finite. key_pos [S], query_pos [T] (int64 positions), keys [B, S] bool (real tokens) -> [B, T, S].
at::Tensor attention_mask(const at::Tensor& key_pos, const at::Tensor& query_pos, const at::Tensor& keys) {
  at::Tensor k = key_pos.view({1, -1}), q = query_pos.view({-1, 1});
  return ((k <= q).unsqueeze(0) & keys.unsqueeze(1)) | (k == q).unsqueeze(0);
}
}  // namespace

DecoderLM::DecoderLM(const TextConfig& cfg, const MlaConfig& mla, const WeightFn& get, bool with_layers)
    : cfg_(cfg), mla_(mla) {
  const int64_t d = cfg.hidden_size, V = cfg.vocab_size;
  FnLoader w{get, ""};
  embed_w_ = w.get_required("embed_tokens.weight", {V, d});
  final_norm_ = w.get_required("norm.weight", {d});
  head_w_ = get(kHeadName, {V, d}, false);
  if (!head_w_.defined()) head_w_ = embed_w_;
  if (with_layers)
    for (int64_t i = 0; i < cfg.num_layers; ++i) layers_.push_back(load_layer(i, get));
  inv_freq_ = rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(embed_w_.device());
}

DecoderLayer DecoderLM::load_layer(int64_t i, const WeightFn& get) const {
  const TextConfig& cfg = cfg_;
  const int64_t d = cfg.hidden_size, h = cfg.num_heads, g = cfg.num_kv_heads, dh = cfg.head_dim,
                f = cfg.intermediate_size, r = mla_.rope_pairs, R = mla_.latent_dim;
  FnLoader l = FnLoader{get, ""}.sub("layers." + std::to_string(i) + ".");
  FnLoader a = l.sub("self_attn.");
  DecoderLayer L;
  L.q_w = a.get_required("q_proj.weight", {h * dh, d});
  L.q_b = a.maybe("q_proj.bias", {h * dh});
  L.o_w = a.get_required("o_proj.weight", {d, h * dh});
  L.o_b = a.maybe("o_proj.bias", {d});
  if (!mla_.enabled) {
    L.k_w = a.get_required("k_proj.weight", {g * dh, d});
    L.k_b = a.maybe("k_proj.bias", {g * dh});
    L.v_w = a.get_required("v_proj.weight", {g * dh, d});
    L.v_b = a.maybe("v_proj.bias", {g * dh});
  } else {
    const int64_t rows = g * (dh - 2 * r) + g * dh;
    L.k_rope_w = a.get_required(std::string(mla_names::k_rope) + ".weight", {g * 2 * r, d});
    L.k_rope_b = a.maybe(std::string(mla_names::k_rope) + ".bias", {g * 2 * r});
    if (R == 0) {
      L.kv_w = a.get_required(std::string(mla_names::direct) + ".weight", {rows, d});
    } else if (mla_.decoupled) {
      for (int m = 0; m < 2; ++m) {
        L.kv_down[m] = a.get_required(mla_names::down(true, m == 1) + ".weight", {R, d});
        L.kv_up[m] = a.get_required(mla_names::up(true, m == 1) + ".weight", {rows, R});
      }
    } else {  // one pair for both modalities: the same tensors, so training keeps them tied
      L.kv_down[0] = L.kv_down[1] = a.get_required(mla_names::down(false, false) + ".weight", {R, d});
      L.kv_up[0] = L.kv_up[1] = a.get_required(mla_names::up(false, false) + ".weight", {rows, R});
    }
    L.kv_up_b = a.maybe(std::string(mla_names::up_bias), {rows});
    std::vector<int64_t> dims;
    for (const auto& kept : mla_.kept_pairs[size_t(i)]) {
      auto rd = rotary_dims(kept, dh);
      dims.insert(dims.end(), rd.begin(), rd.end());
    }
    L.rope_dims = at::tensor(dims, at::kLong).view({g, 2 * r}).to(L.q_w.device());
  }
  L.input_norm = l.get_required("input_layernorm.weight", {d});
  L.post_norm = l.get_required("post_attention_layernorm.weight", {d});
  L.gate_w = l.get_required("mlp.gate_proj.weight", {f, d});
  L.up_w = l.get_required("mlp.up_proj.weight", {f, d});
  L.down_w = l.get_required("mlp.down_proj.weight", {d, f});
  return L;
}

at::Tensor DecoderLM::embed(const at::Tensor& ids) const { return at::embedding(embed_w_, ids); }

KVCache DecoderLM::new_cache(int64_t batch, int64_t capacity, const at::Device& device,
                             const CacheOptions& options) const {
  KVCache c;
  c.capacity = capacity;
  c.cuda_graph = options.cuda_graph && device.is_cuda();
  auto flags = at::TensorOptions().dtype(at::kBool).device(device);
  c.key_valid = at::zeros({batch, capacity}, flags);
  const bool latent = mla_.enabled && mla_.latent_dim > 0 && !options.expanded;
  KvFormat fmt = parse_kv_format(options.latent, "--kv-cache");
  if (!latent) {
    check(fmt == KvFormat::F32 || fmt == KvFormat::BF16, "--kv-cache",
          "int8 and int4 quantize the latent of an MLA checkpoint; this model caches keys and values (auto or bf16)");
    check(options.window == 0, "--kv-window",
          "keeps recent positions of an MLA checkpoint's latent cache unquantized; this model caches keys and values");
    auto opts = at::TensorOptions().dtype(fmt == KvFormat::BF16 ? at::kBFloat16 : embed_w_.scalar_type()).device(device);
    for (int64_t i = 0; i < cfg_.num_layers; ++i) {
      c.k.push_back(at::zeros({batch, cfg_.num_kv_heads, capacity, cfg_.head_dim}, opts));
      c.v.push_back(at::zeros({batch, cfg_.num_kv_heads, capacity, cfg_.head_dim}, opts));
    }
    return c;
  }
  // "auto" stores the latent in the compute dtype (f32, or bf16 for a model running in bf16).
  const auto dtype = embed_w_.scalar_type();
  if (options.latent == "auto") {
    check(dtype == at::kFloat || dtype == at::kBFloat16, "--kv-cache",
          "the latent cache holds f32, bf16, int8 or int4; a model in ", dtype, " needs the expanded cache");
    fmt = dtype == at::kBFloat16 ? KvFormat::BF16 : KvFormat::F32;
  }
  LatentPoolOptions po;
  po.latent = fmt;
  po.rope = options.rope == "auto" ? (fmt == KvFormat::F32 ? KvFormat::F32 : KvFormat::BF16)
                                   : parse_kv_format(options.rope, "--kv-rope");
  check(po.rope != KvFormat::Int4, "--kv-rope", "rotary keys are cached as f32, bf16 or int8");
  po.block_size = options.block_size;
  // The pool: room for every row's capacity (rows own blocks only from their first real token on),
  // one more block per row for continuous batching's joining rows, and the scratch block.
  const int64_t per_row = (capacity + po.block_size - 1) / po.block_size;
  c.pool = std::make_shared<LatentPool>(cfg_.num_layers, cfg_.num_kv_heads, 2 * mla_.rope_pairs, mla_.latent_dim,
                                        batch * (per_row + 1) + 1, po, device);
  c.scratch_block = c.pool->allocate(1)[0];
  c.blocks.assign(size_t(batch), std::vector<int32_t>(size_t(per_row), -1));
  c.row_begin.assign(size_t(batch), KVCache::kNoToken);
  c.block_table = at::full({batch, per_row}, c.scratch_block, at::TensorOptions().dtype(at::kInt).device(device));
  if (options.window > 0) {
    c.window = options.window;
    auto wopts = at::TensorOptions().dtype(dtype).device(device);
    for (int64_t i = 0; i < cfg_.num_layers; ++i) {
      c.win_rope.push_back(at::zeros({batch, c.window, cfg_.num_kv_heads, 2 * mla_.rope_pairs}, wopts));
      c.win_latent.push_back(at::zeros({batch, c.window, mla_.latent_dim}, wopts));
    }
    c.win_img = at::zeros({batch, c.window}, flags);
  }
  return c;
}

bool DecoderLM::tied_latent(const DecoderLayer& L) { return L.kv_down[0].is_same(L.kv_down[1]); }

at::Tensor DecoderLM::expand_latent(const DecoderLayer& L, const at::Tensor& latent, const at::Tensor& is_image) const {
  // latent [B, S, R], is_image [B, S] -> [k_nope | v] = W_up^m c + b by each token's modality: [B, S, g*(dh-2r) + g*dh]
  at::Tensor kv = tied_latent(L) ? dense(latent, L.kv_up[0])
                                 : at::where(is_image.unsqueeze(-1), dense(latent, L.kv_up[1]), dense(latent, L.kv_up[0]));
  return L.kv_up_b.defined() ? kv + L.kv_up_b : kv;
}

at::Tensor DecoderLM::absorbed_decode(const DecoderLayer& L, const at::Tensor& q, const KVCache& cache,
                                      size_t layer) const {
  // q [B, 1, g, group, dh] with its rotary part rotated.
  const int64_t B = q.size(0), h = cfg_.num_heads, g = cfg_.num_kv_heads, dh = cfg_.head_dim;
  const int64_t group = h / g, r2 = 2 * mla_.rope_pairs, nope = dh - r2, R = mla_.latent_dim;
  // Up-projections as key-nope rows [g, nope, R] and value rows [g, dh, R], per modality (0 text, 1 image).
  auto uk = [&](int m) { return L.kv_up[m].narrow(0, 0, g * nope).view({g, nope, R}); };
  auto uv = [&](int m) { return L.kv_up[m].narrow(0, g * nope, g * dh).view({g, dh, R}); };
  const bool tied = tied_latent(L);
  const int64_t M = tied ? 1 : 2;  // modalities with their own up-projections
  at::Tensor q_rope = q.narrow(-1, 0, r2).reshape({B, h, r2});
  at::Tensor q_nope = q.narrow(-1, r2, nope).reshape({B, g, group, nope}).transpose(0, 1).reshape({g, B * group, nope});
  // Absorbed queries of both modalities in one product, qa^m = W_uk^m^T q_nope:
  // [g, B*group, nope] x [g, nope, M*R] -> [B, h, M, R] (each step's launches are the decode's cost at batch 16).
  DecoderLayer::AbsorbedUp& up = L.absorbed;
  bool stale = false;
  for (int m = 0; m < 2; ++m)
    stale = stale || !up.source[m].is_same(L.kv_up[m]) || up.version[m] != L.kv_up[m]._version();
  if (stale) {
    up.uk_all = tied ? uk(0) : at::cat({uk(0), uk(1)}, 2);
    up.uv_all = tied ? uv(0).transpose(1, 2) : at::cat({uv(0).transpose(1, 2), uv(1).transpose(1, 2)}, 1);
    for (int m = 0; m < 2; ++m) {
      up.source[m] = L.kv_up[m];
      up.version[m] = L.kv_up[m]._version();
    }
  }
  const at::Tensor &uk_all = up.uk_all, &uv_all = up.uv_all;
  at::Tensor qa = at::matmul(q_nope, uk_all).view({g, B, group, M, R}).permute({1, 0, 2, 3, 4}).reshape({B, h, M, R});
  at::Tensor q_latent = tied ? qa.expand({B, h, 2, R}) : qa;
  const double scale = 1.0 / std::sqrt(double(dh));
  at::Tensor sums = (cache.window > 0
                         ? mla_decode_window(*cache.pool, int64_t(layer), q_rope, q_latent, cache.paged, scale,
                                             DecodeWindow{cache.win_rope[layer], cache.win_latent[layer], cache.win_img,
                                                          cache.win_valid})
                         : mla_decode(*cache.pool, int64_t(layer), q_rope, q_latent, cache.paged, scale))
                        .to(q.scalar_type());  // [B, h, 2, R]: text sums, image sums
  // o = W_uv^txt (text sums) + W_uv^img (image sums) per KV head, both in one product:
  // [g, B*group, M*R] x [g, M*R, dh] -> [B, 1, h*dh].
  at::Tensor s = tied ? sums.sum(2) : sums;
  at::Tensor out = at::matmul(s.reshape({B, g, group, M * R}).transpose(0, 1).reshape({g, B * group, M * R}), uv_all);
  out = out.view({g, B, group, dh}).transpose(0, 1).reshape({B, 1, h * dh});
  if (L.kv_up_b.defined())  // each KV head's value bias for its group of query heads
    out = out + L.kv_up_b.narrow(0, g * nope, g * dh).view({g, 1, dh}).expand({g, group, dh}).reshape({1, 1, h * dh});
  return out;
}

at::Tensor DecoderLM::attention(const DecoderLayer& L, const at::Tensor& x, const LayerContext& ctx,
                                const at::Tensor& is_image, KVCache& cache, size_t layer, const ForwardTaps& taps) const {
  const at::Tensor &cos = ctx.cos, &sin = ctx.sin;
  const int64_t B = x.size(0), T = x.size(1), h = cfg_.num_heads, g = cfg_.num_kv_heads, dh = cfg_.head_dim;
  const int64_t group = h / g, start = cache.len, S = start + T;
  at::Tensor q, k, v;  // q [B, h, T, dh]; k, v [B, g, T, dh]; q and k rotated
  at::Tensor q_pre, k_pre;
  if (!mla_.enabled) {
    q_pre = dense(x, L.q_w, L.q_b).view({B, T, h, dh}).transpose(1, 2);
    k_pre = dense(x, L.k_w, L.k_b).view({B, T, g, dh}).transpose(1, 2);
    v = dense(x, L.v_w, L.v_b).view({B, T, g, dh}).transpose(1, 2);
    at::Tensor c = cos.unsqueeze(1), s = sin.unsqueeze(1);  // [B, 1, T, dh]
    q = apply_rotary(q_pre, c, s);
    k = apply_rotary(k_pre, c, s);
  } else {
    const int64_t r2 = 2 * mla_.rope_pairs, nope = dh - r2;
    // cos/sin of each KV head's kept pairs (their own frequency and M-RoPE axis): [B, T, g, 2r]
    at::Tensor idx = L.rope_dims.to(cos.device()).view({-1});
    at::Tensor c = cos.index_select(-1, idx).view({B, T, g, r2}), s = sin.index_select(-1, idx).view({B, T, g, r2});
    at::Tensor qh = dense(x, L.q_w, L.q_b).view({B, T, g, group, dh});
    at::Tensor q_rope = apply_rotary(qh.narrow(-1, 0, r2), c.unsqueeze(3), s.unsqueeze(3));
    at::Tensor k_rope = apply_rotary(dense(x, L.k_rope_w, L.k_rope_b).view({B, T, g, r2}), c, s);  // [B, T, g, 2r]
    at::Tensor img = is_image.view({B, T, 1});
    at::Tensor latent;  // c = W_down^m x by each token's modality: [B, T, R] (undefined when kv is fused)
    if (!L.kv_w.defined())
      latent = tied_latent(L) ? dense(x, L.kv_down[0]) : at::where(img, dense(x, L.kv_down[1]), dense(x, L.kv_down[0]));
    if (cache.is_latent()) {
      LatentPool& pool = *cache.pool;
      pool.write(int64_t(layer), cache.new_slots, k_rope.reshape({B * T, g, r2}), latent.reshape({B * T, -1}));
      // The modality bytes are shared by all layers: written once.
      if (layer == 0) pool.write_modality(cache.new_slots, is_image.reshape({-1}));
      if (cache.window > 0) {  // the last new positions, unquantized, into their window slots
        const int64_t f = cache.win_first, w = T - f;
        cache.win_rope[layer].index_copy_(1, cache.win_slots, k_rope.narrow(1, f, w).to(cache.win_rope[layer].scalar_type()));
        cache.win_latent[layer].index_copy_(1, cache.win_slots, latent.narrow(1, f, w).to(cache.win_latent[layer].scalar_type()));
        if (layer == 0) cache.win_img.index_copy_(1, cache.win_slots, is_image.narrow(1, f, w).to(at::kBool));
      }
      at::Tensor qr = at::cat({q_rope, qh.narrow(-1, r2, nope)}, -1);  // [B, T, g, group, dh]
      // Decoding: the absorbed form over the latent cache. Prefill (T > 1): the expanded form, with
      // keys and values rebuilt from every cached latent (as stored, i.e. after quantization).
      if (T == 1) return dense(absorbed_decode(L, qr, cache, layer), L.o_w, L.o_b);
      q = qr.view({B, T, h, dh}).transpose(1, 2);
      const auto dt = x.scalar_type();
      at::Tensor lat_all = pool.read_latent(int64_t(layer), cache.all_slots, dt);  // [B, S, R]
      at::Tensor kr_all = pool.read_k_rope(int64_t(layer), cache.all_slots, dt);   // [B, S, g, 2r]
      if (cache.window > 0) {  // the last positions as the window keeps them, unquantized
        const int64_t w = std::min(S, cache.window);
        lat_all.narrow(1, S - w, w).copy_(cache.win_latent[layer].index_select(1, cache.win_read_slots));
        kr_all.narrow(1, S - w, w).copy_(cache.win_rope[layer].index_select(1, cache.win_read_slots));
      }
      at::Tensor kv = expand_latent(L, lat_all, pool.read_modality(cache.all_slots));
      at::Tensor K = at::cat({kr_all, kv.narrow(-1, 0, g * nope).view({B, S, g, nope})}, -1);
      return attend(L, q, K.transpose(1, 2), kv.narrow(-1, g * nope, g * dh).view({B, S, g, dh}).transpose(1, 2), ctx,
                    x, q_pre, k_pre, layer, taps);
    }
    q = at::cat({q_rope, qh.narrow(-1, r2, nope)}, -1).view({B, T, h, dh}).transpose(1, 2);
    at::Tensor kv = L.kv_w.defined() ? dense(x, L.kv_w, L.kv_up_b) : expand_latent(L, latent, is_image);  // [B, T, g*(dh-2r) + g*dh]
    at::Tensor k_nope = kv.narrow(-1, 0, g * nope).view({B, T, g, nope});
    v = kv.narrow(-1, g * nope, g * dh).view({B, T, g, dh}).transpose(1, 2);
    k = at::cat({k_rope, k_nope}, -1).transpose(1, 2);
  }
  if (ctx.kv_write_pos.defined()) {  // decode_device: one fixed-shape step over the whole capacity
    cache.k[layer].index_copy_(2, ctx.kv_write_pos, k.to(cache.k[layer].scalar_type()));
    cache.v[layer].index_copy_(2, ctx.kv_write_pos, v.to(cache.v[layer].scalar_type()));
    return attend(L, q, cache.k[layer], cache.v[layer], ctx, x, q_pre, k_pre, layer, taps);
  }
  cache.k[layer].narrow(2, start, T).copy_(k);
  cache.v[layer].narrow(2, start, T).copy_(v);
  return attend(L, q, cache.k[layer].narrow(2, 0, S), cache.v[layer].narrow(2, 0, S), ctx, x, q_pre, k_pre, layer, taps);
}

at::Tensor DecoderLM::attend(const DecoderLayer& L, const at::Tensor& q, const at::Tensor& K, const at::Tensor& V,
                             const LayerContext& ctx, const at::Tensor& x, const at::Tensor& q_pre,
                             const at::Tensor& k_pre, size_t layer, const ForwardTaps& taps) const {
  // q [B, h, T, dh]; K, V [B, g, S, dh]
  const int64_t B = q.size(0), h = q.size(1), T = q.size(2), dh = q.size(3), g = K.size(1), S = K.size(2);
  const int64_t group = h / g;
  const bool observed = taps.observer && *taps.observer;  // the observer needs the probabilities
  // Prefill only: decoding through SDPA inside the model ran 2.7-3x slower than the explicit form on the
  // H200, cause not found (docs/inference.md).
  if (!observed && T > 1 && fused_attention_applies(q) && K.scalar_type() == q.scalar_type()) {
    at::Tensor mask = ctx.unmasked ? at::Tensor() : ctx.mask.view({B, 1, T, S});
    at::Tensor o = fused_attention(q, K, V, mask, ctx.unmasked, 1.0 / std::sqrt(double(dh)));  // [B, h, T, dh]
    return dense(o.transpose(1, 2).reshape({B, T, h * dh}), L.o_w, L.o_b);
  }
  const at::Tensor& mask = ctx.mask;
  // GQA without copying K/V: queries grouped by their KV head, [B, g, group*T, dh].
  at::Tensor qg = q.reshape({B, g, group * T, dh});
  // A bf16 cache is read in the compute dtype.
  at::Tensor scores = at::matmul(qg, K.to(q.scalar_type()).transpose(2, 3)) * (1.0 / std::sqrt(double(dh)));  // [B, g, group*T, S]
  scores = scores.view({B, g, group, T, S}).masked_fill(mask.logical_not(), -INFINITY);
  // Softmax in float32 (float64 when the model runs in float64, e.g. for gradient checks).
  at::Tensor p = at::softmax(scores, -1, scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  if (observed) (*taps.observer)(AttentionTrace{int64_t(layer), x, q_pre, k_pre, ctx.cos, ctx.sin, p});
  at::Tensor out = at::matmul(p.view({B, g, group * T, S}).to(q.scalar_type()), V.to(q.scalar_type()))
                       .view({B, h, T, dh})
                       .transpose(1, 2)
                       .reshape({B, T, h * dh});
  return dense(out, L.o_w, L.o_b);
}

LayerContext DecoderLM::begin_layers(const at::Tensor& x_in, const at::Tensor& pos, const at::Tensor& valid,
                                     KVCache& cache) const {
  const int64_t B = x_in.size(0), T = x_in.size(1), start = cache.len, S = start + T;
  reserve_positions(cache, valid, S);
  LayerContext ctx;
  ctx.start = start;
  ctx.end = S;
  rotary_tables(ctx, pos, x_in.scalar_type());
  cache.key_valid.narrow(1, start, T).copy_(valid);
  at::Tensor key_pos = at::arange(S, at::TensorOptions().dtype(at::kLong).device(x_in.device()));
  ctx.mask = attention_mask(key_pos, key_pos.narrow(0, start, T), cache.key_valid.narrow(1, 0, S)).view({B, 1, 1, T, S});
  // One host sync per prefill where fused attention runs; none while decoding.
  if (T > 1 && start == 0 && fused_attention_applies(x_in)) ctx.unmasked = valid.all().item<bool>();
  return ctx;
}

void DecoderLM::rotary_tables(LayerContext& ctx, const at::Tensor& pos, at::ScalarType dtype) const {
  auto [cos_f, sin_f] = rope_cos_sin(pos, inv_freq_, cfg_.mrope_section);  // [B, T, dh] float32
  // In the activations' dtype, as transformers applies them (bf16 models rotate in bf16).
  ctx.cos = cos_f.to(dtype);
  ctx.sin = sin_f.to(dtype);
}

at::Tensor DecoderLM::run_layer(const DecoderLayer& L, size_t i, const at::Tensor& x, const LayerContext& ctx,
                                const at::Tensor& is_image, KVCache& cache, const ForwardTaps& taps) const {
  at::Tensor a = attention(L, rms_norm(x, L.input_norm, cfg_.rms_norm_eps), ctx, is_image, cache, i, taps);
  if (taps.attention) taps.attention->push_back(a);
  at::Tensor y = x + a;
  at::Tensor h2 = rms_norm(y, L.post_norm, cfg_.rms_norm_eps);
  return y + dense(at::silu(dense(h2, L.gate_w)) * dense(h2, L.up_w), L.down_w);
}

at::Tensor DecoderLM::forward(const at::Tensor& x_in, const at::Tensor& pos, const at::Tensor& valid,
                              const at::Tensor& is_image, KVCache& cache, const ForwardTaps& taps) const {
  check(layers_.size() == size_t(cfg_.num_layers), "decoder", "loaded without its layers (streaming conversion)");
  const LayerContext ctx = begin_layers(x_in, pos, valid, cache);
  std::vector<at::Tensor>* hidden = taps.hidden;
  at::Tensor x = x_in;
  if (hidden) hidden->push_back(x);
  for (size_t i = 0; i < layers_.size(); ++i) {
    x = run_layer(layers_[i], i, x, ctx, is_image, cache, taps);
    if (hidden && i + 1 < layers_.size()) hidden->push_back(x);
  }
  cache.len = ctx.end;
  x = rms_norm(x, final_norm_, cfg_.rms_norm_eps);
  if (hidden) hidden->push_back(x);
  return x;
}

at::Tensor DecoderLM::logits(const at::Tensor& h) const { return at::linear(h, head_w_); }

at::Tensor DecoderLM::decode_step(const at::Tensor& tokens, const at::Tensor& pos, KVCache& cache) const {
  const int64_t B = tokens.size(0);
  at::Tensor ids = tokens.reshape({B, 1});
  if (cache.cuda_graph) return graph_decode_step(*this, ids, pos, cache);
  auto flags = at::TensorOptions().dtype(at::kBool).device(ids.device());
  // Generated tokens are text.
  at::Tensor h = forward(embed(ids), pos, at::ones({B, 1}, flags), at::zeros({B, 1}, flags), cache);
  return logits(h.select(1, 0));
}

at::Tensor DecoderLM::decode_device(const at::Tensor& tokens, const at::Tensor& pos, const at::Tensor& write_pos,
                                    KVCache& cache) const {
  const int64_t B = tokens.size(0);
  at::Tensor x = embed(tokens);  // [B, 1, d]
  LayerContext ctx;  // start/end stay 0: nothing reads them here, and cache.len is the caller's
  rotary_tables(ctx, pos, x.scalar_type());
  if (!cache.is_latent()) {
    // Keys at every capacity position, the new one at write_pos.
    at::Tensor key_pos = at::arange(cache.capacity, write_pos.options());
    ctx.mask = attention_mask(key_pos, write_pos, cache.key_valid).view({B, 1, 1, 1, cache.capacity});
    ctx.kv_write_pos = write_pos;
  }
  at::Tensor is_image = at::zeros({B, 1}, at::TensorOptions().dtype(at::kBool).device(x.device()));
  for (size_t i = 0; i < layers_.size(); ++i) x = run_layer(layers_[i], i, x, ctx, is_image, cache);
  return logits(rms_norm(x, final_norm_, cfg_.rms_norm_eps).select(1, 0));
}

std::vector<std::pair<std::string, at::Tensor*>> DecoderLM::named_weights() {
  std::vector<std::pair<std::string, at::Tensor*>> out;
  auto add = [&](const std::string& name, at::Tensor& t) {
    if (t.defined()) out.emplace_back(name, &t);
  };
  for (size_t i = 0; i < layers_.size(); ++i) {
    DecoderLayer& L = layers_[i];
    const std::string p = "layers." + std::to_string(i) + ".", a = p + "self_attn.";
    add(a + "q_proj.weight", L.q_w);
    add(a + "q_proj.bias", L.q_b);
    add(a + "k_proj.weight", L.k_w);
    add(a + "k_proj.bias", L.k_b);
    add(a + "v_proj.weight", L.v_w);
    add(a + "v_proj.bias", L.v_b);
    add(a + mla_names::k_rope + ".weight", L.k_rope_w);
    add(a + mla_names::k_rope + ".bias", L.k_rope_b);
    add(a + mla_names::direct + ".weight", L.kv_w);
    const bool tied = L.kv_down[0].defined() && tied_latent(L);
    for (int m = tied ? 0 : 1; m >= 0; --m) {
      add(a + mla_names::down(!tied, m == 1) + ".weight", L.kv_down[m]);
      add(a + mla_names::up(!tied, m == 1) + ".weight", L.kv_up[m]);
    }
    add(a + mla_names::up_bias, L.kv_up_b);
    add(a + "o_proj.weight", L.o_w);
    add(a + "o_proj.bias", L.o_b);
    add(p + "input_layernorm.weight", L.input_norm);
    add(p + "post_attention_layernorm.weight", L.post_norm);
    add(p + "mlp.gate_proj.weight", L.gate_w);
    add(p + "mlp.up_proj.weight", L.up_w);
    add(p + "mlp.down_proj.weight", L.down_w);
  }
  add("norm.weight", final_norm_);
  return out;
}

void DecoderLM::to(const at::Device& device, at::ScalarType dtype) {
  // Every weight named_weights lists (shared MLA factors once: the tie is restored after the move),
  // then the embeddings and the head, which it leaves out.
  std::vector<bool> tied;
  for (const DecoderLayer& L : layers_) tied.push_back(L.kv_down[0].defined() && tied_latent(L));
  for (auto& named : named_weights()) move_tensors({named.second}, device, dtype);
  for (size_t i = 0; i < layers_.size(); ++i) {
    DecoderLayer& L = layers_[i];
    if (tied[i]) {
      L.kv_down[1] = L.kv_down[0];
      L.kv_up[1] = L.kv_up[0];
    }
    if (L.rope_dims.defined()) L.rope_dims = L.rope_dims.to(device);
  }
  const bool tied_head = head_w_.is_same(embed_w_);
  move_tensors({&embed_w_}, device, dtype);
  head_w_ = tied_head ? embed_w_ : head_w_.to(device, dtype);
  inv_freq_ = inv_freq_.to(device);  // stays float32: RoPE angles are computed in float32 as transformers does
}

}  // namespace mlaforge
