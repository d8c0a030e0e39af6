// MLA's latent cache and absorbed attention against the expanded form (keys and values rebuilt from
// the latent): prefill and decoding steps, both modalities mixed, GQA and MHA, batched with padding.
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <filesystem>

#include "convert/convert.h"
#include "infer/generate.h"
#include "model/decode_graph.h"
#include "model/vlm.h"
#include "test_util.h"

using namespace mlaforge;
using namespace mlaforge::test;
namespace fs = std::filesystem;

namespace {

std::string convert_to(const TempDir& d, const std::string& model, int64_t r, int64_t dkv, bool decoupled) {
  return convert_quick(model, d / "mla", r, dkv, decoupled);
}

std::vector<Prompt> mixed_prompts() {
  std::vector<Prompt> p(3);
  const std::string a = source_path("data/shapes-mini/images/eval/00000.png"),
                    b = source_path("data/shapes-mini/images/eval/00001.png");
  p[0].turns = {user_turn_from_text("<image>\nWhat color is the circle?")};
  p[0].image_paths = {a};
  p[1].turns = {user_turn_from_text("What is 3 + 4?")};
  p[2].turns = {user_turn_from_text("<image>\nand<image>\nCompare the two.")};
  p[2].image_paths = {a, b};
  return p;
}

// Prefill and 6 decoding steps with the paged latent cache (blocks of 16 tokens) and with the
// expanded cache; the logits agree. After 3 steps both caches drop row 1 (as generation does when a
// row stops), which hands its blocks back to the pool. With `window` (--kv-window), the last positions
// are also kept unquantized and decoding attends them there.
void check_absorbed(const std::string& dir, const char* what, const std::string& format, double tolerance,
                    int64_t window = 0) {
  auto m = Vlm::load(dir);
  ASSERT_GT(m->config().mla.latent_dim, 0);
  Batch b = m->prepare(mixed_prompts());
  const int64_t B = b.batch(), T = b.length(), steps = 6, block = 16;
  CacheOptions latent, expanded;
  latent.latent = format;
  latent.block_size = block;
  latent.window = window;
  expanded.expanded = true;
  KVCache lat = m->decoder().new_cache(B, T + steps, at::kCPU, latent);
  KVCache exp = m->decoder().new_cache(B, T + steps, at::kCPU, expanded);
  ASSERT_TRUE(lat.is_latent());
  ASSERT_FALSE(exp.is_latent());
  // The latent cache holds g*2r + R values per token and layer (+ the modality byte), not 2*g*dh.
  const auto& c = m->config();
  const int64_t per_token = c.text.num_layers * (c.text.num_kv_heads * 2 * c.mla.rope_pairs + c.mla.latent_dim);
  // The pool has room for each row's capacity, one block more per row (for joining rows) and a scratch block.
  const int64_t elem = format == "bf16" ? 2 : 4, slots = (B * ((T + steps + block - 1) / block + 1) + 1) * block;
  // The window: per row and slot the same values in the compute dtype (float32 here) and a modality byte.
  EXPECT_EQ(lat.bytes(), slots * (per_token * elem + 1) + B * window * (per_token * 4 + 1));
  std::printf("%s, %s cache: %lld bytes for %lld slots vs %lld bytes expanded\n", what, format.c_str(),
              (long long)lat.bytes(), (long long)slots, (long long)exp.bytes());

  at::Tensor hl = m->prefill(b, lat), he = m->prefill(b, exp);
  at::Tensor valid = b.valid.reshape({-1}).nonzero().squeeze(1);
  auto rows = [&](const at::Tensor& h) { return m->decoder().logits(h).reshape({B * T, -1}).index_select(0, valid); };
  double worst = rel_err(rows(hl), rows(he));
  EXPECT_LE(worst, tolerance) << what << " prefill";
  at::Tensor le = m->decoder().logits(he.select(1, T - 1));
  at::Tensor pos = at::tensor(b.next_position, at::kLong);
  for (int64_t s = 0; s < steps; ++s) {
    if (s == 3) {
      at::Tensor keep = at::tensor(std::vector<int64_t>{0, 2}, at::kLong);
      const int64_t free_before = lat.pool->free_blocks();
      int64_t owned = 0;  // row 1's blocks: from its first real token to the current end
      for (int32_t blk : lat.blocks[1]) owned += blk >= 0;
      EXPECT_EQ(owned, (lat.len - 1) / block - lat.row_begin[1] / block + 1);
      select_cache_rows(lat, keep);
      select_cache_rows(exp, keep);
      EXPECT_EQ(lat.pool->free_blocks(), free_before + owned);
      le = le.index_select(0, keep);
      pos = pos.index_select(0, keep);
    }
    at::Tensor tok = le.argmax(-1);
    at::Tensor ll = m->decode_step(tok, pos + s, lat);
    le = m->decode_step(tok, pos + s, exp);
    const double e = rel_err(ll, le);
    worst = std::max(worst, e);
    EXPECT_LE(e, tolerance) << what << " decoding step " << s;
  }
  std::printf("%s, %s cache, window %lld: absorbed vs expanded logits, worst relative error %.2e\n", what,
              format.c_str(), (long long)window, worst);
}

void check_absorbed(const std::string& dir, const char* what) {
  check_absorbed(dir, what, "auto", 1e-5);
  check_absorbed(dir, what, "bf16", 1e-2);
}

TEST(LatentCache, AbsorbedEqualsExpandedGqaDecoupled) {
  TempDir d("absorbed");
  check_absorbed(convert_to(d, source_path("models/qwen2vl-shapes"), 8, 16, true), "qwen2vl-shapes r8 dkv16 decoupled");
}

TEST(LatentCache, AbsorbedEqualsExpandedShared) {
  TempDir d("absorbed");
  check_absorbed(convert_to(d, source_path("models/qwen2vl-shapes"), 4, 8, false), "qwen2vl-shapes r4 dkv8 shared");
}

// --kv-window in float32, where the window's copies equal the pool's values: with a window shorter than
// the sequence (pool and window both attended, merged by their log-sum-exp) and with one covering every
// position (the kernel's range empty), decoding is unchanged.
TEST(LatentCache, WindowOfUnquantizedPositions) {
  TempDir d("window");
  const std::string dir = convert_to(d, source_path("models/qwen2vl-shapes"), 8, 16, true);
  check_absorbed(dir, "qwen2vl-shapes r8 dkv16 decoupled", "auto", 1e-5, 5);
  check_absorbed(dir, "qwen2vl-shapes r8 dkv16 decoupled", "auto", 1e-5, 4096);
}

// The absorbed decode keeps its concatenated up-projections between steps; fine-tuning updates kv_up in
// place, and decoding afterwards must use the new weights: one model decodes, its up-projections are scaled
// in place, then a fresh prefill and decoding step through the latent cache still match the expanded cache
// (which reads kv_up directly).
TEST(LatentCache, AbsorbedFollowsInPlaceWeightUpdates) {
  TempDir d("absorbed-update");
  auto m = Vlm::load(convert_to(d, source_path("models/qwen2vl-shapes"), 8, 16, true));
  Batch b = m->prepare(mixed_prompts());
  const int64_t B = b.batch(), T = b.length();
  CacheOptions latent, expanded;
  latent.block_size = 16;
  expanded.expanded = true;
  auto decode_both = [&] {
    KVCache lat = m->decoder().new_cache(B, T + 1, at::kCPU, latent);
    KVCache exp = m->decoder().new_cache(B, T + 1, at::kCPU, expanded);
    at::Tensor tok = m->decoder().logits(m->prefill(b, exp).select(1, T - 1)).argmax(-1);
    m->prefill(b, lat);
    at::Tensor pos = at::tensor(b.next_position, at::kLong);
    return rel_err(m->decode_step(tok, pos, lat), m->decode_step(tok, pos, exp));
  };
  EXPECT_LE(decode_both(), 1e-5);
  int scaled = 0;
  {
    c10::AutoGradMode no_grad(false);  // at::NoGradGuard needs autograd headers on newer libtorch
    for (auto& [name, t] : m->mutable_decoder().named_weights())
      if (name.find("kv_up_proj") != std::string::npos) {
        t->mul_(1.5);
        ++scaled;
      }
  }
  ASSERT_GT(scaled, 0);
  const double err = decode_both();
  std::printf("after scaling %d up-projections in place: absorbed vs expanded logits %.2e\n", scaled, err);
  EXPECT_LE(err, 1e-5);
}

TEST(LatentCache, AbsorbedEqualsExpandedMha) {
  if (!fs::exists(fixture("llava/llava-mha"))) GTEST_SKIP();
  TempDir d("absorbed");
  check_absorbed(convert_to(d, fixture("llava/llava-mha"), 2, 4, true), "llava-mha r2 dkv4 decoupled");
}

}  // namespace

namespace {

// Prefill of the mixed prompts and 22 decoding steps on CUDA, through decode_step with and without its
// CUDA graph (two caches of the same options); a row leaves after step 11 (a new graph for the new
// shape; each shape's graph is captured after kEagerStepsBeforeCapture eager steps). Returns the
// largest relative error of the graph's logits against the eager ones.
double graph_vs_eager(const Vlm& m, CacheOptions opts) {
  Batch b = m.prepare(mixed_prompts());
  const int64_t B = b.batch(), T = b.length(), steps = 2 * (kEagerStepsBeforeCapture + 3);
  KVCache caches[2];
  at::Tensor logits[2];
  for (int graph = 0; graph < 2; ++graph) {
    opts.cuda_graph = graph == 1;
    caches[graph] = m.decoder().new_cache(B, T + steps, m.device(), opts);
    EXPECT_EQ(caches[graph].cuda_graph, graph == 1);
    logits[graph] = m.decoder().logits(m.prefill(b, caches[graph]).select(1, T - 1));
  }
  at::Tensor pos = at::tensor(b.next_position, at::kLong).to(m.device());
  double worst = 0;
  for (int64_t s = 0; s < steps; ++s) {
    if (s == kEagerStepsBeforeCapture + 3) {
      at::Tensor keep = at::tensor(std::vector<int64_t>{0, 2}, at::kLong).to(m.device());
      for (int graph = 0; graph < 2; ++graph) {
        select_cache_rows(caches[graph], keep);
        EXPECT_EQ(caches[graph].graph, nullptr);
        logits[graph] = logits[graph].index_select(0, keep);
      }
      pos = pos.index_select(0, keep);
    }
    at::Tensor tok = logits[0].argmax(-1);  // both fed the eager run's tokens
    for (int graph = 0; graph < 2; ++graph) logits[graph] = m.decode_step(tok, pos + s, caches[graph]);
    worst = std::max(worst, rel_err(logits[1].to(at::kFloat).cpu(), logits[0].to(at::kFloat).cpu()));
    EXPECT_EQ(caches[1].len, caches[0].len);
  }
  EXPECT_NE(caches[1].graph, nullptr);  // captured for the 2-row shape
  return worst;
}

}  // namespace

// Decoding steps replayed from a CUDA graph equal the eagerly launched ones: MLA's latent cache in
// float32, bf16 and int8 with a window; the original's K/V cache (which the graph attends over its
// whole capacity, masked).
TEST(DecodeGraph, MatchesEagerSteps) {
  if (!at::hasCUDA()) GTEST_SKIP() << "needs CUDA";
  TempDir d("graph");
  LoadOptions lo;
  lo.device = at::kCUDA;
  auto mla = Vlm::load(convert_to(d, source_path("models/qwen2vl-shapes"), 8, 16, true), lo);
  auto orig = Vlm::load(source_path("models/qwen2vl-shapes"), lo);
  CacheOptions f32, bf16, int8w;
  bf16.latent = "bf16";
  int8w.latent = "int8";
  int8w.window = 4;
  for (auto [m, opts, what] : {std::tuple<const Vlm*, CacheOptions, const char*>{mla.get(), f32, "MLA f32"},
                               {mla.get(), bf16, "MLA bf16"},
                               {mla.get(), int8w, "MLA int8 window 4"},
                               {orig.get(), f32, "original f32"}}) {
    const double err = graph_vs_eager(*m, opts);
    std::printf("%s: CUDA graph vs eager decoding logits, worst relative error %.2e\n", what, err);
    EXPECT_LE(err, 1e-5) << what;
  }
}
