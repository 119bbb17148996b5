// SHA-256 (FIPS 180-4), used to verify artifact files against manifest.json.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace optforge_rt {

class Sha256 {
 public:
  Sha256();
  void update(const uint8_t* data, size_t size);
  std::string hexdigest();  // finalizes; call once

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

std::string sha256_hex(const uint8_t* data, size_t size);

}  // namespace optforge_rt
