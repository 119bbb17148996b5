// optforge-rt: the command-line face of the C++ runtime.
//   optforge-rt generate ARTIFACT "prompt" [--max-new-tokens N] [--chat] [--threads N] [--isa auto|avx2|...] [--no-verify]
//   optforge-rt bench ARTIFACT [--batch 1] [--prompt-tokens 128] [--new-tokens 64] [--threads N]   (prints JSON)
//   --no-copy (generate, bench): read the weights from the file mapping instead of a huge-page copy
//   optforge-rt tokenize ARTIFACT "text"        optforge-rt verify ARTIFACT
#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "optforge_rt/engine.h"
#include "optforge_rt/errors.h"
#include "optforge_rt/tokenizer.h"

using namespace optforge_rt;

namespace {

struct Args {
  std::vector<std::string> positional;
  std::map<std::string, std::string> options;
  int get_int(const std::string& key, int fallback) const {
    auto it = options.find(key);
    return it == options.end() ? fallback : std::stoi(it->second);
  }
  bool flag(const std::string& key) const { return options.count(key) != 0; }
};

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 2; i < argc; ++i) {
    std::string s = argv[i];
    if (s.rfind("--", 0) == 0) {
      bool is_flag = s == "--chat" || s == "--no-verify" || s == "--ignore-eos" || s == "--no-copy";
      a.options[s] = is_flag || i + 1 >= argc ? "1" : argv[++i];
    } else {
      a.positional.push_back(s);
    }
  }
  return a;
}

int usage() {
  std::cerr << "usage: optforge-rt generate|bench|tokenize|verify ARTIFACT [...]\n";
  return 2;
}

int run(int argc, char** argv) {
  if (argc < 3) return usage();
  std::string cmd = argv[1];
  Args args = parse_args(argc, argv);
  if (args.positional.empty()) return usage();
  const std::string& dir = args.positional[0];
  if (args.options.count("--isa")) set_isa(parse_isa(args.options["--isa"]));
  if (cmd == "verify") {
    verify_manifest(dir);
    std::cout << dir << ": every file matches manifest.json\n";
    return 0;
  }
  if (cmd == "tokenize") {
    Tokenizer tok = Tokenizer::from_file(dir + "/tokenizer.json");
    for (int id : tok.encode(args.positional.size() > 1 ? args.positional[1] : "")) std::cout << id << ' ';
    std::cout << '\n';
    return 0;
  }
  int threads = args.get_int("--threads", 0);
  int block_size = 16;
  int num_blocks = args.get_int("--kv-blocks", 1024);
  ModelOptions model_options;
  model_options.copy_weights = !args.flag("--no-copy");
  const bool verify = !args.flag("--no-verify");
  Engine engine(dir, threads, num_blocks, block_size, verify, true, model_options);
  if (!engine.verified()) {
    std::cerr << dir << (verify ? ": a plain model folder (no manifest.json): loading it unverified\n"
                                : ": loading without verifying its files (--no-verify)\n");
  }
  if (cmd == "generate") {
    Tokenizer tok = Tokenizer::from_file(dir + "/tokenizer.json");
    std::string prompt = args.positional.size() > 1 ? args.positional[1] : "";
    if (args.flag("--chat")) prompt = tok.apply_chat_template({{"user", prompt}}, true);
    GenerationConfig cfg;
    cfg.max_new_tokens = args.get_int("--max-new-tokens", 64);
    auto out = engine.generate({tok.encode(prompt)}, cfg);
    std::cout << tok.decode(out[0]) << std::endl;
    return 0;
  }
  if (cmd == "bench") {
    int batch = args.get_int("--batch", 1), prompt_tokens = args.get_int("--prompt-tokens", 128), new_tokens = args.get_int("--new-tokens", 64);
    std::vector<std::vector<int>> prompts;
    for (int b = 0; b < batch; ++b) {
      std::vector<int> p;
      for (int i = 0; i < prompt_tokens; ++i) p.push_back(100 + (i * 7 + b * 13) % 30000);  // distinct: no prefix reuse
      prompts.push_back(p);
    }
    GenerationConfig cfg;
    cfg.max_new_tokens = new_tokens;
    cfg.ignore_eos = true;
    cfg.max_num_seqs = batch;
    cfg.max_num_batched_tokens = batch * prompt_tokens;
    GenerationStats st;
    engine.generate(prompts, cfg, &st);
    std::printf("{\"format\": \"%s\", \"activations\": \"%s\", \"kv_cache\": \"%s\", \"isa\": \"%s\", \"threads\": %d, \"batch\": %d, "
                "\"prefill_tok_s\": %.2f, \"decode_tok_s\": %.2f, \"weight_bytes\": %zu, \"weights\": \"%s\"}\n",
                engine.model().weight_format().c_str(), engine.model().activations().c_str(), kv_dtype_name(engine.model().kv_cache_dtype()),
                isa_name(active_isa()), engine.num_threads(), batch, st.prefill_tokens / st.prefill_seconds, st.decode_tokens / st.decode_seconds,
                engine.model().weight_bytes(), engine.model().weight_placement());
    return 0;
  }
  return usage();
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const ArtifactError& e) {
    std::cerr << "artifact error: " << e.what() << '\n';
  } catch (const FormatError& e) {
    std::cerr << "format error: " << e.what() << '\n';
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << '\n';
  }
  return 1;
}
