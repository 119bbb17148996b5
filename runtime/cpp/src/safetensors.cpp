#include "optforge_rt/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <stdexcept>

#include "optforge_rt/checked.h"
#include "optforge_rt/errors.h"
#include "optforge_rt/json.h"

namespace optforge_rt {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF32: case DType::kI32: return 4;
    case DType::kF16: case DType::kBF16: return 2;
    case DType::kI8: case DType::kU8: return 1;
    case DType::kI64: return 8;
  }
  return 1;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
    case DType::kI8: return "I8";
    case DType::kU8: return "U8";
    case DType::kI32: return "I32";
    case DType::kI64: return "I64";
  }
  return "?";
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

MappedFile::MappedFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw ArtifactError(path + ": cannot open (" + std::strerror(errno) + ")");
  struct stat st {};
  if (fstat(fd, &st) != 0) { ::close(fd); throw ArtifactError(path + ": cannot stat"); }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) { ::close(fd); throw ArtifactError(path + ": mmap failed (" + std::strerror(errno) + ")"); }
    data_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) munmap(const_cast<uint8_t*>(data_), size_);
}

HugePageArena::~HugePageArena() {
  if (data_ != nullptr) munmap(data_, size_);
}

size_t available_memory() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  size_t kb = 0;
  while (in >> key >> kb) {
    if (key == "MemAvailable:") return kb * 1024;
    in.ignore(256, '\n');
  }
  return SIZE_MAX;
}

bool HugePageArena::reserve(size_t bytes) {
  if (data_ != nullptr) throw std::logic_error("HugePageArena::reserve called twice");
  const size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  if (size == 0) return true;
  // Over-map by one huge page and trim both ends so the buffer starts on a 2 MiB boundary (mmap only
  // promises 4 KiB alignment, and THP backs only aligned 2 MiB ranges).
  void* p = mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return false;
  uint8_t* raw = static_cast<uint8_t*>(p);
  uint8_t* aligned = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + kHugePage - 1) / kHugePage * kHugePage);
  if (aligned > raw) munmap(raw, aligned - raw);
  if (aligned + size < raw + size + kHugePage) munmap(aligned + size, raw + size + kHugePage - (aligned + size));
  madvise(aligned, size, MADV_HUGEPAGE);  // advisory: where THP is off this is 4 KiB pages, still correct
  data_ = aligned;
  size_ = size;
  return true;
}

const uint8_t* HugePageArena::take(const void* src, size_t n) {
  const size_t at = (used_ + 63) / 64 * 64;
  if (at + n > size_) throw std::logic_error("HugePageArena: more bytes taken than reserved");
  std::memcpy(data_ + at, src, n);
  used_ = at + n;
  return data_ + at;
}

namespace {
DType parse_dtype(const std::string& s, const std::string& where) {
  if (s == "F32") return DType::kF32;
  if (s == "F16") return DType::kF16;
  if (s == "BF16") return DType::kBF16;
  if (s == "I8") return DType::kI8;
  if (s == "U8") return DType::kU8;
  if (s == "I32") return DType::kI32;
  if (s == "I64") return DType::kI64;
  throw FormatError(where + ": unsupported dtype '" + s + "'");
}

constexpr uint64_t kMaxHeaderBytes = uint64_t(100) << 20;  // the reference implementation's limit
constexpr int64_t kMaxDim = int64_t(1) << 40;
constexpr uint64_t kMaxElements = uint64_t(1) << 40;

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

// entry[key]: present, with the expected type (`array` or a string).
const Json& field(const Json& entry, const char* key, bool array, const std::string& where) {
  const Json* v = entry.is_object() ? entry.find(key) : nullptr;
  if (v == nullptr || (array ? !v->is_array() : !v->is_string())) {
    throw FormatError(where + ": '" + key + "' is " + (v == nullptr ? std::string("missing") : v->describe()) + ", expected " +
                      (array ? "an array" : "a string"));
  }
  return *v;
}

// The shape's dimensions, each in [0, 2^40], with at most 2^40 elements in all (computed without wrapping).
std::vector<int64_t> parse_shape(const Json& entry, const std::string& where, uint64_t* numel) {
  std::vector<int64_t> shape;
  const auto& dims = field(entry, "shape", true, where).items();
  for (size_t i = 0; i < dims.size(); ++i) {
    if (!dims[i].is_integer_in(0, kMaxDim)) {
      throw FormatError(where + ": shape[" + std::to_string(i) + "] is " + dims[i].describe() + ", expected an integer in [0, " +
                        std::to_string(kMaxDim) + "]");
    }
    shape.push_back(static_cast<int64_t>(dims[i].number()));
  }
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (!checked_product({n, uint64_t(d)}, &n) || n > kMaxElements) {
      throw FormatError(where + ": shape " + shape_text(shape) + " has more than " + std::to_string(kMaxElements) + " elements");
    }
  }
  *numel = n;
  return shape;
}

// data_offsets [begin, end) inside the data_size bytes after the header, holding exactly `nbytes`.
std::pair<uint64_t, uint64_t> parse_offsets(const Json& entry, const std::string& where, uint64_t data_size, uint64_t nbytes) {
  const auto& offsets = field(entry, "data_offsets", true, where).items();
  const int64_t limit = int64_t(1) << 62;
  if (offsets.size() != 2 || !offsets[0].is_integer_in(0, limit) || !offsets[1].is_integer_in(0, limit)) {
    throw FormatError(where + ": data_offsets must be 2 non-negative integers [begin, end)");
  }
  const uint64_t begin = static_cast<uint64_t>(offsets[0].number()), end = static_cast<uint64_t>(offsets[1].number());
  const std::string range = "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + ")";
  if (end < begin || end > data_size) {
    throw FormatError(where + ": " + range + " outside the " + std::to_string(data_size) + " data bytes: the file is truncated or corrupt");
  }
  if (end - begin != nbytes) {
    throw FormatError(where + ": " + range + " hold " + std::to_string(end - begin) + " bytes, its shape and dtype need " + std::to_string(nbytes));
  }
  return {begin, end};
}

// One header entry: dtype, shape and data_offsets checked, a view into the data after the header.
TensorView parse_tensor(const Json& entry, const std::string& where, const uint8_t* base, size_t data_size) {
  TensorView view;
  view.dtype = parse_dtype(field(entry, "dtype", false, where).str(), where);
  uint64_t numel = 0, nbytes = 0;
  view.shape = parse_shape(entry, where, &numel);
  checked_product({numel, dtype_size(view.dtype)}, &nbytes);  // numel <= 2^40: cannot wrap
  const auto [begin, end] = parse_offsets(entry, where, data_size, nbytes);
  view.nbytes = static_cast<size_t>(end - begin);
  view.data = base + begin;
  if (reinterpret_cast<uintptr_t>(view.data) % dtype_size(view.dtype) != 0) {  // the writer pads the header to 8 bytes
    throw FormatError(where + ": data is not aligned to its " + std::to_string(dtype_size(view.dtype)) + "-byte dtype (unpadded header?)");
  }
  return view;
}
}  // namespace

SafeTensors::SafeTensors(const uint8_t* data, size_t size, std::string name) : name_(std::move(name)) {
  if (size < 8) throw FormatError(name_ + ": truncated safetensors file (" + std::to_string(size) + " bytes, no header length)");
  uint64_t header_len = 0;
  std::memcpy(&header_len, data, 8);  // little-endian on every platform we build for
  if (header_len > size - 8) {
    throw FormatError(name_ + ": header of " + std::to_string(header_len) + " bytes runs past the end of the file (" +
                      std::to_string(size) + " bytes): the file is truncated");
  }
  if (header_len > kMaxHeaderBytes) {
    throw FormatError(name_ + ": header of " + std::to_string(header_len) + " bytes, expected at most " + std::to_string(kMaxHeaderBytes));
  }
  Json header;
  try {
    header = Json::parse(std::string_view(reinterpret_cast<const char*>(data + 8), header_len));
  } catch (const FormatError& e) {
    throw FormatError(name_ + ": bad safetensors header: " + e.what());
  }
  const uint8_t* base = data + 8 + header_len;
  const size_t data_size = size - 8 - header_len;
  for (const auto& [key, entry] : header.members("safetensors header")) {
    if (key == "__metadata__") {
      for (const auto& [mk, mv] : entry.members("__metadata__")) {
        if (mv.is_string()) metadata_[mk] = mv.str();
      }
      continue;
    }
    tensors_[key] = parse_tensor(entry, name_ + ": tensor '" + key + "'", base, data_size);
  }
}

std::unique_ptr<SafeTensors> SafeTensors::open(const std::string& path) {
  auto file = std::make_shared<MappedFile>(path);
  auto st = std::make_unique<SafeTensors>(file->data(), file->size(), path);
  st->file_ = std::move(file);
  return st;
}

const TensorView& SafeTensors::get(const std::string& key) const {
  auto it = tensors_.find(key);
  if (it == tensors_.end()) throw ArtifactError(name_ + ": no tensor '" + key + "'");
  return it->second;
}

}  // namespace optforge_rt
