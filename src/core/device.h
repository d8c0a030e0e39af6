// The --device option of every command.
#pragma once
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <string>

namespace mlaforge {

// "cpu" or "cuda" -> the device; an Error naming `option` for another name, or for cuda in a build
// without CUDA.
at::Device parse_device(const std::string& name, const std::string& option = "--device");

// The --dtype option: "f32", "bf16", or "auto" (bf16 on cuda, f32 on the CPU) -> the compute dtype;
// an Error for another name.
at::ScalarType parse_dtype(const std::string& name, const at::Device& device);

}  // namespace mlaforge
