// Image decoding, bicubic resizing and the Qwen2-VL / CLIP processors (src/vision).
//
// Reference values: the resize goldens below come from Pillow 9.4 (Image.resize BICUBIC) and from
// this implementation's torchvision mode, which matched torchvision 0.26 / torch 2.11 bit for bit
// on 104 size pairs; the smart_resize table from transformers 5's smart_resize run in Python.
// tests/fixtures/preprocess/ (tools/make_fixtures.py, transformers 5.17) is checked when present.
#include <gtest/gtest.h>
#include <jpeglib.h>
#include <png.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"
#include "test_paths.h"
#include "vision/image.h"
#include "vision/preprocess.h"
#include "vision/resize.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace mlaforge;

namespace {

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "mlaforge_preprocess_XXXXXX").string();
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back(0);
    if (!mkdtemp(buf.data())) throw std::runtime_error("mkdtemp failed");
    path_ = buf.data();
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (fs::path(path_) / name).string(); }

 private:
  std::string path_;
};

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
}

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  f << text;
}

struct PngSpec {
  int width = 0, height = 0, color_type = PNG_COLOR_TYPE_RGB, bit_depth = 8;
  bool interlace = false;
  std::vector<uint8_t> data;  // packed rows as the PNG stores them (16-bit samples big-endian)
  std::vector<png_color> palette;
  std::vector<uint8_t> trns;  // palette alpha
};

// A small libpng encoder for the tests.
bool write_png(const std::string& path, const PngSpec& s) {
  FILE* fp = std::fopen(path.c_str(), "wb");
  if (!fp) return false;
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png_create_info_struct(png);
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    std::fclose(fp);
    return false;
  }
  png_init_io(png, fp);
  png_set_IHDR(png, info, s.width, s.height, s.bit_depth, s.color_type,
               s.interlace ? PNG_INTERLACE_ADAM7 : PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
               PNG_FILTER_TYPE_DEFAULT);
  if (!s.palette.empty()) png_set_PLTE(png, info, s.palette.data(), int(s.palette.size()));
  if (!s.trns.empty()) png_set_tRNS(png, info, s.trns.data(), int(s.trns.size()), nullptr);
  png_write_info(png, info);
  const size_t stride = s.data.size() / size_t(s.height);
  std::vector<png_bytep> rows(s.height);
  for (int y = 0; y < s.height; ++y) rows[y] = const_cast<uint8_t*>(s.data.data()) + size_t(y) * stride;
  png_write_image(png, rows.data());
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  std::fclose(fp);
  return true;
}

// A small libjpeg encoder (default error handler: a failure here exits, which only a broken test can cause).
void write_jpeg(const std::string& path, int width, int height, int components, J_COLOR_SPACE space,
                const std::vector<uint8_t>& data, int quality) {
  jpeg_compress_struct c;
  jpeg_error_mgr err;
  c.err = jpeg_std_error(&err);
  jpeg_create_compress(&c);
  FILE* fp = std::fopen(path.c_str(), "wb");
  ASSERT_NE(fp, nullptr);
  jpeg_stdio_dest(&c, fp);
  c.image_width = width;
  c.image_height = height;
  c.input_components = components;
  c.in_color_space = space;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, quality, TRUE);
  for (int i = 0; i < c.num_components; ++i) c.comp_info[i].h_samp_factor = c.comp_info[i].v_samp_factor = 1;
  jpeg_start_compress(&c, TRUE);
  while (c.next_scanline < c.image_height) {
    JSAMPROW row = const_cast<uint8_t*>(data.data()) + size_t(c.next_scanline) * width * components;
    jpeg_write_scanlines(&c, &row, 1);
  }
  jpeg_finish_compress(&c);
  jpeg_destroy_compress(&c);
  std::fclose(fp);
}

// Deterministic bytes (the LCG the golden generator used).
std::vector<uint8_t> lcg_bytes(size_t n, uint64_t seed = 12345) {
  std::vector<uint8_t> out(n);
  uint64_t x = seed;
  for (size_t i = 0; i < n; ++i) {
    x = (x * 1103515245 + 12345) % (uint64_t(1) << 31);
    out[i] = uint8_t((x >> 16) & 255);
  }
  return out;
}

Image make_image(int w, int h, const std::vector<uint8_t>& rgb) {
  Image img;
  img.width = w;
  img.height = h;
  img.rgb = rgb;
  return img;
}

Image constant_image(int w, int h, uint8_t r, uint8_t g, uint8_t b) {
  Image img;
  img.width = w;
  img.height = h;
  img.rgb.resize(size_t(w) * h * 3);
  for (size_t i = 0; i < size_t(w) * h; ++i) {
    img.rgb[3 * i] = r;
    img.rgb[3 * i + 1] = g;
    img.rgb[3 * i + 2] = b;
  }
  return img;
}

// Runs fn, expects mlaforge::Error whose message names `path` and contains `needle`.
void expect_error(const std::function<void()>& fn, const std::string& path, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no Error thrown for " << path;
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << "message does not name the file: " << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << "message lacks '" << needle << "': " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "message is not one line: " << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type for " << path << ": " << e.what();
  }
}

int max_abs_diff(const Image& a, const Image& b) {
  if (a.width != b.width || a.height != b.height || a.rgb.size() != b.rgb.size()) return 1 << 20;
  int m = 0;
  for (size_t i = 0; i < a.rgb.size(); ++i) m = std::max(m, std::abs(int(a.rgb[i]) - int(b.rgb[i])));
  return m;
}

std::string shapes_image_dir() {
  for (const std::string& d : {std::string(MLAFORGE_SOURCE_DIR) + "/../shared/data/shapes/images/eval",
                               std::string(MLAFORGE_SOURCE_DIR) + "/shared/data/shapes/images/eval",
                               std::string("/work/shared/data/shapes/images/eval")}) {
    if (fs::exists(d + "/00000.png")) return d;
  }
  return "";
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------
TEST(ImageDecode, PngRgbAndRgbaRoundTrip) {
  TempDir tmp;
  const int w = 13, h = 7;
  const std::vector<uint8_t> rgb = lcg_bytes(size_t(w) * h * 3, 1);
  PngSpec s{w, h, PNG_COLOR_TYPE_RGB, 8, false, rgb, {}, {}};
  ASSERT_TRUE(write_png(tmp.file("rgb.png"), s));
  const Image a = load_image(tmp.file("rgb.png"));
  EXPECT_EQ(a.width, w);
  EXPECT_EQ(a.height, h);
  EXPECT_EQ(a.rgb, rgb);

  // RGBA: alpha is dropped, not composited (Pillow's convert("RGB")).
  std::vector<uint8_t> rgba;
  const std::vector<uint8_t> alpha = lcg_bytes(size_t(w) * h, 2);
  for (size_t i = 0; i < size_t(w) * h; ++i) {
    rgba.insert(rgba.end(), {rgb[3 * i], rgb[3 * i + 1], rgb[3 * i + 2], alpha[i]});
  }
  ASSERT_TRUE(write_png(tmp.file("rgba.png"), PngSpec{w, h, PNG_COLOR_TYPE_RGBA, 8, false, rgba, {}, {}}));
  EXPECT_EQ(load_image(tmp.file("rgba.png")).rgb, rgb);

  // Interlaced (Adam7).
  s.interlace = true;
  ASSERT_TRUE(write_png(tmp.file("interlaced.png"), s));
  EXPECT_EQ(load_image(tmp.file("interlaced.png")).rgb, rgb);

  // The format comes from the magic bytes, not the name.
  fs::copy_file(tmp.file("rgb.png"), tmp.file("actually_png.jpg"));
  EXPECT_EQ(load_image(tmp.file("actually_png.jpg")).rgb, rgb);
}

TEST(ImageDecode, PngGreyVariants) {
  TempDir tmp;
  const int w = 9, h = 4;
  const std::vector<uint8_t> grey = lcg_bytes(size_t(w) * h, 3);
  auto replicated = [](const std::vector<uint8_t>& g) {
    std::vector<uint8_t> out;
    for (uint8_t v : g) out.insert(out.end(), {v, v, v});
    return out;
  };
  ASSERT_TRUE(write_png(tmp.file("l.png"), PngSpec{w, h, PNG_COLOR_TYPE_GRAY, 8, false, grey, {}, {}}));
  EXPECT_EQ(load_image(tmp.file("l.png")).rgb, replicated(grey));

  std::vector<uint8_t> la;
  for (size_t i = 0; i < grey.size(); ++i) la.insert(la.end(), {grey[i], uint8_t(255 - grey[i])});
  ASSERT_TRUE(write_png(tmp.file("la.png"), PngSpec{w, h, PNG_COLOR_TYPE_GRAY_ALPHA, 8, false, la, {}, {}}));
  EXPECT_EQ(load_image(tmp.file("la.png")).rgb, replicated(grey));

  // 1/2/4-bit grey scale to 0..255 as Pillow's "1", "L;2", "L;4" unpackers do.
  // One row of 8 pixels: 1-bit 0b10110010; 2-bit values 0,1,2,3,3,2,1,0; 4-bit 0,1,...,15 (16 px).
  ASSERT_TRUE(write_png(tmp.file("g1.png"), PngSpec{8, 1, PNG_COLOR_TYPE_GRAY, 1, false, {0xb2}, {}, {}}));
  EXPECT_EQ(load_image(tmp.file("g1.png")).rgb,
            replicated({255, 0, 255, 255, 0, 0, 255, 0}));
  ASSERT_TRUE(write_png(tmp.file("g2.png"), PngSpec{8, 1, PNG_COLOR_TYPE_GRAY, 2, false, {0x1b, 0xe4}, {}, {}}));
  EXPECT_EQ(load_image(tmp.file("g2.png")).rgb, replicated({0, 85, 170, 255, 255, 170, 85, 0}));
  std::vector<uint8_t> g4_row, g4_expect;
  for (int i = 0; i < 16; i += 2) g4_row.push_back(uint8_t(i << 4 | (i + 1)));
  for (int i = 0; i < 16; ++i) g4_expect.push_back(uint8_t(i * 17));
  ASSERT_TRUE(write_png(tmp.file("g4.png"), PngSpec{16, 1, PNG_COLOR_TYPE_GRAY, 4, false, g4_row, {}, {}}));
  EXPECT_EQ(load_image(tmp.file("g4.png")).rgb, replicated(g4_expect));
}

TEST(ImageDecode, Png16Bit) {
  TempDir tmp;
  // RGB 16: the high byte of each sample ("RGB;16B").
  const std::vector<uint8_t> rgb16 = {0x12, 0x34, 0xab, 0xff, 0x00, 0x80, 0xff, 0xff, 0x7f, 0x01, 0x00, 0x00};
  ASSERT_TRUE(write_png(tmp.file("rgb16.png"), PngSpec{2, 1, PNG_COLOR_TYPE_RGB, 16, false, rgb16, {}, {}}));
  EXPECT_EQ(load_image(tmp.file("rgb16.png")).rgb, (std::vector<uint8_t>{0x12, 0xab, 0x00, 0xff, 0x7f, 0x00}));

  // RGBA 16 and grey+alpha 16: high bytes, alpha dropped.
  const std::vector<uint8_t> rgba16 = {0x12, 0x34, 0xab, 0xff, 0x00, 0x80, 0x55, 0x55};
  ASSERT_TRUE(write_png(tmp.file("rgba16.png"), PngSpec{1, 1, PNG_COLOR_TYPE_RGBA, 16, false, rgba16, {}, {}}));
  EXPECT_EQ(load_image(tmp.file("rgba16.png")).rgb, (std::vector<uint8_t>{0x12, 0xab, 0x00}));
  const std::vector<uint8_t> la16 = {0x9a, 0xbc, 0x00, 0x10};
  ASSERT_TRUE(write_png(tmp.file("la16.png"), PngSpec{1, 1, PNG_COLOR_TYPE_GRAY_ALPHA, 16, false, la16, {}, {}}));
  EXPECT_EQ(load_image(tmp.file("la16.png")).rgb, (std::vector<uint8_t>{0x9a, 0x9a, 0x9a}));

  // Grey 16 is Pillow's "I;16": converting to RGB clamps the value to 255 (not the high byte).
  const std::vector<uint8_t> g16 = {0x00, 0x12, 0x00, 0xff, 0x01, 0x00, 0xab, 0xcd};
  ASSERT_TRUE(write_png(tmp.file("g16.png"), PngSpec{4, 1, PNG_COLOR_TYPE_GRAY, 16, false, g16, {}, {}}));
  EXPECT_EQ(load_image(tmp.file("g16.png")).rgb,
            (std::vector<uint8_t>{0x12, 0x12, 0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}));
}

TEST(ImageDecode, PngPaletteWithTransparency) {
  TempDir tmp;
  PngSpec s;
  s.width = 4;
  s.height = 2;
  s.color_type = PNG_COLOR_TYPE_PALETTE;
  s.bit_depth = 4;
  s.palette = {{10, 20, 30}, {200, 100, 0}, {1, 2, 3}, {255, 255, 255}};
  s.trns = {0, 128};                // entry 0 fully transparent, 1 half: ignored by convert("RGB")
  s.data = {0x01, 0x23, 0x32, 0x10};  // indices 0,1,2,3 / 3,2,1,0
  ASSERT_TRUE(write_png(tmp.file("p.png"), s));
  const Image img = load_image(tmp.file("p.png"));
  EXPECT_EQ(img.rgb, (std::vector<uint8_t>{10, 20, 30, 200, 100, 0, 1, 2, 3, 255, 255, 255,  //
                                           255, 255, 255, 1, 2, 3, 200, 100, 0, 10, 20, 30}));
}

TEST(ImageDecode, JpegRgbGreyCmyk) {
  TempDir tmp;
  const int w = 16, h = 16;
  // Constant colours survive JPEG (4:4:4, quality 100) within a grey level or two.
  ASSERT_NO_FATAL_FAILURE(write_jpeg(tmp.file("rgb.jpg"), w, h, 3, JCS_RGB, constant_image(w, h, 200, 40, 90).rgb, 100));
  const Image rgb = load_image(tmp.file("rgb.jpg"));
  ASSERT_EQ(rgb.width, w);
  ASSERT_EQ(rgb.height, h);
  EXPECT_LE(max_abs_diff(rgb, constant_image(w, h, 200, 40, 90)), 2);

  std::vector<uint8_t> grey(size_t(w) * h);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) grey[size_t(y) * w + x] = uint8_t(x * 16);
  ASSERT_NO_FATAL_FAILURE(write_jpeg(tmp.file("grey.jpg"), w, h, 1, JCS_GRAYSCALE, grey, 95));
  const Image g = load_image(tmp.file("grey.jpg"));
  ASSERT_EQ(g.rgb.size(), size_t(w) * h * 3);
  int worst = 0;
  for (size_t i = 0; i < size_t(w) * h; ++i) {
    EXPECT_EQ(g.rgb[3 * i], g.rgb[3 * i + 1]);
    EXPECT_EQ(g.rgb[3 * i], g.rgb[3 * i + 2]);
    worst = std::max(worst, std::abs(int(g.rgb[3 * i]) - int(grey[i])));
  }
  EXPECT_LE(worst, 6);

  // CMYK: Pillow reads it as inverted ("CMYK;I") and converts with cmyk2rgb.
  const uint8_t C = 10, M = 200, Y = 60, K = 100;
  std::vector<uint8_t> cmyk;
  for (int i = 0; i < w * h; ++i) cmyk.insert(cmyk.end(), {C, M, Y, K});
  ASSERT_NO_FATAL_FAILURE(write_jpeg(tmp.file("cmyk.jpg"), w, h, 4, JCS_CMYK, cmyk, 100));
  auto muldiv255 = [](int a, int b) {
    const int t = a * b + 128;
    return ((t >> 8) + t) >> 8;
  };
  const int nk = K;
  const Image expect = constant_image(w, h, uint8_t(nk - muldiv255(255 - C, nk)), uint8_t(nk - muldiv255(255 - M, nk)),
                                      uint8_t(nk - muldiv255(255 - Y, nk)));
  EXPECT_LE(max_abs_diff(load_image(tmp.file("cmyk.jpg")), expect), 2);
}

TEST(ImageDecode, RealShapesImage) {
  const std::string dir = shapes_image_dir();
  if (dir.empty()) GTEST_SKIP() << "shapes eval images not found";
  const Image img = load_image(dir + "/00000.png");
  EXPECT_EQ(img.width, 224);
  EXPECT_EQ(img.height, 224);
  EXPECT_EQ(img.rgb.size(), size_t(224) * 224 * 3);
}

TEST(ImageDecode, ErrorsNameTheFile) {
  TempDir tmp;
  const std::string missing = tmp.file("missing.png");
  expect_error([&] { load_image(missing); }, missing, "No such file");

  const std::string empty = tmp.file("empty.png");
  write_bytes(empty, {});
  expect_error([&] { load_image(empty); }, empty, "empty");

  const std::string random = tmp.file("random.png");
  write_bytes(random, lcg_bytes(1000, 7));
  expect_error([&] { load_image(random); }, random, "not a PNG or JPEG");

  const std::string gif = tmp.file("image.gif");
  write_bytes(gif, {'G', 'I', 'F', '8', '9', 'a', 1, 0, 1, 0, 0, 0, 0});
  expect_error([&] { load_image(gif); }, gif, "unsupported image format (GIF)");

  expect_error([&] { load_image(tmp.file("")); }, tmp.file(""), "directory");

  // PNG: signature only; truncated at half; corrupted image data (CRC mismatch).
  const int w = 40, h = 30;
  ASSERT_TRUE(write_png(tmp.file("good.png"), PngSpec{w, h, PNG_COLOR_TYPE_RGB, 8, false, lcg_bytes(w * h * 3, 9), {}, {}}));
  const std::vector<uint8_t> png = read_bytes(tmp.file("good.png"));
  const std::string sig = tmp.file("signature_only.png");
  write_bytes(sig, std::vector<uint8_t>(png.begin(), png.begin() + 8));
  expect_error([&] { load_image(sig); }, sig, "PNG");
  const std::string trunc = tmp.file("truncated.png");
  write_bytes(trunc, std::vector<uint8_t>(png.begin(), png.begin() + png.size() / 2));
  expect_error([&] { load_image(trunc); }, trunc, "truncated");
  std::vector<uint8_t> bad = png;
  for (size_t i = bad.size() / 2; i < bad.size() / 2 + 16; ++i) bad[i] ^= 0x5a;
  const std::string corrupt = tmp.file("corrupt.png");
  write_bytes(corrupt, bad);
  expect_error([&] { load_image(corrupt); }, corrupt, "PNG");

  // JPEG: SOI only; truncated at half; garbage after SOI.
  ASSERT_NO_FATAL_FAILURE(write_jpeg(tmp.file("good.jpg"), w, h, 3, JCS_RGB, lcg_bytes(w * h * 3, 10), 90));
  const std::vector<uint8_t> jpg = read_bytes(tmp.file("good.jpg"));
  EXPECT_NO_THROW(load_image(tmp.file("good.jpg")));
  const std::string soi = tmp.file("soi_only.jpg");
  write_bytes(soi, {0xff, 0xd8, 0xff});
  expect_error([&] { load_image(soi); }, soi, "JPEG");
  const std::string jtrunc = tmp.file("truncated.jpg");
  write_bytes(jtrunc, std::vector<uint8_t>(jpg.begin(), jpg.begin() + jpg.size() / 2));
  expect_error([&] { load_image(jtrunc); }, jtrunc, "corrupt or truncated JPEG");
  std::vector<uint8_t> jgarbage = {0xff, 0xd8, 0xff};
  const std::vector<uint8_t> noise = lcg_bytes(500, 11);
  jgarbage.insert(jgarbage.end(), noise.begin(), noise.end());
  const std::string jcorrupt = tmp.file("garbage.jpg");
  write_bytes(jcorrupt, jgarbage);
  expect_error([&] { load_image(jcorrupt); }, jcorrupt, "JPEG");
}

// ---------------------------------------------------------------------------------------------
// Resizing
// ---------------------------------------------------------------------------------------------
struct ResizeGolden {
  int w, h;
  std::vector<uint8_t> pil, torchvision;
};

// 7x5 input = lcg_bytes(105); outputs from Pillow (Image.BICUBIC) and torchvision (antialias=True).
const std::vector<ResizeGolden>& resize_goldens() {
  static const std::vector<ResizeGolden> g = {
      {4, 3, {120, 46, 136, 113, 72, 117, 106, 103, 97, 196, 51, 165, 104, 182, 82, 99, 111, 108,
              153, 52, 180, 100, 131, 138, 164, 148, 128, 136, 63, 151, 100, 132, 179, 166, 175, 152},
       {120, 46, 136, 113, 72, 117, 106, 103, 97, 196, 51, 165, 104, 182, 82, 99, 111, 108,
        153, 52, 180, 100, 131, 138, 164, 148, 128, 136, 63, 151, 100, 132, 179, 166, 175, 152}},
      {11, 6,
       {231, 0,   96,  214, 9,   129, 163, 36,  180, 41,  73,  230, 91,  128, 163, 236, 176, 24,  99,  124,
        0,   27,  99,  28,  97,  124, 94,  199, 62,  202, 255, 9,   255, 55,  142, 95,  54,  74,  141, 66,
        0,   174, 134, 16,  65,  131, 57,  45,  78,  95,  106, 71,  78,  172, 115, 79,  195, 200, 106, 160,
        213, 41,  138, 205, 0,   124, 132, 241, 62,  69,  188, 87,  17,  120, 118, 137, 128, 121, 154, 100,
        88,  100, 44,  53,  178, 16,  158, 211, 17,  228, 158, 49,  215, 122, 120, 118, 103, 163, 45,  255,
        169, 90,  144, 196, 56,  13,  218, 45,  105, 174, 176, 121, 115, 166, 80,  62,  65,  169, 66,  147,
        188, 76,  220, 96,  83,  232, 50,  165, 137, 32,  222, 60,  222, 79,  182, 163, 135, 99,  81,  183,
        24,  122, 78,  150, 101, 46,  183, 39,  89,  147, 53,  144, 204, 92,  186, 229, 136, 198, 196, 112,
        154, 150, 86,  117, 121, 90,  182, 237, 161, 166, 157, 237, 123, 82,  174, 26,  204, 178, 7,   193,
        218, 53,  91,  88,  70,  163, 74,  134, 188, 226, 242, 122, 255, 189, 140, 255, 126, 165},
       {231, 0,   96,  214, 9,   129, 163, 36,  180, 41,  73,  230, 91,  128, 163, 236, 176, 24,  99,  124,
        0,   26,  99,  28,  97,  124, 94,  199, 62,  202, 255, 9,   255, 55,  142, 95,  54,  74,  141, 66,
        0,   174, 134, 16,  65,  131, 57,  45,  78,  95,  106, 71,  78,  172, 115, 79,  195, 200, 106, 160,
        213, 41,  138, 205, 0,   124, 132, 241, 62,  69,  188, 87,  17,  120, 118, 137, 128, 121, 154, 100,
        88,  100, 44,  53,  178, 16,  158, 211, 17,  228, 158, 49,  215, 122, 120, 118, 103, 164, 45,  255,
        169, 90,  144, 196, 56,  13,  218, 45,  105, 174, 176, 121, 115, 166, 80,  62,  65,  169, 66,  147,
        188, 76,  220, 96,  83,  232, 50,  165, 137, 32,  222, 60,  222, 79,  182, 163, 135, 99,  81,  183,
        24,  122, 78,  150, 101, 46,  183, 39,  89,  147, 53,  144, 204, 92,  186, 229, 136, 198, 196, 112,
        154, 150, 86,  117, 121, 90,  182, 237, 161, 166, 157, 237, 123, 82,  174, 26,  204, 178, 7,   193,
        218, 53,  91,  88,  70,  163, 74,  134, 188, 226, 242, 122, 255, 189, 140, 255, 126, 165}},
      {7, 2, {141, 128, 86, 69, 63, 147, 119, 88, 123, 124, 100, 65, 121, 61, 151, 151, 90, 166, 172, 68, 136,
              185, 154, 153, 96, 179, 47, 146, 71, 197, 101, 64, 101, 118, 108, 217, 153, 166, 185, 116, 159, 109},
       {141, 128, 86, 69, 63, 147, 119, 88, 123, 124, 100, 65, 121, 61, 151, 151, 90, 166, 172, 68, 136,
        185, 154, 153, 96, 179, 47, 146, 71, 197, 101, 64, 101, 118, 108, 217, 153, 166, 185, 116, 159, 109}},
      {3, 5, {164, 31, 160, 110, 129, 79, 151, 77, 141, 56, 73, 104, 104, 52, 128, 187, 56, 162, 110, 219, 90, 166, 65,
              124, 116, 110, 150, 137, 126, 90, 59, 118, 179, 81, 160, 180, 172, 123, 162, 153, 58, 155, 201, 178, 150},
       {164, 31, 160, 110, 129, 79, 151, 77, 141, 56, 73, 104, 104, 52, 128, 187, 56, 162, 110, 219, 90, 166, 65,
        124, 116, 110, 150, 137, 126, 91, 59, 118, 179, 81, 160, 180, 172, 123, 162, 153, 58, 155, 201, 178, 150}},
  };
  return g;
}

TEST(Resize, MatchesPillowAndTorchvisionGoldens) {
  const Image src = make_image(7, 5, lcg_bytes(7 * 5 * 3));
  for (const ResizeGolden& g : resize_goldens()) {
    const Image pil = resize_bicubic(src, g.w, g.h, ResizeBackend::Pil);
    const Image tv = resize_bicubic(src, g.w, g.h, ResizeBackend::Torchvision);
    EXPECT_EQ(pil.width, g.w);
    EXPECT_EQ(pil.height, g.h);
    EXPECT_EQ(pil.rgb, g.pil) << "pil " << g.w << "x" << g.h;
    EXPECT_EQ(tv.rgb, g.torchvision) << "torchvision " << g.w << "x" << g.h;
  }
}

TEST(Resize, IdentityIsAnExactCopy) {
  const Image src = make_image(31, 17, lcg_bytes(31 * 17 * 3, 5));
  for (ResizeBackend b : {ResizeBackend::Pil, ResizeBackend::Torchvision}) {
    const Image out = resize_bicubic(src, 31, 17, b);
    EXPECT_EQ(out.width, 31);
    EXPECT_EQ(out.height, 17);
    EXPECT_EQ(out.rgb, src.rgb);
  }
}

TEST(Resize, ConstantImageStaysConstant) {
  for (ResizeBackend b : {ResizeBackend::Pil, ResizeBackend::Torchvision}) {
    for (auto [w, h] : std::vector<std::pair<int, int>>{{224, 224}, {5, 3}, {1, 1}, {300, 7}, {37, 23}, {37, 400}}) {
      const Image out = resize_bicubic(constant_image(37, 23, 0, 128, 255), w, h, b);
      EXPECT_EQ(max_abs_diff(out, constant_image(w, h, 0, 128, 255)), 0) << backend_name(b) << " " << w << "x" << h;
    }
  }
}

TEST(Resize, BackendsAgreeWithinOneGreyLevel) {
  const Image src = make_image(97, 61, lcg_bytes(97 * 61 * 3, 6));
  for (auto [w, h] : std::vector<std::pair<int, int>>{{224, 224}, {40, 30}, {97, 200}, {13, 61}, {300, 20}}) {
    const Image a = resize_bicubic(src, w, h, ResizeBackend::Pil);
    const Image b = resize_bicubic(src, w, h, ResizeBackend::Torchvision);
    EXPECT_LE(max_abs_diff(a, b), 1) << w << "x" << h;
  }
}

TEST(Resize, RejectsBadSizes) {
  const Image src = constant_image(4, 4, 1, 2, 3);
  EXPECT_THROW(resize_bicubic(src, 0, 4), Error);
  EXPECT_THROW(resize_bicubic(src, 4, -1), Error);
  EXPECT_THROW(resize_bicubic(Image{}, 4, 4), Error);
}

// ---------------------------------------------------------------------------------------------
// smart_resize
// ---------------------------------------------------------------------------------------------
TEST(SmartResize, MatchesTransformers) {
  struct Case {
    int h, w;
    int64_t min_px, max_px;
    int out_h, out_w;
  };
  // transformers 5's smart_resize (factor 28), evaluated in Python.
  const std::vector<Case> cases = {
      {224, 224, 3136, 1003520, 224, 224},   {70, 100, 3136, 1003520, 56, 112},  // 70/28 = 2.5 -> 2
      {126, 126, 3136, 1003520, 112, 112},   {70, 70, 3136, 1003520, 56, 56},    // 4.5 -> 4; area == min
      {98, 98, 3136, 1003520, 112, 112},     {42, 42, 3136, 1003520, 56, 56},    // 3.5 -> 4, 1.5 -> 2
      {10, 10, 3136, 1003520, 56, 56},       {20, 20, 3136, 1003520, 56, 56},    // below factor: accepted
      {28, 60, 3136, 65536, 56, 84},         {17, 5, 3136, 65536, 112, 56},
      {5, 17, 3136, 65536, 56, 112},         {2000, 3000, 3136, 1003520, 812, 1204},
      {480, 640, 3136, 65536, 196, 280},     {720, 1280, 3136, 65536, 168, 336},
      {37, 1000, 3136, 65536, 28, 1008},     {30, 5900, 3136, 3136, 28, 784},    // floor to 0 -> factor
      {1080, 1920, 3136, 12845056, 1092, 1932}, {4000, 3000, 3136, 12845056, 4004, 2996},
      {250, 333, 50176, 50176, 168, 252},    {70, 100, 50176, 50176, 196, 280},
      {224, 224, 50176, 50176, 224, 224},    {1, 1, 3136, 1003520, 56, 56},
      {1, 200, 3136, 1003520, 28, 812},      {7, 1400, 3136, 1003520, 28, 812},
      {999, 1001, 3136, 1003520, 980, 980},  {10, 2000, 3136, 1003520, 28, 812},  // ratio exactly 200
  };
  for (const Case& c : cases) {
    const auto [h, w] = smart_resize(c.h, c.w, 28, c.min_px, c.max_px);
    EXPECT_EQ(h, c.out_h) << c.h << "x" << c.w << " min " << c.min_px << " max " << c.max_px;
    EXPECT_EQ(w, c.out_w) << c.h << "x" << c.w << " min " << c.min_px << " max " << c.max_px;
  }
}

TEST(SmartResize, Errors) {
  EXPECT_THROW(smart_resize(28, 28 * 201, 28, 3136, 1003520), Error);  // aspect ratio > 200
  EXPECT_THROW(smart_resize(2001, 10, 28, 3136, 1003520), Error);
  EXPECT_THROW(smart_resize(0, 100, 28, 3136, 1003520), Error);
  EXPECT_THROW(smart_resize(100, -3, 28, 3136, 1003520), Error);
  EXPECT_THROW(smart_resize(14, 42, 28, 0, 1003520), Error);  // transformers would return height 0
  EXPECT_THROW(smart_resize(100, 100, 28, 3136, 0), Error);
  try {
    smart_resize(28, 28 * 201, 28, 3136, 1003520);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("aspect ratio"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// Qwen2-VL
// ---------------------------------------------------------------------------------------------
TEST(Qwen2VL, PatchOrderFollowsTransformersPermute) {
  // Pixel bytes encode their position; with rescale and normalise off the values are the bytes.
  const int H = 56, W = 84;
  Image img;
  img.width = W;
  img.height = H;
  img.rgb.resize(size_t(W) * H * 3);
  auto byte_at = [&](int y, int x, int c) { return uint8_t((y * 7 + x * 3 + c * 50) % 256); };
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W; ++x)
      for (int c = 0; c < 3; ++c) img.rgb[(size_t(y) * W + x) * 3 + c] = byte_at(y, x, c);
  for (int merge : {2, 1}) {
    Qwen2VLImageConfig cfg;
    cfg.do_resize = cfg.do_rescale = cfg.do_normalize = false;
    cfg.merge_size = merge;
    const PatchedImage p = qwen2vl_preprocess(img, cfg);
    const int ps = 14, tps = 2, m = merge, gh = H / ps, gw = W / ps;
    ASSERT_EQ(p.grid_t, 1);
    ASSERT_EQ(p.grid_h, gh);
    ASSERT_EQ(p.grid_w, gw);
    ASSERT_EQ(p.rows, gh * gw);
    ASSERT_EQ(p.cols, 3 * tps * ps * ps);
    ASSERT_EQ(p.values.size(), size_t(p.rows * p.cols));
    // Output index (t, bh, bw, mh, mw, c, tp, py, px) of
    // reshape(gt, tps, C, gh/m, m, ps, gw/m, m, ps).permute(0, 3, 6, 4, 7, 2, 1, 5, 8).
    size_t i = 0, bad = 0;
    for (int bh = 0; bh < gh / m; ++bh)
      for (int bw = 0; bw < gw / m; ++bw)
        for (int mh = 0; mh < m; ++mh)
          for (int mw = 0; mw < m; ++mw)
            for (int c = 0; c < 3; ++c)
              for (int tp = 0; tp < tps; ++tp)
                for (int py = 0; py < ps; ++py)
                  for (int px = 0; px < ps; ++px, ++i) {
                    const int y = (bh * m + mh) * ps + py, x = (bw * m + mw) * ps + px;
                    bad += p.values[i] != float(byte_at(y, x, c));
                  }
    EXPECT_EQ(i, p.values.size());
    EXPECT_EQ(bad, 0u) << "merge_size " << merge;
  }
}

TEST(Qwen2VL, NormalisationPerBackend) {
  const Image img = constant_image(56, 56, 0, 128, 255);
  Qwen2VLImageConfig cfg;
  for (ResizeBackend b : {ResizeBackend::Torchvision, ResizeBackend::Pil}) {
    cfg.backend = b;
    const PatchedImage p = qwen2vl_preprocess(img, cfg);
    ASSERT_EQ(p.rows, 16);
    const uint8_t bytes[3] = {0, 128, 255};
    for (int c = 0; c < 3; ++c) {
      float expect;
      if (b == ResizeBackend::Torchvision) {  // fused: (x - mean*255) / (std*255) in float32
        const float inv = float(1.0 / cfg.rescale_factor);
        const float m = cfg.mean[c] * inv, s = cfg.std[c] * inv;
        expect = (float(bytes[c]) - m) / s;
      } else {  // float32(x * rescale), then (x - mean) / std
        expect = (float(double(bytes[c]) * cfg.rescale_factor) - cfg.mean[c]) / cfg.std[c];
      }
      for (int64_t r = 0; r < p.rows; ++r)
        for (int k = 0; k < 2 * 14 * 14; ++k)
          ASSERT_EQ(p.values[size_t(r * p.cols + c * 392 + k)], expect) << backend_name(b) << " channel " << c;
      const double exact = (bytes[c] / 255.0 - double(cfg.mean[c])) / double(cfg.std[c]);
      EXPECT_NEAR(expect, exact, 1e-5);
    }
  }
}

TEST(Qwen2VL, ResizesWithSmartResize) {
  const Image img = make_image(100, 70, lcg_bytes(100 * 70 * 3, 8));
  Qwen2VLImageConfig cfg;  // defaults: 56*56 .. 28*28*1280
  const Image resized = qwen2vl_resized_image(img, cfg);
  EXPECT_EQ(resized.height, 56);
  EXPECT_EQ(resized.width, 112);
  EXPECT_EQ(resized.rgb, resize_bicubic(img, 112, 56, ResizeBackend::Torchvision).rgb);
  const PatchedImage p = qwen2vl_preprocess(img, cfg);
  EXPECT_EQ(p.grid_h, 4);
  EXPECT_EQ(p.grid_w, 8);
  EXPECT_EQ(p.rows, 32);
  EXPECT_EQ(p.cols, 1176);

  Qwen2VLImageConfig no_resize;
  no_resize.do_resize = false;
  EXPECT_THROW(qwen2vl_preprocess(img, no_resize), Error);  // 70x100 is not a multiple of 28
}

TEST(Qwen2VL, PreprocessIsFast) {
  const std::string dir = shapes_image_dir();
  Image img = dir.empty() ? make_image(224, 224, lcg_bytes(224 * 224 * 3, 4)) : load_image(dir + "/00001.png");
  ASSERT_EQ(img.width, 224);
  Qwen2VLImageConfig cfg;
  std::vector<double> ms;
  for (int i = 0; i < 21; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    const PatchedImage p = qwen2vl_preprocess(img, cfg);
    const auto t1 = std::chrono::steady_clock::now();
    ASSERT_EQ(p.rows, 256);
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  std::printf("qwen2vl_preprocess 224x224: median %.3f ms\n", ms[ms.size() / 2]);
  EXPECT_LT(ms[ms.size() / 2], 5.0);
  if (!dir.empty()) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 10; ++i) img = load_image(dir + "/00001.png");
    const auto t1 = std::chrono::steady_clock::now();
    std::printf("load_image 224x224 PNG: %.3f ms\n", std::chrono::duration<double, std::milli>(t1 - t0).count() / 10);
  }
}

TEST(Qwen2VL, ConfigLayouts) {
  TempDir tmp;
  const std::string legacy = tmp.file("legacy.json");
  write_text(legacy, R"({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.25, 0.125], "image_std": [0.5, 0.5, 0.5], "resample": 3,
    "rescale_factor": 0.00392156862745098, "do_normalize": false, "image_processor_type": "Qwen2VLImageProcessor"})");
  Qwen2VLImageConfig c = load_qwen2vl_image_config(legacy);
  EXPECT_EQ(c.min_pixels, 3136);
  EXPECT_EQ(c.max_pixels, 12845056);
  EXPECT_EQ(c.mean[1], 0.25f);
  EXPECT_EQ(c.std[2], 0.5f);
  EXPECT_FALSE(c.do_normalize);
  EXPECT_TRUE(c.do_rescale);
  EXPECT_EQ(c.rescale_factor, 0.00392156862745098);

  const std::string v5 = tmp.file("v5.json");
  write_text(v5, R"({"size": {"shortest_edge": 50176, "longest_edge": 50176}, "patch_size": 16, "merge_size": 2})");
  c = load_qwen2vl_image_config(v5);
  EXPECT_EQ(c.min_pixels, 50176);
  EXPECT_EQ(c.max_pixels, 50176);
  EXPECT_EQ(c.patch_size, 16);
  EXPECT_EQ(c.mean[0], kClipMean[0]);  // defaults kept

  const std::string both = tmp.file("both.json");  // explicit min/max_pixels override size
  write_text(both, R"({"size": {"shortest_edge": 100, "longest_edge": 200000}, "max_pixels": 65536})");
  c = load_qwen2vl_image_config(both);
  EXPECT_EQ(c.min_pixels, 100);
  EXPECT_EQ(c.max_pixels, 65536);

  const std::string old_size = tmp.file("old_size.json");  // transformers 4.4x wrote size as min/max_pixels
  write_text(old_size, R"({"size": {"min_pixels": 1000, "max_pixels": 90000}})");
  c = load_qwen2vl_image_config(old_size);
  EXPECT_EQ(c.min_pixels, 1000);
  EXPECT_EQ(c.max_pixels, 90000);

  const std::string broken = tmp.file("broken.json");
  write_text(broken, "{\"min_pixels\": 3136,");
  expect_error([&] { load_qwen2vl_image_config(broken); }, broken, "invalid JSON");
  const std::string bilinear = tmp.file("bilinear.json");
  write_text(bilinear, R"({"resample": 2})");
  expect_error([&] { load_qwen2vl_image_config(bilinear); }, bilinear, "bilinear");
  const std::string wrong_type = tmp.file("wrong_type.json");
  write_text(wrong_type, R"({"patch_size": "fourteen"})");
  expect_error([&] { load_qwen2vl_image_config(wrong_type); }, wrong_type, "patch_size");
  const std::string missing = tmp.file("missing.json");
  expect_error([&] { load_qwen2vl_image_config(missing); }, missing, "cannot open");
}

// ---------------------------------------------------------------------------------------------
// CLIP
// ---------------------------------------------------------------------------------------------
TEST(Clip, ResizeSizeFollowsGetResizeOutputImageSize) {
  ClipImageConfig cfg;  // shortest_edge 336
  EXPECT_EQ(clip_resize_size(480, 640, cfg), std::make_pair(336, 448));
  EXPECT_EQ(clip_resize_size(640, 480, cfg), std::make_pair(448, 336));
  EXPECT_EQ(clip_resize_size(250, 333, cfg), std::make_pair(336, 447));  // int(447.552) truncates
  EXPECT_EQ(clip_resize_size(100, 100, cfg), std::make_pair(336, 336));
  EXPECT_EQ(clip_resize_size(37, 1000, cfg), std::make_pair(336, 9081));
  cfg.shortest_edge = 224;
  EXPECT_EQ(clip_resize_size(70, 100, cfg), std::make_pair(224, 320));
  EXPECT_EQ(clip_resize_size(333, 250, cfg), std::make_pair(298, 224));  // int(298.368)
  cfg.resize_h = 100;
  cfg.resize_w = 50;
  EXPECT_EQ(clip_resize_size(333, 250, cfg), std::make_pair(100, 50));
}

TEST(Clip, CentreCropAndPadding) {
  // 9 wide, 5 high; byte = 10 * y + x in every channel.
  Image img;
  img.width = 9;
  img.height = 5;
  for (int y = 0; y < 5; ++y)
    for (int x = 0; x < 9; ++x) img.rgb.insert(img.rgb.end(), 3, uint8_t(10 * y + x));
  ClipImageConfig cfg;
  cfg.do_resize = false;
  cfg.crop_h = 3;
  cfg.crop_w = 4;
  const Image c = clip_cropped_image(img, cfg);  // top (5-3)//2 = 1, left (9-4)//2 = 2
  ASSERT_EQ(c.width, 4);
  ASSERT_EQ(c.height, 3);
  EXPECT_EQ(c.rgb[0], 12);
  EXPECT_EQ(c.rgb[(2 * 4 + 3) * 3], 35);

  // Crop larger than the image: zero padding, odd padding placed per backend.
  cfg.crop_h = 8;   // pad 3 rows: torchvision 1 above, numpy ceil(1.5) = 2 above
  cfg.crop_w = 10;  // pad 1 column: torchvision 0 left, numpy 1 left
  cfg.backend = ResizeBackend::Torchvision;
  const Image tv = clip_cropped_image(img, cfg);
  cfg.backend = ResizeBackend::Pil;
  const Image pil = clip_cropped_image(img, cfg);
  ASSERT_EQ(tv.width, 10);
  ASSERT_EQ(tv.height, 8);
  auto at = [](const Image& im, int y, int x) { return int(im.rgb[(size_t(y) * im.width + x) * 3]); };
  EXPECT_EQ(at(tv, 0, 0), 0);
  EXPECT_EQ(at(tv, 1, 0), 0);   // (row 0, col 0) of the image; its byte is 0
  EXPECT_EQ(at(tv, 1, 1), 1);
  EXPECT_EQ(at(tv, 2, 0), 10);
  EXPECT_EQ(at(tv, 5, 8), 48);
  EXPECT_EQ(at(tv, 5, 9), 0);   // right padding
  EXPECT_EQ(at(tv, 6, 3), 0);   // bottom padding
  EXPECT_EQ(at(pil, 2, 1), 0);
  EXPECT_EQ(at(pil, 2, 2), 1);
  EXPECT_EQ(at(pil, 3, 1), 10);
  EXPECT_EQ(at(pil, 6, 9), 48);
  EXPECT_EQ(at(pil, 1, 5), 0);  // top padding
}

TEST(Clip, PreprocessShapeAndValues) {
  const Image img = constant_image(640, 480, 10, 100, 250);
  ClipImageConfig cfg;  // 336 / 336x336
  const std::vector<float> v = clip_preprocess(img, cfg);
  ASSERT_EQ(v.size(), size_t(3) * 336 * 336);
  const uint8_t bytes[3] = {10, 100, 250};
  for (int c = 0; c < 3; ++c) {
    const float inv = float(1.0 / cfg.rescale_factor);
    const float expect = (float(bytes[c]) - cfg.mean[c] * inv) / (cfg.std[c] * inv);
    EXPECT_EQ(v[size_t(c) * 336 * 336], expect);
    EXPECT_EQ(v[size_t(c) * 336 * 336 + 336 * 336 - 1], expect);
  }
  // Resize then crop equals cropping the resized image.
  const Image photo = make_image(333, 250, lcg_bytes(333 * 250 * 3, 12));
  const Image cropped = clip_cropped_image(photo, cfg);
  const Image resized = resize_bicubic(photo, 447, 336, ResizeBackend::Torchvision);
  ASSERT_EQ(cropped.width, 336);
  ASSERT_EQ(cropped.height, 336);
  for (int y = 0; y < 336; y += 67)
    for (int x = 0; x < 336; x += 51)
      EXPECT_EQ(cropped.rgb[(size_t(y) * 336 + x) * 3], resized.rgb[(size_t(y) * 447 + x + 55) * 3]);
}

TEST(Clip, ConfigLayouts) {
  TempDir tmp;
  const std::string llava = tmp.file("llava.json");
  write_text(llava, R"({"crop_size": {"height": 336, "width": 336}, "do_center_crop": true, "do_convert_rgb": true,
    "do_normalize": true, "do_rescale": true, "do_resize": true, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336}})");
  ClipImageConfig c = load_clip_image_config(llava);
  EXPECT_EQ(c.shortest_edge, 336);
  EXPECT_EQ(c.crop_h, 336);
  EXPECT_EQ(c.crop_w, 336);
  EXPECT_EQ(c.resize_h, 0);
  EXPECT_EQ(c.std[0], 0.26862954f);

  const std::string ints = tmp.file("ints.json");  // older feature-extractor style
  write_text(ints, R"({"size": 224, "crop_size": 200, "do_center_crop": false})");
  c = load_clip_image_config(ints);
  EXPECT_EQ(c.shortest_edge, 224);
  EXPECT_EQ(c.crop_h, 200);
  EXPECT_EQ(c.crop_w, 200);
  EXPECT_FALSE(c.do_center_crop);

  const std::string hw = tmp.file("hw.json");
  write_text(hw, R"({"size": {"height": 384, "width": 256}})");
  c = load_clip_image_config(hw);
  EXPECT_EQ(c.resize_h, 384);
  EXPECT_EQ(c.resize_w, 256);
  EXPECT_EQ(c.crop_h, 224);  // CLIPImageProcessor default

  const std::string both = tmp.file("both.json");
  write_text(both, R"({"size": {"shortest_edge": 224, "longest_edge": 448}})");
  expect_error([&] { load_clip_image_config(both); }, both, "size");
  const std::string bad_crop = tmp.file("bad_crop.json");
  write_text(bad_crop, R"({"crop_size": {"height": 0, "width": 3}})");
  expect_error([&] { load_clip_image_config(bad_crop); }, bad_crop, "crop_size");
}

// ---------------------------------------------------------------------------------------------
// Reference fixtures from transformers (tools/make_fixtures.py --only preprocess)
// ---------------------------------------------------------------------------------------------
TEST(PreprocessFixtures, MatchTransformers) {
  const fs::path dir = fs::path(MLAFORGE_SOURCE_DIR) / "tests" / "fixtures" / "preprocess";
  if (!fs::exists(dir / "cases.json")) GTEST_SKIP() << "no fixtures at " << dir.string();
  json meta;
  {
    std::ifstream f(dir / "cases.json");
    meta = json::parse(f);
  }
  std::shared_ptr<SafetensorsFile> tensors;
  if (fs::exists(dir / "pixel_values.safetensors")) tensors = SafetensorsFile::open((dir / "pixel_values.safetensors").string());

  // The references are the torchvision backend's output (make_fixtures.py); a string naming a
  // *Pil class would mean the Pillow backend.
  ResizeBackend backend = ResizeBackend::Torchvision;
  if (meta.contains("backend") && meta["backend"].is_string() &&
      meta["backend"].get<std::string>().find("Pil") != std::string::npos)
    backend = ResizeBackend::Pil;

  ASSERT_TRUE(meta.contains("cases") && meta["cases"].is_array());
  int checked = 0;
  for (const json& c : meta["cases"]) {
    const std::string name = c.at("name").get<std::string>();
    const std::string processor = c.at("processor").get<std::string>();
    SCOPED_TRACE(name);
    const std::string cfg_path = (dir / (processor + "_preprocessor_config.json")).string();
    const Image img = load_image((dir / c.at("file").get<std::string>()).string());

    Image ours;                 // the uint8 image the processor normalises
    std::vector<float> values;  // pixel_values
    const float* std_ = nullptr;
    double rescale = 1.0;
    int64_t cols = 0;  // values per row for the per-channel std lookup (qwen), 0 for CHW
    Qwen2VLImageConfig qcfg;
    ClipImageConfig ccfg;
    if (processor == "clip") {
      ccfg = load_clip_image_config(cfg_path);
      ccfg.backend = backend;
      ours = clip_cropped_image(img, ccfg);
      values = clip_preprocess(img, ccfg);
      std_ = ccfg.std;
      rescale = ccfg.rescale_factor;
    } else {
      qcfg = load_qwen2vl_image_config(cfg_path);
      qcfg.backend = backend;
      ours = qwen2vl_resized_image(img, qcfg);
      const PatchedImage p = qwen2vl_patchify(ours, qcfg);
      if (c.contains("grid_thw")) {
        EXPECT_EQ(c["grid_thw"], json::array({p.grid_t, p.grid_h, p.grid_w}));
      }
      values = p.values;
      cols = p.cols;
      std_ = qcfg.std;
      rescale = qcfg.rescale_factor;
    }
    if (c.contains("resized")) {
      EXPECT_EQ(c["resized"], json::array({ours.height, ours.width}));
    }

    bool compared = false;
    const fs::path ref_png = dir / "ref" / (name + ".png");
    if (fs::exists(ref_png)) {
      const Image ref = load_image(ref_png.string());
      ASSERT_EQ(ref.width, ours.width);
      ASSERT_EQ(ref.height, ours.height);
      int worst = 0;
      size_t differing = 0;
      for (size_t i = 0; i < ref.rgb.size(); ++i) {
        const int d = std::abs(int(ref.rgb[i]) - int(ours.rgb[i]));
        worst = std::max(worst, d);
        differing += d != 0;
      }
      EXPECT_LE(worst, 1) << differing << " of " << ref.rgb.size() << " samples differ";
      std::printf("%-28s %s: resized image max diff %d grey levels, %zu samples differ\n", name.c_str(),
                  backend_name(backend), worst, differing);
      compared = true;

      // The other backend against the same reference must differ exactly as transformers' two
      // backends did (recorded as max_grey_diff_vs_pil_backend, up to float noise).
      if (backend == ResizeBackend::Torchvision && c.contains("max_grey_diff_vs_pil_backend")) {
        Image pil;
        if (processor == "clip") {
          ClipImageConfig p = ccfg;
          p.backend = ResizeBackend::Pil;
          pil = clip_cropped_image(img, p);
        } else {
          Qwen2VLImageConfig p = qcfg;
          p.backend = ResizeBackend::Pil;
          pil = qwen2vl_resized_image(img, p);
        }
        const double recorded = c["max_grey_diff_vs_pil_backend"].get<double>();
        EXPECT_NEAR(double(max_abs_diff(pil, ref)), recorded, 0.01) << "pil backend vs torchvision reference";
      }
    }
    if (tensors && tensors->has(name)) {
      const at::Tensor t = tensors->load(name).contiguous();
      ASSERT_EQ(size_t(t.numel()), values.size());
      if (cols > 0) {
        ASSERT_EQ(t.dim(), 2);
        EXPECT_EQ(t.size(1), cols);
      } else {
        ASSERT_EQ(t.dim(), 3);
        EXPECT_EQ(t.size(1), ours.height);
        EXPECT_EQ(t.size(2), ours.width);
      }
      const float* ref = t.data_ptr<float>();
      const size_t plane = size_t(ours.width) * ours.height;
      double worst_grey = 0, worst_abs = 0;
      for (size_t i = 0; i < values.size(); ++i) {
        const int ch = cols > 0 ? int((i % size_t(cols)) / size_t(cols / 3)) : int(i / plane);
        const double d = std::fabs(double(values[i]) - double(ref[i]));
        worst_abs = std::max(worst_abs, d);
        worst_grey = std::max(worst_grey, d * std_[ch] / rescale);
      }
      EXPECT_LE(worst_grey, 1.0 + 1e-3);
      std::printf("%-28s pixel_values: max |diff| %.3g (%.4f grey levels)\n", name.c_str(), worst_abs, worst_grey);
      compared = true;
    }
    EXPECT_TRUE(compared) << "no reference (ref/" << name << ".png or a tensor) for this case";
    ++checked;
  }
  EXPECT_GT(checked, 0);
}

}  // namespace
