#include "vision/preprocess.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace mlaforge {
namespace {

using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// preprocessor_config.json helpers
// ---------------------------------------------------------------------------------------------
json read_config(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(path, "cannot open preprocessor config: ", std::strerror(errno));
  json j;
  try {
    j = json::parse(f);
  } catch (const json::exception& e) {
    fail(path, "invalid JSON: ", e.what());
  }
  check(j.is_object(), path, "preprocessor config must be a JSON object");
  // transformers 5 saves the processor's settings in processor_config.json under "image_processor".
  if (j.contains("image_processor") && j["image_processor"].is_object()) return j["image_processor"];
  return j;
}

bool present(const json& j, const char* key) { return j.contains(key) && !j.at(key).is_null(); }

bool get_bool(const json& j, const char* key, bool def, const std::string& path) {
  if (!present(j, key)) return def;
  const json& v = j.at(key);
  check(v.is_boolean(), path, "\"", key, "\" must be true or false, got ", v.dump());
  return v.get<bool>();
}

double get_number(const json& v, const std::string& what, const std::string& path) {
  check(v.is_number(), path, what, " must be a number, got ", v.dump());
  return v.get<double>();
}

int64_t get_integer(const json& v, const std::string& what, const std::string& path) {
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float()) {  // accept 3136.0
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) return int64_t(d);
  }
  fail(path, what, " must be an integer, got ", v.dump());
}

void get_triple(const json& j, const char* key, float out[3], const std::string& path) {
  if (!present(j, key)) return;
  const json& v = j.at(key);
  if (v.is_number()) {
    out[0] = out[1] = out[2] = float(v.get<double>());
    return;
  }
  check(v.is_array() && v.size() == 3, path, "\"", key, "\" must be a number or a list of 3 numbers, got ", v.dump());
  for (int c = 0; c < 3; ++c) out[c] = float(get_number(v[c], str("\"", key, "\"[", c, "]"), path));
}

void check_resample(const json& j, const std::string& path) {
  if (!present(j, "resample")) return;
  const int64_t r = get_integer(j.at("resample"), "\"resample\"", path);
  static const char* names[] = {"nearest", "lanczos", "bilinear", "bicubic", "box", "hamming"};
  check(r == 3, path, "\"resample\": ", r, r >= 0 && r < 6 ? str(" (", names[r], ")") : std::string(),
        " is not supported; only bicubic (3) is implemented");
}

void check_normalisation(const float mean[3], const float std_[3], double rescale, bool do_rescale,
                         const std::string& path) {
  for (int c = 0; c < 3; ++c) {
    check(std::isfinite(mean[c]), path, "\"image_mean\" must be finite");
    check(std::isfinite(std_[c]) && std_[c] != 0.0f, path, "\"image_std\" must be finite and non-zero");
  }
  if (do_rescale) check(std::isfinite(rescale) && rescale > 0, path, "\"rescale_factor\" must be positive, got ", rescale);
}

// ---------------------------------------------------------------------------------------------
// Rescale + normalise: a per-channel table over the 256 byte values, computed with the exact
// float32 operations of each backend.
// ---------------------------------------------------------------------------------------------
struct Lut {
  float v[3][256];
};

Lut make_lut(ResizeBackend backend, bool do_rescale, double rescale_factor, bool do_normalize,
             const float mean[3], const float std_[3]) {
  Lut lut;
  for (int c = 0; c < 3; ++c) {
    for (int x = 0; x < 256; ++x) {
      float v;
      if (backend == ResizeBackend::Torchvision) {
        // TorchvisionBackend._rescale_and_normalize: mean/std tensors (float32) times the Python
        // float 1/rescale_factor (cast to float32), then tvF.normalize: x.sub_(mean).div_(std).
        if (do_rescale && do_normalize) {
          const float inv = float(1.0 / rescale_factor);
          const float m = mean[c] * inv;
          const float s = std_[c] * inv;
          v = (float(x) - m) / s;
        } else if (do_normalize) {
          v = (float(x) - mean[c]) / std_[c];
        } else if (do_rescale) {
          v = float(x) * float(rescale_factor);
        } else {
          v = float(x);
        }
      } else {
        // image_transforms.rescale: float64 product cast to float32; normalize: float32 ops.
        v = do_rescale ? float(double(x) * rescale_factor) : float(x);
        if (do_normalize) v = (v - mean[c]) / std_[c];
      }
      lut.v[c][x] = v;
    }
  }
  return lut;
}

// [3, H, W] planes.
void to_planes(const Image& img, const Lut& lut, float* out) {
  const size_t n = size_t(img.width) * img.height;
  const uint8_t* p = img.rgb.data();
  float* r = out;
  float* g = out + n;
  float* b = out + 2 * n;
  for (size_t i = 0; i < n; ++i, p += 3) {
    r[i] = lut.v[0][p[0]];
    g[i] = lut.v[1][p[1]];
    b[i] = lut.v[2][p[2]];
  }
}

void check_image(const Image& img, const char* where) {
  check(img.width > 0 && img.height > 0 && img.rgb.size() == size_t(img.width) * size_t(img.height) * 3, where,
        "invalid image (", img.width, "x", img.height, ", ", img.rgb.size(), " bytes)");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Qwen2-VL
// ---------------------------------------------------------------------------------------------
std::string image_processor_config_path(const std::string& dir) {
  for (const char* name : {"preprocessor_config.json", "processor_config.json"}) {
    std::string p = dir + "/" + name;
    std::ifstream f(p);
    if (f) return p;
  }
  fail(dir, "no preprocessor_config.json or processor_config.json (the image processor's settings)");
}

Qwen2VLImageConfig load_qwen2vl_image_config(const std::string& path) {
  const json j = read_config(path);
  Qwen2VLImageConfig cfg;
  if (present(j, "size")) {
    const json& s = j.at("size");
    check(s.is_object(), path, "\"size\" must be an object, got ", s.dump());
    // transformers 5: shortest_edge/longest_edge hold pixel counts for Qwen; 4.4x wrote min/max_pixels.
    if (present(s, "shortest_edge")) cfg.min_pixels = get_integer(s.at("shortest_edge"), "\"size.shortest_edge\"", path);
    else if (present(s, "min_pixels")) cfg.min_pixels = get_integer(s.at("min_pixels"), "\"size.min_pixels\"", path);
    if (present(s, "longest_edge")) cfg.max_pixels = get_integer(s.at("longest_edge"), "\"size.longest_edge\"", path);
    else if (present(s, "max_pixels")) cfg.max_pixels = get_integer(s.at("max_pixels"), "\"size.max_pixels\"", path);
  }
  if (present(j, "min_pixels")) cfg.min_pixels = get_integer(j.at("min_pixels"), "\"min_pixels\"", path);
  if (present(j, "max_pixels")) cfg.max_pixels = get_integer(j.at("max_pixels"), "\"max_pixels\"", path);
  auto get_int = [&](const char* key, int& out) {
    if (!present(j, key)) return;
    const int64_t v = get_integer(j.at(key), str("\"", key, "\""), path);
    check(v > 0 && v <= 4096, path, "\"", key, "\" must be a positive integer, got ", v);
    out = int(v);
  };
  get_int("patch_size", cfg.patch_size);
  get_int("temporal_patch_size", cfg.temporal_patch_size);
  get_int("merge_size", cfg.merge_size);
  get_triple(j, "image_mean", cfg.mean, path);
  get_triple(j, "image_std", cfg.std, path);
  if (present(j, "rescale_factor")) cfg.rescale_factor = get_number(j.at("rescale_factor"), "\"rescale_factor\"", path);
  cfg.do_resize = get_bool(j, "do_resize", cfg.do_resize, path);
  cfg.do_rescale = get_bool(j, "do_rescale", cfg.do_rescale, path);
  cfg.do_normalize = get_bool(j, "do_normalize", cfg.do_normalize, path);
  check_resample(j, path);
  check(cfg.min_pixels >= 0, path, "min_pixels must not be negative, got ", cfg.min_pixels);
  check(cfg.max_pixels > 0, path, "max_pixels must be positive, got ", cfg.max_pixels);
  check(cfg.min_pixels <= cfg.max_pixels, path, "min_pixels (", cfg.min_pixels, ") exceeds max_pixels (",
        cfg.max_pixels, ")");
  check_normalisation(cfg.mean, cfg.std, cfg.rescale_factor, cfg.do_rescale, path);
  return cfg;
}

std::pair<int, int> smart_resize(int height, int width, int factor, int64_t min_pixels, int64_t max_pixels) {
  const char* where = "smart_resize";
  check(factor > 0, where, "factor must be positive, got ", factor);
  check(height > 0 && width > 0, where, "image size must be positive, got ", height, "x", width);
  check(max_pixels > 0, where, "max_pixels must be positive, got ", max_pixels);
  const double ratio = double(std::max(height, width)) / double(std::min(height, width));
  check(!(ratio > 200), where, "absolute aspect ratio must be smaller than 200, got ", ratio, " (", height, "x",
        width, ")");
  // Python's round() on a float: nearest, halves to even (the default FE_TONEAREST mode).
  auto py_round = [](double v) { return int64_t(std::nearbyint(v)); };
  const double f = double(factor);
  int64_t h_bar = py_round(double(height) / f) * factor;
  int64_t w_bar = py_round(double(width) / f) * factor;
  const int64_t area = int64_t(height) * int64_t(width);
  if (h_bar * w_bar > max_pixels) {
    const double beta = std::sqrt(double(area) / double(max_pixels));
    h_bar = std::max<int64_t>(factor, int64_t(std::floor(double(height) / beta / f)) * factor);
    w_bar = std::max<int64_t>(factor, int64_t(std::floor(double(width) / beta / f)) * factor);
  } else if (h_bar * w_bar < min_pixels) {
    const double beta = std::sqrt(double(min_pixels) / double(area));
    h_bar = int64_t(std::ceil(double(height) * beta / f)) * factor;
    w_bar = int64_t(std::ceil(double(width) * beta / f)) * factor;
  }
  check(h_bar > 0 && w_bar > 0, where, height, "x", width, " resizes to an empty image (", h_bar, "x", w_bar,
        "); raise min_pixels");
  check(h_bar <= std::numeric_limits<int>::max() / 4 && w_bar <= std::numeric_limits<int>::max() / 4, where,
        height, "x", width, " resizes to an impossibly large image (", h_bar, "x", w_bar, ")");
  return {int(h_bar), int(w_bar)};
}

Image qwen2vl_resized_image(const Image& image, const Qwen2VLImageConfig& cfg) {
  check_image(image, "qwen2vl_preprocess");
  if (!cfg.do_resize) return image;
  const auto [h, w] = smart_resize(image.height, image.width, cfg.patch_size * cfg.merge_size, cfg.min_pixels,
                                   cfg.max_pixels);
  return resize_bicubic(image, w, h, cfg.backend);
}

PatchedImage qwen2vl_patchify(const Image& img, const Qwen2VLImageConfig& cfg) {
  check_image(img, "qwen2vl_preprocess");
  const int ps = cfg.patch_size, m = cfg.merge_size, tps = cfg.temporal_patch_size;
  check(ps > 0 && m > 0 && tps > 0, "qwen2vl_preprocess", "patch_size, merge_size and temporal_patch_size must be positive");
  check(img.height % (ps * m) == 0 && img.width % (ps * m) == 0, "qwen2vl_preprocess", "image size ", img.height,
        "x", img.width, " is not a multiple of patch_size * merge_size = ", ps * m);
  const int H = img.height, W = img.width;
  const int gh = H / ps, gw = W / ps;

  const Lut lut = make_lut(cfg.backend, cfg.do_rescale, cfg.rescale_factor, cfg.do_normalize, cfg.mean, cfg.std);
  std::vector<float> planes(size_t(3) * H * W);
  to_planes(img, lut, planes.data());

  PatchedImage out;
  out.grid_t = 1;  // one image, repeated to temporal_patch_size frames
  out.grid_h = gh;
  out.grid_w = gw;
  out.rows = int64_t(gh) * gw;
  out.cols = int64_t(3) * tps * ps * ps;
  out.values.resize(size_t(out.rows) * size_t(out.cols));
  const size_t plane = size_t(H) * W;
  const int bh_n = gh / m, bw_n = gw / m;
  int64_t r = 0;
  for (int bh = 0; bh < bh_n; ++bh)
    for (int bw = 0; bw < bw_n; ++bw)
      for (int mh = 0; mh < m; ++mh)
        for (int mw = 0; mw < m; ++mw, ++r) {
          const int y0 = (bh * m + mh) * ps, x0 = (bw * m + mw) * ps;
          float* dst = out.values.data() + size_t(r) * size_t(out.cols);
          for (int c = 0; c < 3; ++c) {
            const float* src = planes.data() + c * plane + size_t(y0) * W + x0;
            for (int t = 0; t < tps; ++t)
              for (int py = 0; py < ps; ++py, dst += ps) std::memcpy(dst, src + size_t(py) * W, sizeof(float) * ps);
          }
        }
  return out;
}

PatchedImage qwen2vl_preprocess(const Image& image, const Qwen2VLImageConfig& cfg) {
  return qwen2vl_patchify(qwen2vl_resized_image(image, cfg), cfg);
}

// ---------------------------------------------------------------------------------------------
// CLIP
// ---------------------------------------------------------------------------------------------
ClipImageConfig load_clip_image_config(const std::string& path) {
  const json j = read_config(path);
  ClipImageConfig cfg;
  // CLIPImageProcessor's class defaults for absent keys.
  cfg.shortest_edge = 224;
  cfg.crop_h = cfg.crop_w = 224;
  auto positive = [&](const json& v, const std::string& what) {
    const int64_t x = get_integer(v, what, path);
    check(x > 0 && x <= 1 << 16, path, what, " must be a positive integer, got ", x);
    return int(x);
  };
  if (present(j, "size")) {
    const json& s = j.at("size");
    if (s.is_number()) {
      cfg.shortest_edge = positive(s, "\"size\"");
    } else {
      check(s.is_object(), path, "\"size\" must be an integer or an object, got ", s.dump());
      if (present(s, "height") || present(s, "width")) {
        check(present(s, "height") && present(s, "width"), path, "\"size\" needs both height and width, got ", s.dump());
        cfg.resize_h = positive(s.at("height"), "\"size.height\"");
        cfg.resize_w = positive(s.at("width"), "\"size.width\"");
      } else {
        check(present(s, "shortest_edge") && !present(s, "longest_edge"), path,
              "\"size\" must be {\"shortest_edge\": N} or {\"height\", \"width\"}, got ", s.dump());
        cfg.shortest_edge = positive(s.at("shortest_edge"), "\"size.shortest_edge\"");
      }
    }
  }
  if (present(j, "crop_size")) {
    const json& s = j.at("crop_size");
    if (s.is_number()) {
      cfg.crop_h = cfg.crop_w = positive(s, "\"crop_size\"");
    } else {
      check(s.is_object() && present(s, "height") && present(s, "width"), path,
            "\"crop_size\" must be an integer or {\"height\", \"width\"}, got ", s.dump());
      cfg.crop_h = positive(s.at("height"), "\"crop_size.height\"");
      cfg.crop_w = positive(s.at("width"), "\"crop_size.width\"");
    }
  }
  cfg.do_resize = get_bool(j, "do_resize", cfg.do_resize, path);
  cfg.do_center_crop = get_bool(j, "do_center_crop", cfg.do_center_crop, path);
  cfg.do_rescale = get_bool(j, "do_rescale", cfg.do_rescale, path);
  cfg.do_normalize = get_bool(j, "do_normalize", cfg.do_normalize, path);
  cfg.do_convert_rgb = get_bool(j, "do_convert_rgb", cfg.do_convert_rgb, path);
  get_triple(j, "image_mean", cfg.mean, path);
  get_triple(j, "image_std", cfg.std, path);
  if (present(j, "rescale_factor")) cfg.rescale_factor = get_number(j.at("rescale_factor"), "\"rescale_factor\"", path);
  if (present(j, "image_grid_pinpoints")) {
    const json& pp = j.at("image_grid_pinpoints");
    check(pp.is_array() && !pp.empty(), path, "\"image_grid_pinpoints\" must be a non-empty list of [height, width], got ",
          pp.dump());
    for (const json& p : pp) {
      check(p.is_array() && p.size() == 2, path, "\"image_grid_pinpoints\" entries must be [height, width], got ", p.dump());
      cfg.grid_pinpoints.push_back({positive(p[0], "\"image_grid_pinpoints\" height"),
                                    positive(p[1], "\"image_grid_pinpoints\" width")});
    }
  }
  check_resample(j, path);
  check_normalisation(cfg.mean, cfg.std, cfg.rescale_factor, cfg.do_rescale, path);
  return cfg;
}

std::pair<int, int> clip_resize_size(int height, int width, const ClipImageConfig& cfg) {
  check(height > 0 && width > 0, "clip_preprocess", "image size must be positive, got ", height, "x", width);
  if (cfg.resize_h > 0 && cfg.resize_w > 0) return {cfg.resize_h, cfg.resize_w};
  check(cfg.shortest_edge > 0, "clip_preprocess", "shortest_edge must be positive, got ", cfg.shortest_edge);
  const bool portrait = width <= height;
  const int64_t shorter = portrait ? width : height, longer = portrait ? height : width;
  // Python: int(requested_new_short * long / short): an exact integer product, a true division, truncation.
  const double new_long_d = double(int64_t(cfg.shortest_edge) * longer) / double(shorter);
  check(new_long_d < double(1 << 20), "clip_preprocess", height, "x", width, " resizes to an impossibly large image");
  const int new_long = int(new_long_d);
  check(new_long > 0, "clip_preprocess", height, "x", width, " resizes to an empty image");
  return portrait ? std::make_pair(new_long, cfg.shortest_edge) : std::make_pair(cfg.shortest_edge, new_long);
}

Image clip_cropped_image(const Image& image, const ClipImageConfig& cfg) {
  check_image(image, "clip_preprocess");
  Image r;
  if (cfg.do_resize) {
    const auto [h, w] = clip_resize_size(image.height, image.width, cfg);
    r = resize_bicubic(image, w, h, cfg.backend);
  } else {
    r = image;
  }
  if (!cfg.do_center_crop) return r;
  check(cfg.crop_h > 0 && cfg.crop_w > 0, "clip_preprocess", "crop size must be positive, got ", cfg.crop_h, "x",
        cfg.crop_w);
  if (r.height == cfg.crop_h && r.width == cfg.crop_w) return r;
  // Offset of the crop inside the image; negative when the crop is larger (zero padding). The
  // torchvision backend pads (crop - size) // 2 before, numpy's center_crop ceil((crop - size) / 2).
  auto offset = [&](int size, int crop) {
    if (size >= crop) return (size - crop) / 2;
    return cfg.backend == ResizeBackend::Torchvision ? -((crop - size) / 2) : -((crop - size + 1) / 2);
  };
  const int oy = offset(r.height, cfg.crop_h), ox = offset(r.width, cfg.crop_w);
  Image out;
  out.width = cfg.crop_w;
  out.height = cfg.crop_h;
  out.rgb.assign(size_t(out.width) * out.height * 3, 0);
  for (int y = 0; y < out.height; ++y) {
    const int sy = y + oy;
    if (sy < 0 || sy >= r.height) continue;
    const int x_begin = std::max(0, -ox), x_end = std::min(out.width, r.width - ox);
    if (x_end <= x_begin) continue;
    std::memcpy(&out.rgb[(size_t(y) * out.width + x_begin) * 3], &r.rgb[(size_t(sy) * r.width + x_begin + ox) * 3],
                size_t(x_end - x_begin) * 3);
  }
  return out;
}

std::vector<float> clip_preprocess(const Image& image, const ClipImageConfig& cfg) {
  const Image img = clip_cropped_image(image, cfg);
  const Lut lut = make_lut(cfg.backend, cfg.do_rescale, cfg.rescale_factor, cfg.do_normalize, cfg.mean, cfg.std);
  std::vector<float> out(size_t(3) * img.width * img.height);
  to_planes(img, lut, out.data());
  return out;
}

// ---------------------------------------------------------------------------------------------
// LLaVA-NeXT
// ---------------------------------------------------------------------------------------------
std::pair<int64_t, int64_t> select_best_resolution(int64_t height, int64_t width,
                                                   const std::vector<std::array<int64_t, 2>>& pinpoints) {
  check(height > 0 && width > 0, "select_best_resolution", "image size must be positive, got ", height, "x", width);
  check(!pinpoints.empty(), "select_best_resolution", "no image_grid_pinpoints");
  // Python floats throughout, int() truncating, as image_processing_utils.select_best_resolution.
  std::pair<int64_t, int64_t> best = {pinpoints[0][0], pinpoints[0][1]};
  int64_t max_effective = 0, min_wasted = std::numeric_limits<int64_t>::max();
  for (const auto& p : pinpoints) {
    const int64_t h = p[0], w = p[1];
    const double scale = std::min(double(w) / double(width), double(h) / double(height));
    const int64_t dw = int64_t(double(width) * scale), dh = int64_t(double(height) * scale);
    const int64_t effective = std::min(dw * dh, width * height);
    const int64_t wasted = h * w - effective;
    if (effective > max_effective || (effective == max_effective && wasted < min_wasted)) {
      max_effective = effective;
      min_wasted = wasted;
      best = {h, w};
    }
  }
  return best;
}

std::pair<int, int> anyres_resize_size(int height, int width, int target_h, int target_w) {
  check(height > 0 && width > 0 && target_h > 0 && target_w > 0, "llava_next_preprocess", "sizes must be positive, got ",
        height, "x", width, " into ", target_h, "x", target_w);
  const double scale_w = double(target_w) / double(width), scale_h = double(target_h) / double(height);
  if (scale_w < scale_h) return {std::min(int(std::ceil(double(height) * scale_w)), target_h), target_w};
  return {target_h, std::min(int(std::ceil(double(width) * scale_h)), target_w)};
}

namespace {
// int(round(x, 7)) for x >= 0: Python rounds to 7 decimals (correctly rounded) and then truncates,
// so only a fraction within 5e-8 of the next integer moves up.
int64_t int_round7(double x) {
  const double whole = std::floor(x);
  return int64_t(whole) + (x - whole >= 0.99999995 ? 1 : 0);
}
}  // namespace

std::pair<int64_t, int64_t> anyres_unpadded_grid(int64_t height, int64_t width, int64_t grid_h, int64_t grid_w) {
  check(height > 0 && width > 0 && grid_h > 0 && grid_w > 0, "anyres_unpadded_grid", "sizes must be positive");
  // The same float operations as modeling_llava_next.unpad_image (and the processor's count).
  const double original_aspect = double(width) / double(height), current_aspect = double(grid_w) / double(grid_h);
  if (original_aspect > current_aspect) {
    const double scale = double(grid_w) / double(width);
    const int64_t new_h = int_round7(double(height) * scale);
    const int64_t pad = (grid_h - new_h) / 2;  // new_h <= grid_h here, so C++ and Python division agree
    return {grid_h - 2 * pad, grid_w};
  }
  const double scale = double(grid_h) / double(height);
  const int64_t new_w = int_round7(double(width) * scale);
  const int64_t pad = (grid_w - new_w) / 2;
  return {grid_h, grid_w - 2 * pad};
}

int64_t llava_next_image_tokens(int64_t height, int64_t width, const std::vector<std::array<int64_t, 2>>& pinpoints,
                                int64_t tile_size, int64_t patch_size) {
  check(tile_size > 0 && patch_size > 0 && tile_size % patch_size == 0, "llava_next_image_tokens", "tile size ",
        tile_size, " is not a multiple of the patch size ", patch_size);
  const auto [best_h, best_w] = select_best_resolution(height, width, pinpoints);
  const int64_t g = tile_size / patch_size;  // tokens per tile side
  const auto [rows, cols] = anyres_unpadded_grid(height, width, best_h / tile_size * g, best_w / tile_size * g);
  return g * g + rows * (cols + 1);  // base tile, then each unpadded row and its newline
}

std::vector<Image> llava_next_tiles(const Image& image, const ClipImageConfig& cfg) {
  check_image(image, "llava_next_preprocess");
  check(!cfg.grid_pinpoints.empty(), "llava_next_preprocess", "the image processor config has no image_grid_pinpoints");
  // The base size: size's height x width, else shortest_edge squared; the tile side: crop_size's height.
  const int base_h = cfg.resize_h > 0 ? cfg.resize_h : cfg.shortest_edge;
  const int base_w = cfg.resize_w > 0 ? cfg.resize_w : cfg.shortest_edge;
  const int tile = cfg.crop_h;
  check(tile > 0 && base_h > 0 && base_w > 0, "llava_next_preprocess", "tile and base sizes must be positive");
  const auto [best_h, best_w] = select_best_resolution(image.height, image.width, cfg.grid_pinpoints);
  check(best_h % tile == 0 && best_w % tile == 0, "llava_next_preprocess", "image_grid_pinpoints entry [", best_h, ", ",
        best_w, "] is not a multiple of the tile size (crop_size) ", tile);
  const auto [new_h, new_w] = anyres_resize_size(image.height, image.width, int(best_h), int(best_w));
  const Image resized = resize_bicubic(image, new_w, new_h, cfg.backend);

  // Centred zero padding to the best resolution: (target - size) // 2 before, the rest after.
  Image padded;
  padded.height = int(best_h);
  padded.width = int(best_w);
  padded.rgb.assign(size_t(padded.width) * padded.height * 3, 0);
  const int top = (padded.height - new_h) / 2, left = (padded.width - new_w) / 2;
  for (int y = 0; y < new_h; ++y)
    std::memcpy(&padded.rgb[(size_t(y + top) * padded.width + left) * 3], &resized.rgb[size_t(y) * new_w * 3],
                size_t(new_w) * 3);

  std::vector<Image> tiles;
  tiles.push_back(clip_cropped_image(resize_bicubic(image, base_w, base_h, cfg.backend), cfg));
  for (int y0 = 0; y0 < padded.height; y0 += tile)
    for (int x0 = 0; x0 < padded.width; x0 += tile) {
      Image t;
      t.width = t.height = tile;
      t.rgb.resize(size_t(tile) * tile * 3);
      for (int y = 0; y < tile; ++y)
        std::memcpy(&t.rgb[size_t(y) * tile * 3], &padded.rgb[(size_t(y0 + y) * padded.width + x0) * 3], size_t(tile) * 3);
      tiles.push_back(clip_cropped_image(t, cfg));
    }
  return tiles;
}

std::vector<float> llava_next_preprocess(const Image& image, const ClipImageConfig& cfg, int64_t* n_tiles) {
  const std::vector<Image> tiles = llava_next_tiles(image, cfg);
  const Lut lut = make_lut(cfg.backend, cfg.do_rescale, cfg.rescale_factor, cfg.do_normalize, cfg.mean, cfg.std);
  const size_t per_tile = size_t(3) * tiles[0].width * tiles[0].height;
  std::vector<float> out(per_tile * tiles.size());
  for (size_t i = 0; i < tiles.size(); ++i) {
    check(tiles[i].width == tiles[0].width && tiles[i].height == tiles[0].height, "llava_next_preprocess",
          "tiles differ in size (", tiles[i].width, "x", tiles[i].height, " vs ", tiles[0].width, "x", tiles[0].height,
          "): size and crop_size disagree");
    to_planes(tiles[i], lut, out.data() + i * per_tile);
  }
  if (n_tiles) *n_tiles = int64_t(tiles.size());
  return out;
}

}  // namespace mlaforge
