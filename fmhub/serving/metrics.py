"""Prometheus metrics of a server, in the text exposition format (``GET /metrics``).

Counters, gauges and histograms with labels, kept in memory behind one lock;
``render()`` writes them as Prometheus 0.0.4 text. The names are documented in
docs/serving.md.
"""

from __future__ import annotations

import bisect
import threading
from typing import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = {}
        self._hist: dict[str, dict[tuple, list]] = {}
        self._help: dict[str, tuple[str, str]] = {}
        self._gauges: dict[str, Callable[[], dict[tuple, float]]] = {}

    def _declare(self, name: str, kind: str, help_: str) -> None:
        self._help.setdefault(name, (kind, help_))

    def inc(self, name: str, help_: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._declare(name, "counter", help_)
            series = self._counters.setdefault(name, {})
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, help_: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._declare(name, "histogram", help_)
            series = self._hist.setdefault(name, {})
            h = series.get(key)
            if h is None:
                h = series[key] = [[0] * len(LATENCY_BUCKETS), 0.0, 0]
            i = bisect.bisect_left(LATENCY_BUCKETS, value)
            if i < len(LATENCY_BUCKETS):
                h[0][i] += 1
            h[1] += value
            h[2] += 1

    def gauge(self, name: str, help_: str, read: Callable[[], dict[tuple, float]]) -> None:
        """A gauge read when rendered: ``read()`` returns {label items tuple: value}."""
        with self._lock:
            self._declare(name, "gauge", help_)
            self._gauges[name] = read

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    # the events the engine and cache report
    def cache_event(self, tier: str, event: str) -> None:
        self.inc("fmhub_adapter_cache_events_total", "Adapter cache hits, misses and evictions by tier.", tier=tier, event=event)

    def adapter_load(self, adapter: str, state: str, seconds: float) -> None:
        self.inc("fmhub_adapter_loads_total", "Adapter loads into host memory, by result.", adapter=adapter,
                 result="ok" if state == "cpu" else "error")
        self.observe("fmhub_adapter_load_seconds", "Time to load an adapter into host memory.", seconds)

    def render(self) -> str:
        with self._lock:
            counters = {n: dict(s) for n, s in self._counters.items()}
            hists = {n: {k: [list(h[0]), h[1], h[2]] for k, h in s.items()} for n, s in self._hist.items()}
            gauges = dict(self._gauges)
            helps = dict(self._help)
        out: list[str] = []
        for name in sorted(helps):
            kind, help_ = helps[name]
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            if kind == "counter":
                for key, v in sorted(counters.get(name, {}).items()):
                    out.append(f"{name}{_labels(dict(key))} {v:g}")
            elif kind == "gauge":
                for key, v in sorted(gauges[name]().items()):
                    out.append(f"{name}{_labels(dict(key))} {v:g}")
            else:
                for key, (buckets, total, count) in sorted(hists.get(name, {}).items()):
                    labels, cum = dict(key), 0
                    for bound, n in zip(LATENCY_BUCKETS, buckets):
                        cum += n
                        out.append(f"{name}_bucket{_labels({**labels, 'le': f'{bound:g}'})} {cum}")
                    out.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {count}")
                    out.append(f"{name}_sum{_labels(labels)} {total:g}")
                    out.append(f"{name}_count{_labels(labels)} {count}")
        return "\n".join(out) + "\n"
