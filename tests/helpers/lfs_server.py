"""A real Git LFS server for tests: dulwich's, made streaming, with switches to inject faults.

`running_lfs_server` starts ``dulwich.lfs_server.LFSServer`` (a
ThreadingHTTPServer speaking the batch API and the basic transfer adapter) on
127.0.0.1, on a free port, in a thread, with its own store dir, and yields an
`LFSTestServer`. The fixture ``lfs_server`` in tests/conftest.py wraps it.

What dulwich's handler lacks, and this subclass adds:

* streaming: dulwich reads a whole upload into memory (and a whole object
  to serve a download); here bodies stream through 1 MiB chunks into a temp
  file that is hashed, then renamed into place, so big-object tests measure
  the client, not the server;
* an API path: dulwich answers only ``/objects/batch``, so an ``lfs.url`` with
  a path (``http://host/repo.git/info/lfs``, what git-lfs derives from a remote
  URL) got 404; everything up to ``/info/lfs`` is now stripped;
* the verify action checks the size the client sends;
* batch answers name ``"transfer": "basic"`` and ``"hash_algo": "sha256"``.

git-lfs 3.3 pushes and pulls against it (its ``POST /locks/verify`` gets a
404, which git-lfs takes as "no locking API" and goes on).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, Iterator

from dulwich.lfs import LFSStore
from dulwich.lfs_server import LFSRequestHandler, LFSServer, _is_valid_oid

API_PATH = "/test.git/info/lfs"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Request:
    """A request the server saw: method, path as sent, and headers (case-insensitive ``.get``)."""

    method: str
    path: str
    headers: Message


@dataclass
class _Faults:
    fail_left: int = 0
    fail_status: int = 503
    fail_method: str | None = None  # only requests of this HTTP method fail (None: any)
    retry_after: str | None = None
    corrupt: set[str] = field(default_factory=set)
    cut_left: int = 0
    authorization: str | None = None


class _Handler(LFSRequestHandler):
    """dulwich's handler, streaming, path-tolerant, recording every request and honouring fault switches."""

    server: "_Server"

    def do_POST(self) -> None:
        if self._intercepted():
            super().do_POST()

    def do_PUT(self) -> None:
        if self._intercepted():
            super().do_PUT()

    def do_GET(self) -> None:
        if self._intercepted():
            super().do_GET()

    def _intercepted(self) -> bool:
        """Record the request, strip the API path, apply faults; False when a fault already answered."""
        self.server.log.append(Request(self.command, self.path, self.headers))
        marker = self.path.find("/info/lfs/")
        if marker >= 0:
            self.path = self.path[marker + len("/info/lfs") :]
        with self.server.lock:
            faults = self.server.faults
            want = faults.authorization
            failing = faults.fail_left > 0 and faults.fail_method in (None, self.command)
            if failing:
                faults.fail_left -= 1
        if want is not None and self.headers.get("Authorization") != want:
            self._drain_body()
            self._send_lfs_error(401, "credentials needed", {"LFS-Authenticate": 'Basic realm="fmhub tests"',
                                                             "WWW-Authenticate": 'Basic realm="fmhub tests"'})
            return False
        if failing:
            self._drain_body()
            extra = {"Retry-After": faults.retry_after} if faults.retry_after is not None else {}
            self._send_lfs_error(faults.fail_status, "injected failure", extra)
            return False
        return True

    def _drain_body(self) -> None:
        """Read (and drop) a request body, so the client can finish sending before it reads our answer."""
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            chunk = self.rfile.read(min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)

    def _send_lfs_error(self, status: int, message: str, extra: dict[str, str] | None = None) -> None:
        body = json.dumps({"message": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.git-lfs+json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def send_json_response(self, status_code, data) -> None:
        if "objects" in data:
            data = {"transfer": "basic", "hash_algo": "sha256", **data}
        super().send_json_response(status_code, data)

    def handle_upload(self) -> None:
        oid = self._oid_from_path(2)
        if oid is None:
            return
        if self.headers.get("Content-Length") is None:
            self._send_lfs_error(411, "Content-Length required")
            return
        left = int(self.headers["Content-Length"])
        store = self.server.lfs_store
        fd, tmp = tempfile.mkstemp(dir=os.path.join(store.path, "tmp"))
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                while left > 0:
                    chunk = self.rfile.read(min(CHUNK, left))
                    if not chunk:
                        break
                    h.update(chunk)
                    out.write(chunk)
                    left -= len(chunk)
            if left or h.hexdigest() != oid:
                self._send_lfs_error(400, f"OID mismatch: expected {oid}, got {h.hexdigest()}")
                return
            dest = store._sha_path(oid)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(tmp, dest)
            tmp = None
        finally:
            if tmp is not None:
                os.unlink(tmp)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def handle_download(self) -> None:
        oid = self._oid_from_path(2)
        if oid is None:
            return
        path = self.server.lfs_store._sha_path(oid)
        if not os.path.isfile(path):
            self._send_lfs_error(404, "Object not found")
            return
        with self.server.lock:
            faults = self.server.faults
            corrupt = oid in faults.corrupt
            cut = faults.cut_left > 0
            if cut:
                faults.cut_left -= 1
        size = os.path.getsize(path)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        with open(path, "rb") as f:
            if cut:  # half the body, then hang up: a connection lost mid-download
                self.wfile.write(f.read(size // 2))
                self.close_connection = True
                return
            first = True
            while chunk := f.read(CHUNK):
                if corrupt and first:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]  # same length, wrong bytes
                first = False
                self.wfile.write(chunk)

    def handle_verify(self) -> None:
        oid = self._oid_from_path(3)
        if oid is None:
            return
        length = int(self.headers.get("Content-Length") or 0)
        try:
            claim = json.loads(self.rfile.read(length)) if length else {}
        except ValueError:
            claim = {}
        path = self.server.lfs_store._sha_path(oid)
        if not os.path.isfile(path):
            self._send_lfs_error(404, "Object not found")
        elif "size" in claim and claim["size"] != os.path.getsize(path):
            self._send_lfs_error(422, "size mismatch")
        else:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def _oid_from_path(self, parts: int) -> str | None:
        """The oid in ``/objects/<oid>[/verify]``, or None after answering 404."""
        bits = self.path.strip("/").split("/")
        if len(bits) != parts or not _is_valid_oid(bits[1]) or (parts == 3 and bits[2] != "verify"):
            self._send_lfs_error(404, "Not Found")
            return None
        return bits[1]


class _Server(LFSServer):
    def __init__(self, address: tuple[str, int], store: LFSStore) -> None:
        self.log: list[Request] = []
        self.lock = threading.Lock()
        self.faults = _Faults()
        super().__init__(address, store)
        self.RequestHandlerClass = _Handler


class FaultSwitches:
    """Fault injection shared by the test servers (this one and tests/helpers/hub_server.py).

    Needs ``self._server`` with a ``lock`` and a ``faults`` (`_Faults`) that its handler honours.
    """

    _server: Any

    def fail_next(self, n: int, status: int = 503, retry_after: str | None = None, method: str | None = None) -> None:
        """Answer the next ``n`` requests (of any kind, or only ``method`` ones) with ``status`` (and Retry-After if given)."""
        with self._server.lock:
            faults = self._server.faults
            faults.fail_left, faults.fail_status, faults.retry_after, faults.fail_method = n, status, retry_after, method

    def corrupt(self, oid: str) -> None:
        """Serve wrong bytes (same length, first byte flipped) for object ``oid`` from now on."""
        with self._server.lock:
            self._server.faults.corrupt.add(oid)

    def cut_next_downloads(self, n: int = 1) -> None:
        """Send only half of the next ``n`` object downloads' bodies, then close the connection."""
        with self._server.lock:
            self._server.faults.cut_left = n


class LFSTestServer(FaultSwitches):
    """Handle on a running test server: where it is, what it saw, and fault switches."""

    def __init__(self, server: _Server, store_dir: Path) -> None:
        self._server = server
        host, port = server.server_address[:2]
        self.base_url = f"http://{host}:{port}"
        self.url = self.base_url + API_PATH  # the LFS API base URL, to use as `lfs.url`
        self.store_dir = store_dir

    @property
    def requests(self) -> list[Request]:
        """Every request seen so far, in arrival order."""
        return self._server.log

    def objects(self) -> dict[str, int]:
        """oid -> size of every object the server holds."""
        root = self.store_dir / "objects"
        return {p.name: p.stat().st_size for p in root.rglob("*") if p.is_file()}

    def object_bytes(self, oid: str) -> bytes:
        return Path(self._server.lfs_store._sha_path(oid)).read_bytes()

    def put(self, data: bytes) -> str:
        """Store an object directly (as if pushed earlier); returns its oid."""
        return self._server.lfs_store.write_object([data])

    def require_auth(self, header_value: str | None) -> None:
        """Answer 401 to every request whose Authorization header is not exactly ``header_value`` (None: no auth)."""
        with self._server.lock:
            self._server.faults.authorization = header_value

    def clear_log(self) -> None:
        self._server.log.clear()


@contextlib.contextmanager
def running_lfs_server(store_dir: Path | str | None = None) -> Iterator[LFSTestServer]:
    """Start a test LFS server on 127.0.0.1 in a thread; stop it (and remove a temp store) on exit."""
    own = store_dir is None
    root = Path(tempfile.mkdtemp(prefix="lfs-server-") if own else store_dir)
    server = _Server(("127.0.0.1", 0), LFSStore.create(str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="lfs-test-server")
    thread.start()
    try:
        yield LFSTestServer(server, root)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        if own:
            shutil.rmtree(root, ignore_errors=True)


def closed_port_url() -> str:
    """An LFS URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{API_PATH}"
