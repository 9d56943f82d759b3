"""Moving tensor objects to and from any Git LFS server through the batch API.

Each tensor object is an ordinary LFS object (sha256-named bytes), so the
standard protocol carries it: ``POST <url>/objects/batch`` says which objects
the server lacks (upload) or where to get them (download), then the "basic"
transfer adapter PUTs or GETs each one at the href the server gave. See
https://github.com/git-lfs/git-lfs/blob/main/docs/api/batch.md.

Objects can be gigabytes, so nothing here holds one in memory: uploads stream
from the object file, downloads stream into a temp file in the store's tmp
dir while hashing, and only a download whose sha256 and size match is
renamed into place. Transfers run on a thread pool (sha256, socket and file
I/O release the GIL); connection errors, 429 and 5xx are retried with
exponential backoff; 401/403 end with a message saying how to authenticate.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import random
import re
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence, TypeVar
from urllib.parse import urlsplit

import urllib3
from dulwich.lfs import LFSPointer

from fmhub.base import boundedjson
from fmhub.base.errors import (
    CorruptDownload,
    CorruptObject,
    MissingObject,
    RemoteAuthError,
    RemoteMissingObject,
    RemoteUnavailable,
    TransferError,
)
from fmhub.git.endpoint import Endpoint, get_header
from fmhub.core.store import IncomingMismatch, IncomingObject, ObjectStore

LFS_JSON = "application/vnd.git-lfs+json"
BATCH_SIZE = 100  # objects per batch request: the limit servers commonly enforce
CHUNK = 1 << 20  # bytes per read/write while streaming an object
MAX_BACKOFF_S = 30.0
EXPIRY_MARGIN_S = 10.0  # re-ask for an href that expires sooner than this
USER_AGENT = "fmhub (git-lfs compatible)"
# Everything a server sends is bounded before it is held: a batch answer for 100 objects takes well under
# 1 MiB, so 16 MiB (counted after decompression: gzip made 600 KB on the wire 600 MiB in memory) is generous.
MAX_BATCH_ANSWER = 16 << 20
MAX_ERROR_BODY = 64 << 10  # bytes of an error body read for its message
MAX_DRAIN = 1 << 20  # an unneeded 2xx body longer than this is not read to reuse the connection: it is closed
BODY_READ = 64 << 10  # raw bytes per read of a bounded body
MAX_SIZE = 1 << 63  # object sizes are below 2^63, as git-lfs's int64
MAX_HREF = 64 << 10  # pre-signed URLs run to a few KiB
MAX_HEADER = 64 << 10  # bytes of one action header's value (tokens run to a few KiB)
MAX_EXPIRES_IN = 10 * 365 * 86400.0  # an href valid longer than 10 years is as good as one that never expires
SHOWN = 80  # characters of a bad value quoted in an error

Obj = tuple[str, int]  # (oid, size)
T = TypeVar("T")


@dataclass(frozen=True)
class Report:
    """What a transfer moved: objects sent or fetched (each after the server said 2xx) and their bytes."""

    count: int = 0
    bytes: int = 0

    def __add__(self, other: "Report") -> "Report":
        return Report(self.count + other.count, self.bytes + other.bytes)


@dataclass
class Action:
    """One step the server asks for: a request to ``href`` with ``header``, valid until ``expires_at``."""

    href: str
    header: dict[str, str] = field(default_factory=dict)
    expires_at: float | None = None  # a time.time() value

    def expired(self) -> bool:
        return self.expires_at is not None and time.time() > self.expires_at - EXPIRY_MARGIN_S


@dataclass
class BatchItem:
    """The server's answer for one object: its actions (none: nothing to do) or an error."""

    oid: str
    size: int
    actions: dict[str, Action] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    authenticated: bool = False


class _Retry(Exception):
    """An attempt failed in a way another attempt may fix."""

    def __init__(self, reason: str, wait: float | None = None, free: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.wait, self.free = reason, wait, free


class Transfer:
    """Uploads and downloads store objects through one LFS endpoint.

    ``concurrency`` objects move at once (git-lfs's default, 8); each request
    is tried ``retries`` more times after a connection error, 429 or 5xx,
    waiting ``backoff`` * 2^n seconds (with jitter, at most 30 s) or what
    Retry-After says. ``progress``: False never shows a bar; otherwise a rich
    progress bar (bytes) appears when stderr is a terminal.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        store: ObjectStore,
        concurrency: int = 8,
        retries: int = 5,
        progress: bool | None = None,
        *,
        backoff: float = 0.5,
        timeout: float = 60.0,
    ) -> None:
        self.endpoint = endpoint
        self.store = store
        self.concurrency = max(1, concurrency)
        self.retries = max(0, retries)
        self.backoff = backoff
        self.progress = progress
        self.http = urllib3.PoolManager(
            num_pools=4,
            maxsize=self.concurrency + 1,
            retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5, raise_on_status=False),
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            blocksize=CHUNK,  # upload bodies go out in 1 MiB reads instead of 16 KiB
        )

    # -- the batch API ----------------------------------------------------------

    def batch(self, operation: str, objects: Sequence[Obj], ref: str | None = None) -> dict[str, BatchItem]:
        """Ask the server about ``objects`` (batches of 100); oid -> its answer.

        An object the server leaves out of its answer is reported as an error
        item, so callers see every oid they asked about.
        """
        answers: dict[str, BatchItem] = {}
        for chunk in _chunks(_unique(objects), BATCH_SIZE):
            answers.update(self._batch_once(operation, chunk, ref))
        return answers

    def _batch_once(self, operation: str, objects: Sequence[Obj], ref: str | None) -> dict[str, BatchItem]:
        body: dict[str, Any] = {
            "operation": operation,
            "transfers": ["basic"],
            "objects": [{"oid": oid, "size": size} for oid, size in objects],
            "hash_algo": "sha256",
        }
        if ref:
            body["ref"] = {"name": ref}
        data = json.dumps(body).encode()
        url = self.endpoint.url.rstrip("/") + "/objects/batch"
        headers = {"Accept": LFS_JSON, "Content-Type": LFS_JSON}

        def attempt() -> Any:
            return self._read_answer(self._request("POST", url, headers, body=data, what="batch request"), len(objects))

        answer = self._retrying(url, attempt)
        return _parse_batch(answer, objects, self.endpoint.url)

    def _read_answer(self, resp: urllib3.BaseHTTPResponse, count: int) -> Any:
        """A batch answer's JSON, read within `MAX_BATCH_ANSWER` (decompressed) and parsed within `boundedjson`'s bounds."""
        complete = False
        try:
            raw, complete = _read_upto(resp, MAX_BATCH_ANSWER)
        except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as exc:
            raise _Retry(f"the batch answer was cut off: {_reason(exc)}") from None
        except _BadBody as exc:
            raise _malformed(self.endpoint.url, str(exc)) from None
        finally:
            _finish(resp, complete)
        if not complete:
            raise TransferError(
                f"the LFS server at {self.endpoint.url} sent a batch answer of more than {MAX_BATCH_ANSWER >> 20} MiB "
                f"(one for {count} objects takes a few KiB); refused, nothing was transferred"
            )
        try:
            return boundedjson.loads(raw)  # json.loads: 200,000 nested [ raised RecursionError
        except boundedjson.JSONLimitError as exc:
            raise _malformed(self.endpoint.url, str(exc)) from None

    def missing_on_server(self, objects: Sequence[Obj], ref: str | None = None) -> list[Obj]:
        """The objects the server asks us to upload (it lacks them), in the order given."""
        answers = self.batch("upload", objects, ref)
        _raise_item_errors(answers.values(), "upload", self.endpoint.url)
        return [(oid, answers[oid].size) for oid, _ in _unique(objects) if "upload" in answers[oid].actions]

    # -- upload -----------------------------------------------------------------

    def upload(self, objects: Sequence[Obj], ref: str | None = None) -> Report:
        """Send the objects the server lacks; each counts once the server (and its verify step) said 2xx."""
        self.store.flush()  # objects written in the background must be on disk before we stat and stream them
        total = Report()
        with self._progress("upload") as bar:
            for chunk in _chunks(_unique(objects), BATCH_SIZE):
                answers = self._batch_once("upload", chunk, ref)
                _raise_item_errors(answers.values(), "upload", self.endpoint.url)
                todo = [answers[oid] for oid, _ in chunk if "upload" in answers[oid].actions]
                for item in todo:
                    self._check_local(item)
                bar.add_total(sum(item.size for item in todo))
                total += self._run_all(lambda item: self._upload_one(item, ref, bar), todo)
        return total

    def _check_local(self, item: BatchItem) -> None:
        """Refuse before sending anything when an object is missing or its size is not the one announced."""
        if not self.store.ensure(item.oid):
            raise MissingObject(f"object sha256:{item.oid} is not in {self.store.path}, so it cannot be uploaded; run `fmhub fsck`")
        size = self.store.size_of(item.oid)
        if size != item.size:
            raise CorruptObject(f"object sha256:{item.oid} in {self.store.path} has {size} bytes, not {item.size}; run `fmhub fsck`")

    def _upload_one(self, item: BatchItem, ref: str | None, bar: "_Bar") -> int | None:
        """Bytes sent for one object (after PUT and verify said 2xx); None if the server turned out to have it."""
        fresh = self._fresh(item, "upload", ref)
        if fresh is None:
            bar.advance(item.size)
            return None
        item = fresh
        action = item.actions["upload"]

        def attempt() -> None:
            with self.store.open_object(item.oid, buffering=0) as f:  # a packed object (`fmhub repack`) is rebuilt
                body = _HashingReader(f, bar)
                headers = _merge_headers({"Content-Type": "application/octet-stream"}, action.header,
                                         {"Content-Length": str(item.size)})
                try:
                    resp = self._request("PUT", action.href, headers, body=body, authenticated=item.authenticated,
                                         what=f"upload of sha256:{item.oid}")
                except BaseException:
                    bar.advance(-body.count)
                    raise
                _finish(resp, True)
                if body.count != item.size or body.hexdigest() != item.oid:
                    raise CorruptObject(
                        f"object sha256:{item.oid} in {self.store.path} changed or is corrupt (its bytes hash differently); "
                        f"the server at {self.endpoint.url} may now hold bad bytes under that name; run `fmhub fsck`"
                    )

        self._retrying(action.href, attempt)
        if "verify" in item.actions:
            self._verify(item)
        return item.size

    def _verify(self, item: BatchItem) -> None:
        action = item.actions["verify"]
        data = json.dumps({"oid": item.oid, "size": item.size}).encode()
        headers = _merge_headers({"Accept": LFS_JSON, "Content-Type": LFS_JSON}, action.header)

        def attempt() -> None:
            resp = self._request("POST", action.href, headers, body=data, authenticated=item.authenticated,
                                 what=f"verify of sha256:{item.oid}")
            _finish(resp, True)

        self._retrying(action.href, attempt)

    # -- download ---------------------------------------------------------------

    def download(self, objects: Sequence[Obj], ref: str | None = None) -> Report:
        """Fetch the objects the store lacks; each is verified (sha256 and size) before it becomes visible."""
        wanted = [(oid, size) for oid, size in _unique(objects) if not self.store.ensure(oid)]
        total = Report()
        with self._progress("download") as bar:
            bar.add_total(sum(size for _, size in wanted))
            for chunk in _chunks(wanted, BATCH_SIZE):
                answers = self._batch_once("download", chunk, ref)
                _raise_item_errors(answers.values(), "download", self.endpoint.url)
                for item in answers.values():
                    if "download" not in item.actions:
                        raise TransferError(f"the LFS server at {self.endpoint.url} gave no download action for sha256:{item.oid}")
                total += self._run_all(lambda item: self._download_one(item, ref, bar), list(answers.values()))
        return total

    def _download_one(self, item: BatchItem, ref: str | None, bar: "_Bar") -> int:
        """Bytes fetched for one object, published only after its sha256 and size checked out."""
        fresh = self._fresh(item, "download", ref)
        if fresh is None:
            raise TransferError(f"the LFS server at {self.endpoint.url} gave no download action for sha256:{item.oid}")
        action = fresh.actions["download"]
        item = fresh

        def attempt() -> None:
            resp = self._request("GET", action.href, _merge_headers({"Accept": "application/octet-stream"}, action.header),
                                 authenticated=item.authenticated, what=f"download of sha256:{item.oid}")
            ok = False
            try:
                self._receive(resp, item, action.href, bar)
                ok = True
            finally:
                _finish(resp, ok)

        self._retrying(action.href, attempt)
        return item.size

    def _receive(self, resp: urllib3.BaseHTTPResponse, item: BatchItem, href: str, bar: "_Bar") -> None:
        """Stream a response body into the store; a cut-off stream is retried, wrong bytes are refused."""
        incoming = IncomingObject(self.store, item.oid, item.size)
        try:
            try:
                for chunk in _body_pieces(resp):
                    incoming.write(chunk)  # refuses the first byte past the size asked for
                    bar.advance(len(chunk))
            except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as exc:
                bar.advance(-incoming.size)
                raise _Retry(f"the download was cut off: {_reason(exc)}") from None
            incoming.publish()
        except (IncomingMismatch, _BadBody) as exc:
            raise CorruptDownload(f"refused object sha256:{item.oid} from {href}: {exc}; it was discarded, nothing was stored") from None
        finally:
            incoming.discard()

    # -- requests, retries ------------------------------------------------------

    def _request(
        self, method: str, url: str, headers: dict[str, str], *, body: bytes | BinaryIO | None = None,
        authenticated: bool = False, what: str = "request",
    ) -> urllib3.BaseHTTPResponse:
        """One HTTP exchange; a 2xx response (body unread), or _Retry / an FmhubError."""
        sent = self._headers(url, headers, authenticated)
        try:
            resp = self.http.request(method, url, headers=sent, body=body, preload_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _Retry(_reason(exc)) from None
        if 200 <= resp.status < 300:
            if self.endpoint.same_origin(url):
                self.endpoint.after_success()
            return resp
        message = _error_message(resp)
        status = resp.status
        _finish(resp, False)
        if status in (429,) or status >= 500:
            raise _Retry(f"HTTP {status}{message}", wait=_retry_after(resp.headers.get("Retry-After")))
        if status == 401 and self.endpoint.same_origin(url) and not authenticated:
            if self.endpoint.after_unauthorized(get_header(sent, "Authorization")):
                raise _Retry("new credentials", free=True)
        if status in (401, 403):
            raise RemoteAuthError(self._auth_message(status, url, what, message))
        if status == 404 and what == "batch request":
            raise TransferError(f"no Git LFS API at {self.endpoint.url} (HTTP 404{message}); check `git config lfs.url`")
        raise TransferError(f"the LFS server refused the {what} at {url}: HTTP {status}{message}")

    def _headers(self, url: str, headers: dict[str, str], authenticated: bool) -> dict[str, str]:
        """Endpoint headers go only to the endpoint's own origin, and not when the server pre-authenticated the href."""
        layers = [{"User-Agent": USER_AGENT}]
        if self.endpoint.same_origin(url) and not (authenticated and get_header(headers, "Authorization")):
            layers.append(self.endpoint.headers)
        layers.append(headers)
        return _merge_headers(*layers)

    def _auth_message(self, status: int, url: str, what: str, message: str) -> str:
        word = "refused our credentials" if status == 401 else "denied access"
        return (
            f"the LFS server {word} (HTTP {status}{message}) for the {what} at {url}; "
            f"credentials tried: {self.endpoint.auth_source}; set a token with "
            f"`export FMHUB_LFS_AUTHORIZATION='Bearer <token>'` (HF_TOKEN for huggingface.co), "
            f"`git config http.{self.endpoint.url}.extraHeader 'Authorization: Bearer <token>'`, "
            "or store a password with a git credential helper"
        )

    def _retrying(self, url: str, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` until it succeeds, retrying _Retry failures with backoff."""
        failures = 0
        while True:
            try:
                return attempt()
            except _Retry as r:
                if r.free:
                    continue
                failures += 1
                if failures > self.retries:
                    raise RemoteUnavailable(
                        f"cannot reach the LFS server at {url}: {r.reason} (gave up after {failures} attempts); "
                        "check that the server is up and that `git config lfs.url` (or the remote URL) points at it"
                    ) from None
                time.sleep(r.wait if r.wait is not None else self._backoff_s(failures))

    def _backoff_s(self, failures: int) -> float:
        return min(MAX_BACKOFF_S, self.backoff * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)

    def _fresh(self, item: BatchItem, operation: str, ref: str | None) -> BatchItem | None:
        """The item itself, or a new answer for it when its href expired while it waited in the queue.

        None when the new answer has no action for ``operation`` (say, another client uploaded it meanwhile).
        """
        if not any(action.expired() for action in item.actions.values()):
            return item
        fresh = self._batch_once(operation, [(item.oid, item.size)], ref)[item.oid]
        _raise_item_errors([fresh], operation, self.endpoint.url)
        return fresh if operation in fresh.actions else None

    def _run_all(self, fn: Callable[[BatchItem], int | None], items: list[BatchItem]) -> Report:
        """Run ``fn`` over items on the pool (None: nothing moved); on the first error cancel what has not started and raise it."""
        if not items:
            return Report()
        report, error = Report(), None
        with ThreadPoolExecutor(min(self.concurrency, len(items)), thread_name_prefix="fmhub-lfs") as pool:
            futures = [pool.submit(fn, item) for item in items]
            for fut in as_completed(futures):
                if fut.cancelled():
                    continue
                try:
                    moved = fut.result()
                    if moved is not None:
                        report += Report(1, moved)
                except BaseException as exc:
                    if error is None:
                        error = exc
                        for other in futures:
                            other.cancel()
        if error is not None:
            raise error
        return report

    def _progress(self, operation: str) -> "_Bar":
        show = self.progress is not False and sys.stderr.isatty()
        return _Bar(f"{operation} {self.endpoint.url}" if show else None)

    def close(self) -> None:
        self.http.clear()

    def __enter__(self) -> "Transfer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- streaming helpers ----------------------------------------------------------


class _HashingReader:
    """A file wrapper for urllib3's upload loop: counts and hashes what is sent, and feeds the progress bar."""

    def __init__(self, f: BinaryIO, bar: "_Bar") -> None:
        self._f, self._bar = f, bar
        self._hash = hashlib.sha256()
        self.count = 0

    def read(self, n: int = CHUNK) -> bytes:
        data = self._f.read(min(n, CHUNK) if n and n > 0 else CHUNK)
        if data:
            self._hash.update(data)
            self.count += len(data)
            self._bar.advance(len(data))
        return data

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class _Bar:
    """A rich byte progress bar on stderr, or nothing when ``title`` is None."""

    def __init__(self, title: str | None) -> None:
        self._title = title
        self._progress = None
        self._task = None
        self._lock = threading.Lock()

    def __enter__(self) -> "_Bar":
        if self._title is not None:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                console=Console(stderr=True), transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self._title, total=0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def add_total(self, n: int) -> None:
        if self._progress is not None:
            with self._lock:
                total = self._progress.tasks[0].total or 0
                self._progress.update(self._task, total=total + n)

    def advance(self, n: int) -> None:
        if self._progress is not None and n:
            self._progress.advance(self._task, n)


# -- parsing --------------------------------------------------------------------
# A batch answer is untrusted: every field is checked for type and range, and anything off ends in one
# TransferError naming it (int("lots"), [].items() and float("inf") sizes used to end in tracebacks).

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_HEADER_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters (a tab is allowed)
_OID = re.compile(r"[0-9a-f]{64}")
_URL_BAD = re.compile(r"[\x00-\x20\x7f]")  # urllib3 would refuse them, or send them on as another header


class _Malformed(Exception):
    """A field of a batch answer that is not what the batch API says; the message names it."""


def _malformed(url: str, reason: str) -> TransferError:
    return TransferError(f"the LFS server at {url} sent a malformed batch answer ({reason})")


def _parse_batch(answer: Any, asked: Sequence[Obj], url: str) -> dict[str, BatchItem]:
    """Per-object actions and errors from a batch answer; objects it does not mention become errors.

    Only TransferError escapes, whatever JSON value ``answer`` is.
    """
    try:
        received = _parse_answer(answer, time.time(), url)
    except _Malformed as exc:
        raise _malformed(url, str(exc)) from None
    out = {}
    for oid, size in asked:  # the size asked about is the one verified against, whatever the server echoes
        item = received.get(oid) or BatchItem(oid, size, error={"code": 0, "message": "missing from the server's answer"})
        item.size = size
        out[oid] = item
    return out


def _parse_answer(answer: Any, now: float, url: str) -> dict[str, BatchItem]:
    if not isinstance(answer, dict):
        raise _Malformed(f"{_kind(answer)}, not an object")
    transfer = _field(answer, "transfer", str, "the answer") or "basic"
    if transfer != "basic":
        raise TransferError(f"the LFS server at {url} chose the {_show(transfer)} transfer; fmhub speaks only 'basic'")
    algo = _field(answer, "hash_algo", str, "the answer")
    if algo not in (None, "sha256"):
        raise TransferError(f"the LFS server at {url} names objects by {_show(algo)}; fmhub speaks only sha256")
    received = {}
    for i, obj in enumerate(_field(answer, "objects", list, "the answer") or []):
        if not isinstance(obj, dict):
            raise _Malformed(f"objects[{i}] is {_kind(obj)}, not an object")
        oid = obj.get("oid")
        if not isinstance(oid, str):
            raise _Malformed(f"objects[{i}].oid is {_kind(oid)}, not a string")
        received[oid] = _parse_item(obj, oid, now)
    return received


def _parse_item(obj: dict[str, Any], oid: str, now: float) -> BatchItem:
    where = f"sha256:{oid}" if _OID.fullmatch(oid) else f"the object {_show(oid)}"
    size = _field(obj, "size", int, where)
    if size is not None and not 0 <= size < MAX_SIZE:
        raise _Malformed(f"{where}: size {_show(size)} is out of range")
    actions = _field(obj, "actions", dict, where) or {}
    return BatchItem(
        oid, size or 0, {name: _parse_action(raw, f"{where} {_show(name)} action", now) for name, raw in actions.items()},
        _parse_error(obj.get("error"), f"{where} error"), bool(_field(obj, "authenticated", bool, where)),
    )


def _parse_action(raw: Any, where: str, now: float) -> Action:
    if not isinstance(raw, dict):
        raise _Malformed(f"{where} is {_kind(raw)}, not an object")
    return Action(_href(raw.get("href"), where), _header(raw, where), _expiry(raw, now, where))


def _href(href: Any, where: str) -> str:
    """An absolute http(s) URL that urllib3 can send as is (no spaces or control characters, a valid port)."""
    if not isinstance(href, str):
        raise _Malformed(f"{where} has an href that is {_kind(href)}, not a string")
    try:
        parts = urlsplit(href)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number below 65536
    except ValueError:
        parts = None
    if (len(href) > MAX_HREF or _URL_BAD.search(href) or parts is None or parts.scheme not in ("http", "https")
            or not parts.hostname):
        raise _Malformed(f"{where} has an invalid href {_show(href)}")
    return href


def _header(raw: dict[str, Any], where: str) -> dict[str, str]:
    """The action's headers: names that are HTTP tokens, values without control characters (no header injection)."""
    header = _field(raw, "header", dict, where) or {}
    for name, value in header.items():
        if not isinstance(value, str):
            raise _Malformed(f"{where} has header {_show(name)} that is {_kind(value)}, not a string")
        if not _HEADER_NAME.fullmatch(name) or len(value) > MAX_HEADER or _HEADER_VALUE_BAD.search(value):
            raise _Malformed(f"{where} has an invalid header {_show(name)}")
    return dict(header)


def _expiry(action: dict[str, Any], now: float, where: str) -> float | None:
    """When the href stops working (a time.time() value), or None when the server does not say."""
    expires_in = _field(action, "expires_in", float, where)
    if expires_in is not None:
        if isinstance(expires_in, float) and not math.isfinite(expires_in):
            raise _Malformed(f"{where} has expires_in {_show(expires_in)}")
        if expires_in > 0:  # compared before float(): an integer of 400 digits does not fit one
            return now + float(min(expires_in, MAX_EXPIRES_IN))
    at = _field(action, "expires_at", str, where)
    if at and not at.startswith("0001-01-01"):  # Go's zero time: no expiry
        try:
            return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError, OSError):
            return None  # RFC 3339 that Python does not parse (nanoseconds): as if the server did not say
    return None


def _parse_error(error: Any, where: str) -> dict[str, Any] | None:
    """An object's error as {"code": int | None, "message": one line}, or None when it has none."""
    if error is None:
        return None
    if not isinstance(error, dict):
        raise _Malformed(f"{where} is {_kind(error)}, not an object")
    return {"code": _field(error, "code", int, where), "message": _one_line(_field(error, "message", str, where) or "", MESSAGE_CHARS)}


def _field(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """``obj[key]`` if it has type ``kind`` (float: any number; true/false is no number), None if absent or null."""
    value = obj.get(key)
    if value is None:
        return None
    ok = (isinstance(value, (int, float)) if kind is float else isinstance(value, kind)) and (
        kind is bool or not isinstance(value, bool))
    if not ok:
        raise _Malformed(f"{where}: {key} is {_kind(value)}, not {_kind(kind())}")
    return value


def _kind(value: Any) -> str:
    """What a JSON value is, in words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    for kind, word in ((int, "an integer"), (float, "a number"), (str, "a string"), (list, "a list"), (dict, "an object")):
        if isinstance(value, kind):
            return word
    return type(value).__name__


def _show(value: Any) -> str:
    """A value from a server, quoted short and on one line for an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"<an integer of {value.bit_length()} bits>"  # str() of one over 4,300 digits raises ValueError
    return _one_line(repr(value[: SHOWN * 2] if isinstance(value, str) else value), SHOWN)


MESSAGE_CHARS = 1000  # a server's error message: room for a policy's reason and advice, not for a flood


def _one_line(text: str, limit: int = 200) -> str:
    """Server text as one printable line of at most ``limit`` characters (no newlines or terminal escapes)."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text[: limit * 4]).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _raise_item_errors(items: Iterable[BatchItem], operation: str, url: str) -> None:
    """Per-object errors as one message naming the objects (a 404 on download means the server lacks them)."""
    bad = [item for item in items if item.error is not None]
    if not bad:
        return
    first = bad[0]
    detail = f"sha256:{first.oid}: {first.error.get('message', '')} (code {first.error.get('code')})"
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    if operation == "download" and all(item.error.get("code") == 404 for item in bad):
        raise RemoteMissingObject(f"the LFS server at {url} does not have {detail}{more}; push them from a clone that has them")
    raise TransferError(f"the LFS server at {url} refused to {operation} {detail}{more}")


def _error_message(resp: urllib3.BaseHTTPResponse) -> str:
    """The server's explanation of an error status (LFS JSON ``message``, or a short text body), on one line."""
    try:
        raw, _ = _read_upto(resp, MAX_ERROR_BODY)
    except Exception:  # an unreadable explanation must not hide the status it explains
        return ""
    try:
        doc = boundedjson.loads(raw)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        message = doc.get("message") if isinstance(doc.get("message"), str) else ""
    else:
        message = raw.decode("utf-8", "replace").strip().split("\n", 1)[0]
    message = _one_line(message, MESSAGE_CHARS)
    return f": {message}" if message else ""


class _BadBody(Exception):
    """A body that cannot be decoded (an unknown or corrupt Content-Encoding); the message says how."""


def _read_upto(resp: urllib3.BaseHTTPResponse, limit: int) -> tuple[bytearray, bool]:
    """(the body, True), or (its first ``limit`` bytes, False) when it has more; decompressed per Content-Encoding.

    urllib3 inflates gzip when asked to read a whole body (600 KB on the wire became 600 MiB), so the body is
    taken a small piece at a time (`_body_pieces`) and reading stops one piece past the limit.
    """
    out = bytearray()
    for piece in _body_pieces(resp, BODY_READ):
        out += piece
        if len(out) > limit:
            del out[limit:]  # in place: no second copy of a body being refused
            return out, False
    return out, True


def _body_pieces(resp: urllib3.BaseHTTPResponse, size: int = CHUNK) -> Iterator[bytes]:
    """A body in pieces of at most ``size`` bytes, decompressed per Content-Encoding, however well it compresses.

    Raw bytes are read with urllib3's decoding off and inflated here with a cap on each step's output: before
    2.6, urllib3's read(n) and stream(n) inflated a whole compressed read at once (1 MiB of gzip, 1 GiB).
    """
    inflate = _decompressor(resp.headers.get("Content-Encoding"))
    while raw := resp.read(size, decode_content=False):
        if inflate is None:
            yield raw
            continue
        if inflate.eof:  # zlib would keep what follows the end in memory, as much as the server sends
            raise _BadBody("data after the end of the compressed body")
        while True:
            piece = _inflate(inflate, raw, size)
            if piece:
                yield piece
            raw = inflate.unconsumed_tail  # what the cap held back
            if not raw and len(piece) < size:  # a full piece may leave output inside zlib: ask once more
                break
    if inflate is not None and not inflate.eof:
        raise _BadBody("a compressed body cut off before its end")


def _decompressor(encoding: str | None) -> "zlib._Decompress | None":
    name = (encoding or "").strip().lower()
    if name in ("", "identity"):
        return None
    if name in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if name == "deflate":
        return zlib.decompressobj(32 + zlib.MAX_WBITS)  # HTTP's deflate is zlib-wrapped; 32: a gzip header too
    raise _BadBody(f"Content-Encoding {_show(name)}, which fmhub does not accept")


def _inflate(inflate: "zlib._Decompress", chunk: bytes, room: int) -> bytes:
    try:
        return inflate.decompress(chunk, room)
    except zlib.error as exc:
        raise _BadBody(f"corrupt compressed data: {exc}") from None


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), capped."""
    if not value:
        return None
    try:
        return min(MAX_BACKOFF_S * 4, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        return min(MAX_BACKOFF_S * 4, max(0.0, parsedate_to_datetime(value).timestamp() - datetime.now(timezone.utc).timestamp()))
    except (TypeError, ValueError):
        return None


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    text = str(reason)
    if "Connection refused" in text or isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    return text.split(": ", 1)[-1] if text.startswith("<") else text


def _finish(resp: urllib3.BaseHTTPResponse, complete: bool) -> None:
    """Give the connection back to the pool: drained when the exchange completed, closed when it broke off.

    Draining reads at most `MAX_DRAIN` bytes (urllib3's drain_conn read the whole rest into memory, whatever
    its size); a longer body closes the connection instead.
    """
    try:
        if not (complete and _drained(resp)):
            resp.close()
    finally:
        resp.release_conn()


def _drained(resp: urllib3.BaseHTTPResponse) -> bool:
    left = MAX_DRAIN
    try:
        while chunk := resp.read(BODY_READ, decode_content=False):
            left -= len(chunk)
            if left < 0:
                return False
    except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException):
        return False
    return True


def _merge_headers(*layers: dict[str, str]) -> dict[str, str]:
    """Later layers win, names compared case-insensitively (no request carries two Authorization headers)."""
    out: dict[str, str] = {}
    for layer in layers:
        for name, value in layer.items():
            for old in [k for k in out if k.lower() == name.lower()]:
                del out[old]
            out[name] = value
    return out




def _unique(objects: Iterable[Obj]) -> list[Obj]:
    seen: dict[str, int] = {}
    for oid, size in objects:
        if not LFSPointer(oid, size).is_valid_oid():
            raise TransferError(f"{oid!r} is not a sha256 object id")
        seen.setdefault(oid, int(size))
    return list(seen.items())


def _chunks(items: Sequence[T], n: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
