"""What a pass may use besides its input: calibration text, a place to write, progress reporting."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from optforge.resources import MemoryBudget

if TYPE_CHECKING:
    from optforge.passes.onload import Placement
    from optforge.recipe import CalibrationSpec, ModelSpec


@dataclass(frozen=True)
class PassContext:
    # Directory the pass writes its output model into (a staging dir, promoted by the pipeline).
    output_dir: Path
    model: "ModelSpec"
    calibration: "CalibrationSpec | None"
    # Device the pass computes on (`--device`: "cpu", "cuda", "cuda:1"); a pass that cannot honour it says
    # so in its `devices` and the build refuses the recipe before any work (`pass_.plan_passes`).
    device: str = "cpu"
    # progress(description, total) -> advance(n) callable; a no-op outside the CLI.
    progress: Callable[[str, int], Callable[[int], None]] = lambda desc, total: (lambda n=1: None)
    # Folder where a calibrated pass checkpoints finished layers, keyed by the pass's cache key, so a build
    # killed midway resumes there (`<cache>/resume/<key>/`, removed once the output is cached); None: no resume.
    resume_dir: Path | None = None
    # `--max-device-memory` / `--max-host-memory`: what a calibrated pass may hold (passes/onload.py).
    memory: MemoryBudget = MemoryBudget()

    @property
    def placement(self) -> "Placement":
        """Where calibration computes and what it may hold; activations over the budgets spill into the resume
        folder (none: no spilling), and under a host budget finished layers are parked there."""
        from optforge.passes.onload import Placement

        if self.resume_dir is None:
            return Placement.of(self.device, self.memory)
        return Placement.of(self.device, self.memory, self.resume_dir / "activations", self.resume_dir / "layers" if self.memory.host is not None else None)

    @property
    def dtype(self) -> str:
        """Precision the recipe asks the pass to compute in (`model.dtype`): float32, bfloat16 or float16.

        Quantized weights keep their own storage types; a pass that cannot honour it says so in its `dtypes`."""
        return self.model.dtype

    def calibration_texts(self) -> list[str]:
        """The recipe's calibration passages (raises PassError in the caller if there are none)."""
        from optforge.evals.datasets import load_texts

        if self.calibration is None:
            return []
        return load_texts(self.calibration)
