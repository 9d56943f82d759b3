"""How the clean filter stores a tensor: whole or compressed, or as a delta against its previous version.

Spec: docs/manifest.md (versions 2 and 4). By default (``fmhub.deltas`` and
``fmhub.compress``, both on) a new tensor is stored as a ``planes`` object
(`fmhub.core.planes`: byte planes, zstd where it pays), and a tensor that changed
from its namesake in the version git's index holds is stored as a link of a
*chain*: the earlier version's objects plus one delta object per version
since. The tensor's oid still names its full bytes, so diffs, merges and
equality are unchanged; every rebuild is checked against that oid.

Choosing the encoding costs about one pass over the bytes: each frame of the
tensor is compared with the same frame of the previous version and coded as
unchanged, as its changed elements, or as the difference (`fmhub.core.planes`);
the ``lowrank`` codec (a LoRA merged into its base) runs only when a probe of
one frame says the change is low-rank, and within a time budget per byte.
Chains are bounded: after ``fmhub.deltachain`` links (default 8) the tensor
is stored whole again, so a checkout never applies more than that many deltas.

Lossy storage is opt-in and explicit: with ``fmhub.lowrank.tolerance T`` a
changed float matrix may be stored as a low-rank delta whose rebuild is
within T of every element, when that is smaller than any exact delta; its
manifest line says so (``approx``). With ``fmhub.lowrank.strict`` a changed
float matrix that cannot be stored that way fails the add.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import namedtuple
from types import MappingProxyType

from fmhub.base.errors import FmhubError
from fmhub.core.codecs import codecs
from fmhub.core.manifest import MAX_CHAIN, Approx, Delta, TensorEntry
from fmhub.core.store import ObjectStore

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import Mapping


DEFAULT_MAX_CHAIN = 8
MAX_RATIO = 0.5  # an exact delta of another codec must be under half the tensor's size to be worth a chain link
MAX_DELTA_TENSOR_BYTES = 2 << 30  # bigger tensors are stored whole: the in-memory codecs hold a few copies
MIN_CODED_BYTES = 1024  # smaller tensors are stored as they are: an encoded object would save nothing worth a file
CODED_PAYS = 0.98  # a planes root is kept only below this fraction of the tensor's size
LOWRANK_NS_PER_BYTE = 40  # time a low-rank encode may take per byte of tensor before it is abandoned
_LOWRANK_ONE_AT_A_TIME = threading.Lock()
LOWRANK_MUST_BEAT = 0.1  # a change the planes code under this fraction of its size is not worth a low-rank attempt


class DeltaPolicy(namedtuple("DeltaPolicy", "deltas compress max_chain max_ratio max_tensor_bytes tolerance strict prepared",
                             defaults=(True, True, DEFAULT_MAX_CHAIN, MAX_RATIO, MAX_DELTA_TENSOR_BYTES, 0.0, False, MappingProxyType({})))):
    """How the clean filter stores tensors (`policy_from_config` reads it from git config); a named tuple, which git's
    filter defines far faster than a dataclass.

    ``deltas``: a changed tensor may be stored as a delta against its previous
    version. ``compress``: a whole tensor is stored as a planes object when
    that is smaller. ``max_chain``: links in a chain at most. ``max_ratio``: an
    exact delta of another codec must be under this fraction of the tensor.
    ``max_tensor_bytes``: bigger tensors are stored whole. ``tolerance`` > 0: a
    low-rank delta within this of every element may stand in for the tensor.
    ``strict``: every changed float matrix must be stored as a delta (exact, or
    within the tolerance). ``prepared``: deltas a caller already has (a LoRA
    merge: its factors), by the new tensor's oid: (codec, base oid, delta).
    """

    __slots__ = ()


PLAIN = DeltaPolicy(deltas=False, compress=False)
"""Every tensor stored as it is, one object each (what `fmhub.core.checkpoint.clean` does when given no policy)."""


class ToleranceError(FmhubError):
    """A changed tensor cannot be stored as a low-rank delta within the tolerance the user set."""


def policy_from_config(config: Mapping[str, str]) -> DeltaPolicy:
    """The policy git config sets: ``fmhub.deltas`` and ``fmhub.compress`` (both on unless set false),
    ``fmhub.deltachain``, ``fmhub.lowrank.*``; setting ``fmhub.lowrank.tolerance`` or ``fmhub.lowrank.strict``
    turns deltas on.

    ``config`` maps every ``fmhub.*`` key to its last value, keys lowercased as git lists them (what
    `fmhub.core.repo.fmhub_config` reads in one ``git config`` call); this module runs no git.
    """
    tolerance_s = config.get("fmhub.lowrank.tolerance", "")
    strict = _bool(config, "fmhub.lowrank.strict", False)
    return DeltaPolicy(
        deltas=_bool(config, "fmhub.deltas", True) or bool(tolerance_s) or strict,
        compress=_bool(config, "fmhub.compress", True),
        max_chain=_chain_length(config.get("fmhub.deltachain", "")),
        tolerance=parse_tolerance(tolerance_s or "0", "git config fmhub.lowrank.tolerance"),
        strict=strict,
    )


_TRUE, _FALSE = {"true", "yes", "on", "1", ""}, {"false", "no", "off", "0"}


def _bool(config: dict[str, str], key: str, default: bool) -> bool:
    """A boolean the way git reads one (a key with no value is true)."""
    if key not in config:
        return default
    value = config[key].strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise FmhubError(f"git config {key} is {config[key]!r}; it should be true or false")


def _chain_length(text: str) -> int:
    try:
        value = int(text) if text.strip() else DEFAULT_MAX_CHAIN
    except ValueError:
        raise FmhubError(f"git config fmhub.deltachain is {text!r}; it should be a whole number") from None
    if not 1 <= value <= MAX_CHAIN:
        raise FmhubError(f"git config fmhub.deltachain must be between 1 and {MAX_CHAIN} (what readers accept)")
    return value


def max_chain_from_config(config: Mapping[str, str]) -> int:
    """``fmhub.deltachain`` in ``config`` (as `policy_from_config`; default 8), whether deltas are on or not
    (`fmhub repack` reads it too)."""
    return _chain_length(config.get("fmhub.deltachain", ""))


def parse_tolerance(text: str, what: str = "the tolerance") -> float:
    """A non-negative finite number (``1e-6``), or a clear error."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise FmhubError(f"{what} is {text!r}; it should be a number >= 0, the largest error allowed per element (e.g. 1e-6)")
    return value


# -- storing a tensor (the clean filter) ---------------------------------------------------------


def store_tensor(
    store: ObjectStore, data: bytes | bytearray, oid: str, old: TensorEntry | None, name: str, dtype: str,
    shape: tuple[int, ...], policy: DeltaPolicy,
) -> TensorEntry:
    """Store one tensor's bytes (sha256 ``oid``) and return its manifest entry.

    ``old`` is its namesake in the version being replaced: an unchanged tensor
    keeps that entry (nothing is written), a changed one may become the next
    link of its chain.
    """
    same = old is not None and (old.dtype, tuple(old.shape)) == (dtype, tuple(shape))  # equal bytes can be another tensor
    if same and (oid == old.oid or (old.approx is not None and oid == old.approx.oid)):
        return old  # unchanged, or re-added unchanged after a lossy add: keep what the index holds
    entry = TensorEntry(name, dtype, tuple(shape), len(data), oid)
    if old is not None and _chainable(old, entry, policy):
        if policy.prepared or policy.tolerance > 0 or policy.strict:
            return store_changed(store, old, data, dtype, policy, oid)
        linked = _store_link(store, data, entry, old, policy.max_chain)
        if linked is not None:
            return linked
    return _store_whole(store, data, entry, policy)


def _chainable(old: TensorEntry, new: TensorEntry, policy: DeltaPolicy) -> bool:
    return (
        policy.deltas and (old.dtype, old.shape, old.size) == (new.dtype, new.shape, new.size)
        and MIN_CODED_BYTES <= new.size <= policy.max_tensor_bytes
    )


def _store_whole(store: ObjectStore, data: bytes | bytearray, entry: TensorEntry, policy: DeltaPolicy) -> TensorEntry:
    """The tensor on its own: a planes object when compression is on and pays, else its bytes as they are."""
    if policy.compress and len(data) >= MIN_CODED_BYTES and not store.has(entry.oid):
        from fmhub.core.tensorio import write_planes

        coded = write_planes(store, data, entry.dtype, None, limit=int(CODED_PAYS * len(data)))
        if coded is not None:
            return entry._replace(root=coded.commit(), root_codec="planes", root_size=coded.size)
    store.write_bytes(data)
    return entry


def _store_link(store: ObjectStore, data: bytes | bytearray, entry: TensorEntry, old: TensorEntry, max_chain: int) -> TensorEntry | None:
    """``entry`` as the next link of ``old``'s chain, or a fresh compressed root when the change shares nothing
    with ``old``; None when ``old``'s chain is full or cannot be read here (the caller stores the tensor whole).

    A float matrix's first frame is probed first (`_low_rank_first_frame`): a change that is low-rank there,
    and that planes would code poorly there, is tried as ``lowrank-fixed``; everything else, and a low-rank
    attempt that does not pay, is coded as planes frames (one pass at memory speed).
    """
    from fmhub.core.tensorio import Chain, write_planes

    if len(old.deltas) >= max_chain:
        return None
    try:
        base = Chain(store, old)
    except FmhubError:
        return None  # the previous version cannot be rebuilt here: this version does not depend on it
    try:
        probed = _low_rank_first_frame(base, data, entry)
        if probed is not None:
            low = _lowrank_delta(store, data, entry, old, *probed)
            if low is not None:
                return _link(entry, old, low)
        coded = write_planes(store, data, entry.dtype, base)
    finally:
        base.close()
    if coded is None:
        return None  # the previous version's objects are damaged: store this one without them
    if coded.literal == coded.frames:  # nothing in common with the previous version: a new root, not a link
        return entry._replace(root=coded.commit(), root_codec="planes", root_size=coded.size)
    return _link(entry, old, Delta("planes", coded.commit(), coded.size))


def _link(entry: TensorEntry, old: TensorEntry, delta: Delta) -> TensorEntry:
    if old.root is None:
        return entry._replace(root=old.oid, deltas=(delta,))
    return entry._replace(root=old.root, root_codec=old.root_codec, root_size=old.root_size, deltas=old.deltas + (delta,))


def _low_rank_first_frame(base, data, entry: TensorEntry) -> tuple[int, int] | None:
    """(rank, bytes to beat) when the change's first frame is low-rank (`fmhub.core.lowrank.probe_rank`) and planes
    code that frame in over `LOWRANK_MUST_BEAT` of it (a sparse update can look low-rank in a few rows: planes
    already code it small); None otherwise, or for a tensor not worth probing. Costs one frame's decode."""
    from fmhub.core import lowrank
    from fmhub.core import planes

    if not lowrank.worth_probing(entry.dtype, entry.shape, entry.size):
        return None
    first = next(iter(base.jobs()), None)
    if first is None:
        return None
    before = first()
    rank = lowrank.probe_rank(before, data[: lowrank.probe_bytes(entry.dtype, entry.shape)], entry.dtype, entry.shape)
    if rank is None:
        return None
    n = min(len(data), planes.FRAME_BYTES)
    estimate = len(planes.encode_frame(memoryview(data)[:n], before, planes.layout_for(entry.dtype, len(data)))) / n
    return (rank, int(estimate * entry.size)) if estimate > LOWRANK_MUST_BEAT else None


def _lowrank_delta(store: ObjectStore, data, entry: TensorEntry, old: TensorEntry, rank: int, beat: int) -> Delta | None:
    """A ``lowrank-fixed`` delta under ``beat`` bytes, made within the time budget and stored; None otherwise."""
    from fmhub.core import lowrank_fixed
    from fmhub.core.tensorio import read_tensor

    with _LOWRANK_ONE_AT_A_TIME:  # it holds the change in float32 and uses every core through BLAS
        deadline = time.monotonic() + LOWRANK_NS_PER_BYTE * entry.size * 1e-9
        try:
            whole = read_tensor(store, old)
        except FmhubError:
            return None
        delta = lowrank_fixed.encode(whole, data, entry.dtype, entry.shape, rank, deadline)
    if delta is None or len(delta) >= beat:
        return None
    return Delta(lowrank_fixed.NAME, store.write_bytes(delta), len(delta))


# -- whole-tensor paths: other codecs, tolerances, deltas a caller prepared, `fmhub repack` -------------


def encode_best(
    base: bytes | bytearray, new: bytes | bytearray, dtype: str, policy: DeltaPolicy, shape: tuple[int, ...] | None = None
) -> tuple[str, bytes] | None:
    """The smallest exact delta from ``base`` to ``new`` under the policy's ratio, checked to round-trip.

    ``planes`` always; ``lowrank`` only when its probe says the change is low-rank;
    other installed codecs (plugins) are each asked too.
    """
    from fmhub.core import lowrank

    best: tuple[str, bytes] | None = None
    limit = policy.max_ratio * len(new)
    for name, codec in sorted(codecs().items()):
        if name in ("sparse", "xor-zlib", "lowrank"):
            continue  # superseded by planes' frames and lowrank-fixed; still decoded
        if name == "lowrank-fixed" and not (shape and lowrank.worth_probing(dtype, shape, len(new))):
            continue
        delta = codec.encode(base, new, dtype, shape)
        if delta is None or len(delta) >= limit or (best is not None and len(delta) >= len(best[1])):
            continue
        if bytes(codec.decode(base, delta, dtype)) != bytes(new):
            raise FmhubError(f"the delta codec {name!r} does not give back what it encoded; uninstall the plugin that provides it")
        best = (name, delta)
    return best


def encode_within(
    base: bytes | bytearray, new: bytes | bytearray, dtype: str, shape: tuple[int, ...], policy: DeltaPolicy
) -> tuple[str, bytes, bytearray, float] | None:
    """The smallest lossy delta within the policy's tolerance: (codec, delta, rebuilt bytes, max error), or None.

    Lossy codecs are those with an ``encode_within`` method (built in: ``lowrank``).
    """
    best = None
    limit = policy.max_ratio * len(new)
    for name, codec in sorted(codecs().items()):
        encode = getattr(codec, "encode_within", None)
        found = encode(base, new, dtype, shape, policy.tolerance) if encode is not None else None
        if found is None or len(found[0]) >= limit or (best is not None and len(found[0]) >= len(best[1])):
            continue
        delta, max_error = found
        rebuilt = codec.decode(base, delta, dtype)
        if len(rebuilt) != len(new) or not _within(rebuilt, new, dtype, policy.tolerance):
            raise FmhubError(f"the delta codec {name!r} does not stay within the tolerance it was given; uninstall the plugin that provides it")
        best = (name, delta, bytearray(rebuilt), max_error)
    return best


def _prepared(policy: DeltaPolicy, oid: str, old: TensorEntry, base: bytes | bytearray, dtype: str) -> tuple[str, bytes] | None:
    """The caller's own delta for this tensor, if it has one against ``old`` and it rebuilds the tensor exactly."""
    found = policy.prepared.get(oid)
    if found is None or found[1] != old.oid or len(found[2]) >= policy.max_ratio * old.size:
        return None
    codec, _base, delta = found
    impl = codecs().get(codec)
    if impl is None or hashlib.sha256(impl.decode(base, delta, dtype)).hexdigest() != oid:
        return None  # not what it claims: encode afresh
    return codec, delta


def _within(a: bytes | bytearray, b: bytes | bytearray, dtype: str, tolerance: float) -> bool:
    import numpy as np

    from fmhub.core.floats import to_float64

    return bool(np.all(np.abs(to_float64(a, dtype) - to_float64(b, dtype)) <= tolerance))


def _is_float_matrix(entry: TensorEntry) -> bool:
    from fmhub.core.floats import ITEMSIZE

    return entry.dtype in ITEMSIZE and len(entry.shape) >= 2 and entry.size > 0


def store_changed(
    store: ObjectStore, old: TensorEntry, new: bytes | bytearray, dtype: str, policy: DeltaPolicy, oid: str | None = None
) -> TensorEntry:
    """Store ``new`` (the next version of ``old``, same name, dtype and shape) in memory, for the opt-in modes.

    Used when the policy carries prepared deltas, a tolerance or ``strict``: as a
    chain link when a codec makes it small (with a tolerance set, the smallest
    of the exact and the within-tolerance links); else whole. ``oid``: ``new``'s
    sha256 when the caller has it already.
    """
    oid = oid or hashlib.sha256(new).hexdigest()
    if oid == old.oid or (old.approx is not None and oid == old.approx.oid):
        return old
    entry = TensorEntry(old.name, dtype, old.shape, old.size, oid)
    room = len(old.deltas) < policy.max_chain
    if room:
        from fmhub.core.tensorio import tensor_bytes

        try:
            base = tensor_bytes(store, old)
        except FmhubError:
            base = None  # the previous version cannot be rebuilt here: this version does not depend on it
        best = _prepared(policy, oid, old, base, dtype) if base is not None else None
        lossy = None
        if best is None and base is not None:  # a prepared delta is exact and patch-free: nothing lossy beats it
            best = encode_best(base, new, dtype, policy, old.shape)
            lossy = encode_within(base, new, dtype, old.shape, policy) if policy.tolerance > 0 else None
        del base
        if best is not None and (lossy is None or len(best[1]) <= len(lossy[1])):
            codec, delta = best
            return _link(entry, old, Delta(codec, store.write_bytes(delta), len(delta)))
        if lossy is not None:  # the user allowed an approximation and it is the smallest
            codec, delta, rebuilt, max_error = lossy
            approx = Approx(oid, max_error, policy.tolerance)
            entry = TensorEntry(old.name, dtype, old.shape, old.size, hashlib.sha256(rebuilt).hexdigest(), approx=approx)
            return _link(entry, old, Delta(codec, store.write_bytes(delta), len(delta)))
    if room and policy.strict and _is_float_matrix(old):  # a full chain is due a whole snapshot, strict or not
        within = f"within {policy.tolerance:g}" if policy.tolerance else "exactly"
        raise ToleranceError(
            f"tensor {old.name!r}: the tolerance cannot be met: no delta codec reproduces it {within} in under half "
            "its size, so the file was not added (the index is unchanged). Raise fmhub.lowrank.tolerance "
            "(--tolerance), or unset fmhub.lowrank.strict to store such tensors whole"
        )
    return _store_whole(store, new, entry, policy)
