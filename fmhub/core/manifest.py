"""The manifest: what git stores in place of a tracked checkpoint (spec: docs/manifest.md)."""

from __future__ import annotations

import json
import re
from collections import namedtuple

from fmhub.base import boundedjson
from fmhub.core.chunking import Chunking
from fmhub.base.errors import ManifestError
from fmhub.base.units import parse_uint

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import Mapping


MAGIC = b"fmhub manifest "
VERSION = 1  # written when no tensor is stored as a delta, so older readers keep working
DELTA_VERSION = 2  # written when some tensor is stored as a delta chain
DATA_VERSION = 3  # a data file (jsonl, parquet) stored as content-defined chunks; never mixed with tensors
CODED_VERSION = 4  # written when some tensor's root is an encoded object (``from planes sha256:… N``)
READS = (1, 2, 3, 4)
CHUNK_DTYPE = "U8"  # a data file's chunks appear in `Manifest.tensors` as 1-D byte tensors named "chunk N"
MAX_MANIFEST_BYTES = 64 << 20
MAX_CHAIN = 64  # delta links per tensor a reader follows (each one is a decode of the whole tensor's frames)

_OID_RE = re.compile(r"sha256:([0-9a-f]{64})\Z")
_DTYPE_RE = re.compile(r"[A-Za-z0-9_]+\Z")
_SHAPE_RE = re.compile(r"\[([0-9,]*)\]\Z")  # each dimension is then read with parse_uint
MAX_DIMS = 64  # no framework has tensors of more dimensions (numpy: 64)


# The records below are named tuples, not dataclasses: git's filter defines them on every git command, and a
# dataclass costs ten times as much to define (all of fmhub's in the filter: ~10 ms, a git-lfs clean's half).


class Delta(namedtuple("Delta", "codec oid size")):
    """One link of a delta chain: an object (``oid``, ``size`` bytes) that turns the previous bytes into the next
    with a codec."""

    __slots__ = ()


class Approx(namedtuple("Approx", "oid max_error tolerance")):
    """A tensor stored within a tolerance of the bytes it was added with, not bit for bit (a lossy delta).

    ``oid`` is the sha256 of the bytes as added (the entry's own oid names the
    bytes a checkout gives); ``max_error`` the largest element-wise
    |stored - added|; ``tolerance`` the bound the user set.
    """

    __slots__ = ()


class TensorEntry(namedtuple("TensorEntry", "name dtype shape size oid root deltas approx root_codec root_size",
                             defaults=(None, (), None, "", 0))):
    """One tensor: its name, dtype, shape, size, and the object holding its payload.

    ``oid`` (64 hex digits, no ``sha256:``) always names the tensor's full
    bytes (it is its identity, for diffs and merges). When ``root`` is set the
    store need not hold that object: the bytes are ``root``'s object with each
    of ``deltas`` applied in order, and must hash to ``oid``. With
    ``root_codec`` (version 4) the root object is itself encoded
    (``root_size`` bytes, decoded by that codec without a base) and ``deltas``
    may be empty: a tensor stored compressed. ``approx`` (only after a delta)
    says the last link is lossy.
    """

    __slots__ = ()

    def storage(self) -> list[tuple[str, int]]:
        """The objects that hold this tensor: its own, or its chain's root and deltas."""
        if self.root is None:
            return [(self.oid, self.size)]
        return [(self.root, self.root_size if self.root_codec else self.size)] + [(d.oid, d.size) for d in self.deltas]

    @property
    def stored_size(self) -> int:
        """Bytes this version added to the store: its last delta, its encoded root, or its whole bytes."""
        if self.deltas:
            return self.deltas[-1].size
        return self.root_size if self.root_codec else self.size


class Manifest:
    """A checkpoint file as git stores it: its header object and one object per tensor, in file order.

    A data file (version 3, ``chunking`` set) has no header (``header_oid`` is
    None) and its ``tensors`` are its content-defined chunks, in file order, each
    a ``U8`` tensor named ``chunk N``: code that walks objects (push, fetch, gc,
    fsck) needs no special case. ``sha256`` is then the whole file's sha256.
    """

    def __init__(self, format: str, size: int, header_oid: str | None, header_size: int, tensors: list[TensorEntry] | None = None,
                 metadata: Mapping[str, str] | None = None, chunking: Chunking | None = None, sha256: str | None = None) -> None:
        self.format, self.size, self.header_oid, self.header_size = format, size, header_oid, header_size
        self.tensors = tensors if tensors is not None else []
        self.metadata, self.chunking, self.sha256 = metadata, chunking, sha256

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __repr__(self) -> str:
        return "Manifest(" + ", ".join(f"{k}={v!r}" for k, v in vars(self).items()) + ")"

    @property
    def is_data(self) -> bool:
        """A data file stored as chunks (version 3), not a checkpoint stored as tensors."""
        return self.chunking is not None

    def oids(self) -> list[tuple[str, int]]:
        """Every object the store needs to rebuild the file, header first, as ``(oid, size)`` (delta chains expanded)."""
        out = [(self.header_oid, self.header_size)] if self.header_oid is not None else []
        for t in self.tensors:
            out += t.storage()
        return out

    def by_name(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}

    def to_bytes(self) -> bytes:
        if self.is_data:
            return self._data_bytes()
        version = VERSION
        if any(t.root_codec for t in self.tensors):
            version = CODED_VERSION
        elif any(t.root is not None for t in self.tensors):
            version = DELTA_VERSION
        lines = [
            f"fmhub manifest {version}",
            f"format {self.format}",
            f"size {self.size}",
            f"header sha256:{self.header_oid} {self.header_size}",
        ]
        if self.metadata is not None:
            lines.append("metadata " + json.dumps(dict(self.metadata), sort_keys=True, ensure_ascii=False, separators=(",", ":")))
        for t in self.tensors:
            _check_writable(t)
            shape = "[" + ",".join(str(d) for d in t.shape) + "]"
            name = json.dumps(t.name, ensure_ascii=False)
            line = f"tensor {name} {t.dtype} {shape} {t.size} sha256:{t.oid}"
            if t.root is not None:
                root = f"{t.root_codec} sha256:{t.root} {t.root_size}" if t.root_codec else f"sha256:{t.root}"
                line += f" from {root}" + "".join(f" delta {d.codec} sha256:{d.oid} {d.size}" for d in t.deltas)
            if t.approx is not None:  # float(): a codec plugin's numpy float would repr as "np.float64(...)"
                line += f" approx sha256:{t.approx.oid} maxerr {float(t.approx.max_error)!r} tolerance {float(t.approx.tolerance)!r}"
            lines.append(line)
        return _encode(lines)

    def _data_bytes(self) -> bytes:
        assert self.chunking is not None and self.sha256 is not None
        lines = [
            f"fmhub manifest {DATA_VERSION}",
            f"format {self.format}",
            f"size {self.size}",
            f"chunking {self.chunking.line()}",
            f"sha256 {self.sha256}",
        ]
        # no chunk names or offsets: an edit then changes only the lines of the chunks it touched
        lines += [f"chunk {t.size} sha256:{t.oid}" for t in self.tensors]
        return _encode(lines)

    @classmethod
    def from_bytes(cls, data: bytes, path: str = "<manifest>") -> "Manifest":
        if len(data) > MAX_MANIFEST_BYTES:  # before any parsing: a manifest's cost is linear in its size
            raise ManifestError(f"{path}: a manifest of {len(data)} bytes is over the limit of {MAX_MANIFEST_BYTES} bytes")
        if not is_manifest(data):
            raise ManifestError(f"{path}: not an fmhub manifest (it should start with 'fmhub manifest {VERSION}')")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{path}: manifest is not UTF-8 ({exc})") from None
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        head = lines[0].split(" ")
        if len(head) != 3 or head[2] not in {str(v) for v in READS}:
            raise ManifestError(
                f"{path}: manifest version {head[2:]} is not supported by this fmhub (reads versions {', '.join(map(str, READS))}); upgrade fmhub"
            )
        version = int(head[2])
        if version == DATA_VERSION:
            return _parse_data(lines, path)
        fields: dict[str, str] = {}
        tensors: list[TensorEntry] = []
        for lineno, line in enumerate(lines[1:], start=2):
            key, _, rest = line.partition(" ")
            if key == "tensor":
                tensors.append(_parse_tensor(rest, path, lineno, version))
            elif key in ("format", "size", "header", "metadata"):
                if key in fields:
                    raise ManifestError(f"{path}:{lineno}: '{key}' appears twice")
                fields[key] = rest
            else:
                raise ManifestError(f"{path}:{lineno}: unknown manifest line {key!r}; a newer fmhub may have written it")
        for key in ("format", "size", "header"):
            if key not in fields:
                raise ManifestError(f"{path}: manifest lacks its '{key}' line")
        size = _uint(fields["size"], path, "file size")
        h_oid, _, h_size = fields["header"].partition(" ")
        header_size = _uint(h_size, path, "header size")
        metadata = _parse_metadata(fields["metadata"], path) if "metadata" in fields else None
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise ManifestError(f"{path}: a tensor is listed twice in the manifest")
        m = cls(fields["format"], size, _parse_oid(h_oid, path), header_size, tensors, metadata)
        if header_size + sum(t.size for t in tensors) != size:
            raise ManifestError(f"{path}: manifest sizes do not add up to the file size {size}")
        return m


def _parse_data(lines: list[str], path: str) -> Manifest:
    """A version-3 manifest: a data file as content-defined chunks (docs/manifest.md, "Data files")."""
    fields: dict[str, str] = {}
    chunks: list[TensorEntry] = []
    for lineno, line in enumerate(lines[1:], start=2):
        key, _, rest = line.partition(" ")
        if key == "chunk":
            size_s, _, oid_s = rest.partition(" ")
            size = parse_uint(size_s)
            if not size:
                raise ManifestError(f"{path}:{lineno}: want 'chunk SIZE sha256:OID' with SIZE > 0")
            chunks.append(TensorEntry(f"chunk {len(chunks)}", CHUNK_DTYPE, (size,), size, _parse_oid(oid_s, path)))
        elif key in ("format", "size", "chunking", "sha256"):
            if key in fields:
                raise ManifestError(f"{path}:{lineno}: '{key}' appears twice")
            fields[key] = rest
        else:
            raise ManifestError(f"{path}:{lineno}: unknown line {key!r} in a data-file manifest; a newer fmhub may have written it")
    for key in ("format", "size", "chunking", "sha256"):
        if key not in fields:
            raise ManifestError(f"{path}: data-file manifest lacks its '{key}' line")
    size = _uint(fields["size"], path, "file size")
    try:
        chunking = Chunking.parse(fields["chunking"])
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from None
    sha = _parse_oid("sha256:" + fields["sha256"], path)
    if sum(c.size for c in chunks) != size:
        raise ManifestError(f"{path}: chunk sizes do not add up to the file size {size}")
    return Manifest(fields["format"], size, None, 0, chunks, None, chunking, sha)


def _check_writable(t: TensorEntry) -> None:
    """Refuse an entry the reader would refuse (docs/manifest.md, "Canonical form"): a writer never writes a manifest
    that cannot be checked out. The safetensors plugin takes any dtype ``str.isalnum`` accepts (``é``) and shape
    dimensions of up to 40 digits when another one is 0."""
    if not _DTYPE_RE.match(t.dtype):
        raise ManifestError(f"tensor {t.name[:100]!r}: dtype {t.dtype[:40]!r} cannot be written in a manifest (ASCII letters, digits and _ only)")
    if len(t.shape) > MAX_DIMS or any(not 0 <= d < 1 << 63 for d in t.shape):
        raise ManifestError(f"tensor {t.name[:100]!r}: shape of {len(t.shape)} dimensions cannot be written in a manifest "
                            f"(at most {MAX_DIMS}, each below 2**63)")


def _encode(lines: list[str]) -> bytes:
    try:
        return ("\n".join(lines) + "\n").encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: JSON's "\ud800" parses to one, UTF-8 cannot hold it
        bad = exc.object[exc.start : exc.end]
        line = next((ln for ln in lines if bad in ln), "")[:100]
        raise ManifestError(f"a name or metadata string holds the lone surrogate U+{ord(bad[0]):04X}, which UTF-8 cannot encode: "
                            f"{line!r}; the file's header is invalid (a \\uXXXX escape of half a surrogate pair)") from None


def is_manifest(data: bytes) -> bool:
    return data.startswith(MAGIC)


def _parse_oid(text: str, path: str) -> str:
    m = _OID_RE.match(text)
    if not m:
        raise ManifestError(f"{path}: bad object id {text[:80]!r} (want sha256:<64 hex digits>)")
    return m.group(1)


def _uint(text: str, path: str, what: str) -> int:
    value = parse_uint(text)
    if value is None:
        raise ManifestError(f"{path}: malformed {what} {text[:40]!r} (want a whole number below 2**63, ASCII digits)")
    return value


def _parse_metadata(text: str, path: str) -> dict[str, str]:
    try:
        metadata = boundedjson.loads(text, max_depth=1)
    except ValueError as exc:
        raise ManifestError(f"{path}: malformed metadata line ({exc})") from None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ManifestError(f"{path}: the metadata line must map strings to strings")
    return metadata


def _parse_shape(text: str, path: str, lineno: int) -> tuple[int, ...] | None:
    m = _SHAPE_RE.match(text)
    if not m:
        return None
    dims = [parse_uint(d) for d in m.group(1).split(",")] if m.group(1) else []
    if None in dims or len(dims) > MAX_DIMS:
        raise ManifestError(f"{path}:{lineno}: malformed shape {text[:80]!r} (at most {MAX_DIMS} whole numbers)")
    return tuple(dims)


def _parse_tensor(rest: str, path: str, lineno: int, version: int = VERSION) -> TensorEntry:
    try:  # a string only: json cannot recurse into one, so no depth bound is needed
        if not rest.startswith('"'):
            raise ValueError
        name, end = json.JSONDecoder().raw_decode(rest)
    except ValueError:
        raise ManifestError(f"{path}:{lineno}: tensor name must be a JSON string") from None
    parts = rest[end:].split(" ")
    chain = version in (DELTA_VERSION, CODED_VERSION) and len(parts) > 5 and parts[5] == "from"
    if not isinstance(name, str) or (len(parts) != 5 and not chain) or parts[0] != "":
        raise ManifestError(f"{path}:{lineno}: want 'tensor \"NAME\" DTYPE [SHAPE] SIZE sha256:OID'")
    words = parts[5:]
    approx = None
    if len(words) >= 6 and words[-6] == "approx":
        approx = _parse_approx(words[-6:], path, lineno)
        words = words[:-6]
        if not words:
            raise ManifestError(f"{path}:{lineno}: 'approx' is only allowed after a delta chain")
    root, root_codec, root_size, deltas = _parse_chain(words, path, lineno, version)
    if approx is not None and not deltas:
        raise ManifestError(f"{path}:{lineno}: 'approx' is only allowed after a delta")
    _, dtype, shape_s, size_s, oid_s = parts[:5]
    shape, size = _parse_shape(shape_s, path, lineno), parse_uint(size_s)
    if not _DTYPE_RE.match(dtype) or shape is None or size is None:
        raise ManifestError(f"{path}:{lineno}: malformed tensor line for {name[:100]!r}")
    return TensorEntry(name, dtype, shape, size, _parse_oid(oid_s, path), root, deltas, approx, root_codec, root_size)


def _parse_approx(words: list[str], path: str, lineno: int) -> Approx:
    """``approx sha256:OID maxerr FLOAT tolerance FLOAT`` at the end of a chained tensor's line."""
    if len(words) != 6 or words[2] != "maxerr" or words[4] != "tolerance":
        raise ManifestError(f"{path}:{lineno}: want 'approx sha256:OID maxerr E tolerance T' at the end of the line")
    try:
        max_error, tolerance = float(words[3]), float(words[5])
    except ValueError:
        raise ManifestError(f"{path}:{lineno}: malformed numbers in {' '.join(words)!r}") from None
    if not (0 <= max_error <= tolerance):
        raise ManifestError(f"{path}:{lineno}: maxerr {words[3]} is not within tolerance {words[5]}")
    return Approx(_parse_oid(words[1], path), max_error, tolerance)


_CODEC_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*\Z")


def _parse_chain(words: list[str], path: str, lineno: int, version: int) -> tuple[str | None, str, int, tuple[Delta, ...]]:
    """``from ROOT (delta CODEC sha256:OID SIZE)*`` after a tensor line's oid: (root, root codec, root size, deltas).

    ROOT is ``sha256:OID`` (version 2 and 4: an earlier version's bytes, at least one delta follows) or, in
    version 4, ``CODEC sha256:OID SIZE`` (an encoded object, decoded without a base; deltas may follow).
    """
    if not words:
        return None, "", 0, ()
    if words[0] != "from" or len(words) < 2:
        raise ManifestError(f"{path}:{lineno}: want 'from ROOT delta CODEC sha256:OID SIZE ...' after the tensor's oid")
    coded = version == CODED_VERSION and not words[1].startswith("sha256:")
    if coded:
        if len(words) < 4 or not _CODEC_RE.match(words[1]) or parse_uint(words[3]) is None:
            raise ManifestError(f"{path}:{lineno}: want 'from CODEC sha256:OID SIZE' for an encoded root")
        root_codec, root, root_size, rest = words[1], _parse_oid(words[2], path), parse_uint(words[3]), words[4:]
    else:
        root_codec, root, root_size, rest = "", _parse_oid(words[1], path), 0, words[2:]
    if len(rest) % 4 or (not coded and not rest):
        raise ManifestError(f"{path}:{lineno}: want 'from sha256:ROOT delta CODEC sha256:OID SIZE ...' after the tensor's oid")
    if len(rest) > 4 * MAX_CHAIN:
        raise ManifestError(f"{path}:{lineno}: a delta chain of {len(rest) // 4} links is over the limit of {MAX_CHAIN}")
    deltas = []
    for i in range(0, len(rest), 4):
        key, codec, oid_s, size_s = rest[i : i + 4]
        size = parse_uint(size_s)
        if key != "delta" or not _CODEC_RE.match(codec) or size is None:
            raise ManifestError(f"{path}:{lineno}: malformed delta {' '.join(rest[i : i + 4])[:200]!r}")
        deltas.append(Delta(codec, _parse_oid(oid_s, path), size))
    return root, root_codec, root_size, tuple(deltas)
