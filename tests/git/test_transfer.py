"""Tensor objects travel through the Git LFS batch API: fmhub.git.endpoint and fmhub.git.transfer against a real server."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import time
import tracemalloc
from pathlib import Path

import pytest

from tests.helpers import git
from tests.helpers.lfs_server import closed_port_url
from fmhub.base.errors import CorruptDownload, FmhubError, RemoteAuthError, RemoteMissingObject, RemoteUnavailable
from fmhub.git.endpoint import Endpoint, derive_lfs_url, endpoint_for
from fmhub.core.store import ObjectStore
from fmhub.git.transfer import BATCH_SIZE, Report, Transfer


@pytest.fixture(autouse=True)
def no_ambient_tokens(monkeypatch):
    """Tokens in the developer's environment must not leak into these tests."""
    for name in ("FMHUB_LFS_AUTHORIZATION", "HF_TOKEN", "HF_ENDPOINT", "GIT_ASKPASS", "SSH_ASKPASS"):
        monkeypatch.delenv(name, raising=False)


def new_store(tmp_path: Path, name: str = "local") -> ObjectStore:
    return ObjectStore.create(str(tmp_path / name))


def add_objects(store: ObjectStore, blobs: list[bytes]) -> list[tuple[str, int]]:
    objs = [(store.write_bytes(b), len(b)) for b in blobs]
    store.flush()
    return objs


def transfer(endpoint: Endpoint | str, store: ObjectStore, **kw) -> Transfer:
    if isinstance(endpoint, str):
        endpoint = Endpoint(endpoint)
    kw.setdefault("backoff", 0.01)
    kw.setdefault("progress", False)
    return Transfer(endpoint, store, **kw)


def blobs(n: int, size: int = 1000, seed: int = 0) -> list[bytes]:
    return [os.urandom(size - 8) + (seed * 100000 + i).to_bytes(8, "big") for i in range(n)]


def temp_files(store: ObjectStore) -> list[str]:
    d = os.path.join(store.path, "tmp")
    return os.listdir(d) if os.path.isdir(d) else []


def methods(server, method: str) -> list:
    return [r for r in server.requests if r.method == method]


# -- upload / download ---------------------------------------------------------


def test_upload_puts_exactly_the_objects_byte_identical(tmp_path, lfs_server):
    store = new_store(tmp_path)
    data = blobs(5, 3000) + [b""]  # an empty tensor is an object too
    objs = add_objects(store, data)

    report = transfer(lfs_server.url, store).upload(objs)

    assert report == Report(6, sum(len(d) for d in data))
    assert lfs_server.objects() == dict(objs)
    for (oid, _), d in zip(objs, data):
        assert lfs_server.object_bytes(oid) == d
    assert len(methods(lfs_server, "PUT")) == 6
    assert len([r for r in methods(lfs_server, "POST") if r.path.endswith("/verify")]) == 6
    fresh = new_store(tmp_path, "fresh")
    assert transfer(lfs_server.url, fresh).download(objs) == report
    assert all(fresh.read_bytes(oid) == d for (oid, _), d in zip(objs, data))


def test_batch_request_is_standard(tmp_path, lfs_server):
    store = new_store(tmp_path)
    objs = add_objects(store, blobs(1))
    seen = {}
    t = transfer(lfs_server.url, store)
    real = t.http.request

    def spy(method, url, **kw):
        if url.endswith("/objects/batch"):
            seen.update(json.loads(kw["body"]))
        return real(method, url, **kw)

    t.http.request = spy
    t.upload(objs)
    assert seen == {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": objs[0][0], "size": objs[0][1]}],
                    "hash_algo": "sha256"}
    batch = [r for r in lfs_server.requests if r.path.endswith("/objects/batch")][0]
    assert batch.path == "/test.git/info/lfs/objects/batch"
    assert batch.headers.get("Accept") == batch.headers.get("Content-Type") == "application/vnd.git-lfs+json"
    put = methods(lfs_server, "PUT")[0]
    assert put.headers.get("Content-Type") == "application/octet-stream"
    assert put.headers.get("Content-Length") == str(objs[0][1])


def test_second_upload_sends_nothing(tmp_path, lfs_server):
    store = new_store(tmp_path)
    objs = add_objects(store, blobs(3))
    t = transfer(lfs_server.url, store)
    t.upload(objs)
    lfs_server.clear_log()

    assert t.missing_on_server(objs) == []
    assert t.upload(objs) == Report(0, 0)
    assert {r.method for r in lfs_server.requests} == {"POST"}
    assert all(r.path.endswith("/objects/batch") for r in lfs_server.requests)


def test_missing_on_server_lists_only_what_it_lacks(tmp_path, lfs_server):
    store = new_store(tmp_path)
    objs = add_objects(store, blobs(4))
    transfer(lfs_server.url, store).upload(objs[:2])
    assert transfer(lfs_server.url, store).missing_on_server(objs) == objs[2:]


def test_more_than_a_batch_of_objects(tmp_path, lfs_server):
    store = new_store(tmp_path)
    objs = add_objects(store, blobs(BATCH_SIZE + 30, 100))
    assert transfer(lfs_server.url, store, concurrency=8).upload(objs).count == BATCH_SIZE + 30
    batches = [r for r in lfs_server.requests if r.path.endswith("/objects/batch")]
    assert len(batches) == 2
    assert lfs_server.objects() == dict(objs)

    fresh = new_store(tmp_path, "fresh")
    assert transfer(lfs_server.url, fresh).download(objs).count == BATCH_SIZE + 30
    assert sorted(fresh.iter_oids()) == sorted(oid for oid, _ in objs)


def test_download_into_fresh_store_verifies_and_skips_present(tmp_path, lfs_server):
    data = blobs(4, 5000)
    oids = [lfs_server.put(d) for d in data]
    objs = [(oid, len(d)) for oid, d in zip(oids, data)]
    store = new_store(tmp_path, "fresh")
    store.write_bytes(data[0])
    store.flush()

    report = transfer(lfs_server.url, store).download(objs)

    assert report == Report(3, sum(len(d) for d in data[1:]))
    for oid, d in zip(oids, data):
        assert store.read_bytes(oid) == d and store.verify(oid)
    assert temp_files(store) == []
    lfs_server.clear_log()
    assert transfer(lfs_server.url, store).download(objs) == Report(0, 0)
    assert lfs_server.requests == []  # all present: not even a batch request


def test_corrupt_object_from_server_is_refused(tmp_path, lfs_server):
    good, bad = blobs(2, 4000)
    objs = [(lfs_server.put(good), len(good)), (lfs_server.put(bad), len(bad))]
    lfs_server.corrupt(objs[1][0])
    store = new_store(tmp_path, "fresh")

    with pytest.raises(CorruptDownload, match=objs[1][0]):
        transfer(lfs_server.url, store, concurrency=1).download(objs)

    assert not store.has(objs[1][0])
    assert not os.path.exists(store.object_path(objs[1][0]))
    assert temp_files(store) == []
    assert objs[1][0] not in set(store.iter_oids())


def test_download_cut_off_midway_is_retried_and_leaves_nothing_partial(tmp_path, lfs_server):
    data = blobs(1, 3 << 20)[0]
    obj = (lfs_server.put(data), len(data))
    store = new_store(tmp_path)
    lfs_server.cut_next_downloads(2)
    assert transfer(lfs_server.url, store).download([obj]) == Report(1, len(data))
    assert store.read_bytes(obj[0]) == data
    assert len(methods(lfs_server, "GET")) == 3
    assert temp_files(store) == []

    lfs_server.cut_next_downloads(10)
    other = new_store(tmp_path, "other")
    with pytest.raises(RemoteUnavailable, match="cut off"):
        transfer(lfs_server.url, other, retries=1).download([obj])
    assert not other.has(obj[0]) and temp_files(other) == []


def test_credentials_stay_on_the_api_origin(tmp_path):
    t = transfer(Endpoint("https://lfs.example.com/repo.git/info/lfs", {"Authorization": "Bearer t"}), new_store(tmp_path))
    assert t._headers("https://lfs.example.com/objects/x", {}, False)["Authorization"] == "Bearer t"
    presigned = t._headers("https://bucket.s3.example.com/x?sig=1", {"X-Amz": "1"}, False)
    assert "Authorization" not in presigned and presigned["X-Amz"] == "1"
    own = t._headers("https://lfs.example.com/objects/x", {"Authorization": "RemoteAuth abc"}, True)
    assert own["Authorization"] == "RemoteAuth abc"


def test_download_of_object_the_server_lacks(tmp_path, lfs_server):
    oid = hashlib.sha256(b"never pushed").hexdigest()
    with pytest.raises(RemoteMissingObject, match=oid):
        transfer(lfs_server.url, new_store(tmp_path)).download([(oid, 12)])


# -- faults --------------------------------------------------------------------


def test_503_twice_then_success_is_retried(tmp_path, lfs_server):
    store = new_store(tmp_path)
    objs = add_objects(store, blobs(2))
    lfs_server.fail_next(2, 503)
    assert transfer(lfs_server.url, store).upload(objs).count == 2
    statuses_seen = len(lfs_server.requests)
    assert statuses_seen == 2 + 1 + 2 * 2  # two failures, the batch, a PUT and a verify per object
    assert lfs_server.objects() == dict(objs)


def test_503_during_transfers_is_retried(tmp_path, lfs_server):
    data = blobs(3)
    objs = [(lfs_server.put(d), len(d)) for d in data]
    store = new_store(tmp_path)
    t = transfer(lfs_server.url, store, concurrency=1)
    answers = t.batch("download", objs)  # the next requests are the GETs
    lfs_server.fail_next(2, 502)
    assert t.download(objs).count == 3
    assert len(answers) == 3 and all("download" in a.actions for a in answers.values())


def test_429_waits_for_retry_after(tmp_path, lfs_server):
    store = new_store(tmp_path)
    objs = add_objects(store, blobs(1))
    lfs_server.fail_next(1, 429, retry_after="1")
    start = time.monotonic()
    assert transfer(lfs_server.url, store).upload(objs).count == 1
    assert time.monotonic() - start >= 1.0


def test_persistent_5xx_gives_up_with_a_clear_error(tmp_path, lfs_server):
    store = new_store(tmp_path)
    objs = add_objects(store, blobs(1))
    lfs_server.fail_next(100, 500)
    with pytest.raises(RemoteUnavailable, match=r"HTTP 500.*gave up after 3 attempts"):
        transfer(lfs_server.url, store, retries=2).upload(objs)
    assert len(lfs_server.requests) == 3


def test_401_gives_a_clear_error(tmp_path, lfs_server):
    lfs_server.require_auth("Bearer right")
    store = new_store(tmp_path)
    objs = add_objects(store, blobs(1))
    with pytest.raises(RemoteAuthError) as err:
        transfer(lfs_server.url, store).upload(objs)
    msg = str(err.value)
    assert "401" in msg and lfs_server.url in msg
    assert "git credential (no credentials returned)" in msg
    assert "FMHUB_LFS_AUTHORIZATION" in msg and "extraHeader" in msg
    assert lfs_server.objects() == {}


def test_401_names_the_token_that_was_refused(tmp_path, lfs_server, monkeypatch):
    lfs_server.require_auth("Bearer right")
    monkeypatch.setenv("FMHUB_LFS_AUTHORIZATION", "Bearer wrong")
    repo = tmp_path / "r"
    git_init_with_lfs_url(repo, lfs_server.url)
    with pytest.raises(RemoteAuthError, match="credentials tried: FMHUB_LFS_AUTHORIZATION"):
        transfer(endpoint_for(cwd=str(repo)), new_store(tmp_path)).download([(hashlib.sha256(b"x").hexdigest(), 1)])
    assert len(lfs_server.requests) == 1  # an explicit token is not replaced by a credential helper's


def test_server_down_gives_a_clear_error(tmp_path):
    store = new_store(tmp_path)
    objs = add_objects(store, blobs(1))
    url = closed_port_url()
    with pytest.raises(RemoteUnavailable) as err:
        transfer(url, store, retries=2).upload(objs)
    msg = str(err.value)
    assert url in msg and "connection refused" in msg and "lfs.url" in msg


# -- auth sources ----------------------------------------------------------------


def git_init_with_lfs_url(repo: Path, url: str) -> None:
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "-q")
    git(repo, "config", "lfs.url", url)


def test_auth_from_http_extraheader_reaches_the_server(tmp_path, lfs_server):
    repo = tmp_path / "r"
    git_init_with_lfs_url(repo, lfs_server.url)
    git(repo, "config", "http.extraHeader", "Authorization: Bearer from-config")
    git(repo, "config", "--add", "http.extraHeader", "X-Trace: 1")
    git(repo, "config", "http.https://elsewhere.example.extraHeader", "X-Other: no")
    lfs_server.require_auth("Bearer from-config")
    endpoint = endpoint_for(cwd=str(repo))
    assert endpoint.auth_source == "http.extraHeader (git config)"
    store = new_store(tmp_path)
    objs = add_objects(store, blobs(2))

    assert transfer(endpoint, store).upload(objs).count == 2
    assert lfs_server.requests
    for r in lfs_server.requests:
        assert r.headers.get("Authorization") == "Bearer from-config"
        assert r.headers.get("X-Trace") == "1" and r.headers.get("X-Other") is None


def test_url_specific_extraheader(tmp_path, lfs_server):
    repo = tmp_path / "r"
    git_init_with_lfs_url(repo, lfs_server.url)
    git(repo, "config", f"http.{lfs_server.base_url}/test.git.extraHeader", "Authorization: Bearer scoped")
    assert endpoint_for(cwd=str(repo)).headers == {"Authorization": "Bearer scoped"}
    git(repo, "config", f"http.{lfs_server.base_url}/other.git.extraHeader", "Authorization: Bearer wrong")
    git(repo, "config", "--unset", f"http.{lfs_server.base_url}/test.git.extraHeader")
    assert endpoint_for(cwd=str(repo)).headers == {}


def test_auth_from_hf_token_reaches_the_server(tmp_path, lfs_server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("HF_ENDPOINT", lfs_server.base_url)
    repo = tmp_path / "r"
    git_init_with_lfs_url(repo, lfs_server.url)
    lfs_server.require_auth("Bearer hf_secret")
    endpoint = endpoint_for(cwd=str(repo))
    assert endpoint.auth_source == "HF_TOKEN"
    store = new_store(tmp_path)
    objs = add_objects(store, blobs(1))
    assert transfer(endpoint, store).upload(objs).count == 1
    assert all(r.headers.get("Authorization") == "Bearer hf_secret" for r in lfs_server.requests)


def test_hf_token_only_for_hugging_face_hosts(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    repo = tmp_path / "r"
    git_init_with_lfs_url(repo, "https://example.com/x.git/info/lfs")
    assert endpoint_for(cwd=str(repo)).headers == {}
    git(repo, "config", "lfs.url", "https://huggingface.co/org/model.git/info/lfs")
    assert endpoint_for(cwd=str(repo)).headers == {"Authorization": "Bearer hf_secret"}


def test_env_authorization_beats_hf_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("FMHUB_LFS_AUTHORIZATION", "Basic abc")
    repo = tmp_path / "r"
    git_init_with_lfs_url(repo, "https://huggingface.co/org/model.git/info/lfs")
    ep = endpoint_for(cwd=str(repo))
    assert (ep.headers, ep.auth_source) == ({"Authorization": "Basic abc"}, "FMHUB_LFS_AUTHORIZATION")


def credential_helper(repo: Path, log: Path, password: str) -> None:
    script = f'!f() {{ echo "$1" >> "{log}"; test "$1" = get && echo username=alice && echo password={password}; true; }}; f'
    git(repo, "config", "credential.helper", script)


def test_git_credential_fill_then_approve(tmp_path, lfs_server):
    repo = tmp_path / "r"
    git_init_with_lfs_url(repo, lfs_server.url)
    log = tmp_path / "helper.log"
    credential_helper(repo, log, "s3cret")
    lfs_server.require_auth("Basic " + base64.b64encode(b"alice:s3cret").decode())
    endpoint = endpoint_for(cwd=str(repo))
    assert endpoint.auth_source == "none" and not log.exists()  # asked lazily, on the first 401
    store = new_store(tmp_path)
    objs = add_objects(store, blobs(2))

    assert transfer(endpoint, store).upload(objs).count == 2
    assert endpoint.auth_source == "git credential"
    assert log.read_text().split() == ["get", "store"]
    assert lfs_server.objects() == dict(objs)


def test_git_credential_rejected_after_401(tmp_path, lfs_server):
    repo = tmp_path / "r"
    git_init_with_lfs_url(repo, lfs_server.url)
    log = tmp_path / "helper.log"
    credential_helper(repo, log, "stale")
    lfs_server.require_auth("Basic " + base64.b64encode(b"alice:s3cret").decode())
    store = new_store(tmp_path)
    objs = add_objects(store, blobs(1))
    with pytest.raises(RemoteAuthError, match="git credential"):
        transfer(endpoint_for(cwd=str(repo)), store).upload(objs)
    assert log.read_text().split() == ["get", "erase"]


# -- endpoint derivation -----------------------------------------------------------


@pytest.mark.parametrize(
    "remote_url, lfs_url",
    [
        ("https://example.com/org/model", "https://example.com/org/model.git/info/lfs"),
        ("https://example.com/org/model.git", "https://example.com/org/model.git/info/lfs"),
        ("https://example.com/org/model.git/", "https://example.com/org/model.git/info/lfs"),
        ("http://127.0.0.1:8080/m", "http://127.0.0.1:8080/m.git/info/lfs"),
        ("ssh://git@example.com/org/model.git", "https://example.com/org/model.git/info/lfs"),
        ("ssh://git@example.com:2222/org/model", "https://example.com/org/model.git/info/lfs"),
        ("git@example.com:org/model.git", "https://example.com/org/model.git/info/lfs"),
        ("example.com:org/model", "https://example.com/org/model.git/info/lfs"),
        ("git://example.com/org/model", "https://example.com/org/model.git/info/lfs"),
    ],
)
def test_derive_lfs_url(remote_url, lfs_url):
    assert derive_lfs_url(remote_url) == lfs_url


@pytest.mark.parametrize("local", ["/srv/models.git", "../models", "models", "file:///srv/models.git"])
def test_local_remotes_have_no_lfs_server(local):
    with pytest.raises(FmhubError, match="local repositor.*lfs.url"):
        derive_lfs_url(local)


def test_endpoint_for_reads_git_config(tmp_path):
    repo = tmp_path / "r"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "remote", "add", "origin", "git@example.com:org/model.git")
    assert endpoint_for(cwd=str(repo)).url == "https://example.com/org/model.git/info/lfs"

    git(repo, "config", "remote.origin.pushurl", "https://push.example.com/org/model")
    assert endpoint_for(cwd=str(repo), operation="upload").url == "https://push.example.com/org/model.git/info/lfs"
    assert endpoint_for(cwd=str(repo)).url == "https://example.com/org/model.git/info/lfs"

    git(repo, "config", "remote.origin.lfsurl", "https://lfs.example.com/api")
    assert endpoint_for(cwd=str(repo)).url == "https://lfs.example.com/api"
    git(repo, "config", "lfs.url", "https://user@global.example.com/lfs")
    ep = endpoint_for(cwd=str(repo))
    assert (ep.url, ep.username) == ("https://global.example.com/lfs", "user")

    git(repo, "remote", "add", "local", str(tmp_path / "elsewhere.git"))
    assert endpoint_for("local", cwd=str(repo)).url == "https://global.example.com/lfs"  # lfs.url wins
    git(repo, "config", "--unset", "lfs.url")
    with pytest.raises(FmhubError, match="local repository"):
        endpoint_for("local", cwd=str(repo))
    with pytest.raises(FmhubError, match="no remote named 'nope'"):
        endpoint_for("nope", cwd=str(repo))


# -- streaming -----------------------------------------------------------------------


def test_20mb_object_streams_in_bounded_memory(tmp_path, lfs_server):
    size = 20 << 20
    src = new_store(tmp_path)
    w = src.writer()
    for _ in range(20):
        w.write(os.urandom(1 << 20))
    oid = w.commit()
    src.close()
    dst = new_store(tmp_path, "fresh")

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        assert transfer(lfs_server.url, src).upload([(oid, size)]) == Report(1, size)
        _, up_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        assert transfer(lfs_server.url, dst).download([(oid, size)]) == Report(1, size)
        _, down_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    limit = 6 << 20  # client and server (same process) together, far below the object's 20 MiB
    assert up_peak - base < limit, f"upload peak {(up_peak - base) >> 20} MiB"
    assert down_peak - base < limit, f"download peak {(down_peak - base) >> 20} MiB"
    assert dst.verify(oid)


# -- git-lfs itself against the test server --------------------------------------------


@pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs is not installed")
def test_git_lfs_pushes_and_fetches_through_the_test_server(tmp_path, lfs_server):
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}

    def run(cwd: Path, *args: str, stdin: bytes | None = None) -> bytes:
        proc = subprocess.run(list(args), cwd=cwd, input=stdin, capture_output=True, env=env)
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout

    remote = tmp_path / "remote.git"
    run(tmp_path, "git", "init", "-q", "--bare", str(remote))
    work = tmp_path / "work"
    work.mkdir()
    run(work, "git", "init", "-q")
    run(work, "git", "lfs", "install", "--local")
    run(work, "git", "lfs", "track", "*.bin")
    run(work, "git", "config", "lfs.url", lfs_server.url)
    payload = os.urandom(300_000)
    (work / "a.bin").write_bytes(payload)
    run(work, "git", "add", ".")
    run(work, "git", "commit", "-qm", "a")
    run(work, "git", "remote", "add", "origin", str(remote))
    run(work, "git", "push", "-q", "origin", "HEAD:main")
    oid = hashlib.sha256(payload).hexdigest()
    assert lfs_server.objects() == {oid: len(payload)}

    store = new_store(tmp_path)  # fmhub reads what git-lfs pushed
    assert transfer(lfs_server.url, store).download([(oid, len(payload))]).count == 1
    other = os.urandom(5000)  # git-lfs reads what fmhub pushed
    (other_oid, n), = add_objects(store, [other])
    transfer(lfs_server.url, store).upload([(other_oid, n)])
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{other_oid}\nsize {n}\n".encode()
    assert run(work, "git", "lfs", "smudge", "x.bin", stdin=pointer) == other
