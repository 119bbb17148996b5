// A memory-mapped safetensors reader. The header is validated before any tensor is handed out: its length
// (inside the file, at most 100 MiB), each dtype, each shape (dimensions in [0, 2^40], at most 2^40 elements,
// counted without wrapping) and each tensor's data_offsets (begin <= end, inside the data, end - begin equal to
// the shape's byte count). Tensors are views into the mapping.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace optforge_rt {

enum class DType { kF32, kF16, kBF16, kI8, kU8, kI32, kI64 };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);

struct TensorView {
  DType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the mapping; valid while the SafeTensors object lives
  size_t nbytes = 0;
  int64_t numel() const;
};

// A read-only file mapping (munmap on destruction).
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // throws ArtifactError
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// MemAvailable from /proc/meminfo in bytes; SIZE_MAX where it cannot be read (what the weight copy and the KV
// cache check their size against).
size_t available_memory();

// One anonymous, 2 MiB-aligned buffer asked to be backed by transparent huge pages (madvise MADV_HUGEPAGE,
// which works when /sys/kernel/mm/transparent_hugepage/enabled is "always" or "madvise"). Decode streams every
// weight once per token; from a 4 KiB-page file mapping that is one TLB miss per 4 KiB (tens of thousands per
// token, each a two-level walk under a hypervisor), from 2 MiB pages a few dozen. Bytes are handed out with
// `take` (64-byte aligned) after `reserve` fixed the total; munmap on destruction.
class HugePageArena {
 public:
  static constexpr size_t kHugePage = size_t(2) << 20;
  HugePageArena() = default;
  ~HugePageArena();
  HugePageArena(const HugePageArena&) = delete;
  HugePageArena& operator=(const HugePageArena&) = delete;
  // Maps `bytes` (rounded up to whole huge pages); false, with nothing mapped, if the kernel refuses.
  bool reserve(size_t bytes);
  // A copy of src[0, n) inside the arena (64-byte aligned); throws if the reservation is exceeded.
  const uint8_t* take(const void* src, size_t n);
  size_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0, used_ = 0;
};

class SafeTensors {
 public:
  // Parse a safetensors file from memory (used by the fuzzer and the tests); `name` appears in errors.
  SafeTensors(const uint8_t* data, size_t size, std::string name);
  // Map and parse a file.
  static std::unique_ptr<SafeTensors> open(const std::string& path);

  bool contains(const std::string& key) const { return tensors_.count(key) != 0; }
  const TensorView& get(const std::string& key) const;  // throws ArtifactError naming the file and key
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  std::shared_ptr<MappedFile> file_;
  std::string name_;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace optforge_rt
