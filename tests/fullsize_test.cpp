// Full-size checkpoints against transformers (issue 6), on the GPU machine. Skipped unless
// MLAFORGE_FULLSIZE names a folder made by tools/make_fullsize.py --reference: for each
// <model>.reference.safetensors there, <model>/ is loaded on cuda in bf16, fed the reference's own
// input ids and pixel values, and compared with transformers' first-step logits and its 32 greedy
// tokens (most agree, teacher-forced). The same weights in float32 on both sides must agree to 1e-4:
// the exactness check. In bf16 the bound is 2e-2, although rounding alone moves transformers' own
// bf16 logits ~4e-2 from its float32 ones on these random networks: only the same operations in the
// same order (the same SDPA kernel, rotary tables rounded to bf16, the vision tower on the GPU in bf16)
// meet it. Where differences start is printed (input embeddings, the last token after each layer).
// Load time, prefill and decode tokens/s are printed beside transformers' (from <model>.timing.json)
// for the notes; they are not asserted.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "model/vlm.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace mlaforge {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

TEST(FullSize, MatchesTransformers) {
  const char* dir = std::getenv("MLAFORGE_FULLSIZE");
  if (!dir) GTEST_SKIP() << "set MLAFORGE_FULLSIZE to a folder from tools/make_fullsize.py --reference";
  if (!at::hasCUDA()) GTEST_SKIP() << "needs CUDA";
  int compared = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string file = e.path().filename().string(), suffix = ".reference.safetensors";
    if (file.size() <= suffix.size() || file.compare(file.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
    const std::string name = file.substr(0, file.size() - suffix.size());
    SCOPED_TRACE(name);
    auto t0 = std::chrono::steady_clock::now();
    LoadOptions lo;
    lo.device = at::kCUDA;
    lo.dtype = at::kBFloat16;
    auto m = Vlm::load(std::string(dir) + "/" + name, lo);
    const double load_s = seconds_since(t0);

    auto ref = SafetensorsFile::open(e.path().string());
    at::Tensor ids_t = ref->load("input_ids", at::kLong)[0];
    std::vector<int64_t> ids(ids_t.data_ptr<int64_t>(), ids_t.data_ptr<int64_t>() + ids_t.numel());
    const int64_t T = int64_t(ids.size());
    at::Tensor pixels = ref->load("pixel_values", at::kFloat);
    std::vector<std::array<int64_t, 3>> grids;
    if (ref->entries().count("image_sizes")) {  // LLaVA-NeXT: [n, max_tiles, C, S, S] and (h, w) per image
      grids = test::grids_from_sizes(ref->load("image_sizes", at::kLong), m->config());
    } else if (ref->entries().count("image_grid_thw")) {
      at::Tensor g = ref->load("image_grid_thw", at::kLong);
      for (int64_t i = 0; i < g.size(0); ++i)
        grids.push_back({g[i][0].item<int64_t>(), g[i][1].item<int64_t>(), g[i][2].item<int64_t>()});
    } else {
      const int64_t cells = pixels.size(-1) / m->config().clip.patch_size;
      for (int64_t i = 0; i < pixels.size(0); ++i) grids.push_back({1, cells, cells});
    }
    Batch b = m->make_batch({ids}, pixels, grids);
    at::Tensor ref_logits = ref->load("logits", at::kFloat), ref_gen = ref->load("generated", at::kLong);
    const int64_t steps = ref_gen.numel();

    // First step, then decoding fed transformers' tokens (teacher-forced: does our argmax agree at
    // each step?) and free-running greedy (how long does our sequence stay identical?).
    auto run = [&](bool teacher_forced, std::vector<int64_t>* out, at::Tensor* first_logits) {
      KVCache cache = m->decoder().new_cache(1, T + steps + 1, m->device());
      at::Tensor h = m->prefill(b, cache);
      at::Tensor logits = m->decoder().logits(h.select(1, T - 1)).to(at::kFloat);  // [1, V]
      if (first_logits) *first_logits = logits[0].cpu();
      int64_t pos = b.next_position[0];
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t mine = logits.argmax(-1).item<int64_t>();
        out->push_back(mine);
        if (s + 1 == steps) break;
        const int64_t feed = teacher_forced ? ref_gen[s].item<int64_t>() : mine;
        at::Tensor tok = at::full({1}, feed, at::TensorOptions().dtype(at::kLong).device(m->device()));
        logits = m->decode_step(tok, at::full({1}, pos++, tok.options()), cache).to(at::kFloat);
      }
    };
    if (ref->entries().count("hidden_last")) {  // where bf16 differences start, for the notes
      at::Tensor emb = ref->load("embeddings", at::kFloat), last = ref->load("hidden_last", at::kFloat);
      std::vector<at::Tensor> hidden;
      ForwardTaps taps;
      taps.hidden = &hidden;
      KVCache cache = m->decoder().new_cache(1, T, m->device());
      m->prefill(b, cache, taps);
      std::string errs = "embeddings " + std::to_string(test::rel_err(hidden[0][0].to(at::kFloat).cpu(), emb));
      for (size_t i = 1; i < hidden.size(); i = (i + 1 == hidden.size() ? i + 1 : std::min(hidden.size() - 1, i < 4 ? i + 1 : i + 4)))
        errs += ", " + std::to_string(i) + ": " + std::to_string(test::rel_err(hidden[i][0][T - 1].to(at::kFloat).cpu(), last[int64_t(i)]));
      std::printf("[fullsize] %s: bf16 rel err of the input embeddings, then of the last token after layer i: %s\n",
                  name.c_str(), errs.c_str());
    }
    std::vector<int64_t> forced, free_run;
    at::Tensor first;
    run(true, &forced, &first);
    run(false, &free_run, nullptr);
    const double err = test::rel_err(first, ref_logits);
    int64_t agree = 0, prefix = 0;
    for (int64_t s = 0; s < steps; ++s) agree += forced[size_t(s)] == ref_gen[s].item<int64_t>();
    while (prefix < steps && free_run[size_t(prefix)] == ref_gen[prefix].item<int64_t>()) ++prefix;

    // Speed, for the notes: prefill of the prompt, then `steps` decoding steps (batch 1).
    t0 = std::chrono::steady_clock::now();
    KVCache cache = m->decoder().new_cache(1, T + steps + 1, m->device());
    at::Tensor h = m->prefill(b, cache);
    at::Tensor logits = m->decoder().logits(h.select(1, T - 1));
    logits.cpu();
    const double prefill_s = seconds_since(t0);
    int64_t pos = b.next_position[0];
    t0 = std::chrono::steady_clock::now();
    for (int64_t s = 0; s < steps; ++s)
      logits = m->decode_step(logits.argmax(-1), at::full({1}, pos++, at::TensorOptions().dtype(at::kLong).device(m->device())), cache);
    logits.cpu();
    const double decode_s = seconds_since(t0);
    nlohmann::json hf;
    std::ifstream tf(std::string(dir) + "/" + name + ".timing.json");
    if (tf) tf >> hf;
    std::printf("[fullsize] %s: %lld prompt tokens; first-step logits rel err %.3e; greedy %lld/%lld steps agree "
                "(teacher-forced), identical for the first %lld free-running\n",
                name.c_str(), (long long)T, err, (long long)agree, (long long)steps, (long long)prefix);
    std::printf("[fullsize] %s: mlaforge load %.1f s, prefill %.0f tok/s, decode %.1f tok/s | transformers load %.1f s, "
                "prefill %.0f tok/s, decode %.1f tok/s\n",
                name.c_str(), load_s, double(T) / prefill_s, double(steps) / decode_s, hf.value("load_s", 0.0),
                hf.value("prefill_tok_s", 0.0), hf.value("decode_tok_s", 0.0));
    EXPECT_LE(err, 2e-2);
    const bool have32 = ref->entries().count("logits_f32") > 0;
    at::Tensor ref32 = have32 ? ref->load("logits_f32", at::kFloat) : at::Tensor();
    const double hf_noise = have32 ? test::rel_err(ref_logits, ref32) : 0.0;
    EXPECT_GT(2 * agree, steps);

    if (have32) {
      m.reset();
      lo.dtype = at::kFloat;
      auto m32 = Vlm::load(std::string(dir) + "/" + name, lo);
      Batch b32 = m32->make_batch({ids}, pixels, grids);
      KVCache c32 = m32->decoder().new_cache(1, T, m32->device());
      at::Tensor l32 = m32->decoder().logits(m32->prefill(b32, c32).select(1, T - 1))[0].cpu();
      const double err32 = test::rel_err(l32, ref32);
      std::printf("[fullsize] %s: float32 logits rel err %.3e (transformers bf16 vs its float32: %.3e; mlaforge bf16 "
                  "vs transformers float32: %.3e)\n",
                  name.c_str(), err32, hf_noise, test::rel_err(first, ref32));
      EXPECT_LE(err32, 1e-4);
    }
    ++compared;
  }
  EXPECT_GT(compared, 0) << "no *.reference.safetensors in " << dir;
}

}  // namespace
}  // namespace mlaforge
