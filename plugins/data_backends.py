"""Built-in plugin: the local data backends, ``serial`` and ``processes``.

``processes`` keeps at most two batches per worker in flight, so reading a
large dataset never runs ahead of the workers (``Pool.imap`` would read the
whole input into its task queue). Workers are started with ``spawn``: the
calling process may hold threads (torch, tokenizers) that ``fork`` would copy
in a locked state. The function is sent to each worker once, when it
starts, not with every batch (a pipeline's function carries its whole
configuration, overrides included).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from fmhub import hookimpl


class Serial:
    name = "serial"

    def map_batches(self, fn: Callable[[Any], Any], batches: Iterable[Any], workers: int) -> Iterator[Any]:
        for batch in batches:
            yield fn(batch)


_installed: Callable[[Any], Any] | None = None


def _install(fn: Callable[[Any], Any]) -> None:
    global _installed
    _installed = fn


def _call_installed(batch: Any) -> Any:
    return _installed(batch)


class Processes:
    name = "processes"

    def map_batches(self, fn: Callable[[Any], Any], batches: Iterable[Any], workers: int) -> Iterator[Any]:
        if workers <= 1:
            yield from Serial().map_batches(fn, batches, workers)
            return
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_install, initargs=(fn,)) as pool:
            pending: deque = deque()
            for batch in batches:
                pending.append(pool.apply_async(_call_installed, (batch,)))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()


@hookimpl
def fmhub_data_backends():
    return [Serial(), Processes()]
