// The Python binding: optforge.runtime.cpp._optforge_rt (pybind11). Errors map to Python exceptions
// ArtifactError / FormatError (subclasses of ValueError) so callers can catch them by type.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "optforge_rt/engine.h"
#include "optforge_rt/errors.h"
#include "optforge_rt/safetensors.h"
#include "optforge_rt/tokenizer.h"

namespace py = pybind11;
using namespace optforge_rt;

namespace {
// The model and its KV cache without the C++ scheduler: the Python engine (runtime/cpp_runner.py) schedules,
// keeps the block tables and samples, and calls forward() once per step.
struct StepRunner {
  StepRunner(const std::string& path, int num_threads, int num_kv_blocks, int block_size, bool verify, bool copy_weights)
      : pool(num_threads), model(open_artifact(path, verify), num_kv_blocks, block_size, ModelOptions{copy_weights}) {}
  ThreadPool pool;
  Model model;
};
}  // namespace

PYBIND11_MODULE(_optforge_rt, m) {
  m.doc() = "optforge C++ runtime";
  py::register_exception<ArtifactError>(m, "ArtifactError", PyExc_ValueError);
  py::register_exception<FormatError>(m, "FormatError", PyExc_ValueError);

  m.def("detected_isa", [] { return std::string(isa_name(detected_isa())); });
  m.def("active_isa", [] { return std::string(isa_name(active_isa())); });
  m.def("set_isa", [](const std::string& name) { set_isa(parse_isa(name)); }, py::arg("name"));
  m.def("verify_manifest", &verify_manifest, py::arg("path"), "Check files against manifest.json; raises ArtifactError.");
  m.def("parse_json", [](py::bytes data) { Json::parse(std::string(data)); }, "Parse JSON (raises FormatError); for fuzzing.");
  m.def("parse_safetensors", [](py::bytes data) {
    std::string s(data);
    SafeTensors st(reinterpret_cast<const uint8_t*>(s.data()), s.size(), "<bytes>");
    return static_cast<int>(st.tensors().size());
  }, "Parse a safetensors image in memory (raises FormatError); returns the tensor count.");
  m.def("pretokenize", [](const std::string& text) { return pretokenize(text); });

  py::class_<Tokenizer>(m, "Tokenizer")
      .def_static("from_file", &Tokenizer::from_file, py::arg("path"))
      .def_static("from_json", [](const std::string& text) { return Tokenizer::from_json(text, "<json>"); }, py::arg("text"))
      .def("encode", &Tokenizer::encode, py::arg("text"), py::call_guard<py::gil_scoped_release>())
      .def("decode", &Tokenizer::decode, py::arg("ids"))
      .def("token_id", &Tokenizer::token_id)
      .def_property_readonly("vocab_size", &Tokenizer::vocab_size);

  py::class_<GenerationStats>(m, "GenerationStats")
      .def_readonly("prefill_seconds", &GenerationStats::prefill_seconds)
      .def_readonly("decode_seconds", &GenerationStats::decode_seconds)
      .def_readonly("prefill_tokens", &GenerationStats::prefill_tokens)
      .def_readonly("decode_tokens", &GenerationStats::decode_tokens)
      .def_readonly("num_preemptions", &GenerationStats::num_preemptions);

  py::class_<StepRunner>(m, "StepRunner")
      .def(py::init<const std::string&, int, int, int, bool, bool>(), py::arg("path"), py::arg("num_threads") = 0, py::arg("num_kv_blocks") = 1024,
           py::arg("block_size") = 16, py::arg("verify") = true, py::arg("copy_weights") = true)
      .def("forward",
           [](StepRunner& r, std::vector<int> tokens, std::vector<int> positions, std::vector<int> seq_of, std::vector<std::vector<int>> block_tables,
              std::vector<int> logits_for) {
             if (positions.size() != tokens.size() || seq_of.size() != tokens.size()) throw std::invalid_argument("forward: tokens, positions and seq_of differ in length");
             for (int s : seq_of) {
               if (s < 0 || s >= static_cast<int>(block_tables.size())) throw std::invalid_argument("forward: seq_of index out of range");
             }
             for (int t : logits_for) {
               if (t < 0 || t >= static_cast<int>(tokens.size())) throw std::invalid_argument("forward: logits_for index out of range");
             }
             ForwardBatch batch{std::move(tokens), std::move(positions), std::move(seq_of), std::move(block_tables), std::move(logits_for)};
             std::vector<float> logits;
             {
               py::gil_scoped_release release;
               logits = r.model.forward(batch, r.pool);
             }
             const py::ssize_t rows = static_cast<py::ssize_t>(batch.logits_for.size()), vocab = r.model.config().vocab_size;
             return py::array_t<float>({rows, vocab}, logits.data());
           },
           py::arg("tokens"), py::arg("positions"), py::arg("seq_of"), py::arg("block_tables"), py::arg("logits_for"),
           "Logits (len(logits_for), vocab) of one flat step; K/V of every token written to its slot.")
      .def("copy_block", [](StepRunner& r, int src, int dst) {
             if (src < 0 || dst < 0 || src >= r.model.num_kv_blocks() || dst >= r.model.num_kv_blocks()) throw std::invalid_argument("copy_block: block id out of range");
             r.model.copy_block(src, dst);
           })
      .def_property_readonly("num_kv_blocks", [](StepRunner& r) { return r.model.num_kv_blocks(); })
      .def_property_readonly("vocab_size", [](StepRunner& r) { return r.model.config().vocab_size; })
      .def_property_readonly("weight_format", [](StepRunner& r) { return r.model.weight_format(); })
      .def_property_readonly("activations", [](StepRunner& r) { return r.model.activations(); },
                             "What the quantized Linears multiply with: fp32 (weight-only), int8, or mixed.")
      .def_property_readonly("kv_cache_dtype", [](StepRunner& r) { return std::string(kv_dtype_name(r.model.kv_cache_dtype())); })
      .def_property_readonly("kv_cache_bytes", [](StepRunner& r) { return r.model.kv_cache_bytes(); }, "K and V of every layer, in bytes.")
      .def_property_readonly("num_threads", [](StepRunner& r) { return r.pool.num_threads(); });
  m.def("kv_element_bytes", [](const std::string& dtype) {
    if (dtype != "fp32" && dtype != "int8" && dtype != "fp8") throw std::invalid_argument("KV cache dtype '" + dtype + "' (fp32, int8, fp8)");
    return kv_element_bytes(dtype == "fp32" ? KvDtype::kF32 : dtype == "int8" ? KvDtype::kInt8 : KvDtype::kFp8);
  }, py::arg("dtype"), "Bytes per cached K or V element: 4 for fp32, 1 for int8 and fp8.");
  m.def("e4m3_encode", [](float v) { return e4m3_encode(v); }, py::arg("value"));
  m.def("e4m3_decode", [](uint8_t code) { return e4m3_decode(code); }, py::arg("code"));

  py::class_<Engine>(m, "Engine")
      .def(py::init([](const std::string& path, int num_threads, int num_kv_blocks, int block_size, bool verify, bool enable_prefix_caching,
                       bool copy_weights) {
             return std::make_unique<Engine>(path, num_threads, num_kv_blocks, block_size, verify, enable_prefix_caching, ModelOptions{copy_weights});
           }),
           py::arg("path"), py::arg("num_threads") = 0, py::arg("num_kv_blocks") = 1024, py::arg("block_size") = 16, py::arg("verify") = true,
           py::arg("enable_prefix_caching") = true, py::arg("copy_weights") = true,
           "copy_weights: copy the matmul weights into one huge-page buffer at load (False: read the file mapping).")
      .def("generate",
           [](Engine& e, const std::vector<std::vector<int>>& prompts, int max_new_tokens, bool ignore_eos, int max_num_seqs, int max_num_batched_tokens) {
             GenerationConfig cfg;
             cfg.max_new_tokens = max_new_tokens;
             cfg.ignore_eos = ignore_eos;
             cfg.max_num_seqs = max_num_seqs;
             cfg.max_num_batched_tokens = max_num_batched_tokens;
             GenerationStats stats;
             std::vector<std::vector<int>> out;
             {
               py::gil_scoped_release release;
               out = e.generate(prompts, cfg, &stats);
             }
             return py::make_tuple(out, stats);
           },
           py::arg("prompts"), py::arg("max_new_tokens") = 64, py::arg("ignore_eos") = false, py::arg("max_num_seqs") = 8,
           py::arg("max_num_batched_tokens") = 2048)
      .def("last_logits",
           [](Engine& e, const std::vector<int>& tokens) {
             std::vector<float> v;
             {
               py::gil_scoped_release release;
               v = e.last_logits(tokens);
             }
             return py::array_t<float>(static_cast<py::ssize_t>(v.size()), v.data());
           },
           py::arg("tokens"))
      .def_property_readonly("weight_format", [](Engine& e) { return e.model().weight_format(); })
      .def_property_readonly("activations", [](Engine& e) { return e.model().activations(); })
      .def_property_readonly("kv_cache_dtype", [](Engine& e) { return std::string(kv_dtype_name(e.model().kv_cache_dtype())); })
      .def_property_readonly("weight_bytes", [](Engine& e) { return e.model().weight_bytes(); })
      .def_property_readonly("weight_placement", [](Engine& e) { return std::string(e.model().weight_placement()); })
      .def_property_readonly("num_threads", &Engine::num_threads)
      .def_property_readonly("verified", &Engine::verified, "Whether every file matched manifest.json at load.")
      .def_property_readonly("num_free_blocks", [](Engine& e) { return e.block_manager().num_free_blocks(); })
      .def_property_readonly("prefix_hits", [](Engine& e) { return e.block_manager().num_prefix_hits(); });
}
