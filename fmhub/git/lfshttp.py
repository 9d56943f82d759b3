"""HTTP with an LFS server that is not trusted: bodies read within bounds, decompressed safely, and
connections given back to the pool; the server's own words quoted on one short line.

Everything a server sends is bounded before it is held (`read_upto`, `body_pieces`): urllib3 inflated a whole
gzip body at once (600 KB on the wire, 600 MiB in memory), and drained a whole unneeded body to reuse its
connection (`finish` reads at most `MAX_DRAIN`). Used by the batch client (`fmhub.git.transfer`) and the
batch answer parser (`fmhub.git.lfsbatch`).
"""

from __future__ import annotations

import http.client
import zlib
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Iterator

import urllib3

from fmhub.base import boundedjson

CHUNK = 1 << 20  # bytes per read/write while streaming an object
MAX_ERROR_BODY = 64 << 10  # bytes of an error body read for its message
MAX_DRAIN = 1 << 20  # an unneeded 2xx body longer than this is not read to reuse the connection: it is closed
BODY_READ = 64 << 10  # raw bytes per read of a bounded body
MAX_RETRY_AFTER_S = 120.0  # a Retry-After longer than this is waited this long
SHOWN = 80  # characters of a bad value quoted in an error
MESSAGE_CHARS = 1000  # a server's error message: room for a policy's reason and advice, not for a flood


class BadBody(Exception):
    """A body that cannot be decoded (an unknown or corrupt Content-Encoding); the message says how."""


def read_upto(resp: urllib3.BaseHTTPResponse, limit: int) -> tuple[bytearray, bool]:
    """(the body, True), or (its first ``limit`` bytes, False) when it has more; decompressed per Content-Encoding.

    urllib3 inflates gzip when asked to read a whole body (600 KB on the wire became 600 MiB), so the body is
    taken a small piece at a time (`body_pieces`) and reading stops one piece past the limit.
    """
    out = bytearray()
    for piece in body_pieces(resp, BODY_READ):
        out += piece
        if len(out) > limit:
            del out[limit:]  # in place: no second copy of a body being refused
            return out, False
    return out, True


def body_pieces(resp: urllib3.BaseHTTPResponse, size: int = CHUNK) -> Iterator[bytes]:
    """A body in pieces of at most ``size`` bytes, decompressed per Content-Encoding, however well it compresses.

    Raw bytes are read with urllib3's decoding off and inflated here with a cap on each step's output: before
    2.6, urllib3's read(n) and stream(n) inflated a whole compressed read at once (1 MiB of gzip, 1 GiB).
    """
    inflate = _decompressor(resp.headers.get("Content-Encoding"))
    while raw := resp.read(size, decode_content=False):
        if inflate is None:
            yield raw
            continue
        if inflate.eof:  # zlib would keep what follows the end in memory, as much as the server sends
            raise BadBody("data after the end of the compressed body")
        while True:
            piece = _inflate(inflate, raw, size)
            if piece:
                yield piece
            raw = inflate.unconsumed_tail  # what the cap held back
            if not raw and len(piece) < size:  # a full piece may leave output inside zlib: ask once more
                break
    if inflate is not None and not inflate.eof:
        raise BadBody("a compressed body cut off before its end")


def _decompressor(encoding: str | None) -> "zlib._Decompress | None":
    name = (encoding or "").strip().lower()
    if name in ("", "identity"):
        return None
    if name in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if name == "deflate":
        return zlib.decompressobj(32 + zlib.MAX_WBITS)  # HTTP's deflate is zlib-wrapped; 32: a gzip header too
    raise BadBody(f"Content-Encoding {show(name)}, which fmhub does not accept")


def _inflate(inflate: "zlib._Decompress", chunk: bytes, room: int) -> bytes:
    try:
        return inflate.decompress(chunk, room)
    except zlib.error as exc:
        raise BadBody(f"corrupt compressed data: {exc}") from None


def finish(resp: urllib3.BaseHTTPResponse, complete: bool) -> None:
    """Give the connection back to the pool: drained when the exchange completed, closed when it broke off.

    Draining reads at most `MAX_DRAIN` bytes (urllib3's drain_conn read the whole rest into memory, whatever
    its size); a longer body closes the connection instead.
    """
    try:
        if not (complete and drained(resp)):
            resp.close()
    finally:
        resp.release_conn()


def drained(resp: urllib3.BaseHTTPResponse) -> bool:
    left = MAX_DRAIN
    try:
        while chunk := resp.read(BODY_READ, decode_content=False):
            left -= len(chunk)
            if left < 0:
                return False
    except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException):
        return False
    return True


def error_message(resp: urllib3.BaseHTTPResponse) -> str:
    """The server's explanation of an error status (LFS JSON ``message``, or a short text body), on one line."""
    try:
        raw, _ = read_upto(resp, MAX_ERROR_BODY)
    except Exception:  # an unreadable explanation must not hide the status it explains
        return ""
    try:
        doc = boundedjson.loads(raw)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        message = doc.get("message") if isinstance(doc.get("message"), str) else ""
    else:
        message = raw.decode("utf-8", "replace").strip().split("\n", 1)[0]
    message = one_line(message, MESSAGE_CHARS)
    return f": {message}" if message else ""


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), capped."""
    if not value:
        return None
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, parsedate_to_datetime(value).timestamp() - datetime.now(timezone.utc).timestamp()))
    except (TypeError, ValueError):
        return None


def reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    text = str(reason)
    if "Connection refused" in text or isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    return text.split(": ", 1)[-1] if text.startswith("<") else text


def merge_headers(*layers: dict[str, str]) -> dict[str, str]:
    """Later layers win, names compared case-insensitively (no request carries two Authorization headers)."""
    out: dict[str, str] = {}
    for layer in layers:
        for name, value in layer.items():
            for old in [k for k in out if k.lower() == name.lower()]:
                del out[old]
            out[name] = value
    return out


def show(value: Any) -> str:
    """A value from a server, quoted short and on one line for an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"<an integer of {value.bit_length()} bits>"  # str() of one over 4,300 digits raises ValueError
    return one_line(repr(value[: SHOWN * 2] if isinstance(value, str) else value), SHOWN)


def one_line(text: str, limit: int = 200) -> str:
    """Server text as one printable line of at most ``limit`` characters (no newlines or terminal escapes)."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text[: limit * 4]).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
