#include "train/finetune.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <set>

#include "core/device.h"
#include "core/error.h"
#include "core/progress.h"
#include "eval/eval.h"
#include "io/checkpoint.h"
#include "io/dataset.h"
#include "io/safetensors.h"
#include "model/vlm.h"
#include "train/optim.h"
#include "train/train_log.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace mlaforge {
namespace {

// The losses' distillation terms: ce+kl+attn-mse has both.
bool has_kl(const std::string& loss) { return loss == "ce+kl" || loss == "ce+kl+attn-mse"; }
bool has_attn_mse(const std::string& loss) { return loss == "ce+attn-mse" || loss == "ce+kl+attn-mse"; }
bool wants_teacher(const std::string& loss) { return has_kl(loss) || has_attn_mse(loss); }

bool is_trainable(const std::string& name, const std::string& which) {
  if (which == "all-lm") return true;
  // latent: only the per-modality latent down/up projections (and the up bias); the query, rotary-key and
  // output projections, which image and text tokens share, stay as converted.
  if (which == "latent")
    return name.find(".self_attn.kv_down_proj.") != std::string::npos ||
           name.find(".self_attn.kv_up_proj.") != std::string::npos;
  const bool attn = name.find(".self_attn.") != std::string::npos;
  const bool norm = name.find("input_layernorm.") != std::string::npos ||
                    name.find("post_attention_layernorm.") != std::string::npos;
  return attn || (which == "attn+norms" && norm);
}

// One teacher-forced micro-batch: prompts + answers, and where the answers are predicted.
struct ForcedBatch {
  Batch batch;
  at::Tensor where;    // [N] flat (row * T + position) of the positions that predict answer tokens
  at::Tensor targets;  // [N] the answer tokens (and end token) they predict
  at::Tensor text_where;  // [M] flat positions of every real text token (--kl-positions text)
  int64_t tokens = 0;  // real tokens in the batch
};

// text_positions: also list every real text position (text_where), for --kl-positions text.
ForcedBatch forced_batch(const Vlm& m, const std::vector<Conversation>& rows, const std::vector<size_t>& pick,
                         bool text_positions) {
  std::vector<Prompt> prompts;
  std::vector<std::vector<int64_t>> answers;
  for (size_t i : pick) {
    prompts.push_back(question_prompt(rows[i]));
    answers.push_back(answer_ids(m, rows[i]));
  }
  Batch q;
  try {
    q = m.prepare(prompts);
  } catch (const Error& e) {
    throw Error(rows[pick[0]].where + " (batch from here): " + e.what());
  }
  std::vector<std::vector<int64_t>> forced;
  std::vector<int64_t> prompt_len;
  for (int64_t r = 0; r < q.batch(); ++r) {
    at::Tensor row = q.ids[r].masked_select(q.valid[r]).cpu().contiguous();
    std::vector<int64_t> ids(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + row.numel());
    prompt_len.push_back(int64_t(ids.size()));
    const auto& a = answers[size_t(r)];
    ids.insert(ids.end(), a.begin(), a.end() - 1);
    forced.push_back(std::move(ids));
  }
  ForcedBatch f;
  f.batch = m.make_batch(forced, q.pixel_values, q.grids);
  f.batch.image_keys = q.image_keys;
  const int64_t T = f.batch.length();
  std::vector<int64_t> where, targets;
  for (size_t r = 0; r < forced.size(); ++r) {
    const int64_t first = T - int64_t(forced[r].size()) + prompt_len[r] - 1;
    for (size_t j = 0; j < answers[r].size(); ++j) {
      where.push_back(int64_t(r) * T + first + int64_t(j));
      targets.push_back(answers[r][j]);
    }
    f.tokens += int64_t(forced[r].size());
  }
  f.where = at::tensor(where, at::kLong);
  f.targets = at::tensor(targets, at::kLong);
  if (text_positions) f.text_where = (f.batch.valid & f.batch.is_image.logical_not()).reshape({-1}).nonzero().squeeze(1);
  return f;
}

struct Outputs {
  at::Tensor logits;                 // [N, V] at the answer positions
  at::Tensor text_logits;            // [M, V] at every real text position (when the batch lists them)
  std::vector<at::Tensor> attention; // per layer [B, T, d] (when asked)
};

Outputs run(const Vlm& m, const ForcedBatch& f, const at::Device& dev, bool attention) {
  const Batch& b = f.batch;  // on the model's device (make_batch put it there)
  CacheOptions expanded;  // training runs the expanded form (DESIGN.md section 3)
  expanded.expanded = true;
  KVCache cache = m.decoder().new_cache(b.batch(), b.length(), dev, expanded);
  Outputs o;
  ForwardTaps taps;
  if (attention) taps.attention = &o.attention;
  at::Tensor h = m.prefill(b, cache, taps);
  at::Tensor flat = h.reshape({-1, h.size(-1)});
  o.logits = m.decoder().logits(flat.index_select(0, f.where.to(dev))).to(at::kFloat);
  if (f.text_where.defined()) o.text_logits = m.decoder().logits(flat.index_select(0, f.text_where.to(dev))).to(at::kFloat);
  return o;
}

std::string opt_summary(const FinetuneOptions& o) {
  return str("model=", o.model_dir, " data=", o.data_path, " limit=", o.limit, " loss=", o.loss, " trainable=",
             o.trainable, " lr=", o.lr, " batch=", o.batch, " grad_accum=", o.grad_accum, " seed=", o.seed,
             " epochs=", o.epochs, " steps=", o.steps, " kl_weight=", o.kl_weight, " kl_positions=", o.kl_positions,
             " mse_weight=", o.mse_weight);
}

}  // namespace

FinetuneResult finetune(const FinetuneOptions& o) {
  const auto t_start = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count(); };
  check(o.loss == "ce" || wants_teacher(o.loss), "--loss", "choose ce, ce+kl, ce+attn-mse or ce+kl+attn-mse (got \"",
        o.loss, "\")");
  check(o.kl_positions == "answers" || o.kl_positions == "text", "--kl-positions",
        "choose answers or text (got \"", o.kl_positions, "\")");
  check(o.trainable == "attn" || o.trainable == "attn+norms" || o.trainable == "all-lm" || o.trainable == "latent",
        "--trainable", "choose attn, attn+norms, all-lm or latent (got \"", o.trainable, "\")");

  check(o.batch > 0 && o.grad_accum > 0, "--batch", "batch and grad-accum must be positive");
  const at::Device dev = parse_device(o.device);
  check(fs::absolute(o.out_dir).lexically_normal() != fs::absolute(o.model_dir).lexically_normal(), o.out_dir,
        "the output directory must differ from the input model");

  auto student = Vlm::load(o.model_dir);
  const MlaConfig& mla = student->config().mla;
  std::string teacher_dir = o.teacher_dir;
  if (teacher_dir.empty() && wants_teacher(o.loss) && !mla.source.empty() && fs::exists(mla.source)) {
    teacher_dir = mla.source;
    std::fprintf(stderr, "teacher: %s (the model this one was converted from)\n", teacher_dir.c_str());
  }
  check(!wants_teacher(o.loss) || !teacher_dir.empty(), "--teacher", "loss ", o.loss,
        " distils from the original model: give --teacher ORIGINAL (", o.model_dir, " does not record it)");
  if (o.stage == 1)
    check(mla.enabled && mla.latent_dim == 0, student->config().path,
          "--stage 1 trains a partial-RoPE model without a latent (convert with --dkv full)");
  if (o.stage == 2)
    check(mla.enabled && mla.latent_dim > 0, student->config().path,
          "--stage 2 trains a model with a low-rank latent (convert with --dkv N)");
  std::unique_ptr<Vlm> teacher;
  if (wants_teacher(o.loss)) {
    teacher = Vlm::load(teacher_dir);
    check(teacher->config().text.vocab_size == student->config().text.vocab_size, teacher_dir,
          "the teacher's vocabulary differs from the student's");
    check(teacher->config().text.num_layers == student->config().text.num_layers || !has_attn_mse(o.loss), teacher_dir,
          "attention-output distillation needs the same number of layers");
    teacher->to(dev);
  }
  student->to(dev);

  // Trainable weights: the decoder's, by name; everything else stays without gradients.
  std::vector<std::pair<std::string, at::Tensor>> params;
  std::set<std::string> trained_names;
  FinetuneResult res;
  for (auto& [name, t] : student->mutable_decoder().named_weights()) {
    if (is_trainable(name, o.trainable) && t->is_floating_point()) {
      t->requires_grad_(true);  // in place: tied tensors stay one tensor
      params.emplace_back(name, *t);
      trained_names.insert(student->lm_prefix() + name);
      res.trainable_parameters += t->numel();
    } else {
      res.frozen_parameters += t->numel();
    }
  }
  check(!params.empty(), o.model_dir, "no trainable weights for --trainable ", o.trainable);
  AdamWOptions ao;
  ao.lr = o.lr;
  ao.weight_decay = o.weight_decay;
  AdamW opt(params, ao);

  auto rows = load_conversations(o.data_path, o.limit);
  check(!rows.empty(), o.data_path, "no training records");
  std::vector<Conversation> eval_rows;
  if (!o.eval_path.empty()) eval_rows = load_conversations(o.eval_path, o.eval_limit);

  const int64_t micro_per_epoch = (int64_t(rows.size()) + o.batch - 1) / o.batch;
  const int64_t steps_per_epoch = std::max<int64_t>(1, micro_per_epoch / o.grad_accum);
  const int64_t total = o.steps > 0 ? o.steps : steps_per_epoch * std::max<int64_t>(1, o.epochs);
  const int64_t warmup = int64_t(std::round(o.warmup * double(total)));

  fs::create_directories(o.out_dir + "/checkpoint");
  int64_t step = 0;
  if (!o.resume_dir.empty()) {
    const std::string state = o.resume_dir + "/checkpoint/state.safetensors";
    check(fs::exists(state), state, "no checkpoint to resume from");
    auto meta = opt.load_state(state);
    check(meta.count("options") && meta.at("options") == opt_summary(o), state,
          "was written with other options (", meta.count("options") ? meta.at("options") : "?", ")");
    step = std::stoll(meta.at("step"));
  }
  TrainLog log(o.out_dir, !o.resume_dir.empty(), step);

  EvalOptions eo;
  eo.batch_size = 16;
  auto run_eval = [&](int64_t at_step) {
    at::NoGradGuard no_grad;
    EvalReport r = evaluate(*student, eval_rows, eo);
    double kl = std::nan("");
    if (teacher) kl = answer_kl(*student, *teacher, eval_rows, eo.batch_size).mean_kl;
    log.log_eval(at_step, r.accuracy, kl);
    std::fprintf(stderr, "eval at step %lld: accuracy %.4f%s\n", (long long)at_step, r.accuracy,
                 teacher ? str(", KL ", kl).c_str() : "");
    return r.accuracy;
  };
  if (!eval_rows.empty() && step == 0 && o.eval_before) res.accuracy_before = run_eval(0);

  // The micro-batches in order: epoch e visits the rows in a permutation drawn from seed + e, so a
  // resumed run sees exactly the batches the uninterrupted one would.
  auto micro_rows = [&](int64_t micro) {
    const int64_t epoch = micro / micro_per_epoch, k = micro % micro_per_epoch;
    std::vector<size_t> perm(rows.size());
    std::iota(perm.begin(), perm.end(), size_t(0));
    std::mt19937_64 rng(o.seed * 1000003ull + uint64_t(epoch));
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<size_t> pick(perm.begin() + k * o.batch,
                             perm.begin() + std::min<int64_t>(int64_t(rows.size()), (k + 1) * o.batch));
    return pick;
  };

  Progress bar("finetune", total);
  bar.advance(step);
  int64_t tokens = 0;
  const double run_start = elapsed();
  double loss_v = 0;
  const bool kl_term = has_kl(o.loss), mse_term = has_attn_mse(o.loss);  // the loss's distillation terms
  const bool kl_text = kl_term && o.kl_positions == "text";              // KL over every text position
  for (; step < total; ++step) {
    double ce_sum = 0, kl_sum = 0, mse_sum = 0;
    int64_t step_tokens = 0;
    for (int64_t a = 0; a < o.grad_accum; ++a) {
      ForcedBatch f = forced_batch(*student, rows, micro_rows(step * o.grad_accum + a), kl_text);
      step_tokens += f.tokens;
      Outputs s = run(*student, f, dev, mse_term);
      at::Tensor logp = at::log_softmax(s.logits, -1);
      at::Tensor targets = f.targets.to(dev);
      at::Tensor ce = -logp.gather(1, targets.unsqueeze(1)).mean();
      at::Tensor loss = ce;
      if (teacher) {
        Outputs t;
        {
          at::NoGradGuard no_grad;
          t = run(*teacher, f, dev, mse_term);
        }
        if (kl_term) {
          at::Tensor tlogp = at::log_softmax(kl_text ? t.text_logits : t.logits, -1);
          at::Tensor slogp = kl_text ? at::log_softmax(s.text_logits, -1) : logp;
          at::Tensor kl = (tlogp.exp() * (tlogp - slogp)).sum(-1).mean();
          loss = loss + o.kl_weight * kl;
          kl_sum += kl.item<double>();
        }
        if (mse_term) {
          at::Tensor valid = f.batch.valid.to(dev).unsqueeze(-1).to(at::kFloat);
          at::Tensor mse = at::zeros({}, logp.options());
          for (size_t l = 0; l < s.attention.size(); ++l) {
            at::Tensor diff = (s.attention[l] - t.attention[l]) * valid;
            mse = mse + diff.pow(2).sum() / ((t.attention[l] * valid).pow(2).sum() + 1e-12);
          }
          mse = mse / double(s.attention.size());
          loss = loss + o.mse_weight * mse;
          mse_sum += mse.item<double>();
        }
      }
      (loss / double(o.grad_accum)).backward();
      ce_sum += ce.item<double>();
      loss_v = loss.item<double>();
    }
    const double gnorm = clip_grad_norm(opt.params(), o.clip);
    const double lr = warmup_cosine_lr(step, warmup, total, o.lr, o.min_lr);
    opt.step(lr);
    opt.zero_grad();
    tokens += step_tokens;
    const double secs = elapsed() - run_start;
    StepRecord rec;
    rec.step = step + 1;
    rec.epoch = double((step + 1) * o.grad_accum) / double(micro_per_epoch);
    rec.ce = ce_sum / double(o.grad_accum);
    if (kl_term) rec.kl = kl_sum / double(o.grad_accum);
    if (mse_term) rec.mse = mse_sum / double(o.grad_accum);
    rec.loss = rec.ce + (kl_term ? o.kl_weight * rec.kl : 0) + (mse_term ? o.mse_weight * rec.mse : 0);
    rec.lr = lr;
    rec.grad_norm = gnorm;
    rec.tokens_per_s = double(tokens) / std::max(secs, 1e-9);
    rec.seconds = secs;
    log.log_step(rec);
    loss_v = rec.loss;
    bar.advance(1, str("loss ", rec.loss, " ", int64_t(rec.tokens_per_s), " tok/s"));
    const bool last = step + 1 == total;
    // Eval before the checkpoint, so a run killed between them does not lose the eval row on resume.
    if (!eval_rows.empty() && o.eval_every > 0 && (step + 1) % o.eval_every == 0 && !last) run_eval(step + 1);
    if ((o.save_every > 0 && (step + 1) % o.save_every == 0) || last)
      opt.save_state(o.out_dir + "/checkpoint/state.safetensors",
                     {{"step", std::to_string(step + 1)}, {"options", opt_summary(o)}});
    if (o.stop_after > 0 && step + 1 >= o.stop_after && !last) {
      res.steps = step + 1;
      res.final_loss = loss_v;
      return res;  // as if killed after this step's checkpoint
    }
  }
  bar.finish();
  res.steps = total;
  res.final_loss = loss_v;
  res.tokens_per_s = double(tokens) / std::max(elapsed() - run_start, 1e-9);
  if (!eval_rows.empty()) res.accuracy_after = run_eval(total);

  // The fine-tuned model: trained weights in float32, every other tensor exactly as it was.
  ShardWriter out(o.out_dir);
  const WeightStore& ws = student->weights();
  std::map<std::string, at::Tensor> trained;
  for (auto& [name, t] : params) trained[student->lm_prefix() + name] = t.detach().to(at::kCPU, at::kFloat);
  out.copy_from(ws, [&](const std::string& name) { return trained.count(name) == 0; });
  for (auto& [name, t] : trained) out.add(name, t);
  out.finish();
  copy_model_files(o.model_dir, o.out_dir);
  fs::copy_file(student->config().path, o.out_dir + "/config.json", fs::copy_options::overwrite_existing);
  res.seconds = elapsed();
  json report = {{"model", o.model_dir},
                 {"data", o.data_path},
                 {"options", opt_summary(o)},
                 {"steps", res.steps},
                 {"trainable_parameters", res.trainable_parameters},
                 {"frozen_parameters", res.frozen_parameters},
                 {"final_loss", res.final_loss},
                 {"tokens_per_s", res.tokens_per_s},
                 {"device", o.device},
                 {"seconds", res.seconds},
                 {"accuracy_before", res.accuracy_before},
                 {"accuracy_after", res.accuracy_after}};
  std::ofstream(o.out_dir + "/finetune_report.json") << report.dump(1) << "\n";
  log.plot();
  return res;
}

}  // namespace mlaforge
