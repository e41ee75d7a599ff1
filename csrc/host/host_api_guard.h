// Error reporting shared by the C entry points of the host builds: each
// returns 0 on success, nonzero on error, and the message is kept per thread
// for the *_last_error() functions.
#pragma once

#include <exception>
#include <string>

namespace tfk::host_api {

inline thread_local std::string last_error;

inline int fail(int code, const char* what) {
  last_error = what;
  return code;
}

template <typename F>
int guarded(F&& body) {
  try {
    body();
  } catch (const std::exception& e) {
    return fail(3, e.what());
  }
  last_error.clear();
  return 0;
}

}  // namespace tfk::host_api

#define TFK_HOST_EXPORT extern "C" __attribute__((visibility("default")))
