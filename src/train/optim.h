// Optimisation for fine-tuning: AdamW over float32 master parameters, global gradient-norm
// clipping and the warmup + cosine learning-rate schedule.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace mlaforge {

struct AdamWOptions {
  double lr = 1e-4;  // informational: step(lr) takes the rate the schedule decides
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
};

// torch.optim.AdamW (the algorithm in PyTorch's docs, decoupled weight decay), per parameter p
// with gradient g at its own step t (counted only on steps where p had a gradient, as torch does):
//   p -= lr*wd*p;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
//   p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).
// Parameters are float32 leaf tensors (requires_grad) on any device; m and v are float32 beside
// them. Gradients of any floating dtype (bf16 too) are converted to float32 on the parameter's
// device before use. A parameter whose grad is undefined is skipped entirely that step.
class AdamW {
 public:
  AdamW(std::vector<std::pair<std::string, at::Tensor>> named_params, AdamWOptions opt);

  // Resets every gradient to undefined (frees it, like torch's zero_grad(set_to_none=True));
  // the next backward() allocates fresh ones.
  void zero_grad();
  // One update with learning rate `lr`, under at::NoGradGuard.
  void step(double lr);
  // Number of step() calls, including restored ones.
  int64_t steps() const { return steps_; }
  const std::vector<std::pair<std::string, at::Tensor>>& params() const { return params_; }
  const AdamWOptions& options() const { return opt_; }

  // Writes m, v and the per-parameter step counts ("adamw.m.<name>", "adamw.v.<name>",
  // "adamw.step.<name>") and, when with_params, the float32 parameters ("adamw.param.<name>")
  // to one safetensors file, with `extra_metadata` (keys must not start with "adamw.") plus
  // "adamw.steps". The write goes to <path>.tmp and is renamed over <path>.
  void save_state(const std::string& path, const std::map<std::string, std::string>& extra_metadata,
                  bool with_params = true) const;
  // Restores what save_state wrote (the parameters too, in place, when the file has them) and
  // returns the extra metadata given to save_state. Every mismatch (a parameter missing from the
  // file or unknown to this optimizer, a different shape, a malformed entry) is an Error naming
  // the file, and leaves the optimizer and its parameters untouched.
  std::map<std::string, std::string> load_state(const std::string& path);

 private:
  struct Slot {
    at::Tensor m, v;  // float32, like the parameter
    int64_t step = 0;
  };
  std::vector<std::pair<std::string, at::Tensor>> params_;
  std::vector<Slot> state_;  // parallel to params_
  AdamWOptions opt_;
  int64_t steps_ = 0;
};

// Scales all gradients by one factor so that their global L2 norm is at most max_norm, like
// torch.nn.utils.clip_grad_norm_ (factor max_norm / (norm + 1e-6), applied only when below 1).
// Returns the norm before clipping. max_norm <= 0 only measures. Undefined gradients are skipped.
// A non-finite norm leaves the gradients untouched (torch would turn them all into NaN); the
// caller sees it in the returned value and should skip the step.
double clip_grad_norm(const std::vector<std::pair<std::string, at::Tensor>>& params, double max_norm);

// Learning rate at `step` (counted from 0): linear from 0 at step 0 to base_lr at
// step == warmup_steps, then cosine from base_lr down to min_lr at step == total_steps, and
// min_lr after. Same shape as transformers' get_cosine_schedule_with_warmup (with a floor).
double warmup_cosine_lr(int64_t step, int64_t warmup_steps, int64_t total_steps, double base_lr,
                        double min_lr = 0.0);

}  // namespace mlaforge
