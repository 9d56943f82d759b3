"""The adapter cache: the device's adapter pool (active), host memory (warm), disk (cold), each bounded, LRU or LFU.

An adapter moves up the tiers when a request asks for it:

* **disk** (cold): an adapter at a revision is materialized from the fmhub
  store into ``cache_dir/<version>/`` (a work-tree adapter is read where it
  is). Bounded by ``disk_cache_mb``; evicting removes the directory.
* **cpu** (warm): its factors, scaling folded in, in host memory (pinned when
  the device is a GPU, so the copy to a slot is a DMA). Bounded by
  ``cpu_cache_mb``. Loading runs in a loader thread: a request for a cold
  adapter waits while it loads and everyone else keeps decoding.
* **gpu** (active): pages of the `LoraBank`'s pool, sized by a memory budget
  (``adapter_memory_mb``; ``gpu_slots``, when given, also caps how many are
  resident). The engine's scheduler decides who is resident (`DeviceSlots`).

Entries are keyed by name and content version, so a hot swap (a new version
of a name) never changes the weights under a request already decoding.
Eviction skips what is in use: a resident adapter with rows, an entry a request waits for.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from fmhub.base.errors import FmhubError, ServeError
from fmhub.serving.multilora import Factors, LoraBank, Pages, rank_of
from fmhub.serving.sources import AdapterSpec, Source, check_readable, dir_bytes, materialize
from fmhub.base.units import human_bytes

MiB = 1 << 20


@dataclass
class Entry:
    """One version of one adapter and where it is in the tiers."""

    name: str
    version: str
    source: Source
    state: str = "cold"  # cold -> loading -> cpu; or error
    factors: dict[str, Factors] | None = None
    nbytes: int = 0
    error: ServeError | None = None
    uses: int = 0
    last_used: float = 0.0
    waiters: int = 0  # requests queued for it (pins it in the warm tier)
    retired: bool = False  # replaced or removed by a deploy; kept only while requests still use it

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    def touch(self) -> None:
        self.uses += 1
        self.last_used = time.monotonic()


def _victim(candidates: list, policy: str):
    """The entry or slot to evict: least recently used, or least frequently used (then least recent)."""
    if policy == "lfu":
        return min(candidates, key=lambda e: (e.uses, e.last_used))
    return min(candidates, key=lambda e: e.last_used)


class DiskTier:
    """Adapters materialized from the store, as directories named by version, bounded in bytes."""

    def __init__(self, root: str, limit_bytes: int, policy: str) -> None:
        self.root, self.limit, self.policy = root, limit_bytes, policy
        self._lock = threading.Lock()
        self._dirs: dict[str, _DiskItem] = {}
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # a restart finds what an earlier run materialized
            path = os.path.join(root, name)
            if os.path.isdir(path) and not name.startswith("."):
                self._dirs[name] = _DiskItem(name, dir_bytes(path), os.path.getmtime(path))

    def path_for(self, source: Source, version: str, label: str, in_use: set[str]) -> tuple[str, bool]:
        """A directory holding ``source`` (materialized now if needed) and whether it was already there."""
        if source.rev is None:
            return source.path, True
        check_readable(source)  # on a hit too: a directory from an earlier run may be another user's
        with self._lock:
            item = self._dirs.get(version)
            if item is not None:
                item.uses += 1
                item.last_used = time.monotonic()
                return os.path.join(self.root, version), True
        path = materialize(source, os.path.join(self.root, version))
        size = dir_bytes(path)
        if size > self.limit:
            shutil.rmtree(path, ignore_errors=True)
            raise ServeError(507, f"adapter {label} takes {human_bytes(size)} on disk, more than the whole disk cache "
                                  f"({human_bytes(self.limit)}); restart with a larger --disk-cache-mb", "server_error")
        with self._lock:
            self._dirs[version] = _DiskItem(version, size, time.monotonic(), 1)
            while sum(i.size for i in self._dirs.values()) > self.limit:
                victims = [i for i in self._dirs.values() if i.version != version and i.version not in in_use]
                if not victims:
                    break
                v = _victim(victims, self.policy)
                del self._dirs[v.version]
                shutil.rmtree(os.path.join(self.root, v.version), ignore_errors=True)
        return path, False

    def holds(self, version: str) -> bool:
        with self._lock:
            return version in self._dirs

    @property
    def used(self) -> int:
        with self._lock:
            return sum(i.size for i in self._dirs.values())


@dataclass
class _DiskItem:
    version: str
    size: int
    last_used: float
    uses: int = 0


@dataclass(eq=False)
class Slot:
    """One adapter resident on the device: its pages of the pool, how many rows decode with it, since when."""

    index: int  # a serial number, for logs and tests
    entry: Entry | None = None
    pages: Pages | None = None
    rows: int = 0
    since: float = 0.0
    last_used: float = 0.0
    uses: int = 0
    draining: bool = False  # its turn is over: no new rows until it leaves or nobody waits


class DeviceSlots:
    """Which adapters are resident in the bank's pool, which one leaves to make room, and the cycle-time rule.

    An adapter is placed in the pool when a request needs it and there is room
    (pages of the memory budget; and, with ``limit``, fewer than that many
    resident). To make room, resident adapters without rows leave, retired
    ones first, then by eviction order (LRU/LFU), so adapters that keep being
    asked for stay. When the pool is full of adapters with rows and a request
    waits for one that is not resident, the adapter that has been resident
    longest, once it has been for ``cycle_time`` seconds, stops admitting new
    rows: it drains, and leaves when its rows are done. ``cycle_time`` trades
    throughput (large: full batches of few adapters) for latency (small:
    adapters take turns quickly).
    """

    def __init__(self, bank: LoraBank, cycle_time: float, policy: str, limit: int | None = None) -> None:
        self.bank, self.limit = bank, limit
        self.slots: list[Slot] = []
        self._by_entry: dict[int, Slot] = {}  # id(entry) -> its slot: the scheduler asks for every waiting request
        self.cycle_time, self.policy = cycle_time, policy
        self._serial = 0

    def find(self, entry: Entry) -> Slot | None:
        return self._by_entry.get(id(entry))

    def admissible(self, entry: Entry) -> Slot | None:
        s = self.find(entry)
        return s if s is not None and not s.draining else None

    def can_place(self, rank: int, reserved: list[int] = ()) -> bool:
        """Whether an adapter of ``rank`` fits now, counting the room that idle resident adapters would leave, less the
        room ``reserved`` for adapters (their ranks) whose requests came earlier and still wait for it: a large adapter
        waiting for pages to free up keeps them from younger small ones, which would otherwise take each page as it
        frees and starve it."""
        idle = [s for s in self.slots if s.rows == 0]
        if self.limit is not None and len(self.slots) - len(idle) + len(reserved) >= self.limit:
            return False
        return rank + sum(reserved) <= self.bank.free_pages + sum(s.pages.rank for s in idle)

    def place(self, entry: Entry, factors: dict[str, Factors]) -> Slot | None:
        """Make ``entry`` resident, evicting idle adapters as needed; None when it does not fit."""
        rank = rank_of(factors)
        while (self.limit is not None and len(self.slots) >= self.limit) or not self.bank.fits(rank):
            if not self._evict_one():
                return None
        pages = self.bank.load(factors)
        if pages is None:
            return None
        self._serial += 1
        now = time.monotonic()
        slot = Slot(self._serial, entry, pages, since=now, last_used=now)
        self.slots.append(slot)
        self._by_entry[id(entry)] = slot
        return slot

    def _evict_one(self) -> bool:
        idle = [s for s in self.slots if s.rows == 0]
        if not idle:
            return False
        retired = [s for s in idle if s.entry is None or s.entry.retired]
        victim = retired[0] if retired else _victim(idle, self.policy)
        self.slots.remove(victim)
        del self._by_entry[id(victim.entry)]
        self.bank.release(victim.pages)
        return True

    def drain_for(self, ranks: list[int]) -> None:
        """Mark adapters whose turn is over as draining, oldest turn first, until the waiting adapters (their ``ranks``)
        would fit once the draining and idle ones leave: pages for all of them, and with ``limit`` places too."""
        now = time.monotonic()
        leaving = [s for s in self.slots if s.draining or s.rows == 0]
        pages = self.bank.free_pages + sum(s.pages.rank for s in leaving)
        places = len(ranks) if self.limit is None else self.limit - len(self.slots) + len(leaving)
        need = min(sum(ranks), self.bank.capacity)
        busy = sorted((s for s in self.slots if s.rows and not s.draining and now - s.since >= self.cycle_time), key=lambda s: s.since)
        for s in busy:
            if pages >= need and places >= min(len(ranks), self.limit or len(ranks)):
                return
            s.draining = True
            pages += s.pages.rank
            places += 1

    def undrain(self) -> None:
        for s in self.slots:
            s.draining = False


class AdapterCache:
    """The adapters a server knows (name -> current entry) and their warm and cold tiers; see the module doc."""

    def __init__(self, cache_dir: str, cpu_limit_mb: float, disk_limit_mb: float, policy: str,
                 load_factors: Callable[[Entry, str], dict[str, Factors]], on_ready: Callable[[], None],
                 metrics=None, workers: int = 2) -> None:
        self.policy = policy
        self.cpu_limit = int(cpu_limit_mb * MiB)
        self.disk = DiskTier(cache_dir, int(disk_limit_mb * MiB), policy)
        self.current: dict[str, Entry] = {}
        self.entries: dict[str, Entry] = {}  # key -> entry, current and retired-but-in-use
        self._load_factors, self._on_ready, self.metrics = load_factors, on_ready, metrics
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fmhub-adapter-load")
        self.in_use: Callable[[], set[str]] = lambda: set()  # keys on device with rows; set by the engine
        self._largest = 0  # bytes of the largest adapter loaded

    # -- what the server serves -------------------------------------------------------------
    def set_adapters(self, specs: list[AdapterSpec], replace: bool) -> dict[str, list[str]]:
        """Serve ``specs`` (and, with ``replace``, nothing else); returns names added/updated/removed/unchanged."""
        report: dict[str, list[str]] = {"added": [], "updated": [], "removed": [], "unchanged": []}
        fresh = {s.name: (s, s.source.version) for s in specs}
        with self._lock:
            for name, (spec, version) in fresh.items():
                old = self.current.get(name)
                if old is not None and old.version == version:
                    report["unchanged"].append(name)
                    continue
                entry = Entry(name, version, spec.source)
                self.current[name] = self.entries[entry.key] = entry
                report["updated" if old is not None else "added"].append(name)
                if old is not None:
                    self._retire(old)
            if replace:
                for name in [n for n in self.current if n not in fresh]:
                    self._retire(self.current.pop(name))
                    report["removed"].append(name)
        return report

    def _retire(self, entry: Entry) -> None:
        entry.retired = True
        if entry.key not in self.in_use():
            self._drop(entry)

    def _drop(self, entry: Entry) -> None:
        self.entries.pop(entry.key, None)
        entry.factors = None

    def collect(self) -> None:
        """Forget retired entries no request uses any more (called by the engine between steps)."""
        with self._lock:
            used = self.in_use()
            for e in [e for e in self.entries.values() if e.retired and e.key not in used]:
                self._drop(e)

    def get(self, name: str) -> Entry:
        with self._lock:
            entry = self.current.get(name)
        if entry is None:
            known = ", ".join(sorted(self.current)[:10]) or "none"
            raise ServeError(404, f"the model {name!r} does not exist: no adapter of that name is served (served: {known}); "
                                  "see GET /v1/models", "invalid_request_error", "model")
        return entry

    # -- warm tier --------------------------------------------------------------------------
    @property
    def loading(self) -> int:
        return sum(1 for e in self.entries.values() if e.state == "loading")

    def ensure_warm(self, entry: Entry) -> bool:
        """True when ``entry``'s factors are in host memory; else start loading it (once) and return False."""
        with self._lock:
            if entry.state == "cpu":
                return True
            if entry.state in ("loading", "error"):
                return False
            entry.state = "loading"
        self._pool.submit(self._load, entry)
        return False

    def _load(self, entry: Entry) -> None:
        start = time.monotonic()
        try:
            path, hit = self.disk.path_for(entry.source, entry.version, entry.name, self.in_use())
            if self.metrics:
                self.metrics.cache_event("disk", "hit" if hit else "miss")
            factors = self._load_factors(entry, path)
            nbytes = sum(f.nbytes for f in factors.values())
            if nbytes > self.cpu_limit:
                raise ServeError(507, f"adapter {entry.name} needs {human_bytes(nbytes)} of host memory, more than the whole "
                                      f"warm cache ({human_bytes(self.cpu_limit)}); restart with a larger --cpu-cache-mb",
                                 "server_error", "model")
            with self._lock:
                self._largest = max(self._largest, nbytes)
                entry.factors, entry.nbytes, entry.state = factors, nbytes, "cpu"
                self._evict_cpu(keep=entry)
        except ServeError as exc:
            entry.error, entry.state = exc, "error"
        except FmhubError as exc:
            entry.error, entry.state = ServeError(422, str(exc), "invalid_request_error", "model"), "error"
        except Exception as exc:  # noqa: BLE001 - a broken adapter must fail its requests, not the loader
            entry.error, entry.state = ServeError(500, f"adapter {entry.name}: loading failed: {exc.__class__.__name__}: {exc}", "server_error"), "error"
        if self.metrics:
            self.metrics.adapter_load(entry.name, entry.state, time.monotonic() - start)
        self._on_ready()

    def _evict_cpu(self, keep: Entry) -> None:
        while self.warm_bytes > self.cpu_limit:
            warm = [e for e in self.entries.values() if e.state == "cpu" and e is not keep]
            if not warm:
                return
            # the limit holds: entries nobody waits for go first, then (the engine bounds how many it prefetches) the rest
            v = _victim([e for e in warm if e.waiters == 0] or warm, self.policy)
            v.factors, v.state, v.nbytes = None, "cold", 0
            if self.metrics:
                self.metrics.cache_event("cpu", "evict")

    def holds(self) -> int:
        """About how many adapters the warm tier holds, judged by the largest loaded so far (a large number before any)."""
        return max(1, self.cpu_limit // self._largest) if self._largest else 1 << 30

    @property
    def warm_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values() if e.state == "cpu")

    def retry(self, entry: Entry) -> None:
        """Let an adapter that failed to load be tried again (after a deploy fixed it, say)."""
        with self._lock:
            if entry.state == "error":
                entry.state, entry.error = "cold", None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
