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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from fmhub import host
from fmhub.errors import CorruptObject, FmhubError, MissingObject
from fmhub.interfaces import DeltaCodec
from fmhub.manifest import Delta, TensorEntry
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


def policy_from_git(cwd: str | None = None) -> DeltaPolicy | None:
    """``fmhub.deltas`` (off by default) and ``fmhub.deltachain`` from git config; None when deltas are off."""
    from fmhub.repo import git

    on = git("config", "--type=bool", "--get", "fmhub.deltas", cwd=cwd, check=False).strip()
    if on != "true":
        return None
    chain = git("config", "--get", "fmhub.deltachain", cwd=cwd, check=False).strip()
    try:
        max_chain = int(chain) if chain else DEFAULT_MAX_CHAIN
    except ValueError:
        raise FmhubError(f"git config fmhub.deltachain is {chain!r}; it should be a whole number") from None
    if max_chain < 1:
        raise FmhubError("git config fmhub.deltachain must be at least 1")
    return DeltaPolicy(max_chain=max_chain)


def codecs() -> dict[str, DeltaCodec]:
    return host.registry("delta-codec")


def encode_best(base: bytes | bytearray, new: bytes | bytearray, dtype: str, policy: DeltaPolicy) -> tuple[str, bytes] | None:
    """The smallest delta any codec makes from ``base`` to ``new`` under the policy's ratio, checked to round-trip."""
    best: tuple[str, bytes] | None = None
    limit = policy.max_ratio * len(new)
    for name, codec in sorted(codecs().items()):
        delta = codec.encode(base, new, dtype)
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


def store_changed(store: ObjectStore, old: TensorEntry, new: bytes | bytearray, dtype: str, policy: DeltaPolicy) -> tuple[str, str | None, tuple[Delta, ...]]:
    """Store ``new`` (the next version of ``old``): as a chain link when a codec makes it small, else whole.

    Returns (oid, root, deltas) for the new manifest entry.
    """
    oid = hashlib.sha256(new).hexdigest()
    if oid == old.oid:
        return old.oid, old.root, old.deltas
    if len(old.deltas) < policy.max_chain:
        try:
            base = tensor_bytes(store, old)
        except FmhubError:
            base = None  # the previous version cannot be rebuilt here: this version does not depend on it
        best = encode_best(base, new, dtype, policy) if base is not None else None
        del base
        if best is not None:
            codec, delta = best
            delta_oid = store.write_bytes(delta)
            return oid, old.root or old.oid, old.deltas + (Delta(codec, delta_oid, len(delta)),)
    store.write_bytes(new)
    return oid, None, ()
