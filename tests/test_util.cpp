#include "test_util.h"

#include <unistd.h>

#include <array>
#include <cstdio>
#include <random>

namespace mlaforge::test {

TempDir::TempDir(const std::string& name) {
  std::random_device rd;
  path_ = (std::filesystem::temp_directory_path() / ("mlaforge-" + name + "-" + std::to_string(getpid()) + "-" +
                                                     std::to_string(rd() % 100000)))
              .string();
  std::filesystem::remove_all(path_);
  std::filesystem::create_directories(path_);
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

CommandResult run_cli(const std::string& args) {
  CommandResult r;
  std::string cmd = std::string("MLAFORGE_NO_PROGRESS=1 ") + MLAFORGE_BINARY + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return {-1, "popen failed"};
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
  int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

}  // namespace mlaforge::test
