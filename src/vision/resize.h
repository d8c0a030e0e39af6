// Antialiased bicubic resampling of 8-bit RGB images, bit-exact with the two libraries Hugging Face
// image processors call:
//
//   ResizeBackend::Pil          Pillow's Image.resize(size, Image.BICUBIC) (ImagingResample,
//                               Resample.c): what the "pil" backend / slow processors use.
//   ResizeBackend::Torchvision  torchvision's resize(uint8 tensor, BICUBIC, antialias=True), i.e.
//                               ATen's _upsample_bicubic2d_aa on uint8 (UpSampleKernel.cpp): what
//                               the "torchvision" backend / fast processors use.
//
// Both compute the same filter weights in double: scale = in/out, support = 2 * max(scale, 1),
// taps centred on (i + 0.5) * scale, Keys cubic with a = -0.5 evaluated at
// (j + xmin - center + 0.5) / max(scale, 1), normalised to sum 1. They differ only in the fixed-point
// coefficients: Pillow uses 22 fraction bits, ATen as many bits (< 22) as keep the largest weight
// below 2^15 (int16). Each pass (horizontal first, then vertical) sums in integers, rounds
// ((sum + 2^(p-1)) >> p) and clamps to 0..255. A dimension whose size is unchanged is skipped; an
// unchanged image is copied. The two backends agree within one grey level.
#pragma once
#include "vision/image.h"

namespace mlaforge {

enum class ResizeBackend { Pil, Torchvision };

const char* backend_name(ResizeBackend backend);

// Throws Error if the input is empty/inconsistent or an output size is not positive.
Image resize_bicubic(const Image& image, int out_w, int out_h, ResizeBackend backend = ResizeBackend::Pil);

}  // namespace mlaforge
