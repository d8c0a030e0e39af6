// Hugging Face image processors, ATen-free: Qwen2-VL (Qwen2VLImageProcessor), CLIP
// (CLIPImageProcessor, used by LLaVA-1.5) and LLaVA-NeXT's anyres tiling (LlavaNextImageProcessor),
// matching transformers 5's two backends.
//
// Backend differences reproduced (transformers 5 image_processing_backends.py):
//   Torchvision (the default backend of AutoImageProcessor when torchvision is installed):
//     resize = torchvision antialiased bicubic on uint8; rescale and normalise fused in float32:
//     (x - mean*(1/rescale)) / (std*(1/rescale)), mean/std products rounded to float32.
//   Pil: resize = Pillow bicubic; rescale = float32(double(x) * rescale_factor), then
//     normalise (x - mean) / std in float32.
// Both give the same values within a few float32 ulps once the resized uint8 images agree.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "vision/image.h"
#include "vision/resize.h"

namespace mlaforge {

// OpenAI CLIP normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
constexpr float kClipMean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
constexpr float kClipStd[3] = {0.26862954f, 0.26130258f, 0.27577711f};

// ---------------------------------------------------------------------------------------------
// Qwen2-VL / Qwen2.5-VL
// ---------------------------------------------------------------------------------------------
struct Qwen2VLImageConfig {
  int64_t min_pixels = 56 * 56, max_pixels = 28 * 28 * 1280;
  int patch_size = 14, temporal_patch_size = 2, merge_size = 2;
  float mean[3] = {kClipMean[0], kClipMean[1], kClipMean[2]};
  float std[3] = {kClipStd[0], kClipStd[1], kClipStd[2]};
  double rescale_factor = 1 / 255.;
  bool do_resize = true, do_rescale = true, do_normalize = true;
  ResizeBackend backend = ResizeBackend::Torchvision;
};

// Reads preprocessor_config.json. Pixel bounds: "size": {"shortest_edge", "longest_edge"}
// (transformers 5; for Qwen these are PIXEL COUNTS) or the older "size": {"min_pixels",
// "max_pixels"}; top-level "min_pixels"/"max_pixels" override "size". Missing keys keep the
// class defaults above. Errors name the file.
// The file holding a checkpoint's image processor settings: preprocessor_config.json, or the
// "image_processor" section of processor_config.json that transformers 5 writes. Both loaders below
// accept either file.
std::string image_processor_config_path(const std::string& dir);

Qwen2VLImageConfig load_qwen2vl_image_config(const std::string& preprocessor_config_json_path);

// transformers' smart_resize -> (height, width), both multiples of `factor`. Python semantics:
// round() halves to even (70/28 = 2.5 -> 2 -> 56). Above max_pixels each side is floored after
// dividing by sqrt(h*w/max) (at least `factor`); below min_pixels each side is ceiled after
// multiplying by sqrt(min/(h*w)). Like transformers 5 (which dropped 4.x's "side < factor"
// error), small sides are accepted; an aspect ratio above 200 or a non-positive size throws Error.
std::pair<int, int> smart_resize(int height, int width, int factor, int64_t min_pixels, int64_t max_pixels);

struct PatchedImage {
  std::vector<float> values;
  int64_t rows = 0, cols = 0;  // [rows, cols] = [t*gh*gw, C*tps*ps*ps]
  int grid_t = 0, grid_h = 0, grid_w = 0;
};

// The uint8 image the processor normalises: smart_resize + bicubic (unchanged if !do_resize).
Image qwen2vl_resized_image(const Image& image, const Qwen2VLImageConfig& cfg);

// Rescale/normalise an already resized image, repeat it to temporal_patch_size frames and flatten:
// reshape(gt, tps, C, gh/m, m, ps, gw/m, m, ps).permute(0,3,6,4,7,2,1,5,8) -> [gt*gh*gw, C*tps*ps*ps].
// The image sides must be multiples of patch_size * merge_size.
PatchedImage qwen2vl_patchify(const Image& resized, const Qwen2VLImageConfig& cfg);

// qwen2vl_patchify(qwen2vl_resized_image(image, cfg), cfg): one image's pixel_values and
// image_grid_thw as Qwen2VLImageProcessor returns them.
PatchedImage qwen2vl_preprocess(const Image& image, const Qwen2VLImageConfig& cfg);

// ---------------------------------------------------------------------------------------------
// CLIP (LLaVA-1.5)
// ---------------------------------------------------------------------------------------------
struct ClipImageConfig {
  int shortest_edge = 336;         // resize so the short side is this (aspect kept) ...
  int resize_h = 0, resize_w = 0;  // ... unless these are set ("size": {"height", "width"})
  int crop_h = 336, crop_w = 336;
  bool do_resize = true, do_center_crop = true, do_rescale = true, do_normalize = true, do_convert_rgb = true;
  float mean[3] = {kClipMean[0], kClipMean[1], kClipMean[2]};
  float std[3] = {kClipStd[0], kClipStd[1], kClipStd[2]};
  double rescale_factor = 1 / 255.;
  ResizeBackend backend = ResizeBackend::Torchvision;
  // LLaVA-NeXT only: "image_grid_pinpoints", the (height, width) resolutions an image may be tiled
  // at; empty when the file has none (LLaVA-1.5).
  std::vector<std::array<int64_t, 2>> grid_pinpoints;
};

// Reads preprocessor_config.json: "size" as {"shortest_edge": N}, {"height", "width"} or an int
// (= shortest edge); "crop_size" as {"height", "width"} or an int; "image_grid_pinpoints" as a list
// of [height, width]. Missing keys take CLIPImageProcessor's defaults (shortest_edge 224, crop
// 224x224, CLIP mean/std, 1/255).
ClipImageConfig load_clip_image_config(const std::string& preprocessor_config_json_path);

// transformers' get_resize_output_image_size(default_to_square=False): the short side becomes
// `shortest_edge`, the long side int(shortest_edge * long / short) (truncated). Returns (h, w).
std::pair<int, int> clip_resize_size(int height, int width, const ClipImageConfig& cfg);

// The uint8 image the processor normalises: resize (bicubic) then centre crop. The crop starts at
// ((h - crop_h) // 2, (w - crop_w) // 2); a crop larger than the image pads with zeros (the
// backends place the image differently when the padding is odd; both are reproduced).
Image clip_cropped_image(const Image& image, const ClipImageConfig& cfg);

// pixel_values of one image: [3, H, W] channel-first floats, H x W = the crop size (or the resized
// size when do_center_crop is false).
std::vector<float> clip_preprocess(const Image& image, const ClipImageConfig& cfg);

// ---------------------------------------------------------------------------------------------
// LLaVA-NeXT (anyres)
// ---------------------------------------------------------------------------------------------
// transformers' select_best_resolution: of the (height, width) pinpoints, the one keeping the most
// of the image's pixels when it is scaled to fit (effective = min(int(w*s) * int(h*s), w*h),
// s = min(pw/w, ph/h)); ties go to the one wasting the fewest pixels, then to the first listed.
std::pair<int64_t, int64_t> select_best_resolution(int64_t height, int64_t width,
                                                   const std::vector<std::array<int64_t, 2>>& pinpoints);

// transformers' get_patch_output_size: the aspect-preserving size (h, w) that fits the target; the
// side that limits the scale becomes the target's, the other ceil(side * scale) (at most the target's).
std::pair<int, int> anyres_resize_size(int height, int width, int target_h, int target_w);

// transformers' unpad_image applied to a feature grid of grid_h x grid_w cells covering the padded
// best resolution: the rows (or columns) the centred padding took are cut, with its rounding
// (int(round(side * scale, 7)), the padding (grid - side) // 2 taken off both ends). Returns the
// (rows, cols) that remain for an original image of height x width.
std::pair<int64_t, int64_t> anyres_unpadded_grid(int64_t height, int64_t width, int64_t grid_h, int64_t grid_w);

// Image tokens one image of height x width becomes (LlavaNextProcessor's _get_number_of_features
// with the CLS token dropped): the base tile's (tile/patch)^2, then the unpadded grid of the best
// resolution's tiles, each of its rows followed by one newline token.
int64_t llava_next_image_tokens(int64_t height, int64_t width, const std::vector<std::array<int64_t, 2>>& pinpoints,
                                int64_t tile_size, int64_t patch_size);

// The uint8 tiles LlavaNextImageProcessor normalises, in its order: the whole image resized to the
// base size (size's height x width, or shortest_edge squared, aspect not kept), then the tiles of
// the best resolution, row-major. The image is resized keeping its aspect to fit the best
// resolution and padded with zeros (black, before normalisation) centred, the odd pixel after; tiles
// are crop_size squares; each tile then goes through clip_cropped_image (resize, centre crop).
std::vector<Image> llava_next_tiles(const Image& image, const ClipImageConfig& cfg);

// pixel_values of one image: [tiles, 3, S, S] (S = crop size), the tiles of llava_next_tiles
// normalised; the processor's image_sizes entry is the original (height, width).
std::vector<float> llava_next_preprocess(const Image& image, const ClipImageConfig& cfg, int64_t* tiles);

}  // namespace mlaforge
