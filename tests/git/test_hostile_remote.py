"""A hostile remote: LFS batch answers, error bodies and jsonl rows crafted to crash or exhaust fmhub.

Everything a server sends is untrusted (issue 21). A malformed batch answer
(a size that is a string, actions that are a list, a header injected with a
newline, 200,000 nested ``[``) ends in one TransferError line, never a
traceback; an answer too big (or a gzip bomb) is refused after a bounded read;
a jsonl row nested too deep, with a huge integer or a line too long is an
unreadable row of the diff, not a crash. A tiny fake LFS server on 127.0.0.1
answers whatever body a test gives it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import FMHUB, fmhub, git
from hypothesis import given, settings
from hypothesis import strategies as st

from fmhub.base.errors import TransferError
from fmhub.git.endpoint import Endpoint
from fmhub.core.store import ObjectStore
from fmhub.git.lfsbatch import parse_batch
from fmhub.git.lfshttp import CHUNK, MAX_DRAIN, MAX_ERROR_BODY, MESSAGE_CHARS, BadBody, body_pieces, drained, error_message, read_upto
from fmhub.git.transfer import MAX_BATCH_ANSWER, Transfer
from plugins import data_formats
from plugins.data_formats import JsonlFormat

CKPT = "model.safetensors"
PAYLOAD = bytes(range(16))
OID = hashlib.sha256(PAYLOAD).hexdigest()
HREF = "http://127.0.0.1:1/object"

Answer = Callable[[dict], tuple[int, dict[str, str], Iterator[bytes]]]


# -- a fake LFS server -----------------------------------------------------------------


class FakeLFS:
    """Answers every POST with ``self.answer(request)``: (status, headers, body pieces); a body without
    Content-Length is sent until it ends (the connection closes)."""

    def __init__(self) -> None:
        self.answer: Answer = lambda req: json_answer({"objects": []})
        self.batches = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                fake.batches += 1
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                status, headers, body = fake.answer(req)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "Content-Length" not in headers:
                    self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for piece in body:
                        self.wfile.write(piece)
                except OSError:  # the client stopped reading: what a bound is for
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_lfs() -> Iterator[FakeLFS]:
    server = FakeLFS()
    yield server
    server.close()


def raw_answer(raw: bytes, status: int = 200, **headers: str) -> Answer:
    head = {"Content-Type": "application/vnd.git-lfs+json", "Content-Length": str(len(raw)), **headers}
    return lambda req: (status, head, iter([raw]))


def json_answer(doc: Any) -> Answer:
    return raw_answer(json.dumps(doc).encode())


def per_object(make: Callable[[dict], Any]) -> Answer:
    """An answer whose objects are ``make(asked object)``."""
    return lambda req: json_answer({"objects": [make(o) for o in req["objects"]]})(req)


def streamed(mib: int) -> Answer:
    """A batch answer of ``mib`` MiB of JSON string, sent without Content-Length."""
    def body() -> Iterator[bytes]:
        yield b'{"objects": [], "x": "'
        for _ in range(mib):
            yield b"A" * (1 << 20)
        yield b'"}'
    return lambda req: (200, {"Content-Type": "application/vnd.git-lfs+json"}, body())


def gzip_bomb(mib: int) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [z.compress(b'{"objects": [], "x": "')] + [z.compress(b"A" * (1 << 20)) for _ in range(mib)]
    return b"".join(parts) + z.compress(b'"}') + z.flush()


def download(url: str, tmp_path: Path) -> None:
    store = ObjectStore.create(str(tmp_path / "store"))
    with Transfer(Endpoint(url), store, retries=0, backoff=0.01, progress=False) as t:
        t.download([(OID, len(PAYLOAD))])


def one_line(message: str) -> str:
    assert "\n" not in message and "\r" not in message and "Traceback" not in message, message
    return message


# -- item 1: malformed batch answers ---------------------------------------------------

DL = {"download": {"href": HREF}}
MALFORMED: dict[str, tuple[Answer, str]] = {
    "size a string": (per_object(lambda o: {"oid": o["oid"], "size": "lots", "actions": DL}), "size is a string"),
    "size negative": (per_object(lambda o: {"oid": o["oid"], "size": -1, "actions": DL}), "out of range"),
    "size 2^63": (per_object(lambda o: {"oid": o["oid"], "size": 1 << 63, "actions": DL}), "out of range"),
    "size Infinity": (raw_answer(b'{"objects": [{"oid": "%s", "size": Infinity}]}' % OID.encode()), "Infinity"),
    "size of 41 digits": (raw_answer(b'{"objects": [{"oid": "%s", "size": %s}]}' % (OID.encode(), b"9" * 41)), "digits"),
    "size true": (per_object(lambda o: {"oid": o["oid"], "size": True, "actions": DL}), "size is true/false"),
    "actions a list": (per_object(lambda o: {**o, "actions": ["download"]}), "actions is a list"),
    "action a string": (per_object(lambda o: {**o, "actions": {"download": HREF}}), "is a string, not an object"),
    "header a list": (per_object(lambda o: {**o, "actions": {"download": {"href": HREF, "header": ["a"]}}}),
                      "header is a list"),
    "header value a number": (per_object(lambda o: {**o, "actions": {"download": {"href": HREF, "header": {"A": 1}}}}),
                              "not a string"),
    "header injection": (per_object(lambda o: {**o, "actions": {"download": {"href": HREF, "header": {"A": "b\r\nX: 1"}}}}),
                         "invalid header"),
    "header name with a space": (per_object(lambda o: {**o, "actions": {"download": {"href": HREF, "header": {"A B": "1"}}}}),
                                 "invalid header"),
    "href a number": (per_object(lambda o: {**o, "actions": {"download": {"href": 7}}}), "href that is an integer"),
    "href ftp": (per_object(lambda o: {**o, "actions": {"download": {"href": "ftp://h/x"}}}), "invalid href"),
    "href with a newline": (per_object(lambda o: {**o, "actions": {"download": {"href": HREF + "\nX: 1"}}}), "invalid href"),
    "href port out of range": (per_object(lambda o: {**o, "actions": {"download": {"href": "http://h:99999/"}}}),
                               "invalid href"),
    "href no host": (per_object(lambda o: {**o, "actions": {"download": {"href": "http:///x"}}}), "invalid href"),
    "expires_in a string": (per_object(lambda o: {**o, "actions": {"download": {"href": HREF, "expires_in": "soon"}}}),
                            "expires_in is a string"),
    "expires_at a number": (per_object(lambda o: {**o, "actions": {"download": {"href": HREF, "expires_at": 5}}}),
                            "expires_at is an integer"),
    "error a list": (per_object(lambda o: {**o, "error": ["no"]}), "error is a list"),
    "error code a string": (per_object(lambda o: {**o, "error": {"code": "404", "message": "x"}}), "code is a string"),
    "error message an object": (per_object(lambda o: {**o, "error": {"code": 404, "message": {}}}), "message is an object"),
    "authenticated a string": (per_object(lambda o: {**o, "authenticated": "yes", "actions": DL}), "authenticated is a string"),
    "oid a number": (json_answer({"objects": [{"oid": 1}]}), "oid is an integer"),
    "object a string": (json_answer({"objects": ["x"]}), "objects[0] is a string"),
    "objects an object": (json_answer({"objects": {}}), "objects is an object"),
    "answer a list": (json_answer([]), "a list, not an object"),
    "transfer a list": (json_answer({"transfer": ["basic"], "objects": []}), "transfer is a list"),
    "not JSON": (raw_answer(b"<html>hello</html>"), "not valid JSON"),
    "not UTF-8": (raw_answer(b'{"objects": [], "x": "\xff"}'), "not UTF-8"),
    "200,000 nested [": (raw_answer(b'{"objects":' + b"[" * 200_000 + b"]" * 200_000 + b"}"), "nested deeper"),
    "corrupt gzip": (raw_answer(b"not gzip at all", **{"Content-Encoding": "gzip"}), "corrupt compressed data"),
    "cut-off gzip": (raw_answer(gzip.compress(b'{"objects": []}')[:-12], **{"Content-Encoding": "gzip"}), "cut off"),
    "unknown encoding": (raw_answer(b"{}", **{"Content-Encoding": "br"}), "Content-Encoding 'br'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_batch_answer_is_one_transfer_error(case, fake_lfs, tmp_path):
    fake_lfs.answer, needle = MALFORMED[case]
    with pytest.raises(TransferError) as info:
        download(fake_lfs.url, tmp_path)
    message = one_line(str(info.value))
    assert message.startswith(f"the LFS server at {fake_lfs.url} sent a malformed batch answer ("), message
    assert needle in message, message
    assert len(message) < 400, message


def test_unknown_transfer_and_hash_are_refused_in_one_line(fake_lfs, tmp_path):
    for doc, needle in (({"transfer": "ssh", "objects": []}, "chose the 'ssh' transfer"),
                        ({"hash_algo": "md5", "objects": []}, "names objects by 'md5'")):
        fake_lfs.answer = json_answer(doc)
        with pytest.raises(TransferError, match=needle) as info:
            download(fake_lfs.url, tmp_path)
        one_line(str(info.value))


def test_a_server_error_message_is_shown_on_one_line(fake_lfs, tmp_path):
    """An object error's message, and an error status's body, may hold newlines and terminal escapes."""
    fake_lfs.answer = per_object(lambda o: {**o, "error": {"code": 404, "message": "gone\nfmhub: forged line\x1b[31m"}})
    with pytest.raises(TransferError, match="does not have") as info:
        download(fake_lfs.url, tmp_path)
    assert "gone fmhub: forged line [31m" in one_line(str(info.value)) and "\x1b" not in str(info.value)
    fake_lfs.answer = raw_answer(json.dumps({"message": "no\nsuch\x07 repo " + "x" * 10_000}).encode(), status=403)
    with pytest.raises(TransferError, match="HTTP 403: no such repo") as info:
        download(fake_lfs.url, tmp_path)
    assert len(one_line(str(info.value))) < MESSAGE_CHARS + 500  # the server's part is cut, fmhub's advice kept


def test_a_fair_answer_with_every_optional_field_still_works(fake_lfs, tmp_path):
    """The checks refuse nothing git-lfs servers send: header, expiry (nanosecond RFC 3339), authenticated, gzip."""
    fake_lfs.answer = per_object(lambda o: {**o, "authenticated": True, "actions": {"download": {
        "href": HREF, "header": {"Authorization": "Bearer t", "X-Trace": "a\tb"}, "expires_in": 10**30,
        "expires_at": "2099-01-02T03:04:05.123456789Z"}}})
    store = ObjectStore.create(str(tmp_path / "store"))
    with Transfer(Endpoint(fake_lfs.url), store, retries=0, progress=False) as t:
        [item] = t.batch("download", [(OID, len(PAYLOAD))]).values()
    action = item.actions["download"]
    assert item.authenticated and action.header["X-Trace"] == "a\tb" and action.expires_at is not None
    body = json.dumps({"objects": [{"oid": OID, "size": 16, "error": {"code": 404, "message": "gone"}}]}).encode()
    fake_lfs.answer = raw_answer(gzip.compress(body), **{"Content-Encoding": "gzip"})
    with pytest.raises(TransferError, match="does not have sha256:.*: gone"):
        download(fake_lfs.url, tmp_path)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
# answers shaped like the batch API's, each field sometimes right and sometimes any JSON value, so the fuzz
# reaches the per-object, per-action and per-error checks
ACTION = st.fixed_dictionaries({}, optional={
    "href": st.just(HREF) | st.text(max_size=30) | JSON,
    "header": st.dictionaries(st.text(max_size=8), st.text(max_size=8) | JSON, max_size=3) | JSON,
    "expires_in": st.integers() | st.floats() | JSON,
    "expires_at": st.just("2099-01-01T00:00:00Z") | st.just("0001-01-01T00:00:00Z") | st.text(max_size=30) | JSON,
}) | JSON
OBJECT = st.fixed_dictionaries({"oid": st.just(OID) | JSON}, optional={
    "size": st.integers() | JSON,
    "actions": st.dictionaries(st.sampled_from(["download", "upload", "verify", "other"]), ACTION, max_size=3) | JSON,
    "error": st.fixed_dictionaries({}, optional={"code": st.integers() | JSON, "message": st.text() | JSON}) | JSON,
    "authenticated": st.booleans() | JSON,
}) | JSON
ANSWER = st.fixed_dictionaries({}, optional={
    "objects": st.lists(OBJECT, max_size=3) | JSON,
    "transfer": st.just("basic") | JSON,
    "hash_algo": st.just("sha256") | JSON,
}) | JSON


@settings(max_examples=150, deadline=None)
@given(ANSWER)
def test_parse_batch_lets_only_transfer_errors_escape(answer):
    try:
        items = parse_batch(answer, [(OID, 16)], "http://lfs.invalid/")
    except TransferError as exc:
        one_line(str(exc))
        return
    assert list(items) == [OID] and items[OID].size == 16


# -- item 2: bounded reads -------------------------------------------------------------


class FakeResponse:
    """What read_upto and friends use of a urllib3 response: headers and read(n, decode_content=False)."""

    def __init__(self, body: bytes | Iterator[bytes], encoding: str | None = None) -> None:
        self.headers = {"Content-Encoding": encoding} if encoding else {}
        self._pieces = iter([body]) if isinstance(body, bytes) else body
        self._buf = b""
        self.read_total = 0

    def read(self, n: int, decode_content: bool = True) -> bytes:
        assert not decode_content, "urllib3 must never inflate a body whole"
        while len(self._buf) < n and (piece := next(self._pieces, None)) is not None:
            self._buf += piece
        out, self._buf = self._buf[:n], self._buf[n:]
        self.read_total += len(out)
        return out


def endless(piece: bytes) -> Iterator[bytes]:
    while True:
        yield piece


def test_read_upto_stops_at_the_bound_plain_or_gzip_and_refuses_trailing_data():
    resp = FakeResponse(endless(b"A" * 65536))
    data, complete = read_upto(resp, 1 << 20)
    assert not complete and len(data) == 1 << 20 and resp.read_total < (1 << 20) + (128 << 10)
    data, complete = read_upto(FakeResponse(gzip_bomb(64), "gzip"), 1 << 20)
    assert not complete and len(data) == 1 << 20
    # a tiny gzip member followed by endless bytes: zlib would keep them all as "unused data"
    resp = FakeResponse(endless(gzip.compress(b"{}") + b"\0" * 65536), "gzip")
    with pytest.raises(BadBody, match="after the end"):
        read_upto(resp, 1 << 20)
    assert resp.read_total <= 2 * 65536
    assert read_upto(FakeResponse(zlib.compress(b'{"a": 1}'), "deflate"), 100) == (bytearray(b'{"a": 1}'), True)


def test_body_pieces_inflate_a_bomb_a_chunk_at_a_time():
    pieces = body_pieces(FakeResponse(gzip_bomb(64), "gzip"))
    sizes = [len(p) for _, p in zip(range(20), pieces)]
    assert max(sizes) <= CHUNK and sum(sizes) >= 8 * CHUNK
    with pytest.raises(BadBody, match="after the end"):
        list(body_pieces(FakeResponse(iter([gzip.compress(b"x"), b"\0" * CHUNK, b"\0" * CHUNK]), "gzip")))


def test_error_bodies_and_drains_are_bounded():
    resp = FakeResponse(endless(b"B" * 65536))
    assert error_message(resp) == ": " + "B" * (MESSAGE_CHARS - 1) + "…" and resp.read_total <= MAX_ERROR_BODY + (64 << 10)
    resp = FakeResponse(endless(b"C" * 65536))
    assert not drained(resp) and resp.read_total <= MAX_DRAIN + (64 << 10)
    assert drained(FakeResponse(b"ok"))


@pytest.mark.parametrize("mib", [1, 40])
def test_a_big_batch_answer_is_refused_without_holding_it(mib, fake_lfs, tmp_path, monkeypatch):
    """In process: 40 MiB against the 16 MiB bound is refused; 1 MiB (malformed on purpose) is read and parsed."""
    fake_lfs.answer = streamed(mib)
    with pytest.raises(TransferError) as info:
        download(fake_lfs.url, tmp_path)
    if mib * (1 << 20) > MAX_BATCH_ANSWER:
        assert f"a batch answer of more than {MAX_BATCH_ANSWER >> 20} MiB" in one_line(str(info.value))
    else:
        assert "missing from the server's answer" in one_line(str(info.value))


# -- the CLI: the filter and `fmhub fetch` end in one line -----------------------------


def st_header(name: str, nbytes: int) -> bytes:
    raw = json.dumps({name: {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def manifest_text() -> bytes:
    header = st_header("a", len(PAYLOAD))
    lines = ["fmhub manifest 1", "format safetensors", f"size {len(header) + len(PAYLOAD)}",
             f"header sha256:{hashlib.sha256(header).hexdigest()} {len(header)}",
             f'tensor "a" U8 [{len(PAYLOAD)}] {len(PAYLOAD)} sha256:{OID}']
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture
def remote_repo(repo: Path, fake_lfs: FakeLFS) -> Path:
    """The repo with a committed manifest whose objects are only on the (fake) LFS server."""
    blob = subprocess.run(["git", "hash-object", "-w", "--no-filters", "--stdin"], cwd=repo, input=manifest_text(),
                          capture_output=True, check=True).stdout.decode().strip()
    git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{CKPT}")
    git(repo, "commit", "-qm", "a checkpoint whose objects are remote")
    git(repo, "config", "lfs.url", fake_lfs.url)
    git(repo, "config", "lfs.transfer.maxretries", "0")
    return repo


def fmhub_line(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0 and "Traceback" not in err and "unexpectedly" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("fmhub:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("case", ["actions a list", "200,000 nested [", "size Infinity"])
def test_filter_and_fetch_say_one_line(case, remote_repo, fake_lfs):
    fake_lfs.answer = MALFORMED[case][0]
    smudge = subprocess.run([*FMHUB, "filter-smudge", CKPT], cwd=remote_repo, input=manifest_text(),
                            capture_output=True, check=False)
    assert "malformed batch answer" in fmhub_line(smudge)
    assert "malformed batch answer" in fmhub_line(fmhub(remote_repo, "fetch", check=False))


def smudge_measured(repo: Path) -> tuple[str, int]:
    """`fmhub filter-smudge` in a fresh wrapper process: its stderr and its peak RSS (MiB)."""
    probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], input=sys.stdin.buffer.read(), "
             "capture_output=True); sys.stdout.buffer.write(p.stderr); "
             "print('RSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    proc = subprocess.run([sys.executable, "-c", probe, *FMHUB, "filter-smudge", CKPT], cwd=repo, input=manifest_text(),
                          capture_output=True, check=True)
    out = proc.stdout.decode(errors="replace")
    return out.rsplit("RSS ", 1)[0], int(out.rsplit("RSS ", 1)[1]) // 1024


def test_a_huge_or_gzip_bomb_answer_keeps_the_filter_small(remote_repo, fake_lfs):
    """64 MiB of answer (plain, then 64 KiB of gzip) against the 16 MiB bound: the filter's peak RSS stays
    near what a tiny refused answer costs (json.loads(resp.read()) held the answer three times over)."""
    fake_lfs.answer = MALFORMED["actions a list"][0]
    _, base_mb = smudge_measured(remote_repo)
    bomb = gzip_bomb(64)
    assert len(bomb) < 256 << 10
    for answer in (streamed(64), raw_answer(bomb, **{"Content-Encoding": "gzip"})):
        fake_lfs.answer = answer
        err, rss_mb = smudge_measured(remote_repo)
        assert "Traceback" not in err and "a batch answer of more than 16 MiB" in err, err
        assert rss_mb - base_mb < 40, (rss_mb, base_mb)


# -- item 3: jsonl rows ----------------------------------------------------------------


def rows(data: bytes) -> list[tuple]:
    return list(JsonlFormat().rows(io.BytesIO(data), "d.jsonl"))


def test_hostile_jsonl_rows_are_unreadable_rows_not_crashes():
    data = (b"[" * 100_000 + b"]" * 100_000 + b"\n"
            + b'{"a": ' + b"9" * 100_000 + b"}\n"
            + b'{"a": oops}\n'
            + b'{"a": "\xff"}\n'
            + b'{"ok": [1, {"b": 2}]}\n')
    got = rows(data)
    assert [r[0] for r in got] == [1, 2, 3, 4, 5]
    assert "nested deeper than" in got[0][2] and "digits" in got[1][2]
    assert got[2][2] == "not valid JSON (Expecting value at column 7)" and got[3][2].startswith("not UTF-8")
    assert got[4] == (5, {"ok": [1, {"b": 2}]}, None)
    assert all("\n" not in r[2] for r in got[:4])


def test_rows_python_wrote_still_read():
    """json.dumps writes NaN and Infinity; rows nest a few levels; ids run to 128 bits: all still rows."""
    deep = json.dumps([[[[[[[[[[{"x": 1}]]]]]]]]]])
    got = rows(f'{{"s": NaN, "t": Infinity, "u": -Infinity, "id": {2**128}}}\n{deep}\n'.encode())
    assert got[0][2] is None and got[0][1]["s"] != got[0][1]["s"] and got[0][1]["id"] == 2**128
    assert got[1] == (2, json.loads(deep), None)


def test_a_line_over_the_bound_is_an_unreadable_row_read_in_pieces(monkeypatch):
    monkeypatch.setattr(data_formats, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(data_formats, "SKIP_BYTES", 64)
    long_a, long_b = b'"' + b"a" * 5000 + b'"\n', b'"' + b"a" * 4999 + b'b"\n'

    class Counting(io.BytesIO):
        most = 0

        def readline(self, size: int = -1) -> bytes:
            assert 0 < size <= 1001, "a line must never be read unbounded"
            line = super().readline(size)
            Counting.most = max(Counting.most, len(line))
            return line

    got = list(JsonlFormat().rows(Counting(b"[1]\n" + long_a + long_b + b"[2]"), "d.jsonl"))
    assert Counting.most <= 1001
    assert [(n, e) for n, _, e in got] == [(1, None), (2, "a line of 5,003 bytes (at most 1,000)"),
                                           (3, "a line of 5,003 bytes (at most 1,000)"), (4, None)]
    assert got[1][1] != got[2][1]  # two different long lines stay different rows (their text names a hash of all)


def test_git_diff_and_fmhub_diff_of_hostile_rows_say_which_line(repo):
    fmhub(repo, "track", "*.jsonl")
    (repo / "d.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    git(repo, "add", ".gitattributes", "d.jsonl")
    git(repo, "commit", "-qm", "v0")
    (repo / "d.jsonl").write_bytes(b'{"a": 1}\n' + b"[" * 100_000 + b"]" * 100_000 + b'\n{"a": ' + b"9" * 100_000 + b"}\n")
    git(repo, "commit", "-qam", "hostile rows")
    for proc in (git(repo, "diff", "HEAD~1", "HEAD"), git(repo, "log", "-p", "-1"), fmhub(repo, "diff", "HEAD~1", "HEAD")):
        out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        assert "Traceback" not in out and "2: nested deeper than" in out and "3: an integer of 100000 digits" in out, out


# -- the Hub client: files read from a Hub repo ----------------------------------------


class FakeHubApi:
    """Just `hf_hub_download`: writes ``content`` where huggingface_hub would put the file."""

    def __init__(self, content: bytes) -> None:
        self.content = content

    def hf_hub_download(self, repo_id: str, path: str, revision: str | None = None, local_dir: str = ".") -> str:
        local = Path(local_dir) / path
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(self.content)
        return str(local)


def test_hub_json_from_a_hostile_hub_repo_is_bounded(monkeypatch):
    from fmhub.git import hub

    def read(content: bytes) -> dict | None:
        return hub._read_json(FakeHubApi(content), "o/r", hub.HUB_JSON, None)

    assert read(b"[" * 100_000 + b"]" * 100_000) is None  # json.loads: RecursionError
    assert read(b"[1, 2]") is None
    assert read(b'{"layout": 1, "files": "a.txt"}') == {"layout": 1}  # no "files" to delete
    assert read(b'{"layout": 1, "files": ["a.txt", 3]}') == {"layout": 1}
    assert read(b'{"layout": 1, "files": ["a.txt"]}') == {"layout": 1, "files": ["a.txt"]}
    monkeypatch.setattr(hub, "MAX_HUB_TEXT", 1000)
    with pytest.raises(TransferError, match=r"\.fmhub/hub\.json in o/r is over") as info:
        read(b" " * 1001)
    one_line(str(info.value))
