"""The objects plugins hand to fmhub through its hooks.

`fmhub.plugin.hookspecs` says *when* each hook is called; this module says what the
objects the hooks return must look like. They are `typing.Protocol` classes:
a plugin returns any object with these attributes, no base class needed.

Each Protocol holds exactly the members every object of its kind must have, so
``isinstance(obj, Cleaner)`` (they are ``runtime_checkable``) says whether one
may be used; `OPTIONAL` lists, per Protocol, the members an object may add and
what they must be. The plugin host checks every object against its kind's
Protocol when it is first used (`fmhub.plugin.checks`), and names the plugin and
the member at fault in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

from fmhub.plugin.records import AccessRequest, Decision, Layout, TensorInfo  # noqa: F401  (part of this interface)

if TYPE_CHECKING:
    from fmhub.serving.config import ServeConfig
    from fmhub.serving.deploy import DeployReport
    from fmhub.serving.sources import AdapterSpec


ReadExact = Callable[[int], bytes]
"""``read_exact(n)`` returns exactly ``n`` bytes or raises `fmhub.base.errors.CorruptCheckpoint` at end of input."""


@dataclass(frozen=True)
class Drop:
    """A cleaning step's verdict on one row: leave it out of the output.

    ``reason`` is one line for a reviewer ("4 words < min_words 5"); it is
    shown in reports, so it must never quote sensitive text. ``detail`` is
    optional plain JSON data for tools (``{"duplicate_of": 12, "jaccard":
    0.91}``). ``shown`` is an optional stand-in for the row in reports (a
    redacted copy), for a step that drops rows because of what they contain.
    """

    reason: str
    detail: Mapping[str, Any] | None = None
    shown: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Edit:
    """A cleaning step's verdict on one row: keep it, changed to ``row`` (a new dict; never change rows in place).

    ``reason`` says what changed without quoting what was removed ("redacted
    2 email"); fmhub records which columns differ.
    """

    row: Mapping[str, Any]
    reason: str
    detail: Mapping[str, Any] | None = None


Verdict = Drop | Edit | None
"""What a step returns per row: ``None`` keeps the row as it is, `Drop` leaves it out, `Edit` replaces it."""


@dataclass(frozen=True)
class CleanContext:
    """What a cleaning pipeline tells each cleaner it configures.

    ``columns`` are the text columns the step looks at: the step's
    ``columns:`` option, else the pipeline's, else the dataset's text column.
    ``base_dir`` is the directory of ``fmhub.yaml``, against which relative
    paths in options are resolved.
    """

    columns: tuple[str, ...] = ("text",)
    base_dir: str = "."


@dataclass(frozen=True)
class LabelContext:
    """What a labelling pipeline tells each labeler it configures (plain data: it travels to worker processes).

    ``classes`` are the pipeline's class names, in order; ``column`` its text
    column (a labeler's own ``column:`` option overrides it); ``base_dir`` the
    directory of ``fmhub.yaml``, against which relative paths in options are
    resolved.
    """

    classes: tuple[str, ...]
    column: str = "text"
    base_dir: str = "."


@runtime_checkable
class CheckpointFormat(Protocol):
    """A file format that fmhub can store tensor by tensor.

    ``name`` is written into manifests (``format NAME``), so it must never change
    once files have been committed with it.
    """

    name: str

    def sniff(self, head: bytes) -> bool:
        """Say whether a file starting with ``head`` (at most 16 bytes, fewer for tiny files) is in this format.

        A format may also define ``diagnose(head) -> str | None`` (optional, not part of the protocol's check):
        for a file no format claims, why one that looks like this format's is refused (a header over the
        format's limit, say), so the user reads the limit instead of "not a checkpoint".
        """

    def read_layout(self, read_exact: ReadExact, path: str) -> Layout:
        """Read the header from the start of the file through ``read_exact`` and return its layout.

        Must read the header and nothing more: fmhub streams the tensor payloads
        that follow. Raise `fmhub.base.errors.CorruptCheckpoint` naming ``path`` (and the
        tensor, where one is at fault) for a header that is malformed or lies.
        """

    def build_header(self, tensors: Sequence[TensorInfo], metadata: Mapping[str, str] | None) -> bytes:
        """Return a header for a new file made of ``tensors`` in this order (used when a merge mixes two files)."""


Row = tuple[int, Any, "str | None"]
"""One row of a data file: ``(number, record, error)``.

``number`` is 1-based: the line number for line-based formats, the row number
otherwise. ``record`` is the row (a dict for tabular rows; any JSON value);
when the row cannot be parsed, ``record`` is its raw text and ``error`` says why.
"""


@runtime_checkable
class DataFormat(Protocol):
    """A data file format (a dataset: jsonl, parquet) that fmhub stores as content-defined chunks.

    ``name`` is written into manifests (``format NAME``), so it must never change
    once files have been committed with it. ``extensions`` are the file-name
    endings (``".jsonl"``) it claims when no format recognises the file's first
    bytes. ``chunking`` (a `fmhub.core.chunking.Chunking`) says how new files are cut
    into objects: ``lines`` for line-based formats (chunks end at line ends),
    ``gear`` for any bytes. Storage never parses the file: any bytes round-trip.
    """

    name: str
    extensions: tuple[str, ...]
    chunking: Any

    def sniff(self, head: bytes) -> bool:
        """Say whether a file starting with ``head`` (at most 16 bytes) is in this format; False when there is no magic."""

    def rows(self, f: BinaryIO, path: str) -> Iterator[Row]:
        """The rows of the file open in ``f`` (seekable, binary), in file order, for diffs.

        A row that cannot be parsed is yielded with its error (and the caller
        goes on); a file that cannot be read as rows at all raises
        `fmhub.base.errors.UnreadableRows` naming ``path``.
        """


@runtime_checkable
class DeltaCodec(Protocol):
    """Encodes the change from one version of a tensor to the next.

    ``name`` is written into manifests, so it must never change once files
    have been committed with it. Both methods work on raw little-endian bytes
    of equal length and the tensor's dtype name (``F32``, ``BF16``, ...);
    ``encode`` also gets the shape (None when unknown).

    A codec may also offer lossy encoding by defining
    ``encode_within(base, new, dtype, shape, tolerance) -> (delta, max_error) | None``:
    a delta whose decoded elements are each within ``tolerance`` of ``new``'s
    (fmhub checks), used only when the user set a tolerance
    (``git config fmhub.lowrank.tolerance``).
    """

    name: str

    def encode(self, base: bytes | bytearray, new: bytes | bytearray, dtype: str, shape: tuple[int, ...] | None = None) -> bytes | None:
        """Return a delta that turns ``base`` into exactly ``new``, or None when this codec cannot or should not."""

    def decode(self, base: bytes | bytearray, delta: bytes, dtype: str) -> bytes | bytearray:
        """Return the new bytes from ``base`` and a delta this codec made."""


@runtime_checkable
class MergeStrategy(Protocol):
    """Combines the versions of one tensor from several sides of a merge.

    ``merge`` gets the tensor's name, its version in the merge base (``None``
    when there is no base version) and one version per side, in the order the
    sides were given (for ``git merge``: ours, theirs; for ``fmhub merge``: the
    recipe's models). Versions are loaded lazily as ``torch.Tensor`` of the
    file's dtype: ``base()`` and ``load(i)``. Every side has the same dtype and
    shape (fmhub checks before calling). The tensors may share memory with
    fmhub's read buffers: never modify them in place.

    Return an ``int`` to keep that side's tensor as is (ours/theirs: the object
    is reused without being read), or a ``torch.Tensor`` of the same shape in
    any floating dtype; fmhub casts it back to the file's dtype (round to
    nearest) and refuses a result holding NaN or Inf.

    ``options`` holds the recipe's or git config's parameters for this tensor,
    already parsed: ``weights`` (list of float, one per side), ``scale``
    (float), ``density`` (float in (0, 1]), ``seed`` (int), ``t`` (float) and,
    when Fisher diagonals were supplied, ``fisher`` (a callable ``fisher(i)``
    giving side ``i``'s diagonal as a tensor of the same shape). Raise
    `fmhub.base.errors.MergeConflict` with a message naming what is missing (a
    base, a Fisher diagonal, an option out of range); fmhub adds the tensor's
    name and writes nothing.

    ``needs_base`` (optional, default False) says the strategy works on task
    vectors (side − base): fmhub refuses, before reading any tensor, to run it
    without a base.

    ``elementwise`` (optional, default False) says each output element depends
    only on the same element of the inputs (no statistics across elements, no
    random stream): fmhub may then call ``merge`` on 1-D chunks of the
    flattened tensors, so a large tensor never sits in memory whole.
    """

    name: str

    def merge(
        self,
        name: str,
        base: Callable[[], Any] | None,
        load: Callable[[int], Any],
        sides: int,
        options: Mapping[str, Any],
    ) -> int | Any:
        ...


@runtime_checkable
class Cleaner(Protocol):
    """A kind of cleaning step (``length``, ``pii``, ``near-dup``, ...), configured per ``fmhub.yaml`` step.

    ``scope`` is ``"row"`` or ``"dataset"``:

    * a **row** step judges each row alone; fmhub calls
      ``clean(rows, config)`` on batches in the data backend's workers,
      in any order and in any process, and it returns one verdict per row;
    * a **dataset** step must see rows in input order with state (dedup);
      fmhub calls ``open(config)`` once per run in the calling process and
      feeds the returned `DatasetPass` every surviving row in order. Its
      expensive per-row part goes in the optional ``prepare(rows, config)``,
      which runs in the workers and returns one small picklable value per
      row (a hash, a MinHash signature) for the pass. A dataset step keeps
      or drops rows; it never edits them.

    ``configure(options, context)`` validates the step's options up front and
    returns a picklable *config* (plain data, compiled regexes, a pydantic
    model) that fmhub hands to every other method; it runs once, in the
    calling process. See `fmhub.plugin.hookspecs.fmhub_cleaners` for the contract.
    """

    name: str
    scope: str

    def configure(self, options: Mapping[str, Any], context: CleanContext) -> Any:
        ...


@runtime_checkable
class RowCleaner(Cleaner, Protocol):
    """A `Cleaner` of ``scope = "row"``: ``clean(rows, config)`` returns one `Verdict` per row, in order."""

    def clean(self, rows: Sequence[Mapping[str, Any]], config: Any) -> Sequence[Verdict]:
        ...


@runtime_checkable
class DatasetCleaner(Cleaner, Protocol):
    """A `Cleaner` of ``scope = "dataset"``: ``open(config)`` returns the run's `DatasetPass`.

    ``prepare(rows, config)`` (optional) runs in the workers and returns one picklable value per row.
    """

    def open(self, config: Any) -> "DatasetPass":
        ...


@runtime_checkable
class DatasetPass(Protocol):
    """The state of one dataset-scoped step during one run (what `Cleaner.open` returns).

    ``clean(positions, prepared)`` gets the next rows in input order: their
    positions and ``prepare``'s values for them (the rows themselves when the
    cleaner has no ``prepare``), and returns ``None`` (keep) or `Drop` per row.
    """

    def clean(self, positions: Sequence[int], prepared: Sequence[Any]) -> Sequence[Drop | None]:
        ...


@runtime_checkable
class LabellingFunction(Protocol):
    """One configured labelling function: votes a class name, or ``None`` (abstain), for each row of a batch.

    ``vote(rows)`` returns one vote per row, in order. Raising fails the whole
    batch; fmhub then calls ``vote([row])`` row by row to find the rows at
    fault, records each failure (position and message) and counts it as an
    abstain, so a function may raise on a bad row. ``name`` (optional) is its display
    name in reports (fmhub replaces it with the entry's ``name:`` option when
    given). ``in_driver`` (optional, default False) asks fmhub to run it in
    the calling process rather than in backend workers: for functions that
    hold a large model, loaded once, or a GPU.
    """

    def vote(self, rows: Sequence[Mapping[str, Any]]) -> Sequence[str | None]:
        ...


@runtime_checkable
class Labeler(Protocol):
    """A kind of labelling function (``keyword``, ``regex``, ``model``, ...), configured per ``fmhub.yaml`` entry.

    ``configure(options, context)`` validates the entry's options and returns
    a `LabellingFunction`; raise `fmhub.plugin.options.OptionError` (or
    ``ValueError``) with a one-line message for a bad option, and fmhub adds
    the file and line of the entry. It is called once in the calling process
    and once more in each worker process, so it must be cheap: load models
    lazily, on the first ``vote``.
    """

    name: str

    def configure(self, options: Mapping[str, Any], context: LabelContext) -> LabellingFunction:
        ...


@runtime_checkable
class DataBackend(Protocol):
    """Runs a pipeline's per-batch function over batches of rows, possibly elsewhere.

    ``map_batches(fn, batches, workers)`` returns an iterator of ``fn(batch)``
    for each batch, **in input order**. ``fn`` is picklable (a module-level
    function, or a ``functools.partial`` of one, over plain data), so it can
    run in another process or on another machine; it loads the plugins it
    needs itself. ``batches`` may be an endless stream: keep only a bounded
    number in flight (a few per worker) so memory stays flat. ``workers`` is
    the parallelism the user asked for (>= 1). An exception raised by ``fn``
    must reach the caller as the same exception, not a backend-specific
    wrapper, so pipelines can report it.
    """

    name: str

    def map_batches(self, fn: Callable[[Any], Any], batches: Iterable[Any], workers: int) -> Iterator[Any]:
        ...


@runtime_checkable
class AccessPolicy(Protocol):
    """Decides requests (`AccessRequest`): ``check(request)`` returns a `Decision`, or ``None`` for no opinion.

    Any deny wins; a request no policy denies is allowed. See
    `fmhub.plugin.hookspecs.fmhub_access_policies` for where fmhub asks.

    ``row_filter(request)`` (optional) returns a predicate on rows, the rows of
    ``request.path`` the principal may read, or ``None`` when it withholds none:
    pipelines that read rows withhold the others as they read.
    """

    name: str

    def check(self, request: AccessRequest) -> Decision | None:
        ...


@runtime_checkable
class ServerHandle(Protocol):
    """A running server, as a serving backend's ``serve`` returns it."""

    url: str  # where clients reach it, e.g. http://127.0.0.1:8000

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C stops it)."""

    def stop(self) -> None:
        """Stop serving: finish nothing new, close connections, free the model. Idempotent."""


@runtime_checkable
class ServingBackend(Protocol):
    """Serves one base model with many adapters; see `fmhub.plugin.hookspecs.fmhub_serving_backends`.

    ``export(config, out_dir)`` (optional) writes the model and adapters for another machine
    (``fmhub serve --export-only DIR``).
    """

    name: str

    def serve(self, config: "ServeConfig") -> ServerHandle:
        """Start serving ``config`` (a `fmhub.serving.config.ServeConfig`) and return once it answers."""

    def deploy(self, url: str, adapters: "list[AdapterSpec]", token: str | None = None) -> "DeployReport":
        """Make the server at ``url`` serve exactly ``adapters``, without a restart (a `fmhub.serving.deploy.DeployReport`)."""


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


OPTIONAL: dict[type, dict[str, tuple[str, Callable[[Any], bool]]]] = {
    CheckpointFormat: {"diagnose": ("a method diagnose(head) -> str | None", callable)},
    DeltaCodec: {"encode_within": ("a method encode_within(base, new, dtype, shape, tolerance)", callable)},
    MergeStrategy: {"needs_base": ("True or False", _is_bool), "elementwise": ("True or False", _is_bool)},
    DatasetCleaner: {"prepare": ("a method prepare(rows, config)", callable)},
    LabellingFunction: {"name": ("a string", lambda v: isinstance(v, str)), "in_driver": ("True or False", _is_bool)},
    ServingBackend: {"export": ("a method export(config, out_dir)", callable)},
    AccessPolicy: {"row_filter": ("a method row_filter(request) -> predicate | None", callable)},
}
"""Members an object may add to its Protocol's: name -> (what it must be, a check of its value)."""
