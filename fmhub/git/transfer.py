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
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence, TypeVar

import urllib3
from dulwich.lfs import LFSPointer

from fmhub.base import boundedjson
from fmhub.base.errors import (
    CorruptDownload,
    CorruptObject,
    MissingObject,
    RemoteAuthError,
    RemoteUnavailable,
    TransferError,
)
from fmhub.core.storewrite import IncomingMismatch, IncomingObject
from fmhub.git.endpoint import Endpoint, get_header
from fmhub.git.lfsbatch import LFS_JSON, BatchItem, Obj, malformed, parse_batch, raise_item_errors
from fmhub.git.lfshttp import (
    CHUNK,
    BadBody,
    body_pieces,
    error_message,
    finish,
    merge_headers,
    read_upto,
    reason,
    retry_after,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from fmhub.core.store import ObjectStore

BATCH_SIZE = 100  # objects per batch request: the limit servers commonly enforce
MAX_BACKOFF_S = 30.0
USER_AGENT = "fmhub (git-lfs compatible)"
# Everything a server sends is bounded before it is held: a batch answer for 100 objects takes well under
# 1 MiB, so 16 MiB (counted after decompression: gzip made 600 KB on the wire 600 MiB in memory) is generous.
MAX_BATCH_ANSWER = 16 << 20

T = TypeVar("T")


@dataclass(frozen=True)
class Report:
    """What a transfer moved: objects sent or fetched (each after the server said 2xx) and their bytes."""

    count: int = 0
    bytes: int = 0

    def __add__(self, other: "Report") -> "Report":
        return Report(self.count + other.count, self.bytes + other.bytes)


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
        return parse_batch(answer, objects, self.endpoint.url)

    def _read_answer(self, resp: urllib3.BaseHTTPResponse, count: int) -> Any:
        """A batch answer's JSON, read within `MAX_BATCH_ANSWER` (decompressed) and parsed within `boundedjson`'s bounds."""
        complete = False
        try:
            raw, complete = read_upto(resp, MAX_BATCH_ANSWER)
        except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as exc:
            raise _Retry(f"the batch answer was cut off: {reason(exc)}") from None
        except BadBody as exc:
            raise malformed(self.endpoint.url, str(exc)) from None
        finally:
            finish(resp, complete)
        if not complete:
            raise TransferError(
                f"the LFS server at {self.endpoint.url} sent a batch answer of more than {MAX_BATCH_ANSWER >> 20} MiB "
                f"(one for {count} objects takes a few KiB); refused, nothing was transferred"
            )
        try:
            return boundedjson.loads(raw)  # json.loads: 200,000 nested [ raised RecursionError
        except boundedjson.JSONLimitError as exc:
            raise malformed(self.endpoint.url, str(exc)) from None

    def missing_on_server(self, objects: Sequence[Obj], ref: str | None = None) -> list[Obj]:
        """The objects the server asks us to upload (it lacks them), in the order given."""
        answers = self.batch("upload", objects, ref)
        raise_item_errors(answers.values(), "upload", self.endpoint.url)
        return [(oid, answers[oid].size) for oid, _ in _unique(objects) if "upload" in answers[oid].actions]

    # -- upload -----------------------------------------------------------------

    def upload(self, objects: Sequence[Obj], ref: str | None = None) -> Report:
        """Send the objects the server lacks; each counts once the server (and its verify step) said 2xx."""
        self.store.flush()  # objects written in the background must be on disk before we stat and stream them
        total = Report()
        with self._progress("upload") as bar:
            for chunk in _chunks(_unique(objects), BATCH_SIZE):
                answers = self._batch_once("upload", chunk, ref)
                raise_item_errors(answers.values(), "upload", self.endpoint.url)
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
                headers = merge_headers({"Content-Type": "application/octet-stream"}, action.header,
                                         {"Content-Length": str(item.size)})
                try:
                    resp = self._request("PUT", action.href, headers, body=body, authenticated=item.authenticated,
                                         what=f"upload of sha256:{item.oid}")
                except BaseException:
                    bar.advance(-body.count)
                    raise
                finish(resp, True)
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
        headers = merge_headers({"Accept": LFS_JSON, "Content-Type": LFS_JSON}, action.header)

        def attempt() -> None:
            resp = self._request("POST", action.href, headers, body=data, authenticated=item.authenticated,
                                 what=f"verify of sha256:{item.oid}")
            finish(resp, True)

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
                raise_item_errors(answers.values(), "download", self.endpoint.url)
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
            resp = self._request("GET", action.href, merge_headers({"Accept": "application/octet-stream"}, action.header),
                                 authenticated=item.authenticated, what=f"download of sha256:{item.oid}")
            ok = False
            try:
                self._receive(resp, item, action.href, bar)
                ok = True
            finally:
                finish(resp, ok)

        self._retrying(action.href, attempt)
        return item.size

    def _receive(self, resp: urllib3.BaseHTTPResponse, item: BatchItem, href: str, bar: "_Bar") -> None:
        """Stream a response body into the store; a cut-off stream is retried, wrong bytes are refused."""
        incoming = IncomingObject(self.store, item.oid, item.size)
        try:
            try:
                for chunk in body_pieces(resp):
                    incoming.write(chunk)  # refuses the first byte past the size asked for
                    bar.advance(len(chunk))
            except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as exc:
                bar.advance(-incoming.size)
                raise _Retry(f"the download was cut off: {reason(exc)}") from None
            incoming.publish()
        except (IncomingMismatch, BadBody) as exc:
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
            raise _Retry(reason(exc)) from None
        if 200 <= resp.status < 300:
            if self.endpoint.same_origin(url):
                self.endpoint.after_success()
            return resp
        message = error_message(resp)
        status = resp.status
        finish(resp, False)
        if status in (429,) or status >= 500:
            raise _Retry(f"HTTP {status}{message}", wait=retry_after(resp.headers.get("Retry-After")))
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
        return merge_headers(*layers)

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
        raise_item_errors([fresh], operation, self.endpoint.url)
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
