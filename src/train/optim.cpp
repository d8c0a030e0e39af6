#include "train/optim.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>

#include "core/error.h"
#include "io/safetensors.h"

namespace mlaforge {
namespace {

const char* const kWhere = "AdamW";
const std::string kPrefix = "adamw.";
const std::string kM = "adamw.m.", kV = "adamw.v.", kStep = "adamw.step.", kParam = "adamw.param.";
const std::string kStepsKey = "adamw.steps";

bool starts_with(const std::string& s, const std::string& prefix) { return s.compare(0, prefix.size(), prefix) == 0; }

bool parse_int64(const std::string& s, int64_t* out) {
  if (s.empty()) return false;
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (errno != 0 || end != s.c_str() + s.size()) return false;
  *out = v;
  return true;
}

}  // namespace

AdamW::AdamW(std::vector<std::pair<std::string, at::Tensor>> named_params, AdamWOptions opt)
    : params_(std::move(named_params)), opt_(opt) {
  check(opt_.beta1 >= 0 && opt_.beta1 < 1 && opt_.beta2 >= 0 && opt_.beta2 < 1, kWhere, "betas (", opt_.beta1,
        ", ", opt_.beta2, ") must lie in [0, 1)");
  check(opt_.eps >= 0 && opt_.weight_decay >= 0, kWhere, "eps and weight_decay must be >= 0");
  std::set<std::string> seen;
  state_.reserve(params_.size());
  for (auto& [name, p] : params_) {
    check(!name.empty(), kWhere, "a parameter has an empty name");
    check(seen.insert(name).second, kWhere, "parameter '", name, "' is listed twice");
    check(p.defined(), kWhere, "parameter '", name, "' is undefined");
    check(p.scalar_type() == at::kFloat, kWhere, "parameter '", name, "' is ", p.scalar_type(),
          ", expected float32 master weights");
    check(p.requires_grad() && p.is_leaf(), kWhere, "parameter '", name,
          "' must be a leaf tensor that requires grad");
    Slot s;
    s.m = at::zeros_like(p, at::MemoryFormat::Contiguous);
    s.v = at::zeros_like(p, at::MemoryFormat::Contiguous);
    state_.push_back(std::move(s));
  }
}

void AdamW::zero_grad() {
  for (auto& [name, p] : params_) {
    at::Tensor& g = p.mutable_grad();
    if (g.defined()) g.reset();
  }
}

void AdamW::step(double lr) {
  check(std::isfinite(lr) && lr >= 0, kWhere, "learning rate ", lr, " is not a finite non-negative number");
  at::NoGradGuard no_grad;
  ++steps_;
  const double b1 = opt_.beta1, b2 = opt_.beta2;
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor& p = params_[i].second;
    const at::Tensor& grad = p.grad();
    if (!grad.defined()) continue;  // torch skips parameters without a gradient (no decay, no step)
    check(grad.layout() == at::kStrided, kWhere, "parameter '", params_[i].first, "' has a sparse gradient");
    // The update runs in float32 on the parameter's device whatever the gradient's dtype.
    at::Tensor g = grad.to(p.device(), at::kFloat);
    Slot& s = state_[i];
    ++s.step;
    // Same operations, in the same order, as torch.optim.AdamW's single-tensor path.
    if (opt_.weight_decay != 0) p.mul_(1.0 - lr * opt_.weight_decay);
    s.m.lerp_(g, 1.0 - b1);
    s.v.mul_(b2).addcmul_(g, g, 1.0 - b2);
    const double bias1 = 1.0 - std::pow(b1, double(s.step));
    const double bias2_sqrt = std::sqrt(1.0 - std::pow(b2, double(s.step)));
    at::Tensor denom = (s.v.sqrt() / bias2_sqrt).add_(opt_.eps);
    p.addcdiv_(s.m, denom, -lr / bias1);
  }
}

void AdamW::save_state(const std::string& path, const std::map<std::string, std::string>& extra_metadata,
                       bool with_params) const {
  std::map<std::string, std::string> metadata;
  for (auto& [k, v] : extra_metadata) {
    check(!starts_with(k, kPrefix), path, "metadata key '", k, "' is reserved for the optimizer state");
    metadata[k] = v;
  }
  metadata[kStepsKey] = std::to_string(steps_);
  std::map<std::string, at::Tensor> tensors;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& name = params_[i].first;
    tensors[kM + name] = state_[i].m;
    tensors[kV + name] = state_[i].v;
    tensors[kStep + name] = at::full({1}, state_[i].step, at::kLong);
    if (with_params) tensors[kParam + name] = params_[i].second.detach();
  }
  // Write beside and rename, so a run killed mid-write keeps its previous state file intact.
  const std::string tmp = path + ".tmp";
  save_safetensors(tmp, tensors, metadata);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    std::remove(tmp.c_str());
    fail(path, "cannot rename ", tmp, " over it (", why, ")");
  }
}

std::map<std::string, std::string> AdamW::load_state(const std::string& path) {
  auto file = SafetensorsFile::open(path);
  const auto& md = file->metadata();
  auto steps_it = md.find(kStepsKey);
  check(steps_it != md.end(), path, "not an AdamW state file (no '", kStepsKey, "' metadata)");
  int64_t steps = 0;
  check(parse_int64(steps_it->second, &steps) && steps >= 0, path, "bad '", kStepsKey, "' metadata '",
        steps_it->second, "'");

  const bool with_params = !params_.empty() && file->has(kParam + params_[0].first);
  std::set<std::string> expected;
  for (auto& [name, p] : params_) {
    expected.insert(kM + name);
    expected.insert(kV + name);
    expected.insert(kStep + name);
    if (with_params) expected.insert(kParam + name);
  }
  // Anything in the file that this optimizer would not have written is a mismatch.
  for (auto& [key, entry] : file->entries()) {
    if (expected.count(key)) continue;
    for (const std::string* prefix : {&kM, &kV, &kStep, &kParam}) {
      if (starts_with(key, *prefix)) {
        const std::string name = key.substr(prefix->size());
        bool known = false;
        for (auto& np : params_) known = known || np.first == name;
        if (!known) fail(path, "has state for parameter '", name, "', which this optimizer does not have");
        fail(path, "has '", key, "' but not the parameters of every other tensor (saved with and without params?)");
      }
    }
    fail(path, "unexpected tensor '", key, "' in an AdamW state file");
  }

  // Load and check everything before changing anything.
  struct Loaded {
    at::Tensor m, v, param;
    int64_t step = 0;
  };
  std::vector<Loaded> loaded(params_.size());
  auto load_like = [&](const std::string& key, const std::string& name, const at::Tensor& like) {
    check(file->has(key), path, "has no '", key, "' for parameter '", name, "'");
    const TensorEntry& e = file->entries().at(key);
    check(e.dtype == "F32", path, "'", key, "' is ", e.dtype, ", expected F32");
    check(e.shape == like.sizes().vec(), path, "'", key, "' has shape ", shape_str(e.shape), " but parameter '",
          name, "' has ", shape_str(like.sizes().vec()));
    return file->load(key, at::kFloat);
  };
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& [name, p] = params_[i];
    Loaded& l = loaded[i];
    l.m = load_like(kM + name, name, p);
    l.v = load_like(kV + name, name, p);
    if (with_params) l.param = load_like(kParam + name, name, p);
    const std::string sk = kStep + name;
    check(file->has(sk), path, "has no '", sk, "' for parameter '", name, "'");
    const TensorEntry& e = file->entries().at(sk);
    check(e.dtype == "I64" && e.shape == std::vector<int64_t>{1}, path, "'", sk, "' must be I64 of shape [1]");
    l.step = file->load(sk, at::kLong).item<int64_t>();
    check(l.step >= 0 && l.step <= steps, path, "'", sk, "' is ", l.step, ", outside [0, ", steps, "]");
  }

  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    state_[i].m.copy_(loaded[i].m);
    state_[i].v.copy_(loaded[i].v);
    state_[i].step = loaded[i].step;
    if (with_params) params_[i].second.copy_(loaded[i].param);
  }
  steps_ = steps;
  std::map<std::string, std::string> extra;
  for (auto& [k, v] : md)
    if (!starts_with(k, kPrefix)) extra[k] = v;
  return extra;
}

double clip_grad_norm(const std::vector<std::pair<std::string, at::Tensor>>& params, double max_norm) {
  // Per-tensor norms stay on their device and are reduced there; one host sync per device.
  std::vector<at::Tensor> grads;
  std::vector<std::pair<at::Device, std::vector<at::Tensor>>> norms_by_device;
  for (auto& [name, p] : params) {
    const at::Tensor& g = p.grad();
    if (!g.defined()) continue;
    grads.push_back(g);
    // bf16/f16 norms would be rounded to their own dtype: measure in float32 at least.
    at::Tensor n = (g.scalar_type() == at::kDouble ? g.norm() : g.to(at::kFloat).norm()).to(at::kDouble);
    auto it = norms_by_device.begin();
    while (it != norms_by_device.end() && it->first != g.device()) ++it;
    if (it == norms_by_device.end()) {
      norms_by_device.emplace_back(g.device(), std::vector<at::Tensor>{});
      it = norms_by_device.end() - 1;
    }
    it->second.push_back(n);
  }
  double sum_sq = 0;
  for (auto& [device, norms] : norms_by_device) sum_sq += at::stack(norms).pow(2).sum().item<double>();
  const double total = std::sqrt(sum_sq);
  if (max_norm > 0 && std::isfinite(total)) {
    const double coef = max_norm / (total + 1e-6);
    if (coef < 1.0) {
      at::NoGradGuard no_grad;
      for (auto& g : grads) g.mul_(coef);
    }
  }
  return total;
}

double warmup_cosine_lr(int64_t step, int64_t warmup_steps, int64_t total_steps, double base_lr, double min_lr) {
  check(step >= 0 && warmup_steps >= 0 && total_steps >= 0, "lr schedule", "negative step (", step,
        "), warmup_steps (", warmup_steps, ") or total_steps (", total_steps, ")");
  if (step < warmup_steps) return base_lr * double(step) / double(warmup_steps);
  if (step >= total_steps) return min_lr;
  const double progress = double(step - warmup_steps) / double(total_steps - warmup_steps);
  return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + std::cos(3.14159265358979323846 * progress));
}

}  // namespace mlaforge
