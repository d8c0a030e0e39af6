// Image decoding: PNG (libpng) and JPEG (libjpeg-turbo) into 8-bit RGB, the way Pillow's
// Image.open(path).convert("RGB") sees the file (that is what Hugging Face processors receive).
//
// Pillow's conversions reproduced here:
//   - alpha is dropped, never composited (grey+alpha, RGBA, palette with tRNS);
//   - 16-bit RGB / RGBA / grey+alpha PNGs keep the high byte of each sample;
//   - 16-bit grey PNGs (Pillow mode "I;16"/"I") clamp the value to 255 (0x0123 -> 255, 0x00ab -> 0xab);
//   - 1/2/4-bit grey scale to 0..255 (x255, x85, x17); palettes are looked up;
//   - grey JPEGs replicate the channel; CMYK/YCCK JPEGs are read as Adobe-inverted CMYK and
//     converted with Pillow's cmyk2rgb; JPEGs decode with libjpeg's defaults (JDCT_ISLOW, fancy
//     upsampling), as Pillow does.
// Gamma, colour profiles and EXIF orientation are ignored, as Image.open() ignores them.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace mlaforge {

struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // HWC, 3 channels, row-major: rgb[(y * width + x) * 3 + c]
};

// Reads and decodes a PNG or JPEG file; the format is taken from the magic bytes, not the name.
// Every failure (missing, unreadable, empty, truncated, corrupt, unsupported or too large) throws
// mlaforge::Error "<path>: <problem>".
Image load_image(const std::string& path);

// The same on bytes already in memory; `name` is what error messages call them.
Image decode_image(const uint8_t* data, size_t size, const std::string& name);

}  // namespace mlaforge
