#include "infer/bench.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <functional>

#include <nlohmann/json.hpp>

#include "core/device.h"
#include "core/error.h"
#include "io/config.h"
#include "model/decode_graph.h"
#include "model/ops.h"

#ifdef MLAFORGE_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#if __has_include(<nvtx3/nvToolsExt.h>)
#include <nvtx3/nvToolsExt.h>
#define MLAFORGE_HAVE_NVTX 1
#endif
#endif

namespace mlaforge {

namespace {

void sync(const at::Device& d) {
#ifdef MLAFORGE_WITH_CUDA
  if (d.is_cuda()) c10::cuda::device_synchronize();
#endif
}

// Mean seconds per call of f over `reps` calls after 2 warm-up calls.
double seconds_per_call(const at::Device& dev, int64_t reps, const std::function<void()>& f) {
  for (int i = 0; i < 2; ++i) f();
  sync(dev);
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < reps; ++i) f();
  sync(dev);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / double(reps);
}

// Seconds per call of f with `reps` calls captured in one CUDA graph and replayed: what the call costs inside
// the decoding step's graph, where no host launch gap separates its kernels. 0 where there is no CUDA.
double graph_seconds_per_call(const at::Device& dev, int64_t reps, const std::function<void()>& f) {
#ifdef MLAFORGE_WITH_CUDA
  if (!dev.is_cuda()) return 0;
  f();  // allocations and first-call setup outside the capture
  sync(dev);
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, dev.index());
  at::cuda::CUDAGraph graph;
  {
    c10::cuda::CUDAStreamGuard on_side(side);
    graph.capture_begin();
    for (int64_t i = 0; i < reps; ++i) f();
    graph.capture_end();
  }
  return seconds_per_call(dev, 3, [&] { graph.replay(); }) / double(reps);
#else
  (void)dev, (void)reps, (void)f;
  return 0;
#endif
}

// Device-to-device copy bandwidth, counting bytes read and written.
double copy_bandwidth(const at::Device& dev) {
  const int64_t n = dev.is_cuda() ? (int64_t(1) << 30) : (int64_t(1) << 28);
  at::Tensor src = at::ones({n}, at::TensorOptions().dtype(at::kByte).device(dev)), dst = at::empty_like(src);
  const double s = seconds_per_call(dev, dev.is_cuda() ? 20 : 5, [&] { dst.copy_(src); });
  return 2.0 * double(n) / s;
}

struct Measured {
  double prefill_tok_s = 0, decode_tok_s = 0;
  double decode_graph_tok_s = 0;                // decoding steps replayed from a CUDA graph (cuda only)
  double attention_s = 0, attention_bytes = 0;  // one layer's decode attention, whole batch
  double attention_graph_s = 0;                 // the same, calls replayed from a CUDA graph (cuda only)
  double sdpa_s = 0;                            // PyTorch's SDPA on the same keys and values (original only)
  int64_t kv_bytes = 0, kv_slots = 0;           // allocated cache and the token slots it holds
};

// Text positions [3, B, T] starting at `start` (M-RoPE's axes advance together for text).
at::Tensor text_positions(int64_t B, int64_t start, int64_t T, const at::Device& dev) {
  return at::arange(start, start + T, at::TensorOptions().dtype(at::kLong).device(dev)).view({1, 1, T}).expand({3, B, T}).contiguous();
}

Measured measure(const DecoderLM& m, const BenchOptions& o, const CacheOptions& cache_opts, const at::Device& dev,
                 bool is_original) {
  Measured r;
  const TextConfig& t = m.config();
  // Eager steps, then steps replayed from a CUDA graph (after the eager ones a graph waits for).
  const int64_t B = o.batch, S = o.context, cap = S + 2 * o.decode_steps + kEagerStepsBeforeCapture;
  auto long_opts = at::TensorOptions().dtype(at::kLong).device(dev);
  auto flags = at::TensorOptions().dtype(at::kBool).device(dev);
  {
    // Prefill of one sequence in chunks; a quarter of the tokens are image tokens (MLA's image pair).
    KVCache c = m.new_cache(1, S, dev, cache_opts);
    const double s = seconds_per_call(dev, 1, [&] {
      c.len = 0;
      for (int64_t at_pos = 0; at_pos < S; at_pos += o.prefill_chunk) {
        const int64_t T = std::min(o.prefill_chunk, S - at_pos);
        at::Tensor ids = at::randint(t.vocab_size, {1, T}, long_opts);
        at::Tensor img = (at::arange(at_pos, at_pos + T, long_opts) < S / 4).view({1, T});
        m.forward(m.embed(ids), text_positions(1, at_pos, T, dev), at::ones({1, T}, flags), img, c);
      }
    });
    r.prefill_tok_s = double(S) / s;
  }
  // Decoding: a cache of B sequences holding S random tokens each, then decode_steps steps.
  KVCache c = m.new_cache(B, cap, dev, cache_opts);
  r.kv_bytes = c.bytes();
  r.kv_slots = c.is_latent() ? c.pool->num_blocks() * c.pool->block_size() : B * cap;
  at::Tensor slots;  // [B*S] the pool slots of the cached positions
  if (c.is_latent()) {
    // Every row's blocks for positions [0, S) (rows own blocks only once they hold tokens).
    const int64_t free_before = c.pool->free_blocks();
    reserve_positions(c, at::ones({B, S}, flags), S);
    check(free_before - c.pool->free_blocks() == B * ((S + c.pool->block_size() - 1) / c.pool->block_size()),
          "bench", "the cache did not allocate a block per 64 positions of every row");
    slots = c.all_slots.reshape({-1});
    c.pool->write_modality(slots, at::rand({B * S}, at::TensorOptions().device(dev)) < 0.25);
    for (int64_t l = 0; l < c.pool->layers(); ++l)
      c.pool->write(l, slots, at::randn({B * S, c.pool->kv_heads(), c.pool->rope_dim()}, at::TensorOptions().device(dev)),
                    at::randn({B * S, c.pool->latent_dim()}, at::TensorOptions().device(dev)));
  } else {
    for (size_t l = 0; l < c.k.size(); ++l) {
      c.k[l].narrow(2, 0, S).normal_();
      c.v[l].narrow(2, 0, S).normal_();
    }
  }
  c.key_valid.narrow(1, 0, S).fill_(true);
  c.len = S;
  at::Tensor tok = at::randint(t.vocab_size, {B}, long_opts);
  int64_t step = 0;
  auto decode = [&] {
#ifdef MLAFORGE_HAVE_NVTX
    // One eager step in an NVTX range, for a per-kernel profile of a whole step:
    // ncu --nvtx --nvtx-include decode_step_mla/ (or decode_step_original/) mlaforge bench ...
    const bool marked = step == 3;
    if (marked) nvtxRangePushA(is_original ? "decode_step_original" : "decode_step_mla");
#endif
    tok = m.decode_step(tok, text_positions(B, S + step, 1, dev), c).argmax(-1);
#ifdef MLAFORGE_HAVE_NVTX
    if (marked) nvtxRangePop();
#endif
    ++step;
  };
  c.cuda_graph = false;
  r.decode_tok_s = double(B) / seconds_per_call(dev, o.decode_steps - 2, decode);
  if (dev.is_cuda() && o.cache.cuda_graph) {
    c.cuda_graph = true;
    // The eager steps a shape runs before its capture; seconds_per_call's 2 untimed calls then capture.
    for (int i = 0; i < kEagerStepsBeforeCapture; ++i) decode();
    r.decode_graph_tok_s = double(B) / seconds_per_call(dev, o.decode_steps - 2, decode);
  }

  // One layer's decode attention over the S cached tokens of every sequence.
  const int64_t h = t.num_heads, g = t.num_kv_heads, dh = t.head_dim;
  const auto dtype = m.embed(tok).scalar_type();
  auto fopts = at::TensorOptions().device(dev);
  if (c.is_latent()) {
    const LatentPool& pool = *c.pool;
    PagedBatch pb{c.block_table, at::zeros({B}, fopts.dtype(at::kInt)), at::full({B}, S, fopts.dtype(at::kInt))};
    at::Tensor qr = at::randn({B, h, pool.rope_dim()}, fopts), ql = at::randn({B, h, 2, pool.latent_dim()}, fopts) * 0.1;
    auto attend = [&] { mla_decode(pool, 0, qr, ql, pb, 0.1); };
    r.attention_s = seconds_per_call(dev, o.attention_reps, attend);
    r.attention_graph_s = graph_seconds_per_call(dev, o.attention_reps, attend);
    r.attention_bytes = double(B * S) * double(pool.bytes()) / double(pool.layers() * pool.num_blocks() * pool.block_size());
  } else {
    at::Tensor K = c.k[0].narrow(2, 0, S), V = c.v[0].narrow(2, 0, S);  // [B, g, S, dh]
    at::Tensor q = at::randn({B, g, h / g, dh}, fopts.dtype(dtype));
    const double scale = 1.0 / std::sqrt(double(dh));
    // Our MHA cache path: the attention of DecoderLM::attend for one query per sequence.
    auto attend = [&] {
      at::Tensor p = at::softmax(at::matmul(q, K.transpose(2, 3)) * scale, -1, at::kFloat);
      at::matmul(p.to(dtype), V);
    };
    r.attention_s = seconds_per_call(dev, o.attention_reps, attend);
    r.attention_graph_s = graph_seconds_per_call(dev, o.attention_reps, attend);
    r.attention_bytes = double(B * S * 2 * g * dh) * double(K.element_size());
    if (have_fused_attention()) {
      at::Tensor q4 = q.reshape({B, h, 1, dh});
      r.sdpa_s = seconds_per_call(dev, o.attention_reps, [&] { fused_attention(q4, K, V, at::Tensor(), false, scale); });
    }
  }
  (void)is_original;
  return r;
}

}  // namespace

int run_bench(const BenchOptions& o) {
  check(o.context > 0 && o.batch > 0 && o.decode_steps > 2 && o.prefill_chunk > 0, "bench",
        "--context, --batch, --prefill-chunk must be positive and --decode-steps at least 3");
  const at::Device dev = parse_device(o.device);
  const at::ScalarType dtype = parse_dtype(o.dtype, dev);
  ModelConfig cfg = load_model_config(o.model_dir);
  TextConfig text = cfg.text;
  if (o.layers > 0) text.num_layers = std::min(text.num_layers, o.layers);
  MlaConfig mla = cfg.mla;
  const int64_t g = text.num_kv_heads, dh = text.head_dim;
  if (!mla.enabled) {
    // An original checkpoint: an MLA model of its shapes, kept pairs 0..r-1 (which pairs does not matter for speed).
    mla.enabled = true;
    mla.rope_pairs = o.rope_pairs >= 0 ? o.rope_pairs : dh / 8;  // dr = head_dim / 4 rotary dims
    mla.latent_dim = g * (o.dkv >= 0 ? o.dkv : dh / 4);
    mla.decoupled = true;
    check(mla.rope_pairs <= dh / 2, "--rope-pairs", "at most ", dh / 2, " pairs per head");
    std::vector<int64_t> kept(size_t(mla.rope_pairs));
    for (int64_t i = 0; i < mla.rope_pairs; ++i) kept[size_t(i)] = i;
    mla.kept_pairs.assign(size_t(text.num_layers), std::vector<std::vector<int64_t>>(size_t(g), kept));
  } else {
    check(o.rope_pairs < 0 && o.dkv < 0, "--rope-pairs/--dkv", o.model_dir, " is already converted; its mla section says");
    mla.kept_pairs.resize(size_t(text.num_layers));
  }
  check(mla.latent_dim > 0, o.model_dir, "the MLA model needs a latent (dkv > 0) to bench the latent cache");
  MlaConfig none;
  CacheOptions orig_cache;
  orig_cache.latent = dtype == at::kBFloat16 ? "bf16" : "auto";

  std::printf("bench: %s, %lld layers (hidden %lld, %lld heads, %lld KV heads, head_dim %lld), random weights in %s on %s\n",
              o.model_dir.c_str(), (long long)text.num_layers, (long long)text.hidden_size, (long long)text.num_heads,
              (long long)g, (long long)dh, dtype == at::kBFloat16 ? "bf16" : "f32", o.device.c_str());
  std::printf("       MLA: %lld rotary pairs per KV head, latent %lld; cache --kv-cache %s --kv-rope %s; context %lld, batch %lld\n",
              (long long)mla.rope_pairs, (long long)mla.latent_dim, o.cache.latent.c_str(), o.cache.rope.c_str(),
              (long long)o.context, (long long)o.batch);
  const double copy_bw = copy_bandwidth(dev);
  std::printf("copy bandwidth %.1f GB/s (bytes read + written)\n", copy_bw / 1e9);
  Measured mo, mm;
  {
    DecoderLM orig = DecoderLM::random(text, none, dtype, dev, 1);
    mo = measure(orig, o, orig_cache, dev, true);
  }
  {
    DecoderLM conv = DecoderLM::random(text, mla, dtype, dev, 2);
    CacheOptions mc = o.cache;
    if (mc.latent == "auto" && dtype == at::kBFloat16) mc.latent = "bf16";
    mm = measure(conv, o, mc, dev, false);
  }
  auto row = [](const char* what, double a, double b, const char* fmt) {
    char x[32], y[32];
    std::snprintf(x, sizeof x, fmt, a);
    std::snprintf(y, sizeof y, fmt, b);
    std::printf("%-34s %16s %16s %9.2fx\n", what, x, y, b / a);
  };
  std::printf("%-34s %16s %16s %10s\n", "", "original", "MLA", "MLA/orig");
  row("KV bytes per token (all layers)", double(mo.kv_bytes) / double(mo.kv_slots), double(mm.kv_bytes) / double(mm.kv_slots), "%.1f");
  row("KV bytes allocated (MiB)", double(mo.kv_bytes) / 1048576.0, double(mm.kv_bytes) / 1048576.0, "%.1f");
  row("prefill tokens/s (1 sequence)", mo.prefill_tok_s, mm.prefill_tok_s, "%.0f");
  row("decode tokens/s (batch)", mo.decode_tok_s, mm.decode_tok_s, "%.1f");
  if (mo.decode_graph_tok_s > 0) row("decode tokens/s, CUDA graph", mo.decode_graph_tok_s, mm.decode_graph_tok_s, "%.1f");
  row("attention us per layer and step", mo.attention_s * 1e6, mm.attention_s * 1e6, "%.1f");
  row("attention GB/s", mo.attention_bytes / mo.attention_s / 1e9, mm.attention_bytes / mm.attention_s / 1e9, "%.1f");
  row("attention % of copy bandwidth", 100 * mo.attention_bytes / mo.attention_s / copy_bw,
      100 * mm.attention_bytes / mm.attention_s / copy_bw, "%.1f");
  if (mo.attention_graph_s > 0) {
    row("attention us, CUDA graph", mo.attention_graph_s * 1e6, mm.attention_graph_s * 1e6, "%.1f");
    row("attention % of copy BW, CUDA graph", 100 * mo.attention_bytes / mo.attention_graph_s / copy_bw,
        100 * mm.attention_bytes / mm.attention_graph_s / copy_bw, "%.1f");
  }
  const double mla_per_token = double(mm.kv_bytes) / double(mm.kv_slots);
  const double bf16_mha_per_token = double(2 * text.num_layers * g * dh * 2);
  std::printf("tokens held in the same KV budget: %.2fx the original's cache above, %.2fx a bf16 MHA/GQA cache "
              "(%.0f bytes per token)\n",
              (double(mo.kv_bytes) / double(mo.kv_slots)) / mla_per_token, bf16_mha_per_token / mla_per_token,
              bf16_mha_per_token);
  if (mo.sdpa_s > 0)
    std::printf("PyTorch SDPA (original's keys and values): %.1f us per layer and step (%.2fx our MHA path, %.2fx MLA kernel)\n",
                mo.sdpa_s * 1e6, mo.attention_s / mo.sdpa_s, mo.sdpa_s / mm.attention_s);
  if (!o.report.empty()) {
    auto j = [&](const Measured& m) {
      return nlohmann::json{{"prefill_tokens_per_s", m.prefill_tok_s}, {"decode_tokens_per_s", m.decode_tok_s},
                            {"decode_graph_tokens_per_s", m.decode_graph_tok_s},
                            {"attention_us", m.attention_s * 1e6}, {"attention_gb_per_s", m.attention_bytes / m.attention_s / 1e9},
                            {"attention_graph_us", m.attention_graph_s * 1e6},
                            {"kv_bytes", m.kv_bytes}, {"kv_bytes_per_token", double(m.kv_bytes) / double(m.kv_slots)},
                            {"sdpa_us", m.sdpa_s * 1e6}};
    };
    nlohmann::json rep{{"model", o.model_dir}, {"device", o.device}, {"context", o.context}, {"batch", o.batch},
                       {"layers", text.num_layers}, {"kv_cache", o.cache.latent}, {"kv_rope", o.cache.rope},
                       {"copy_gb_per_s", copy_bw / 1e9}, {"original", j(mo)}, {"mla", j(mm)}};
    std::ofstream(o.report) << rep.dump(2) << "\n";
  }
  return 0;
}

}  // namespace mlaforge
