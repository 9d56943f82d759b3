"""The process-wide thread pool that decodes and encodes frames, and hashing on a thread of its own.

Frames of a tensor (`fmhub.core.planes.FRAME_BYTES` each) decode and encode
independently, so every core can work on one (`ordered`); sha256, zlib and
numpy release the GIL while they do. Used by `fmhub.core.tensorio` (chains),
`fmhub.core.lowrank_fixed` (residuals) and `fmhub.core.checkpoint` (hashing
tensors as they are read).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections import deque

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor
    from typing import Callable, Iterable, Iterator

DEPTH_PER_WORKER = 3  # frames in flight per worker: enough to keep every core busy, few enough to bound memory

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def workers() -> int:
    """Threads that decode and encode frames: one per core (at least two, so I/O overlaps with work)."""
    return max(2, os.cpu_count() or 2)


def pool() -> ThreadPoolExecutor:
    """The process-wide frame pool. Frame jobs never wait on other frame jobs, so sharing it cannot deadlock."""
    global _pool
    from concurrent.futures import ThreadPoolExecutor

    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="fmhub-frame")
        return _pool


def ordered(jobs: Iterable[Callable[[], object]], depth: int | None = None) -> Iterator[object]:
    """Run ``jobs`` in the pool, a bounded number at a time, and yield their results in order."""
    depth = depth or DEPTH_PER_WORKER * workers()
    running: deque[Future] = deque()
    try:
        for job in jobs:
            running.append(pool().submit(job))
            if len(running) >= depth:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()
    finally:
        for fut in running:  # the consumer stopped early: do not leave work running on its behalf
            fut.cancel()
        for fut in running:
            if not fut.cancelled():
                try:
                    fut.result()
                except BaseException:
                    pass


class SequentialHash:
    """The sha256 of buffers given in order, computed on a thread of its own (hashlib releases the GIL), so that
    the thread feeding it goes on with other work; a first buffer under ``INLINE`` bytes is hashed in place, as
    starting a thread costs more than hashing it (most of a model's tensors are small)."""

    _END = object()
    INLINE = 1 << 20

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._todo: queue.Queue = queue.Queue(maxsize=2 * DEPTH_PER_WORKER * workers())
        self._thread: threading.Thread | None = None

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        if self._thread is None and view.nbytes < self.INLINE:  # a small tensor's bytes: a thread would cost more
            self._h.update(view)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fmhub-hash", daemon=True)
            self._thread.start()
        self._todo.put(view)

    def _run(self) -> None:
        while (view := self._todo.get()) is not self._END:
            self._h.update(view)

    def hexdigest(self) -> str:
        self.close()
        return self._h.hexdigest()

    def close(self) -> None:
        if self._thread is not None:
            self._todo.put(self._END)
            self._thread.join()
            self._thread = None
