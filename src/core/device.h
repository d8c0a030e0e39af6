// The --device and --dtype options of every command, and host-to-device uploads.
#pragma once
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <string>

namespace at {
class Tensor;
}

namespace mlaforge {

// "cpu" or "cuda" -> the device; an Error naming `option` for another name, or for cuda in a build
// without CUDA.
at::Device parse_device(const std::string& name, const std::string& option = "--device");

// The --dtype option: "f32", "bf16", or "auto" (bf16 on cuda, f32 on the CPU) -> the compute dtype;
// an Error for another name.
at::ScalarType parse_dtype(const std::string& name, const at::Device& device);

// A small host tensor on `device` without waiting for the device: on CUDA it is pinned and copied
// asynchronously (a plain host-to-device copy synchronises the stream, which keeps the host from queueing
// the next decoding step while the GPU runs this one); on the CPU, the tensor itself.
at::Tensor upload(const at::Tensor& host, const at::Device& device);

}  // namespace mlaforge
