"""The objects plugins hand to fmhub through its hooks.

`fmhub.hookspecs` says *when* each hook is called; this module says what the
objects the hooks return must look like. They are `typing.Protocol` classes:
a plugin returns any object with these attributes, no base class needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint file as its header describes it.

    ``size`` is the number of payload bytes the tensor occupies in the file.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    size: int


@dataclass(frozen=True)
class Layout:
    """How a checkpoint file splits into a header and tensor payloads.

    The file is exactly ``header`` followed by each tensor's payload, in the
    order of ``tensors``, with nothing in between and nothing after. A format
    plugin must refuse a file that does not fit this shape (gaps, overlaps,
    trailing bytes) rather than describe it approximately: fmhub rebuilds files
    byte for byte from this description.
    """

    header: bytes
    tensors: tuple[TensorInfo, ...]
    metadata: Mapping[str, str] | None = None
    data_size: int = field(default=0)


ReadExact = Callable[[int], bytes]
"""``read_exact(n)`` returns exactly ``n`` bytes or raises `fmhub.errors.CorruptCheckpoint` at end of input."""


@runtime_checkable
class CheckpointFormat(Protocol):
    """A file format that fmhub can store tensor by tensor.

    ``name`` is written into manifests (``format NAME``), so it must never change
    once files have been committed with it.
    """

    name: str

    def sniff(self, head: bytes) -> bool:
        """Say whether a file starting with ``head`` (at most 16 bytes, fewer for tiny files) is in this format."""

    def read_layout(self, read_exact: ReadExact, path: str) -> Layout:
        """Read the header from the start of the file through ``read_exact`` and return its layout.

        Must read the header and nothing more: fmhub streams the tensor payloads
        that follow. Raise `fmhub.errors.CorruptCheckpoint` naming ``path`` (and the
        tensor, where one is at fault) for a header that is malformed or lies.
        """

    def build_header(self, tensors: Sequence[TensorInfo], metadata: Mapping[str, str] | None) -> bytes:
        """Return a header for a new file made of ``tensors`` in this order (used when a merge mixes two files)."""


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
    `fmhub.errors.MergeConflict` with a message naming what is missing (a
    base, a Fisher diagonal, an option out of range); fmhub adds the tensor's
    name and writes nothing.

    ``needs_base`` says the strategy works on task vectors (side − base):
    fmhub refuses, before reading any tensor, to run it without a base.

    ``elementwise`` (optional, default False) says each output element depends
    only on the same element of the inputs (no statistics across elements, no
    random stream): fmhub may then call ``merge`` on 1-D chunks of the
    flattened tensors, so a large tensor never sits in memory whole.
    """

    name: str
    needs_base: bool
    elementwise: bool

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
    """A data-cleaning step: records in, the records to keep (possibly edited) out."""

    name: str

    def clean(self, records: Iterable[Mapping[str, Any]], options: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
        ...


@runtime_checkable
class Labeler(Protocol):
    """A labelling function: one vote (a label, or ``None`` to abstain) per record."""

    name: str

    def label(self, records: Iterable[Mapping[str, Any]], options: Mapping[str, Any]) -> Iterator[Any]:
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
    """Decides whether ``principal`` may do ``action`` on ``resource``.

    Returns ``True`` (allow), ``False`` (deny) or ``None`` (no opinion). A deny
    from any policy wins.
    """

    name: str

    def check(self, principal: str, action: str, resource: str) -> bool | None:
        ...


@runtime_checkable
class ServingBackend(Protocol):
    """Serves one base model with many adapters."""

    name: str

    def start(self, base_model: str, options: Mapping[str, Any]) -> Any:
        """Load ``base_model`` and return a server handle."""
