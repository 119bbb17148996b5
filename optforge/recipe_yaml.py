"""A recipe file's YAML, read with bounds: size, UTF-8, a top-level mapping, few aliases, few values; and a relative
model folder found beside the file.

A recipe is a few kilobytes; these bounds keep a hostile file from costing memory or a giant error."""

from __future__ import annotations

import logging
import reprlib
from pathlib import Path
from typing import Any

from optforge.errors import RecipeError

log = logging.getLogger(__name__)

MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_ALIASES = 64
MAX_RECIPE_NODES = 100_000


def _count_nodes(data: Any, budget: int) -> int:
    """Values in `data` counted as a walk would see them (shared aliases once per use), stopping past `budget`."""
    count, stack = 0, [data]
    while stack and count <= budget:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return count


def _bounded_loader():
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """yaml.SafeLoader that refuses more than MAX_YAML_ALIASES aliases (`*name`): a few nested aliases can
        expand a small file into gigabytes ("billion laughs")."""

        num_aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.num_aliases += 1
                if self.num_aliases > MAX_YAML_ALIASES:
                    raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases (*name); write the values out instead")
            return super().compose_node(parent, index)

    return BoundedLoader


class _LazyLoader:
    """Builds the bounded loader class on first use, so importing this module does not import yaml."""

    def __call__(self, stream):
        return _bounded_loader()(stream)


_BoundedLoader = _LazyLoader()


def read_recipe_yaml(path: Path) -> tuple[dict, str]:
    """The file's top-level mapping and its exact text; RecipeError naming the file otherwise."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found (expected a YAML file, found {'a directory' if path.exists() else 'nothing'})", path=str(path))
    raw = path.read_bytes()
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"the file has {len(raw)} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes", path=str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); save the recipe as UTF-8", path=str(path)) from None
    try:
        data = yaml.load(text, Loader=_BoundedLoader)
    except yaml.YAMLError as exc:
        raise RecipeError(f"not valid YAML: {short_repr(str(exc), 500)}", path=str(path)) from None
    if not isinstance(data, dict):
        raise RecipeError(f"expected a mapping at the top level, found {type(data).__name__}", path=str(path))
    if _count_nodes(data, MAX_RECIPE_NODES) > MAX_RECIPE_NODES:
        raise RecipeError(f"the recipe expands to more than {MAX_RECIPE_NODES} values (nested aliases?); write it out plainly", path=str(path))
    return data, text


def short_repr(value: Any, limit: int = 200) -> str:
    short = reprlib.Repr()
    short.maxstring, short.maxother, short.maxlist, short.maxdict, short.maxlevel = limit, limit, 8, 8, 3
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def model_beside_recipe(data: dict, source: str) -> dict:
    """`data` with a relative model.source made absolute against the recipe file's folder, as the recipe's other
    paths are, where a folder of that name is there. A folder found only in the working directory still loads,
    with a warning, and anything else stays a hub id."""
    spec = data.get("model", {}).get("source") if isinstance(data.get("model"), dict) else None
    if not isinstance(spec, str) or ":" in spec.split("/")[0] or not Path(source).is_file():
        return data
    path = Path(spec).expanduser()
    if path.is_absolute():
        return data
    beside = Path(source).resolve().parent / path
    if beside.is_dir():
        return {**data, "model": {**data["model"], "source": str(beside)}}
    if path.is_dir():
        log.warning("model.source '%s' is not beside the recipe (%s) but is in the working directory: loading that one; "
                    "relative paths in a recipe are relative to the recipe file", spec, beside)
    return data
