#pragma once

namespace mlaforge {
// Sets ATen's intra-op threads to `n`, or to the machine's cores when n <= 0
// (Debian's libtorch otherwise runs on one thread).
void set_threads(int n);
}  // namespace mlaforge
