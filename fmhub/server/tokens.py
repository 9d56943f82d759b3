"""Server tokens: stored as sha256 digests, looked up in constant time.

The tokens file (``ROOT/.fmhub/tokens.yaml``, written by ``fmhub server token add``)::

    tokens:
      "sha256:9f86d08...": {user: alice@example.com, repos: [models], admin: [models]}

Only digests are stored: a token is shown once, when it is made. A client
sends it as the password of HTTP Basic (what git's credential helpers
store) or as ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import yaml

from fmhub.base.atomic import atomic_write
from fmhub.base.errors import FmhubError

TOKENS_FILE = os.path.join(".fmhub", "tokens.yaml")
_PREFIX = "sha256:"


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to: the user the policy's roles name, the repositories it reaches, those it administers."""

    user: str
    repos: frozenset[str]
    admin_of: frozenset[str] = frozenset()

    def may_use(self, repo: str) -> bool:
        return repo in self.repos or repo in self.admin_of

    def is_admin_of(self, repo: str) -> bool:
        return repo in self.admin_of


def digest(token: str) -> str:
    return _PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


class Tokens:
    """digest -> Principal."""

    def __init__(self, entries: Mapping[str, Principal]) -> None:
        self._entries = [(k.encode("ascii"), v) for k, v in entries.items()]

    @classmethod
    def load(cls, path: str) -> "Tokens":
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            return cls({})
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise FmhubError(f"{path}: cannot read the tokens file ({getattr(exc, 'strerror', None) or 'not valid YAML'})") from None
        return cls(_parse(data, path))

    def lookup(self, token: Optional[str]) -> Optional[Principal]:
        """The token's principal, or None; every stored digest is compared (no early exit)."""
        if not token:
            return None
        want = digest(token).encode("ascii")
        found = None
        for key, principal in self._entries:
            if hmac.compare_digest(key, want):
                found = principal
        return found


def _parse(data: Any, where: str) -> dict[str, Principal]:
    table = data.get("tokens", {}) if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise FmhubError(f"{where}: expected `tokens:` mapping sha256 digests to {{user, repos, admin}}")
    out = {}
    for key, info in table.items():
        key = str(key)
        if not key.startswith(_PREFIX) or len(key) != len(_PREFIX) + 64:
            raise FmhubError(f"{where}: {key[:12]}…: tokens are stored as their sha256 (`fmhub server token add` writes them)")
        if not isinstance(info, dict) or not isinstance(info.get("user"), str) or not info["user"]:
            raise FmhubError(f"{where}: {key[:16]}…: each token maps to {{user: NAME, repos: [REPO, ...], admin: [REPO, ...]}}")
        repos, admin = info.get("repos", []), info.get("admin", [])
        if not isinstance(repos, list) or not isinstance(admin, list):
            raise FmhubError(f"{where}: {key[:16]}…: `repos` and `admin` are lists of repository names")
        out[key] = Principal(info["user"], frozenset(map(str, repos)), frozenset(map(str, admin)))
    return out


def add_token(root: str, user: str, repos: list[str], admin: list[str]) -> str:
    """Make a new token for ``user``, store its digest in the root's tokens file, return the token (shown once)."""
    path = os.path.join(root, TOKENS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        data = {}
    _parse(data or {"tokens": {}}, path)  # refuse to extend a file that does not parse
    token = "fmh_" + secrets.token_urlsafe(32)
    data.setdefault("tokens", {})[digest(token)] = {"user": user, "repos": sorted(set(repos) | set(admin)), "admin": sorted(set(admin))}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path, "w", chmod=0o600) as f:
        yaml.safe_dump(data, f, sort_keys=True)
    return token


def token_of(authorization: Optional[str]) -> Optional[str]:
    """The token in an Authorization header: ``Bearer TOKEN``, or the password of HTTP Basic."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            _user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return password or None
    return None
