#include "model/decoder.h"

#include <ATen/ATen.h>

#include <cmath>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/ops.h"
#include "model/rope.h"

namespace mlaforge {

int64_t KVCache::bytes() const {
  int64_t b = 0;
  for (auto& t : k) b += t.numel() * t.element_size();
  for (auto& t : v) b += t.numel() * t.element_size();
  return b;
}

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

DecoderLM::DecoderLM(const TextConfig& cfg, const MlaConfig& mla, const WeightStore& store,
                     const std::string& lm_prefix, const std::string& head_name)
    : cfg_(cfg), mla_(mla) {
  const int64_t d = cfg.hidden_size, h = cfg.num_heads, g = cfg.num_kv_heads, dh = cfg.head_dim,
                f = cfg.intermediate_size, V = cfg.vocab_size, r = mla.rope_pairs, R = mla.latent_dim;
  WeightLoader w(store, lm_prefix);
  embed_w_ = w.get("embed_tokens.weight", {V, d});
  final_norm_ = w.get("norm.weight", {d});
  if (store.has(head_name))
    head_w_ = store.load(head_name, {V, d});
  else if (cfg.tie_word_embeddings)
    head_w_ = embed_w_;
  else
    fail(store.dir(), "missing tensor ", head_name, " (and tie_word_embeddings is false)");
  for (int64_t i = 0; i < cfg.num_layers; ++i) {
    WeightLoader l = w.sub("layers." + std::to_string(i) + ".");
    WeightLoader a = l.sub("self_attn.");
    DecoderLayer L;
    L.q_w = a.get("q_proj.weight", {h * dh, d});
    L.q_b = a.maybe("q_proj.bias", {h * dh});
    L.o_w = a.get("o_proj.weight", {d, h * dh});
    L.o_b = a.maybe("o_proj.bias", {d});
    if (!mla.enabled) {
      L.k_w = a.get("k_proj.weight", {g * dh, d});
      L.k_b = a.maybe("k_proj.bias", {g * dh});
      L.v_w = a.get("v_proj.weight", {g * dh, d});
      L.v_b = a.maybe("v_proj.bias", {g * dh});
    } else {
      const int64_t rows = g * (dh - 2 * r) + g * dh;
      L.k_rope_w = a.get(std::string(mla_names::k_rope) + ".weight", {g * 2 * r, d});
      L.k_rope_b = a.maybe(std::string(mla_names::k_rope) + ".bias", {g * 2 * r});
      if (R == 0) {
        L.kv_w = a.get(std::string(mla_names::direct) + ".weight", {rows, d});
      } else if (mla.decoupled) {
        for (int m = 0; m < 2; ++m) {
          L.kv_down[m] = a.get(mla_names::down(true, m == 1) + ".weight", {R, d});
          L.kv_up[m] = a.get(mla_names::up(true, m == 1) + ".weight", {rows, R});
        }
      } else {  // one pair for both modalities: the same tensors, so training keeps them tied
        L.kv_down[0] = L.kv_down[1] = a.get(mla_names::down(false, false) + ".weight", {R, d});
        L.kv_up[0] = L.kv_up[1] = a.get(mla_names::up(false, false) + ".weight", {rows, R});
      }
      L.kv_up_b = a.maybe(std::string(mla_names::up_bias), {rows});
      std::vector<int64_t> dims;
      for (const auto& kept : mla.kept_pairs[size_t(i)]) {
        auto rd = rotary_dims(kept, dh);
        dims.insert(dims.end(), rd.begin(), rd.end());
      }
      L.rope_dims = at::tensor(dims, at::kLong).view({g, 2 * r});
    }
    L.input_norm = l.get("input_layernorm.weight", {d});
    L.post_norm = l.get("post_attention_layernorm.weight", {d});
    L.gate_w = l.get("mlp.gate_proj.weight", {f, d});
    L.up_w = l.get("mlp.up_proj.weight", {f, d});
    L.down_w = l.get("mlp.down_proj.weight", {d, f});
    layers_.push_back(std::move(L));
  }
  inv_freq_ = rope_inv_freq(dh, cfg.rope_theta);
}

at::Tensor DecoderLM::embed(const at::Tensor& ids) const { return at::embedding(embed_w_, ids); }

KVCache DecoderLM::new_cache(int64_t batch, int64_t capacity, const at::Device& device) const {
  KVCache c;
  c.capacity = capacity;
  auto opts = at::TensorOptions().dtype(embed_w_.scalar_type()).device(device);
  for (int64_t i = 0; i < cfg_.num_layers; ++i) {
    c.k.push_back(at::zeros({batch, cfg_.num_kv_heads, capacity, cfg_.head_dim}, opts));
    c.v.push_back(at::zeros({batch, cfg_.num_kv_heads, capacity, cfg_.head_dim}, opts));
  }
  c.key_valid = at::zeros({batch, capacity}, at::TensorOptions().dtype(at::kBool).device(device));
  return c;
}

at::Tensor DecoderLM::attention(const DecoderLayer& L, const at::Tensor& x, const at::Tensor& cos,
                                const at::Tensor& sin, const at::Tensor& mask, const at::Tensor& is_image,
                                KVCache& cache, size_t layer, const ForwardTaps& taps) const {
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
    q = at::cat({q_rope, qh.narrow(-1, r2, nope)}, -1).view({B, T, h, dh}).transpose(1, 2);
    at::Tensor k_rope = apply_rotary(dense(x, L.k_rope_w, L.k_rope_b).view({B, T, g, r2}), c, s);
    // The latent c = W_down^m x and its expansion W_up^m c + b, by each token's modality.
    at::Tensor kv;  // [B, T, g*(dh-2r) + g*dh]
    if (L.kv_w.defined()) {
      kv = dense(x, L.kv_w);
    } else if (L.kv_down[0].is_same(L.kv_down[1])) {
      kv = dense(dense(x, L.kv_down[0]), L.kv_up[0]);
    } else {
      at::Tensor img = is_image.view({B, T, 1});
      at::Tensor latent = at::where(img, dense(x, L.kv_down[1]), dense(x, L.kv_down[0]));  // [B, T, R]
      kv = at::where(img, dense(latent, L.kv_up[1]), dense(latent, L.kv_up[0]));
    }
    if (L.kv_up_b.defined()) kv = kv + L.kv_up_b;
    at::Tensor k_nope = kv.narrow(-1, 0, g * nope).view({B, T, g, nope});
    v = kv.narrow(-1, g * nope, g * dh).view({B, T, g, dh}).transpose(1, 2);
    k = at::cat({k_rope, k_nope}, -1).transpose(1, 2);
  }
  cache.k[layer].narrow(2, start, T).copy_(k);
  cache.v[layer].narrow(2, start, T).copy_(v);
  at::Tensor K = cache.k[layer].narrow(2, 0, S), V = cache.v[layer].narrow(2, 0, S);
  // GQA without copying K/V: queries grouped by their KV head, [B, g, group*T, dh].
  at::Tensor qg = q.reshape({B, g, group * T, dh});
  at::Tensor scores = at::matmul(qg, K.transpose(2, 3)) * (1.0 / std::sqrt(double(dh)));  // [B, g, group*T, S]
  scores = scores.view({B, g, group, T, S}).masked_fill(mask.logical_not(), -INFINITY);
  // Softmax in float32 (float64 when the model runs in float64, e.g. for gradient checks).
  at::Tensor p = at::softmax(scores, -1, scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  if (taps.observer && *taps.observer) (*taps.observer)(AttentionTrace{int64_t(layer), x, q_pre, k_pre, cos, sin, p});
  at::Tensor out = at::matmul(p.view({B, g, group * T, S}).to(V.scalar_type()), V)
                       .view({B, h, T, dh})
                       .transpose(1, 2)
                       .reshape({B, T, h * dh});
  return dense(out, L.o_w, L.o_b);
}

at::Tensor DecoderLM::forward(const at::Tensor& x_in, const at::Tensor& pos, const at::Tensor& valid,
                              const at::Tensor& is_image, KVCache& cache, const ForwardTaps& taps) const {
  const int64_t B = x_in.size(0), T = x_in.size(1), start = cache.len, S = start + T;
  check(S <= cache.capacity, "kv cache", "capacity ", cache.capacity, " exceeded (", S, " positions)");
  std::vector<at::Tensor>* hidden = taps.hidden;
  auto [cos, sin] = rope_cos_sin(pos, inv_freq_, cfg_.mrope_section);  // [B, T, dh]
  cache.key_valid.narrow(1, start, T).copy_(valid);
  // mask [B, 1, 1, T, S]: causal, padding keys hidden; every query sees itself so padded rows stay finite.
  at::Tensor key_pos = at::arange(S, at::TensorOptions().dtype(at::kLong).device(x_in.device()));
  at::Tensor query_pos = key_pos.narrow(0, start, T);
  at::Tensor causal = key_pos.view({1, S}) <= query_pos.view({T, 1});     // [T, S]
  at::Tensor self = key_pos.view({1, S}) == query_pos.view({T, 1});       // [T, S]
  at::Tensor keys = cache.key_valid.narrow(1, 0, S).view({B, 1, S});      // [B, 1, S]
  at::Tensor mask = (causal.unsqueeze(0) & keys) | self.unsqueeze(0);     // [B, T, S]
  mask = mask.view({B, 1, 1, T, S});

  at::Tensor x = x_in;
  if (hidden) hidden->push_back(x);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const DecoderLayer& L = layers_[i];
    at::Tensor a = attention(L, rms_norm(x, L.input_norm, cfg_.rms_norm_eps), cos, sin, mask, is_image, cache, i, taps);
    if (taps.attention) taps.attention->push_back(a);
    x = x + a;
    at::Tensor h2 = rms_norm(x, L.post_norm, cfg_.rms_norm_eps);
    x = x + dense(at::silu(dense(h2, L.gate_w)) * dense(h2, L.up_w), L.down_w);
    if (hidden && i + 1 < layers_.size()) hidden->push_back(x);
  }
  cache.len = S;
  x = rms_norm(x, final_norm_, cfg_.rms_norm_eps);
  if (hidden) hidden->push_back(x);
  return x;
}

at::Tensor DecoderLM::logits(const at::Tensor& h) const { return at::linear(h, head_w_); }

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
    const bool tied = L.kv_down[0].defined() && L.kv_down[0].is_same(L.kv_down[1]);
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
  auto move = [&](at::Tensor& t) {
    if (t.defined()) t = t.to(device, t.is_floating_point() ? dtype : t.scalar_type());
  };
  for (DecoderLayer& L : layers_) {
    const bool tied = L.kv_down[0].defined() && L.kv_down[0].is_same(L.kv_down[1]);
    for (at::Tensor* t : {&L.q_w, &L.q_b, &L.k_w, &L.k_b, &L.v_w, &L.v_b, &L.o_w, &L.o_b, &L.input_norm, &L.post_norm,
                          &L.gate_w, &L.up_w, &L.down_w, &L.k_rope_w, &L.k_rope_b, &L.kv_down[0], &L.kv_up[0], &L.kv_up_b,
                          &L.kv_w})
      move(*t);
    if (tied) {
      L.kv_down[1] = L.kv_down[0];
      L.kv_up[1] = L.kv_up[0];
    } else {
      move(L.kv_down[1]);
      move(L.kv_up[1]);
    }
    if (L.rope_dims.defined()) L.rope_dims = L.rope_dims.to(device);
  }
  const bool tied_head = head_w_.is_same(embed_w_);
  for (at::Tensor* t : {&embed_w_, &final_norm_}) move(*t);
  head_w_ = tied_head ? embed_w_ : head_w_.to(device, dtype);
  inv_freq_ = inv_freq_.to(device);  // stays float32: RoPE angles are computed in float32 as transformers does
}

}  // namespace mlaforge
