// A minimal assertion helper for the C++ tests (no test framework dependency).
#pragma once

#include <cstdio>
#include <cstdlib>

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)

// Runs `body` and checks that it throws `Exception`.
#define CHECK_THROWS(Exception, body)         \
  do {                                        \
    bool thrown = false;                      \
    try {                                     \
      body;                                   \
    } catch (const Exception&) {              \
      thrown = true;                          \
    }                                         \
    CHECK(thrown && "expected " #Exception);  \
  } while (0)
