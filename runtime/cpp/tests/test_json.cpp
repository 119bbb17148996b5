#include <cmath>
#include <string>

#include "check.h"
#include "optforge_rt/errors.h"
#include "optforge_rt/json.h"
#include "optforge_rt/sha256.h"

using namespace optforge_rt;

int main() {
  Json v = Json::parse(R"({"a": [1, 2.5, -3e2], "s": "x\"y\u00e9\ud83d\ude00", "t": true, "n": null, "o": {}})");
  CHECK(v.at("a").items().size() == 3);
  CHECK(v.at("a").items()[2].number() == -300.0);
  CHECK(v.at("s").str() == "x\"y\xC3\xA9\xF0\x9F\x98\x80");
  CHECK(v.at("t").boolean());
  CHECK(v.at("n").is_null());
  CHECK(v.find("missing") == nullptr);
  CHECK(std::isnan(Json::parse("NaN").number()));
  CHECK_THROWS(FormatError, Json::parse("{\"a\": 1"));
  CHECK_THROWS(FormatError, Json::parse("[1, 2] x"));
  CHECK_THROWS(FormatError, Json::parse("\"abc"));
  CHECK_THROWS(FormatError, Json::parse(std::string(10000, '[')));  // depth bound, no stack overflow
  CHECK_THROWS(FormatError, v.at("a").str("a"));
  CHECK_THROWS(FormatError, Json::parse("1.5").integer());
  // FIPS 180-2 test vectors.
  CHECK(sha256_hex(reinterpret_cast<const uint8_t*>("abc"), 3) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  std::string million(1000000, 'a');
  Sha256 h;
  for (size_t i = 0; i < million.size(); i += 777) h.update(reinterpret_cast<const uint8_t*>(million.data()) + i, std::min<size_t>(777, million.size() - i));
  CHECK(h.hexdigest() == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  return 0;
}
