"""Typed errors that users see. Each maps to a CLI exit code.

Messages name the file and key (or the pass), what was expected, what was found, and what to do.
"""

from __future__ import annotations

from collections.abc import Iterable


class OptforgeError(Exception):
    """Base of every error optforge raises on purpose."""

    exit_code = 1


class UserInputError(OptforgeError):
    """Bad input from the user: a recipe, a path, a missing optional dependency."""

    exit_code = 2


class RecipeError(UserInputError):
    """A recipe that does not validate. `path` is the file, `key` the dotted key path."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None):
        self.path = path
        self.key = key
        where = ""
        if path:
            where = f"{path}: "
        if key:
            where += f"{key}: "
        super().__init__(where + message)


class ModelSourceError(UserInputError):
    """A model source that cannot be found or loaded."""


class DataError(UserInputError):
    """An eval or calibration data set that cannot be found or read."""


class MissingDependencyError(UserInputError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, purpose: str, install: str | None = None):
        self.package = package
        hint = install or f"pip install {package}"
        super().__init__(f"{purpose} needs the optional package '{package}', which is not installed. Install it with: {hint}")


class ArtifactError(UserInputError):
    """An artifact that is missing, incomplete or fails its hash check."""


class PassError(OptforgeError):
    """A pass whose requirements are not met or whose output breaks its promises."""

    def __init__(self, pass_name: str, message: str):
        self.pass_name = pass_name
        super().__init__(f"pass '{pass_name}': {message}")


class NotServable(UserInputError):
    """A pass's output cannot run on the backend its speed gates measure (say FP8 on the C++ runtime)."""

    def __init__(self, pass_name: str, message: str):
        self.pass_name = pass_name
        super().__init__(f"pass '{pass_name}': {message}")


class GateFailed(OptforgeError):
    """A quality gate failed. The build stops and nothing is promoted to the output path."""

    exit_code = 3

    def __init__(self, pass_name: str, message: str, result: dict | None = None):
        self.pass_name = pass_name
        self.result = result or {}
        super().__init__(f"quality gate failed after pass '{pass_name}': {message}")


def require(module: str, purpose: str, install: str | None = None):
    """Import an optional module or raise MissingDependencyError naming how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module, purpose, install) from exc


def format_key(loc: tuple) -> str:
    """A key path as a recipe writes it: ("passes", 0, "config") -> "passes[0].config"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def suggest(word: str, candidates: Iterable[str]) -> str:
    """" Did you mean 'x'?" naming the candidate closest to a misspelt `word`, or "" when none is close."""
    import difflib

    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
