"""The manifest: what git stores in place of a tracked checkpoint (spec: docs/manifest.md)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Mapping

from fmhub.errors import ManifestError

MAGIC = b"fmhub manifest "
VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20

_OID_RE = re.compile(r"sha256:([0-9a-f]{64})\Z")
_DTYPE_RE = re.compile(r"[A-Za-z0-9_]+\Z")
_SHAPE_RE = re.compile(r"\[(\d+(?:,\d+)*)?\]\Z")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor: its name, dtype, shape, and the object holding its payload."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    size: int
    oid: str  # 64 hex digits, no "sha256:" prefix


@dataclass
class Manifest:
    """A checkpoint file as git stores it: its header object and one object per tensor, in file order."""

    format: str
    size: int
    header_oid: str
    header_size: int
    tensors: list[TensorEntry] = field(default_factory=list)
    metadata: Mapping[str, str] | None = None

    def oids(self) -> list[tuple[str, int]]:
        """Every object the file needs, header first, as ``(oid, size)``."""
        return [(self.header_oid, self.header_size)] + [(t.oid, t.size) for t in self.tensors]

    def by_name(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}

    def to_bytes(self) -> bytes:
        lines = [
            f"fmhub manifest {VERSION}",
            f"format {self.format}",
            f"size {self.size}",
            f"header sha256:{self.header_oid} {self.header_size}",
        ]
        if self.metadata is not None:
            lines.append("metadata " + json.dumps(dict(self.metadata), sort_keys=True, ensure_ascii=False, separators=(",", ":")))
        for t in self.tensors:
            shape = "[" + ",".join(str(d) for d in t.shape) + "]"
            name = json.dumps(t.name, ensure_ascii=False)
            lines.append(f"tensor {name} {t.dtype} {shape} {t.size} sha256:{t.oid}")
        return ("\n".join(lines) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, path: str = "<manifest>") -> "Manifest":
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
        if len(head) != 3 or head[2] != str(VERSION):
            raise ManifestError(
                f"{path}: manifest version {head[2:]} is not supported by this fmhub (reads version {VERSION}); upgrade fmhub"
            )
        fields: dict[str, str] = {}
        tensors: list[TensorEntry] = []
        for lineno, line in enumerate(lines[1:], start=2):
            key, _, rest = line.partition(" ")
            if key == "tensor":
                tensors.append(_parse_tensor(rest, path, lineno))
            elif key in ("format", "size", "header", "metadata"):
                if key in fields:
                    raise ManifestError(f"{path}:{lineno}: '{key}' appears twice")
                fields[key] = rest
            else:
                raise ManifestError(f"{path}:{lineno}: unknown manifest line {key!r}; a newer fmhub may have written it")
        for key in ("format", "size", "header"):
            if key not in fields:
                raise ManifestError(f"{path}: manifest lacks its '{key}' line")
        try:
            size = int(fields["size"])
            h_oid, h_size = fields["header"].split(" ")
            header_size = int(h_size)
            metadata = json.loads(fields["metadata"]) if "metadata" in fields else None
        except (ValueError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: malformed manifest field ({exc})") from None
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise ManifestError(f"{path}: a tensor is listed twice in the manifest")
        m = cls(fields["format"], size, _parse_oid(h_oid, path), header_size, tensors, metadata)
        if header_size + sum(t.size for t in tensors) != size:
            raise ManifestError(f"{path}: manifest sizes do not add up to the file size {size}")
        return m


def is_manifest(data: bytes) -> bool:
    return data.startswith(MAGIC)


def _parse_oid(text: str, path: str) -> str:
    m = _OID_RE.match(text)
    if not m:
        raise ManifestError(f"{path}: bad object id {text!r} (want sha256:<64 hex digits>)")
    return m.group(1)


def _parse_tensor(rest: str, path: str, lineno: int) -> TensorEntry:
    try:
        name, end = json.JSONDecoder().raw_decode(rest)
    except json.JSONDecodeError:
        raise ManifestError(f"{path}:{lineno}: tensor name must be a JSON string") from None
    parts = rest[end:].split(" ")
    if not isinstance(name, str) or len(parts) != 5 or parts[0] != "":
        raise ManifestError(f"{path}:{lineno}: want 'tensor \"NAME\" DTYPE [SHAPE] SIZE sha256:OID'")
    _, dtype, shape_s, size_s, oid_s = parts
    shape_m = _SHAPE_RE.match(shape_s)
    if not _DTYPE_RE.match(dtype) or not shape_m or not size_s.isdigit():
        raise ManifestError(f"{path}:{lineno}: malformed tensor line for {name!r}")
    shape = tuple(int(d) for d in shape_m.group(1).split(",")) if shape_m.group(1) else ()
    return TensorEntry(name, dtype, shape, int(size_s), _parse_oid(oid_s, path))
