"""Run a TensorRT plan written by `export.tensorrt`. NOT exercised on the machines of this project.

Written against the TensorRT 10 Python API (name-based I/O: `set_input_shape`, `set_tensor_address`,
`execute_async_v3`); buffers are torch CUDA tensors so no pycuda is needed. Same step interface as
`OnnxCausalLM.forward`: ids/positions (B, S), past per layer (B, Hkv, P, D) -> logits, present.
"""

from __future__ import annotations

from pathlib import Path

from optforge.formats.tensorrt import import_tensorrt


class TensorRTCausalLM:
    def __init__(self, plan_path: str | Path):
        import torch

        trt = import_tensorrt()
        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(plan_path).read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _torch_dtype(self, name: str):
        """The torch dtype of an engine I/O tensor (TensorRT gives a numpy type through trt.nptype)."""
        import numpy as np

        return self.torch.from_numpy(np.zeros(1, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype

    def forward(self, input_ids, position_ids, past: list):
        """One step on CUDA tensors; returns (logits, present list) as CUDA tensors."""
        torch = self.torch
        feeds = {"input_ids": input_ids.long(), "position_ids": position_ids.long()}
        feeds.update(zip([n for n in self.inputs if n.startswith("past_key_values.")], past))
        for name, tensor in feeds.items():
            feeds[name] = tensor.to(self._torch_dtype(name)).contiguous()
            self.context.set_input_shape(name, tuple(feeds[name].shape))
            self.context.set_tensor_address(name, feeds[name].data_ptr())
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, results[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log above")
        stream.synchronize()
        return results["logits"], [results[n] for n in self.outputs if n.startswith("present.")]
