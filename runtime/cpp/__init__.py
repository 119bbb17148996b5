"""The optforge C++ runtime from Python: `Engine`, `Tokenizer` and the parsers of `_optforge_rt`.

The extension is built by CMake (`make cpp`, see runtime/cpp/README.md) into this folder. `load()` imports
it and raises a RuntimeError that says how to build it when it is missing, so importing this package never
fails on machines without a compiler.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BUILD_HINT = "build the C++ runtime first: `make cpp` (CMake >= 3.18, a C++17 compiler, pip install pybind11)"


def load() -> ModuleType:
    """The compiled `_optforge_rt` module."""
    try:
        return importlib.import_module("optforge.runtime.cpp._optforge_rt")
    except ImportError as exc:
        raise RuntimeError(f"the optforge C++ runtime extension is not built ({exc}); {BUILD_HINT}") from exc


def is_available() -> bool:
    try:
        load()
    except RuntimeError:
        return False
    return True
