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

  py::class_<Engine>(m, "Engine")
      .def(py::init<const std::string&, int, int, int, bool, bool>(), py::arg("path"), py::arg("num_threads") = 0, py::arg("num_kv_blocks") = 1024,
           py::arg("block_size") = 16, py::arg("verify") = true, py::arg("enable_prefix_caching") = true)
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
      .def_property_readonly("weight_bytes", [](Engine& e) { return e.model().weight_bytes(); })
      .def_property_readonly("num_threads", &Engine::num_threads)
      .def_property_readonly("num_free_blocks", [](Engine& e) { return e.block_manager().num_free_blocks(); })
      .def_property_readonly("prefix_hits", [](Engine& e) { return e.block_manager().num_prefix_hits(); });
}
