// A minimal assertion helper for the C++ tests (no test framework dependency).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

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

// Runs `body` and checks that it throws `Exception` whose message contains every one of the strings after it.
#define CHECK_THROWS_WITH(Exception, body, ...)                                                   \
  do {                                                                                           \
    bool thrown = false;                                                                         \
    try {                                                                                        \
      body;                                                                                      \
    } catch (const Exception& e) {                                                               \
      thrown = true;                                                                             \
      for (const char* part : {__VA_ARGS__}) {                                                   \
        if (std::string(e.what()).find(part) == std::string::npos) {                             \
          std::fprintf(stderr, "%s:%d: message lacks '%s': %s\n", __FILE__, __LINE__, part, e.what()); \
          std::exit(1);                                                                          \
        }                                                                                        \
      }                                                                                          \
    }                                                                                            \
    CHECK(thrown && "expected " #Exception);                                                     \
  } while (0)
