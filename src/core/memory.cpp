#include "core/memory.h"

#include <sys/resource.h>

#ifdef MLAFORGE_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace mlaforge {

int64_t peak_host_bytes() {
  struct rusage u {};
  getrusage(RUSAGE_SELF, &u);
  return int64_t(u.ru_maxrss) * 1024;  // Linux reports kilobytes
}

#ifdef MLAFORGE_WITH_CUDA
namespace {
bool have_cuda_device() { return c10::cuda::device_count() > 0; }
}  // namespace

int64_t peak_device_bytes() {
  if (!have_cuda_device()) return 0;
  at::empty({1}, at::TensorOptions().device(at::kCUDA));
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
  return stats.allocated_bytes[0].peak;  // index 0: all pools together
}

void reset_peak_device_bytes() {
  if (!have_cuda_device()) return;
  at::empty({1}, at::TensorOptions().device(at::kCUDA));  // the allocator knows no device before its first use
  c10::cuda::CUDACachingAllocator::resetPeakStats(c10::cuda::current_device());
}
#else
int64_t peak_device_bytes() { return 0; }
void reset_peak_device_bytes() {}
#endif

}  // namespace mlaforge
