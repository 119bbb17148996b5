#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "check.h"
#include "optforge_rt/errors.h"
#include "optforge_rt/safetensors.h"

using namespace optforge_rt;

// A safetensors image; the header is padded with spaces to 8 bytes as the reference writer does.
static std::string image(std::string header, const std::string& data) {
  header.resize((header.size() + 7) / 8 * 8, ' ');
  uint64_t n = header.size();
  std::string out(reinterpret_cast<const char*>(&n), 8);
  return out + header + data;
}

static SafeTensors parse(const std::string& s) { return SafeTensors(reinterpret_cast<const uint8_t*>(s.data()), s.size(), "test.safetensors"); }

// The huge-page weight buffer: 2 MiB-aligned, copies 64-byte aligned and intact, over-taking refused.
static void check_arena() {
  HugePageArena arena;
  CHECK(arena.reserve(3 * 1000 + 2 * 64));
  CHECK(arena.size() == HugePageArena::kHugePage);
  std::string a(1000, 'a'), b(1000, 'b');
  const uint8_t* pa = arena.take(a.data(), a.size());
  const uint8_t* pb = arena.take(b.data(), b.size());
  CHECK(reinterpret_cast<uintptr_t>(pa) % HugePageArena::kHugePage == 0);
  CHECK(reinterpret_cast<uintptr_t>(pb) % 64 == 0 && pb >= pa + 1000);
  CHECK(std::memcmp(pa, a.data(), a.size()) == 0 && std::memcmp(pb, b.data(), b.size()) == 0);
  bool threw = false;
  try { arena.take(a.data(), HugePageArena::kHugePage); } catch (const std::logic_error&) { threw = true; }
  CHECK(threw);
}

// Shapes whose element or byte count would wrap 64 bits, out-of-range dimensions and offsets, and an oversized
// header: a FormatError naming the file, the tensor, what was found and what is expected.
static void check_crafted_shapes(const std::string& data) {
  auto with = [&](const std::string& shape, const std::string& offsets) {
    return parse(image(R"({"w": {"dtype": "F32", "shape": )" + shape + R"(, "data_offsets": )" + offsets + "}}", data));
  };
  CHECK_THROWS_WITH(FormatError, with("[4294967296, 4294967296]", "[0, 0]"), "test.safetensors: tensor 'w'", "shape [4294967296, 4294967296]",
                    "more than 1099511627776 elements");  // 2^64 elements wrap to 0
  CHECK_THROWS_WITH(FormatError, with("[1099511627776, 16777216, 16]", "[0, 0]"), "more than 1099511627776 elements");
  CHECK_THROWS_WITH(FormatError, with("[4611686018427387904, 8]", "[0, 0]"), "shape[0] is 4611686018427387904", "[0, 1099511627776]");
  CHECK_THROWS_WITH(FormatError, with("[2, -3]", "[0, 24]"), "shape[1] is -3");
  CHECK_THROWS_WITH(FormatError, with("[1e300]", "[0, 4]"), "shape[0] is 1e+300");
  CHECK_THROWS_WITH(FormatError, with("[1.5]", "[0, 4]"), "shape[0] is 1.5");
  CHECK_THROWS_WITH(FormatError, with("[\"6\"]", "[0, 24]"), "shape[0] is \"6\"");
  CHECK_THROWS_WITH(FormatError, with("6", "[0, 24]"), "'shape' is 6, expected an array");
  CHECK_THROWS_WITH(FormatError, with("[2, 3]", "[0, 20]"), "data_offsets [0, 20) hold 20 bytes, its shape and dtype need 24");
  CHECK_THROWS_WITH(FormatError, with("[2, 3]", "[-8, 16]"), "tensor 'w'", "data_offsets must be 2 non-negative integers");
  CHECK_THROWS_WITH(FormatError, with("[2, 3]", "[0, 18446744073709551616]"), "data_offsets must be 2 non-negative integers");
  CHECK_THROWS_WITH(FormatError, with("[2, 3]", "[\"0\", 24]"), "data_offsets must be 2 non-negative integers");
  CHECK_THROWS_WITH(FormatError, with("[2, 3]", "[0, 24, 48]"), "data_offsets must be 2 non-negative integers");
  CHECK_THROWS_WITH(FormatError, with("[0]", "[32, 32]"), "data_offsets [32, 32) outside the 26 data bytes");
  CHECK_THROWS_WITH(FormatError, with("[1]", "[24, 20]"), "data_offsets [24, 20) outside");
  CHECK_THROWS_WITH(FormatError, parse(image(R"({"w": 7})", data)), "tensor 'w'", "'dtype' is missing");
  CHECK(with("[0, 4294967296]", "[24, 24]").get("w").numel() == 0);  // empty tensors are fine
  // A header over 100 MiB is refused before it is parsed, even when the file holds it.
  std::string big = image("{}" + std::string((size_t(100) << 20) + 8, ' '), data);
  CHECK_THROWS_WITH(FormatError, parse(big), "header of 104857616 bytes, expected at most 104857600");
}

int main() {
  check_arena();
  float values[6] = {1, 2, 3, 4, 5, 6};
  std::string data(reinterpret_cast<const char*>(values), sizeof(values));
  data += std::string("\x01\xff", 2);
  std::string header = R"({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, "b": {"dtype": "I8", "shape": [2], "data_offsets": [24, 26]}, "__metadata__": {"format": "pt"}})";
  std::string ok = image(header, data);
  SafeTensors st = parse(ok);
  CHECK(st.tensors().size() == 2);
  const TensorView& w = st.get("w");
  CHECK(w.shape.size() == 2 && w.shape[1] == 3 && w.numel() == 6);
  CHECK(reinterpret_cast<const float*>(w.data)[5] == 6.f);
  CHECK(reinterpret_cast<const int8_t*>(st.get("b").data)[1] == -1);
  CHECK(st.metadata().at("format") == "pt");
  CHECK_THROWS(ArtifactError, st.get("nope"));
  // Truncation anywhere gives a FormatError, never a crash.
  for (size_t cut = 0; cut < ok.size(); ++cut) CHECK_THROWS(FormatError, parse(ok.substr(0, cut)));
  CHECK_THROWS(FormatError, parse(image(R"({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}})", data)));   // size mismatch
  CHECK_THROWS(FormatError, parse(image(R"({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [8, 4]}})", data)));    // reversed
  CHECK_THROWS(FormatError, parse(image(R"({"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}})", data)));        // dtype
  CHECK_THROWS(FormatError, parse(image(R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", data)));      // negative dim
  std::string h = R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})";  // unpadded header
  if (h.size() % 4 == 0) h += ' ';  // make the float data misaligned
  uint64_t hl = h.size();
  CHECK_THROWS(FormatError, parse(std::string(reinterpret_cast<const char*>(&hl), 8) + h + data));
  std::string huge(8, '\xff');
  CHECK_THROWS(FormatError, parse(huge + "{}"));  // header length past the end
  check_crafted_shapes(data);
  return 0;
}
