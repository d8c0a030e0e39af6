// AdamW against an independent float64 reference, exact save/resume, gradient clipping, the
// learning-rate schedule and the training logs.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

#include <dirent.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/error.h"
#include "io/safetensors.h"
#include "train/optim.h"
#include "train/train_log.h"

namespace fs = std::filesystem;

namespace mlaforge {
namespace {

using NamedParams = std::vector<std::pair<std::string, at::Tensor>>;

// Beyond temp_directory_path, file handling here is POSIX: PyTorch's pip wheels export their own
// statically linked std::filesystem (pytorch/pytorch#133437), and a test binary linked against
// them can bind to it and crash (remove_all did, with torch 2.11).
void remove_tree(const std::string& path) {
  ::nftw(path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
         FTW_DEPTH | FTW_PHYS);
}

bool path_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d))
      if (std::string(e->d_name) != "." && std::string(e->d_name) != "..") names.push_back(e->d_name);
    ::closedir(d);
  }
  return names;
}

// A fresh empty directory under the system temp dir, removed afterwards.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& name)
      : path_(fs::temp_directory_path().string() + "/mlaforge_optim_" + name + "_" + std::to_string(::getpid())) {
    remove_tree(path_);
    EXPECT_EQ(::mkdir(path_.c_str(), 0777), 0) << path_;
  }
  ~ScratchDir() { remove_tree(path_); }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& rel) const { return path_ + "/" + rel; }

 private:
  std::string path_;
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

at::Tensor leaf(const at::Tensor& values) { return values.to(at::kFloat).clone().set_requires_grad(true); }

// Deterministic gradient for parameter `k` at step `t` (no RNG state involved).
at::Tensor grad_for(const at::Tensor& p, int k, int t) {
  at::Tensor i = at::arange(p.numel(), at::kDouble).reshape(p.sizes());
  return (at::sin(i * (0.7 + 0.3 * k) + 1.3 * t) * (1.0 + 0.5 * t)).to(at::kFloat);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// ---- AdamW -------------------------------------------------------------------------------------

TEST(AdamW, MatchesFloat64ReferenceWithWeightDecay) {
  const double b1 = 0.8, b2 = 0.95, eps = 1e-6, wd = 0.1;
  const double lrs[3] = {1e-2, 5e-3, 2e-3};
  at::Tensor p0 = at::linspace(-1.5, 2.0, 12, at::kDouble).reshape({3, 4});
  at::Tensor p = leaf(p0);
  AdamW opt({{"w", p}}, AdamWOptions{1e-2, b1, b2, eps, wd});

  // Reference, written out from the PyTorch docs' AdamW algorithm in float64.
  at::Tensor ref = p0.clone(), m = at::zeros_like(p0), v = at::zeros_like(p0);
  for (int t = 1; t <= 3; ++t) {
    at::Tensor g = grad_for(p, 0, t);
    p.mutable_grad() = g;
    opt.step(lrs[t - 1]);
    opt.zero_grad();
    EXPECT_FALSE(p.grad().defined());

    at::Tensor gd = g.to(at::kDouble);
    ref = ref - lrs[t - 1] * wd * ref;
    m = b1 * m + (1 - b1) * gd;
    v = b2 * v + (1 - b2) * gd * gd;
    at::Tensor m_hat = m / (1 - std::pow(b1, t)), v_hat = v / (1 - std::pow(b2, t));
    ref = ref - lrs[t - 1] * m_hat / (at::sqrt(v_hat) + eps);
  }
  EXPECT_EQ(opt.steps(), 3);
  EXPECT_EQ(p.scalar_type(), at::kFloat);
  EXPECT_TRUE(p.requires_grad());
  // The parameters moved by ~3 * lr; float32 rounding of the result is ~1e-7.
  EXPECT_GT((ref - p0).abs().max().item<double>(), 1e-3);
  EXPECT_LT((p.to(at::kDouble) - ref).abs().max().item<double>(), 1e-6);
}

TEST(AdamW, Bf16GradientsGiveTheFloat32Update) {
  at::Tensor init = at::linspace(-1, 1, 10, at::kFloat);
  at::Tensor a = leaf(init), b = leaf(init);
  AdamW opt_a({{"p", a}}, AdamWOptions{1e-3, 0.9, 0.999, 1e-8, 0.01});
  AdamW opt_b({{"p", b}}, AdamWOptions{1e-3, 0.9, 0.999, 1e-8, 0.01});
  for (int t = 1; t <= 3; ++t) {
    at::Tensor g16 = grad_for(a, 0, t).to(at::kBFloat16);
    a.mutable_grad() = g16;
    b.mutable_grad() = g16.to(at::kFloat);
    opt_a.step(1e-2);
    opt_b.step(1e-2);
  }
  EXPECT_TRUE(at::equal(a, b));
}

TEST(AdamW, SkipsParametersWithoutGradient) {
  at::Tensor a = leaf(at::ones({3})), b = leaf(at::ones({2}));
  AdamW opt({{"a", a}, {"b", b}}, AdamWOptions{1e-2, 0.9, 0.999, 1e-8, 0.5});
  a.mutable_grad() = at::ones({3});
  opt.step(1e-2);
  EXPECT_TRUE(at::equal(b, at::ones({2})));  // no decay either, as in torch
  EXPECT_FALSE(at::equal(a, at::ones({3})));
  // b's first update later still uses bias correction for its own first step: moves by ~lr.
  opt.zero_grad();
  b.mutable_grad() = at::ones({2});
  opt.step(1e-2);
  at::Tensor expected = at::full({2}, 1.0 - 1e-2 * 0.5) - 1e-2 * 1.0 / (1.0 + 1e-8);
  EXPECT_LT((b - expected).abs().max().item<double>(), 1e-7);
}

TEST(AdamW, ConvergesOnAQuadratic) {
  at::Tensor target = at::linspace(-3, 3, 8, at::kFloat);
  at::Tensor scale = at::linspace(0.1, 10, 8, at::kFloat);  // badly conditioned on purpose
  at::Tensor p = leaf(at::zeros({8}));
  AdamW opt({{"p", p}}, AdamWOptions{});
  const int total = 600;
  double first_loss = 0, loss_value = 0;
  for (int step = 0; step < total; ++step) {
    opt.zero_grad();
    at::Tensor loss = ((p - target).pow(2) * scale).sum();
    loss.backward();
    loss_value = loss.item<double>();
    if (step == 0) first_loss = loss_value;
    opt.step(warmup_cosine_lr(step, 20, total, 0.1));
  }
  EXPECT_GT(first_loss, 10.0);
  EXPECT_LT((p - target).abs().max().item<double>(), 1e-3);
}

TEST(AdamW, SaveLoadResumesBitExactly) {
  ScratchDir dir("resume");
  at::Tensor a0 = at::linspace(-1, 1, 20, at::kFloat).reshape({4, 5}), b0 = at::linspace(2, 3, 7, at::kFloat);
  AdamWOptions o{1e-3, 0.9, 0.99, 1e-8, 0.05};
  auto run = [&](AdamW& opt, int from, int to) {
    for (int t = from; t < to; ++t) {
      opt.zero_grad();
      for (size_t k = 0; k < opt.params().size(); ++k) {
        if (k == 1 && t == 1) continue;  // b gets no gradient once: its own step count lags
        at::Tensor p = opt.params()[k].second;
        p.mutable_grad() = grad_for(p, int(k), t);
      }
      opt.step(warmup_cosine_lr(t, 2, 10, 1e-2));
    }
  };
  at::Tensor a = leaf(a0), b = leaf(b0);
  AdamW opt({{"a", a}, {"b", b}}, o);
  run(opt, 0, 3);
  const std::string path = dir / "optim.safetensors";
  opt.save_state(path, {{"epoch", "1"}, {"data_pos", "17"}});
  EXPECT_FALSE(path_exists(path + ".tmp"));
  // Without params too: the parameters then come from elsewhere (here: copies of the current ones).
  const std::string path_np = dir / "optim_noparams.safetensors";
  opt.save_state(path_np, {}, /*with_params=*/false);

  at::Tensor a2 = leaf(a0), b2 = leaf(b0);  // fresh copies of the initial values
  AdamW restored({{"a", a2}, {"b", b2}}, o);
  auto md = restored.load_state(path);
  EXPECT_EQ(md, (std::map<std::string, std::string>{{"epoch", "1"}, {"data_pos", "17"}}));
  EXPECT_EQ(restored.steps(), 3);
  EXPECT_TRUE(at::equal(a2, a));
  EXPECT_TRUE(at::equal(b2, b));

  at::Tensor a3 = leaf(a.detach()), b3 = leaf(b.detach());
  AdamW restored_np({{"a", a3}, {"b", b3}}, o);
  EXPECT_TRUE(restored_np.load_state(path_np).empty());

  run(opt, 3, 5);
  run(restored, 3, 5);
  run(restored_np, 3, 5);
  EXPECT_EQ(restored.steps(), 5);
  EXPECT_TRUE(at::equal(a2, a));
  EXPECT_TRUE(at::equal(b2, b));
  EXPECT_TRUE(at::equal(a3, a));
  EXPECT_TRUE(at::equal(b3, b));
  EXPECT_FALSE(at::equal(a, a0));
}

TEST(AdamW, LoadRejectsMismatchedState) {
  ScratchDir dir("mismatch");
  at::Tensor a = leaf(at::ones({2, 3})), b = leaf(at::ones({4}));
  AdamW opt({{"a", a}, {"b", b}}, AdamWOptions{});
  a.mutable_grad() = at::ones({2, 3});
  b.mutable_grad() = at::ones({4});
  opt.step(1e-3);
  const std::string path = dir / "state.safetensors";
  opt.save_state(path, {});

  {  // the file has a parameter this optimizer lacks
    at::Tensor a2 = leaf(at::ones({2, 3}));
    AdamW other({{"a", a2}}, AdamWOptions{});
    std::string e = error_of([&] { other.load_state(path); });
    EXPECT_NE(e.find(path), std::string::npos) << e;
    EXPECT_NE(e.find("'b'"), std::string::npos) << e;
  }
  {  // this optimizer has a parameter the file lacks; nothing changes on failure
    at::Tensor a2 = leaf(at::zeros({2, 3})), b2 = leaf(at::zeros({4})), c2 = leaf(at::zeros({5}));
    AdamW other({{"a", a2}, {"b", b2}, {"c", c2}}, AdamWOptions{});
    std::string e = error_of([&] { other.load_state(path); });
    EXPECT_NE(e.find(path), std::string::npos) << e;
    EXPECT_NE(e.find("'c'"), std::string::npos) << e;
    EXPECT_EQ(other.steps(), 0);
    EXPECT_TRUE(at::equal(a2, at::zeros({2, 3})));
  }
  {  // a shape differs
    at::Tensor a2 = leaf(at::zeros({3, 2})), b2 = leaf(at::zeros({4}));
    AdamW other({{"a", a2}, {"b", b2}}, AdamWOptions{});
    std::string e = error_of([&] { other.load_state(path); });
    EXPECT_NE(e.find(path), std::string::npos) << e;
    EXPECT_NE(e.find("[2, 3]"), std::string::npos) << e;
    EXPECT_NE(e.find("[3, 2]"), std::string::npos) << e;
  }
  {  // not an optimizer state at all
    const std::string other_path = dir / "weights.safetensors";
    save_safetensors(other_path, {{"a", at::ones({2, 3})}});
    std::string e = error_of([&] { opt.load_state(other_path); });
    EXPECT_NE(e.find(other_path), std::string::npos) << e;
  }
  EXPECT_NE(error_of([&] { opt.load_state(dir / "missing.safetensors"); }), "");
  EXPECT_NE(error_of([&] { opt.save_state(dir / "x.safetensors", {{"adamw.steps", "9"}}); }), "");
}

TEST(AdamW, RejectsNonMasterParameters) {
  EXPECT_NE(error_of([] { AdamW({{"h", at::ones({2}, at::kHalf).set_requires_grad(true)}}, {}); }), "");
  EXPECT_NE(error_of([] { AdamW({{"x", at::ones({2})}}, {}); }), "");  // no requires_grad
  at::Tensor p = leaf(at::ones({2}));
  EXPECT_NE(error_of([&] { AdamW({{"x", p}, {"x", p}}, {}); }), "");
}

TEST(AdamW, CudaMatchesCpuAndResumes) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  ScratchDir dir("cuda");
  at::Tensor init = at::linspace(-1, 1, 64, at::kFloat).reshape({8, 8});
  at::Tensor pc = leaf(init), pg = leaf(init.to(at::kCUDA));
  AdamWOptions o{1e-3, 0.9, 0.999, 1e-8, 0.1};
  AdamW cpu({{"w", pc}}, o), gpu({{"w", pg}}, o);
  for (int t = 1; t <= 3; ++t) {
    at::Tensor g16 = grad_for(pc, 0, t).to(at::kBFloat16);
    pc.mutable_grad() = g16.to(at::kFloat);
    pg.mutable_grad() = g16.to(at::kCUDA);  // bf16 gradient on the GPU
    cpu.step(1e-2);
    gpu.step(1e-2);
  }
  EXPECT_TRUE(pg.is_cuda());
  EXPECT_LT((pg.cpu() - pc).abs().max().item<double>(), 1e-6);

  pg.mutable_grad() = grad_for(pc, 0, 4).to(at::kCUDA);
  EXPECT_NEAR(clip_grad_norm(gpu.params(), 1.0), grad_for(pc, 0, 4).norm().item<double>(), 1e-4);

  gpu.save_state(dir / "s.safetensors", {});
  at::Tensor pg2 = leaf(at::zeros({8, 8}, at::kCUDA));
  AdamW gpu2({{"w", pg2}}, o);
  gpu2.load_state(dir / "s.safetensors");
  for (AdamW* opt : {&gpu, &gpu2}) {
    opt->params()[0].second.mutable_grad() = grad_for(pc, 0, 5).to(at::kCUDA);
    opt->step(1e-2);
  }
  EXPECT_TRUE(pg2.is_cuda());
  EXPECT_TRUE(at::equal(pg2, pg));
}

// ---- gradient clipping ---------------------------------------------------------------------------

TEST(AdamW, ClipGradNormMatchesDirectComputation) {
  at::Tensor a = leaf(at::zeros({3, 4})), b = leaf(at::zeros({5})), c = leaf(at::zeros({2}));
  NamedParams params = {{"a", a}, {"b", b}, {"c", c}};
  at::Tensor ga = grad_for(a, 0, 1), gb = grad_for(b, 1, 2).to(at::kBFloat16);  // c: no gradient
  const double norm = std::sqrt(ga.to(at::kDouble).pow(2).sum().item<double>() +
                                gb.to(at::kDouble).pow(2).sum().item<double>());
  auto set_grads = [&] {
    a.mutable_grad() = ga.clone();
    b.mutable_grad() = gb.clone();
  };

  set_grads();
  const double max_norm = norm / 4;
  EXPECT_NEAR(clip_grad_norm(params, max_norm), norm, 1e-6 * norm);
  const double coef = max_norm / (norm + 1e-6);
  EXPECT_LT((a.grad().to(at::kDouble) - ga.to(at::kDouble) * coef).abs().max().item<double>(), 1e-6);
  EXPECT_LT((b.grad().to(at::kDouble) - gb.to(at::kDouble) * coef).abs().max().item<double>(), 1e-2);
  EXPECT_EQ(b.grad().scalar_type(), at::kBFloat16);
  EXPECT_FALSE(c.grad().defined());
  EXPECT_NEAR(clip_grad_norm(params, 0), max_norm, 1e-2 * max_norm);

  set_grads();  // below the threshold: untouched
  EXPECT_NEAR(clip_grad_norm(params, norm * 2), norm, 1e-6 * norm);
  EXPECT_TRUE(at::equal(a.grad(), ga));
  EXPECT_TRUE(at::equal(b.grad(), gb));
  EXPECT_NEAR(clip_grad_norm(params, 0), norm, 1e-6 * norm);  // max_norm <= 0: measure only
  EXPECT_TRUE(at::equal(a.grad(), ga));

  a.mutable_grad() = at::full({3, 4}, std::nan(""));  // non-finite: reported, grads kept
  EXPECT_TRUE(std::isnan(clip_grad_norm(params, 1.0)));
  EXPECT_TRUE(at::equal(b.grad(), gb));

  EXPECT_EQ(clip_grad_norm({{"c", c}}, 1.0), 0.0);
}

// ---- schedule --------------------------------------------------------------------------------------

TEST(Schedule, WarmupThenCosine) {
  const double base = 1e-3, floor = 1e-5;
  EXPECT_EQ(warmup_cosine_lr(0, 10, 110, base, floor), 0.0);
  EXPECT_NEAR(warmup_cosine_lr(5, 10, 110, base, floor), 0.5e-3, 1e-15);
  EXPECT_NEAR(warmup_cosine_lr(10, 10, 110, base, floor), base, 1e-15);
  EXPECT_NEAR(warmup_cosine_lr(60, 10, 110, base, floor), floor + (base - floor) / 2, 1e-15);
  EXPECT_NEAR(warmup_cosine_lr(35, 10, 110, base, floor), floor + (base - floor) * 0.5 * (1 + std::cos(M_PI / 4)),
              1e-15);
  EXPECT_NEAR(warmup_cosine_lr(109, 10, 110, base, floor), floor, 1e-3 * base);  // (1 + cos(0.99 pi)) / 2 = 2.5e-4
  EXPECT_EQ(warmup_cosine_lr(110, 10, 110, base, floor), floor);
  EXPECT_EQ(warmup_cosine_lr(500, 10, 110, base, floor), floor);
  EXPECT_EQ(warmup_cosine_lr(0, 0, 100, base), base);  // no warmup
  EXPECT_NEAR(warmup_cosine_lr(50, 0, 100, base), base / 2, 1e-15);
  for (int s = 1; s < 110; ++s)  // monotone: up, then down
    EXPECT_EQ(warmup_cosine_lr(s, 10, 110, base) >= warmup_cosine_lr(s - 1, 10, 110, base), s <= 10) << s;
  EXPECT_THROW(warmup_cosine_lr(-1, 10, 110, base), Error);
}

// ---- training logs --------------------------------------------------------------------------------

StepRecord record(int64_t step) {
  StepRecord r;
  r.step = step;
  r.epoch = step / 4.0;
  r.loss = 2.5 - 0.125 * step;
  r.ce = r.loss;
  r.lr = 1e-4;
  r.grad_norm = 0.75;
  r.tokens_per_s = 1234.5;
  r.seconds = 0.5 * step;
  return r;
}

TEST(TrainLog, WritesCsv) {
  ScratchDir dir("csv");
  const std::string logdir = dir / "run/logs";  // created on demand
  {
    TrainLog log(logdir, false, 0);
    log.log_step(record(1));
    StepRecord r = record(2);
    r.kl = 0.1;
    r.mse = 1.0 / 3.0;
    r.lr = 2e-5;
    log.log_step(r);
    log.log_eval(2, 0.625, std::nan(""));
    log.log_eval(4, 0.75, 0.0123);
  }
  EXPECT_EQ(read_file(logdir + "/train_log.csv"),
            "step,epoch,loss,ce,kl,mse,lr,grad_norm,tokens_per_s,seconds\n"
            "1,0.25,2.375,2.375,,,0.0001,0.75,1234.5,0.5\n"
            "2,0.5,2.25,2.25,0.1,0.333333333,2e-05,0.75,1234.5,1\n");
  EXPECT_EQ(read_file(logdir + "/eval_log.csv"),
            "step,accuracy,mean_kl\n"
            "2,0.625,\n"
            "4,0.75,0.0123\n");
  {  // a fresh (not resumed) run starts the files over
    TrainLog log(logdir, false, 0);
    log.log_step(record(1));
  }
  EXPECT_EQ(read_file(logdir + "/train_log.csv"),
            "step,epoch,loss,ce,kl,mse,lr,grad_norm,tokens_per_s,seconds\n"
            "1,0.25,2.375,2.375,,,0.0001,0.75,1234.5,0.5\n");
  EXPECT_EQ(read_file(logdir + "/eval_log.csv"), "step,accuracy,mean_kl\n");
}

TEST(TrainLog, ResumeTruncatesToTheCheckpoint) {
  ScratchDir dir("resume_log");
  const std::string whole = dir / "whole", cut = dir / "cut";
  {  // uninterrupted: steps 1..10, eval every 5
    TrainLog log(whole, false, 0);
    for (int s = 1; s <= 10; ++s) {
      log.log_step(record(s));
      if (s % 5 == 0) log.log_eval(s, 0.1 * s, 0.01 * s);
    }
  }
  {  // killed after step 8 (last checkpoint at 5), in the middle of writing a row
    TrainLog log(cut, false, 0);
    for (int s = 1; s <= 8; ++s) {
      log.log_step(record(s));
      if (s % 5 == 0) log.log_eval(s, 0.1 * s, 0.01 * s);
    }
  }
  std::ofstream(cut + "/train_log.csv", std::ios::app) << "9,2.25,1.";
  {  // resumed from the checkpoint at step 5
    TrainLog log(cut, true, 5);
    for (int s = 6; s <= 10; ++s) {
      log.log_step(record(s));
      if (s % 5 == 0) log.log_eval(s, 0.1 * s, 0.01 * s);
    }
  }
  EXPECT_EQ(read_file(cut + "/train_log.csv"), read_file(whole + "/train_log.csv"));
  EXPECT_EQ(read_file(cut + "/eval_log.csv"), read_file(whole + "/eval_log.csv"));
  EXPECT_NE(read_file(whole + "/train_log.csv").find("\n10,"), std::string::npos);

  {  // resuming where no logs exist yet creates them
    TrainLog log(dir / "new", true, 100);
    log.log_step(record(101));
  }
  EXPECT_EQ(read_file(dir / "new/train_log.csv"),
            "step,epoch,loss,ce,kl,mse,lr,grad_norm,tokens_per_s,seconds\n"
            "101,25.25,-10.125,-10.125,,,0.0001,0.75,1234.5,50.5\n");

  std::ofstream(dir / "new/eval_log.csv") << "step,acc\n1,0.5\n";  // another format: refuse
  std::string e = error_of([&] { TrainLog log(dir / "new", true, 100); });
  EXPECT_NE(e.find(dir / "new/eval_log.csv"), std::string::npos) << e;
}

void fill_for_plot(TrainLog& log) {
  for (int s = 1; s <= 40; ++s) {
    StepRecord r = record(s);
    r.loss = 3.0 / std::sqrt(double(s)) + 0.05 * std::sin(double(s));
    log.log_step(r);
    if (s % 10 == 0) log.log_eval(s, 0.2 + 0.015 * s, std::nan(""));
  }
}

TEST(TrainLog, PlotWritesPngOrNothing) {
  ScratchDir dir("plot");
  // A directory name that would break a shell command or a quoted gnuplot string.
  const std::string logdir = dir / "it's a \"run\" $(touch x);";
  TrainLog log(logdir, false, 0);
  EXPECT_FALSE(log.plot());  // nothing to draw yet
  EXPECT_FALSE(path_exists(log.plot_path()));
  fill_for_plot(log);
  if (log.plot()) {
    std::string png = read_file(log.plot_path());
    ASSERT_GT(png.size(), 1000u);
    EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  } else {
    std::cout << "[ INFO ] gnuplot not installed: no plot\n";
    EXPECT_FALSE(path_exists(log.plot_path()));
  }
  for (const std::string& name : list_dir(logdir))  // no script or temporary left behind
    EXPECT_TRUE(name == "train_log.csv" || name == "eval_log.csv" || name == "loss.png") << name;
}

TEST(TrainLog, PlotWithoutGnuplotReturnsFalse) {
  ScratchDir dir("noplot");
  TrainLog log(dir.path(), false, 0);
  fill_for_plot(log);
  const char* old = std::getenv("PATH");
  const std::string saved = old ? old : "";
  ::setenv("PATH", (dir / "empty_bin").c_str(), 1);
  bool plotted = true;
  EXPECT_NO_THROW(plotted = log.plot());
  ::setenv("PATH", saved.c_str(), 1);
  EXPECT_FALSE(plotted);
  EXPECT_FALSE(path_exists(log.plot_path()));
}

}  // namespace
}  // namespace mlaforge
