// Small tensor helpers shared by every architecture (float32 math on CPU or CUDA).
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace mlaforge {

class WeightStore;

// y = x W^T + b; x [..., in], w [out, in], b [out] or undefined.
at::Tensor dense(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b = at::Tensor());
// RMSNorm as HF: x * rsqrt(mean(x^2) + eps) in float32, times weight. x [..., d].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps);
// rotate_half(x) = cat(-x[d/2:], x[:d/2]) over the last dim.
at::Tensor rotate_half(const at::Tensor& x);
// x * cos + rotate_half(x) * sin, with cos/sin broadcastable to x.
at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
// Activations by HF name: silu, gelu (exact), quick_gelu (x * sigmoid(1.702 x)).
at::Tensor activation(const at::Tensor& x, const std::string& name);

// Loads weights under a name prefix, with shape checks; errors name the file and the tensor.
class WeightLoader {
 public:
  WeightLoader(const WeightStore& store, std::string prefix) : store_(store), prefix_(std::move(prefix)) {}
  WeightLoader sub(const std::string& more) const { return WeightLoader(store_, prefix_ + more); }
  at::Tensor get(const std::string& name, const std::vector<int64_t>& shape) const;
  // Returns an undefined tensor when absent (optional biases).
  at::Tensor maybe(const std::string& name, const std::vector<int64_t>& shape) const;
  bool has(const std::string& name) const;
  const std::string& prefix() const { return prefix_; }

 private:
  const WeightStore& store_;
  std::string prefix_;
};

// The first prefix p in `candidates` for which `p + probe` exists, or fails naming the directory.
std::string find_prefix(const WeightStore& store, const std::vector<std::string>& candidates, const std::string& probe,
                        const std::string& what);

}  // namespace mlaforge
