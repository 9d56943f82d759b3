"""Where a served model and its adapters come from: a directory in the work tree, or ``PATH@REV`` in the repository.

A *source* is a directory holding a transformers model (``config.json`` and
``*.safetensors``, maybe a tokenizer) or a PEFT LoRA adapter
(``adapter_config.json`` + ``adapter_model.safetensors``). ``PATH@REV`` reads
it as committed at ``REV`` through fmhub's object store (objects the store
lacks are fetched from the remote's LFS server), without touching the work
tree. Every source has a ``version``: the git tree id of the directory at the
revision, or a hash of the files' bytes in the work tree, so a server can tell
a changed adapter from the one it already holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterable

from fmhub.models import lora
from fmhub.base.errors import FmhubError
from fmhub.core.repo import git, open_store, toplevel
from fmhub.governance.access import check_smudge
from fmhub.models.views import CheckpointView, from_path, from_revision

MODEL_CONFIG = "config.json"

@dataclass(frozen=True)
class Source:
    """A model or adapter directory: in the work tree (``rev`` None) or at a commit of ``repo``."""

    path: str  # absolute for the work tree; relative to the repository top at a revision
    rev: str | None = None  # a resolved commit id
    repo: str | None = None  # the repository top, when ``rev`` is set
    given: str = ""  # as the user wrote it, for messages

    @property
    def label(self) -> str:
        return self.given or (f"{self.path}@{self.rev[:12]}" if self.rev else self.path)

    def files(self) -> list[str]:
        """Names of the files directly in the directory."""
        if self.rev is None:
            if not os.path.isdir(self.path):
                raise FmhubError(f"{self.label}: no such directory")
            return sorted(n for n in os.listdir(self.path) if os.path.isfile(os.path.join(self.path, n)))
        out = git("ls-tree", "-z", "--name-only", "--full-tree", self.rev, "--", self.path + "/", cwd=self.repo, check=False)
        names = sorted(os.path.basename(p) for p in out.split("\0") if p)
        if not names:
            raise FmhubError(f"{self.label}: no such directory at {self.rev[:12]} (check the path and the revision)")
        return names

    def read(self, name: str) -> bytes:
        """A small file of the directory, as the user sees it (never a manifest: see `view` for weights)."""
        if self.rev is None:
            try:
                with open(os.path.join(self.path, name), "rb") as f:
                    return f.read()
            except OSError as exc:
                raise FmhubError(f"{self.label}: cannot read {name}: {exc.strerror}") from None
        from fmhub.core.repo import blob_at

        return blob_at(self.rev, f"{self.path}/{name}", self.repo)

    def read_json(self, name: str) -> dict:
        try:
            doc = json.loads(self.read(name))
        except ValueError as exc:
            raise FmhubError(f"{self.label}: {name} is not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise FmhubError(f"{self.label}: {name} is not a JSON object")
        return doc

    def view(self) -> CheckpointView:
        """The directory's ``*.safetensors`` as one checkpoint, read tensor by tensor."""
        if self.rev is None:
            return from_path(self.path)
        return from_revision(self.rev, self.path, open_store(self.repo), self.repo)

    @property
    def version(self) -> str:
        """A content id: equal for equal files, different when any file changed."""
        if self.rev is not None:
            return git("rev-parse", f"{self.rev}:{self.path}", cwd=self.repo).strip()
        h = hashlib.sha256()
        for name in self.files():
            h.update(name.encode() + b"\0")
            with open(os.path.join(self.path, name), "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        return "wt-" + h.hexdigest()[:40]

    def to_json(self) -> dict:
        return {"path": self.path, "rev": self.rev, "repo": self.repo, "given": self.given}

    @classmethod
    def from_json(cls, doc: dict) -> "Source":
        return cls(str(doc["path"]), doc.get("rev"), doc.get("repo"), str(doc.get("given", "")))


def parse_source(spec: str, cwd: str | None = None) -> Source:
    """``PATH`` (a directory on disk) or ``PATH@REV`` (the directory as committed at REV in the repository around PATH)."""
    cwd = os.path.abspath(cwd or os.getcwd())
    path, sep, rev = spec.rpartition("@")
    if not sep or not path or os.path.exists(os.path.join(cwd, spec)):
        return Source(os.path.abspath(os.path.join(cwd, spec)), given=spec)
    from fmhub.models.diffsides import resolve_rev

    absolute = os.path.abspath(os.path.join(cwd, path))
    # the repository is the one around the path (or around cwd, for a path that only exists at REV)
    probe = absolute
    while not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    top = toplevel(probe)
    rel = os.path.relpath(absolute, top).replace(os.sep, "/")
    if rel.startswith(".."):
        raise FmhubError(f"{spec}: {path} is outside the repository at {top}")
    return Source("" if rel == "." else rel, resolve_rev(rev, top), top, spec)


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter to serve: the name clients use (the request's ``model``) and where it is."""

    name: str
    source: Source


def _adapter_dirs(src: Source) -> list[Source]:
    """``src`` itself if it is an adapter, else its subdirectories that are adapters."""
    if lora.CONFIG in src.files():
        return [src]
    if src.rev is None:
        subs = sorted(d for d in os.listdir(src.path) if os.path.isfile(os.path.join(src.path, d, lora.CONFIG)))
        return [Source(os.path.join(src.path, d), given=os.path.join(src.given, d)) for d in subs]
    listing = git("ls-tree", "-r", "-z", "--name-only", "--full-tree", src.rev, "--", (src.path + "/") if src.path else ".",
                  cwd=src.repo, check=False)
    subs = sorted({os.path.dirname(p) for p in listing.split("\0") if p.endswith("/" + lora.CONFIG)})
    return [Source(d, src.rev, src.repo, f"{d}@{src.given.rpartition('@')[2]}") for d in subs]


def parse_adapters(specs: Iterable[str], cwd: str | None = None) -> list[AdapterSpec]:
    """Adapters from ``NAME=PATH[@REV]`` items, or ``PATH[@REV]`` of one adapter or of a directory of adapters.

    An item may hold several, comma-separated. A name defaults to the
    adapter directory's name; two adapters of one name are refused.
    """
    out: dict[str, AdapterSpec] = {}
    for item in specs:
        for part in filter(None, (p.strip() for p in item.split(","))):
            name, eq, where = part.partition("=")
            if not eq:
                name, where = "", part
            found = _adapter_dirs(parse_source(where, cwd))
            if not found:
                raise FmhubError(f"{where}: neither a PEFT adapter ({lora.CONFIG}) nor a directory of adapters")
            if name and len(found) > 1:
                raise FmhubError(f"{part}: names one adapter but {where} holds {len(found)}")
            for src in found:
                n = name or os.path.basename(src.path.rstrip("/")) or "adapter"
                check_name(n)
                if n in out:
                    raise FmhubError(f"two adapters are named {n!r} ({out[n].source.label} and {src.label}); name them: NAME=PATH")
                out[n] = AdapterSpec(n, src)
    return list(out.values())


def check_name(name: str) -> None:
    if not name or len(name) > 128 or any(c.isspace() or c in "/\\\"'" for c in name):
        raise FmhubError(f"{name!r} is not a usable adapter name (1-128 characters, no spaces, quotes or slashes)")


def declared_adapters(rev: str, base: Source | None = None, cwd: str | None = None) -> list[AdapterSpec]:
    """The adapters recorded with ``fmhub adapter add`` at ``rev`` (those of ``base``'s path, when given).

    This is what ``fmhub deploy`` serves: an adapter's name is its directory's name.
    """
    from fmhub.models.adapters import list_adapters
    from fmhub.models.diffsides import resolve_rev

    top = toplevel(cwd)
    sha = resolve_rev(rev, top)
    out = []
    for info in list_adapters(sha, top):
        if base is not None and base.rev is not None and info.base.path.rstrip("/") != base.path.rstrip("/"):
            continue
        name = os.path.basename(info.path.rstrip("/"))
        check_name(name)
        out.append(AdapterSpec(name, Source(info.path, sha, top, f"{info.path}@{rev}")))
    names = [a.name for a in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise FmhubError(f"{rev}: several recorded adapters are named {sorted(dup)[0]!r}; rename one directory")
    return out


def check_readable(src: Source) -> None:
    """Checkout's read rule for each stored ``*.safetensors`` of ``src`` at its revision, in its repository.

    A served or evaluated model needs every tensor, so any deny refuses it
    (one line, the first denied file or tensor and its rule), a placeholder
    deny included: the manifest text is no model. A work-tree source is the
    user's own bytes. Call it before reusing a materialized directory too:
    another user may have materialized it.
    """
    if src.rev is None:
        return
    from fmhub.governance.access import require_readable
    from fmhub.core.manifest import MAX_MANIFEST_BYTES, Manifest, is_manifest
    from fmhub.core.repo import blob_at

    for name in src.files():
        rel = f"{src.path}/{name}" if src.path else name
        if not name.endswith(".safetensors") or int(git("cat-file", "-s", f"{src.rev}:{rel}", cwd=src.repo)) > MAX_MANIFEST_BYTES:
            continue  # over the limit: no manifest, a file committed without fmhub's filter (git's to give)
        data = blob_at(src.rev, rel, src.repo)
        if is_manifest(data):
            m = Manifest.from_bytes(data, rel)
            require_readable(rel, [] if m.is_data else [t.name for t in m.tensors], src.repo, via=f"materialize {src.label}",
                             outcome="nothing was materialized")


def materialized(src: Source, dest: str) -> str:
    """``dest`` holding ``src``: reused when it is there, else materialized; the read policy is checked either way."""
    check_readable(src)
    return dest if os.path.isdir(dest) else _materialize(src, dest)


def materialize(src: Source, dest: str) -> str:
    """Write ``src`` as a plain directory at ``dest`` (small files, then the weights), all or nothing.

    The read policy is checked first (`check_readable`: nothing is written on
    a deny). The directory appears by one rename when complete, so a reader
    never sees half of it; an existing ``dest`` is replaced.
    """
    check_readable(src)
    return _materialize(src, dest)


def _materialize(src: Source, dest: str) -> str:
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".fmhub-materialize-")
    try:
        names = src.files()
        for name in names:
            if not name.endswith(".safetensors"):
                _write(os.path.join(tmp, name), src.read(name))
        weights = [n for n in names if n.endswith(".safetensors")]
        if weights:
            _write_weights(src, weights, tmp)
        if os.path.exists(dest):
            old = dest + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_weights(src: Source, names: list[str], tmp: str) -> None:
    """Each ``*.safetensors`` of ``src``, byte-identical to the committed file."""
    if src.rev is None:
        for n in names:
            shutil.copyfile(os.path.join(src.path, n), os.path.join(tmp, n))
        return
    from fmhub.core import checkpoint
    from fmhub.core.repo import blob_at
    from fmhub.git.sync import LazyFetcher

    store = open_store(src.repo)
    try:
        for n in names:
            rel = f"{src.path}/{n}" if src.path else n
            with open(os.path.join(tmp, n), "wb") as f:
                checkpoint.smudge(blob_at(src.rev, rel, src.repo), store, f, rel, fetch=LazyFetcher(store), root=src.repo,
                                    access=check_smudge)
                f.flush()
                os.fsync(f.fileno())
    finally:
        store.close()


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def check_recorded_base(name: str, sidecar: bytes | None, where: str, base: Source) -> None:
    """Refuse an adapter whose ``fmhub-adapter.json`` records the served base's path with other weights.

    Same shapes, other weights: it would load and serve wrong answers. An
    adapter recorded against a base at another path (or a base served from
    the work tree) gets only the shape checks.
    """
    from fmhub.models.adapters import base_files, read_sidecar
    from fmhub.base.errors import ServeError

    if sidecar is None or base.rev is None:
        return
    recorded = read_sidecar(sidecar, where)
    if recorded.path.rstrip("/") != base.path.rstrip("/"):
        return
    if base_files(base.path, base.rev, base.repo) != recorded.files:
        raise ServeError(409, f"adapter {name} was trained on the base {recorded.path} at {recorded.revision[:12]}, whose "
                              f"weights differ from the served base {base.label}; serve that revision or re-train the adapter",
                         param="model")
