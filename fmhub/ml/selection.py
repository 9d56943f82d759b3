"""Model selection: rank candidate models and adapters on the declared benchmarks.

`leaderboard(candidates, tasks)` evaluates every `Candidate` (a base model
directory, with or without a LoRA adapter) on every task
(`fmhub.ml.tasks.Task`, scored by `fmhub.ml.scoring.evaluate` unless another
``evaluate`` is given) and ranks them:

* **Per task** by score: ``loss`` (and ``perplexity``) lower is better, every
  other metric higher (a task may say otherwise with ``higher_is_better``).
  Equal scores share the mean of their positions (two candidates tied for
  first both get rank 1.5), so no name wins a tie it did not earn.
* **Overall** by mean rank across tasks; equal mean ranks are listed by name.
* A candidate that fails to evaluate on a task (an adapter for another base, a
  corrupt file) gets that error as its entry, ranks after every candidate that
  did not fail there, and is listed after every candidate without errors; the
  others are ranked as usual.

The `Leaderboard` gives ``rows`` (best first), ``best_for(task)``,
``to_json()`` and ``table()`` (a rich table, what ``fmhub select`` prints).

**Cache.** With ``cache=PATH`` (a JSON file) each score is stored under a key
made of what decides it: the candidate's content (sha256 of the adapter's
``adapter_model.safetensors`` and ``adapter_config.json``, and of the base
directory's ``*.safetensors`` and ``config.json``), the task's content (sha256
of its data and eval files, and its other settings: metric, classes,
columns), and the evaluate function's name. A rerun with nothing changed
evaluates nothing; a retrained adapter or edited eval set is evaluated again,
and only it. Errors are not cached (a failure may be passing). File hashes are
remembered by size, modification time and inode, like git's index, so a
multi-GB base is not re-read on every run.

**Governance.** A `fmhub.ml.tasks.Task`'s files go through the governance
gate before anything else, cached scores included: a user the read policy
refuses a task's columns or file gets `AccessDenied`, as ``fmhub clean`` does,
not a score from the cache; where ``rows:`` rules withhold rows from the user,
the key names who reads, so a score over one user's rows is never another's.

`router_from_leaderboard` turns a leaderboard into a composition of experts: a
`fmhub.serving.router.Router` whose classes are each task's best candidate, trained on
the tasks' texts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from fmhub.base.errors import FmhubError

CACHE_FORMAT = "fmhub-select-cache"
CACHE_VERSION = 1
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})
BASE_FILES = ("config.json",)  # besides *.safetensors: a base's architecture decides its scores too
MAX_ERROR = 400  # characters of an evaluation error kept on the board
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # the weights, and rank/alpha/targets

Evaluate = Callable[[str, "str | None", Any], float]


@dataclass(frozen=True)
class Candidate:
    """A model to rank: ``model_dir`` (a transformers base model directory) with ``adapter_dir`` (LoRA) or None (the bare base)."""

    name: str
    model_dir: str
    adapter_dir: str | None = None


@dataclass
class Score:
    """One candidate on one task: its score, or the error that stopped it; ``rank`` 1 is best."""

    value: float | None
    error: str | None = None
    rank: float = 0.0
    cached: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"score": self.value, "error": self.error, "rank": self.rank, "cached": self.cached, "seconds": round(self.seconds, 3)}


@dataclass
class Row:
    """A candidate's line of the leaderboard."""

    candidate: Candidate
    scores: dict[str, Score]
    mean_rank: float
    position: int  # 1 = best overall

    @property
    def errors(self) -> dict[str, str]:
        return {t: s.error for t, s in self.scores.items() if s.error is not None}

    def to_json(self) -> dict:
        c = self.candidate
        return {"position": self.position, "name": c.name, "model_dir": c.model_dir, "adapter_dir": c.adapter_dir,
                "mean_rank": self.mean_rank, "scores": {t: s.value for t, s in self.scores.items()},
                "ranks": {t: s.rank for t, s in self.scores.items()}, "errors": self.errors,
                "cached": {t: s.cached for t, s in self.scores.items()}}


@dataclass(frozen=True)
class TaskInfo:
    name: str
    metric: str
    higher_is_better: bool


@dataclass
class Leaderboard:
    """Every candidate's scores and ranks; ``rows`` are ordered best first."""

    tasks: list[TaskInfo]
    rows: list[Row]
    evaluated: int = 0  # scores computed in this run (the rest came from the cache)

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.candidate.name == name:
                return r
        raise FmhubError(f"no candidate named {name!r} on the leaderboard (candidates: {', '.join(r.candidate.name for r in self.rows)})")

    def best_for(self, task_name: str) -> Candidate:
        """The candidate ranked first on ``task_name`` (ties: by name); an error if every candidate failed there."""
        if task_name not in {t.name for t in self.tasks}:
            raise FmhubError(f"no task named {task_name!r} on the leaderboard (tasks: {', '.join(t.name for t in self.tasks)})")
        ok = [r for r in self.rows if r.scores[task_name].error is None]
        if not ok:
            raise FmhubError(f"every candidate failed on task {task_name!r}; see the leaderboard's errors")
        return min(ok, key=lambda r: (r.scores[task_name].rank, r.candidate.name)).candidate

    def best(self) -> Candidate:
        """The candidate ranked first overall."""
        return self.rows[0].candidate

    def to_json(self) -> dict:
        best = {}
        for t in self.tasks:
            try:
                best[t.name] = self.best_for(t.name).name
            except FmhubError:
                best[t.name] = None
        return {"tasks": [dataclasses.asdict(t) for t in self.tasks], "rows": [r.to_json() for r in self.rows],
                "best": best, "evaluated": self.evaluated}

    def table(self) -> Any:
        """The leaderboard as a `rich.table.Table`: one row per candidate, ``score (rank)`` per task, best per task in bold."""
        from rich.markup import escape
        from rich.table import Table

        errors = [f"{r.candidate.name} on {t}: {e}" for r in self.rows for t, e in r.errors.items()]
        table = Table(title="leaderboard", title_justify="left", caption_justify="left",
                      caption=escape("\n".join(errors)) if errors else None)
        table.add_column("#", justify="right")
        table.add_column("candidate")
        for t in self.tasks:
            table.add_column(f"{escape(t.name)}\n{escape(t.metric)} {'↑' if t.higher_is_better else '↓'}", justify="right")
        table.add_column("mean rank", justify="right")
        best = self.to_json()["best"]
        for r in self.rows:
            cells = [str(r.position), escape(r.candidate.name)]
            for t in self.tasks:
                s = r.scores[t.name]
                if s.error is not None:
                    cells.append("[red]error[/red]")
                else:
                    text = f"{s.value:.4f} ({s.rank:g})"
                    cells.append(f"[bold]{text}[/bold]" if best[t.name] == r.candidate.name else text)
            cells.append(f"{r.mean_rank:.2f}")
            table.add_row(*cells)
        return table


# -- evaluation --------------------------------------------------------------------------------

def leaderboard(candidates: Sequence[Candidate], tasks: Sequence[Any], evaluate: Evaluate | None = None,
                cache: str | os.PathLike | None = None,
                on_result: Callable[[Candidate, str, Score], None] | None = None) -> Leaderboard:
    """Evaluate every candidate on every task, rank them, and return the `Leaderboard` (see the module doc).

    ``evaluate(model_dir, adapter_dir, task) -> float`` defaults to
    `fmhub.ml.scoring.evaluate`. ``cache`` is a JSON file of earlier scores (made
    if missing). ``on_result`` is called after each score (progress output).
    """
    candidates, tasks = list(candidates), list(tasks)
    if not candidates or not tasks:
        raise FmhubError("nothing to rank: give at least one candidate and one task")
    _unique([c.name for c in candidates], "candidate")
    _unique([t.name for t in tasks], "task")
    infos = [TaskInfo(t.name, str(t.metric), _higher_is_better(t)) for t in tasks]
    if evaluate is None:
        try:
            from fmhub.ml.scoring import evaluate
        except ImportError as exc:
            raise FmhubError(f"cannot import fmhub.ml.scoring.evaluate ({exc}); pass evaluate= to leaderboard()") from None
    store = _Cache(os.fspath(cache)) if cache is not None else None
    hasher = store.hasher if store is not None else _Hasher({})
    evaluator = f"{getattr(evaluate, '__module__', '')}.{getattr(evaluate, '__qualname__', type(evaluate).__qualname__)}" \
                f"@{getattr(evaluate, 'version', '')}"

    task_keys: dict[str, str | Exception] = {}
    for t in tasks:
        view = _reader_view(t)  # before any cached score: refused as a read of the rows would be
        try:
            task_keys[t.name] = _task_fingerprint(t, hasher, view)
        except OSError as exc:
            raise FmhubError(f"task {t.name!r}: cannot read {exc.filename}: {exc.strerror}") from None

    scores: dict[str, dict[str, Score]] = {c.name: {} for c in candidates}
    evaluated = 0
    for c in candidates:
        try:
            content = _candidate_fingerprint(c, hasher)
        except (OSError, FmhubError) as exc:
            message = f"cannot read candidate: {exc.strerror} ({exc.filename})" if isinstance(exc, OSError) else str(exc)
            for t in tasks:
                scores[c.name][t.name] = s = Score(None, message)
                if on_result:
                    on_result(c, t.name, s)
            continue
        for t in tasks:
            key = hashlib.sha256(json.dumps([content, task_keys[t.name], str(t.metric), evaluator]).encode()).hexdigest()
            hit = store.get(key) if store is not None else None
            if hit is not None:
                s = Score(hit, cached=True)
            else:
                s = _evaluate_one(evaluate, c, t)
                evaluated += 1
                if store is not None and s.error is None:
                    store.put(key, s.value, c, t)  # saved as it goes: an interrupted run keeps what it finished
            scores[c.name][t.name] = s
            if on_result:
                on_result(c, t.name, s)
    if store is not None:
        store.save()
    return _rank(candidates, infos, scores, evaluated)


def _evaluate_one(evaluate: Evaluate, c: Candidate, task: Any) -> Score:
    start = time.perf_counter()
    try:
        value = evaluate(c.model_dir, c.adapter_dir, task)
    except Exception as exc:  # noqa: BLE001 - a broken candidate is an entry on the board, not the end of the run
        message = str(exc) if isinstance(exc, FmhubError) else f"{exc.__class__.__name__}: {exc}"
        message = " ".join(message.split())  # one line for the table; torch's load errors put the cause on line 2
        if len(message) > MAX_ERROR:
            message = message[:MAX_ERROR - 1] + "…"
        return Score(None, message or exc.__class__.__name__, seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return Score(None, f"evaluate returned {value!r}, not a finite number", seconds=seconds)
    return Score(float(value), seconds=seconds)


def _higher_is_better(task: Any) -> bool:
    explicit = getattr(task, "higher_is_better", None)
    if isinstance(explicit, bool):
        return explicit
    return str(task.metric) not in LOWER_IS_BETTER


def _unique(names: list[str], what: str) -> None:
    seen, dup = set(), []
    for n in names:
        if n in seen:
            dup.append(n)
        seen.add(n)
    if dup:
        raise FmhubError(f"{what} name(s) given twice: {', '.join(sorted(set(dup)))}; names must be unique")


# -- ranking -----------------------------------------------------------------------------------

def _rank(candidates: list[Candidate], tasks: list[TaskInfo], scores: dict[str, dict[str, Score]], evaluated: int) -> Leaderboard:
    for t in tasks:
        ok = [c.name for c in candidates if scores[c.name][t.name].error is None]
        sign = -1.0 if t.higher_is_better else 1.0
        ok.sort(key=lambda n: (sign * scores[n][t.name].value, n))
        _share_ties(ok, lambda n: scores[n][t.name].value, scores, t.name, start=1)
        failed = sorted(c.name for c in candidates if scores[c.name][t.name].error is not None)
        for n in failed:  # all failures tie for the places after the last success
            scores[n][t.name].rank = len(ok) + (len(failed) + 1) / 2
    rows = [Row(c, {t.name: scores[c.name][t.name] for t in tasks},
                sum(scores[c.name][t.name].rank for t in tasks) / len(tasks), 0) for c in candidates]
    rows.sort(key=lambda r: (bool(r.errors), r.mean_rank, r.candidate.name))
    for i, r in enumerate(rows, 1):
        r.position = i
    return Leaderboard(tasks, rows, evaluated)


def _share_ties(ordered: list[str], value: Callable[[str], float], scores: dict, task: str, start: int) -> None:
    """Ranks ``start..`` down ``ordered``; equal values share the mean of their positions."""
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and value(ordered[j + 1]) == value(ordered[i]):
            j += 1
        for n in ordered[i:j + 1]:
            scores[n][task].rank = start + (i + j) / 2
        i = j + 1


# -- content keys and the cache ----------------------------------------------------------------

class _Hasher:
    """sha256 of files, remembered in ``memo`` (the cache file's ``files``) by `fmhub.ml.hashcache`'s stat key and
    racy-clean rule."""

    def __init__(self, memo: dict) -> None:
        self.memo = memo

    def file(self, path: str) -> str:
        from fmhub.ml import hashcache

        return hashcache.lookup(self.memo, path)[0]

    def tree(self, path: str) -> str:
        """A directory's files (recursively, names relative to it) and their hashes, as one hash."""
        entries = []
        for d, subdirs, files in os.walk(path):
            subdirs.sort()
            for f in sorted(files):
                full = os.path.join(d, f)
                entries.append([os.path.relpath(full, path), self.file(full)])
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()

    def any(self, path: str) -> str:
        return self.tree(path) if os.path.isdir(path) else self.file(path)


def _dir_files(directory: str, names: Iterable[str], suffix: str | None, what: str) -> list[str]:
    if not os.path.isdir(directory):
        raise FmhubError(f"{what} {directory} is not a directory")
    listed = sorted(os.listdir(directory))
    picked = [f for f in listed if f in names or suffix and f.endswith(suffix)]
    weights = [f for f in picked if f.endswith(".safetensors")]
    if not weights:
        # no safetensors (a .bin checkpoint, a partial download): key on everything, so a change is still seen
        picked = [f for f in listed if os.path.isfile(os.path.join(directory, f))]
    if not picked:
        raise FmhubError(f"{what} {directory} has no files")
    return picked


def _candidate_fingerprint(c: Candidate, hasher: _Hasher) -> list:
    base = [[f, hasher.file(os.path.join(c.model_dir, f))] for f in _dir_files(c.model_dir, BASE_FILES, ".safetensors", "model_dir")]
    adapter = None
    if c.adapter_dir is not None:
        adapter = [[f, hasher.file(os.path.join(c.adapter_dir, f))] for f in _dir_files(c.adapter_dir, ADAPTER_FILES, None, "adapter_dir")]
    return [base, adapter]


_PATH_HINTS = ("path", "data", "eval", "train", "test", "file", "dataset")
_NOT_PATHS = ("column", "col", "key", "field", "metric", "class")


def _reader_view(task: Any) -> str | None:
    """For a `fmhub.ml.tasks.Task`: the governance gate's check of its files (raises `AccessDenied`), and who reads when rows are withheld."""
    from fmhub.ml.tasks import Task, check_readable

    return check_readable(task) if isinstance(task, Task) else None


def _task_fingerprint(task: Any, hasher: _Hasher, view: str | None = None) -> str:
    """The task's settings, with each data file replaced by its content hash (moving a file keeps the key).

    ``view``: who reads, where the read policy withholds rows (`_reader_view`); part of the key then.
    """
    if dataclasses.is_dataclass(task):
        fields = {f.name: getattr(task, f.name) for f in dataclasses.fields(task) if f.compare}
    else:
        fields = {k: v for k, v in vars(task).items() if not k.startswith("_")}
    fields.pop("name", None)  # renaming a task does not change its scores
    if view is not None:
        fields["readable rows"] = view
    out = {}
    for k, v in sorted(fields.items()):
        looks_like_path = any(h in k.lower() for h in _PATH_HINTS) and not any(h in k.lower() for h in _NOT_PATHS)
        if looks_like_path and isinstance(v, (str, os.PathLike)) and v and os.path.exists(v):
            out[k] = "sha256:" + hasher.any(os.fspath(v))
        else:
            out[k] = v
    return hashlib.sha256(json.dumps(out, sort_keys=True, default=str).encode()).hexdigest()


class _Cache:
    """The JSON cache file: ``results`` (key -> score) and ``files`` (path -> stat and sha256)."""

    def __init__(self, path: str) -> None:
        self.path = path
        doc: dict = {}
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            pass
        except (OSError, ValueError):
            doc = {}  # a cache that cannot be read is rebuilt: it only ever saves time
        if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT or doc.get("version") != CACHE_VERSION:
            doc = {}
        self.results: dict = doc.get("results") if isinstance(doc.get("results"), dict) else {}
        self.hasher = _Hasher(doc.get("files") if isinstance(doc.get("files"), dict) else {})

    def get(self, key: str) -> float | None:
        entry = self.results.get(key)
        value = entry.get("score") if isinstance(entry, dict) else None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def put(self, key: str, value: float, c: Candidate, task: Any) -> None:
        # candidate and task are for people reading the file; the key alone decides a hit
        self.results[key] = {"score": value, "candidate": c.name, "task": task.name, "metric": str(task.metric), "at": int(time.time())}
        self.save()

    def save(self) -> None:
        from fmhub.base.atomic import atomic_write

        doc = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "results": self.results, "files": self.hasher.memo}
        try:
            with atomic_write(self.path, "w") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
        except OSError as exc:
            raise FmhubError(f"cannot write the selection cache {self.path}: {exc.strerror}; pick another cache path") from None


def default_cache(cwd: str | None = None) -> str | None:
    """Where scores are cached by default: ``<git dir>/fmhub/select-cache.json``, or None outside a repository."""
    from fmhub.core.repo import common_dir

    try:
        return os.path.join(common_dir(cwd), "fmhub", "select-cache.json")
    except FmhubError:
        return None


# -- candidates from the command line, and a router from the board ----------------------------------

def parse_candidates(model_dir: str, items: Sequence[str] = (), include_base: bool = True, base_name: str = "base") -> list[Candidate]:
    """Candidates on ``model_dir``: the bare base (as ``base_name``) and each item.

    An item is ``NAME=DIR``, an adapter directory (named after it), or a
    directory of adapter directories (each one that has ``adapter_config.json``).
    """
    out = [Candidate(base_name, model_dir, None)] if include_base else []
    for item in items:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        path = path.rstrip("/") or path
        if name:
            out.append(Candidate(name, model_dir, path))
        elif os.path.isfile(os.path.join(path, "adapter_config.json")):
            out.append(Candidate(os.path.basename(os.path.abspath(path)), model_dir, path))
        elif os.path.isdir(path):
            found = [d for d in sorted(os.listdir(path)) if os.path.isfile(os.path.join(path, d, "adapter_config.json"))]
            if not found:
                raise FmhubError(f"{path}: neither an adapter (no adapter_config.json) nor a directory of adapters")
            out += [Candidate(d, model_dir, os.path.join(path, d)) for d in found]
        else:
            raise FmhubError(f"{path}: no such adapter directory; give NAME=DIR, an adapter directory, or a directory of them")
    _unique([c.name for c in out], "candidate")
    return out


def router_from_leaderboard(board: Leaderboard, texts: Mapping[str, Sequence[str]], descriptions: Mapping[str, str] | None = None,
                            served_names: Mapping[str, str] | None = None, **fit: Any):
    """A `fmhub.serving.router.Router` that sends each task's kind of text to that task's best candidate.

    ``texts``: task name -> example prompts of the task; ``descriptions``: task
    name -> what the task is. Tasks with the same winner pool their texts.
    ``served_names`` renames candidates to what the server calls them (a bare
    base model that wins a task is the server's ``base``). Other keyword
    arguments go to `Router.fit` (``min_confidence``, ``fallback``...).
    """
    from fmhub.serving.router import Router

    examples: dict[str, list[str]] = {}
    described: dict[str, list[str]] = {}
    for t in board.tasks:
        if t.name not in texts and t.name not in (descriptions or {}):
            continue
        best = board.best_for(t.name).name
        best = (served_names or {}).get(best, best)
        examples.setdefault(best, []).extend(texts.get(t.name, ()))
        if descriptions and t.name in descriptions:
            described.setdefault(best, []).append(descriptions[t.name])
    if not examples:
        raise FmhubError(f"no texts for any task on the leaderboard (tasks: {', '.join(t.name for t in board.tasks)})")
    return Router.fit(examples, {k: "\n".join(v) for k, v in described.items()}, **fit)
