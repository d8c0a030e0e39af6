#include "core/device.h"

#include <ATen/ATen.h>

#include "core/error.h"

namespace mlaforge {

at::Device parse_device(const std::string& name, const std::string& option) {
  check(name == "cpu" || name == "cuda", option, "choose cpu or cuda (got \"", name, "\")");
  check(name == "cpu" || at::hasCUDA(), option + " cuda", "this build has no CUDA (see DEVELOPERS.md)");
  return name == "cuda" ? at::Device(at::kCUDA) : at::Device(at::kCPU);
}

at::ScalarType parse_dtype(const std::string& name, const at::Device& device) {
  check(name == "auto" || name == "f32" || name == "bf16", "--dtype", "choose auto, f32 or bf16 (got \"", name, "\")");
  return name == "bf16" || (name == "auto" && device.is_cuda()) ? at::kBFloat16 : at::kFloat;
}

at::Tensor upload(const at::Tensor& host, const at::Device& device) {
  if (!device.is_cuda()) return host.to(device);
  return host.pin_memory().to(device, /*non_blocking=*/true);
}

}  // namespace mlaforge
