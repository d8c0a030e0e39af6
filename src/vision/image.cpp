#include "vision/image.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <csetjmp>
#include <cstdio>
#include <cstring>

// jpeglib.h needs FILE and size_t declared first.
#include <jerror.h>
#include <jpeglib.h>
#include <png.h>

#include "core/error.h"

namespace mlaforge {
namespace {

// Pillow refuses images above twice Image.MAX_IMAGE_PIXELS (DecompressionBombError); so do we,
// before allocating anything.
constexpr int64_t kMaxPixels = 2 * int64_t(1024 * 1024 * 1024 / 4 / 3);

void check_dimensions(int64_t width, int64_t height, const std::string& name) {
  check(width > 0 && height > 0, name, "image has zero size (", width, "x", height, ")");
  check(width * height <= kMaxPixels, name, "image is too large (", width, "x", height,
        " pixels; the limit is ", kMaxPixels, " pixels, as in Pillow)");
}

// ---------------------------------------------------------------------------------------------
// PNG
// ---------------------------------------------------------------------------------------------
// libpng reports errors through a callback that must not return; it longjmps back to the
// setjmp in png_decode_protected. Nothing with a destructor lives in that function's frame.

struct PngSource {
  const uint8_t* data;
  size_t size;
  size_t pos;
  char message[200];
};

struct PngHandles {
  png_structp png = nullptr;
  png_infop info = nullptr;
  ~PngHandles() {
    if (png) png_destroy_read_struct(&png, info ? &info : nullptr, nullptr);
  }
};

struct PngPixels {
  int width = 0, height = 0, channels = 0, bit_depth = 0, color_type = 0;
  std::vector<uint8_t> data;    // rows after libpng's transforms
  std::vector<png_bytep> rows;  // pointers into data
  std::string size_error;       // set when the dimensions are refused
};

void png_error_cb(png_structp png, png_const_charp msg) {
  auto* src = static_cast<PngSource*>(png_get_error_ptr(png));
  std::snprintf(src->message, sizeof src->message, "%s", msg ? msg : "unknown libpng error");
  png_longjmp(png, 1);
}

void png_warning_cb(png_structp, png_const_charp) {}  // Pillow does not print libpng warnings either

void png_read_cb(png_structp png, png_bytep out, size_t n) {
  auto* src = static_cast<PngSource*>(png_get_io_ptr(png));
  if (src->size - src->pos < n) png_error(png, "file is truncated");
  std::memcpy(out, src->data + src->pos, n);
  src->pos += n;
}

// Returns false with src->message set on a libpng error.
bool png_decode_protected(PngSource* src, PngHandles* h, PngPixels* out) {
  h->png = png_create_read_struct(PNG_LIBPNG_VER_STRING, src, png_error_cb, png_warning_cb);
  if (!h->png) {
    std::snprintf(src->message, sizeof src->message, "libpng could not be initialised");
    return false;
  }
  h->info = png_create_info_struct(h->png);
  if (!h->info) {
    std::snprintf(src->message, sizeof src->message, "libpng could not be initialised");
    return false;
  }
  if (setjmp(png_jmpbuf(h->png))) return false;

  png_set_read_fn(h->png, src, png_read_cb);
  png_read_info(h->png, h->info);
  png_uint_32 width = 0, height = 0;
  int bit_depth = 0, color_type = 0, interlace = 0;
  png_get_IHDR(h->png, h->info, &width, &height, &bit_depth, &color_type, &interlace, nullptr, nullptr);
  if (width == 0 || height == 0 || int64_t(width) * int64_t(height) > kMaxPixels) {
    out->width = int(width > 0x7fffffff ? 0x7fffffff : width);
    out->height = int(height > 0x7fffffff ? 0x7fffffff : height);
    out->size_error = "bad size";
    return true;
  }
  out->color_type = color_type;

  // Pillow's modes: 16-bit grey is "I;16" and converts to RGB by clamping to 255, so it is read
  // at 16 bits; every other 16-bit layout keeps the high byte (png_set_strip_16 truncates).
  const bool grey16 = bit_depth == 16 && color_type == PNG_COLOR_TYPE_GRAY;
  if (bit_depth == 16 && !grey16) png_set_strip_16(h->png);
  if (color_type == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(h->png);  // may add alpha (tRNS)
  if (color_type == PNG_COLOR_TYPE_GRAY && bit_depth < 8) png_set_expand_gray_1_2_4_to_8(h->png);
  if (interlace != PNG_INTERLACE_NONE) png_set_interlace_handling(h->png);
  png_read_update_info(h->png, h->info);

  out->width = int(width);
  out->height = int(height);
  out->channels = png_get_channels(h->png, h->info);
  out->bit_depth = png_get_bit_depth(h->png, h->info);
  const size_t rowbytes = png_get_rowbytes(h->png, h->info);
  out->data.resize(rowbytes * height);
  out->rows.resize(height);
  for (png_uint_32 y = 0; y < height; ++y) out->rows[y] = out->data.data() + y * rowbytes;
  png_read_image(h->png, out->rows.data());
  // Chunks after the image data (and IEND) are not read: Pillow does not require them either.
  return true;
}

Image decode_png(const uint8_t* data, size_t size, const std::string& name) {
  PngSource src{data, size, 0, {0}};
  PngHandles handles;
  PngPixels px;
  if (!png_decode_protected(&src, &handles, &px)) fail(name, "corrupt or truncated PNG: ", src.message);
  if (!px.size_error.empty()) check_dimensions(px.width, px.height, name);

  Image img;
  img.width = px.width;
  img.height = px.height;
  img.rgb.resize(size_t(px.width) * px.height * 3);
  uint8_t* out = img.rgb.data();
  const int w = px.width;
  for (int y = 0; y < px.height; ++y) {
    const uint8_t* row = px.rows[y];
    if (px.bit_depth == 16) {  // 16-bit grey only: Pillow's I;16 -> RGB clamps to 255
      if (px.channels != 1) fail(name, "unexpected 16-bit PNG layout (", px.channels, " channels)");
      for (int x = 0; x < w; ++x, out += 3) {
        const uint8_t v = row[2 * x] != 0 ? 255 : row[2 * x + 1];
        out[0] = out[1] = out[2] = v;
      }
      continue;
    }
    switch (px.channels) {
      case 1:
        for (int x = 0; x < w; ++x, out += 3) out[0] = out[1] = out[2] = row[x];
        break;
      case 2:  // grey + alpha: alpha dropped
        for (int x = 0; x < w; ++x, out += 3) out[0] = out[1] = out[2] = row[2 * x];
        break;
      case 3:
        std::memcpy(out, row, size_t(w) * 3);
        out += size_t(w) * 3;
        break;
      case 4:  // alpha dropped
        for (int x = 0; x < w; ++x, out += 3) {
          out[0] = row[4 * x];
          out[1] = row[4 * x + 1];
          out[2] = row[4 * x + 2];
        }
        break;
      default:
        fail(name, "unexpected PNG layout (", px.channels, " channels)");
    }
  }
  return img;
}

// ---------------------------------------------------------------------------------------------
// JPEG
// ---------------------------------------------------------------------------------------------
// libjpeg's default error_exit calls exit(); ours longjmps back to jpeg_decode_protected. A
// premature end of data is only a warning to libjpeg (it pads the image with grey); Pillow
// raises "image file is truncated" there, so that warning is an error here too.

struct JpegError {
  jpeg_error_mgr mgr;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void jpeg_error_exit_cb(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

void jpeg_emit_message_cb(j_common_ptr cinfo, int level) {
  if (level >= 0) return;  // trace messages
  if (cinfo->err->msg_code == JWRN_JPEG_EOF) {
    auto* err = reinterpret_cast<JpegError*>(cinfo->err);
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
  }
  cinfo->err->num_warnings++;  // other corrupt-data warnings: decode on, as Pillow does
}

void jpeg_output_message_cb(j_common_ptr) {}

struct JpegHandles {
  jpeg_decompress_struct cinfo;
  JpegError err;
  bool created = false;
  ~JpegHandles() {
    if (created) jpeg_destroy_decompress(&cinfo);
  }
};

struct JpegPixels {
  int width = 0, height = 0, components = 0;
  bool cmyk = false;
  std::vector<uint8_t> data;
  std::string size_error;
};

bool jpeg_decode_protected(const uint8_t* data, size_t size, JpegHandles* h, JpegPixels* out) {
  h->cinfo.err = jpeg_std_error(&h->err.mgr);
  h->err.mgr.error_exit = jpeg_error_exit_cb;
  h->err.mgr.emit_message = jpeg_emit_message_cb;
  h->err.mgr.output_message = jpeg_output_message_cb;
  h->err.message[0] = 0;
  if (setjmp(h->err.jump)) return false;

  jpeg_create_decompress(&h->cinfo);
  h->created = true;
  jpeg_mem_src(&h->cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(&h->cinfo, TRUE);
  const int64_t w = h->cinfo.image_width, ht = h->cinfo.image_height;
  if (w == 0 || ht == 0 || w * ht > kMaxPixels) {
    out->width = int(w);
    out->height = int(ht);
    out->size_error = "bad size";
    return true;
  }
  switch (h->cinfo.num_components) {
    case 1:
      h->cinfo.out_color_space = JCS_GRAYSCALE;
      break;
    case 3:
      h->cinfo.out_color_space = JCS_RGB;
      break;
    case 4:  // CMYK or YCCK; libjpeg turns YCCK into CMYK
      h->cinfo.out_color_space = JCS_CMYK;
      out->cmyk = true;
      break;
    default:
      std::snprintf(h->err.message, sizeof h->err.message, "unsupported number of colour components (%d)",
                    h->cinfo.num_components);
      return false;
  }
  // Pillow's settings (it changes them only for draft mode); these are also libjpeg's defaults.
  h->cinfo.dct_method = JDCT_ISLOW;
  h->cinfo.do_fancy_upsampling = TRUE;
  jpeg_start_decompress(&h->cinfo);

  out->width = int(h->cinfo.output_width);
  out->height = int(h->cinfo.output_height);
  out->components = h->cinfo.output_components;
  const size_t stride = size_t(out->width) * out->components;
  out->data.resize(stride * out->height);
  while (h->cinfo.output_scanline < h->cinfo.output_height) {
    JSAMPROW row = out->data.data() + size_t(h->cinfo.output_scanline) * stride;
    if (jpeg_read_scanlines(&h->cinfo, &row, 1) != 1) {
      std::snprintf(h->err.message, sizeof h->err.message, "decoder stopped at row %u of %u",
                    h->cinfo.output_scanline, h->cinfo.output_height);
      return false;
    }
  }
  // Not jpeg_finish_decompress: all rows are in, and a missing EOI marker after them is harmless.
  return true;
}

// Pillow's MULDIV255 and cmyk2rgb (Convert.c), applied to "CMYK;I" (inverted) samples.
inline int muldiv255(int a, int b) {
  const int tmp = a * b + 128;
  return ((tmp >> 8) + tmp) >> 8;
}

inline uint8_t clip8(int v) { return uint8_t(v < 0 ? 0 : v > 255 ? 255 : v); }

Image decode_jpeg(const uint8_t* data, size_t size, const std::string& name) {
  JpegHandles handles;
  JpegPixels px;
  if (!jpeg_decode_protected(data, size, &handles, &px)) fail(name, "corrupt or truncated JPEG: ", handles.err.message);
  if (!px.size_error.empty()) check_dimensions(px.width, px.height, name);

  Image img;
  img.width = px.width;
  img.height = px.height;
  const size_t n = size_t(px.width) * px.height;
  img.rgb.resize(n * 3);
  uint8_t* out = img.rgb.data();
  const uint8_t* in = px.data.data();
  if (px.components == 3) {
    std::memcpy(out, in, n * 3);
  } else if (px.components == 1) {
    for (size_t i = 0; i < n; ++i) out[3 * i] = out[3 * i + 1] = out[3 * i + 2] = in[i];
  } else if (px.components == 4 && px.cmyk) {
    for (size_t i = 0; i < n; ++i) {
      // Pillow reads every 4-component JPEG as "CMYK;I" (Adobe's inverted convention): c = 255 - C.
      const int c = 255 - in[4 * i], m = 255 - in[4 * i + 1], y = 255 - in[4 * i + 2];
      const int nk = in[4 * i + 3];  // 255 - k with k = 255 - K
      out[3 * i] = clip8(nk - muldiv255(c, nk));
      out[3 * i + 1] = clip8(nk - muldiv255(m, nk));
      out[3 * i + 2] = clip8(nk - muldiv255(y, nk));
    }
  } else {
    fail(name, "unexpected JPEG layout (", px.components, " components)");
  }
  return img;
}

// ---------------------------------------------------------------------------------------------

const char* other_format(const uint8_t* d, size_t n) {
  auto starts = [&](const char* magic, size_t len) { return n >= len && std::memcmp(d, magic, len) == 0; };
  if (starts("GIF87a", 6) || starts("GIF89a", 6)) return "GIF";
  if (starts("BM", 2)) return "BMP";
  if (n >= 12 && starts("RIFF", 4) && std::memcmp(d + 8, "WEBP", 4) == 0) return "WebP";
  if (starts("II*\0", 4) || starts("MM\0*", 4)) return "TIFF";
  if (n >= 12 && std::memcmp(d + 4, "ftyp", 4) == 0) return "HEIF/AVIF";
  if (starts("\x00\x00\x00\x0cjP  ", 8)) return "JPEG 2000";
  return nullptr;
}

}  // namespace

Image decode_image(const uint8_t* data, size_t size, const std::string& name) {
  check(size > 0, name, "file is empty");
  static const uint8_t kPng[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (size >= 8 && std::memcmp(data, kPng, 8) == 0) return decode_png(data, size, name);
  if (size >= 3 && data[0] == 0xff && data[1] == 0xd8 && data[2] == 0xff) return decode_jpeg(data, size, name);
  if (const char* kind = other_format(data, size))
    fail(name, "unsupported image format (", kind, "); only PNG and JPEG are supported");
  fail(name, "not a PNG or JPEG image (unrecognised file signature)");
}

Image load_image(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, "cannot open image: ", std::strerror(errno));
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail(path, "cannot read image: ", std::strerror(errno));
  if (S_ISDIR(st.st_mode)) fail(path, "cannot read image: is a directory");
  if (!S_ISREG(st.st_mode)) fail(path, "cannot read image: not a regular file");
  std::vector<uint8_t> bytes(size_t(st.st_size));
  size_t got = 0;
  while (got < bytes.size()) {
    const ssize_t r = ::read(fd, bytes.data() + got, bytes.size() - got);
    if (r < 0) {
      if (errno == EINTR) continue;
      fail(path, "cannot read image: ", std::strerror(errno));
    }
    if (r == 0) break;
    got += size_t(r);
  }
  bytes.resize(got);
  return decode_image(bytes.data(), bytes.size(), path);
}

}  // namespace mlaforge
