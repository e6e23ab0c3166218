"""The daemon's local control channel: a Unix socket, line-delimited JSON, one function per request.

A client connects to `[control] socket` (under systemd, in the service's RuntimeDirectory), sends one JSON
object per line, `{"op": "record", ...}`, and reads JSON lines back: `{"ok": true, ...}`, or one
`{"ok": false, "error": "..."}` for anything refused. Ops are a registry (op name -> handler): a handler
answers with one reply, or takes the connection over and streams lines until it is done (`record`).

Who may talk to it: the socket file is created mode 0660 (owner and group of the daemon), and each peer's
credentials (SO_PEERCRED) are checked too: root, the daemon's own user, or a member of its group; anyone
else gets one refusal line. One thread accepts; each connection has its own thread (at most
`MAX_CONNECTIONS`), so that nothing a client does (or fails to do) reaches the inference worker; a bad
request gets an error line and never ends a thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalyd.errors import ControlError
from anomalyd.throttle import Throttle

logger = logging.getLogger(__name__)

SOCKET_MODE = 0o660  # the daemon's user and group
MAX_REQUEST_BYTES = 65_536  # one request line; requests are a few hundred bytes
MAX_CONNECTIONS = 16  # clients served at once; more are told the daemon is busy
IDLE_TIMEOUT_S = 30.0  # a connection that sends no request for this long is closed
SEND_TIMEOUT_S = 5.0  # a client that takes no data for this long is not reading: it is dropped
ACCEPT_POLL_S = 0.2  # how often the accept thread looks at the stop flag
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python does not name it
MAX_PEER_GROUPS = 256

Request = dict[str, Any]
Reply = dict[str, Any]


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a connection, as the kernel saw it when it connected."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups, where the kernel tells them


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_PEER_GROUPS)
        groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    except OSError:  # an older kernel, or more groups than we ask for: the primary group still counts
        groups = ()
    return Peer(pid, uid, gid, tuple(groups))


def peer_allowed(peer: Peer, uid: int, gid: int) -> bool:
    """Root, the daemon's user, or a member of the daemon's group."""
    return peer.uid in (0, uid) or gid == peer.gid or gid in peer.groups


class LineReader:
    """Lines from a socket, each at most `max_bytes`; a socket timeout leaves what was read intact."""

    def __init__(self, sock: socket.socket, max_bytes: int) -> None:
        self._sock = sock
        self._max = max_bytes
        self._buffer = bytearray()

    def readline(self) -> bytes | None:
        """The next line without its newline; None at end of input. Raises TimeoutError (nothing lost),
        ControlError for a line over the limit, OSError when the connection fails."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > self._max:
                raise ControlError(f"line longer than {self._max} bytes")
            chunk = self._sock.recv(65_536)
            if not chunk:
                return None  # a last line without its newline is incomplete: dropped
            self._buffer += chunk


def encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"


class Connection:
    """One client, as a handler sees it: send lines, know whether the daemon is stopping."""

    def __init__(self, sock: socket.socket, peer: Peer, stopping: threading.Event) -> None:
        self.sock = sock
        self.peer = peer
        self._stopping = stopping
        self.reader = LineReader(sock, MAX_REQUEST_BYTES)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def send(self, message: Mapping[str, Any]) -> None:
        """One JSON line; raises TimeoutError when the client has taken nothing for SEND_TIMEOUT_S, OSError
        when it has gone."""
        self.sock.settimeout(SEND_TIMEOUT_S)
        self.sock.sendall(encode(message))

    def closed_by_peer(self) -> bool:
        """Whether the client has hung up (checked without waiting or consuming anything)."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True


Handler = Callable[[Request, Connection], Reply | None]
"""Answers a request with one reply, or returns None after streaming its own lines (the connection then
closes). Raises ControlError to refuse with a message."""


def _close_gently(sock: socket.socket) -> None:
    """End our side, then read what the client still sends (briefly): closing on unread data would reset
    the connection, and the client could lose the line that tells it why."""
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(0.5)
    with contextlib.suppress(OSError):
        for _ in range(64):
            if not sock.recv(65_536):
                return


def error_reply(message: str) -> Reply:
    return {"ok": False, "error": message}


class ControlServer:
    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._inode: int | None = None
        self._lock = threading.Lock()
        self._clients: dict[socket.socket, threading.Thread] = {}
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._refusals = Throttle(60.0, burst=5)
        self.refused = 0  # peers refused by their credentials

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on `path` (a stale socket file of an earlier run is replaced). Raises ControlError."""
        self._clear_stale()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Bound under a temporary name and renamed into place once its mode is set: no moment where
        # the socket exists with the umask's looser mode.
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            listener.bind(str(temporary))
            os.chmod(temporary, SOCKET_MODE)
            listener.listen(MAX_CONNECTIONS)
            os.replace(temporary, self.path)
            self._inode = self.path.stat().st_ino
        except OSError as exc:
            listener.close()
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise ControlError(f"cannot listen on {self.path}: {exc.strerror or exc}") from exc
        listener.settimeout(ACCEPT_POLL_S)
        self._listener = listener
        self._thread.start()

    def _clear_stale(self) -> None:
        """Remove the socket file an earlier run left behind; refuse to touch a live one or a non-socket."""
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ControlError(f"cannot use {self.path}: {exc.strerror or exc}") from exc
        if not stat.S_ISSOCK(mode):
            raise ControlError(f"{self.path} exists and is not a socket; not replacing it")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(self.path))
            except OSError:
                pass  # nobody listens: stale
            else:
                raise ControlError(f"another process is listening on {self.path} (a second daemon?)")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        logger.info("removed the stale control socket %s of an earlier run", self.path)

    def stop(self, timeout: float = 0.5) -> None:
        """Stop accepting, end every connection (streaming handlers say goodbye), remove the socket file."""
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        with contextlib.suppress(OSError):
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()
        deadline = time.monotonic() + timeout
        self._thread.join(timeout)
        with self._lock:
            clients = dict(self._clients)
        for thread in clients.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        for sock in clients:  # a client that is not reading must not hold up the stop
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # ---- threads ---------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                logger.warning("control channel: accept failed: %s", exc)
                self._stop.wait(0.5)
                continue
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        with self._lock:
            busy = len(self._clients) >= MAX_CONNECTIONS
            if not busy:
                thread = threading.Thread(
                    target=self._serve, args=(sock,), name="control-client", daemon=True
                )
                self._clients[sock] = thread
        if busy:
            with contextlib.suppress(OSError), sock:
                sock.settimeout(1.0)
                sock.sendall(encode(error_reply(f"busy: {MAX_CONNECTIONS} clients connected already")))
            return
        thread.start()

    def _serve(self, sock: socket.socket) -> None:
        # Nothing a client sends may end this thread with an exception: the daemon treats any thread's
        # unexpected death as fatal.
        try:
            with sock:
                self._converse(sock)
                _close_gently(sock)
        except OSError as exc:
            logger.debug("control client went away: %s", exc)
        except Exception:
            logger.exception("control channel: a connection failed unexpectedly (the daemon goes on)")
        finally:
            with self._lock:
                self._clients.pop(sock, None)

    def _converse(self, sock: socket.socket) -> None:
        peer = peer_of(sock)
        connection = Connection(sock, peer, self._stop)
        if not peer_allowed(peer, os.geteuid(), os.getegid()):
            self.refused += 1
            if self._refusals.ready():
                logger.warning(
                    "control channel: refused pid %d, uid %d: not root, the daemon's user or group%s",
                    peer.pid, peer.uid, self._refusals.take_suppressed(),
                )  # fmt: skip
            connection.send(error_reply(
                f"refused: uid {peer.uid} is neither root, the daemon's user (uid {os.geteuid()}) nor in its "
                f"group (gid {os.getegid()})"
            ))  # fmt: skip
            return
        while not self._stop.is_set():
            sock.settimeout(IDLE_TIMEOUT_S)
            try:
                line = connection.reader.readline()
            except TimeoutError:
                return
            except ControlError as exc:
                connection.send(error_reply(f"request {exc}"))
                return
            if line is None:
                return
            if not line.strip():
                continue
            reply = self._dispatch(line, connection)
            if reply is None:
                return  # a streaming handler is done with the connection
            connection.send(reply)

    def _dispatch(self, line: bytes, connection: Connection) -> Reply | None:
        try:
            request = json.loads(line.decode())
        except (UnicodeDecodeError, ValueError):
            return error_reply(f"not a JSON request: {line[:60]!r}; send one object per line, e.g. "
                               '{"op": "record", "stream": "fan-1"}')  # fmt: skip
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return error_reply('a request is a JSON object with a string "op"')
        op = request["op"]
        handler = self.handlers.get(op)
        if handler is None:
            return error_reply(f"unknown op {op[:60]!r}; known: {', '.join(sorted(self.handlers))}")
        try:
            return handler(request, connection)
        except ControlError as exc:
            return error_reply(str(exc))
        except OSError:
            raise  # the client went away mid-answer
        except Exception as exc:
            logger.exception("control channel: op %r failed unexpectedly (the daemon goes on)", op)
            return error_reply(f"internal error in op {op!r}: {type(exc).__name__}")


# ---- the client side ------------------------------------------------------------------------------------


class ControlClient:
    """A connection to the daemon's control socket, as `anomalyd record` uses it."""

    def __init__(self, sock: socket.socket, max_line: int) -> None:
        self.sock = sock
        self.reader = LineReader(sock, max_line)

    @classmethod
    def connect(cls, path: Path, max_line: int = MAX_REQUEST_BYTES) -> ControlClient | None:
        """None when no daemon listens there (no socket file, or a stale one); raises ControlError when
        one may listen but this user cannot reach it."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(5.0)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            sock.close()
            return None
        except OSError as exc:
            sock.close()
            raise ControlError(
                f"cannot reach the daemon at {path}: {exc.strerror or exc} (run as root or as a member of "
                "the daemon's group)"
            ) from exc
        return cls(sock, max_line)

    def send(self, request: Mapping[str, Any]) -> None:
        self.sock.sendall(encode(request))

    def receive(self, timeout: float) -> Reply | None:
        """The next message; None at end of input. Raises TimeoutError when none came within `timeout`,
        ControlError for a line that is not a JSON object."""
        self.sock.settimeout(timeout)
        line = self.reader.readline()
        if line is None:
            return None
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise ControlError(f"the daemon sent a line that is not JSON: {line[:60]!r}") from exc
        if not isinstance(message, dict):
            raise ControlError(f"the daemon sent a line that is not a JSON object: {line[:60]!r}")
        return message

    def close(self) -> None:
        self.sock.close()
