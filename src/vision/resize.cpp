#include "vision/resize.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"

namespace mlaforge {
namespace {

// Keys cubic convolution, a = -0.5 (Pillow's bicubic_filter; ATen's aa_filter<double, true> is
// the same polynomial, and scaling by 0.5 is exact, so both give the same doubles).
inline double bicubic_filter(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

// Fixed-point filter taps for one axis.
struct Taps {
  int ksize = 0;            // taps per output sample (stride of `coef`)
  int precision = 0;        // fraction bits
  std::vector<int> first;   // first input index per output sample
  std::vector<int> count;   // number of taps per output sample
  std::vector<int32_t> coef;
};

Taps make_taps(int in_size, int out_size, ResizeBackend backend) {
  const double scale = double(in_size) / double(out_size);
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 2.0 * filterscale;  // bicubic support 2, widened when downscaling
  const double inv = 1.0 / filterscale;

  Taps t;
  t.ksize = int(std::ceil(support)) * 2 + 1;
  t.first.resize(out_size);
  t.count.resize(out_size);
  std::vector<double> w(size_t(out_size) * t.ksize, 0.0);
  double w_max = 0.0;
  for (int i = 0; i < out_size; ++i) {
    const double center = (i + 0.5) * scale;
    int xmin = int(center - support + 0.5);  // truncation toward zero, as both libraries do
    if (xmin < 0) xmin = 0;
    int xmax = int(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    int n = std::clamp(xmax - xmin, 0, t.ksize);
    double* k = &w[size_t(i) * t.ksize];
    double total = 0.0;
    for (int j = 0; j < n; ++j) {
      const double v = bicubic_filter((j + xmin - center + 0.5) * inv);
      k[j] = v;
      total += v;
    }
    if (total != 0.0) {
      for (int j = 0; j < n; ++j) {
        k[j] /= total;
        w_max = std::max(w_max, k[j]);
      }
    }
    t.first[i] = xmin;
    t.count[i] = n;
  }

  if (backend == ResizeBackend::Pil) {
    t.precision = 22;  // Resample.c: PRECISION_BITS = 32 - 8 - 2
  } else {
    // UpSampleKernel.cpp, _compute_index_ranges_int16_weights: the largest precision below 22
    // for which the biggest weight, doubled, would still stay under 2^15.
    unsigned p = 0;
    for (p = 0; p < 22; ++p) {
      const int next = int(0.5 + w_max * double(1 << (p + 1)));
      if (next >= (1 << 15)) break;
    }
    t.precision = int(p);
    if (t.precision < 1) t.precision = 1;  // unreachable for normalised weights; keeps the shift valid
  }
  const double one = double(1 << t.precision);
  t.coef.resize(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    const double v = w[i] * one;
    t.coef[i] = v < 0 ? int32_t(-0.5 + v) : int32_t(0.5 + v);
  }
  return t;
}

inline uint8_t clamp_shift(int32_t sum, int precision) {
  const int32_t v = sum >> precision;  // arithmetic shift (floor), as both libraries rely on
  return uint8_t(v < 0 ? 0 : v > 255 ? 255 : v);
}

// in: h rows of in_w RGB pixels -> out: h rows of out_w pixels.
void horizontal_pass(const uint8_t* in, int in_w, int h, uint8_t* out, int out_w, const Taps& t) {
  const int32_t half = int32_t(1) << (t.precision - 1);
  for (int y = 0; y < h; ++y) {
    const uint8_t* src = in + size_t(y) * in_w * 3;
    uint8_t* dst = out + size_t(y) * out_w * 3;
    for (int x = 0; x < out_w; ++x) {
      const int32_t* k = &t.coef[size_t(x) * t.ksize];
      const uint8_t* p = src + size_t(t.first[x]) * 3;
      int32_t s0 = half, s1 = half, s2 = half;
      for (int j = 0, n = t.count[x]; j < n; ++j, p += 3) {
        s0 += p[0] * k[j];
        s1 += p[1] * k[j];
        s2 += p[2] * k[j];
      }
      dst[3 * x] = clamp_shift(s0, t.precision);
      dst[3 * x + 1] = clamp_shift(s1, t.precision);
      dst[3 * x + 2] = clamp_shift(s2, t.precision);
    }
  }
}

// in: in_h rows of w RGB pixels -> out: out_h rows.
void vertical_pass(const uint8_t* in, int w, uint8_t* out, int out_h, const Taps& t) {
  const size_t row = size_t(w) * 3;
  const int32_t half = int32_t(1) << (t.precision - 1);
  std::vector<int32_t> acc(row);
  for (int y = 0; y < out_h; ++y) {
    std::fill(acc.begin(), acc.end(), half);
    const int32_t* k = &t.coef[size_t(y) * t.ksize];
    const uint8_t* src = in + size_t(t.first[y]) * row;
    for (int j = 0, n = t.count[y]; j < n; ++j, src += row) {
      const int32_t kj = k[j];
      int32_t* a = acc.data();
      for (size_t i = 0; i < row; ++i) a[i] += int32_t(src[i]) * kj;
    }
    uint8_t* dst = out + size_t(y) * row;
    for (size_t i = 0; i < row; ++i) dst[i] = clamp_shift(acc[i], t.precision);
  }
}

}  // namespace

const char* backend_name(ResizeBackend backend) {
  return backend == ResizeBackend::Pil ? "pil" : "torchvision";
}

Image resize_bicubic(const Image& image, int out_w, int out_h, ResizeBackend backend) {
  check(image.width > 0 && image.height > 0 &&
            image.rgb.size() == size_t(image.width) * size_t(image.height) * 3,
        "resize_bicubic", "invalid input image (", image.width, "x", image.height, ", ", image.rgb.size(),
        " bytes)");
  check(out_w > 0 && out_h > 0, "resize_bicubic", "output size must be positive, got ", out_w, "x", out_h);
  if (out_w == image.width && out_h == image.height) return image;

  const bool need_h = out_w != image.width, need_v = out_h != image.height;
  Image out;
  out.width = out_w;
  out.height = out_h;
  out.rgb.resize(size_t(out_w) * out_h * 3);
  if (need_h && need_v) {
    // Pillow only filters the input rows the vertical pass reads; the result is the same.
    const Taps th = make_taps(image.width, out_w, backend);
    const Taps tv = make_taps(image.height, out_h, backend);
    std::vector<uint8_t> tmp(size_t(out_w) * image.height * 3);
    horizontal_pass(image.rgb.data(), image.width, image.height, tmp.data(), out_w, th);
    vertical_pass(tmp.data(), out_w, out.rgb.data(), out_h, tv);
  } else if (need_h) {
    horizontal_pass(image.rgb.data(), image.width, image.height, out.rgb.data(), out_w,
                    make_taps(image.width, out_w, backend));
  } else {
    vertical_pass(image.rgb.data(), image.width, out.rgb.data(), out_h, make_taps(image.height, out_h, backend));
  }
  return out;
}

}  // namespace mlaforge
