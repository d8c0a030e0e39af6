#include "model/vlm.h"

#include <ATen/ATen.h>

#include <ATen/core/grad_mode.h>

#include <filesystem>
#include <mutex>

#include "core/error.h"
#include "model/ops.h"
#include "model/rope.h"
#include "vision/image.h"

namespace fs = std::filesystem;

namespace mlaforge {

namespace {

// Image features by (vision weights hash, file), shared by every Vlm of the process.
struct FeatureCache {
  std::mutex mu;
  std::map<std::string, at::Tensor> features;
  int64_t bytes = 0, limit = int64_t(1) << 30;
};
FeatureCache& feature_cache() {
  static FeatureCache c;
  return c;
}

// Weights that make image features: the vision tower, the projector and LLaVA-NeXT's row newline.
bool is_vision_weight(const std::string& name) {
  return name.find("visual.") != std::string::npos || name.find("vision_tower.") != std::string::npos ||
         name.find("multi_modal_projector.") != std::string::npos || name.find("image_newline") != std::string::npos;
}

// FNV-1a over the names and bytes of the vision weights.
std::string hash_vision_weights(const WeightStore& ws) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  };
  for (const auto& name : ws.names()) {
    if (!is_vision_weight(name)) continue;
    at::Tensor t = ws.load_stored(name).contiguous();  // the stored bytes, no conversion
    mix(name.data(), name.size());
    mix(t.data_ptr(), size_t(t.numel()) * t.element_size());
  }
  return std::to_string(h);
}

}  // namespace

std::unique_ptr<Vlm> Vlm::load(const std::string& dir, const LoadOptions& options) {
  std::unique_ptr<Vlm> m(new Vlm());
  m->dir_ = dir;
  m->load_options_ = options;
  m->cfg_ = load_model_config(dir);
  m->store_ = std::make_unique<WeightStore>(WeightStore::open_dir(dir));
  fs::path tok = fs::path(dir) / "tokenizer.json";
  m->tokenizer_ = std::make_unique<Tokenizer>(Tokenizer::from_file(tok.string()));
  m->chat_ = std::make_unique<ChatFormat>(ChatFormat::from_model_dir(dir));
  const std::string pre = image_processor_config_path(dir);
  const WeightStore& ws = *m->store_;
  const ModelConfig& c = m->cfg_;
  std::string lm, head;
  if (c.qwen_vl()) {
    m->qwen_image_cfg_ = load_qwen2vl_image_config(pre);
    const auto& v = c.vision;
    check(m->qwen_image_cfg_.patch_size == v.patch_size && m->qwen_image_cfg_.temporal_patch_size == v.temporal_patch_size &&
              m->qwen_image_cfg_.merge_size == v.spatial_merge_size,
          pre, "patch_size/temporal_patch_size/merge_size disagree with config.json's vision_config");
    // Hub layout (model.*, visual.*) or the newer one (model.language_model.*, model.visual.*).
    lm = find_prefix(ws, {"model.language_model.", "model."}, "embed_tokens.weight", "language model");
    std::string vis = find_prefix(ws, {"visual.", "model.visual."}, "patch_embed.proj.weight", "vision tower");
    m->qwen_vision_ = std::make_unique<Qwen2VisionTower>(v, ws, vis);
    head = "lm_head.weight";
  } else {
    m->clip_image_cfg_ = load_clip_image_config(pre);
    const ClipImageConfig& ic = m->clip_image_cfg_;
    check(ic.do_center_crop && ic.crop_h == c.clip.image_size && ic.crop_w == c.clip.image_size, pre,
          "images must be centre-cropped to the vision tower's image_size ", c.clip.image_size, " (crop_size is ",
          ic.crop_h, "x", ic.crop_w, ")");
    // Hub layout, transformers' in-memory names, and transformers 5's saved names (no "vision_model.").
    lm = find_prefix(ws, {"language_model.model.", "model.language_model.", "model."}, "embed_tokens.weight",
                     "language model");
    head = ws.has("language_model.lm_head.weight") ? "language_model.lm_head.weight" : "lm_head.weight";
    std::string tower = find_prefix(ws,
                                    {"vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_tower.",
                                     "model.vision_tower."},
                                    "embeddings.patch_embedding.weight", "CLIP vision tower");
    std::string proj = find_prefix(ws, {"multi_modal_projector.", "model.multi_modal_projector."}, "linear_1.weight",
                                   "multimodal projector");
    m->clip_vision_ = std::make_unique<ClipVisionEncoder>(c.clip, c.llava, c.text.hidden_size, ws, tower, proj);
    if (c.llava.anyres()) {
      // The processor tiles with its own pinpoints and the model unpacks with config.json's: they
      // must agree (a file without them gets the model's).
      if (m->clip_image_cfg_.grid_pinpoints.empty()) m->clip_image_cfg_.grid_pinpoints = c.llava.grid_pinpoints;
      check(m->clip_image_cfg_.grid_pinpoints == c.llava.grid_pinpoints, pre,
            "image_grid_pinpoints differ from config.json's");
      // Hub name "image_newline", transformers' in-memory "model.image_newline".
      const std::string nl = find_prefix(ws, {"", "model."}, "image_newline", "LLaVA-NeXT image_newline");
      m->image_newline_ = WeightLoader(ws, nl).get("image_newline", {c.text.hidden_size});
    }
  }
  m->lm_prefix_ = lm;
  m->head_name_ = head;
  if (options.stored_half) {
    const std::string& stored = ws.entry(lm + "embed_tokens.weight").dtype;
    if (stored == "BF16") m->load_options_.dtype = at::kBFloat16;
    if (stored == "F16") m->load_options_.dtype = at::kHalf;
  }
  // The vision tower runs where the decoder does, in its dtype (as transformers runs a bf16 model).
  // float32 means float32 there too: PyTorch lets cuDNN convolutions (the patch embeddings) use TF32
  // unless told not to, which alone moves float32 logits by ~1e-3.
  if (options.device.is_cuda()) at::globalContext().setAllowTF32CuDNN(false);
  m->move_vision(options.device, m->load_options_.dtype);
  m->decoder_ = std::make_unique<DecoderLM>(c.text, c.mla, m->decoder_weights(), options.decoder_layers);
  m->device_ = options.device;
  m->vision_hash_ = hash_vision_weights(ws);
  m->pad_id_ = c.pad_token_id >= 0 ? c.pad_token_id : 0;
  return m;
}

DecoderLM::WeightFn Vlm::decoder_weights() const {
  return [this](const std::string& name, const std::vector<int64_t>& shape, bool required) -> at::Tensor {
    const WeightStore& ws = *store_;
    const bool head = name == DecoderLM::kHeadName;
    const std::string full = head ? head_name_ : lm_prefix_ + name;
    if (!ws.has(full)) {
      if (head) {
        check(cfg_.text.tie_word_embeddings, ws.dir(), "missing tensor ", full, " (and tie_word_embeddings is false)");
        return at::Tensor();
      }
      if (!required) return at::Tensor();
    }
    return ws.load(full, shape, load_options_.dtype).to(load_options_.device);  // a missing one: Error naming the file
  };
}

DecoderLayer Vlm::load_layer(int64_t i) const { return decoder_->load_layer(i, decoder_weights()); }

void Vlm::move_vision(const at::Device& device, at::ScalarType dtype) {
  if (qwen_vision_) qwen_vision_->to(device, dtype);
  if (clip_vision_) clip_vision_->to(device, dtype);
  move_tensors({&image_newline_}, device, dtype);
}

void Vlm::to(const at::Device& device, at::ScalarType dtype) {
  decoder_->to(device, dtype);
  move_vision(device, dtype);
  device_ = device;
  load_options_.device = device;  // layers loaded later (load_layer) follow
  load_options_.dtype = dtype;
  load_options_.stored_half = false;
}

int64_t Vlm::parameter_count(const std::string& part) const {
  int64_t n = 0;
  for (const auto& name : store_->names()) {
    const bool vision = is_vision_weight(name);
    if (part == "all" || (part == "vision") == vision) {
      int64_t c = 1;
      for (int64_t d : store_->entry(name).shape) c *= d;
      n += c;
    }
  }
  return n;
}

int64_t Vlm::image_tokens(const std::array<int64_t, 3>& g) const {
  if (cfg_.family == Family::Llava && cfg_.llava.anyres())
    return llava_next_image_tokens(g[1], g[2], cfg_.llava.grid_pinpoints, cfg_.clip.image_size, cfg_.clip.patch_size);
  if (cfg_.family == Family::Llava) return cfg_.llava.tokens_per_image(cfg_.clip);
  const int64_t m = cfg_.vision.spatial_merge_size;
  return g[0] * (g[1] / m) * (g[2] / m);
}

Batch Vlm::prepare(const std::vector<Prompt>& prompts, bool add_generation_prompt) const {
  std::vector<std::vector<int64_t>> all_ids;
  std::vector<at::Tensor> pixels;
  std::vector<std::array<int64_t, 3>> grids;
  for (const Prompt& p : prompts) {
    size_t n_items = 0;
    for (auto& t : p.turns)
      for (auto& it : t.items) n_items += it.is_image;
    if (n_items != p.image_paths.size())
      throw Error(str("prompt has ", n_items, " image markers for ", p.image_paths.size(), " images"));
    std::vector<int64_t> counts;  // prompt tokens per image
    for (const auto& path : p.image_paths) {
      Image img = load_image(path);
      if (cfg_.qwen_vl()) {
        PatchedImage pi = qwen2vl_preprocess(img, qwen_image_cfg_);
        pixels.push_back(at::from_blob(pi.values.data(), {pi.rows, pi.cols}, at::kFloat).clone());
        grids.push_back({pi.grid_t, pi.grid_h, pi.grid_w});
      } else if (cfg_.llava.anyres()) {
        int64_t tiles = 0;
        std::vector<float> v = llava_next_preprocess(img, clip_image_cfg_, &tiles);
        const int64_t S = cfg_.clip.image_size;
        pixels.push_back(at::from_blob(v.data(), {tiles, 3, S, S}, at::kFloat).clone());
        grids.push_back({tiles, img.height, img.width});
      } else {
        std::vector<float> v = clip_preprocess(img, clip_image_cfg_);
        const int64_t S = cfg_.clip.image_size;
        pixels.push_back(at::from_blob(v.data(), {1, 3, S, S}, at::kFloat).clone());
        grids.push_back({1, S / cfg_.clip.patch_size, S / cfg_.clip.patch_size});
      }
      counts.push_back(image_tokens(grids.back()));
    }
    // Rendered and encoded as a processor does (the tokenizer's post-processor adds any BOS); each
    // image token then stands for its image's features.
    std::string text = chat_->render(p.turns, add_generation_prompt);
    std::vector<int32_t> raw = tokenizer_->encode(text, /*add_special_tokens=*/true);
    std::vector<int64_t> ids;
    size_t image = 0;
    for (int32_t id : raw) {
      if (id != cfg_.image_token_id) {
        ids.push_back(id);
        continue;
      }
      if (image >= counts.size()) throw Error("the rendered prompt has more image tokens than images");
      ids.insert(ids.end(), size_t(counts[image++]), cfg_.image_token_id);
    }
    if (image != counts.size()) throw Error("the rendered prompt has fewer image tokens than images");
    all_ids.push_back(std::move(ids));
  }
  at::Tensor pv = pixels.empty() ? at::Tensor() : at::cat(pixels, 0);
  Batch b = make_batch(all_ids, pv, grids);
  for (const Prompt& p : prompts) b.image_keys.insert(b.image_keys.end(), p.image_paths.begin(), p.image_paths.end());
  return b;
}

Batch Vlm::make_batch(const std::vector<std::vector<int64_t>>& ids, const at::Tensor& pixel_values,
                      const std::vector<std::array<int64_t, 3>>& grids) const {
  Batch b;
  const int64_t B = int64_t(ids.size());
  int64_t T = 0;
  for (auto& s : ids) T = std::max<int64_t>(T, int64_t(s.size()));
  b.ids = at::full({B, T}, pad_id_, at::kLong);
  b.valid = at::zeros({B, T}, at::kBool);
  b.is_image = at::zeros({B, T}, at::kBool);
  b.pos = at::zeros({3, B, T}, at::kLong);
  b.pixel_values = pixel_values;
  if (pixel_values.defined() && pixel_values.dim() == 5 && cfg_.llava.anyres()) {
    // The processor's [n, max_tiles, C, S, S]: keep each image's own tiles.
    check(pixel_values.size(0) == int64_t(grids.size()), "pixel_values", "has ", pixel_values.size(0),
          " images for ", grids.size(), " image sizes");
    std::vector<at::Tensor> own;
    for (size_t i = 0; i < grids.size(); ++i) {
      check(grids[i][0] <= pixel_values.size(1), "pixel_values", "image ", i, " needs ", grids[i][0],
            " tiles, the tensor holds ", pixel_values.size(1));
      own.push_back(pixel_values[int64_t(i)].narrow(0, 0, grids[i][0]));
    }
    b.pixel_values = at::cat(own, 0);
  }
  b.grids = grids;
  const int64_t m = cfg_.vision.spatial_merge_size;
  size_t image = 0;
  for (int64_t r = 0; r < B; ++r) {
    const auto& s = ids[size_t(r)];
    const int64_t L = int64_t(s.size()), off = T - L;
    // The images this row uses: as many as its image tokens account for.
    int64_t n_image_tokens = 0, taken = 0;
    for (int64_t id : s) {
      n_image_tokens += (id == cfg_.image_token_id);
      // A video token would need video features, which this runtime does not compute.
      if (cfg_.video_token_id >= 0 && id == cfg_.video_token_id)
        throw Error(str("row ", r, " has a video token (id ", id, "): videos are not supported, only images"));
    }
    std::vector<std::array<int64_t, 3>> llm_grids;  // (t, h/merge, w/merge) for M-RoPE
    while (taken < n_image_tokens) {
      if (image >= grids.size())
        throw Error(str("image token count (", n_image_tokens, " in row ", r, ") does not match the image features (",
                        grids.size(), " images)"));
      const auto& g = grids[image++];
      llm_grids.push_back({g[0], g[1] / m, g[2] / m});
      taken += image_tokens(g);
    }
    if (taken != n_image_tokens)
      throw Error(str("image token count (", n_image_tokens, " in row ", r, ") does not match the image features (",
                      taken, " tokens for its images)"));
    int64_t next = L;
    at::Tensor pos;
    if (cfg_.text.mrope_section.empty())
      pos = at::arange(L, at::kLong).unsqueeze(0).expand({3, L});
    else
      pos = mrope_positions(s, cfg_.image_token_id, llm_grids, &next, cfg_.family == Family::Qwen25VL ? 0 : 1);
    b.next_position.push_back(next);
    if (L > 0) {
      b.ids[r].narrow(0, off, L).copy_(at::tensor(s, at::kLong));
      b.valid[r].narrow(0, off, L).fill_(true);
      // Image modality: image tokens and, for Qwen2-VL, the vision start/end markers around them.
      std::vector<uint8_t> img(static_cast<size_t>(L));
      for (int64_t i = 0; i < L; ++i) {
        int64_t id = s[size_t(i)];
        img[size_t(i)] = id == cfg_.image_token_id || id == cfg_.vision_start_token_id || id == cfg_.vision_end_token_id;
      }
      b.is_image[r].narrow(0, off, L).copy_(at::tensor(img, at::kByte).to(at::kBool));
      b.pos.select(1, r).narrow(1, off, L).copy_(pos);
    }
  }
  if (image != grids.size())
    throw Error(str("image token count does not match the image features: ", grids.size(), " images given, the prompts use ",
                    image));
  if (device_ != at::Device(at::kCPU)) {
    b.ids = b.ids.to(device_);
    b.valid = b.valid.to(device_);
    b.is_image = b.is_image.to(device_);
    b.pos = b.pos.to(device_);
  }
  return b;
}

at::Tensor Vlm::image_features(const at::Tensor& pixel_values, const std::vector<std::array<int64_t, 3>>& grids) const {
  at::NoGradGuard no_grad;  // the vision tower is frozen in every use
  if (cfg_.qwen_vl()) return qwen_vision_->forward(pixel_values, grids);
  if (!cfg_.llava.anyres()) {
    at::Tensor f = clip_vision_->forward(pixel_values);  // [n, tokens, d]
    return f.reshape({-1, f.size(-1)});
  }
  // LLaVA-NeXT: every tile of every image through the tower at once, then each image packed.
  int64_t total = 0;
  for (const auto& g : grids) total += g[0];
  check(pixel_values.dim() == 4 && pixel_values.size(0) == total, "pixel_values", "expected the ", total,
        " tiles of ", grids.size(), " images as [tiles, C, S, S], got ", shape_str(pixel_values.sizes().vec()));
  at::Tensor f = clip_vision_->forward(pixel_values);  // [tiles, (S/P)^2, d]
  std::vector<at::Tensor> packed;
  int64_t row = 0;
  for (const auto& g : grids) {
    packed.push_back(llava_next_pack_features(f.narrow(0, row, g[0]), g[1], g[2], cfg_.llava.grid_pinpoints,
                                              cfg_.clip.image_size, cfg_.clip.patch_size, image_newline_));
    row += g[0];
  }
  return at::cat(packed, 0);
}

at::Tensor Vlm::image_features_cached(const Batch& batch) const {
  if (batch.image_keys.size() != batch.grids.size()) return image_features(batch.pixel_values, batch.grids);
  // Rows of pixel_values per image: Qwen2-VL patches t*h*w rows, LLaVA one [C, S, S] image,
  // LLaVA-NeXT its tiles.
  std::vector<int64_t> offset = {0};
  for (const auto& g : batch.grids)
    offset.push_back(offset.back() + (cfg_.qwen_vl() ? g[0] * g[1] * g[2] : cfg_.llava.anyres() ? g[0] : 1));
  FeatureCache& cache = feature_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  // Features depend on where and in which dtype the tower runs, too.
  const std::string where = mlaforge::str(device_, "|", load_options_.dtype, "|");
  auto key = [&](size_t i) { return vision_hash_ + "|" + where + batch.image_keys[i]; };
  std::vector<size_t> missing;
  for (size_t i = 0; i < batch.grids.size(); ++i)
    if (!cache.features.count(key(i))) missing.push_back(i);
  if (!missing.empty()) {
    std::vector<at::Tensor> px;
    std::vector<std::array<int64_t, 3>> grids;
    for (size_t i : missing) {
      px.push_back(batch.pixel_values.narrow(0, offset[i], offset[i + 1] - offset[i]));
      grids.push_back(batch.grids[i]);
    }
    at::Tensor f = image_features(at::cat(px, 0), grids);
    int64_t row = 0;
    for (size_t k = 0; k < missing.size(); ++k) {
      const int64_t n = image_tokens(grids[k]);
      at::Tensor one = f.narrow(0, row, n).detach();
      row += n;
      if (cache.bytes + one.numel() * one.element_size() <= cache.limit) {
        cache.features[key(missing[k])] = one;
        cache.bytes += one.numel() * one.element_size();
      } else {
        return image_features(batch.pixel_values, batch.grids);  // cache full: compute this batch whole
      }
    }
  }
  std::vector<at::Tensor> feats;
  for (size_t i = 0; i < batch.image_keys.size(); ++i) feats.push_back(cache.features.at(key(i)));
  return at::cat(feats, 0);
}

at::Tensor Vlm::input_embeddings(const Batch& batch) const {
  at::Tensor x = decoder_->embed(batch.ids);  // [B, T, d]
  at::Tensor is_image = batch.ids == cfg_.image_token_id;
  int64_t n = is_image.sum().item<int64_t>();
  if (batch.grids.empty()) {
    check(n == 0, "prompt", "image token count (", n, ") does not match the image features (no images)");
    return x;
  }
  at::Tensor feats = image_features_cached(batch);  // [n, d]
  check(feats.size(0) == n, "prompt", "image token count (", n, ") does not match the image features (",
        feats.size(0), ")");
  // Scatter in order: row-major over (batch, position), as transformers' masked_scatter.
  at::Tensor flat = x.view({-1, x.size(2)});
  at::Tensor idx = is_image.view({-1}).nonzero().squeeze(1);
  flat.index_copy_(0, idx, feats.to(flat.device(), flat.scalar_type()));
  return x;
}

at::Tensor Vlm::prefill(const Batch& batch, KVCache& cache, const ForwardTaps& taps) const {
  at::Tensor x = input_embeddings(batch);
  return decoder_->forward(x, batch.pos, batch.valid, batch.is_image, cache, taps);
}

at::Tensor Vlm::decode_step(const at::Tensor& tokens, const at::Tensor& positions, KVCache& cache) const {
  const int64_t B = tokens.size(0);
  return decoder_->decode_step(tokens, positions.view({1, B, 1}).expand({3, B, 1}), cache);
}

}  // namespace mlaforge
