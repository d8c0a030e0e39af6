// Fused RMSNorm for inference on CUDA (model/ops.cpp's rms_norm takes it where no gradient is needed).
// Plain C++ (no ATen) so that the kernel compiles with nvcc alone.
#pragma once
#include <cstdint>

namespace mlaforge {

// Element types of rms_norm_cuda's tensors.
enum class NormType : int32_t { F32 = 0, BF16 = 1, F16 = 2 };

// out[r, :] = w * T(x[r, :] * rsqrt(mean(x[r, :]^2) + eps)), the mean and the product by the inverse root in
// float32, T the rounding to x's type, and the product by w rounded to x's type once more: the ATen
// composition in ops.cpp in one kernel (the decoding step spends ~8 launches per norm otherwise).
// x, out: [rows, dim] dense, type xt; w: [dim] dense, type xt. Launches on `stream` without synchronising.
void rms_norm_cuda(const void* x, const void* w, void* out, int64_t rows, int64_t dim, float eps, NormType xt,
                   void* stream);

}  // namespace mlaforge
