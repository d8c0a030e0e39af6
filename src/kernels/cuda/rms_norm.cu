// Fused RMSNorm (kernels/rms_norm.h): one CTA per row.
#ifndef MLAFORGE_WITH_CUDA
#define MLAFORGE_WITH_CUDA
#endif
#include "kernels/rms_norm.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace mlaforge {

namespace {

constexpr int kNormThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <typename T>
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                                T* __restrict__ out, int64_t dim, float eps) {
  __shared__ float warp_sums[kNormThreads / 32];
  const T* xr = x + blockIdx.x * dim;
  T* yr = out + blockIdx.x * dim;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += kNormThreads) {
    const float v = to_float(xr[i]);
    ss += v * v;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = ss;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int k = 0; k < kNormThreads / 32; ++k) total += warp_sums[k];
  // Correctly rounded operations: --use_fast_math would otherwise approximate the division and the root.
  const float inv = __frsqrt_rn(__fadd_rn(__fmul_rn(total, __frcp_rn(static_cast<float>(dim))), eps));
  for (int64_t i = threadIdx.x; i < dim; i += kNormThreads) {
    const T normed = from_float<T>(to_float(xr[i]) * inv);
    yr[i] = from_float<T>(to_float(w[i]) * to_float(normed));
  }
}

}  // namespace

void rms_norm_cuda(const void* x, const void* w, void* out, int64_t rows, int64_t dim, float eps, NormType xt,
                   void* stream) {
  if (rows <= 0 || dim <= 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(rows));
  switch (xt) {
    case NormType::F32:
      rms_norm_kernel<float><<<grid, kNormThreads, 0, s>>>(static_cast<const float*>(x), static_cast<const float*>(w),
                                                           static_cast<float*>(out), dim, eps);
      break;
    case NormType::BF16:
      rms_norm_kernel<__nv_bfloat16><<<grid, kNormThreads, 0, s>>>(static_cast<const __nv_bfloat16*>(x),
                                                                   static_cast<const __nv_bfloat16*>(w),
                                                                   static_cast<__nv_bfloat16*>(out), dim, eps);
      break;
    case NormType::F16:
      rms_norm_kernel<__half><<<grid, kNormThreads, 0, s>>>(static_cast<const __half*>(x), static_cast<const __half*>(w),
                                                            static_cast<__half*>(out), dim, eps);
      break;
  }
}

}  // namespace mlaforge
