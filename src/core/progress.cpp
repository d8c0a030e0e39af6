#include "core/progress.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>

namespace mlaforge {

Progress::Progress(std::string label, int64_t total)
    : label_(std::move(label)), total_(total), start_(std::chrono::steady_clock::now()), last_draw_(start_) {
  // Draw only for a terminal unless asked (logs of CI runs stay readable).
  enabled_ = isatty(STDERR_FILENO) || std::getenv("MLAFORGE_PROGRESS") != nullptr;
  if (std::getenv("MLAFORGE_NO_PROGRESS")) enabled_ = false;
}

Progress::~Progress() { finish(); }

double Progress::seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void Progress::advance(int64_t n, const std::string& info) {
  done_ += n;
  if (!info.empty()) info_ = info;
  auto now = std::chrono::steady_clock::now();
  if (std::chrono::duration<double>(now - last_draw_).count() > 0.2 || done_ >= total_) {
    last_draw_ = now;
    draw(false);
  }
}

void Progress::finish() {
  if (finished_) return;
  finished_ = true;
  draw(true);
}

void Progress::draw(bool final_line) {
  if (!enabled_) return;
  const int width = 30;
  double frac = total_ > 0 ? double(done_) / double(total_) : 1.0;
  if (frac > 1) frac = 1;
  int filled = int(frac * width);
  double elapsed = seconds();
  double eta = done_ > 0 ? elapsed * double(total_ - done_) / double(done_) : 0.0;
  std::string bar(filled, '#');
  bar += std::string(width - filled, '.');
  std::fprintf(stderr, "\r%s [%s] %lld/%lld %.0fs eta %.0fs %s\033[K", label_.c_str(), bar.c_str(),
               (long long)done_, (long long)total_, elapsed, eta, info_.c_str());
  if (final_line) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

}  // namespace mlaforge
