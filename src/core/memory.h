// Peak memory of this process, for commands that report what they needed (convert).
#pragma once
#include <cstdint>

namespace mlaforge {

// Peak resident set size of the process so far (bytes).
int64_t peak_host_bytes();
// Peak bytes allocated by the CUDA caching allocator on the current device since the last reset
// (0 without CUDA); reset_peak_device_bytes starts a new window.
int64_t peak_device_bytes();
void reset_peak_device_bytes();

}  // namespace mlaforge
