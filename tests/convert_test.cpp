// mlaforge convert: the exact identity at full rank with every pair kept, calibration statistics
// against a direct computation, rope-pair selection, option errors.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "convert/calibrate.h"
#include "convert/convert.h"
#include "convert/rope_select.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "model/ops.h"
#include "model/rope.h"
#include "model/vlm.h"
#include "test_util.h"

using namespace mlaforge;
using namespace mlaforge::test;
namespace fs = std::filesystem;

namespace {

const std::string kCalib = "data/shapes-mini/calib.jsonl";

ConvertOptions options(const std::string& model, const std::string& out) {
  ConvertOptions o;
  o.model_dir = model;
  o.out_dir = out;
  o.calib_path = source_path(kCalib);
  o.calib_samples = 8;
  return o;
}

std::string convert_error(const ConvertOptions& o) {
  return error_of([&] { convert_model(o); });
}

// Logits of a few prompts (image, two images, text) for a model.
at::Tensor logits_of(const Vlm& m) {
  std::vector<Prompt> prompts(3);
  const std::string img = source_path("data/shapes-mini/images/eval/00000.png");
  const std::string img2 = source_path("data/shapes-mini/images/eval/00001.png");
  prompts[0].turns = {user_turn_from_text("<image>\nWhat color is the circle?")};
  prompts[0].image_paths = {img};
  prompts[1].turns = {user_turn_from_text("<image>\nand<image>\nCompare.")};
  prompts[1].image_paths = {img, img2};
  prompts[2].turns = {user_turn_from_text("What is 3 + 4?")};
  Batch b = m.prepare(prompts);
  KVCache cache = m.decoder().new_cache(b.batch(), b.length(), at::kCPU);
  at::Tensor logits = m.decoder().logits(m.prefill(b, cache));
  return logits.reshape({-1, logits.size(-1)}).index_select(0, b.valid.reshape({-1}).nonzero().squeeze(1));
}

class Identity : public ::testing::TestWithParam<std::string> {};

// Every pair kept and a latent of full rank reproduce the original logits, for every option combination
// (the factorisation is exact at full rank); so does --dkv full (no latent).
TEST_P(Identity, FullRankAllPairsReproducesOriginal) {
  const std::string model = GetParam() == "shapes" ? source_path("models/qwen2vl-shapes") : fixture(GetParam());
  if (!fs::exists(model)) GTEST_SKIP();
  auto original = Vlm::load(model);
  at::Tensor want = logits_of(*original);
  const TextConfig& t = original->config().text;
  const int64_t full_dkv = full_rank(t.num_kv_heads * t.head_dim, 0, t.hidden_size, KvLatent::Joint) / t.num_kv_heads;
  TempDir d("identity");
  {
    ConvertOptions o = options(model, d / "direct");
    convert_model(o);
    const double err = rel_err(logits_of(*Vlm::load(o.out_dir)), want);
    std::printf("%s identity (--dkv full, no latent): logits relative error %.2e\n", GetParam().c_str(), err);
    EXPECT_LE(err, 1e-4);
  }
  struct Variant {
    LowRankMethod method;
    KvLatent kv;
    bool decoupled;
  };
  for (Variant v : {Variant{LowRankMethod::Whitened, KvLatent::Joint, true}, Variant{LowRankMethod::Svd, KvLatent::Split, false},
                    Variant{LowRankMethod::Whitened, KvLatent::Split, false}}) {
    ConvertOptions o = options(model, d / "out");
    o.dkv = full_dkv;
    o.method = v.method;
    o.kv = v.kv;
    o.decoupled = v.decoupled;
    o.stats_path = d / "stats.safetensors";  // calibrate once, reuse
    fs::remove_all(o.out_dir);
    convert_model(o);
    auto m = Vlm::load(o.out_dir);
    ASSERT_TRUE(m->config().mla.enabled);
    const double err = rel_err(logits_of(*m), want);
    std::printf("%s identity (latent %lld = full rank, %s, %s, %s): logits relative error %.2e\n", GetParam().c_str(),
                (long long)(full_dkv * t.num_kv_heads),
                v.method == LowRankMethod::Whitened ? "whitened" : "svd", v.kv == KvLatent::Joint ? "joint" : "split",
                v.decoupled ? "decoupled" : "shared", err);
    EXPECT_LE(err, 1e-4);
  }
}

INSTANTIATE_TEST_SUITE_P(Models, Identity,
                         ::testing::Values("shapes", "qwen2vl/tiny-a", "qwen2vl/tiny-b", "llava/llava-mha",
                                           "llava/llava-gqa", "llava_next/llava-next-llama3",
                                           "llava_next/llava-next-mistral"),
                         [](const auto& info) {
                           std::string n = info.param.substr(info.param.find('/') + 1);
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

TEST(Convert, CompressesAndReports) {
  TempDir d("convert");
  ConvertOptions o = options(source_path("models/qwen2vl-shapes"), d / "out");
  o.rope_pairs = 8;
  o.dkv = 16;
  ConvertReport r = convert_model(o);
  EXPECT_EQ(r.latent_dim, 32);
  EXPECT_EQ(r.kv_bytes_before, 3072);
  EXPECT_EQ(r.kv_bytes_after, 6 * (2 * 16 + 32) * 2);  // -75%
  auto m = Vlm::load(o.out_dir);
  EXPECT_EQ(m->config().kv_bytes_per_token(2), r.kv_bytes_after);
  for (const auto& l : r.layers) {
    EXPECT_GT(l.rel_error_image, 0);
    EXPECT_LT(l.rel_error_image, 0.5);
    EXPECT_LT(l.rel_error_text, 0.5);
    for (const auto& head : l.kept) EXPECT_EQ(head.size(), 8u);
  }
  EXPECT_TRUE(fs::exists(o.out_dir + "/conversion_report.json"));
  EXPECT_TRUE(fs::exists(o.out_dir + "/tokenizer.json"));
  at::Tensor logits = logits_of(*m);
  EXPECT_TRUE(logits.isfinite().all().item<bool>());
  // Whitening minimises output error: at the same rank it beats plain SVD on every layer.
  ConvertOptions s = o;
  s.out_dir = d / "svd";
  s.method = LowRankMethod::Svd;
  ConvertReport rs = convert_model(s);
  for (size_t l = 0; l < r.layers.size(); ++l) {
    EXPECT_LT(r.layers[l].rel_error_image, rs.layers[l].rel_error_image) << "layer " << l;
    EXPECT_LT(r.layers[l].rel_error_text, rs.layers[l].rel_error_text) << "layer " << l;
  }
}

TEST(Convert, BadOptions) {
  TempDir d("bad");
  const std::string shapes = source_path("models/qwen2vl-shapes");
  ConvertOptions o = options(shapes, d / "out");
  o.rope_pairs = 33;
  EXPECT_NE(convert_error(o).find("--rope-pairs: 33 is above the 32 rotary pairs"), std::string::npos) << convert_error(o);
  o = options(shapes, d / "out");
  o.rope_pairs = 8;
  o.dkv = 200;  // latent 400 > min(rows = 2 * 48 + 2 * 64, d = 384)
  EXPECT_NE(convert_error(o).find("above the full rank 224"), std::string::npos) << convert_error(o);
  o = options(shapes, d / "out");
  std::ofstream(d / "text.jsonl") << "{\"conversations\": [{\"from\": \"human\", \"value\": \"hi\"}, {\"from\": \"gpt\", \"value\": \"yo\"}]}\n";
  o.calib_path = d / "text.jsonl";
  EXPECT_NE(convert_error(o).find("calibration data has no images"), std::string::npos) << convert_error(o);
  o = options(shapes, d / "out");
  o.rope_pairs = 8;
  o.dkv = 16;
  convert_model(o);
  ConvertOptions again = options(d / "out", d / "out2");
  EXPECT_NE(convert_error(again).find("already converted"), std::string::npos) << convert_error(again);
  o = options(shapes, d / "out3");
  o.dtype = "f16";
  EXPECT_NE(convert_error(o).find("--dtype: choose auto, f32 or bf16"), std::string::npos) << convert_error(o);
  o.dtype = "auto";
  o.device = "tpu";
  EXPECT_NE(convert_error(o).find("--device: choose cpu or cuda"), std::string::npos) << convert_error(o);
  if (!at::hasCUDA()) {
    o.device = "cuda";
    EXPECT_NE(convert_error(o).find("this build has no CUDA"), std::string::npos) << convert_error(o);
  }
}

// The GPU's streaming path in bf16 (here on the CPU): layers calibrated and factorised in bf16
// compute, new tensors written in bf16, the result close to the float32 conversion's.
TEST(Convert, Bf16StreamingMatchesFloat32) {
  TempDir d("bf16");
  const std::string shapes = source_path("models/qwen2vl-shapes");
  ConvertOptions o = options(shapes, d / "f32");
  o.rope_pairs = 8;
  o.dkv = 16;
  ConvertReport r32 = convert_model(o);
  o.out_dir = d / "bf16";
  o.dtype = "bf16";
  ConvertReport r16 = convert_model(o);
  auto st = WeightStore::open_dir(d / "bf16");
  EXPECT_EQ(st.entry("model.layers.0.self_attn.kv_down_proj.image.weight").dtype, "BF16");
  EXPECT_EQ(st.entry("model.layers.0.self_attn.q_proj.weight").dtype, "BF16");
  // The same pairs, and factors whose output error is within bf16 rounding of the float32 ones.
  for (size_t l = 0; l < r32.layers.size(); ++l) {
    EXPECT_EQ(r16.layers[l].kept, r32.layers[l].kept) << "layer " << l;
    EXPECT_NEAR(r16.layers[l].rel_error_text, r32.layers[l].rel_error_text, 0.01) << "layer " << l;
    EXPECT_NEAR(r16.layers[l].rel_error_image, r32.layers[l].rel_error_image, 0.01) << "layer " << l;
  }
  EXPECT_GT(r16.peak_host_bytes, 0);
}

// The batched 4-vector computation of the per-pair logit change equals the direct one.
TEST(Calibration, RopeErrorMatchesDirectComputation) {
  at::manual_seed(3);
  const int64_t B = 2, h = 4, g = 2, T = 7, dh = 8, P = dh / 2, group = h / g;
  TextConfig t;
  t.hidden_size = 6;
  t.num_heads = h;
  t.num_kv_heads = g;
  t.head_dim = dh;
  AttentionTrace tr;
  tr.input = at::randn({B, T, 6});
  tr.q = at::randn({B, h, T, dh});
  tr.k = at::randn({B, g, T, dh});
  at::Tensor pos = at::arange(T, at::kLong).view({1, 1, T}).expand({3, B, T}).clone();
  pos[1] += 3;  // M-RoPE-like distinct axes
  auto [cos, sin] = rope_cos_sin(pos, rope_inv_freq(dh, 100.0), {1, 1, 2});
  tr.cos = cos;
  tr.sin = sin;
  tr.probs = at::softmax(at::randn({B, g, group, T, T}), -1);
  at::Tensor valid = at::ones({B, T}, at::kBool), img = at::rand({B, T}) > 0.5;
  valid[0][0] = false;
  LayerStats s = empty_layer_stats(t);
  accumulate_trace(s, tr, valid, img);
  at::Tensor qr = apply_rotary(tr.q, cos.unsqueeze(1), sin.unsqueeze(1)), kr = apply_rotary(tr.k, cos.unsqueeze(1), sin.unsqueeze(1));
  for (int m = 0; m < 2; ++m)
    for (int64_t i = 0; i < h; ++i)
      for (int64_t k = 0; k < P; ++k) {
        double want = 0;
        for (int64_t b = 0; b < B; ++b)
          for (int64_t tq = 0; tq < T; ++tq)
            for (int64_t u = 0; u < T; ++u) {
              if (!valid[b][tq].item<bool>() || !valid[b][u].item<bool>() || img[b][u].item<bool>() != (m == 1)) continue;
              auto dot = [&](const at::Tensor& a, const at::Tensor& c) {
                return (a[k] * c[k] + a[k + P] * c[k + P]).item<double>();
              };
              const int64_t j = i / group;
              double ds = (dot(tr.q[b][i][tq], tr.k[b][j][u]) - dot(qr[b][i][tq], kr[b][j][u])) / std::sqrt(double(dh));
              want += tr.probs[b][j][i % group][tq][u].item<double>() * ds * ds;
            }
        EXPECT_NEAR(s.rope_err[m][i][k].item<double>(), want, 1e-4 * std::max(1.0, want)) << m << " " << i << " " << k;
      }
  EXPECT_EQ(s.tokens[0] + s.tokens[1], B * T - 1);
  // Gram of the image tokens.
  at::Tensor X = tr.input.reshape({B * T, 6}).index_select(0, (valid & img).reshape({-1}).nonzero().squeeze(1)).to(at::kDouble);
  EXPECT_TRUE(at::allclose(s.gram[1], at::matmul(X.t(), X)));
}

TEST(RopeSelect, Strategies) {
  TextConfig t;
  t.head_dim = 16;  // 8 pairs
  t.num_layers = 2;
  t.num_heads = 4;
  t.num_kv_heads = 2;
  t.hidden_size = 4;
  auto high = select_rope_pairs(RopeStrategy::High, 3, t, nullptr);
  EXPECT_EQ(high[1][1], (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(select_rope_pairs(RopeStrategy::Low, 3, t, nullptr)[0][0], (std::vector<int64_t>{5, 6, 7}));
  EXPECT_EQ(select_rope_pairs(RopeStrategy::Uniform, 4, t, nullptr)[0][0], (std::vector<int64_t>{0, 2, 4, 6}));
  // Adaptive: each modality normalised per KV head, so a modality with tiny errors still counts.
  CalibrationStats st;
  for (int l = 0; l < 2; ++l) {
    LayerStats s = empty_layer_stats(t);
    s.rope_err[kText][0][5] = 100;   // text keys: pair 5 matters (KV head 0 via query head 0)
    s.rope_err[kImage][1][2] = 1e-6;  // image keys: pair 2 matters, at a tiny scale
    s.rope_err[kImage][1][3] = 5e-7;
    s.q_norm[kText][0][7] = 1;
    s.k_norm[kText][0][7] = 1;
    s.tokens[kText] = 1;
    st.layers.push_back(s);
  }
  auto adaptive = select_rope_pairs(RopeStrategy::Adaptive, 2, t, &st);
  EXPECT_EQ(adaptive[0][0], (std::vector<int64_t>{2, 5}));
  EXPECT_EQ(select_rope_pairs(RopeStrategy::TwoNorm, 1, t, &st)[0][0], (std::vector<int64_t>{7}));
  EXPECT_THROW(select_rope_pairs(RopeStrategy::High, 9, t, nullptr), mlaforge::Error);
  EXPECT_THROW(parse_rope_strategy("random"), mlaforge::Error);
}

TEST(Calibration, StatsRoundTrip) {
  TempDir d("stats");
  auto m = Vlm::load(fixture("qwen2vl/tiny-a"));
  auto rows = load_conversations(source_path(kCalib), 4);
  CalibrationStats s = calibrate(*m, rows, 2);
  EXPECT_EQ(s.samples, 4);
  EXPECT_GT(s.layers[0].tokens[kImage], 0);
  EXPECT_GT(s.layers[0].tokens[kText], 0);
  save_stats(d / "s.safetensors", s);
  CalibrationStats l = load_stats(d / "s.safetensors", m->config().text);
  for (size_t i = 0; i < s.layers.size(); ++i)
    for (int mo = 0; mo < 2; ++mo) {
      EXPECT_TRUE(l.layers[i].gram[mo].equal(s.layers[i].gram[mo]));
      EXPECT_TRUE(l.layers[i].rope_err[mo].equal(s.layers[i].rope_err[mo]));
      EXPECT_EQ(l.layers[i].tokens[mo], s.layers[i].tokens[mo]);
    }
  // Statistics of another model shape are refused.
  auto shapes = load_model_config(source_path("models/qwen2vl-shapes"));
  EXPECT_THROW(load_stats(d / "s.safetensors", shapes.text), mlaforge::Error);
}

}  // namespace

namespace {

TEST(Convert, Stage1ThenStage2) {
  TempDir d("stages");
  ConvertOptions s1 = options(source_path("models/qwen2vl-shapes"), d / "stage1");
  s1.rope_pairs = 8;  // --dkv full: partial RoPE only, no latent
  ConvertReport r1 = convert_model(s1);
  EXPECT_EQ(r1.latent_dim, 0);
  EXPECT_EQ(r1.kv_bytes_after, 3072);  // no latent: rotary keys + nope keys + values = the original size
  auto m1 = Vlm::load(s1.out_dir);
  EXPECT_EQ(m1->config().mla.latent_dim, 0);
  EXPECT_EQ(m1->config().kv_bytes_per_token(2), 3072);

  ConvertOptions s2 = options(s1.out_dir, d / "stage2");
  s2.dkv = 16;
  ConvertReport r2 = convert_model(s2);
  EXPECT_EQ(r2.latent_dim, 32);
  EXPECT_EQ(r2.kv_bytes_after, 768);
  auto m2 = Vlm::load(s2.out_dir);
  EXPECT_EQ(m2->config().mla.kept_pairs, m1->config().mla.kept_pairs);
  EXPECT_EQ(m2->config().mla.rope_strategy, m1->config().mla.rope_strategy);
  EXPECT_TRUE(logits_of(*m2).isfinite().all().item<bool>());

  ConvertOptions bad = options(s1.out_dir, d / "bad");
  EXPECT_NE(convert_error(bad).find("needs a latent width"), std::string::npos) << convert_error(bad);
  bad.dkv = 16;
  bad.rope_pairs = 4;
  EXPECT_NE(convert_error(bad).find("keeps its 8 rotary pairs"), std::string::npos) << convert_error(bad);
  ConvertOptions again = options(s2.out_dir, d / "again");
  again.dkv = 8;
  EXPECT_NE(convert_error(again).find("already converted"), std::string::npos) << convert_error(again);
}

}  // namespace
