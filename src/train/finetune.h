// mlaforge finetune: recover a converted model's accuracy with a short parameter-efficient fine-tune
// (DESIGN.md section 4). Only the chosen decoder weights get gradients and optimizer state; the vision
// tower, embeddings, lm_head and everything else frozen run without an autograd graph.
#pragma once
#include <cstdint>
#include <string>

namespace mlaforge {

struct FinetuneOptions {
  std::string model_dir, data_path, out_dir;
  std::string teacher_dir;   // the original model, for the distillation losses (default: the converted
                             // model's mla.source, where conversion recorded it)
  std::string eval_path;     // periodic and final evaluation (accuracy; KL against the teacher if given)
  std::string resume_dir;    // an earlier run's output directory (its checkpoint/ is restored)
  int stage = 0;             // 1: partial RoPE only (no latent); 2: after low-rank init; 0: from the model
  // attn: the attention projections (q, rotary keys, latent down/up or the stage-1 kv projection, o);
  // attn+norms: also the layers' RMSNorm weights; all-lm: every decoder-layer weight and the final norm;
  // latent: the per-modality latent down/up projections alone (a stage-2 model).
  std::string trainable = "attn+norms";
  // ce: cross-entropy on answer tokens; ce+kl: plus KL(teacher || student) of the next-token distribution
  // on the same positions; ce+attn-mse: plus each layer's attention-output error against the teacher
  // (relative MSE over real tokens, averaged over layers); ce+kl+attn-mse: both terms.
  std::string loss = "ce+kl";
  double kl_weight = 10.0, mse_weight = 1.0;
  // Where ce+kl compares the next-token distributions: answers (the answer tokens' positions, as the
  // cross-entropy) or text (every real text position: the prompt's text tokens too; image tokens excluded).
  std::string kl_positions = "answers";
  int64_t epochs = 1, steps = 0;  // steps > 0 overrides epochs (optimizer steps)
  int64_t limit = 0;              // use only the first N training rows
  double lr = 2e-4, min_lr = 0.0, weight_decay = 0.0, warmup = 0.05, clip = 1.0;
  int64_t batch = 16, grad_accum = 1;
  int64_t eval_every = 0, eval_limit = 0, save_every = 50;
  bool eval_before = true;  // also evaluate before training
  uint64_t seed = 0;
  std::string device = "cpu";
  int64_t stop_after = 0;  // stop (as if killed) after this many optimizer steps, for tests of resuming
};

struct FinetuneResult {
  int64_t steps = 0, trainable_parameters = 0, frozen_parameters = 0;
  double final_loss = 0, seconds = 0, tokens_per_s = 0;
  double accuracy_before = -1, accuracy_after = -1;  // on eval_path (-1: not measured)
};

FinetuneResult finetune(const FinetuneOptions& opts);

}  // namespace mlaforge
