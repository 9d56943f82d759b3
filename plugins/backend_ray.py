"""Built-in plugin: the ``ray`` data backend (Ray tasks; ``pip install 'fmhub[ray]'``).

Each batch is one Ray task; at most two per worker are in flight and results
come back in input order, like the ``processes`` backend, so a pipeline's
output is byte-identical on either. The first use starts Ray: a local
instance with ``workers`` CPUs (no dashboard, quiet logs), or, when
``RAY_ADDRESS`` is set (``ray://head:10001`` for Ray Client, or the head's
``host:6379``), a connection to that cluster; a program that called
``ray.init(address=...)`` itself keeps its connection. On a cluster every
node needs fmhub and the plugins the pipeline uses installed (or a
``runtime_env``): tasks look their cleaners up through fmhub's plugin host.
Batches travel as unparsed lines (`fmhub.core.rows.LineBatch`) and come back
as encoded rows, so the calling process reads, looks up and writes bytes.
``ray`` is imported only here, on first use, so fmhub starts as fast
without it.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from fmhub import hookimpl
from fmhub.base.errors import PluginError

_remote = None


def _call(fn: Callable[[Any], Any], batch: Any) -> Any:
    return fn(batch)


def _ray(workers: int):
    global _remote
    try:
        import ray
    except ImportError:
        raise PluginError("the ray backend needs Ray: pip install 'fmhub[ray]' (or choose --backend processes)") from None
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        local = {} if address else {"num_cpus": workers}
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
                 configure_logging=True, ignore_reinit_error=True, **local)
    if _remote is None:
        _remote = ray.remote(_call)
    return ray


class Ray:
    name = "ray"

    def map_batches(self, fn: Callable[[Any], Any], batches: Iterable[Any], workers: int) -> Iterator[Any]:
        ray = _ray(workers)
        fn_ref = ray.put(fn)  # sent once, not with every batch
        pending: deque = deque()
        try:
            for batch in batches:
                pending.append(_remote.remote(fn_ref, batch))
                if len(pending) >= 2 * workers:
                    yield _get(ray, pending.popleft())
            while pending:
                yield _get(ray, pending.popleft())
        finally:
            for ref in pending:  # an error or an interrupted run: do not leave tasks running
                ray.cancel(ref, force=True)


def _get(ray, ref) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None  # the pipeline reports the cleaner's own error, not Ray's wrapper
        raise


@hookimpl
def fmhub_data_backends():
    return [Ray()]
