"""Tasks: what an adapter is trained for and scored by, the rows it reads, and the token examples made of them.

A `Task` names its training data (a ``.jsonl`` file), its held-out rows and
the metric it is scored by (`fmhub.ml.scoring`):

* ``loss``: mean NLL per token of the ``text`` column (nats; lower is better);
* ``accuracy``: rows have ``text`` and ``label``; the prompt is the text, each
  class's verbalization is ``" " + class``, and the prediction is the class
  whose tokens get the highest total log-probability (ties: the first class);
* ``exact_match``: rows have ``prompt`` and ``completion``; greedy generation
  from the prompt must equal the completion after ``strip()``.

**What is trained on** (`examples`). For ``loss`` every token of the text;
for the other two only the answer (``" " + label``, or the completion
followed by the tokenizer's end-of-sequence token when it has one) given the
prompt, which is what the metric asks of the model.

**Held-out rows** (`split`). ``Task.eval`` when given, else every row of
``data`` whose line hashes (sha256) to 0 mod 10 (the lowest hash alone when
that leaves a side empty): a split that depends on each row's content only,
so appending rows never moves an old row across it, and duplicate rows land
on the same side.

**Reading** (`read_rows`). Every file goes through the governance gate
(`fmhub.governance.gate.open_rows`) before a row is read: the read policy for
the task's columns and the file, and, when the rows train a new model
version, excluded sources and the licence policy; rows a ``rows:`` rule
withholds from the user are left out (one audit record with their count), as
``fmhub clean`` leaves them out. A task from ``fmhub.yaml`` (`task_of`) names
its ``tasks.NAME`` line in errors; one built by hand names itself.

Tokenization is `fmhub.data.texts`'s: the model directory's tokenizer, or its
byte fallback for tiny models that ship none.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TYPE_CHECKING, Any, Optional, Sequence

from fmhub.base.errors import FmhubError
from fmhub.data import texts as datasets_io
from fmhub.governance import gate
from fmhub.governance.gate import Step

if TYPE_CHECKING:
    import torch

    from fmhub.project.spec import LoadedSpec

METRICS = ("loss", "accuracy", "exact_match")
HELD_OUT_EVERY = 10  # one row in this many (by hash) is held out when a task gives no eval file


class TaskError(FmhubError):
    """A task or its data that cannot be trained or scored (bad metric, missing column, unknown label)."""


@dataclass
class Task:
    """What an adapter is for: its data, its held-out rows and the metric that scores it (see the module docstring)."""

    name: str
    data: str
    eval: Optional[str] = None
    metric: str = "loss"
    classes: Optional[list[str]] = None
    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    label: str = "label"
    origin: Optional[Step] = dataclass_field(default=None, compare=False, repr=False)  # where it was declared (`task_of`): its reads name that line

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise TaskError(f"task {self.name!r}: unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")
        if self.metric == "accuracy":
            if not self.classes:
                raise TaskError(f"task {self.name!r}: metric accuracy needs classes, the label values "
                                "(e.g. classes: [negative, positive])")
            if len(set(self.classes)) != len(self.classes) or not all(isinstance(c, str) and c for c in self.classes):
                raise TaskError(f"task {self.name!r}: classes must be distinct non-empty strings, got {self.classes!r}")

    def columns(self) -> tuple[str, ...]:
        """The columns each row needs for this metric."""
        return {"loss": (self.text,), "accuracy": (self.text, self.label), "exact_match": (self.prompt, self.completion)}[self.metric]


# ------------------------------------------------------------------ rows


@dataclass(frozen=True)
class TaskRow:
    where: str  # "path:line", for error messages
    values: dict[str, Any]
    key: int  # stable hash of the line, for the held-out split


def reader(task: Task) -> Step:
    """Who reads ``task``'s files: its ``tasks.NAME`` of fmhub.yaml (`task_of`), else the task itself."""
    return task.origin or Step("task", task.name)


def _dataset(step: Step, field_name: str) -> Optional[str]:
    """The name fmhub.yaml's task gives the file (a declared dataset, or its path): for the licence check."""
    if step.loaded is None or step.section != "tasks":
        return None
    declared = step.loaded.spec.tasks.get(step.name)
    return getattr(declared, field_name, None) if declared is not None else None


def open_file(path: str, task: Task, *, field: str = "data", step: Optional[Step] = None, new_version: bool = False,
              governed_as: Optional[str] = None) -> gate.Rows:
    """``path`` through the governance gate for ``task``: refused (before any row is read) as `read_rows` says."""
    step = step or reader(task)
    return gate.open_rows(step, path, task.columns(), dataset=_dataset(step, field), field=field, new_version=new_version,
                          governed_as=governed_as)


def read_rows(path: str, task: Task, *, field: str = "data", step: Optional[Step] = None, new_version: bool = False,
              governed_as: Optional[str] = None) -> list[TaskRow]:
    """Every non-blank row of ``path`` the user may read (.jsonl objects, or for metric loss any other file's lines as ``text``), checked.

    ``step`` reads (default: `reader`); ``field`` is the spec key naming
    ``path``; ``new_version``: the rows train a new model version (see the
    module docstring); ``governed_as``: the work-tree path whose rules govern
    ``path``, a copy of it (`fmhub.governance.gate.open_rows`).
    """
    if not os.path.exists(path):
        raise TaskError(f"task {task.name!r}: no such data file {path}")
    jsonl = path.endswith(".jsonl")
    if not jsonl and task.metric != "loss":
        raise TaskError(f"{path}: metric {task.metric} needs a .jsonl file with columns {', '.join(task.columns())}")
    opened = open_file(path, task, field=field, step=step, new_version=new_version, governed_as=governed_as)
    try:
        lines = list(opened.lines(task.text))
    except FileNotFoundError:
        raise TaskError(f"task {task.name!r}: no such data file {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    opened.record_withheld()
    rows = []
    for line in lines:
        where = f"{path}:{line.number}"
        if line.problem is not None:
            raise TaskError(f"{where}: {line.problem}")
        obj = line.row
        if not isinstance(obj, dict):
            raise TaskError(f"{where}: each line must be a JSON object with columns {', '.join(task.columns())}")
        for col in task.columns():
            if not isinstance(obj.get(col), str):
                what = "no" if col not in obj else f"a non-string ({type(obj[col]).__name__})"
                raise TaskError(f"{where}: {what} {col!r} column; task {task.name!r} (metric {task.metric}) needs string "
                                f"columns {', '.join(task.columns())} (rename them with the task's column options)")
        if task.metric == "accuracy" and obj[task.label] not in (task.classes or ()):
            raise TaskError(f"{where}: label {obj[task.label]!r} is not one of task {task.name!r}'s classes {task.classes}; "
                            "fix the row or add the class")
        key = int.from_bytes(hashlib.sha256(line.text.encode("utf-8")).digest()[:8], "big")
        rows.append(TaskRow(where, obj, key))
    if not rows:
        raise TaskError(f"{path}: no rows; task {task.name!r} needs at least one")
    return rows


def split(task: Task, *, step: Optional[Step] = None, field: Optional[str] = None,
          new_version: bool = False) -> tuple[list[TaskRow], list[TaskRow]]:
    """(training rows, held-out rows): see the module docstring. ``field``: the spec key for both files (default: data, eval)."""
    rows = read_rows(task.data, task, field=field or "data", step=step, new_version=new_version)
    if task.eval is not None:
        return rows, read_rows(task.eval, task, field=field or "eval", step=step, new_version=new_version)
    if len(rows) < 2:
        raise TaskError(f"{task.data}: one row cannot be split into training and held-out rows; add rows or give the task an eval file")
    held = [r.key % HELD_OUT_EVERY == 0 for r in rows]
    if not any(held) or all(held):  # a few rows can miss the 1-in-10 (or all hit it): hold out the lowest hash alone
        lowest = min(range(len(rows)), key=lambda i: rows[i].key)
        held = [i == lowest for i in range(len(rows))]
    return [r for r, h in zip(rows, held) if not h], [r for r, h in zip(rows, held) if h]


def check_readable(task: Task) -> Optional[str]:
    """Refuse (`AccessDenied`) a task whose files the user may not read, reading no row; who reads, when rows are withheld.

    The answer (None when no ``rows:`` rule applies) is part of what a cached
    score depends on (`fmhub.ml.selection`): a score over the rows one user
    may read is not another's.
    """
    views = []
    for path, field_name in ((task.data, "data"), (task.eval, "eval")):
        if path is not None:
            opened = open_file(path, task, field=field_name)
            if opened.gate is not None:
                views.append(f"{path}: rows readable by {opened.gate.request.principal}")
    return "; ".join(views) or None


def task_of(loaded: LoadedSpec, task_name: str) -> Task:
    """A declared task as a `Task`, its paths resolved; its reads name ``tasks.NAME`` of fmhub.yaml."""
    t = loaded.spec.tasks[task_name]
    return Task(name=task_name, data=loaded.dataset_path(t.data), eval=loaded.dataset_path(t.eval) if t.eval else None,
                metric=t.metric, classes=t.classes, text=t.text, label=t.label, prompt=t.prompt, completion=t.completion,
                origin=gate.pipeline_step(loaded, "tasks", task_name))


def task_texts(task: Task, limit: int = 500) -> list[str]:
    """Up to ``limit`` of a task's input texts, in file order, less withheld rows (what the router learns the task from)."""
    col = task.text if task.metric != "exact_match" else task.prompt
    opened = open_file(task.data, task)
    out: list[str] = []
    for batch in opened.batches(256):
        out += [str(r[col]) for r in batch.rows if r and r.get(col)]
        if len(out) >= limit:
            break
    opened.record_withheld()
    return out[:limit]


# ------------------------------------------------------------------ tokens


@dataclass(frozen=True)
class Example:
    ids: list[int]
    start: int  # tokens before ``start`` are context: not trained on, not scored


def encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    """Token ids; ``special`` adds the tokenizer's BOS and the like (prompts do, answers appended to them do not)."""
    if isinstance(tokenizer, datasets_io.ByteTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer.encode(text, add_special_tokens=special))


def eos_id(tokenizer: Any) -> Optional[int]:
    value = getattr(tokenizer, "eos_token_id", None)
    return value if isinstance(value, int) else None


def answer_text(task: Task, row: TaskRow) -> str:
    return " " + row.values[task.label] if task.metric == "accuracy" else row.values[task.completion]


def with_prompt(prompt: list[int], answer: list[int], max_length: int, where: str) -> Example:
    """prompt + answer in ``max_length`` tokens: the prompt loses its start, never the answer (what is scored)."""
    room = max_length - len(answer)
    if not answer:
        raise TaskError(f"{where}: the answer is empty after tokenization; give it some text")
    if room < 1:
        raise TaskError(f"{where}: the answer is {len(answer)} tokens, too long for max_length {max_length}; raise max_length")
    if not prompt:
        raise TaskError(f"{where}: the prompt is empty after tokenization; the model needs a token to predict the answer from")
    prompt = prompt[-room:]
    return Example(prompt + answer, len(prompt))


def examples(task: Task, rows: Sequence[TaskRow], tokenizer: Any, max_length: int) -> list[Example]:
    """What is trained on and what the eval loss scores, one per row."""
    out = []
    for row in rows:
        if task.metric == "loss":
            ids = encode(tokenizer, row.values[task.text], True)[:max_length]
            if len(ids) < 2:
                raise TaskError(f"{row.where}: the text is {len(ids)} token(s); a causal LM needs at least 2 to predict one")
            out.append(Example(ids, 0))
            continue
        prompt_col = task.text if task.metric == "accuracy" else task.prompt
        answer = encode(tokenizer, answer_text(task, row), False)
        eos = eos_id(tokenizer)
        if task.metric == "exact_match" and eos is not None:
            answer = answer + [eos]  # so the model learns where the completion ends
        out.append(with_prompt(encode(tokenizer, row.values[prompt_col], True), answer, max_length, row.where))
    return out


def check_vocab(examples: Sequence[Example], vocab_size: int, rows: Sequence[TaskRow]) -> None:
    for ex, row in zip(examples, rows):
        bad = [t for t in ex.ids if not 0 <= t < vocab_size]
        if bad:
            raise TaskError(f"{row.where}: token id {bad[0]} is outside the model's vocabulary [0, {vocab_size}); "
                            "the model directory's tokenizer does not fit its model")


def collate(batch: Sequence[Example], pad: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """`datasets_io.collate`, with the context tokens taken out of the labels."""
    ids, labels = datasets_io.collate([e.ids for e in batch], pad)
    for row, e in enumerate(batch):
        labels[row, : e.start] = datasets_io.IGNORE_INDEX
    return ids, labels

