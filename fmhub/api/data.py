"""The data commands: ``clean`` (run a pipeline, ``review`` its decisions), ``label`` and ``join`` (`fmhub.data`).

A pipeline run that stops with an error is recorded in the audit log as ``clean-pipeline`` / ``label-pipeline``
with decision ``error`` (finished runs record themselves), whether the CLI or Python called it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from fmhub.base.errors import FmhubError


def _record_failure(what: str, name: Optional[str], exc: FmhubError) -> None:
    """A pipeline run that stopped is a run too: the audit log gets it."""
    from fmhub.governance import audit

    audit.record(what, name or "", "error", audit.failure(exc))


def clean(pipeline: Optional[str] = None, spec: Optional[str] = None, *, backend: Optional[str] = None,
          workers: Optional[int] = None, reports: Sequence[str] = (), overrides: Optional[str] = None,
          progress: Optional[Callable[[int], None]] = None, on_start: Optional[Callable[[int], None]] = None):
    """Run the cleaning pipeline ``pipeline`` of ``spec`` (default: fmhub.yaml at the top of the work tree; the only
    pipeline when None) and write the kept rows; `fmhub.data.clean.pipeline.CleanResult`.

    ``reports``: PATH.json / PATH.html reports to write; ``overrides``: a reviewer's overrides file;
    ``progress(rows)`` and ``on_start(total)`` follow the run. A failure is audited, then raised.
    """
    from fmhub.data.clean import pipeline as cl
    from fmhub.project.spec import load_spec

    try:
        loaded = load_spec(spec)
        return cl.run(loaded, pipeline, backend=backend, workers=workers, reports=list(reports), overrides=overrides,
                      progress=progress, on_start=on_start)
    except FmhubError as exc:
        _record_failure("clean-pipeline", pipeline, exc)
        raise


def clean_review(report: str, keep: Sequence[str] = (), drop: Sequence[str] = (), reason: Optional[str] = None,
                 output: Optional[str] = None) -> tuple[str, int]:
    """Record a reviewer's decisions on a run's JSON report in the overrides file the next run respects.

    ``keep`` / ``drop``: positions or row hashes (an item may hold several, comma-separated). Returns
    (the overrides file, overrides added).
    """
    from fmhub.data.clean.overrides import review

    def split(items: Sequence[str]) -> list[str]:
        return [x for item in items or [] for x in item.split(",") if x.strip()]

    if not keep and not drop:
        raise FmhubError("say which rows: --keep POSITIONS and/or --drop POSITIONS (positions or row hashes from the report)")
    return review(report, split(keep), split(drop), reason, output)


def label(pipeline: Optional[str] = None, spec: Optional[str] = None, *, backend: Optional[str] = None,
          workers: Optional[int] = None, report: Optional[str] = None, suggest: Optional[int] = None,
          progress: Optional[Callable[[str, int, Optional[int]], None]] = None) -> dict[str, Any]:
    """Run the labelling pipeline ``pipeline`` of ``spec``: its labelling functions, the label model, the labels
    written; returns the report (`fmhub.data.label.pipeline.run`). A failure is audited, then raised."""
    from fmhub.data.label import pipeline as labelling
    from fmhub.project.spec import load_spec

    try:
        loaded = load_spec(spec)
        return labelling.run(loaded, pipeline, backend, workers, report, suggest, progress)
    except FmhubError as exc:
        _record_failure("label-pipeline", pipeline, exc)
        raise


def join(name: Optional[str] = None, spec: Optional[str] = None) -> dict[str, Any]:
    """Bring a metadata table's attributes into text rows, as ``join: NAME`` of ``spec`` declares; the report."""
    from fmhub.data import join as jn
    from fmhub.project.spec import load_spec

    return jn.run_join(load_spec(spec), name)
