"""git's long-running filter process (``filter.fmhub.process``), speaking pkt-lines (`fmhub_filters.pktio`).

One process serves every clean and smudge of one git command. Protocol:
https://git-scm.com/docs/gitattributes#_long_running_filter_process
"""

from __future__ import annotations

import os
import sys

from fmhub_filters.pktio import Hangup, PktLine, PktLineError, PktReader, PktWriter

from fmhub.governance import audit
from fmhub.core import checkpoint
from fmhub.base.errors import FmhubError, one_line, unexpected
from fmhub.core.manifest import MAGIC, MAX_MANIFEST_BYTES
from fmhub.core.repo import open_store, staged_blob


def check_access(path: str, tensors=(), root: str | None = None, action: str = "read") -> bool:
    """The access policy (`fmhub.governance.access.check_smudge`), imported on a file's first use, not at start-up."""
    from fmhub.governance.access import check_smudge

    return check_smudge(path, tensors, root=root, action=action)

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import BinaryIO, TextIO

    from fmhub.core.store import ObjectStore


CAPABILITIES = ("clean", "smudge")


class FilterProtocolError(Exception):
    pass


class FilterServer:
    def __init__(self, stdin: BinaryIO, stdout: BinaryIO, stderr: TextIO, store: ObjectStore | None = None) -> None:
        self._out = stdout
        self.proto = PktLine(stdin.read, stdout.write)
        self.stderr = stderr
        self._store = store
        self._fetcher = None

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = open_store()
        return self._store

    @property
    def deltas(self):
        """The repository's delta policy (`fmhub.core.deltas.policy_from_config`), read once per git command."""
        if not hasattr(self, "_deltas"):
            from fmhub.core.deltas import policy_from_config
            from fmhub.core.repo import fmhub_config

            self._deltas = policy_from_config(fmhub_config())
        return self._deltas

    def _fetch_missing(self, objects: list[tuple[str, int]]) -> None:
        """Download objects a smudge lacks from the remote's LFS server (lazy clone); one fetcher per git command.

        Imported here, not at the top: most smudges find every object local and never need the transfer layer.
        """
        if self._fetcher is None:
            from fmhub.git.sync import LazyFetcher

            self._fetcher = LazyFetcher(self.store)
        self._fetcher(objects)

    def _read_list(self) -> list[bytes]:
        return [line.rstrip(b"\n") for line in self.proto.read_pkt_seq()]

    def _send_list(self, *lines: bytes) -> None:
        for line in lines:
            self.proto.write_pkt_line(line)
        self.proto.write_pkt_line(None)

    def handshake(self) -> None:
        hello = self._read_list()
        if hello[:1] != [b"git-filter-client"] or b"version=2" not in hello[1:]:
            raise FilterProtocolError(f"unexpected filter handshake {hello!r}")
        self._send_list(b"git-filter-server", b"version=2")
        offered = {line.split(b"=", 1)[1] for line in self._read_list() if line.startswith(b"capability=")}
        self._send_list(*(b"capability=" + c.encode() for c in CAPABILITIES if c.encode() in offered))
        self._out.flush()

    def serve(self) -> int:
        self.handshake()
        try:
            while True:
                try:
                    request = self._read_list()
                except Hangup:
                    return 0
                if not request:
                    return 0
                self.handle(dict(line.split(b"=", 1) for line in request if b"=" in line))
                self._out.flush()
        finally:
            if self._store is not None:
                self._store.close()

    def handle(self, request: dict[bytes, bytes]) -> None:
        command = request.get(b"command", b"").decode()
        path = request.get(b"pathname", b"").decode("utf-8", "replace")
        reader = PktReader(self.proto)
        if command == "clean":
            self._clean(reader, path)
        elif command == "smudge":
            self._smudge(reader, path)
        else:
            reader.drain()
            self._fail(path, f"unsupported filter command {command!r}")

    def _fail(self, path: str, message: str, what: str = "filter", exc: BaseException | None = None) -> None:
        self.stderr.write(f"fmhub: {one_line(message)}\n")
        self.stderr.flush()
        self._send_list(b"status=error")
        self._record(what, path, "error", audit.failure(exc) if exc is not None else {"message": message})

    def _record(self, what: str, path: str, decision: str, details: dict) -> None:
        """One audit entry per file, written after git has its answer, so git goes on while the entry is synced."""
        self._out.flush()
        audit.record(what, path, decision, details)

    def _clean(self, reader: PktReader, path: str) -> None:
        staged = staged_blob(path, MAX_MANIFEST_BYTES)
        try:
            result = checkpoint.clean(reader, self.store, path, previous=checkpoint.staged_manifest(path, staged), deltas=self.deltas,
                                      access=check_access)
        except FmhubError as exc:
            reader.drain()
            return self._fail(path, str(exc), "clean", exc)
        except Exception as exc:  # a bug must fail this file, not wedge git's protocol
            reader.drain()
            return self._fail(path, unexpected(f"{path}: cleaning", exc), "clean", exc)
        self._send_list(b"status=success")
        PktWriter(self.proto, self._out).write(result)
        self.proto.write_pkt_line(None)
        self._send_list()
        if result != staged:  # git re-cleans unchanged files to check their status: that stores nothing, records nothing
            self._record("clean", path, "ok", audit.manifest_facts(result))

    def _smudge(self, reader: PktReader, path: str) -> None:
        head = reader.read_upto(len(MAGIC))
        if head != MAGIC:  # not a manifest (a file committed before it was tracked): passed through, streamed
            return self._pass_through(reader, path, head)
        data = head + reader.read_upto(MAX_MANIFEST_BYTES + 1 - len(head))
        if len(data) > MAX_MANIFEST_BYTES:  # refused before it is parsed, or held any longer
            reader.drain()
            return self._fail(path, f"{path}: a manifest over the limit of {MAX_MANIFEST_BYTES} bytes; the commit is corrupt or hostile", "smudge")
        started = False

        def start() -> None:
            nonlocal started
            started = True
            self._send_list(b"status=success")

        try:
            checkpoint.smudge(data, self.store, PktWriter(self.proto, self._out), path, on_start=start, fetch=self._fetch_missing,
                             access=check_access)
        except Exception as exc:
            msg = str(exc) if isinstance(exc, FmhubError) else unexpected(f"{path}: smudging", exc)
            if not started:
                return self._fail(path, msg, "smudge", exc)
            # content is half sent: close it, then overrule the status as the protocol allows
            self.proto.write_pkt_line(None)
            return self._fail(path, msg, "smudge", exc)
        if not started:
            start()
        self.proto.write_pkt_line(None)
        self._send_list()
        self._record("smudge", path, "ok", audit.manifest_facts(data))


    def _pass_through(self, reader: PktReader, path: str, head: bytes) -> None:
        self._send_list(b"status=success")
        out = PktWriter(self.proto, self._out)
        out.write(head)
        while chunk := reader.read(1 << 20):
            out.write(chunk)
        self.proto.write_pkt_line(None)
        self._send_list()
        self._record("smudge", path, "ok", {"format": "raw", "size": out.written})


def _widen_pipes(*streams: BinaryIO) -> None:
    """Ask for 1 MiB pipe buffers (Linux): git and the filter then trade data in fewer, larger steps."""
    try:
        import fcntl
    except ImportError:
        return
    for stream in streams:
        try:
            fcntl.fcntl(stream.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        except (OSError, ValueError, AttributeError):
            pass  # not a pipe, or over /proc/sys/fs/pipe-max-size: the default works, only slower


def main() -> int:
    stdout = sys.stdout.buffer
    _widen_pipes(sys.stdin.buffer, stdout)
    # Anything printed by accident must not corrupt the protocol stream.
    sys.stdout = sys.stderr
    stdin = open(sys.stdin.fileno(), "rb", buffering=1 << 20, closefd=False)  # fewer reads for 64 KiB pkt-lines
    server = FilterServer(stdin, stdout, sys.stderr)
    try:
        return server.serve()
    except (FilterProtocolError, PktLineError) as exc:
        sys.stderr.write(f"fmhub: {exc}\n")
        return 2
    except (BrokenPipeError, Hangup):
        return 1


if __name__ == "__main__":
    os._exit(main())
