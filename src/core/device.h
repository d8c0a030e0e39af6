// The --device option of every command.
#pragma once
#include <c10/core/Device.h>

#include <string>

namespace mlaforge {

// "cpu" or "cuda" -> the device; an Error naming `option` for another name, or for cuda in a build
// without CUDA.
at::Device parse_device(const std::string& name, const std::string& option = "--device");

}  // namespace mlaforge
