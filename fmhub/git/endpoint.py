"""Where a remote keeps its LFS objects, and how fmhub proves who it is there.

fmhub speaks the standard Git LFS batch API, so it finds the server exactly
as git-lfs does and the same configuration serves both tools:

* URL, first match wins (uploads check the push settings first, as git-lfs does):
  ``lfs.pushurl`` (uploads), ``lfs.url``, ``remote.<name>.lfspushurl`` (uploads),
  ``remote.<name>.lfsurl``, then derived from ``remote.<name>.pushurl``
  (uploads) or ``remote.<name>.url``: ``https://host/path(.git)`` becomes
  ``https://host/path.git/info/lfs``; ssh (``ssh://[user@]host/path``,
  scp-like ``git@host:path``) and ``git://`` become ``https://host/path.git/info/lfs``
  (git-lfs's fallback when no ``git-lfs-authenticate`` is used). A local remote
  (a path or ``file://``) has no server: fmhub already borrows objects from
  local clones' stores, so it is refused unless ``lfs.url`` names a server.
* Authentication, in this order (the first source that yields an
  ``Authorization`` header wins; other headers from step 1 are always sent):
  1. ``http.<url>.extraHeader`` / ``http.extraHeader`` from git config, matched
     against the LFS URL like git matches ``http.<url>.*`` (an empty value
     clears the earlier ones) -- the way CI systems inject tokens;
  2. ``FMHUB_LFS_AUTHORIZATION``: a whole header value (``Bearer <token>``,
     ``Basic <b64>``), for scripts that should not touch git config;
  3. ``HF_TOKEN`` (else the token ``hf auth login`` saved) as ``Bearer`` when
     the host is huggingface.co (or a subdomain) or the host of ``HF_ENDPOINT``
     -- the Hub's usual token;
  4. otherwise ``git credential fill`` (protocol, host, path), asked lazily on
     the first 401 so public servers never trigger a helper, with
     ``GIT_TERMINAL_PROMPT=0`` so it never blocks waiting on a terminal; the
     answer becomes Basic auth and is confirmed with ``git credential approve``
     after a success or dropped with ``git credential reject`` after a 401.

The headers go to the batch API and to transfer URLs on the same origin only:
a presigned URL on another host gets the batch response's own headers.
"""

from __future__ import annotations

import base64
import fnmatch
import os
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from fmhub.base.errors import FmhubError
from fmhub.base.gitrun import GitError, run

CREDENTIAL_TIMEOUT_S = 300.0  # a helper may show a dialog; it must not hang a push forever


@dataclass
class Endpoint:
    """An LFS API base URL and the headers every request to its origin carries.

    ``auth_source`` names where the Authorization header came from, for error
    messages. Credentials from ``git credential`` are fetched lazily, so this
    object is shared (thread-safely) by all transfers of a session.
    """

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    auth_source: str = "none"
    cwd: str | None = None
    username: str | None = None
    _credential: dict[str, str] | None = field(default=None, repr=False)
    _credential_tried: bool = field(default=False, repr=False)
    _approved: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.auth_source == "none" and self.authorization:
            self.auth_source = "the Endpoint's headers"

    @property
    def authorization(self) -> str | None:
        return get_header(self.headers, "Authorization")

    def same_origin(self, href: str) -> bool:
        """Whether ``href`` is on the API's own server, so our credentials may go there."""
        return _origin(href) == _origin(self.url)

    def after_unauthorized(self, sent: str | None) -> bool:
        """React to a 401 for a request sent with Authorization ``sent``; True if retrying can help.

        Another thread may already have fetched new credentials (retry with
        them); git-credential ones are rejected; with no credentials yet, ask
        ``git credential fill`` once. Explicit tokens (config, env) are never
        replaced: a 401 with them is the user's to fix.
        """
        with self._lock:
            if self.authorization != sent:
                return True
            if self._credential is not None:
                _git_credential("reject", self._credential, self.cwd)
                self._credential = None
                _pop_header(self.headers, "Authorization")
                self.auth_source = "git credential (rejected)"
                return False
            if sent is not None or self._credential_tried:
                return False
            self._credential_tried = True
            cred = credential_fill(self.url, self.username, self.cwd)
            if cred is None:
                self.auth_source = "git credential (no credentials returned)"
                return False
            self._credential = cred
            self.headers["Authorization"] = basic_auth(cred["username"], cred["password"])
            self.auth_source = "git credential"
            return True

    def after_success(self) -> None:
        """Tell the credential helper that its credentials worked (once)."""
        with self._lock:
            if self._credential is not None and not self._approved:
                self._approved = True
                _git_credential("approve", self._credential, self.cwd)


def endpoint_for(remote: str = "origin", cwd: str | None = None, operation: str = "download") -> Endpoint:
    """The LFS endpoint of ``remote`` (a remote name, or a URL) with its auth headers; see the module doc."""
    config = git_config(cwd)
    url = _configured_lfs_url(config, remote, operation)
    username = None
    if url is None:
        remote_url = _remote_url(config, remote, operation)
        url = derive_lfs_url(remote_url)
    url, username = _strip_userinfo(url)
    headers, source = auth_headers(url, config)
    return Endpoint(url=url, headers=headers, auth_source=source, cwd=cwd, username=username)


# -- URLs ---------------------------------------------------------------------


def derive_lfs_url(remote_url: str) -> str:
    """git-lfs's default LFS API URL for a git remote URL; local remotes raise FmhubError."""
    url = remote_url.strip()
    if _is_local(url):
        raise FmhubError(
            f"the remote {url} is a local repository: fmhub shares objects with local clones directly "
            "(it borrows their object stores), so there is no LFS server to talk to; "
            "set `git config lfs.url <server>` to use one anyway"
        )
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        return _with_lfs_suffix(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))
    if parts.scheme in ("ssh", "git+ssh", "ssh+git", "git"):
        return _with_lfs_suffix(f"https://{parts.hostname}{parts.path}")
    if "://" not in url:  # scp-like: [user@]host:path
        host, _, path = url.partition(":")
        host = host.rpartition("@")[2]
        return _with_lfs_suffix(f"https://{host}/{path.lstrip('/')}")
    raise FmhubError(f"cannot derive a Git LFS URL from the remote URL {url}; set `git config lfs.url <server>`")


def _with_lfs_suffix(url: str) -> str:
    url = url.rstrip("/")
    if not url.endswith(".git"):
        url += ".git"
    return url + "/info/lfs"


def _is_local(url: str) -> bool:
    if url.startswith("file://"):
        return True
    if "://" in url:
        return False
    head = url.split("/", 1)[0]
    if ":" not in head:
        return True  # a path: /abs, rel/dir, ../x
    return os.path.exists(head) or (len(head) == 2 and head[0].isalpha())  # "dir:with:colons", "C:"


def _strip_userinfo(url: str) -> tuple[str, str | None]:
    """Drop ``user[:password]@`` from a URL (it must not leak into logs); keep the user for credential fill."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0] or None
    return urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment)), user


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


# -- git config ---------------------------------------------------------------


def git_config(cwd: str | None = None) -> list[tuple[str, str]]:
    """All git config entries (``key``, ``value``) in git's order; keys as git prints them."""
    if cwd is not None and not os.path.isdir(cwd):
        raise FmhubError(f"{cwd} is not a directory, so its git config cannot be read")
    listed = run(("config", "-z", "--list"), cwd=cwd, check=False, text=False).stdout
    entries = []
    for item in listed.decode("utf-8", "surrogateescape").split("\0"):
        if item:
            key, _, value = item.partition("\n")
            entries.append((key, value))
    return entries


def _last(config: list[tuple[str, str]], key: str) -> str | None:
    """The effective value of a single-valued key (the last one wins, as in git)."""
    section, _, rest = key.partition(".")
    sub, _, name = rest.rpartition(".")
    want = f"{section.lower()}.{sub}.{name.lower()}" if sub else f"{section.lower()}.{name.lower()}"
    value = None
    for k, v in config:
        if k == want:
            value = v
    return value


def _configured_lfs_url(config: list[tuple[str, str]], remote: str, operation: str) -> str | None:
    keys = ["lfs.pushurl"] if operation == "upload" else []
    keys.append("lfs.url")
    if operation == "upload":
        keys.append(f"remote.{remote}.lfspushurl")
    keys.append(f"remote.{remote}.lfsurl")
    for key in keys:
        if value := _last(config, key):
            return value
    return None


def _remote_url(config: list[tuple[str, str]], remote: str, operation: str) -> str:
    if operation == "upload" and (push := _last(config, f"remote.{remote}.pushurl")):
        return push
    if url := _last(config, f"remote.{remote}.url"):
        return url
    if "://" in remote or ":" in remote.split("/", 1)[0] or os.sep in remote:
        return remote  # a URL or path given directly, as `git lfs push <url>` allows
    raise FmhubError(f"no remote named {remote!r} and no lfs.url configured; add one with `git remote add {remote} <url>`")


# -- auth ---------------------------------------------------------------------


def auth_headers(url: str, config: list[tuple[str, str]]) -> tuple[dict[str, str], str]:
    """Headers for ``url`` and the name of the source of its Authorization header ("none" if none yet)."""
    headers = extra_headers(url, config)
    if get_header(headers, "Authorization"):
        return headers, "http.extraHeader (git config)"
    if value := os.environ.get("FMHUB_LFS_AUTHORIZATION", "").strip():
        headers["Authorization"] = value
        return headers, "FMHUB_LFS_AUTHORIZATION"
    token = _hf_token() if _is_hf_host(url) else None
    if token:
        headers["Authorization"] = f"Bearer {token}"
        return headers, "HF_TOKEN"
    return headers, "none"


def _hf_token() -> str | None:
    """``HF_TOKEN``, else the token `hf auth login` saved (huggingface_hub's lookup, imported only for Hub hosts)."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token
    from huggingface_hub import get_token

    return (get_token() or "").strip() or None


def extra_headers(url: str, config: list[tuple[str, str]]) -> dict[str, str]:
    """``http.extraHeader`` values that apply to ``url``, in config order; an empty value resets the list."""
    lines: list[str] = []
    for key, value in config:
        if not key.startswith("http.") or not key.lower().endswith(".extraheader"):
            continue
        pattern = key[len("http.") : -len(".extraheader")]
        if pattern and not url_matches(pattern, url):
            continue
        if value == "":
            lines.clear()
        else:
            lines.append(value)
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep and name.strip():
            headers[name.strip()] = value.strip()
    return headers


def url_matches(pattern: str, url: str) -> bool:
    """git's ``http.<url>.*`` matching: same scheme, host (``*`` per label), port, and a path prefix."""
    p, u = urlsplit(pattern), urlsplit(url)
    if p.scheme and p.scheme != u.scheme:
        return False
    if p.username and p.username != u.username:
        return False
    p_host, u_host = (p.hostname or "").lower(), (u.hostname or "").lower()
    p_labels, u_labels = p_host.split("."), u_host.split(".")
    if len(p_labels) != len(u_labels) or not all(fnmatch.fnmatchcase(b, a) for a, b in zip(p_labels, u_labels)):
        return False
    if _origin(pattern)[2] != _origin(url)[2]:
        return False
    prefix = p.path.rstrip("/")
    return not prefix or u.path == prefix or u.path.startswith(prefix + "/")


def _is_hf_host(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "huggingface.co" or host.endswith(".huggingface.co"):
        return True
    hf_endpoint = os.environ.get("HF_ENDPOINT", "").strip()
    return bool(hf_endpoint) and (urlsplit(hf_endpoint).hostname or "").lower() == host


def basic_auth(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def credential_fill(url: str, username: str | None = None, cwd: str | None = None) -> dict[str, str] | None:
    """Ask git's credential helpers for ``url``; None when they have nothing (never prompts on a terminal)."""
    parts = urlsplit(url)
    request = {"protocol": parts.scheme, "host": parts.netloc, "path": parts.path.lstrip("/")}
    if username:
        request["username"] = username
    answer = _git_credential("fill", request, cwd)
    if answer is None or not answer.get("username") or "password" not in answer:
        return None
    return answer


def _git_credential(action: str, fields: dict[str, str], cwd: str | None) -> dict[str, str] | None:
    """Run ``git credential <action>``; the fields it prints, or None if it failed."""
    text = "".join(f"{k}={v}\n" for k, v in fields.items()) + "\n"
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    try:
        proc = run(("credential", action), cwd=cwd, check=False, input=text.encode(), text=False, env=env,
                   timeout=CREDENTIAL_TIMEOUT_S)
    except GitError:  # no git, or it waited on a prompt past the timeout
        return None
    if proc.returncode != 0:
        return None
    out = {}
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def get_header(headers: dict[str, str], name: str) -> str | None:
    """A header's value, its name compared case-insensitively (HTTP header names are)."""
    for k, v in headers.items():
        if k.lower() == name.lower():
            return v
    return None


def _pop_header(headers: dict[str, str], name: str) -> None:
    for k in [k for k in headers if k.lower() == name.lower()]:
        del headers[k]
