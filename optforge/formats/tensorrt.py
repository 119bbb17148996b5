"""The TensorRT engine format: the files `export.tensorrt` writes and the guarded import of `tensorrt` that
both the pass and the runtime's runner (`runtime/tensorrt_runner.py`) use. `tensorrt` loads on the call."""

from __future__ import annotations

from optforge.errors import MissingDependencyError

PLAN_FILE = "model.plan"
INSPECTOR_FILE = "engine_inspector.json"
INSTALL_HINT = (
    "pip install tensorrt-cu12 (or tensorrt-cu13) from NVIDIA's index (https://pypi.nvidia.com) on a machine "
    "with a CUDA GPU, or use the `export.onnx` + onnxruntime path instead"
)


def import_tensorrt():
    """The `tensorrt` module, or MissingDependencyError. The bindings alone import-fail without the libs."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: bindings installed, libnvinfer missing
        raise MissingDependencyError("tensorrt", "the `export.tensorrt` pass (building a TensorRT engine)", INSTALL_HINT) from exc
    return tensorrt
