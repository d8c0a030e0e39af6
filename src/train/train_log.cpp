#include "train/train_log.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>
#include <vector>

#include "core/error.h"

extern char** environ;

// No std::filesystem here: PyTorch's pip wheels export a statically linked copy of it
// (pytorch/pytorch#133437) that programs linked against them can bind to and crash in.

namespace mlaforge {
namespace {

const char* const kTrainHeader = "step,epoch,loss,ce,kl,mse,lr,grad_norm,tokens_per_s,seconds";
const char* const kEvalHeader = "step,accuracy,mean_kl";

// Shortest text that keeps 9 significant digits (enough to round-trip float32), locale-free;
// NaN is an empty cell.
std::string cell(double x) {
  if (std::isnan(x)) return "";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof(buf), x, std::chars_format::general, 9);
  return std::string(buf, r.ptr);
}

std::vector<std::string> split(const std::string& line, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    size_t pos = line.find(sep, start);
    out.push_back(line.substr(start, pos - start));
    if (pos == std::string::npos) return out;
    start = pos + 1;
  }
}

bool parse_step(const std::string& s, int64_t* out) {
  auto r = std::from_chars(s.data(), s.data() + s.size(), *out);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

// Makes `path` hold `header` and the complete rows with step <= resume_step (resume) or only
// `header` (fresh start); returns how many kept rows have a value in column `point_col`.
int64_t prepare_csv(const std::string& path, const std::string& header, bool resume, int64_t resume_step,
                    size_t point_col) {
  std::string content;
  if (resume) {
    std::ifstream in(path, std::ios::binary);
    if (in) {
      std::ostringstream ss;
      ss << in.rdbuf();
      content = ss.str();
    }
  }
  std::vector<std::string> lines;
  size_t start = 0;
  while (start < content.size()) {
    size_t nl = content.find('\n', start);
    if (nl == std::string::npos) break;  // a line cut short by a kill: not a row
    lines.push_back(content.substr(start, nl - start));
    start = nl + 1;
  }
  const size_t columns = split(header, ',').size();
  std::string out = header + "\n";
  int64_t points = 0;
  if (!lines.empty()) {
    check(lines[0] == header, path, "has columns '", lines[0], "', expected '", header, "'");
    for (size_t i = 1; i < lines.size(); ++i) {
      std::vector<std::string> fields = split(lines[i], ',');
      int64_t step = 0;
      check(fields.size() == columns && parse_step(fields[0], &step), path, "line ", i + 1, " is not a row of ",
            columns, " values starting with the step: '", lines[i], "'");
      if (step > resume_step) continue;
      out += lines[i] + "\n";
      if (!fields[point_col].empty()) ++points;
    }
  }
  // Write beside and rename so that a failure here never loses the old log.
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    check(bool(f), tmp, "cannot write");
    f << out;
    f.flush();
    check(bool(f), tmp, "write failed");
  }
  check(::rename(tmp.c_str(), path.c_str()) == 0, path, "cannot rename ", tmp, " over it (", std::strerror(errno),
        ")");
  return points;
}

void append_row(std::ofstream& f, const std::string& path, const std::string& row) {
  f << row << '\n';
  f.flush();
  check(bool(f), path, "write failed");
}

// Absolute path of an executable `name` in PATH, or "" (empty PATH entries are skipped: they
// would mean the current directory).
std::string find_in_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  if (!path) return "";
  for (const std::string& dir : split(path, ':')) {
    if (dir.empty()) continue;
    std::string candidate = dir + "/" + name;
    struct stat st {};
    if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(candidate.c_str(), X_OK) == 0)
      return candidate;
  }
  return "";
}

// Like mkdir -p: creates `dir` and its missing parents; false (errno set) on failure.
bool make_dirs(const std::string& dir) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) == 0) {
    errno = ENOTDIR;
    return S_ISDIR(st.st_mode);
  }
  size_t slash = dir.find_last_of('/');
  if (slash != std::string::npos && slash > 0 && !make_dirs(dir.substr(0, slash))) return false;
  return ::mkdir(dir.c_str(), 0777) == 0 || errno == EEXIST;
}

bool file_size(const std::string& path, int64_t* size) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
  *size = int64_t(st.st_size);
  return true;
}

// A fresh file under $TMPDIR (or /tmp) named from `pattern` (ending in XXXXXX); "" on failure.
std::string make_temp_file(const std::string& pattern) {
  const char* tmpdir = std::getenv("TMPDIR");
  std::string tmpl = std::string(tmpdir && *tmpdir ? tmpdir : "/tmp") + "/" + pattern;
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  int fd = ::mkstemp(buf.data());
  if (fd < 0) return "";
  ::close(fd);
  return std::string(buf.data());
}

std::string first_line_of(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) return line;
  return "";
}

}  // namespace

TrainLog::TrainLog(const std::string& dir, bool resume, int64_t resume_step)
    : dir_(dir), train_path_(dir + "/train_log.csv"), eval_path_(dir + "/eval_log.csv") {
  check(make_dirs(dir), dir, "cannot create the log directory (", std::strerror(errno), ")");
  loss_points_ = prepare_csv(train_path_, kTrainHeader, resume, resume_step, 2);
  accuracy_points_ = prepare_csv(eval_path_, kEvalHeader, resume, resume_step, 1);
  train_.open(train_path_, std::ios::binary | std::ios::app);
  check(bool(train_), train_path_, "cannot open for appending");
  eval_.open(eval_path_, std::ios::binary | std::ios::app);
  check(bool(eval_), eval_path_, "cannot open for appending");
}

void TrainLog::log_step(const StepRecord& r) {
  std::string row = std::to_string(r.step);
  for (double x : {r.epoch, r.loss, r.ce, r.kl, r.mse, r.lr, r.grad_norm, r.tokens_per_s, r.seconds})
    row += "," + cell(x);
  append_row(train_, train_path_, row);
  if (!std::isnan(r.loss)) ++loss_points_;
}

void TrainLog::log_eval(int64_t step, double accuracy, double mean_kl) {
  append_row(eval_, eval_path_, std::to_string(step) + "," + cell(accuracy) + "," + cell(mean_kl));
  if (!std::isnan(accuracy)) ++accuracy_points_;
}

bool TrainLog::plot() const {
  std::string script_path, err_path;
  const std::string out_path = plot_path(), tmp_png = out_path + ".tmp";
  bool ok = false;
  try {
    if (loss_points_ == 0) return false;
    const std::string gnuplot = find_in_path("gnuplot");
    if (gnuplot.empty()) return false;

    // The paths reach gnuplot as ARG1..ARG3 (gnuplot -c), never inside the script's text, so no
    // quoting is needed whatever characters they hold.
    std::ostringstream s;
    s << "# mlaforge: training loss (left axis) and eval accuracy (right axis)\n"
         "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) { set terminal pngcairo size 1200,700 noenhanced } "
         "else { set terminal png size 1200,700 noenhanced }\n"
         "set output ARG3\n"
         "set datafile separator comma\n"
         "set grid\n"
         "set key top right\n"
         "set xlabel 'step'\n"
         "set ylabel 'training loss'\n";
    if (accuracy_points_ > 0)
      s << "set ytics nomirror\nset y2tics\nset y2label 'eval accuracy'\n";
    s << "plot ARG1 skip 1 using 1:3 with lines lw 1 lc rgb '#1f77b4' title 'training loss'";
    if (accuracy_points_ > 0)
      s << ", ARG2 skip 1 using 1:2 axes x1y2 with linespoints pt 7 lw 2 lc rgb '#d62728' title 'eval accuracy'";
    s << "\nset output\n";

    script_path = make_temp_file("mlaforge_plot_XXXXXX");
    err_path = make_temp_file("mlaforge_plot_err_XXXXXX");
    if (script_path.empty() || err_path.empty()) throw Error("cannot create a temporary file for the gnuplot script");
    {
      std::ofstream f(script_path, std::ios::binary);
      f << s.str();
      if (!f) throw Error(script_path + ": write failed");
    }

    std::vector<std::string> args = {gnuplot, "-c", script_path, train_path_, eval_path_, tmp_png};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(), O_WRONLY | O_TRUNC, 0);
    pid_t pid = 0;
    int rc = posix_spawn(&pid, gnuplot.c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) throw Error(str("cannot run ", gnuplot, " (", std::strerror(rc), ")"));
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    const bool exited_ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    int64_t png_size = 0;
    if (!exited_ok || !file_size(tmp_png, &png_size) || png_size == 0) {
      std::string why = first_line_of(err_path);
      throw Error(str("gnuplot failed", why.empty() ? "" : ": ", why));
    }
    if (::rename(tmp_png.c_str(), out_path.c_str()) != 0)
      throw Error(str("cannot rename ", tmp_png, " (", std::strerror(errno), ")"));
    ok = true;
  } catch (const std::exception& e) {
    std::cerr << "warning: " << out_path << ": not plotted: " << e.what() << "\n";
  }
  if (!script_path.empty()) ::unlink(script_path.c_str());
  if (!err_path.empty()) ::unlink(err_path.c_str());
  ::unlink(tmp_png.c_str());
  return ok;
}

}  // namespace mlaforge
