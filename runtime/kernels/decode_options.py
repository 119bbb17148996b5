"""Options of the batch-1 decode kernels (kernels/fused_decode.py): the model runner passes them down, and
benchmarks pass others to measure a variant. Importable without Triton."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class DecodeKernelOptions:
    # Programmatic dependent launch (Hopper and newer): each kernel of the step may start while the one before it
    # drains, reads what does not depend on it (weights), and waits (griddepcontrol.wait) before touching its
    # outputs. None: on where the GPU supports it (compute capability >= 9); False: off.
    use_pdl: bool | None = None
    # Each kernel lets the next one launch as soon as all its own programs have started (griddepcontrol.
    # launch_dependents at the top), not after its wait: the next kernel's programs then take free SM slots early
    # and read what they can (weights, cached keys) while this one and the one before it finish. Each still waits
    # for the kernel before it to complete before it reads that kernel's outputs or writes its own. False: launch
    # dependents after the wait. Only matters with programmatic dependent launch.
    launch_dependents_early: bool = True
    # The attention kernel reads its first page of cached keys and values before it waits for q, k, v (see the
    # kernel); False: after the wait.
    kv_before_wait: bool = True
