#include "core/threads.h"

#include <ATen/Parallel.h>

#include <thread>

namespace mlaforge {
void set_threads(int n) {
  if (n <= 0) n = int(std::thread::hardware_concurrency());
  if (n <= 0) n = 1;
  at::set_num_threads(n);
}
}  // namespace mlaforge
