"""The test Hub (tests/helpers/hub_server.py) against the real huggingface_hub client.

Everything goes through the client's public API (HfApi, hf_hub_download,
snapshot_download) with ``endpoint=`` pointed at the server, except where a
test checks a server answer the client would not send a request for (a commit
naming an object nobody uploaded, a PUT whose bytes do not match the oid).
What the server stored is checked in git itself: dulwich on the bare repo,
``git fsck``, ``git clone`` and ``git lfs pull``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest
from dulwich.lfs import LFSPointer
from dulwich.object_store import iter_tree_contents
from dulwich.repo import Repo
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFolder
from huggingface_hub.utils import get_session

from tests.helpers import git, run
from tests.helpers.hub_server import DEFAULT_GITATTRIBUTES, HubTestServer, running_hub_server, use_hub_server

# The client PUTs LFS objects with httpx2's deprecated data=<file>: its warning, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

REPO = "user/tiny-model"
MB = 1024 * 1024


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubTestServer]:
    """A running test Hub, with the client set for it: no Xet, no telemetry, its own HF_HOME, no token."""
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    # huggingface_hub read the variables when first imported: the env alone may be too late.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)  # else it fetches /api/agent-harnesses from huggingface.co
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with running_hub_server(tmp_path / "hub") as server:
        yield server


@pytest.fixture
def api(hub: HubTestServer) -> HfApi:
    return HfApi(endpoint=hub.url, token=False)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def model_folder(root: Path) -> dict[str, bytes]:
    """A folder to upload: a small text file, a 3 MB binary (NUL bytes, no LFS pattern), a .safetensors."""
    files = {
        "notes.txt": b"a small text file\n",
        "blob.dat": b"\0\1\2" + os.urandom(3 * MB),  # binary: LFS because its sample has a NUL byte
        "weights/model.safetensors": b"safetensors-ish " * 1000,  # text, but LFS by the .gitattributes pattern
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def download(hub: HubTestServer, filename: str, cache: Path, **kw) -> bytes:
    return Path(hf_hub_download(REPO, filename, endpoint=hub.url, cache_dir=cache, token=False, **kw)).read_bytes()


def git_files(hub: HubTestServer, commit: str) -> dict[str, bytes]:
    """path -> blob bytes of a commit, read from the bare repo with dulwich."""
    with Repo(str(hub.git_repo(REPO))) as repo:
        tree = repo[commit.encode()].tree
        return {e.path.decode(): repo[e.sha].as_raw_string() for e in iter_tree_contents(repo.object_store, tree)}


def test_create_repo_twice_and_its_first_commit(hub, api):
    url = api.create_repo(REPO, exist_ok=True)
    assert url.repo_id == REPO and url.endpoint == hub.url
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo(REPO)
    assert e.value.response.status_code == 409
    assert api.create_repo("no-namespace").repo_id == f"{hub.username}/no-namespace"

    info = api.model_info(REPO)
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]
    assert info.sha == hub.head(REPO) and info.private is False
    assert git_files(hub, info.sha) == {".gitattributes": DEFAULT_GITATTRIBUTES}
    assert [c.title for c in api.list_repo_commits(REPO)] == ["initial commit"]
    refs = api.list_repo_refs(REPO)
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", info.sha)]

    api.delete_repo(REPO)
    assert not api.repo_exists(REPO)
    assert api.create_repo(REPO).repo_id == REPO  # and the name is free again


def test_upload_folder_then_list_download_and_check_the_git_repo(hub, api, tmp_path):
    api.create_repo(REPO)
    initial = hub.head(REPO)
    files = model_folder(tmp_path / "model")
    commit = api.upload_folder(repo_id=REPO, folder_path=tmp_path / "model", commit_message="v0").oid
    assert commit == hub.head(REPO)

    # LFS for the binary and the .safetensors, their bytes sent once each; the text file went in the commit
    assert sorted(r.body_size for r in hub.uploads()) == sorted([len(files["blob.dat"]), len(files["weights/model.safetensors"])])
    assert all(r.status == 200 for r in hub.uploads())
    assert hub.lfs_objects() == {sha256(files[f]): len(files[f]) for f in ("blob.dat", "weights/model.safetensors")}

    tree = {f.path: f for f in api.list_repo_tree(REPO, recursive=True)}
    assert set(tree) == {".gitattributes", "notes.txt", "blob.dat", "weights", "weights/model.safetensors"}
    assert isinstance(tree["weights"], RepoFolder)
    assert tree["notes.txt"].lfs is None and tree["notes.txt"].blob_id == git_blob_sha(files["notes.txt"])
    for name in ("blob.dat", "weights/model.safetensors"):
        assert tree[name].size == len(files[name])
        assert (tree[name].lfs.sha256, tree[name].lfs.size) == (sha256(files[name]), len(files[name]))
        assert tree[name].lfs.pointer_size == len(LFSPointer(sha256(files[name]), len(files[name])).to_bytes())
    assert [f.path for f in api.list_repo_tree(REPO, "weights")] == ["weights/model.safetensors"]
    info = {f.path: f for f in api.get_paths_info(REPO, ["notes.txt", "weights", "blob.dat", "nope"])}
    assert set(info) == {"notes.txt", "weights", "blob.dat"} and info["blob.dat"].lfs.sha256 == sha256(files["blob.dat"])

    # downloads give back the same bytes, hf_hub_download and snapshot_download alike
    for name, data in files.items():
        assert download(hub, name, tmp_path / "cache") == data
    snap = Path(snapshot_download(REPO, endpoint=hub.url, cache_dir=tmp_path / "snap", token=False,
                                  allow_patterns=["*.safetensors", "*.txt"]))
    got = {p.relative_to(snap).as_posix(): p.read_bytes() for p in snap.rglob("*") if p.is_file()}
    assert got == {k: v for k, v in files.items() if k != "blob.dat"}

    # a real git commit on top of the initial one, LFS files as pointer blobs, content in the LFS store
    with Repo(str(hub.git_repo(REPO))) as repo:
        assert repo[commit.encode()].parents == [initial.encode()]
        assert repo[commit.encode()].message == b"v0\n"
    blobs = git_files(hub, commit)
    assert blobs["notes.txt"] == files["notes.txt"]
    for name in ("blob.dat", "weights/model.safetensors"):
        pointer = LFSPointer.from_bytes(blobs[name])
        assert (pointer.oid, pointer.size) == (sha256(files[name]), len(files[name]))
        assert blobs[name] == pointer.to_bytes()  # the canonical text git-lfs writes
        assert hub.lfs_object_path(pointer.oid).read_bytes() == files[name]

    # plain git agrees: the repo is sound, a clone has the pointers, git-lfs fetches the content
    git(tmp_path, "--git-dir", str(hub.git_repo(REPO)), "fsck", "--strict")
    env = {**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"}
    run(["git", "clone", "-q", str(hub.git_repo(REPO)), str(tmp_path / "clone")], tmp_path, env=env)
    clone = tmp_path / "clone"
    assert (clone / "notes.txt").read_bytes() == files["notes.txt"]
    assert (clone / "blob.dat").read_bytes() == blobs["blob.dat"]
    if shutil.which("git-lfs"):
        git(clone, "lfs", "install", "--local")  # the tests' git config has no lfs filter
        git(clone, "-c", f"lfs.url={hub.lfs_url(REPO)}", "lfs", "pull")
        for name, data in files.items():
            assert (clone / name).read_bytes() == data


def test_second_commit_deletes_and_adds_and_old_revisions_stay(hub, api, tmp_path):
    api.create_repo(REPO)
    files = model_folder(tmp_path / "model")
    first = api.upload_folder(repo_id=REPO, folder_path=tmp_path / "model", commit_message="v0").oid
    second = api.create_commit(
        REPO,
        [CommitOperationDelete("blob.dat"), CommitOperationAdd("config.json", b'{"dim": 4}'),
         CommitOperationCopy("weights/model.safetensors", "weights/copy.safetensors")],
        commit_message="v1: drop the blob",
        commit_description="and add a config",
    ).oid

    assert {s.rfilename for s in api.model_info(REPO).siblings} == {
        ".gitattributes", "notes.txt", "config.json", "weights/model.safetensors", "weights/copy.safetensors"}
    assert download(hub, "weights/copy.safetensors", tmp_path / "cache") == files["weights/model.safetensors"]
    old = api.model_info(REPO, revision=first)
    assert old.sha == first
    assert {s.rfilename for s in old.siblings} == {".gitattributes", "notes.txt", "blob.dat", "weights/model.safetensors"}
    assert download(hub, "blob.dat", tmp_path / "cache", revision=first) == files["blob.dat"]
    assert download(hub, "config.json", tmp_path / "cache") == b'{"dim": 4}'

    commits = api.list_repo_commits(REPO)
    assert [c.commit_id for c in commits[:2]] == [second, first]
    assert (commits[0].title, commits[0].message) == ("v1: drop the blob", "and add a config")

    # deleting a folder; deleting what is not there is EntryNotFound
    api.delete_folder("weights", repo_id=REPO)
    assert {s.rfilename for s in api.model_info(REPO).siblings} == {".gitattributes", "notes.txt", "config.json"}
    with pytest.raises(EntryNotFoundError, match="doesn't exist"):
        api.delete_file("nope.txt", repo_id=REPO)


def test_commit_on_a_stale_parent_is_refused(hub, api):
    api.create_repo(REPO)
    base = hub.head(REPO)
    api.upload_file(path_or_fileobj=b"one", path_in_repo="a.txt", repo_id=REPO, parent_commit=base)
    with pytest.raises(HfHubHTTPError) as e:
        api.upload_file(path_or_fileobj=b"two", path_in_repo="b.txt", repo_id=REPO, parent_commit=base)
    assert e.value.response.status_code == 412
    assert {s.rfilename for s in api.model_info(REPO).siblings} == {".gitattributes", "a.txt"}
    # the current head as parent (even abbreviated) is fine
    api.upload_file(path_or_fileobj=b"two", path_in_repo="b.txt", repo_id=REPO, parent_commit=hub.head(REPO)[:7])


def test_the_same_content_is_uploaded_once(hub, api, tmp_path):
    api.create_repo(REPO)
    data = os.urandom(MB)
    api.upload_file(path_or_fileobj=data, path_in_repo="a.bin", repo_id=REPO)
    api.upload_file(path_or_fileobj=data, path_in_repo="copy/b.bin", repo_id=REPO)  # batch: "already there"
    assert [r.body_size for r in hub.uploads()] == [len(data)]
    assert hub.lfs_objects() == {sha256(data): len(data)}
    head = hub.head(REPO)
    # the same file at the same path again: preupload hands back its oid and the client skips the commit
    hub.clear_log()
    assert api.upload_file(path_or_fileobj=data, path_in_repo="a.bin", repo_id=REPO).oid == head
    assert [r.path for r in hub.requests if "/commit/" in r.path or r.method == "PUT"] == []
    assert download(hub, "copy/b.bin", tmp_path / "cache") == data


def test_preupload_decides_like_the_hub(hub, api):
    """filter=lfs in .gitattributes (also a subfolder's), size over 10 MB, or a NUL in the sample -> LFS."""
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"*.txt filter=lfs diff=lfs merge=lfs -text\n",
                    path_in_repo="logs/.gitattributes", repo_id=REPO)

    def modes(files: dict[str, tuple[bytes, int]]) -> dict[str, str]:
        body = {"files": [{"path": p, "sample": base64.b64encode(sample).decode(), "size": size}
                          for p, (sample, size) in files.items()]}
        r = get_session().post(f"{hub.url}/api/models/{REPO}/preupload/main", json=body)
        r.raise_for_status()
        return {f["path"]: f["uploadMode"] for f in r.json()["files"]}

    assert modes({
        "README.md": (b"# hi", 4),
        "weights.bin": (b"text", 4),  # *.bin in the Hub's default .gitattributes
        "deep/dir/x.safetensors": (b"t", 1),  # a pattern without "/" matches at any depth
        "big.txt": (b"text", 11 * MB),  # over 10 MB
        "blob.dat": (b"ab\0c", 4),  # a NUL byte in the sample: binary
        "logs/run.txt": (b"text", 4),  # logs/.gitattributes says *.txt is LFS...
        "run.txt": (b"text", 4),  # ...under logs/ only
    }) == {"README.md": "regular", "weights.bin": "lfs", "deep/dir/x.safetensors": "lfs", "big.txt": "lfs",
           "blob.dat": "lfs", "logs/run.txt": "lfs", "run.txt": "regular"}


def test_not_found_errors_map_to_the_clients_exceptions(hub, api, tmp_path):
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/nope")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/nope", "x.txt", endpoint=hub.url, cache_dir=tmp_path / "c", token=False)
    api.create_repo(REPO)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.bin", endpoint=hub.url, cache_dir=tmp_path / "c", token=False)
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, "no/such/dir"))
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO, revision="no-such-branch")
    assert api.file_exists(REPO, ".gitattributes") and not api.file_exists(REPO, "x.txt")
    assert not api.repo_exists("user/nope")


def test_lfs_objects_are_checked(hub, api):
    """A commit naming an object nobody uploaded is refused; a PUT whose bytes do not hash to the oid is not stored."""
    api.create_repo(REPO)
    missing = sha256(b"never uploaded")
    ndjson = b"".join(json.dumps(line).encode() + b"\n" for line in [
        {"key": "header", "value": {"summary": "bad", "description": ""}},
        {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": missing, "size": 14}},
    ])
    r = get_session().post(f"{hub.url}/api/models/{REPO}/commit/main", content=ndjson,
                           headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 400 and missing in r.json()["error"]
    assert len(api.list_repo_commits(REPO)) == 1  # nothing committed

    data = b"the real bytes"
    batch = get_session().post(f"{hub.url}/{REPO}.git/info/lfs/objects/batch", json={
        "operation": "upload", "transfers": ["basic"], "objects": [{"oid": sha256(data), "size": len(data)}]})
    href = batch.json()["objects"][0]["actions"]["upload"]["href"]
    assert get_session().put(href, content=b"other bytes!!!").status_code == 400
    assert hub.lfs_objects() == {}
    assert get_session().put(href, content=data).status_code == 200
    assert hub.lfs_objects() == {sha256(data): len(data)}

    # git-lfs style download through the batch API
    batch = get_session().post(f"{hub.url}/{REPO}.git/info/lfs/objects/batch", json={
        "operation": "download", "objects": [{"oid": sha256(data), "size": len(data)}, {"oid": missing, "size": 14}]})
    found, lost = batch.json()["objects"]
    assert get_session().get(found["actions"]["download"]["href"]).content == data
    assert lost["error"]["code"] == 404


def test_resolve_headers_and_ranges(hub, api):
    api.create_repo(REPO)
    data = bytes(range(256)) * 64
    commit = api.upload_file(path_or_fileobj=data, path_in_repo="w.bin", repo_id=REPO).oid
    text = b"plain text\n"
    api.upload_file(path_or_fileobj=text, path_in_repo="t.txt", repo_id=REPO)
    url = f"{hub.url}/{REPO}/resolve/{commit}/w.bin"
    head = get_session().head(url)
    assert head.status_code == 200
    assert head.headers["X-Repo-Commit"] == commit
    assert head.headers["X-Linked-Etag"] == f'"{sha256(data)}"'
    assert int(head.headers["X-Linked-Size"]) == int(head.headers["Content-Length"]) == len(data)
    part = get_session().get(url, headers={"Range": "bytes=100-"})
    assert part.status_code == 206 and part.content == data[100:]
    assert part.headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    assert get_session().get(url, headers={"Range": "bytes=10-19"}).content == data[10:20]
    assert get_session().get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
    regular = get_session().head(f"{hub.url}/{REPO}/resolve/main/t.txt")
    assert regular.headers["ETag"] == f'"{git_blob_sha(text)}"'
    assert "X-Linked-Etag" not in regular.headers


def test_branches(hub, api, tmp_path):
    api.create_repo(REPO)
    api.create_branch(REPO, branch="dev")
    api.create_branch(REPO, branch="dev", exist_ok=True)
    api.upload_file(path_or_fileobj=b"on dev", path_in_repo="dev.txt", repo_id=REPO, revision="dev")
    refs = {b.name: b.target_commit for b in api.list_repo_refs(REPO).branches}
    assert set(refs) == {"main", "dev"} and refs["dev"] == hub.head(REPO, "dev") != refs["main"]
    assert download(hub, "dev.txt", tmp_path / "cache", revision="dev") == b"on dev"
    with pytest.raises(EntryNotFoundError):
        download(hub, "dev.txt", tmp_path / "cache", revision="main")
    api.create_tag(REPO, tag="v1", revision="dev")
    assert [(t.name, t.target_commit) for t in api.list_repo_refs(REPO).tags] == [("v1", refs["dev"])]
    api.delete_branch(REPO, branch="dev")
    assert [b.name for b in api.list_repo_refs(REPO).branches] == ["main"]


def test_required_token(hub, tmp_path):
    hub.require_token("hf_secret")
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=hub.url, token=False).model_info(REPO)
    assert e.value.response.status_code == 401 and "Authorization" in str(e.value)
    with pytest.raises(HfHubHTTPError, match="Invalid credentials") as e:
        HfApi(endpoint=hub.url, token="hf_wrong").create_repo(REPO)
    assert e.value.response.status_code == 401

    api = HfApi(endpoint=hub.url, token="hf_secret")
    api.create_repo(REPO)
    data = os.urandom(200_000)
    api.upload_file(path_or_fileobj=data, path_in_repo="w.bin", repo_id=REPO)
    # the client sends no token with the object PUT: the signed href lets it in, like a presigned URL
    [put] = hub.uploads()
    assert put.headers.get("Authorization") is None and put.path.endswith(f"/{sha256(data)}")
    unsigned = f"{hub.url}/{REPO}.git/info/lfs/objects/{sha256(b'x')}"
    assert get_session().put(unsigned, content=b"x").status_code == 401
    assert get_session().put(unsigned, content=b"x", headers={"Authorization": "Bearer hf_secret"}).status_code == 200
    assert Path(hf_hub_download(REPO, "w.bin", endpoint=hub.url, cache_dir=tmp_path / "c", token="hf_secret")).read_bytes() == data
    assert api.whoami()["name"] == hub.username
    with pytest.raises(HfHubHTTPError) as e:
        hf_hub_download(REPO, "w.bin", endpoint=hub.url, cache_dir=tmp_path / "c2", token=False)
    assert e.value.response.status_code == 401


def test_use_hub_server_points_a_default_client_here(hub, monkeypatch, tmp_path):
    """Code that calls HfApi() / hf_hub_download() without endpoint= (like a CLI would) lands on the server."""
    use_hub_server(monkeypatch, hub, tmp_path / "hf_home2", token="hf_tok")
    hub.require_token("hf_tok")
    api = HfApi()
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"\0binary", path_in_repo="x.bin", repo_id=REPO)
    assert Path(hf_hub_download(REPO, "x.bin")).read_bytes() == b"\0binary"
    assert Path(hf_hub_download(REPO, "x.bin")).is_relative_to(tmp_path / "hf_home2" / "hub")
    assert hub.client_env()["HF_ENDPOINT"] == hub.url


def test_injected_faults_exercise_the_clients_retries(hub, api, tmp_path):
    """A 503 is retried; a download cut halfway is retried (each costs the client ~1 s)."""
    api.create_repo(REPO)
    data = os.urandom(2 * MB)
    api.upload_file(path_or_fileobj=data, path_in_repo="w.bin", repo_id=REPO)
    hub.clear_log()
    hub.fail_next(1, 503, retry_after="0")
    api.upload_file(path_or_fileobj=b"text", path_in_repo="r.txt", repo_id=REPO)  # preupload is retried
    assert [(r.path.rsplit("/", 2)[-2], r.status) for r in hub.requests[:2]] == [("preupload", 503), ("preupload", 200)]

    hub.clear_log()
    hub.cut_next_downloads(1)
    assert download(hub, "w.bin", tmp_path / "cache") == data
    gets = [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]
    # (the client resumes with a Range from what it had written, which may be nothing yet)
    assert len(gets) == 2 and gets[1].status == (206 if gets[1].headers.get("Range") else 200)
