// Training logs: the loss curve and eval points as CSV (exactly reproducible across a resume)
// and a PNG plot of them drawn by gnuplot when it is installed.
#pragma once
#include <cstdint>
#include <fstream>
#include <limits>
#include <string>

namespace mlaforge {

// One row of train_log.csv. NaN fields (the default) are written as empty cells.
struct StepRecord {
  static constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  int64_t step = 0;
  double epoch = kNaN;         // fractional epochs done
  double loss = kNaN;          // the optimised total
  double ce = kNaN, kl = kNaN, mse = kNaN;  // its parts (NaN where unused)
  double lr = kNaN, grad_norm = kNaN;       // grad_norm: before clipping
  double tokens_per_s = kNaN, seconds = kNaN;  // seconds: wall time since the run (re)started
};

class TrainLog {
 public:
  // Opens <dir>/train_log.csv (columns step,epoch,loss,ce,kl,mse,lr,grad_norm,tokens_per_s,seconds)
  // and <dir>/eval_log.csv (step,accuracy,mean_kl), creating <dir> if needed. Without `resume`
  // both start afresh (overwriting old logs). With `resume` rows with step > resume_step (logged
  // after the checkpoint a killed run is resumed from) and a partly written last line are dropped,
  // and new rows are appended: the files end up as an uninterrupted run's would (timing columns
  // aside). A file with other columns is an Error naming it.
  TrainLog(const std::string& dir, bool resume, int64_t resume_step);

  // Each row is flushed as it is written, so a killed run loses at most a partial line.
  void log_step(const StepRecord& r);
  void log_eval(int64_t step, double accuracy, double mean_kl /* NaN if not measured */);

  // Writes <dir>/loss.png: training loss vs step, eval accuracy on the right axis. Runs gnuplot
  // (found in PATH) directly on a generated script, the paths passed as its arguments, and
  // renames the finished image into place. Returns false and writes nothing when gnuplot is
  // absent or there is no loss to draw; returns false with a warning on stderr when gnuplot
  // fails. Never throws.
  bool plot() const;

  const std::string& train_csv() const { return train_path_; }
  const std::string& eval_csv() const { return eval_path_; }
  std::string plot_path() const { return dir_ + "/loss.png"; }

 private:
  std::string dir_, train_path_, eval_path_;
  std::ofstream train_, eval_;
  int64_t loss_points_ = 0, accuracy_points_ = 0;  // rows with a loss / an accuracy (for plot)
};

}  // namespace mlaforge
