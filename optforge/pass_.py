"""Pass base class and the registry of text names.

A pass is registered under `family.method` (`quant.int8_weight_only`), has a frozen keyword-only config
dataclass, declares the properties it `requires` of its input and `produces` in its output (the pipeline
checks both), and has a `version` that enters the cache key: bump it whenever the output changes.
`run(artifact, ctx)` returns a new artifact and never mutates its input. It computes in the recipe's
`model.dtype` on the `--device` it was given (`ctx.dtype`, `ctx.device`); where it cannot, `dtypes` or
`devices` narrows what it accepts and `unsupported_why` says why, and the build refuses the recipe up front.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from optforge.errors import RecipeError, format_key, suggest

if TYPE_CHECKING:
    from optforge.artifact import ModelArtifact
    from optforge.context import PassContext
    from optforge.recipe import Recipe

_REGISTRY: dict[str, type["Pass"]] = {}


class Pass:
    name: ClassVar[str]
    version: ClassVar[int] = 1
    Config: ClassVar[type]
    # Properties the input artifact must have, e.g. {"float_weights"}.
    requires: ClassVar[frozenset[str]] = frozenset()
    # Properties the output artifact will have.
    produces: ClassVar[frozenset[str]] = frozenset()
    # Properties the output loses (a quantized model no longer has "float_weights").
    removes: ClassVar[frozenset[str]] = frozenset()
    # Whether the pass reads the recipe's calibration data (it then enters the cache key).
    uses_calibration: ClassVar[bool] = False
    # Recipe dtypes (`model.dtype`) and device types (`--device` without its index) the pass can honour;
    # None is all of them. Narrow them only with `unsupported_why` saying why (shown by `optforge passes`).
    dtypes: ClassVar[frozenset[str] | None] = None
    devices: ClassVar[frozenset[str] | None] = None
    unsupported_why: ClassVar[str] = ""

    def __init__(self, config: Any):
        self.config = config

    def run(self, artifact: "ModelArtifact", ctx: "PassContext") -> "ModelArtifact":
        raise NotImplementedError

    def preflight(self) -> None:
        """Check the machine, not the recipe (a library installed, a GPU present); raise a typed error.

        Called while the recipe is validated, so a build that cannot finish stops before it loads anything."""

    def config_dict(self) -> dict:
        """The config as JSON values (tuples become lists): what the manifest records and the cache key hashes."""
        return json.loads(json.dumps(dataclasses.asdict(self.config), default=str))

    def cache_key(self, input_digest: str, calibration: dict | None, dtype: str = "float32") -> str:
        """Hash of what decides the output: the pass, its version and config, the input, the calibration text
        (where read) and the recipe dtype the pass computes in. The device stays out, as for the eval cache."""
        payload = {
            "pass": self.name,
            "version": self.version,
            "config": self.config_dict(),
            "input": input_digest,
            "calibration": calibration if self.uses_calibration else None,
            "dtype": dtype,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to recipes under `cls.name`."""
    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"{cls.__name__}.Config must be a dataclass")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name '{cls.name}' is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    import optforge.passes  # noqa: F401  (importing the package registers every built-in pass)

    return dict(_REGISTRY)


def get_pass(name: str) -> type[Pass]:
    passes = registry()
    if name not in passes:
        raise RecipeError(f"unknown pass '{name}'.{suggest(name, passes)} Registered: {', '.join(sorted(passes))}")
    return passes[name]


def make_config(cls: type[Pass], config: dict, *, source: str = "<python>", key: str = "config") -> Any:
    """Build the pass's config dataclass from a recipe dict, with recipe-style errors."""
    from pydantic import TypeAdapter, ValidationError

    fields = {f.name for f in dataclasses.fields(cls.Config)}
    for name in config:
        if name not in fields:
            raise RecipeError(
                f"unknown config key '{name}' for pass '{cls.name}'.{suggest(name, fields)} "
                f"Valid keys: {', '.join(sorted(fields))}",
                path=source,
                key=f"{key}.{name}",
            )
    try:
        return TypeAdapter(cls.Config).validate_python(config)
    except ValidationError as exc:
        err = exc.errors()[0]
        sub = format_key(err["loc"])
        raise RecipeError(f"{err['msg']} (found {err.get('input')!r})", path=source, key=f"{key}.{sub}" if sub else key) from None


def plan_passes(recipe: "Recipe", *, source: str = "<python>", device: str | None = None) -> list[Pass]:
    """The recipe's passes, each with its config parsed (once) and checked against the machine, the recipe's
    dtype and `device` (None: not known yet, checked by the build). Raises RecipeError naming the pass."""
    passes = []
    for i, spec in enumerate(recipe.passes):
        try:
            cls = get_pass(spec.name)
        except RecipeError as exc:
            raise RecipeError(str(exc), path=source, key=f"passes[{i}].name") from None
        p = cls(make_config(cls, spec.config, source=source, key=f"passes[{i}].config"))
        p.preflight()
        problem = unsupported(cls, recipe.model.dtype, device)
        if problem:
            raise RecipeError(problem, path=source, key=f"passes[{i}].name")
        passes.append(p)
    return passes


def unsupported(cls: type[Pass], dtype: str, device: str | None) -> str | None:
    """Why `cls` cannot run in `dtype` on `device` (None when it can)."""
    kind = device.split(":")[0] if device else None
    if cls.dtypes is not None and dtype not in cls.dtypes:
        asked, allowed = f"model.dtype {dtype}", f"model.dtype in {sorted(cls.dtypes)}"
    elif kind is not None and cls.devices is not None and kind not in cls.devices:
        asked, allowed = f"--device {device}", f"--device in {sorted(cls.devices)}"
    else:
        return None
    return f"pass '{cls.name}' cannot run with {asked}: {cls.unsupported_why or 'not supported'}. Use {allowed}, or drop the pass"


def describe_support(cls: type[Pass]) -> str:
    """One line for `optforge passes`: the dtypes and devices the pass honours, and why not others."""
    dtypes = ", ".join(sorted(cls.dtypes)) if cls.dtypes is not None else "any"
    devices = ", ".join(sorted(cls.devices)) if cls.devices is not None else "any"
    why = f" ({cls.unsupported_why})" if cls.unsupported_why else ""
    return f"model.dtype {dtypes}; --device {devices}{why}"


def describe_config(cls: type[Pass]) -> list[dict[str, str]]:
    """Rows of (name, type, default, help) for `optforge passes`."""
    rows = []
    hints = typing.get_type_hints(cls.Config)
    for f in dataclasses.fields(cls.Config):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        typ = hints.get(f.name, f.type)
        rows.append({"name": f.name, "type": getattr(typ, "__name__", str(typ)), "default": default, "help": f.metadata.get("help", "")})
    return rows


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A config dataclass field with its documentation (shown by `optforge passes`)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


config = dataclass(frozen=True, kw_only=True)
