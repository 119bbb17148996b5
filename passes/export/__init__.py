"""Export passes: ONNX with an explicit KV cache (`export.onnx`), TensorRT engines (`export.tensorrt`) and
ModelOpt's unified Hugging Face checkpoint (`export.modelopt`)."""

from optforge.passes.export import modelopt, onnx_export, tensorrt  # noqa: F401
