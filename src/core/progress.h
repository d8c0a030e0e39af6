// A one-line progress bar on stderr for long work (eval, calibration, training).
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace mlaforge {

class Progress {
 public:
  // total: number of units; label: what is being counted ("eval", "calib").
  Progress(std::string label, int64_t total);
  ~Progress();
  // Advances by n units; `info` is shown after the bar (e.g. "acc 0.70").
  void advance(int64_t n = 1, const std::string& info = "");
  void finish();
  double seconds() const;

 private:
  void draw(bool final_line);
  std::string label_;
  int64_t total_, done_ = 0;
  std::string info_;
  std::chrono::steady_clock::time_point start_, last_draw_;
  bool finished_ = false;
  bool enabled_;
};

}  // namespace mlaforge
