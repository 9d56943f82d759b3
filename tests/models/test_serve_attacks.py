"""`fmhub serve` attacked: each test is an input that would get past one of the HTTP server's checks if it were gone.

The admin API (a token, always; compared in constant time; adapter sources
that must be real adapter directories), the listen address (no made-up token
beyond this machine), request bodies (bounded by Content-Length before
reading, parsed by `fmhub.base.boundedjson`, numbers range-checked) and load (a
deep backlog, bounded threads, 503 with Retry-After, never a reset). Then
hypothesis throws arbitrary bodies at the OpenAI endpoints, and at `fmhub
server`'s LFS batch endpoint, and every answer must be a well-formed HTTP
response under 500.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import fmhub, isolate_git, socket_closed_within
from fmhub.base.errors import FmhubError
from fmhub.serving import connections, openai_requests
from fmhub.serving.backends import backend
from fmhub.serving.config import ServeConfig, from_options, is_loopback
from fmhub.serving.sources import parse_adapters, parse_source
from tests.helpers.serving import random_adapter, save_base

TOKEN = "attack-test-token"
PROMPT = [5, 6, 7, 8, 9]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-attacks")
    save_base(root / "base")
    random_adapter(root / "ads" / "a0", seed=3, base=root / "base")
    return root


def _serve(models: Path, name: str, **options):
    config = ServeConfig(parse_source(str(models / "base")), parse_adapters([str(models / "ads")]), port=0, gpu_slots=2,
                         admin_token=TOKEN, cache_dir=str(models / f"cache-{name}"), **options)
    return backend("local").serve(config)


@pytest.fixture(scope="module")
def server(models):
    srv = _serve(models, "main")
    yield srv
    srv.stop()


# -- clients -------------------------------------------------------------------------------------


def request(url: str, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, lower-cased headers, raw body) of one request on its own connection."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def raw(url: str, data: bytes, half_close: bool = False, timeout: float = 30) -> tuple[int, dict, bytes]:
    """Bytes sent as they are (no client fixes them up); the response parsed."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        resp = http.client.HTTPResponse(sock, method="POST")
        resp.begin()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def openai_error(status: int, raw_body: bytes) -> dict:
    """The error of an answer, checked to be OpenAI's shape with a one-line message."""
    doc = json.loads(raw_body)
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}, doc
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"], doc
    assert "Traceback" not in err["message"]
    assert status >= 400
    return err


def admin(token: str | None = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"} if token is not None else {}


def served_names(url: str) -> list[str]:
    status, _, body = request(url, "GET", "/v1/models")
    assert status == 200
    return [m["id"] for m in json.loads(body)["data"]]


# -- the admin API -------------------------------------------------------------------------------


def test_admin_api_without_a_token_is_401_and_changes_nothing(server):
    for method, body in (("GET", None), ("POST", {"adapters": []}), ("POST", {"adapters": [], "replace": True})):
        status, headers, answer = request(server.url, method, "/fmhub/adapters", body)
        assert status == 401 and headers.get("www-authenticate") == "Bearer"
        assert openai_error(status, answer)["code"] == "invalid_api_key"
    assert "a0" in served_names(server.url)  # the wipe did not happen


@pytest.mark.parametrize("size", [2 << 20, 7 << 20])
def test_a_refused_admin_request_with_a_large_body_gets_its_401_not_a_reset(server, size):
    """Refused before its body is read; the body (within the limit) is drained before closing, or the client's
    kernel would reset the connection and drop the 401 it had not read yet."""
    body = b'{"adapters": [], "pad": "' + b"x" * size + b'"}'
    for _ in range(3):
        status, headers, _answer = request(server.url, "POST", "/fmhub/adapters", body)
        assert status == 401 and headers.get("www-authenticate") == "Bearer"


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ", f"Basic {TOKEN}", TOKEN,
                                    f"Bearer {TOKEN} extra", "Bearer \u00e9\u00e8"])
def test_admin_api_with_a_wrong_token_is_401(server, header):
    status, _, answer = request(server.url, "POST", "/fmhub/adapters", {"adapters": []},
                                {"Authorization": header.encode("utf-8").decode("latin-1")})
    assert status == 401, answer
    openai_error(status, answer)
    assert "a0" in served_names(server.url)


def test_admin_api_with_the_token_works(server):
    status, _, answer = request(server.url, "GET", "/fmhub/adapters", headers={"Authorization": f"bearer {TOKEN}"})
    assert status == 200 and [a["name"] for a in json.loads(answer)["adapters"]] == ["a0"]


def test_token_comparison_is_constant_time():
    """`hmac.compare_digest`, not ==: which prefix is right must not show in the time a refusal takes."""
    import inspect

    assert "compare_digest" in inspect.getsource(openai_requests.token_ok)
    assert openai_requests.token_ok(f"Bearer {TOKEN}", TOKEN.encode())
    assert not openai_requests.token_ok("Bearer \u0100\u00ff", TOKEN.encode())  # non-ASCII: refused, no TypeError


def _deploy(url: str, source: dict, name: str = "evil") -> tuple[int, dict, bytes]:
    return request(url, "POST", "/fmhub/adapters", {"adapters": [{"name": name, "source": source}], "replace": False}, admin())


@pytest.mark.parametrize("source", [
    {"path": "/etc"},  # a readable directory that is no adapter: its files are hashed, then it is served
    {"path": "/"},
    {"path": "relative/dir"},
    {"path": "/nonexistent/fmhub-attack"},
    {"path": 7},
    {"path": "x", "rev": "HEAD", "repo": "/"},  # a revision must be a commit id, not something git resolves
    {"path": "--output=/tmp/x", "rev": "0" * 40, "repo": "/"},
    {"path": "../..", "rev": "0" * 40, "repo": "/"},
    {"path": "a", "rev": "0" * 40, "repo": "relative"},
])
def test_admin_deploy_refuses_what_is_not_an_adapter_directory(server, source):
    before = served_names(server.url)
    status, _, answer = _deploy(server.url, source)
    assert status == 400, answer
    openai_error(status, answer)
    assert served_names(server.url) == before


def test_admin_deploy_bounds_the_adapter_directory(server, models, tmp_path):
    bloated = tmp_path / "bloated"
    bloated.mkdir()
    for name in os.listdir(models / "ads" / "a0"):
        (bloated / name).write_bytes((models / "ads" / "a0" / name).read_bytes())
    for i in range(openai_requests.MAX_ADAPTER_FILES):
        (bloated / f"junk{i}").write_bytes(b"x")
    status, _, answer = _deploy(server.url, {"path": str(bloated)})
    assert status == 400 and "at most" in openai_error(status, answer)["message"]
    # a real adapter directory deploys (beside the others: replace false)
    status, _, answer = _deploy(server.url, {"path": str(models / "ads" / "a0")}, name="copy")
    assert status == 200 and json.loads(answer)["added"] == ["copy"]


# -- where it listens ----------------------------------------------------------------------------


def test_loopback_hosts():
    for host in ("127.0.0.1", "127.4.5.6", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "", "::", "10.1.2.3", "192.168.0.1", "example.com", "127.0.0.1.example.com"):
        assert not is_loopback(host), host


def test_listening_beyond_this_machine_needs_a_token_of_ones_own(models, monkeypatch):
    base = str(models / "base")
    for host in ("0.0.0.0", "::", "10.0.0.1", ""):
        with pytest.raises(FmhubError, match="--admin-token") as info:
            from_options({"base": base, "host": host})
        assert "\n" not in str(info.value)
    assert from_options({"base": base, "host": "0.0.0.0", "admin_token": "mine"})[0].admin_token == "mine"
    assert from_options({"base": base, "host": "0.0.0.0", "backend": "vllm"})[1] == "vllm"  # vLLM has its own --api-key
    monkeypatch.delenv("FMHUB_ADMIN_TOKEN", raising=False)
    started = time.monotonic()
    bad = fmhub(models, "serve", "--base", base, "--host", "0.0.0.0", "--port", "0", check=False)
    assert bad.returncode == 1 and b"--admin-token" in bad.stderr and bad.stderr.decode().strip().count("\n") == 0
    assert b"Traceback" not in bad.stderr and time.monotonic() - started < 60  # refused before the model loads


def test_fmhub_serve_prints_a_generated_token_that_works(models, monkeypatch):
    monkeypatch.delenv("FMHUB_ADMIN_TOKEN", raising=False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fmhub", "serve", "--base", str(models / "base"), "--adapters",
                             str(models / "ads"), "--port", "0", "--gpu-slots", "1", "--cache-dir", str(models / "cache-cli")],
                            cwd=models, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        first = proc.stdout.readline().decode()
        assert " at http://" in first, first + (proc.stderr.read().decode() if proc.poll() is not None else "")
        second = proc.stdout.readline().decode()
        url = first.split(" at ")[1].split()[0]
        token = re.search(r"FMHUB_ADMIN_TOKEN\): (\S+)$", second.strip()).group(1)
        assert len(token) >= 32
        assert request(url, "GET", "/fmhub/adapters")[0] == 401
        status, _, answer = request(url, "GET", "/fmhub/adapters", headers=admin(token))
        assert status == 200 and json.loads(answer)["adapters"][0]["name"] == "a0"
    finally:
        proc.terminate()
        proc.wait(30)


# -- request bodies ------------------------------------------------------------------------------


def completion(url: str, **fields) -> tuple[int, dict, bytes]:
    return request(url, "POST", "/v1/completions", {"model": "a0", "prompt": PROMPT, "max_tokens": 2, **fields})


def test_deeply_nested_body_is_400(server):
    for depth in (100, 100_000):
        body = b'{"model": "a0", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
        status, _, answer = request(server.url, "POST", "/v1/completions", body)
        assert status == 400 and "nested deeper" in openai_error(status, answer)["message"]
    status, _, answer = request(server.url, "POST", "/v1/chat/completions", b"[" * 200_000)
    assert status == 400
    openai_error(status, answer)


@pytest.mark.parametrize("field, value", [
    ("seed", 2 ** 200), ("seed", 2 ** 64), ("seed", -(2 ** 63) - 1), ("seed", 1.5), ("seed", True),
    ("max_tokens", 2 ** 200), ("max_tokens", 0), ("max_tokens", 2 ** 31), ("max_tokens", "2"),
    ("n", 2 ** 70), ("n", 17), ("temperature", 10 ** 39), ("top_p", 0), ("stream", "yes"),
])
def test_out_of_range_numbers_are_400(server, field, value):
    status, _, answer = completion(server.url, **{"temperature": 1, field: value})
    assert status == 400, answer
    err = openai_error(status, answer)
    assert err["param"] == field or "digits" in err["message"], err  # 2**200: refused by the parser already


def test_numbers_at_the_edges_are_served(server):
    for seed in (2 ** 64 - 1, -(2 ** 63), 0):
        assert completion(server.url, temperature=1, seed=seed)[0] == 200
    status, _, answer = request(server.url, "POST", "/v1/completions", b'{"model": "a0", "prompt": [5], "seed": ' + b"9" * 5000 + b"}")
    assert status == 400 and "digits" in openai_error(status, answer)["message"]
    status, _, answer = request(server.url, "POST", "/v1/completions", b'{"model": "a0", "prompt": [5], "temperature": NaN}')
    assert status == 400
    openai_error(status, answer)


def test_lone_surrogates_are_400(server):
    for path, body in (("/v1/completions", b'{"model": "a0", "prompt": "a\\ud800b"}'),
                       ("/v1/completions", b'{"model": "a0", "prompt": ["ok", "\\udfff"]}'),
                       ("/v1/chat/completions", b'{"model": "a0", "messages": [{"role": "user", "content": "\\ud83d"}]}')):
        status, _, answer = request(server.url, "POST", path, body)
        assert status == 400, answer
        openai_error(status, answer)
    emoji = json.dumps({"model": "a0", "prompt": "\U0001f600", "max_tokens": 1}).encode()  # an escaped pair is fine
    assert request(server.url, "POST", "/v1/completions", emoji)[0] == 200


def _head(length: str | None = None, extra: str = "", path: str = "/v1/completions") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def test_huge_content_length_is_413_without_reading(server):
    started = time.monotonic()
    status, headers, answer = raw(server.url, _head(str(10 ** 12)))  # no body follows: the server must not wait for it
    assert status == 413 and headers.get("connection") == "close"
    openai_error(status, answer)
    assert time.monotonic() - started < 10
    # with Expect: 100-continue the client is not even asked for it
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(_head(str(10 ** 12), "Expect: 100-continue\r\n"))
        resp = http.client.HTTPResponse(sock, method="POST")
        resp.begin()
        assert resp.status == 413
    status, _, answer = raw(server.url, _head("1" * 30))
    assert status in (400, 413)
    openai_error(status, answer)


@pytest.mark.parametrize("head, body, want", [
    (_head(None), b'{"model": "a0"}', 411),  # no Content-Length: the body's end is unknown
    (_head("abc"), b"", 400),
    (_head("-5"), b"", 400),
    (_head("+5"), b"", 400),
    (_head("0x10"), b"", 400),
    (_head("5 5"), b"", 400),
    (_head("5", "Content-Length: 6\r\n"), b'{"a":1}', 400),  # two lengths: request smuggling's tool
    (_head("7", "Transfer-Encoding: chunked\r\n"), b"7\r\n{\"a\":1}\r\n0\r\n\r\n", 411),
    (_head(None, "Transfer-Encoding: chunked\r\n"), b"7\r\n{\"a\":1}\r\n0\r\n\r\n", 411),
    (_head("100"), b'{"model": "a0"}', 400),  # shorter than declared, then the client stops sending
])
def test_bad_framing_is_a_4xx_in_openai_shape(server, head, body, want):
    status, headers, answer = raw(server.url, head + body, half_close=True)
    assert status == want, answer
    openai_error(status, answer)
    assert headers.get("connection") == "close"


def test_bad_request_lines_and_methods_get_openai_errors(server):
    status, _, answer = raw(server.url, b"GARBAGE\r\n\r\n")
    assert 400 <= status < 500
    openai_error(status, answer)
    status, headers, answer = request(server.url, "PUT", "/v1/completions", b"{}")
    assert status == 405
    openai_error(status, answer)
    status, _, answer = raw(server.url, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")
    assert status == 414
    openai_error(status, answer)


def test_a_full_engine_queue_is_503_with_retry_after(server, monkeypatch):
    monkeypatch.setattr(openai_requests, "MAX_WAITING", 0)
    status, headers, answer = completion(server.url)
    assert status == 503 and headers.get("retry-after") == "1"
    assert openai_error(status, answer)["type"] == "server_error"


# -- load ----------------------------------------------------------------------------------------


def test_200_concurrent_clients_get_200_or_503_and_no_reset(models):
    """socketserver's backlog of 5 reset 36 of 200 clients; now a burst waits in a deep backlog, threads are bounded,
    and what they cannot take is answered 503 with Retry-After."""
    srv = _serve(models, "load", backend_options={"max_connections": 4})
    assert srv.httpd.request_queue_size >= 128
    body = json.dumps({"model": "a0", "prompt": PROMPT, "max_tokens": 1, "temperature": 0}).encode()
    barrier, results, lock = threading.Barrier(200), [], threading.Lock()

    def client() -> None:
        barrier.wait()
        try:
            status, headers, answer = request(srv.url, "POST", "/v1/completions", body)
            if status == 503:
                assert headers.get("retry-after") and openai_error(status, answer)["type"] == "server_error"
            got = status
        except (ConnectionError, OSError) as exc:
            got = type(exc).__name__
        with lock:
            results.append(got)

    threads = [threading.Thread(target=client) for _ in range(200)]
    started = time.monotonic()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        srv.stop()
    assert len(results) == 200
    assert not [r for r in results if r not in (200, 503)], sorted(map(str, results))
    assert results.count(200) >= 4 and results.count(503) >= 1, (results.count(200), results.count(503))
    assert time.monotonic() - started < 90


# -- fuzzing -------------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_small_int = st.one_of(st.integers(-3, 4), st.integers(), st.sampled_from([2 ** 63, 2 ** 64, 2 ** 200, -(2 ** 200)]))


def _mostly(valid, hostile):
    """Three draws in four from ``valid``: a request with many fields must often pass every check to reach the engine."""
    return st.one_of(valid, valid, valid, hostile)


_prompt = _mostly(st.one_of(st.text(min_size=1, max_size=30), st.lists(st.integers(0, 255), min_size=1, max_size=6),
                            st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=3)),
                  st.one_of(st.lists(st.integers(-5, 300), max_size=6), _json))
_message = _mostly(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=20)}),
                   st.fixed_dictionaries({"role": _json, "content": st.one_of(st.text(max_size=20), _json)}))
_options = {"model": _mostly(st.sampled_from(["a0", "base"]), st.one_of(st.sampled_from(["auto", "nope", ""]), _json)),
            "max_tokens": _mostly(st.integers(1, 6), _small_int), "n": _mostly(st.integers(1, 3), _small_int),
            "seed": _mostly(st.integers(-(2 ** 63), 2 ** 64 - 1), _small_int),
            "temperature": _mostly(st.floats(0, 2), st.one_of(st.floats(), _json)),
            "top_p": _mostly(st.floats(0.01, 1), st.one_of(st.floats(), _json)),
            "stop": _mostly(st.lists(st.text(min_size=1, max_size=3), max_size=4), _json),
            "stream": _mostly(st.booleans(), _json), "logprobs": _mostly(st.just(False), _json),
            "ignore_eos": _mostly(st.booleans(), _json)}
_completion = st.fixed_dictionaries({"model": _options["model"], "prompt": _prompt},
                                    optional={k: v for k, v in _options.items() if k != "model"})
_chat = st.fixed_dictionaries({"model": _options["model"], "messages": _mostly(st.lists(_message, min_size=1, max_size=3), _json)},
                              optional={k: v for k, v in _options.items() if k != "model"})
_hostile_text = st.one_of(
    st.integers(1, 3000).map(lambda k: "[" * k + "]" * k),
    st.integers(1, 3000).map(lambda k: '{"a":' * k + "1" + "}" * k),
    st.integers(30, 6000).map(lambda k: '{"model": "a0", "prompt": [5], "seed": ' + "7" * k + "}"),
    st.sampled_from(['{"model": "a0", "prompt": "\\ud800"}', '{"prompt": [1e999]}', '{"n": -Infinity}', "", "{", "nul\x00l"]),
)


def _body(doc) -> bytes:
    return doc.encode("utf-8", "surrogatepass") if isinstance(doc, str) else json.dumps(doc).encode()


def _well_formed(url: str, path: str, body: bytes) -> None:
    status, headers, answer = request(url, "POST", path, body)
    assert status < 500, (status, answer[:300])
    if status >= 400:
        openai_error(status, answer)
    elif headers.get("content-type", "").startswith("text/event-stream"):
        assert answer.rstrip().endswith(b"data: [DONE]") or b'"error"' in answer, answer[-300:]
    else:
        assert json.loads(answer)["choices"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(doc=st.one_of(_completion, _json, _hostile_text))
def test_fuzz_completions(server, doc):
    _well_formed(server.url, "/v1/completions", _body(doc))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(doc=st.one_of(_chat, _json, _hostile_text))
def test_fuzz_chat_completions(server, doc):
    _well_formed(server.url, "/v1/chat/completions", _body(doc))


def test_the_server_is_healthy_after_the_attacks(server):
    status, _, answer = request(server.url, "GET", "/health")
    assert status == 200 and json.loads(answer)["status"] == "ok"
    assert completion(server.url)[0] == 200


# -- `fmhub server`'s LFS batch endpoint ---------------------------------------------------------


@pytest.fixture(scope="module")
def fmhub_server(tmp_path_factory):
    """`fmhub server` (the git + LFS server, not `fmhub serve`) with one repository and an admin's token."""
    from tests.helpers.server import ADMIN, running_server

    from fmhub.server.repos import init_repo
    from fmhub.server.tokens import add_token

    tmp = tmp_path_factory.mktemp("lfs-fuzz")
    (tmp / "home").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        isolate_git(mp, tmp / "home")
        init_repo(str(tmp / "srv"), "models")
        token = add_token(str(tmp / "srv"), ADMIN, [], ["models"])
        with running_server(tmp / "srv") as (url, _log):
            yield url, token


_oid = st.one_of(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), _json)
_object = st.one_of(st.fixed_dictionaries({"oid": _oid, "size": st.one_of(_small_int, _json)}), _json)
_batch = st.fixed_dictionaries(
    {"operation": st.one_of(st.sampled_from(["download", "upload"]), _json), "objects": st.one_of(st.lists(_object, max_size=4), _json)},
    optional={"transfers": st.one_of(st.just(["basic"]), _json), "hash_algo": st.one_of(st.just("sha256"), _json),
              "ref": _json})


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(doc=st.one_of(_batch, _json, _hostile_text))
def test_fuzz_lfs_batch(fmhub_server, doc):
    url, token = fmhub_server
    status, _, answer = request(url, "POST", "/models.git/info/lfs/objects/batch", _body(doc),
                                {"Authorization": f"Bearer {token}", "Content-Type": "application/vnd.git-lfs+json",
                                 "Accept": "application/vnd.git-lfs+json"})
    assert status < 500, (status, answer[:300])
    if status == 200:
        assert all(o.get("error", {}).get("code", 0) < 500 for o in json.loads(answer)["objects"]), answer[:300]


# -- slow clients --------------------------------------------------------------------------------


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)




def test_slowloris_keeps_no_thread_and_an_honest_client_gets_an_answer_at_once(models, monkeypatch):
    """84 connections sending a header byte a second held every thread for ever (the timeout was per recv) and the accept
    loop then waited for a thread: /health never answered. Now a head has HEADER_TIMEOUT in all, and when no thread is
    free the accept loop answers 503 itself."""
    monkeypatch.setattr(connections, "HEADER_TIMEOUT", 2.0)
    monkeypatch.setattr(connections, "BUSY_TIMEOUT", 0.5)
    srv = _serve(models, "slowloris", backend_options={"max_connections": 4})
    stop, socks = threading.Event(), []

    def drip() -> None:
        while not stop.wait(0.2):
            for s in socks:
                try:
                    s.sendall(b"a")
                except OSError:
                    pass

    try:
        for _ in range(100):
            s = socket.create_connection(_address(srv.url), timeout=10)
            s.sendall(b"GET /health HTTP/1.1\r\nX-a: ")
            socks.append(s)
        threading.Thread(target=drip, daemon=True).start()
        time.sleep(0.5)
        started = time.monotonic()
        status, headers, answer = request(srv.url, "GET", "/health")
        assert time.monotonic() - started < 3 and status in (200, 503), status
        if status == 503:
            assert headers.get("retry-after") == "1" and openai_error(status, answer)["type"] == "server_error"
        # each dribbler is cut off at its deadline, though it keeps sending; then the server is all the honest client's
        assert all(socket_closed_within(s, 5) for s in socks)
        assert request(srv.url, "GET", "/health")[0] == 200
    finally:
        stop.set()
        for s in socks:
            s.close()
        srv.stop()


def test_a_connection_opened_as_another_closes_is_served_not_refused(models):
    """Every serving thread taken, a new connection waits a moment (HANDOVER_S) for one to come free before a 503:
    a client that closes one connection and opens the next at once (64 clients at the default 64 connections)
    was refused while its old thread had still to see the close."""
    srv = _serve(models, "handover", backend_options={"max_connections": 1})
    try:
        holder = socket.create_connection(_address(srv.url), timeout=10)  # an idle keep-alive connection: the one thread
        time.sleep(0.3)
        threading.Timer(0.1, holder.close).start()
        assert request(srv.url, "GET", "/health")[0] == 200
        holder = socket.create_connection(_address(srv.url), timeout=10)  # held past the wait: refused, with Retry-After
        time.sleep(0.3)
        try:
            status, headers, _ = request(srv.url, "GET", "/health")
            assert status == 503 and headers.get("retry-after") == "1"
        finally:
            holder.close()
    finally:
        srv.stop()


def test_a_body_that_trickles_in_is_408_at_its_deadline(server, monkeypatch):
    monkeypatch.setattr(connections, "BODY_TIMEOUT", 1.0)
    body = json.dumps({"model": "a0", "prompt": PROMPT, "max_tokens": 1}).encode()
    with socket.create_connection(_address(server.url), timeout=30) as sock:
        sock.sendall(_head(str(len(body))))
        started = time.monotonic()
        for byte in body[:20]:  # a byte every 0.2 s: each recv is quick, the body never done
            sock.sendall(bytes([byte]))
            time.sleep(0.2)
            if time.monotonic() - started > 1.5:
                break
        resp = http.client.HTTPResponse(sock, method="POST")
        resp.begin()
        assert resp.status == 408 and resp.getheader("connection") == "close"
        openai_error(resp.status, resp.read())
    assert time.monotonic() - started < 5


def test_a_response_waits_for_its_reader_send_timeout_seconds_in_all(monkeypatch):
    """A slow reader of an SSE stream held its thread as long as each send moved within the timeout; blocked time now adds up."""
    monkeypatch.setattr(connections, "SEND_TIMEOUT", 0.5)
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        out = connections.Output(a)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            for _ in range(10_000):  # b never reads
                out.write(b"data: " + b"x" * 200 + b"\n\n")
        assert time.monotonic() - started < 2 and out.left <= 0
