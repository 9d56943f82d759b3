"""Datasets in the repo, end to end with real git: jsonl and parquet stored as content-defined chunks.

An edit of a few rows stores a few new chunk objects; every version checks out
byte for byte; `git diff`, `git log -p` and `fmhub diff --json` report rows
added, removed and changed with samples; broken files still round-trip and
the diff says what it cannot read; chunks travel through an LFS server.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.helpers import fmhub, git, sha256_file, store_objects

from fmhub.core.chunking import DEFAULT_LINES
from fmhub.core.manifest import Manifest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon".split()


def make_rows(n: int, seed: int = 0, with_id: bool = True) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        row = {"text": " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(5, 40))), "label": i % 3, "score": round(rnd.random(), 6)}
        rows.append({"id": i, **row} if with_id else row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# Small content-defined pages without dictionaries make unchanged pages byte-identical across versions
# (docs/manifest.md, "Data files"); pyarrow's defaults (1 MB pages, dictionaries) dedupe far less.
PARQUET_OPTS = {"use_content_defined_chunking": {"min_chunk_size": 8192, "max_chunk_size": 32768}, "use_dictionary": False}


def write_parquet(path: Path, rows: list[dict], **opts) -> None:
    pq.write_table(pa.Table.from_pylist(rows), str(path), **(opts or PARQUET_OPTS))


@pytest.fixture
def drepo(repo: Path) -> Path:
    fmhub(repo, "track", "*.jsonl", "*.parquet")
    assert "*.jsonl filter=fmhub diff=fmhub merge=fmhub" in (repo / ".gitattributes").read_text()
    git(repo, "add", ".gitattributes")
    git(repo, "commit", "-qm", "track datasets")
    return repo


def commit(repo: Path, message: str, *paths: str) -> None:
    git(repo, "add", *paths)
    git(repo, "commit", "-qm", message)


def manifest(repo: Path, path: str, rev: str = "HEAD") -> Manifest:
    return Manifest.from_bytes(git(repo, "show", f"{rev}:{path}").stdout, path)


def checkout_sha(repo: Path, path: str, rev: str) -> str:
    """Delete the file and check it out from ``rev`` (so smudge really runs); its sha256."""
    (repo / path).unlink()
    git(repo, "checkout", rev, "--", path)
    return sha256_file(repo / path)


def edited(rows: list[dict]) -> list[dict]:
    """v1: two rows changed, one removed, one inserted (ids stay unique)."""
    rows = [dict(r) for r in rows]
    rows[1200]["text"] = "EDITED " + rows[1200]["text"]
    rows[15000]["label"] = 99
    del rows[9000]
    rows.insert(5000, {"id": 100000, "text": "a brand new row", "label": 1, "score": 0.5})
    return rows


# -- storage -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_edit_of_a_few_rows_stores_a_few_chunks_and_both_versions_check_out(drepo, fmt):
    path = f"data.{fmt}"
    rows = make_rows(30000 if fmt == "jsonl" else 60000)  # parquet compresses: twice the rows for ~3.5 MB
    v1_rows = edited(rows)
    if fmt == "parquet":  # a parquet insert rewrites a page in every column: edit rows in place here
        v1_rows = [dict(r) for r in rows]
        for i in (1200, 30000, 58000):
            v1_rows[i]["text"] = "EDITED " + v1_rows[i]["text"]
    write = write_jsonl if fmt == "jsonl" else write_parquet
    write(drepo / path, rows)
    v0 = sha256_file(drepo / path)
    size0 = (drepo / path).stat().st_size
    assert 2 << 20 < size0 < 6 << 20
    commit(drepo, "v0", path)
    m0 = manifest(drepo, path)
    assert git(drepo, "show", f"HEAD:{path}").stdout.startswith(b"fmhub manifest 3\nformat " + fmt.encode() + b"\n")
    assert m0.is_data and m0.format == fmt and m0.sha256 == v0 and m0.size == size0
    assert len(m0.tensors) > 20  # many chunks, ~64 KiB each
    if fmt == "jsonl":
        data = (drepo / path).read_bytes()
        ends, at = [], 0
        for c in m0.tensors:
            at += c.size
            ends.append(at)
        assert all(data[e - 1 : e] == b"\n" for e in ends)  # jsonl chunks end at line ends
        assert all(c.size >= DEFAULT_LINES.min_size for c in m0.tensors[:-1])
    before = store_objects(drepo)
    assert set(before) == {t.oid for t in m0.tensors}  # chunks are the only objects: no header object

    write(drepo / path, v1_rows)
    v1 = sha256_file(drepo / path)
    size1 = (drepo / path).stat().st_size
    commit(drepo, "v1", path)
    new = {oid: n for oid, n in store_objects(drepo).items() if oid not in before}
    m1 = manifest(drepo, path)
    assert set(new) == {t.oid for t in m1.tensors} - {t.oid for t in m0.tensors}
    assert 1 <= len(new) <= 8, len(new)
    assert sum(new.values()) < 0.10 * size1, (sum(new.values()), size1)

    assert git(drepo, "status", "--porcelain").stdout == b""  # re-cleaning gives the same manifest
    assert checkout_sha(drepo, path, "HEAD~1") == v0
    assert checkout_sha(drepo, path, "HEAD") == v1
    assert git(drepo, "status", "--porcelain").stdout == b""


def test_fsck_and_gc_see_the_chunks(drepo):
    write_jsonl(drepo / "a.jsonl", make_rows(4000))
    commit(drepo, "v0", "a.jsonl")
    v0_chunks = {t.oid for t in manifest(drepo, "a.jsonl").tensors}
    rows = make_rows(4000)
    rows[10]["text"] = "changed"
    write_jsonl(drepo / "a.jsonl", rows)
    commit(drepo, "v1", "a.jsonl")
    v1_only = {t.oid for t in manifest(drepo, "a.jsonl").tensors} - v0_chunks
    assert v1_only
    assert "store is consistent" in fmhub(drepo, "fsck").stdout.decode()

    out = fmhub(drepo, "gc", "--grace", "0").stdout.decode()
    assert "removed 0 object(s)" in out  # both versions are reachable
    # drop v1 from history: gc removes exactly its own chunks, keeps v0's
    git(drepo, "reset", "-q", "--hard", "HEAD~1")
    git(drepo, "reflog", "expire", "--expire=now", "--all")
    out = fmhub(drepo, "gc", "--grace", "0").stdout.decode()
    assert f"removed {len(v1_only)} object(s)" in out
    assert set(store_objects(drepo)) == v0_chunks

    # a lost chunk is reported by fsck, naming the file
    victim = sorted(v0_chunks)[0]
    p = drepo / ".git" / "lfs" / "objects" / victim[:2] / victim[2:4] / victim
    p.chmod(0o644)
    p.unlink()
    proc = fmhub(drepo, "fsck", check=False)
    assert proc.returncode != 0
    assert "a.jsonl" in (proc.stdout + proc.stderr).decode() and "chunk" in (proc.stdout + proc.stderr).decode()


def test_broken_files_round_trip_byte_for_byte(drepo):
    """Storage never parses: a truncated parquet file, garbage named .parquet, and jsonl with a bad line all round-trip."""
    write_parquet(drepo / "t.parquet", make_rows(3000))
    full = (drepo / "t.parquet").read_bytes()
    (drepo / "t.parquet").write_bytes(full[: len(full) // 2])  # starts with PAR1, footer gone
    (drepo / "g.parquet").write_bytes(random.Random(1).randbytes(300_000))  # no magic: chosen by name
    (drepo / "b.jsonl").write_bytes(b'{"a": 1}\n{"a": 2,\n\xff\xfe not text\n{"a": 3}')  # no final newline
    want = {p: sha256_file(drepo / p) for p in ("t.parquet", "g.parquet", "b.jsonl")}
    commit(drepo, "broken", *want)
    assert manifest(drepo, "g.parquet").format == "parquet" and manifest(drepo, "b.jsonl").format == "jsonl"
    for p, sha in want.items():
        assert checkout_sha(drepo, p, "HEAD") == sha


# -- diffs -------------------------------------------------------------------------------------


def test_git_diff_of_jsonl_counts_rows_and_shows_samples(drepo):
    rows = make_rows(30000)
    write_jsonl(drepo / "data.jsonl", rows)
    commit(drepo, "v0", "data.jsonl")
    write_jsonl(drepo / "data.jsonl", edited(rows))
    commit(drepo, "v1", "data.jsonl")

    out = git(drepo, "diff", "HEAD~1", "HEAD", "--", "data.jsonl").stdout.decode()
    assert "diff --fmhub a/data.jsonl b/data.jsonl" in out
    assert "30,000 -> 30,000 rows" in out
    assert "+1 added, -1 removed, ~2 changed, 29,997 unchanged (matched by key 'id')" in out
    assert '"text":"a brand new row"' in out  # the added row
    assert '"id":9000' in out  # the removed one
    assert "EDITED " in out and '"label":99' in out  # both changed rows, new version shown
    changed = [line for line in out.splitlines() if line.startswith("~ line")]
    assert len(changed) == 2 and all(len(line) < 200 for line in out.splitlines())

    # the work tree against HEAD goes through the same driver (a file, not a manifest, on the new side)
    rows2 = edited(rows)
    rows2.append({"id": 100001, "text": "appended", "label": 0, "score": 0.0})
    write_jsonl(drepo / "data.jsonl", rows2)
    out = git(drepo, "diff", "--", "data.jsonl").stdout.decode()
    assert "+1 added, -0 removed, ~0 changed" in out and '"text":"appended"' in out
    d = json.loads(fmhub(drepo, "diff", "--json").stdout)["datasets"]  # HEAD vs the work tree
    assert [(x["path"], x["added"], x["removed"], x["changed"], x["new_rows"]) for x in d] == [("data.jsonl", 1, 0, 0, 30001)]


def test_without_a_key_rows_are_aligned_by_content(drepo):
    rows = make_rows(30000, with_id=False)
    write_jsonl(drepo / "nokey.jsonl", rows)
    commit(drepo, "v0", "nokey.jsonl")
    v1 = [dict(r) for r in rows]
    v1[100]["text"] = "changed in place"  # an equal-length replaced block: changed
    del v1[20000:20003]  # removed
    v1[25000:25000] = [{"text": "inserted", "label": 0, "score": 0.0}] * 2  # added
    write_jsonl(drepo / "nokey.jsonl", v1)
    commit(drepo, "v1", "nokey.jsonl")
    out = git(drepo, "diff", "HEAD~1", "HEAD", "--", "nokey.jsonl").stdout.decode()
    assert "+2 added, -3 removed, ~1 changed, 29,996 unchanged (matched by position)" in out
    assert "~ line 101:" in out and "changed in place" in out


def test_key_attribute_picks_the_key_column(drepo):
    rows = [{"uid": f"u{i}", "id": i % 7, "v": i} for i in range(500)]  # `id` is not unique: the attribute wins
    write_jsonl(drepo / "k.jsonl", rows)
    with open(drepo / ".gitattributes", "a") as f:
        f.write("k.jsonl fmhub-key=uid\n")
    commit(drepo, "v0", "k.jsonl", ".gitattributes")
    v1 = list(reversed(rows))  # reordered...
    v1[0] = {**v1[0], "v": -1}  # ...and one row changed
    write_jsonl(drepo / "k.jsonl", v1)
    commit(drepo, "v1", "k.jsonl")
    out = git(drepo, "diff", "HEAD~1", "HEAD", "--", "k.jsonl").stdout.decode()
    assert "+0 added, -0 removed, ~1 changed, 499 unchanged (matched by key 'uid')" in out


def test_git_diff_of_parquet_and_fmhub_diff_json(drepo):
    rows = make_rows(20000)
    write_parquet(drepo / "data.parquet", rows)
    write_jsonl(drepo / "data.jsonl", rows)
    commit(drepo, "v0", "data.parquet", "data.jsonl")
    write_parquet(drepo / "data.parquet", edited(rows))
    commit(drepo, "v1", "data.parquet")

    out = git(drepo, "diff", "HEAD~1", "HEAD", "--", "data.parquet").stdout.decode()
    assert "+1 added, -1 removed, ~2 changed, 19,997 unchanged (matched by key 'id')" in out
    assert "+ row 5001:" in out and "- row 9001:" in out

    proc = fmhub(drepo, "diff", "HEAD~1", "HEAD", "--json")
    data = json.loads(proc.stdout)
    by_path = {d["path"]: d for d in data["datasets"]}
    d = by_path["data.parquet"]
    assert (d["status"], d["format"], d["old_rows"], d["new_rows"]) == ("changed", "parquet", 20000, 20000)
    assert (d["added"], d["removed"], d["changed"], d["unchanged"], d["key"]) == (1, 1, 2, 19997, "id")
    kinds = [s["kind"] for s in d["samples"]]
    assert kinds.count("added") == 1 and kinds.count("removed") == 1 and kinds.count("changed") == 2
    added = next(s for s in d["samples"] if s["kind"] == "added")
    assert json.loads(added["new"]) == {"id": 100000, "text": "a brand new row", "label": 1, "score": 0.5}
    assert by_path["data.jsonl"]["status"] == "unchanged"  # equal sha256: not even read
    assert data["tensors"] == []

    text = fmhub(drepo, "diff", "HEAD~1", "HEAD").stdout.decode()
    assert "data.parquet" in text and "~2 changed" in text


def test_git_log_p_lists_rows_through_textconv(drepo):
    rows = make_rows(16000)
    write_jsonl(drepo / "data.jsonl", rows)
    commit(drepo, "v0", "data.jsonl")
    write_jsonl(drepo / "data.jsonl", edited(rows))
    commit(drepo, "v1", "data.jsonl")
    out = git(drepo, "log", "-p", "-1", "--format=", "--", "data.jsonl").stdout.decode()
    minus = [line for line in out.splitlines() if line.startswith("-") and not line.startswith("---")]
    plus = [line for line in out.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert any("fmhub jsonl dataset" in line and "16,000 rows" in line for line in minus)
    assert any('"text":"a brand new row"' in line for line in plus)
    assert any('"id":9000' in line for line in minus)
    assert len(plus) == 4 and len(minus) == 4  # the summary line, and one line per row added/removed/changed


def test_unparseable_parquet_is_said_so_and_malformed_jsonl_names_its_line(drepo):
    rows = make_rows(2000)
    write_parquet(drepo / "t.parquet", rows)
    write_jsonl(drepo / "m.jsonl", rows[:50])
    commit(drepo, "v0", "t.parquet", "m.jsonl")
    full = (drepo / "t.parquet").read_bytes()
    (drepo / "t.parquet").write_bytes(full[: len(full) - 100])  # the footer is cut off
    lines = (drepo / "m.jsonl").read_text().splitlines(keepends=True)
    lines[6] = '{"id": 6, "text": oops}\n'
    (drepo / "m.jsonl").write_text("".join(lines))
    commit(drepo, "broken", "t.parquet", "m.jsonl")

    proc = git(drepo, "diff", "HEAD~1", "HEAD")
    out = proc.stdout.decode()
    assert proc.returncode == 0
    assert "b/t.parquet cannot be parsed as parquet rows" in out
    assert "2,000 -> ? rows" in out
    assert "b/m.jsonl: line 7: not valid JSON" in out
    assert "50 -> 50 rows" in out and "~1 changed" in out  # the bad line is still a row (by its text)

    d = {x["path"]: x for x in json.loads(fmhub(drepo, "diff", "HEAD~1", "HEAD", "--json").stdout)["datasets"]}
    assert d["t.parquet"]["new_rows"] is None and "cannot be parsed" in d["t.parquet"]["notes"][0]
    assert d["m.jsonl"]["errors"] == [{"side": "new", "row": 7, "message": d["m.jsonl"]["errors"][0]["message"]}]
    assert d["m.jsonl"]["error_count"] == 1


def test_merge_takes_the_side_that_changed_and_conflicts_when_both_did(drepo):
    rows = make_rows(3000)
    write_jsonl(drepo / "d.jsonl", rows)
    commit(drepo, "base", "d.jsonl")
    git(drepo, "checkout", "-qb", "other")
    theirs = [dict(r) for r in rows] + [{"id": 5000, "text": "theirs", "label": 0, "score": 0.0}]
    write_jsonl(drepo / "d.jsonl", theirs)
    commit(drepo, "theirs", "d.jsonl")
    want = sha256_file(drepo / "d.jsonl")
    git(drepo, "checkout", "-q", "main")
    (drepo / "other.txt").write_text("unrelated\n")
    commit(drepo, "ours", "other.txt")
    git(drepo, "merge", "-q", "--no-edit", "other")
    assert sha256_file(drepo / "d.jsonl") == want

    git(drepo, "checkout", "-qb", "b2")
    write_jsonl(drepo / "d.jsonl", theirs[:-1] + [{"id": 6000, "text": "b2", "label": 0, "score": 0.0}])
    commit(drepo, "b2", "d.jsonl")
    git(drepo, "checkout", "-q", "main")
    write_jsonl(drepo / "d.jsonl", theirs + [{"id": 7000, "text": "main", "label": 0, "score": 0.0}])
    commit(drepo, "main again", "d.jsonl")
    proc = git(drepo, "merge", "--no-edit", "b2", check=False)
    assert proc.returncode != 0
    assert "changed on both sides" in (proc.stdout + proc.stderr).decode()
    git(drepo, "merge", "--abort")


# -- remotes -----------------------------------------------------------------------------------


def test_push_to_lfs_server_and_clone_gives_identical_bytes(drepo, lfs_server, tmp_path):
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    git(drepo, "remote", "add", "origin", bare.as_uri())
    git(drepo, "config", "lfs.url", lfs_server.url)
    rows = make_rows(20000)
    write_jsonl(drepo / "data.jsonl", rows)
    write_parquet(drepo / "data.parquet", rows)
    commit(drepo, "v0", "data.jsonl", "data.parquet")
    git(drepo, "push", "-q", "origin", "main")
    need = {t.oid for p in ("data.jsonl", "data.parquet") for t in manifest(drepo, p).tensors}
    assert need <= set(lfs_server.objects())

    # v1 uploads only the chunks the server lacks
    write_jsonl(drepo / "data.jsonl", edited(rows))
    commit(drepo, "v1", "data.jsonl")
    lfs_server.clear_log()
    git(drepo, "push", "-q", "origin", "main")
    put = {r.path.rsplit("/", 1)[1] for r in lfs_server.requests if r.method == "PUT"}
    fresh = {t.oid for t in manifest(drepo, "data.jsonl").tensors} - {t.oid for t in manifest(drepo, "data.jsonl", "HEAD~1").tensors}
    assert put == fresh and 0 < len(put) <= 8

    fmhub(tmp_path, "install", "--global")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "-c", f"lfs.url={lfs_server.url}", bare.as_uri(), str(clone))
    for p in ("data.jsonl", "data.parquet"):
        assert sha256_file(clone / p) == sha256_file(drepo / p)
    assert checkout_sha(clone, "data.jsonl", "HEAD~1") == manifest(drepo, "data.jsonl", "HEAD~1").sha256
    assert fmhub(clone, "fsck").returncode == 0


def test_load_dataset_at_a_revision_without_touching_the_work_tree(drepo: Path):
    from fmhub.data.revision import load_dataset, materialize

    v1, v2 = make_rows(200, seed=3), make_rows(200, seed=3)
    v2[7]["text"] = "edited"
    write_parquet(drepo / "d.parquet", v1)
    git(drepo, "add", "d.parquet")
    git(drepo, "commit", "-qm", "v1")
    write_parquet(drepo / "d.parquet", v2)
    git(drepo, "commit", "-qam", "v2")
    before = sha256_file(drepo / "d.parquet")
    old = load_dataset("d.parquet", rev="HEAD~1", cwd=str(drepo))
    assert old.num_rows == 200 and old[7]["text"] == v1[7]["text"] != "edited"
    assert load_dataset("d.parquet", cwd=str(drepo))[7]["text"] == "edited"
    assert sha256_file(drepo / "d.parquet") == before  # the work tree is as it was
    # the cached copy is the committed file, byte for byte (checked against a fresh checkout)
    cached = materialize("d.parquet", "HEAD~1", cwd=str(drepo))
    git(drepo, "checkout", "-q", "HEAD~1", "--", "d.parquet")
    assert sha256_file(Path(cached)) == sha256_file(drepo / "d.parquet")
