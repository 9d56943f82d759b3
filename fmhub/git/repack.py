"""`fmhub repack`: store old tensor versions as deltas against newer ones, as `git repack` deltifies loose objects.

Manifests in history are immutable, so history written with deltas off (or
tensors stored whole) holds one whole object per tensor version. repack walks
every commit reachable from a ref or the reflog, newest first, and lists for
each (file, tensor) the whole versions it had. Each version older than the
newest is replaced in the store by a *packed object* (spec: docs/manifest.md,
"Packed objects"): a delta against the next newer version of the same tensor,
made by the delta codecs (`fmhub.core.deltas`), when the delta is under half the
tensor's size and the chain of packed objects stays within
``fmhub.deltachain`` links. Every read rebuilds packed objects and checks
them (`fmhub.core.store.ObjectStore`), so checkouts, diffs and pushes of old
commits are unchanged, only slower.

Stays whole: every object the ref tips and the index need (the checkouts that
must be fast), headers and the objects of manifest delta chains (small, or
deltas already), and objects git-lfs pointers name (git-lfs reads those files
directly).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from fmhub.core.deltas import MAX_DELTA_TENSOR_BYTES, DeltaPolicy, encode_best, max_chain_from_config
from fmhub.base.errors import CorruptObject, FmhubError, ManifestError, MissingObject
from fmhub.core.manifest import Manifest, is_manifest
from fmhub.core.packfile import MAX_PACK_DEPTH, pack_header_bytes
from fmhub.core.repo import fmhub_config, open_store, toplevel
from fmhub.core.store import ObjectStore
from fmhub.git.history import blobs_in_history, lfs_pointer, manifest_or_pointer, read_blobs


@dataclass
class RepackReport:
    packed: int = 0  # objects now stored as deltas
    bytes_before: int = 0  # the store's object files, whole and packed
    bytes_after: int = 0
    skipped: int = 0  # old versions left whole: no small delta, chain too deep, no usable newer version
    unpacked: int = 0  # objects a tip needs that were packed and are whole again
    dry_run: bool = False


@dataclass(frozen=True)
class Version:
    """One whole version of a tensor, as a manifest names it."""

    oid: str
    dtype: str
    size: int


@dataclass
class History:
    versions: dict[tuple[str, str], list[Version]] = field(default_factory=dict)  # (path, tensor) -> newest first
    unpackable: set[str] = field(default_factory=set)  # headers, manifest delta-chain objects, git-lfs objects


def repack(cwd: str | None = None, dry_run: bool = False) -> RepackReport:
    """Pack the old whole tensor versions of the store (or, with ``dry_run``, only say what that would do)."""
    top = toplevel(cwd)
    max_depth = min(max_chain_from_config(fmhub_config(top)), MAX_PACK_DEPTH)
    history = read_history(top)
    stay_whole = tip_objects(top) | history.unpackable
    store = open_store(top)
    try:
        store.flush()
        report = RepackReport(dry_run=dry_run, bytes_before=_store_bytes(store))
        saved = _settle(store, stay_whole, report)
        chains = _Chains.load(store, max_depth)
        for versions in history.versions.values():
            saved += _pack_versions(store, versions, stay_whole, chains, report)
        report.bytes_after = report.bytes_before - saved
    finally:
        store.close()
    return report


# -- what history holds ------------------------------------------------------------


def read_history(cwd: str | None = None) -> History:
    """Every tensor's whole versions, newest first, in one pass over the manifests of all refs and reflogs."""
    # --in-commit-order lists each manifest blob with the newest commit that has it (commits newest first)
    blobs = blobs_in_history(["--date-order", "--in-commit-order", "--all", "--reflog"], cwd)
    history = History()
    seen: set[tuple[str, str, str]] = set()
    for path, data in read_blobs(blobs, cwd, wanted=manifest_or_pointer):
        if not is_manifest(data):
            pointer = lfs_pointer(data)
            if pointer is not None:
                history.unpackable.add(pointer.oid)
            continue
        m = _parse(data, path)
        if m.is_data:  # a dataset's chunks are byte ranges, not versions of one another: never packed
            continue
        history.unpackable.add(m.header_oid)
        for t in m.tensors:
            if t.root is not None:  # already a delta chain: its root and deltas stay as they are
                history.unpackable.update(oid for oid, _ in t.storage())
            elif (path, t.name, t.oid) not in seen:
                seen.add((path, t.name, t.oid))
                history.versions.setdefault((path, t.name), []).append(Version(t.oid, t.dtype, t.size))
    return history


def tip_objects(cwd: str | None = None) -> set[str]:
    """Every object the manifests at the ref tips (HEAD, branches, tags, stash) and in the index need."""
    oids: set[str] = set()
    for path, data in read_blobs(blobs_in_history(["--no-walk", "--all", "--indexed-objects"], cwd), cwd):
        oids.update(oid for oid, _ in _parse(data, path).oids())
    return oids


def _parse(data: bytes, path: str) -> Manifest:
    try:
        return Manifest.from_bytes(data, path)
    except ManifestError as exc:
        raise FmhubError(f"{exc}; repack stopped without changing anything (fix or remove that file's history first)") from None


# -- packing -----------------------------------------------------------------------


class _Chains:
    """Which object each packed object (on disk, or packed in this run) is a delta against.

    Keeps chains at most ``max_depth`` links long and free of cycles: packing
    X against Y lengthens the chain of everything already packed against X.
    """

    def __init__(self, bases: dict[str, str], max_depth: int) -> None:
        self.base_of = bases
        self.max_depth = max_depth
        self.below: dict[str, int] = {}  # oid -> most packed links resting on it (0: none)
        for oid in bases:
            self._raise_below(oid)

    @classmethod
    def load(cls, store: ObjectStore, max_depth: int) -> "_Chains":
        bases = {}
        for oid in store.iter_packed():
            try:
                base = store.packed_base(oid)
            except CorruptObject as exc:
                raise FmhubError(f"{exc}; repack stopped before packing anything") from None
            if base is not None:
                bases[oid] = base
        return cls(bases, max_depth)

    def chain(self, oid: str) -> list[str]:
        """``oid``, its base, that one's base, ... (stops at a whole object, or at a loop)."""
        out = [oid]
        while out[-1] in self.base_of and len(out) <= MAX_PACK_DEPTH:
            base = self.base_of[out[-1]]
            if base in out:
                break
            out.append(base)
        return out

    def fits(self, oid: str, base: str) -> bool:
        """Whether packing ``oid`` against ``base`` keeps every chain through it short enough, without a loop."""
        up = self.chain(base)
        return oid not in up and len(up) + self.below.get(oid, 0) <= self.max_depth

    def add(self, oid: str, base: str) -> None:
        self.base_of[oid] = base
        self._raise_below(oid)

    def _raise_below(self, oid: str) -> None:
        dist = self.below.get(oid, 0) + 1
        for anc in self.chain(oid)[1:]:
            if self.below.get(anc, 0) >= dist:
                break  # its own bases were raised at least as far already
            self.below[anc] = dist
            dist += 1


def _pack_versions(store: ObjectStore, versions: list[Version], stay_whole: set[str], chains: _Chains, report: RepackReport) -> int:
    """Pack each old version of one tensor against the next newer one; the bytes this saves.

    The newer version's bytes are carried from one step to the next, so each
    version is read once: at most two versions (and a codec's work) in memory.
    """
    policy = DeltaPolicy()
    saved = 0
    newer: Version | None = None
    newer_data: bytes | None = None
    for v in versions:
        data = None
        if newer is not None and _packable(store, v, stay_whole, chains):
            if newer.size == v.size and store.has(newer.oid) and chains.fits(v.oid, newer.oid):
                if newer_data is None:
                    newer_data = store.read_bytes(newer.oid)
                data = store.read_bytes(v.oid)
                best = encode_best(newer_data, data, v.dtype, policy)
                if best is not None:
                    saved += v.size - _pack_one(store, v, newer.oid, newer_data, best, report.dry_run)
                    chains.add(v.oid, newer.oid)
                    report.packed += 1
                else:
                    report.skipped += 1
            else:
                report.skipped += 1
        newer, newer_data = v, data
    return saved


def _packable(store: ObjectStore, v: Version, stay_whole: set[str], chains: _Chains) -> bool:
    """An old version stored whole here, that nothing needs whole, not packed already, small enough to encode."""
    return (
        v.oid not in stay_whole
        and v.oid not in chains.base_of
        and 0 < v.size <= MAX_DELTA_TENSOR_BYTES
        and os.path.isfile(store.object_path(v.oid))
    )


def _pack_one(store: ObjectStore, v: Version, base: str, base_data: bytes, best: tuple[str, bytes], dry_run: bool) -> int:
    """Store ``v`` as ``best`` = (codec, delta) against ``base``; the packed file's size."""
    codec, delta = best
    if dry_run:
        return len(pack_header_bytes(codec, base, v.size, v.dtype)) + len(delta)
    return store.pack(v.oid, base, base_data, codec, v.dtype, delta)


def _settle(store: ObjectStore, stay_whole: set[str], report: RepackReport) -> int:
    """Before packing: make whole again what the tips need, and finish packs a crash interrupted; the bytes this saves.

    An object both whole and packed is left by a repack killed between its two
    steps, or by a tip that came back to an old version.
    """
    saved = 0
    for oid in list(store.iter_packed()):
        whole = os.path.isfile(store.object_path(oid))
        packed_size = _size(store.packed_path(oid))
        if oid in stay_whole:
            if not whole:
                if not _can_rebuild(store, oid):
                    continue  # `fmhub fsck` says why
                report.unpacked += 1
                saved -= store.size_of(oid)
            if not report.dry_run:
                store.unpack(oid)
            saved += packed_size
        elif whole:
            try:
                store.check_packed(oid)
            except (CorruptObject, MissingObject, KeyError):
                if not report.dry_run:
                    store.remove_packed(oid)  # a broken leftover: the whole object is the good copy
                saved += packed_size
                continue
            saved += _size(store.object_path(oid))
            if not report.dry_run:
                os.unlink(store.object_path(oid))
            report.packed += 1
    return saved


def _can_rebuild(store: ObjectStore, oid: str) -> bool:
    try:
        store.check_packed(oid)
    except (CorruptObject, MissingObject, KeyError):
        return False
    return True


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _store_bytes(store: ObjectStore) -> int:
    whole = sum(_size(store.object_path(oid)) for oid in store.iter_oids())
    return whole + sum(_size(store.packed_path(oid)) for oid in store.iter_packed())
