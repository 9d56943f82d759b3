"""A tracked data file as it was at any revision, as a local file or a Hugging Face ``datasets.Dataset``.

``load_dataset("data/reviews.parquet", rev="v1")`` gives the rows exactly as
committed at ``v1`` without touching the work tree: the committed manifest is
smudged from the object store (objects the store lacks are fetched from the
remote's LFS server) into a cache file named by the blob id, so asking again
for the same version costs nothing. A file committed without fmhub's filter
is used as git holds it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from fmhub.base.atomic import atomic_write
from fmhub.base.errors import FmhubError
from fmhub.core.rows import data_format

if TYPE_CHECKING:
    import datasets


def materialize(path: str, rev: str = "HEAD", cwd: str | None = None) -> str:
    """The local path of ``path``'s bytes at ``rev`` (a cache file under the git dir; the work tree is untouched).

    Checkout's read rule applies before the cache is looked at (another user may have filled it), and a
    placeholder is refused rather than cached in place of the bytes.
    """
    from fmhub.core import checkpoint
    from fmhub.core import repo
    from fmhub.git.sync import LazyFetcher
    from fmhub.governance.access import check_smudge

    top = repo.toplevel(cwd)
    blob_id = repo.git("rev-parse", f"{rev}:{path}", cwd=top).strip()
    _check_readable(blob_id, path, top)
    cache = os.path.join(repo.common_dir(top), "fmhub", "data-cache")
    out = os.path.join(cache, f"{blob_id}{os.path.splitext(path)[1]}")
    if os.path.exists(out):
        return out
    data = _blob(blob_id, top)
    store = repo.open_store(top)
    try:
        with atomic_write(out, "wb") as f:
            checkpoint.smudge(data, store, f, path, fetch=LazyFetcher(store), access=check_smudge)
    finally:
        store.close()
    return out


def _check_readable(blob_id: str, path: str, top: str) -> None:
    """Checkout's read rule for a manifest (a file committed without fmhub's filter is git's to give)."""
    from fmhub.core.manifest import MAX_MANIFEST_BYTES, Manifest, is_manifest
    from fmhub.core.repo import git

    if int(git("cat-file", "-s", blob_id, cwd=top)) > MAX_MANIFEST_BYTES:
        return
    data = _blob(blob_id, top)
    if is_manifest(data):
        from fmhub.governance.access import require_readable

        m = Manifest.from_bytes(data, path)
        require_readable(path, [] if m.is_data else [t.name for t in m.tensors], top, via="data-at", outcome="it was not read")


def _blob(blob_id: str, cwd: str) -> bytes:
    from fmhub.base import gitrun

    return gitrun.run(["cat-file", "blob", blob_id], cwd=cwd, text=False).stdout


def load_dataset(path: str, rev: str = "HEAD", cwd: str | None = None, **kwargs: Any) -> "datasets.Dataset":
    """``path`` at ``rev`` as a ``datasets.Dataset`` (``pip install "fmhub[data]"``; keyword arguments go to ``Dataset.from_json``/``from_parquet``)."""
    try:
        import datasets
    except ImportError:
        raise FmhubError("load_dataset needs Hugging Face datasets: pip install 'fmhub[data]' (or use materialize() and pyarrow)") from None

    local = materialize(path, rev, cwd)
    if data_format(path) == "parquet":
        return datasets.Dataset.from_parquet(local, **kwargs)
    return datasets.Dataset.from_json(local, **kwargs)
