// Typed errors of the runtime. Every message names the file (or input), what was expected and what was found.
#pragma once

#include <stdexcept>
#include <string>

namespace optforge_rt {

// A file that is not what it claims to be: bad JSON, a truncated safetensors file, a bad tokenizer.json.
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An artifact that fails verification or that this runtime cannot run (missing file, hash mismatch, ...).
class ArtifactError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace optforge_rt
