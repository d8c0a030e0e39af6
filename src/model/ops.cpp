#include "model/ops.h"

#include <ATen/ATen.h>

#if __has_include(<ATen/ops/scaled_dot_product_attention.h>)
#define MLAFORGE_HAVE_SDPA 1
#endif

#include "core/error.h"
#include "io/safetensors.h"

#ifdef MLAFORGE_WITH_CUDA
#include <c10/core/GradMode.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/rms_norm.h"
#endif

namespace mlaforge {

at::Tensor dense(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return b.defined() ? at::linear(x, w, b) : at::linear(x, w);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
#ifdef MLAFORGE_WITH_CUDA
  // Inference on CUDA: the same arithmetic in one kernel (kernels/rms_norm.h) instead of eight.
  const auto t = x.scalar_type();
  const bool no_grad = !c10::GradMode::is_enabled() || (!x.requires_grad() && !w.requires_grad());
  if (x.is_cuda() && no_grad && x.numel() > 0 && w.scalar_type() == t && w.dim() == 1 && x.dim() >= 1 && w.size(0) == x.size(-1) &&
      (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf)) {
    const at::Tensor xc = x.contiguous(), wc = w.contiguous();
    at::Tensor out = at::empty_like(xc);
    const NormType nt = t == at::kFloat ? NormType::F32 : t == at::kBFloat16 ? NormType::BF16 : NormType::F16;
    rms_norm_cuda(xc.data_ptr(), wc.data_ptr(), out.data_ptr(), xc.numel() / xc.size(-1), xc.size(-1), float(eps), nt,
                  c10::cuda::getCurrentCUDAStream().stream());
    return out;
  }
#endif
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

bool have_fused_attention() {
#ifdef MLAFORGE_HAVE_SDPA
  return true;
#else
  return false;
#endif
}

bool fused_attention_applies(const at::Tensor& q) {
  return have_fused_attention() && q.is_cuda() && (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf);
}

at::Tensor fused_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                           bool causal, double scale) {
#ifdef MLAFORGE_HAVE_SDPA
  const int64_t group = q.size(1) / k.size(1);
  if (!mask.defined())
    return at::scaled_dot_product_attention(q, k, v, {}, 0.0, causal, scale, /*enable_gqa=*/group > 1);
  at::Tensor kr = group > 1 ? k.repeat_interleave(group, 1) : k, vr = group > 1 ? v.repeat_interleave(group, 1) : v;
  return at::scaled_dot_product_attention(q, kr, vr, mask, 0.0, causal, scale);
#else
  (void)q, (void)k, (void)v, (void)mask, (void)causal, (void)scale;
  throw Error("fused attention needs a PyTorch 2 build of ATen");
#endif
}

at::Tensor full_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  if (fused_attention_applies(q)) return fused_attention(q, k, v, at::Tensor(), false, scale);
  at::Tensor p = at::softmax(at::matmul(q, k.transpose(-2, -1)) * scale, -1, at::kFloat);  // [..., H, n, n]
  return at::matmul(p.to(v.scalar_type()), v);
}

void move_tensors(std::initializer_list<at::Tensor*> tensors, const at::Device& device, at::ScalarType dtype) {
  for (at::Tensor* t : tensors)
    if (t->defined()) *t = t->to(device, t->is_floating_point() ? dtype : t->scalar_type());
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
