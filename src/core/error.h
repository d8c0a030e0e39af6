// Errors that reach the user: one line naming the file (or object) and the problem.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace mlaforge {

// Every error the program reports to the user is an Error; main() prints what() and exits 1.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Concatenates anything streamable: str("layer ", i, " has ", n, " heads").
template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

// Throws Error("<where>: <message>"). `where` is usually a file path.
template <typename... Args>
[[noreturn]] void fail(const std::string& where, const Args&... message) {
  throw Error(where + ": " + mlaforge::str(message...));
}

template <typename... Args>
void check(bool ok, const std::string& where, const Args&... message) {
  if (!ok) fail(where, message...);
}

}  // namespace mlaforge
