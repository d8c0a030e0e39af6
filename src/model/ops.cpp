#include "model/ops.h"

#include <ATen/ATen.h>

#include "core/error.h"
#include "io/safetensors.h"

namespace mlaforge {

at::Tensor dense(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return b.defined() ? at::linear(x, w, b) : at::linear(x, w);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  // float32 for float32/bf16/f16 inputs (as transformers); float64 stays float64 (gradient checks).
  at::Tensor xf = x.scalar_type() == at::kDouble ? x : x.to(at::kFloat);
  at::Tensor var = xf.pow(2).mean(-1, /*keepdim=*/true);
  return w * (xf * at::rsqrt(var + eps)).to(x.scalar_type());
}

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps) {
  return at::layer_norm(x, {x.size(-1)}, w, b, eps);
}

at::Tensor rotate_half(const at::Tensor& x) {
  int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return x * cos + rotate_half(x) * sin;
}

at::Tensor activation(const at::Tensor& x, const std::string& name) {
  if (name == "silu") return at::silu(x);
  if (name == "gelu") return at::gelu(x);
  if (name == "quick_gelu") return x * at::sigmoid(1.702 * x);
  throw Error("unsupported activation " + name);
}

at::Tensor WeightLoader::get(const std::string& name, const std::vector<int64_t>& shape) const {
  return store_.load(prefix_ + name, shape);
}

at::Tensor WeightLoader::maybe(const std::string& name, const std::vector<int64_t>& shape) const {
  return has(name) ? get(name, shape) : at::Tensor();
}

bool WeightLoader::has(const std::string& name) const { return store_.has(prefix_ + name); }

std::string find_prefix(const WeightStore& store, const std::vector<std::string>& candidates, const std::string& probe,
                        const std::string& what) {
  for (const auto& p : candidates)
    if (store.has(p + probe)) return p;
  std::string tried;
  for (const auto& p : candidates) tried += (tried.empty() ? "" : ", ") + p + probe;
  fail(store.dir(), "missing tensor for the ", what, " (looked for ", tried, ")");
}

}  // namespace mlaforge
