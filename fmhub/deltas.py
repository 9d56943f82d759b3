"""Delta objects: a changed tensor stored as its previous version plus a delta (spec: docs/manifest.md, version 2).

A fine-tune often changes a small part of a tensor (a sparse update, a few
rows). With ``git config fmhub.deltas true`` the clean filter stores such a
tensor as a chain: the root object of an earlier version plus one delta per
version since, each made by a codec plugin (`fmhub.interfaces.DeltaCodec`).
The tensor's oid still names its full bytes, so diffs, merges and equality
are unchanged; rebuilding checks the result against that oid, so a chain
rebuilds bit for bit or fails loudly.

Chains are bounded: after ``fmhub.deltachain`` links (default 8) the tensor
is stored whole again, so a checkout never applies more than that many deltas.

Lossy storage is opt-in and explicit: with ``fmhub.lowrank.tolerance T`` a
changed float matrix may be stored as a low-rank delta whose rebuild is
within T of every element, when that is smaller than any exact delta.
Its manifest line says so (``approx``: the sha256 of the bytes as added, the
largest error, the tolerance), and checkout gives the rebuilt bytes. With
``fmhub.lowrank.strict`` a changed float matrix that cannot be stored that
way fails the add instead of being stored whole.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Mapping

from fmhub import host
from fmhub.errors import CorruptObject, FmhubError, MissingObject
from fmhub.interfaces import DeltaCodec
from fmhub.manifest import Approx, Delta, TensorEntry
from fmhub.store import ObjectStore

DEFAULT_MAX_CHAIN = 8
MAX_RATIO = 0.5  # a delta must be under half the tensor's size to be worth a chain link
MAX_DELTA_TENSOR_BYTES = 2 << 30  # bigger tensors are stored whole: encoding holds a few copies in memory


@dataclass(frozen=True)
class DeltaPolicy:
    """Whether and how the clean filter stores changed tensors as deltas."""

    max_chain: int = DEFAULT_MAX_CHAIN
    max_ratio: float = MAX_RATIO
    max_tensor_bytes: int = MAX_DELTA_TENSOR_BYTES
    tolerance: float = 0.0  # > 0: a low-rank delta within this of every element may stand in for the tensor
    strict: bool = False  # every changed float matrix must be stored as a delta (exact, or within the tolerance)
    # deltas a caller already has (e.g. a LoRA merge: its factors), by the new tensor's oid: (codec, base oid, delta)
    prepared: Mapping[str, tuple[str, str, bytes]] = field(default_factory=dict)


class ToleranceError(FmhubError):
    """A changed tensor cannot be stored as a low-rank delta within the tolerance the user set."""


def policy_from_git(cwd: str | None = None) -> DeltaPolicy | None:
    """``fmhub.deltas`` (off by default), ``fmhub.deltachain`` and ``fmhub.lowrank.*`` from git config; None when deltas are off.

    Setting ``fmhub.lowrank.tolerance`` or ``fmhub.lowrank.strict`` turns deltas on.
    """
    from fmhub.repo import git

    def get(key: str, *typ: str) -> str:
        return git("config", *typ, "--get", key, cwd=cwd, check=False).strip()

    tolerance_s = get("fmhub.lowrank.tolerance")
    strict = get("fmhub.lowrank.strict", "--type=bool") == "true"
    if get("fmhub.deltas", "--type=bool") != "true" and not tolerance_s and not strict:
        return None
    return DeltaPolicy(max_chain=max_chain_from_git(cwd), tolerance=parse_tolerance(tolerance_s or "0", "git config fmhub.lowrank.tolerance"), strict=strict)


def max_chain_from_git(cwd: str | None = None) -> int:
    """``git config fmhub.deltachain`` (default 8), whether deltas are on or not (`fmhub repack` reads it too)."""
    from fmhub.repo import git

    chain = git("config", "--get", "fmhub.deltachain", cwd=cwd, check=False).strip()
    try:
        value = int(chain) if chain else DEFAULT_MAX_CHAIN
    except ValueError:
        raise FmhubError(f"git config fmhub.deltachain is {chain!r}; it should be a whole number") from None
    if value < 1:
        raise FmhubError("git config fmhub.deltachain must be at least 1")
    return value


def parse_tolerance(text: str, what: str = "the tolerance") -> float:
    """A non-negative finite number (``1e-6``), or a clear error."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise FmhubError(f"{what} is {text!r}; it should be a number >= 0, the largest error allowed per element (e.g. 1e-6)")
    return value


def codecs() -> dict[str, DeltaCodec]:
    return host.registry("delta-codec")


def encode_best(
    base: bytes | bytearray, new: bytes | bytearray, dtype: str, policy: DeltaPolicy, shape: tuple[int, ...] | None = None
) -> tuple[str, bytes] | None:
    """The smallest delta any codec makes from ``base`` to ``new`` under the policy's ratio, checked to round-trip."""
    best: tuple[str, bytes] | None = None
    limit = policy.max_ratio * len(new)
    for name, codec in sorted(codecs().items()):
        delta = codec.encode(base, new, dtype, shape)
        if delta is None or len(delta) >= limit or (best is not None and len(delta) >= len(best[1])):
            continue
        if bytes(codec.decode(base, delta, dtype)) != bytes(new):
            raise FmhubError(f"the delta codec {name!r} does not give back what it encoded; uninstall the plugin that provides it")
        best = (name, delta)
    return best


def read_object(store: ObjectStore, oid: str, what: str) -> bytes:
    """`ObjectStore.read_bytes` (hash verified), with MissingObject / CorruptObject naming ``what``."""
    try:
        return store.read_bytes(oid)
    except KeyError:
        raise MissingObject(f"{what}: object sha256:{oid} is not in the store {store.path}") from None
    except CorruptObject as exc:
        raise CorruptObject(f"{what}: {exc}") from None


def tensor_bytes(store: ObjectStore, entry: TensorEntry, label: str = "") -> bytearray:
    """A tensor's full bytes: its own object if the store has it, else its delta chain rebuilt and checked."""
    where = f"{label}tensor {entry.name!r}"
    if entry.root is None or store.ensure(entry.oid):
        return bytearray(read_object(store, entry.oid, where))
    data = read_object(store, entry.root, f"{where} (root of its delta chain)")
    available = codecs()
    for i, d in enumerate(entry.deltas, start=1):
        codec = available.get(d.codec)
        if codec is None:
            raise FmhubError(f"{where} is stored with the delta codec {d.codec!r}, which no installed plugin provides; install it")
        data = codec.decode(data, read_object(store, d.oid, f"{where} (delta {i} of {len(entry.deltas)})"), entry.dtype)
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.oid:
        raise CorruptObject(f"{where}: its delta chain does not rebuild sha256:{entry.oid}; run `fmhub fsck`")
    return data if isinstance(data, bytearray) else bytearray(data)


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

    from fmhub.floats import to_float64

    return bool(np.all(np.abs(to_float64(a, dtype) - to_float64(b, dtype)) <= tolerance))


def _is_float_matrix(entry: TensorEntry) -> bool:
    from fmhub.floats import ITEMSIZE

    return entry.dtype in ITEMSIZE and len(entry.shape) >= 2 and entry.size > 0


def store_changed(store: ObjectStore, old: TensorEntry, new: bytes | bytearray, dtype: str, policy: DeltaPolicy) -> TensorEntry:
    """Store ``new`` (the next version of ``old``, same name, dtype and shape) and return its manifest entry.

    As a chain link when a codec makes it small (with a tolerance set, the
    smallest of the exact and the within-tolerance links); else whole.
    """
    oid = hashlib.sha256(new).hexdigest()
    if oid == old.oid or (old.approx is not None and oid == old.approx.oid):
        return old  # unchanged, or re-added unchanged after a lossy add: keep what the index holds
    entry = TensorEntry(old.name, dtype, old.shape, old.size, oid)
    room = len(old.deltas) < policy.max_chain
    if room:
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
            return _link(store, entry, old, codec, delta)
        if lossy is not None:  # the user allowed an approximation and it is the smallest
            codec, delta, rebuilt, max_error = lossy
            approx = Approx(oid, max_error, policy.tolerance)
            entry = TensorEntry(old.name, dtype, old.shape, old.size, hashlib.sha256(rebuilt).hexdigest(), approx=approx)
            return _link(store, entry, old, codec, delta)
    if room and policy.strict and _is_float_matrix(old):  # a full chain is due a whole snapshot, strict or not
        within = f"within {policy.tolerance:g}" if policy.tolerance else "exactly"
        raise ToleranceError(
            f"tensor {old.name!r}: the tolerance cannot be met: no delta codec reproduces it {within} in under half "
            "its size, so the file was not added (the index is unchanged). Raise fmhub.lowrank.tolerance "
            "(--tolerance), or unset fmhub.lowrank.strict to store such tensors whole"
        )
    store.write_bytes(new)
    return entry


def _link(store: ObjectStore, entry: TensorEntry, old: TensorEntry, codec: str, delta: bytes) -> TensorEntry:
    from dataclasses import replace

    d = Delta(codec, store.write_bytes(delta), len(delta))
    return replace(entry, root=old.root or old.oid, deltas=old.deltas + (d,))
