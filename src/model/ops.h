// Small tensor helpers shared by every architecture (float32 math on CPU or CUDA).
#pragma once
#include <ATen/core/Tensor.h>

#include <initializer_list>
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
// Whether attention on q (and its keys and values) goes through ATen's fused scaled-dot-product
// attention: CUDA tensors in bf16/f16, in a PyTorch 2 build (Debian's 1.13 has no such op). There
// it is what transformers' "sdpa" attention runs, so bf16 outputs round as transformers' do (the
// scores never round to bf16); float32 and CPU keep the explicit softmax, the exactness reference.
bool fused_attention_applies(const at::Tensor& q);
bool have_fused_attention();
// softmax(q k^T * scale, masked) v by ATen's SDPA. q [B, h, T, d]; k, v [B, g, S, d] with g
// dividing h (grouped heads natively, as transformers with torch >= 2.5 when there is no mask);
// mask: undefined, or bool [B or 1, 1, T, S] (true = attend; k and v are then repeated to h heads,
// as transformers does with a mask); causal: top-left causal (T == S). Returns [B, h, T, d].
at::Tensor fused_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                           bool causal, double scale);
// softmax(q k^T * scale) v with every query seeing every key (vision towers): q, k, v [..., H, n, d]
// -> [..., H, n, d]. Fused where fused_attention_applies, else explicit with a float32 softmax.
at::Tensor full_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);
// Moves each defined tensor to `device`, floating ones also to `dtype`.
void move_tensors(std::initializer_list<at::Tensor*> tensors, const at::Device& device, at::ScalarType dtype);
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
