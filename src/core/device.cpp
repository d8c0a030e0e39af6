#include "core/device.h"

#include <ATen/Context.h>

#include "core/error.h"

namespace mlaforge {

at::Device parse_device(const std::string& name, const std::string& option) {
  check(name == "cpu" || name == "cuda", option, "choose cpu or cuda (got \"", name, "\")");
  check(name == "cpu" || at::hasCUDA(), option + " cuda", "this build has no CUDA (see DEVELOPERS.md)");
  return name == "cuda" ? at::Device(at::kCUDA) : at::Device(at::kCPU);
}

}  // namespace mlaforge
