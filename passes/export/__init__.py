"""Export passes: ONNX with an explicit KV cache (`export.onnx`) and TensorRT engines (`export.tensorrt`)."""

from optforge.passes.export import onnx_export, tensorrt  # noqa: F401
