"""``fmhub.yaml``: the repository's declarative spec, parsed and validated with line numbers.

The file sits at the top of the work tree. Each top-level section is a
pydantic model; unknown keys are refused (a typo must not be silently
ignored) and every error names the file and line of the offending key, as a
compiler would::

    fmhub.yaml:14: clean.reviews.steps[2]: unknown cleaner 'lenght'; fmhub has: dedup, length, ...

Sections so far (the spec grows with fmhub; ``version`` lets it change
compatibly):

``datasets``
    named data assets: ``path`` (a ``.jsonl``/``.parquet`` file in the repo),
    ``text`` (the default text column), ``key`` (a column that identifies rows).
``clean``
    named cleaning pipelines (`CleanPipeline`), run by ``fmhub clean``.
``label``
    named labelling pipelines (`LabelPipeline`), run by ``fmhub label``.
``models``, ``tasks``, ``finetune``, ``select``, ``merge``, ``deploy``
    what ``fmhub run`` builds (docs/fmhub-yaml.md): candidate base models,
    tasks with their data and metric, how adapters are trained, ranked,
    merged and served.
``serve``
    what ``fmhub serve`` / ``fmhub deploy`` serve (`ServeSpec`, docs/serving.md).
``join``, ``slices``, ``eval``, ``patch``
    monitoring and patching (docs/monitoring.md): metadata joined into rows,
    slices of the evaluation rows, sliced evaluations, and patches that fix a
    failing slice through data.

A pipeline step is written ``- NAME: {options}`` (or just ``- NAME``), where
NAME is a cleaner or labeler a plugin provides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Any, Mapping, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from fmhub.base.boundedyaml import YamlLimits, at_line, read_text
from fmhub.base.errors import FmhubError
from fmhub.base.yamlschema import Loc, format_loc, validate_yaml

SPEC_FILE = "fmhub.yaml"
SPEC_VERSION = 1

# fmhub.yaml comes with every clone: bounded as any hostile file (fmhub.base.boundedyaml), but roomy for real specs.
# The spec `fmhub init --example` writes (fmhub/run/example.py) is 1.6 KiB, 165 nodes, 7 levels deep: these leave room
# for hundreds of datasets and pipelines, and a long prompt (deploy.prompt) or `where:` fits in a value.
SPEC_LIMITS = YamlLimits(
    max_bytes=1 << 20,
    max_depth=32,
    max_nodes=100_000,
    max_value_chars=64 << 10,
    aliases=True,  # `&defaults` / `*defaults` keep working; each alias counts as every node it stands for
    finite=False,  # `.inf` is a number a gate or a budget may mean
    what="a spec",
    nodes_hint=" (an alias counts as everything it stands for)",
)

class SpecError(FmhubError):
    """``fmhub.yaml`` is missing, malformed, or names something that does not exist."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Step:
    """One pipeline step: the plugin object's ``name`` and its options, with where it was written."""

    name: str
    options: Mapping[str, Any]
    loc: Loc = ()

    def to_dict(self) -> dict[str, Any]:
        return {self.name: dict(self.options)}


def _parse_step(value: Any) -> Step:
    if isinstance(value, Step):
        return value
    if isinstance(value, str):
        return Step(value, {})
    if isinstance(value, dict) and len(value) == 1:
        ((name, options),) = value.items()
        if options is None:
            options = {}
        if not isinstance(name, str) or not isinstance(options, dict):
            raise ValueError("a step is NAME or NAME: {option: value, ...}")
        return Step(name, options)
    raise ValueError("a step is NAME or NAME: {option: value, ...} (one name per list item)")


StepField = Annotated[Any, AfterValidator(_parse_step)]


class DatasetSpec(_Strict):
    path: str
    text: str = "text"
    key: Optional[str] = None
    description: str = ""
    license: Optional[str] = Field(None, description="SPDX id of the data's licence (fmhub.governance.licences checks mixes)")
    consent: Optional[str] = Field(None, description="how consent to use the data was obtained, recorded in lineage")


class CleanPipeline(_Strict):
    """``clean.NAME``: read ``input``, run ``steps`` in order, write the kept rows to ``output``."""

    input: str = Field(description="a dataset name from `datasets`, or a path")
    output: str
    steps: list[StepField] = Field(min_length=1)
    columns: Optional[list[str]] = Field(None, description="text columns the steps look at (default: the dataset's text column)")
    batch_size: int = Field(1000, ge=1)
    workers: Optional[int] = Field(None, ge=1)
    backend: str = "processes"
    report: Optional[str] = None
    overrides: Optional[str] = None
    excerpt: int = Field(200, ge=0, description="characters of each decided row's text that reports show (0: none)")


class LabelPipeline(_Strict):
    """``label.NAME``: run labelling functions ``lfs`` over ``input``, combine their votes, write probabilistic labels."""

    input: str
    output: str
    classes: list[str] = Field(min_length=2)
    lfs: list[StepField] = Field(min_length=1)
    column: Optional[str] = None
    key: Optional[str] = Field(None, description="a column that identifies rows, for gold labels by key (default: the dataset's key)")
    gold: Optional[str] = None
    gold_column: str = "label"
    label_column: str = Field("label", description="the output column for the label; its probabilities go to LABEL_probs")
    model: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(1000, ge=1)
    workers: Optional[int] = Field(None, ge=1)
    backend: str = "processes"
    report: Optional[str] = None
    suggest: int = Field(0, ge=0, description="how many rows to suggest for hand labelling (active learning)")


class ServeSpec(_Strict):
    """``serve``: what ``fmhub serve`` serves and how (every key is also a command-line option, which wins)."""

    base: Optional[str] = Field(None, description="PATH or PATH@REV of the base model")
    adapters: list[str] = Field(default_factory=list, description="PATH[@REV] or NAME=PATH[@REV] items")
    declared: Optional[str] = Field(None, description="also serve the adapters recorded at this revision")
    backend: str = "local"
    host: Optional[str] = None
    port: Optional[int] = Field(None, ge=0, le=65535)
    device: Optional[str] = None
    dtype: Optional[str] = None
    max_batch: Optional[int] = Field(None, ge=1)
    gpu_slots: Optional[int] = Field(None, ge=1)
    adapter_memory_mb: Optional[float] = Field(None, gt=0)
    cpu_cache_mb: Optional[float] = Field(None, ge=0)
    disk_cache_mb: Optional[float] = Field(None, ge=0)
    eviction: Optional[str] = Field(None, pattern="^(lru|lfu)$")
    cycle_time: Optional[float] = Field(None, ge=0)
    max_lora_rank: Optional[int] = Field(None, ge=1)
    max_model_len: Optional[int] = Field(None, ge=1)
    cache_dir: Optional[str] = None
    backend_options: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(_Strict):
    """``models.NAME``: a candidate base model: a transformers model directory, or a Hub id in the local cache."""

    path: Optional[str] = None
    hub: Optional[str] = Field(None, description="a Hugging Face Hub model id, read from the local cache (never downloaded)")
    revision: Optional[str] = None
    description: str = ""

    @field_validator("hub")
    @classmethod
    def _hub(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (v.count("/") != 1 or any(not p for p in v.split("/"))):
            raise ValueError(f"{v!r} is not a Hub model id (ORG/NAME)")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if (self.path is None) == (self.hub is None):
            raise ValueError("give a model either path: (a directory) or hub: (an id in the local Hugging Face cache)")
        return self


class TaskSpec(_Strict):
    """``tasks.NAME``: what an adapter is for: its data (a dataset name or a .jsonl path) and how it is scored."""

    data: str
    eval: Optional[str] = Field(None, description="held-out rows (default: a fixed split of data)")
    metric: str = Field("loss", pattern="^(loss|accuracy|exact_match)$")
    classes: Optional[list[str]] = None
    text: str = "text"
    label: str = "label"
    prompt: str = "prompt"
    completion: str = "completion"
    description: str = ""


class FinetuneSpec(_Strict):
    """``finetune``: how ``fmhub run`` trains one PEFT adapter per task and candidate model."""

    method: str = Field("lora", pattern="^(lora|fishmask)$",
                        description="lora (an adapter per task) or fishmask (the base's top-Fisher entries, a full model per task)")
    sparsity: Optional[float] = Field(None, ge=0, lt=1, description="fishmask: the fraction of weight entries left unchanged (0.99; 0.0: a full fine-tune)")
    models: Optional[list[str]] = Field(None, description="candidate models to train on (default: every one)")
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    target_modules: Optional[list[str]] = None
    steps: int = Field(60, ge=1, description="the budget: optimizer steps of the final run")
    trial_steps: Optional[int] = Field(None, ge=1, description="steps of each learning-rate trial")
    lrs: Optional[list[float]] = Field(None, description="learning rates to try (default: a small search)")
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    output: str = Field("adapters", description="adapters go to OUTPUT/TASK (OUTPUT/TASK-MODEL with several models)")

    @model_validator(mode="after")
    def _sparsity(self) -> "FinetuneSpec":
        if self.method == "fishmask" and self.sparsity is None:
            raise ValueError("method fishmask needs sparsity: (the fraction of entries left unchanged, e.g. 0.99)")
        if self.method == "lora" and self.sparsity is not None:
            raise ValueError("sparsity is for method fishmask; LoRA's size is set by r")
        return self


class SelectSpec(_Strict):
    """``select``: rank the trained adapters (and bare models) on every task; train the request router."""

    output: str = "runs/leaderboard.json"
    router: Optional[str] = Field("runs/router.json", description="where the composition-of-experts router goes (null: none)")


class MergeSpec(_Strict):
    """``merge``: merge the task adapters into one, with a strategy."""

    tasks: Optional[list[str]] = None
    strategy: str = "task-arithmetic"
    into: str = Field("adapter", pattern="^(adapter|base)$")
    options: dict[str, Any] = Field(default_factory=dict)
    output: str = "adapters/merged"


class DeploySpec(_Strict):
    """``deploy``: serve the results: hot-swap a running server (``url``), else a check through a local server."""

    url: Optional[str] = None
    token: Optional[str] = Field(None, description="the server's admin token (or FMHUB_ADMIN_TOKEN)")
    prompt: str = Field("Hello", description="what the local check sends to every served adapter")
    max_tokens: int = Field(8, ge=1)


class JoinSpec(_Strict):
    """``join.NAME``: bring a metadata table's attributes (entity -> type, ...) into text rows (``fmhub join``).

    Exactly one of ``on`` (a column of the rows holding the entity, joined by
    equality) and ``mentions`` (a text column: every table entity named in the
    text, as whole words and case-insensitively, is joined; the joined columns
    are then lists, one value per distinct entity in order of first mention).
    """

    input: str = Field(description="a dataset name from `datasets`, or a .jsonl/.parquet path")
    table: str = Field(description="the metadata: a .csv, .jsonl or .parquet file with one row per entity")
    key: str = Field("entity", description="the table's entity column")
    on: Optional[str] = None
    mentions: Optional[str] = None
    columns: Optional[list[str]] = Field(None, description="table columns to bring (default: all but key)")
    prefix: str = Field("", description="prepended to each joined column's name")
    missing: str = Field("keep", pattern="^(keep|drop|error)$", description="a row with no entity in the table: keep (nulls), drop, error")
    output: str

    @model_validator(mode="after")
    def _one_mode(self) -> "JoinSpec":
        if (self.on is None) == (self.mentions is None):
            raise ValueError("give either on: (a column holding the entity) or mentions: (a text column naming entities)")
        return self


class SliceSpec(_Strict):
    """``slices.NAME``: a subset of evaluation rows, declared by exactly one filter (docs/monitoring.md).

    ``where``: column predicates, all of which must hold (``{category: toys}``,
    ``{stars: {lt: 3}}``; ops eq, ne, in, not_in, lt, le, gt, ge, contains,
    exists; a list-valued column matches when any element does). ``regex``: a
    Python regex searched in ``column`` (default: the task's text column).
    ``lf``: a labelling function (``{keyword: {words: [...], label: x}}``);
    the slice is the rows it votes ``vote`` on (default: any vote). ``clusters``:
    K clusters (seeded k-means) of the evaluated model's embeddings of the
    rows, slices ``NAME:0`` .. ``NAME:K-1``.
    """

    where: Optional[dict[str, Any]] = None
    regex: Optional[str] = None
    column: Optional[str] = None
    lf: Optional[StepField] = None
    vote: Optional[str] = None
    clusters: Optional[int] = Field(None, ge=2, le=64)
    description: str = ""

    @model_validator(mode="after")
    def _one_filter(self) -> "SliceSpec":
        given = [k for k in ("where", "regex", "lf", "clusters") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a slice is exactly one of where:, regex:, lf: or clusters:" + (f" (got {', '.join(given)})" if given else ""))
        if self.vote is not None and self.lf is None:
            raise ValueError("vote: is for lf: slices")
        return self


class EvalSpec(_Strict):
    """``eval.NAME``: score a model (and adapter) on a task's rows, row by row, sliced (``fmhub eval``)."""

    task: str = Field(description="a task name from `tasks`: its metric, columns and classes")
    data: Optional[str] = Field(None, description="the rows to evaluate (default: the task's held-out rows)")
    model: Optional[str] = Field(None, description="a name from `models`, or a model directory (default: the only model)")
    adapter: Optional[str] = Field(None, description="a PEFT adapter directory to evaluate on the model")
    slices: Optional[list[str]] = Field(None, description="names from `slices` (default: every one)")
    min_rows: int = Field(5, ge=1, description="slices with fewer rows are reported, never flagged")
    output: Optional[str] = Field(None, description="the directory predictions and reports go to (default: evals/NAME)")


class PatchGate(_Strict):
    """The CI-like gate a patch must pass before it is written."""

    min_gain: float = Field(0.1, description="the patched slice's metric must improve by at least this much")
    max_regression: float = Field(0.02, ge=0, description="no other slice (nor all rows) may get worse by more than this")


class PatchSpec(_Strict):
    """``patch.NAME``: fix a failing slice through data: label a patch set, fine-tune the base on it, gate it (``fmhub patch``)."""

    eval: str = Field(description="an eval name: its model is patched, its rows and slices gate the patch")
    slice: str = Field(description="the failing slice to fix")
    pool: Optional[str] = Field(None, description="rows to draw the patch set from (default: the task's training data)")
    label: Optional[str] = Field(None, description="a label pipeline whose functions relabel the pool's slice rows (default: keep their labels)")
    augment: list[StepField] = Field(default_factory=list, description="augmentations of the slice rows: swap: {words: [...], copies: N}")
    replay: float = Field(1.0, ge=0, description="rows from outside the slice, per slice row, trained on too (guards the other slices)")
    method: str = Field("fishmask", pattern="^(lora|fishmask)$", description="fishmask (a sparse update of the base) or lora (merged into it)")
    sparsity: float = Field(0.99, ge=0, lt=1)
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    target_modules: Optional[list[str]] = None
    steps: int = Field(60, ge=1)
    lrs: Optional[list[float]] = None
    trial_steps: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    gate: PatchGate = Field(default_factory=PatchGate)
    output: str = Field(description="the patched model's directory")
    data_output: Optional[str] = Field(None, description="where the patch set is written (default: OUTPUT.patch.jsonl)")


class Spec(_Strict):
    version: int = SPEC_VERSION
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    clean: dict[str, CleanPipeline] = Field(default_factory=dict)
    label: dict[str, LabelPipeline] = Field(default_factory=dict)
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    tasks: dict[str, TaskSpec] = Field(default_factory=dict)
    finetune: Optional[FinetuneSpec] = None
    select: Optional[SelectSpec] = None
    merge: Optional[MergeSpec] = None
    deploy: Optional[DeploySpec] = None
    serve: Optional[ServeSpec] = None
    join: dict[str, JoinSpec] = Field(default_factory=dict)
    slices: dict[str, SliceSpec] = Field(default_factory=dict)
    eval: dict[str, EvalSpec] = Field(default_factory=dict)
    patch: dict[str, PatchSpec] = Field(default_factory=dict)

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v > SPEC_VERSION:
            raise ValueError(f"this fmhub reads spec version {SPEC_VERSION} and older; upgrade fmhub")
        return v


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec and where it came from; ``line(loc)`` finds a key's line for later errors."""

    spec: Spec
    path: str
    lines: Mapping[Loc, int]

    @property
    def root(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    def line(self, loc: Loc) -> int | None:
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get(())

    def error(self, loc: Loc, message: str) -> SpecError:
        """A `SpecError` that points at ``loc``: ``fmhub.yaml:LINE: a.b[2]: message``."""
        return SpecError(f"{at_line(self.path, self.line(loc))}: {format_loc(loc)}: {message}" if loc else f"{self.path}: {message}")

    def resolve(self, path: str) -> str:
        """A path written in the spec, relative to the spec's directory."""
        return path if os.path.isabs(path) else os.path.join(self.root, path)

    def dataset_path(self, name_or_path: str) -> str:
        """A pipeline's ``input``: a dataset declared in ``datasets``, else a path."""
        ds = self.spec.datasets.get(name_or_path)
        return self.resolve(ds.path if ds is not None else name_or_path)

    def text_column(self, name_or_path: str) -> str:
        ds = self.spec.datasets.get(name_or_path)
        return ds.text if ds is not None else "text"


def parse_spec(text: str, path: str = SPEC_FILE) -> LoadedSpec:
    """Parse and validate spec text; `SpecError` with file and line on any problem."""
    spec, lines = validate_yaml(text, path, Spec, SpecError, "the spec must be a mapping of sections (datasets, clean, label, ...)",
                                SPEC_LIMITS)
    # record each step's location, so plugins' option errors can point at it
    for section in ("clean", "label"):
        for name, pipe in getattr(spec, section).items():
            field = "steps" if section == "clean" else "lfs"
            steps = getattr(pipe, field)
            for i, step in enumerate(steps):
                object.__setattr__(step, "loc", (section, name, field, i))
    return LoadedSpec(spec, path, lines)


def load_spec(path: str | None = None) -> LoadedSpec:
    """Read ``fmhub.yaml`` (default: at the top of the current git work tree, else the current directory)."""
    if path is None:
        path = os.path.join(_top(), SPEC_FILE)
    shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path  # as errors name it
    try:
        text = read_text(shown, SPEC_LIMITS.max_bytes, SpecError, "a spec")  # a clone's fmhub.yaml may be a link to /dev/zero
    except FileNotFoundError:
        raise SpecError(f"{path} not found; write one (see README: Data pipelines) or pass --spec") from None
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_spec(text, shown)


def _top() -> str:
    from fmhub.base import gitrun

    try:
        return gitrun.toplevel() or os.getcwd()
    except FmhubError:  # no git: the current directory
        return os.getcwd()


def pipeline(loaded: LoadedSpec, section: str, name: str | None) -> tuple[str, Any]:
    """The named pipeline of a section, or the only one; a clear error listing the choices otherwise."""
    pipes = getattr(loaded.spec, section)
    if not pipes:
        raise SpecError(f"{loaded.path} declares no {section} pipelines (add a '{section}:' section)")
    if name is None:
        if len(pipes) > 1:
            raise SpecError(f"{loaded.path} declares {len(pipes)} {section} pipelines ({', '.join(pipes)}); name one")
        name = next(iter(pipes))
    if name not in pipes:
        raise SpecError(f"{loaded.path} has no {section} pipeline {name!r}; it has: {', '.join(pipes)}")
    return name, pipes[name]


def model_dir_of(loaded: LoadedSpec, name: str) -> str:
    """A declared model's directory: its ``path``, or its ``hub`` id's snapshot in the local Hugging Face cache."""
    ms = loaded.spec.models[name]
    if ms.path is not None:
        return loaded.resolve(ms.path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(ms.hub, revision=ms.revision, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise loaded.error(("models", name, "hub"), f"{ms.hub}{'@' + ms.revision if ms.revision else ''} is not in the local "
                           "Hugging Face cache (HF_HUB_CACHE); download it where the Hub can be reached "
                           "(`huggingface-cli download ...`), or give path:") from None
