"""`fmhub server` attacked: each test is an input that would get past one of its checks if that check were gone.

The attacker holds a token that may read only ``public/`` (READER), or no
token, or a token for another repository on the same server (OUTSIDER).
One server per xdist worker (module fixture ``world``), started as users
start it (a subprocess), with its own repositories; tests that push get a
repository of their own (``world.seed(NAME)``), so a defence that failed
in one test cannot spoil another. Clients are plain git (with plumbing,
so nothing local stops them), raw HTTP, and fmhub where a checkout matters.
Also here: the server-side checks tests/models/test_access.py used to make on
``fmhub.lfs_policy`` (retired), ported to `fmhub server`.
"""

from __future__ import annotations

import base64
import contextlib
import concurrent.futures
import gzip
import hashlib
import http.client
import io
import json
import os
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import torch

from tests.helpers import committed_manifest, fmhub, git, isolate_git, run, sha256_file, socket_closed_within
from tests.helpers.server import ADMIN, POLICY, READER, audit_entries, batch, clone, running_server, use_token, work_tree

from fmhub.server.repos import init_repo
from fmhub.server.tokens import Tokens, add_token, digest, token_of

OUTSIDER = "outsider@example.com"
MAX_OBJECT = 1 << 20  # the server's --max-object-size
# the helpers' policy, and: tensor "b" of public checkpoints unreadable to non-admins, tensor "w" unwritable
ATTACK_POLICY = POLICY + """\
  - deny: [read]
    paths: ["public/*.safetensors"]
    tensors: ["b"]
  - deny: [write]
    paths: ["public/*.safetensors"]
    tensors: ["w"]
"""
# repositories: models (read-only attacks), other (the outsider's), one per pushing test
PUSHED = ["ff", "oracle", "bogus", "flip", "race", "broken", "writes"]
RANDOM_OID = hashlib.sha256(b"no object has these bytes").hexdigest()


@dataclass
class World:
    tmp: Path
    root: Path
    url: str
    log: list
    admin: str
    reader: str
    outsider: str
    work: Path
    secrets: list  # [(oid, size)] of secret/s.safetensors
    public: dict  # oid -> size of public/p.safetensors, header and tensors
    tensor_b: str  # the oid of public/p's tensor "b" (unreadable to the reader)
    seeded: set = field(default_factory=set)

    def seed(self, name: str) -> str:
        """Push the admin's main (policy, checkpoints, their LFS objects) to ``name``; its URL."""
        if name not in self.seeded:
            git(self.work, "push", "-q", f"{self.url}/{name}.git", "main")
            self.seeded.add(name)
        return f"{self.url}/{name}.git"

    def new_log(self, since: int) -> str:
        return "".join(self.log[since:])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("attacks")
    home = tmp / "home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        isolate_git(mp, home)
        root = tmp / "srv"
        for name in ["models", "other", *PUSHED]:
            init_repo(str(root), name)
        mine = ["models", *PUSHED]
        admin = add_token(str(root), ADMIN, [], mine)
        reader = add_token(str(root), READER, mine, [])
        outsider = add_token(str(root), OUTSIDER, ["other"], [])
        # a symbolic link to a repository, and a directory whose name ends in .git.git, with tokens that name them
        os.symlink(root / "models.git", root / "link.git")
        run(["git", "init", "-q", "--bare", str(root / "twice.git.git")], tmp)
        add_token(str(root), "linker@example.com", ["link", "twice.git"], ["link", "twice.git"])
        with running_server(root, "--max-object-size", str(MAX_OBJECT)) as (url, log):
            torch.manual_seed(0)
            work = work_tree(tmp, {"public/p.safetensors": {"w": torch.randn(64, 64), "b": torch.randn(64)},
                                   "secret/s.safetensors": {"w": torch.randn(64, 64) * 7}}, ATTACK_POLICY)
            use_token(work, url, admin, ADMIN)
            pub = committed_manifest(work, "HEAD", "public/p.safetensors")
            w = World(tmp, root, url, log, admin, reader, outsider, work,
                      committed_manifest(work, "HEAD", "secret/s.safetensors").oids(), dict(pub.oids()),
                      next(t.oid for t in pub.tensors if t.name == "b"))
            w.seed("models")
            yield w


# -- clients -------------------------------------------------------------------------------------


def raw(world: World, method: str, path: str, token: Optional[str] = None, body: Optional[bytes] = None,
        headers: Optional[dict] = None, auth: Optional[str] = None) -> tuple[int, bytes, dict]:
    """One request with the path sent byte for byte (urllib would normalize it): (status, body, headers)."""
    conn = http.client.HTTPConnection(world.url.removeprefix("http://"), timeout=60)
    h = {"Content-Type": "application/vnd.git-lfs+json", **(headers or {})}
    if token:
        h["Authorization"] = f"Bearer {token}"
    if auth is not None:
        h["Authorization"] = auth
    try:
        conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def storage(repo: str, oid: str) -> str:
    return f"/{repo}.git/info/lfs/objects/storage/{oid}"


def put(world: World, repo: str, token: str, oid: str, data: bytes, chunked: bool = False) -> int:
    if not chunked:
        return raw(world, "PUT", storage(repo, oid), token, data, {"Content-Type": "application/octet-stream"})[0]
    conn = http.client.HTTPConnection(world.url.removeprefix("http://"), timeout=60)
    try:
        conn.putrequest("PUT", storage(repo, oid))
        conn.putheader("Authorization", f"Bearer {token}")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for i in range(0, len(data), 1 << 16):
            part = data[i:i + (1 << 16)]
            conn.send(b"%x\r\n%s\r\n" % (len(part), part))
        conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def git_client(tmp_path: Path, url: str, token: str, user: str, dest: str) -> Path:
    """A plain git clone (no fmhub, no checkout) holding ``token``: nothing on the client stops what it pushes."""
    path = tmp_path / dest
    header = f"http.extraHeader=Authorization: Bearer {token}"
    run(["git", "-c", header, "clone", "-q", "--no-checkout", url, str(path)], tmp_path)
    git(path, "config", "http.extraHeader", f"Authorization: Bearer {token}")
    git(path, "config", "user.email", user)
    return path


def sh(repo: Path, *args: str, env: Optional[dict] = None, stdin: Optional[bytes] = None) -> str:
    return run(["git", *args], repo, env={**os.environ, **(env or {})}, input=stdin).stdout.decode().strip()


def commit(repo: Path, base: Optional[str], changes: dict, parents: list[str], message: str = "attack") -> str:
    """A commit made with plumbing: ``base``'s tree (None: empty) with ``changes`` (path -> bytes, or None to remove)."""
    env = {"GIT_INDEX_FILE": str(repo / ".git" / "attack-index")}
    Path(env["GIT_INDEX_FILE"]).unlink(missing_ok=True)
    if base:
        sh(repo, "read-tree", base, env=env)
    for path, data in changes.items():
        if data is None:
            sh(repo, "update-index", "--force-remove", path, env=env)
        else:
            blob = sh(repo, "hash-object", "-w", "--no-filters", "--stdin", stdin=data)
            sh(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
    tree = sh(repo, "write-tree", env=env)
    return sh(repo, "commit-tree", tree, *[a for p in parents for a in ("-p", p)], "-m", message)


def push(repo: Path, refspec: str) -> tuple[int, str]:
    proc = git(repo, "push", "--no-verify", "origin", refspec, check=False)
    return proc.returncode, proc.stderr.decode()


def remote_ref(repo: Path, ref: str) -> str:
    out = git(repo, "ls-remote", "origin", ref).stdout.decode().split()
    return out[0] if out else ""


def codes(answer: dict) -> list:
    return [o.get("error", {}).get("code") for o in answer["objects"]]


# -- who is asking, and which repository --------------------------------------------------------


def test_path_tricks_reach_no_other_route_nor_repository(world):
    sec, _size = world.secrets[0]
    for path in [storage("models", sec), f"/{storage('models', sec)}", f"/_{storage('models', sec)}",
                 f"/models.git%2finfo%2flfs/objects/storage/{sec}", f"{storage('models', sec)}?download=1",
                 f"/models.git/./info/lfs/objects/storage/{sec}", f"/models.git/info/lfs/objects/storage/../storage/{sec}",
                 f"/x/../models.git/info/lfs/objects/storage/{sec}", f"/_/_/models.git/info/lfs/objects/storage/{sec}",
                 f"/_//models.git/info/lfs/objects/storage/{sec}", storage("MODELS", sec), storage("models.git", sec),
                 storage("models", sec.upper()), storage("models", sec) + "/", storage("models", sec) + "%00",
                 storage("models", "..%2f..%2f..%2ftokens.yaml"), f"http://elsewhere{storage('models', sec)}"]:
        status, body, _ = raw(world, "GET", path, world.reader)
        assert status in (400, 403, 404), (path, status)
        assert b"Traceback" not in body and len(body) < 1000
    # the admin's token shows which of these are the object's route (so the reader's refusals above are decisions)
    assert raw(world, "GET", f"/{storage('models', sec)}", world.admin)[0] == 200
    assert raw(world, "GET", f"/models.git%2finfo%2flfs/objects/storage/{sec}", world.admin)[0] == 200
    # git routes are not served under the LFS prefix; a symbolic link and a NAME.git.git are no repository, whatever the token says
    assert raw(world, "GET", "/_/models.git/info/refs?service=git-upload-pack", world.admin)[0] == 404
    linker = add_token(str(world.root), "linker2@example.com", ["link", "twice.git"], ["link", "twice.git"])
    for path in ["/link.git/info/refs?service=git-upload-pack", "/twice.git.git/info/refs?service=git-upload-pack",
                 "/link.git/info/lfs/objects/batch", "/../srv/models.git/info/refs?service=git-upload-pack"]:
        method, body = ("POST", json.dumps({"operation": "download", "objects": [{"oid": sec, "size": 1}]}).encode()) \
            if "batch" in path else ("GET", None)
        assert raw(world, method, path, linker, body)[0] == 404, path


def test_token_tricks_get_401_and_another_repositorys_token_gets_404(world):
    pub = next(iter(world.public))
    path = storage("models", pub)
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    stored_digest = digest(world.reader)  # what the tokens file holds: not a token
    for auth in [None, "", "Bearer", "Bearer    ", f"Basic {b64('reader:')}", f"Basic {b64(world.reader)}", "Basic !!notbase64",
                 f"Token {world.reader}", f"Bearer {world.reader}x", f"Bearer {world.reader[:-1]}", f"Bearer {stored_digest}",
                 f"Bearer {stored_digest.removeprefix('sha256:')}", f"Bearer {world.reader},{world.admin}",
                 "Basic " + base64.b64encode(b"x:\xff\xfe").decode()]:
        status, body, headers = raw(world, "GET", path, auth=auth)
        assert status == 401, auth
        assert headers["www-authenticate"] == headers["lfs-authenticate"] == 'Basic realm="fmhub"'
        assert json.loads(body)["message"].startswith("credentials needed")
    assert raw(world, "GET", "/models.git/info/refs?service=git-upload-pack")[0] == 401
    assert raw(world, "GET", "/nosuch.git/info/refs?service=git-upload-pack")[0] == 401  # no token: nothing said about names
    # the token travels as Basic's password (any user name, including someone else's) or Bearer (any spacing, any case)
    for auth in [f"Basic {b64('x:' + world.reader)}", f"Basic {b64(ADMIN + ':' + world.reader)}", f"bearer   {world.reader}  "]:
        assert raw(world, "GET", path, auth=auth)[0] == 200, auth
        assert raw(world, "GET", storage("models", world.secrets[0][0]), auth=auth)[0] == 403, auth  # still the reader
    # a token for another repository: every route answers as for a repository that does not exist
    for path, method in [(storage("models", pub), "GET"), ("/models.git/info/lfs/objects/batch", "POST"),
                         ("/models.git/info/lfs/objects/storage/verify", "POST"), (f"/_{storage('models', pub)}", "GET"),
                         ("/models.git/info/refs?service=git-upload-pack", "GET"), ("/models.git/git-receive-pack", "POST")]:
        status, body, _ = raw(world, method, path, world.outsider, b"{}" if method == "POST" else None)
        assert status == 404 and b"models.git not found" in body, (path, status, body)
        assert raw(world, method, path.replace("models", "nosuch"), world.outsider, b"{}" if method == "POST" else None)[1] == \
            body.replace(b"models", b"nosuch")
    entries = audit_entries(world.root, "models")
    assert any(e["decision"] == "deny" and e["details"].get("action") == "authenticate" and e["who"] == "" for e in entries)
    assert any(e["decision"] == "deny" and e["details"].get("action") == "open" and e["who"] == OUTSIDER for e in entries)


def test_a_token_for_another_repository_reaches_none_of_its_objects_in_the_shared_store(world, tmp_path):
    """One storage directory holds every repository's objects: each under its own name, reached only through it."""
    data = b"the outsider's own object"
    oid = hashlib.sha256(data).hexdigest()
    assert put(world, "other", world.outsider, oid, data) == 200
    assert raw(world, "GET", storage("other", oid), world.outsider)[:2] == (200, data)
    # through models, nobody gets it: not the reader, not the admin (it is not models' object), not the outsider
    for token in (world.reader, world.admin):
        status, answer, _ = batch(world.url, "models", token, [(oid, len(data))])
        assert status == 200 and codes(answer)[0] in (403, 404) and "actions" not in answer["objects"][0]
        assert raw(world, "GET", storage("models", oid), token)[0] in (403, 404)
    assert raw(world, "GET", storage("other", oid), world.reader)[0] == 404
    assert raw(world, "GET", f"/_{storage('other', oid)}", world.reader)[0] == 404
    assert raw(world, "GET", storage("models", world.secrets[0][0]), world.outsider)[0] == 404
    # and a push to models cannot name it: for models it is not an object anyone uploaded
    url = world.seed("oracle")
    r = git_client(tmp_path, url, world.reader, READER, "reader")
    manifest = git(r, "show", "origin/main:public/p.safetensors").stdout.replace(world.tensor_b.encode(), oid.encode())
    refused = push(r, commit(r, "origin/main", {"scratch/q.safetensors": manifest}, ["origin/main"]) + ":refs/heads/borrow")
    assert refused[0] != 0 and "neither uploaded nor may read" in refused[1], refused


# -- objects: per-object decisions, uploads, no oracle -------------------------------------------


def test_reader_gets_per_object_and_per_tensor_403s_naming_the_rule_not_the_secret(world):
    """Ported from test_access's test_server_denies_restricted_objects_per_object (fmhub.lfs_policy)."""
    mark = len(audit_entries(world.root, "models"))
    asked = [*world.secrets, *world.public.items()]
    status, answer, _ = batch(world.url, "models", world.reader, asked)
    assert status == 200
    by_oid = {o["oid"]: o for o in answer["objects"]}
    for oid, _size in world.secrets + [(world.tensor_b, 0)]:  # secret/ as a whole; public's tensor "b" alone
        assert by_oid[oid]["error"]["code"] == 403 and "actions" not in by_oid[oid]
        msg = by_oid[oid]["error"]["message"]
        assert msg.startswith(f"access denied: {READER} may not read object {oid}") and "'admin'" in msg
        assert ADMIN not in msg and "secret/" not in msg and ".fmhub/policy.yaml:" in msg
    for oid in set(world.public) - {world.tensor_b}:  # the header and tensor "w" of the same file
        assert "download" in by_oid[oid]["actions"]
    for oid, size in world.secrets + [(world.tensor_b, world.public[world.tensor_b])]:
        assert raw(world, "GET", storage("models", oid), world.reader)[0] == 403
        status, data, _ = raw(world, "GET", storage("models", oid), world.admin)
        assert status == 200 and len(data) == size and hashlib.sha256(data).hexdigest() == oid
    status, answer, _ = batch(world.url, "models", world.admin, asked)
    assert all("download" in o["actions"] for o in answer["objects"])
    new = audit_entries(world.root, "models")[mark:]
    denied = [e for e in new if e["decision"] == "deny" and e["who"] == READER]
    assert {e["details"].get("via") for e in denied} >= {"batch", "download"}
    assert sorted(next(e for e in denied if e["details"].get("via") == "batch")["details"]["objects"]) == \
        sorted([o for o, _s in world.secrets] + [world.tensor_b])


def test_the_reader_cannot_download_even_when_the_client_claims_to_be_the_admin(world, tmp_path, monkeypatch):
    """Ported from test_access's test_clone_with_unprivileged_token_cannot_download_even_if_client_lies."""
    monkeypatch.setenv("FMHUB_USER", ADMIN)  # the client's own checks believe it
    r, checkout = clone(tmp_path, world.url, "models", world.reader, ADMIN, "liar", check=False)
    retry = git(r, "checkout", "-q", "main", "--", "secret/s.safetensors", check=False)
    for proc, oid in [(checkout, world.tensor_b), (retry, None)]:
        err = proc.stderr.decode()
        assert proc.returncode != 0 and f"access denied: {READER} may not read object {oid or ''}" in err, err
        assert "(.fmhub/policy.yaml:" in err and "ask a maintainer for role 'admin'" in err and ADMIN not in err
    assert not (r / "public/p.safetensors").exists() and not (r / "secret/s.safetensors").exists()


def test_forged_and_oversized_uploads_store_nothing(world):
    store = world.root / ".fmhub" / "lfs" / "_" / "models"
    staging = world.root / ".fmhub" / "lfs" / ".tmp"  # uploads are staged beside the objects
    pub = next(iter(world.public))
    before = sha256_file(store / pub)
    # other bytes under an existing object's oid, and under a new oid: 422, nothing stored, nothing replaced
    fake = hashlib.sha256(b"claimed").hexdigest()
    for oid in (pub, world.secrets[0][0], fake):
        for chunked in (False, True):
            assert put(world, "models", world.reader, oid, b"not the bytes of " + oid.encode(), chunked) == 422, (oid, chunked)
    assert sha256_file(store / pub) == before and not (store / fake).exists()
    assert raw(world, "GET", storage("models", pub), world.reader)[1] == (store / pub).read_bytes()
    # a chunked upload (no Content-Length) of the right bytes is stored
    data = os.urandom(200_000)
    oid = hashlib.sha256(data).hexdigest()
    assert put(world, "models", world.reader, oid, data, chunked=True) == 200 and sha256_file(store / oid) == oid
    # --max-object-size: refused by Content-Length, while streaming a chunked body, and in the upload batch
    big = os.urandom(MAX_OBJECT + 1)
    big_oid = hashlib.sha256(big).hexdigest()
    assert put(world, "models", world.reader, big_oid, big) == 413
    assert put(world, "models", world.reader, big_oid, big, chunked=True) == 413
    assert not (store / big_oid).exists()
    status, answer, _ = batch(world.url, "models", world.reader, [(big_oid, MAX_OBJECT + 1), (RANDOM_OID, 5)], "upload")
    assert codes(answer) == [422, None] and "upload" in answer["objects"][1]["actions"]
    # racing uploads of one oid, right and wrong bytes: the wrong ones fail, the stored bytes are the right ones
    data = os.urandom(300_000)
    oid = hashlib.sha256(data).hexdigest()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: put(world, "models", world.reader, oid, data if i % 2 else data[::-1], chunked=i % 4 < 2),
                                range(16)))
    assert results == [422 if i % 2 == 0 else 200 for i in range(16)]
    assert sha256_file(store / oid) == oid
    assert not list(staging.iterdir())  # no temp file left behind


def test_batch_and_verify_bounds_and_no_existence_oracle(world):
    sec, ssize = world.secrets[0]
    pub, psize = next(iter(world.public.items()))
    body = lambda n: json.dumps({"operation": "download", "objects": [{"oid": "%064x" % i, "size": 1} for i in range(n)]}).encode()  # noqa: E731
    assert raw(world, "POST", "/models.git/info/lfs/objects/batch", world.reader, body(10_001))[0] == 400
    status, data, _ = raw(world, "POST", "/models.git/info/lfs/objects/batch", world.reader, body(10_000))
    assert status == 200 and codes(json.loads(data)) == [403] * 10_000
    # over 4 MiB: refused by its Content-Length before it is read (fmhub.server.gate)
    status, data, _ = raw(world, "POST", "/models.git/info/lfs/objects/batch", world.reader, b"{" + b" " * (4 << 20) + b"}")
    assert status == 413 and json.loads(data)["message"] == f"request bodies to this URL are at most {4 << 20} bytes"
    # verify: an object the reader may not read answers 403 whatever the size and whether or not it is stored;
    # one they may read tells the truth (422 for a wrong size)
    verify = "/models.git/info/lfs/objects/storage/verify"
    answers = {raw(world, "POST", verify, world.reader, json.dumps({"oid": o, "size": s}).encode())[:2]
               for o, s in [(sec, ssize), (sec, ssize + 1), (RANDOM_OID, ssize)]}
    assert {s for s, _b in answers} == {403} and len(answers) == 2  # the two sizes of the secret object: one answer
    assert raw(world, "POST", verify, world.reader, json.dumps({"oid": pub, "size": psize + 1}).encode())[0] == 422
    assert raw(world, "POST", verify, world.reader, json.dumps({"oid": pub, "size": psize}).encode())[0] == 200
    for bad in [b"[]", b"{}", b'{"oid": "' + pub.encode() + b'", "size": 1.5}', b'{"oid": "../x", "size": 1}', b"\xff"]:
        assert raw(world, "POST", verify, world.reader, bad)[0] == 400, bad
    # a Range asks for part of a denied object: still 403; a query cannot put headers in a download (was a 500)
    assert raw(world, "GET", storage("models", sec), world.reader, headers={"Range": "bytes=0-3"})[0] == 403
    status, data, headers = raw(world, "GET", storage("models", pub) + "?disposition=a%0d%0aX-Injected:%201", world.reader)
    assert status == 200 and hashlib.sha256(data).hexdigest() == pub and "x-injected" not in headers
    assert raw(world, "HEAD", storage("models", pub), world.reader)[0] == 404


# -- git: the dumb protocol, malformed requests, a gzip bomb ------------------------------------------


def _server_pid(root: Path) -> int:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"server" in cmd and str(root).encode() in cmd:
            return int(pid)
    raise AssertionError("no server process")


def _rss_mib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) // 1024


@contextlib.contextmanager
def rss_growth(world):
    """Yield a one-item list that holds, once the block ends, how many MiB the server's RSS grew above where it started."""
    pid = _server_pid(world.root)
    base, grown, done = _rss_mib(pid), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            grown[0] = max(grown[0], _rss_mib(pid) - base)
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    try:
        yield grown
    finally:
        done.set()


def test_dumb_protocol_and_malformed_git_requests_get_4xx_not_a_traceback(world):
    mark = len(world.log)
    for path in ["/models.git/HEAD", "/models.git/objects/info/packs", "/models.git/info/refs", "/models.git/config",
                 "/models.git/info/refs?service=git-upload-archive", "/models.git/fmhub/audit.log",
                 "/models.git/objects/" + world.secrets[0][0][:2] + "/" + world.secrets[0][0][2:40]]:
        status, body, _ = raw(world, "GET", path, world.admin)
        assert status in (403, 404) and len(body) < 200, (path, status)
    upload, receive = "/models.git/git-upload-pack", "/models.git/git-receive-pack"
    advert = raw(world, "GET", "/models.git/info/refs?service=git-upload-pack", world.reader)[1]
    tip = advert.split(b"\n")[1][8:48]
    want = b"want " + tip + b" side-band-64k ofs-delta thin-pack\n"
    want = b"%04x" % (len(want) + 4) + want
    for path, body, gz in [(upload, b"", False), (upload, b"garbage", False), (upload, b"0004" * 10, False),
                           (upload, b"0032want " + b"z" * 40 + b"\n0000", False), (upload, b"\x1f\x8bnot gzip", True),
                           (upload, want + b"0004", False), (receive, b"", False), (receive, b"garbage", False),
                           (receive, b"0010abc def ghi\n0000", False), (receive, gzip.compress(b"0010abc def ghi\n0000")[:-4], True)]:
        headers = {"Content-Type": "application/x-" + path.rsplit("/", 1)[1] + "-request", **({"Content-Encoding": "gzip"} if gz else {})}
        status, answer, _ = raw(world, "POST", path, world.reader, body, headers)
        assert status == 400 and answer.startswith(b"bad git request: "), (path, body, status, answer)
    time.sleep(0.2)
    assert "Traceback" not in world.new_log(mark)
    assert raw(world, "GET", "/models.git/info/refs?service=git-upload-pack", world.reader)[0] == 200  # still serving


def test_a_gzip_bomb_as_an_upload_pack_body_is_cut_short(world):
    """200 MiB of "want" lines in 600 kB of gzip: dulwich spent minutes and GiBs on them; now at most 10 MiB are read."""
    advert = raw(world, "GET", "/models.git/info/refs?service=git-upload-pack", world.reader)[1]
    tip = advert.split(b"\n")[1][8:48]
    first = b"want " + tip + b" side-band-64k ofs-delta thin-pack\n"
    line = b"0032want " + tip + b"\n"
    packer = gzip.GzipFile(fileobj=(out := io.BytesIO()), mode="wb", compresslevel=9)
    packer.write(b"%04x" % (len(first) + 4) + first)
    block = line * 20_000
    for _ in range((200 << 20) // len(block)):
        packer.write(block)
    packer.write(b"00000009done\n")
    packer.close()
    start = time.monotonic()
    with rss_growth(world) as grown:
        status, answer, _ = raw(world, "POST", "/models.git/git-upload-pack", world.reader, out.getvalue(),
                                {"Content-Type": "application/x-git-upload-pack-request", "Content-Encoding": "gzip"})
    assert status == 400 and b"bad git request" in answer
    assert time.monotonic() - start < 20 and grown[0] < 150, (time.monotonic() - start, grown)


def test_a_pack_declaring_a_huge_object_is_stopped_before_it_is_inflated(world):
    """A 512 MiB blob of zeros is half a MB of zlib: dulwich inflates each pushed object in memory to hash it."""
    size = 512 << 20
    deflate, chunk = zlib.compressobj(9), bytes(1 << 20)
    data = b"".join([deflate.compress(chunk) for _ in range(size >> 20)] + [deflate.flush()])
    header, n = bytearray([(3 << 4) | (size & 15)]), size >> 4  # type 3: a blob
    while n:
        header[-1] |= 0x80
        header.append(n & 0x7F)
        n >>= 7
    pack = b"PACK" + struct.pack(">II", 2, 1) + bytes(header) + data
    pack += hashlib.sha1(pack).digest()
    line = b"0" * 40 + b" " + b"1" * 40 + b" refs/heads/bomb\0report-status\n"
    with rss_growth(world) as grown:
        status, answer, _ = raw(world, "POST", "/models.git/git-receive-pack", world.reader,
                                b"%04x" % (len(line) + 4) + line + b"0000" + pack, {"Content-Type": "application/x-git-receive-pack-request"})
    assert status == 200 and b"unpack the pack holds an object of 536870912 bytes" in answer, answer
    assert grown[0] < 150, grown
    assert b"bomb" not in git(world.root / "models.git", "for-each-ref").stdout


# -- pushes ---------------------------------------------------------------------------------------------


def test_fast_forwarding_a_protected_branch_onto_someone_elses_branch_cannot_publish_secret_objects(world, tmp_path):
    """The admin's unprotected branch holds the secret checkpoint's manifest at shared/leak.safetensors (readable only to
    repository-wide readers there). A reader moving main onto it, or merging it into main, would make main name the
    secret objects at a path they may read: refused, like the copied manifest of a new commit."""
    url = world.seed("ff")
    r = git_client(tmp_path, url, world.reader, READER, "reader")
    secret_manifest = git(r, "show", "origin/main:secret/s.safetensors").stdout
    a = git_client(tmp_path, url, world.admin, ADMIN, "admin")
    wip = commit(a, "origin/main", {"shared/leak.safetensors": secret_manifest}, ["origin/main"], "wip: publish?")
    assert push(a, f"{wip}:refs/heads/wip")[0] == 0
    git(r, "fetch", "-q", "origin")
    main = remote_ref(r, "refs/heads/main")
    refused = push(r, f"{wip}:refs/heads/main")
    assert refused[0] != 0 and "neither uploaded nor may read" in refused[1], refused
    merge = commit(r, wip, {}, [main, wip], "merge wip")  # a merge commit: shared/leak comes from a parent
    refused = push(r, f"{merge}:refs/heads/main")
    assert refused[0] != 0 and "neither uploaded nor may read" in refused[1], refused
    # a second protected branch the same way (git config fmhub.protect), and creating one: admins only
    bare = world.root / "ff.git"
    git(bare, "config", "--add", "fmhub.protect", "main")
    git(bare, "config", "--add", "fmhub.protect", "release")
    refused = push(r, f"{main}:refs/heads/release")
    assert refused[0] != 0 and "only an admin may" in refused[1] and "refs/heads/release" in refused[1], refused
    assert push(a, f"{main}:refs/heads/release")[0] == 0
    refused = push(r, f"{wip}:refs/heads/release")
    assert refused[0] != 0 and "neither uploaded nor may read" in refused[1], refused
    assert remote_ref(r, "refs/heads/main") == main and remote_ref(r, "refs/heads/release") == main
    assert push(r, f"{wip}:refs/tags/leak")[0] == 0  # a tag is no protected branch: it widens nothing
    status, answer, _ = batch(world.url, "ff", world.reader, world.secrets)
    assert codes(answer) == [403] * len(world.secrets)
    # what the reader may do: fast-forward main with their own public work, and merge it with the admin's main
    mine = commit(r, main, {"public/notes.txt": b"mine"}, [main], "my notes")
    assert push(r, f"{mine}:refs/heads/main")[0] == 0
    git(a, "fetch", "-q", "origin")
    theirs = commit(a, mine, {"secret/more.txt": b"the admin's"}, [mine], "admin's secret note")
    mine2 = commit(r, mine, {"public/notes2.txt": b"more"}, [mine], "more notes")
    assert push(a, f"{theirs}:refs/heads/main")[0] == 0
    git(r, "fetch", "-q", "origin")
    merged = commit(r, theirs, {"public/notes2.txt": b"more"}, [theirs, mine2], "merge main")  # secret/more.txt from a parent
    pushed = push(r, f"{merged}:refs/heads/main")
    assert pushed[0] == 0, pushed


def test_a_refused_manifest_does_not_tell_whether_the_objects_are_stored(world, tmp_path):
    """A hand-written manifest naming a secret (stored) object and one naming an object nobody uploaded: the same refusal."""
    url = world.seed("oracle")
    r = git_client(tmp_path, url, world.reader, READER, "reader")
    secret_manifest = git(r, "show", "origin/main:secret/s.safetensors").stdout
    sec = world.secrets[0][0]
    answers = []
    for i, oid in enumerate([sec, RANDOM_OID]):
        text = secret_manifest.replace(sec.encode(), oid.encode())
        rc, err = push(r, commit(r, "origin/main", {"scratch/copy.safetensors": text}, ["origin/main"]) + f":refs/heads/probe{i}")
        assert rc != 0
        answers.append(err[err.index("(scratch/copy"):].split(" (commit")[0].replace(oid, "OID"))
    assert answers[0] == answers[1] and "neither uploaded nor may read" in answers[0], answers
    # once the reader uploads bytes of their own, naming them is theirs to do
    data = os.urandom(256)
    oid = hashlib.sha256(data).hexdigest()
    assert put(world, "oracle", world.reader, oid, data) == 200
    manifest = git(r, "show", "origin/main:public/p.safetensors").stdout.replace(world.tensor_b.encode(), oid.encode())
    pushed = push(r, commit(r, "origin/main", {"scratch/p2.safetensors": manifest}, ["origin/main"]) + ":refs/heads/mine")
    assert pushed[0] == 0, pushed


def test_refs_outside_branches_deletions_rewrites_and_missing_objects_are_refused(world, tmp_path):
    url = world.seed("bogus")
    r = git_client(tmp_path, url, world.reader, READER, "reader")
    main = remote_ref(r, "refs/heads/main")
    policy = git(r, "show", "origin/main:.fmhub/policy.yaml").stdout
    orphan = commit(r, None, {".fmhub/policy.yaml": policy, "public/x.txt": b"x"}, [], "history without secret/")
    for refspec, why in [(f"{main}:refs/notes/x", "outside refs/heads and refs/tags"), (f"{main}:refs/fmhub/x", "outside refs/heads"),
                         (":refs/heads/main", "only an admin may delete the protected branch"),
                         (f"+{orphan}:refs/heads/main", "non-fast-forward")]:
        rc, err = push(r, refspec)
        assert rc != 0 and why in err, (refspec, err)
    assert remote_ref(r, "refs/heads/main") == main
    # raw receive-pack: a ref set to an object the push did not send (dulwich would write it: a corrupt repository)
    empty_pack = b"PACK" + struct.pack(">II", 2, 0)
    empty_pack += hashlib.sha1(empty_pack).digest()
    for ref in (b"refs/heads/bogus", b"refs/tags/bogus"):
        line = b"0" * 40 + b" " + b"1" * 40 + b" " + ref + b"\0report-status\n"
        status, answer, _ = raw(world, "POST", "/bogus.git/git-receive-pack", world.reader, b"%04x" % (len(line) + 4) + line + b"0000" + empty_pack,
                                {"Content-Type": "application/x-git-receive-pack-request"})
        assert status == 200 and b"ng " + ref in answer and b"neither in the repository nor in this push" in answer, answer
    assert git(world.root / "bogus.git", "for-each-ref").returncode == 0
    assert "refs/heads/bogus" not in git(world.root / "bogus.git", "for-each-ref").stdout.decode()
    deny = [e for e in audit_entries(world.root, "bogus") if e["what"] == "push" and e["decision"] == "deny"]
    assert {e["target"] for e in deny} >= {"refs/notes/x", "refs/heads/main", "refs/heads/bogus"}


def test_a_policy_opened_and_closed_again_inside_a_push_opens_nothing(world, tmp_path):
    """Only the policy at a protected branch's tip decides; an intermediate commit that opens it is refused, or governs nothing."""
    url = world.seed("flip")
    r = git_client(tmp_path, url, world.reader, READER, "reader")
    main = remote_ref(r, "refs/heads/main")
    opened = commit(r, main, {".fmhub/policy.yaml": POLICY.replace("deny: [read, write]", "allow: [read, write]").encode()}, [main])
    closed = commit(r, opened, {".fmhub/policy.yaml": git(r, "show", "origin/main:.fmhub/policy.yaml").stdout}, [opened])
    push(r, f"{closed}:refs/heads/main")
    assert git(r, "show", f"{remote_ref(r, 'refs/heads/main')}:.fmhub/policy.yaml").stdout == ATTACK_POLICY.encode()
    status, answer, _ = batch(world.url, "flip", world.reader, world.secrets)
    assert codes(answer) == [403] * len(world.secrets)
    git(r, "fetch", "-q", "origin")
    tip = remote_ref(r, "refs/heads/main")
    reopened = commit(r, tip, {".fmhub/policy.yaml": POLICY.replace("deny: [read, write]", "allow: [read, write]").encode()}, [tip])
    refused = push(r, f"{reopened}:refs/heads/main")  # the open policy at the tip: admins only
    assert refused[0] != 0 and "only an admin may change .fmhub/policy.yaml" in refused[1], refused
    # and pushed to another branch, the open policy governs nothing either (policies are read at protected branches)
    assert push(r, f"{opened}:refs/heads/open")[0] == 0
    status, answer, _ = batch(world.url, "flip", world.reader, world.secrets)
    assert codes(answer) == [403] * len(world.secrets)


def test_write_rules_are_checked_per_tensor_at_push_time(world, tmp_path):
    """Ported from test_access's upload-time write checks: writes are decided when a push names the objects."""
    url = world.seed("writes")
    r = git_client(tmp_path, url, world.reader, READER, "reader")
    manifest = git(r, "show", "origin/main:public/p.safetensors").stdout
    data = os.urandom(256)
    oid = hashlib.sha256(data).hexdigest()
    assert put(world, "writes", world.reader, oid, data) == 200
    w = next(line.split()[4].removeprefix("sha256:") for line in manifest.decode().splitlines() if line.startswith('tensor "w"'))
    for refspec_branch, changes, why in [
        ("w", {"public/p.safetensors": manifest.replace(w.encode(), oid.encode())}, "may not write tensor 'w' of public/p.safetensors"),
        ("secret", {"secret/note.txt": b"note"}, "may not write secret/note.txt"),
        ("secret-gone", {"secret/s.safetensors": None}, "may not write secret/s.safetensors"),
    ]:
        rc, err = push(r, commit(r, "origin/main", changes, ["origin/main"]) + f":refs/heads/{refspec_branch}")
        assert rc != 0 and why in err, (refspec_branch, err)
        assert ADMIN not in err
    # tensor "b" is theirs to write (with bytes they uploaded), on a branch and on main
    ok = commit(r, "origin/main", {"public/p.safetensors": manifest.replace(world.tensor_b.encode(), oid.encode())}, ["origin/main"])
    assert push(r, f"{ok}:refs/heads/main")[0] == 0
    # the admin writes what the reader may not
    a = git_client(tmp_path, url, world.admin, ADMIN, "admin")
    assert push(a, commit(a, "origin/main", {"secret/note.txt": b"note"}, ["origin/main"]) + ":refs/heads/main")[0] == 0


def test_a_broken_policy_on_the_protected_branch_fails_closed(world, tmp_path):
    """Ported from test_access's test_server_fails_closed_on_a_broken_policy: the policy broke outside the server."""
    url = world.seed("broken")
    a = git_client(tmp_path, url, world.admin, ADMIN, "admin")
    broken = commit(a, "origin/main", {".fmhub/policy.yaml": b"version: 1\nrules: [\n"}, ["origin/main"], "broken")
    refused = push(a, f"{broken}:refs/heads/main")  # the server refuses it even from an admin
    assert refused[0] != 0 and "a broken policy locks everyone out" in refused[1], refused
    git(a, "push", "-q", str(world.root / "broken.git"), f"{broken}:refs/heads/main")  # straight into the bare repository
    public = list(world.public.items())
    status, answer, _ = batch(world.url, "broken", world.reader, public)
    assert codes(answer) == [403] * len(public)
    assert all(".fmhub/policy.yaml:" in o["error"]["message"] and "broken" in o["error"]["message"] for o in answer["objects"])
    assert raw(world, "GET", storage("broken", public[0][0]), world.reader)[0] == 403
    status, answer, _ = batch(world.url, "broken", world.admin, public)  # the token's admin list still works
    assert all("download" in o["actions"] for o in answer["objects"])
    r = git_client(tmp_path, url, world.reader, READER, "reader")
    refused = push(r, commit(r, "origin/main", {"public/x.txt": b"x"}, ["origin/main"]) + ":refs/heads/feature")
    assert refused[0] != 0 and "is broken" in refused[1] and "only an admin may push" in refused[1], refused


def test_concurrent_pushes_move_each_ref_once_and_keep_the_audit_chain(world, tmp_path):
    url = world.seed("race")
    clients = [git_client(tmp_path, url, world.reader, READER, f"r{i}") for i in range(2)]
    base = remote_ref(clients[0], "refs/heads/main")
    jobs = []
    for i in range(6):
        r = clients[i % 2]
        c = commit(r, base, {f"public/n{i}.txt": str(i).encode()}, [base], f"note {i}")
        jobs += [(r, f"{c}:refs/heads/main"), (r, f"{c}:refs/heads/b{i}")]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: push(*job), jobs))
    mains = [rc for (r, spec), (rc, _err) in zip(jobs, results) if spec.endswith("/main")]
    assert mains.count(0) == 1, results  # the others saw main move under them
    assert all(rc == 0 for (r, spec), (rc, _e) in zip(jobs, results) if not spec.endswith("/main")), \
        [e for (r, spec), (rc, e) in zip(jobs, results) if not spec.endswith("/main") and rc]
    winner = next(spec.split(":")[0] for (r, spec), (rc, _e) in zip(jobs, results) if spec.endswith("/main") and rc == 0)
    assert remote_ref(clients[0], "refs/heads/main") == winner
    log = world.root / "race.git" / "fmhub" / "audit.log"
    assert fmhub(tmp_path, "audit", "verify", "--path", str(log)).returncode == 0
    pushed = {e["target"] for e in audit_entries(world.root, "race") if e["what"] == "push" and e["decision"] == "allow"}
    assert pushed >= {f"refs/heads/b{i}" for i in range(6)} | {"refs/heads/main"}


def test_token_parsing_and_digest_lookup():
    """Ported from test_access's test_helpers (fmhub.lfs_policy): now fmhub.server.tokens."""
    from fmhub.server.tokens import Principal

    assert token_of("Bearer abc") == "abc" and token_of(None) is None and token_of("Digest x") is None
    assert token_of("Basic " + base64.b64encode(b"bob:tok").decode()) == "tok"
    assert token_of("Basic " + base64.b64encode(b"bob:").decode()) is None and token_of("Bearer  ") is None
    tokens = Tokens({digest("tok"): Principal("bob@example.com", frozenset({"r"}))})
    assert tokens.lookup("tok").user == "bob@example.com" and tokens.lookup("tok2") is None
    assert tokens.lookup(digest("tok")) is None and tokens.lookup("") is None


# -- hostile connections: bodies refused before they are read, slowloris ------------------------------


def _spooled(pid: int) -> int:
    """Bytes in the deleted files the server holds open: waitress spools a body it reads to an unlinked temp file."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith("(deleted)"):
                total += os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:
            pass
    return total




@pytest.mark.parametrize("method, path, who, want", [
    ("POST", "/models.git/info/lfs/objects/batch", None, 401),
    ("PUT", f"/_/models.git/info/lfs/objects/storage/{RANDOM_OID}", None, 401),
    ("POST", "/models.git/git-receive-pack", None, 401),
    ("POST", "/other.git/info/lfs/objects/batch", "reader", 404),  # a repository the token does not reach
    ("POST", "/models.git/info/lfs/objects/batch", "reader", 413),  # over 4 MiB
    ("POST", "/models.git/info/lfs/objects/storage/verify", "reader", 413),  # over 64 KiB
    ("PUT", f"/_/models.git/info/lfs/objects/storage/{RANDOM_OID}", "reader", 413),  # over --max-object-size
])
def test_a_body_is_refused_before_it_is_read(world, method, path, who, want):
    """waitress read a whole body (to a temp file, up to --max-object-size + 1 MiB) before the app could say 401, for up to
    1000 connections at once: now the token and the route's limit are checked once the headers are in, the answer comes
    at once (no 100 Continue asks for the body), and what the client sends anyway is read and dropped, not spooled."""
    pid = _server_pid(world.root)
    before = _spooled(pid)
    host, port = world.url.removeprefix("http://").rsplit(":", 1)
    head = [f"{method} {path} HTTP/1.1", "Host: x", f"Content-Length: {60 << 30}", "Expect: 100-continue",
            *([f"Authorization: Bearer {getattr(world, who)}"] if who else [])]
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        answer = sock.makefile("rb")
        assert answer.readline().split()[1] == str(want).encode()
        headers = http.client.parse_headers(answer)
        body = answer.read(int(headers["Content-Length"]))
        assert time.monotonic() - started < 5 and headers["Connection"] == "close"
        message = json.loads(body)["message"] if "/info/lfs/" in path else body.decode()
        assert message and "\n" not in message.rstrip("\n") and "Traceback" not in message
        try:
            for _ in range(8):
                sock.sendall(bytes(1 << 20))
        except OSError:  # the server stops draining after 2 s or 16 MiB
            pass
        time.sleep(0.2)
    assert _spooled(pid) == before


def test_slowloris_cannot_keep_an_honest_client_out(world):
    """1010 half-sent requests took every one of waitress's 1000 connections for channel_timeout (300 s): an honest
    client got no answer. Now a head has --header-timeout seconds in all, and at the connection limit the connection
    that has waited longest for its head is closed to make room."""
    with running_server(world.root, "--max-connections", "40", "--header-timeout", "2") as (url, _log):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        stop, socks = threading.Event(), []

        def drip() -> None:
            while not stop.wait(0.3):
                for s in list(socks):
                    try:
                        s.sendall(b"a")
                    except OSError:
                        pass

        threading.Thread(target=drip, daemon=True).start()
        try:
            for _ in range(100):
                s = socket.create_connection((host, int(port)), timeout=10)
                s.sendall(b"GET /models.git/info/refs HTTP/1.1\r\nX-a: ")
                socks.append(s)
            time.sleep(0.5)
            for _ in range(3):
                started = time.monotonic()
                conn = http.client.HTTPConnection(f"{host}:{port}", timeout=10)
                conn.request("GET", "/models.git/info/refs?service=git-upload-pack", headers={"Authorization": f"Bearer {world.reader}"})
                assert conn.getresponse().status == 200 and time.monotonic() - started < 3
                conn.close()
            assert all(socket_closed_within(s, 6) for s in socks)  # evicted, or closed at the header deadline though still sending
        finally:
            stop.set()
            for s in socks:
                s.close()
