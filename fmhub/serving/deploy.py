"""``fmhub deploy``: make a running server serve the adapters a revision declares, without a restart.

The declared adapters are the ones recorded with ``fmhub adapter add`` at the
revision (`fmhub.serving.sources.declared_adapters`), or those given. The
backend compares them with what the server holds (by name and content
version) and loads the new, swaps the changed and removes the gone ones;
requests already decoding finish on the version they started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_ANSWER = 16 << 20  # a deploy's answer lists adapter names; the URL may come from a clone's fmhub.yaml

@dataclass
class DeployReport:
    """What a deploy changed on the server, by adapter name."""

    url: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name -> why

    def to_json(self) -> dict:
        return {"url": self.url, "added": self.added, "updated": self.updated, "removed": self.removed,
                "unchanged": self.unchanged, "failed": self.failed}


def push(url: str, adapters: list, token: str | None = None, replace: bool = True, timeout: float = 600.0) -> DeployReport:
    """Send the adapter set to an fmhub server's admin API (``POST /fmhub/adapters``) and report what changed."""
    import json
    import urllib.error
    import urllib.request

    from fmhub.base import boundedjson
    from fmhub.base.errors import FmhubError

    body = json.dumps({"replace": replace, "adapters": [{"name": a.name, "source": a.source.to_json()} for a in adapters]})
    req = urllib.request.Request(url.rstrip("/") + "/fmhub/adapters", data=body.encode(), method="POST",
                                 headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = resp.read(MAX_ANSWER + 1)
    except urllib.error.HTTPError as exc:
        try:
            message = str(boundedjson.loads(exc.read(64 << 10))["error"]["message"])[:500]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise FmhubError(f"{url}: the server refused the deploy ({exc.code}): {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise FmhubError(f"{url}: cannot reach the server ({getattr(exc, 'reason', exc)}); is `fmhub serve` running there?") from None
    try:
        doc = boundedjson.loads(answer) if len(answer) <= MAX_ANSWER else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise FmhubError(f"{url}: the server's answer to the deploy is not an fmhub server's (a JSON object within {MAX_ANSWER >> 20} MiB)")
    return DeployReport(url, doc.get("added", []), doc.get("updated", []), doc.get("removed", []), doc.get("unchanged", []))
