"""`fmhub server` end to end: started as users start it, driven by plain git, git-lfs and fmhub clients as an admin
and as a reader of ``public/`` only, on a repository made by `fmhub server init` and one made by a plain `git init --bare`."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import committed_manifest, fmhub, git, save_tensors, sha256_file
from tests.helpers.server import ADMIN, POLICY, READER, audit_entries, batch, clone, init_root, lfs_request, running_server, use_token, work_tree

RANDOM_OID = hashlib.sha256(b"nothing stored under this").hexdigest()


def admin_work_tree(tmp_path: Path, url: str, admin: str) -> Path:
    """The admin's repository: fmhub installed, the policy, a public and a secret checkpoint, pushed to both repositories."""
    torch.manual_seed(0)
    work = work_tree(tmp_path, {"public/p.safetensors": {"w": torch.randn(64, 64), "b": torch.randn(64)},
                                "secret/s.safetensors": {"w": torch.randn(64, 64) * 7}}, POLICY)
    use_token(work, url, admin, ADMIN)
    for repo in ("models", "plain"):
        git(work, "remote", "add", repo, f"{url}/{repo}.git")
        git(work, "push", "-q", repo, "main")
    return work


def secret_oids(work: Path) -> list[tuple[str, int]]:
    return committed_manifest(work, "HEAD", "secret/s.safetensors").oids()


def copy_manifest_push(tmp_path: Path, url: str, reader: str, repo: str, secret_path: str, ref: str):
    """Attack B: the reader writes the secret checkpoint's manifest at public/copy.safetensors on a branch and pushes it."""
    r, _ = clone(tmp_path, url, repo, reader, READER, f"reader-{repo}-{ref}", check=False)
    (r / "copy.txt").write_bytes(git(r, "show", f"origin/main:{secret_path}").stdout)
    blob = git(r, "hash-object", "-w", "--no-filters", "copy.txt").stdout.decode().strip()
    git(r, "update-index", "--add", "--cacheinfo", f"100644,{blob},public/copy.safetensors")
    git(r, "commit", "-qm", "copy the secret manifest")
    return r, git(r, "push", "origin", f"HEAD:refs/heads/{ref}", check=False)


def policy_edit_push(r: Path):
    """Attack C: the reader opens the policy up and pushes it to main."""
    git(r, "checkout", "-q", "-B", "edit", "origin/main", "--", ".fmhub/policy.yaml", check=False)
    git(r, "show", "origin/main:.fmhub/policy.yaml")
    (r / ".fmhub").mkdir(exist_ok=True)
    (r / ".fmhub" / "policy.yaml").write_text(POLICY.replace("deny: [read, write]", "allow: [read, write]"))
    git(r, "add", ".fmhub/policy.yaml")
    git(r, "commit", "-qm", "open everything")
    return git(r, "push", "origin", "HEAD:refs/heads/main", check=False)


def assert_no_secret_by_http(url: str, repo: str, reader: str, secrets: list[tuple[str, int]]) -> None:
    """Batch, GET and verify answer a secret object exactly as an object that does not exist: 403, same shape."""
    status, answer, _ = batch(url, repo, reader, secrets + [(RANDOM_OID, secrets[0][1])])
    assert status == 200
    assert [o["error"]["code"] for o in answer["objects"]] == [403] * (len(secrets) + 1)
    assert all("actions" not in o for o in answer["objects"])
    for oid, size in secrets + [(RANDOM_OID, secrets[0][1])]:
        assert lfs_request(url, f"/_/{repo}.git/info/lfs/objects/storage/{oid}", reader)[0] == 403
        assert lfs_request(url, f"/_/{repo}.git/info/lfs/objects/storage/verify", reader, {"oid": oid, "size": size})[0] == 403
        assert lfs_request(url, f"/_/{repo}.git/info/lfs/objects/storage/verify", reader, {"oid": oid, "size": size + 1})[0] == 403
    # an upload batch tells nobody what is stored: the secret object is asked for, like any object not here
    status, answer, _ = batch(url, repo, reader, secrets[:1] + [(RANDOM_OID, 5)], "upload")
    assert status == 200 and all("upload" in o["actions"] for o in answer["objects"])


def test_a_reader_of_public_cannot_get_secret_objects_by_any_route(tmp_path):
    root, admin, reader = init_root(tmp_path)
    with running_server(root) as (url, _log):
        work = admin_work_tree(tmp_path, url, admin)
        secrets = secret_oids(work)
        public = committed_manifest(work, "HEAD", "public/p.safetensors").oids()
        for repo in ("models", "plain"):
            assert_no_secret_by_http(url, repo, reader, secrets)

        # the reader's clone of models: public checks out, secret does not (the server refuses, whatever the client says)
        status, answer, _ = batch(url, "models", reader, public)
        assert status == 200 and all("download" in o["actions"] for o in answer["objects"])
        # B: a pushed branch naming the secret objects at a path the reader may read is refused, and reads stay denied
        r, pushed = copy_manifest_push(tmp_path, url, reader, "models", "secret/s.safetensors", "scratch")
        assert pushed.returncode != 0 and b"neither uploaded nor may read" in pushed.stderr, pushed.stderr
        assert b"scratch" not in git(work, "ls-remote", "models").stdout
        # C: a policy edit pushed to main is refused; main does not move
        main_before = git(work, "ls-remote", "models", "refs/heads/main").stdout
        pushed = policy_edit_push(r)
        assert pushed.returncode != 0 and b"only an admin may change .fmhub/policy.yaml" in pushed.stderr, pushed.stderr
        assert git(work, "ls-remote", "models", "refs/heads/main").stdout == main_before
        assert_no_secret_by_http(url, "models", reader, secrets)

        # the same on the plain `git init --bare` repository (HEAD -> master, which does not exist): fail closed
        status, answer, _ = batch(url, "plain", reader, public)
        assert [o["error"]["code"] for o in answer["objects"]] == [403] * len(public)
        _r, pushed = copy_manifest_push(tmp_path, url, reader, "plain", "secret/s.safetensors", "scratch")
        assert pushed.returncode != 0 and b"only an admin may push" in pushed.stderr, pushed.stderr

        # every attempt left a record; the logs verify
        for repo in ("models", "plain"):
            entries = audit_entries(root, repo)
            denied = [e for e in entries if e["decision"] == "deny" and e["who"] == READER]
            vias = {e["details"].get("via") for e in denied if e["what"] == "access"}
            assert {"batch", "download", "verify"} <= vias, vias
            assert any(e["what"] == "push" for e in denied)
            assert fmhub(tmp_path, "audit", "verify", "--path", str(root / f"{repo}.git" / "fmhub" / "audit.log")).returncode == 0
        pushes = [e["details"]["reason"] for e in audit_entries(root, "models") if e["what"] == "push" and e["decision"] == "deny"]
        assert any("neither uploaded" in p for p in pushes) and any("policy.yaml" in p for p in pushes)

        # the admin's clones are byte-identical, from both repositories
        for repo in ("models", "plain"):
            a, _ = clone(tmp_path, url, repo, admin, ADMIN, f"admin-{repo}")
            for path in ("public/p.safetensors", "secret/s.safetensors", ".fmhub/policy.yaml"):
                assert sha256_file(a / path) == sha256_file(work / path), (repo, path)
    # restarted, the server says why nothing of `plain` is readable, and how to fix it
    with running_server(root) as (_url, log):
        warning = "".join(log)
        assert "plain.git: protected branch refs/heads/master does not exist (branches: refs/heads/main)" in warning
        assert "symbolic-ref HEAD refs/heads/BRANCH" in warning


def test_reader_clone_gets_public_and_is_refused_secret(tmp_path):
    root, admin, reader = init_root(tmp_path)
    with running_server(root) as (url, _log):
        work = admin_work_tree(tmp_path, url, admin)
        r, checkout = clone(tmp_path, url, "models", reader, READER, "reader", check=False)
        assert checkout.returncode != 0 and b"access denied" in checkout.stderr
        assert sha256_file(r / "public" / "p.safetensors") == sha256_file(work / "public" / "p.safetensors")
        assert not (r / "secret" / "s.safetensors").exists()
        # the client lies about who it is: the server still refuses the secret objects
        shutil.rmtree(r / ".fmhub")
        r2, checkout = clone(tmp_path, url, "models", reader, ADMIN.replace("admin", "liar"), "liar", check=False)
        assert checkout.returncode != 0 and not (r2 / "secret" / "s.safetensors").exists()


def test_reader_pushes_public_work_on_a_branch_and_reads_it_back(tmp_path):
    """Unprotected branches: the reader's own uploads are theirs to read; others who are not repository-wide readers cannot."""
    root, admin, reader = init_root(tmp_path)
    other = fmhub(tmp_path, "server", "token", "other@example.com", "--repo", "models", "--root", str(root)).stdout.decode().strip()
    with running_server(root) as (url, _log):
        admin_work_tree(tmp_path, url, admin)
        r, _ = clone(tmp_path, url, "models", reader, READER, "reader", check=False)
        git(r, "symbolic-ref", "HEAD", "refs/heads/feature")
        git(r, "reset", "-q", "origin/main")  # the index of main (secret/ is not in the work tree: never checked out)
        save_tensors(r / "public" / "mine.safetensors", {"w": torch.full((32, 32), 3.0)})
        git(r, "add", "public/mine.safetensors")
        git(r, "commit", "-qm", "my public work")
        pushed = git(r, "push", "origin", "HEAD:refs/heads/feature", check=False)
        assert pushed.returncode == 0, pushed.stderr
        mine = committed_manifest(r, "HEAD", "public/mine.safetensors").oids()
        status, answer, _ = batch(url, "models", reader, mine)
        assert all("download" in o["actions"] for o in answer["objects"])
        status, answer, _ = batch(url, "models", other, mine)
        assert [o["error"]["code"] for o in answer["objects"]] == [403] * len(mine)
        status, answer, _ = batch(url, "models", admin, mine)
        assert all("download" in o["actions"] for o in answer["objects"])
        # writing under secret/ is refused at push time, even on an unprotected branch
        (r / "note.txt").write_text("a file the local guard does not see: the server must refuse it")
        blob = git(r, "hash-object", "-w", "--no-filters", "note.txt").stdout.decode().strip()
        git(r, "update-index", "--add", "--cacheinfo", f"100644,{blob},secret/note.txt")
        git(r, "commit", "-qm", "into secret")
        pushed = git(r, "push", "origin", "HEAD:refs/heads/feature2", check=False)
        assert pushed.returncode != 0 and b"may not write secret/note.txt" in pushed.stderr, pushed.stderr


@pytest.mark.parametrize("body", [b"[1,2]", b'{"objects":[null]}', b"not json", b'{"operation":"download","objects":[]}',
                                  b'{"operation":"download","objects":[{"oid":"../../etc/passwd","size":1}]}',
                                  b'{"operation":"download","objects":[{"oid":"' + b"a" * 64 + b'","size":-1}]}',
                                  b'{"operation":"upload","objects":[{"oid":"' + b"a" * 64 + b'","size":true}]}'])
def test_malformed_batches_get_400_with_a_json_message(tmp_path, body):
    root, _admin, reader = init_root(tmp_path)
    with running_server(root) as (url, log):
        status, answer, headers = lfs_request(url, "/models.git/info/lfs/objects/batch", reader, body)
        assert status == 400 and isinstance(answer.get("message"), str) and "Traceback" not in "".join(log)
        assert headers["Content-Type"].startswith("application/vnd.git-lfs+json")


def test_server_commands_answer_bad_input_in_one_line(tmp_path):
    root = tmp_path / "srv"
    for args, msg in [(("init", "../evil"), "is not a repository name"), (("init", "x.git"), "is not a repository name"),
                      (("token", "bob@example.com"), "name at least one --repo or --admin")]:
        proc = fmhub(tmp_path, "server", *args, "--root", str(root), check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    fmhub(tmp_path, "server", "init", "models", "--root", str(root))
    again = fmhub(tmp_path, "server", "init", "models", "--root", str(root), check=False)
    assert again.returncode == 1 and "already exists" in again.stderr.decode()
    (root / ".fmhub").mkdir(exist_ok=True)
    (root / ".fmhub" / "tokens.yaml").write_text('tokens:\n  plain-token: {user: bob@example.com, repos: [models]}\n')
    refused = fmhub(tmp_path, "server", "token", "eve@example.com", "--repo", "models", "--root", str(root), check=False)
    assert refused.returncode == 1 and "tokens are stored as their sha256" in refused.stderr.decode()
    missing = fmhub(tmp_path, "server", "--root", str(tmp_path / "nowhere"), "--port", "0", check=False)
    assert missing.returncode == 1 and "no such directory" in missing.stderr.decode()


def test_tokens_file_holds_only_digests(tmp_path):
    root, admin, reader = init_root(tmp_path)
    text = (root / ".fmhub" / "tokens.yaml").read_text()
    assert admin not in text and reader not in text and text.count("sha256:") == 2
    assert (root / ".fmhub" / "tokens.yaml").stat().st_mode & 0o077 == 0


def lfs_pointer_repo(tmp_path: Path, url: str, token: str, user: str, objects: dict[str, tuple[str, int]], name: str) -> Path:
    """A repository of plain git-lfs pointer files (path -> (oid, size)) whose remote is the server's ``models``."""
    r = tmp_path / name
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    git(r, "lfs", "install", "--local")
    use_token(r, url, token, user)
    git(r, "remote", "add", "origin", f"{url}/models.git")
    files = {".gitattributes": "*.bin filter=lfs diff=lfs merge=lfs -text\n"}
    files.update({path: f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n" for path, (oid, size) in objects.items()})
    for path, text in files.items():
        (r / "p.txt").write_text(text)
        blob = git(r, "hash-object", "-w", "--no-filters", "p.txt").stdout.decode().strip()
        git(r, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}")
    git(r, "commit", "-qm", "pointers")
    return r


def test_the_git_lfs_client_gets_what_its_user_may_read_and_nothing_else(tmp_path):
    """The official git-lfs client, pointed at the server by nothing but the remote URL and a credential helper."""
    if shutil.which("git-lfs") is None:
        pytest.skip("git-lfs is not installed")
    root, admin, reader = init_root(tmp_path)
    with running_server(root) as (url, _log):
        work = admin_work_tree(tmp_path, url, admin)
        public = committed_manifest(work, "HEAD", "public/p.safetensors").oids()[-1]
        secret = secret_oids(work)[-1]
        objects = {"public.bin": public, "secret.bin": secret}
        for token, user, gets in [(reader, READER, {"public.bin"}), (admin, ADMIN, {"public.bin", "secret.bin"})]:
            r = lfs_pointer_repo(tmp_path, url, token, user, objects, f"lfs-{user.partition('@')[0]}")
            fetched = git(r, "lfs", "fetch", "origin", "main", check=False)
            assert (fetched.returncode == 0) == (gets == set(objects)), fetched.stderr
            for path, (oid, _size) in objects.items():
                stored = r / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
                assert stored.exists() == (path in gets), (user, path, fetched.stderr)
                if stored.exists():
                    assert sha256_file(stored) == oid
        denied = [e for e in audit_entries(root, "models") if e["who"] == READER and e["decision"] == "deny"]
        assert any(secret[0] in e["details"].get("objects", [e["target"]]) for e in denied)


def test_storage_on_another_filesystem_takes_uploads(tmp_path):
    """--storage on another disk: an upload is staged beside the objects, so its rename into place stays on one filesystem."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) to store on")
    store = shm / f"fmhub-test-{tmp_path.name}-{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:8]}"
    root, admin, _reader = init_root(tmp_path)
    try:
        with running_server(root, "--storage", str(store)) as (url, _log):
            data = b"weights on another disk" * 100
            oid = hashlib.sha256(data).hexdigest()
            status, _answer, _ = lfs_request(url, f"/_/models.git/info/lfs/objects/storage/{oid}", admin, data, "PUT")
            assert status == 200
            assert (store / "_" / "models" / oid).read_bytes() == data
    finally:
        shutil.rmtree(store, ignore_errors=True)
