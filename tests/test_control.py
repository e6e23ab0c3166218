"""The control channel on a real Unix socket: permissions, stale sockets, bad requests, other users."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from anomalyd.config import parse_config
from anomalyd.control import MAX_REQUEST_BYTES, Connection, ControlServer, Peer, peer_allowed
from anomalyd.errors import ConfigError, ControlError

NOBODY = 65534


def echo(request: dict[str, object], connection: Connection) -> dict[str, object]:
    return {"ok": True, "echo": request, "uid": connection.peer.uid}


def explode(request: dict[str, object], connection: Connection) -> dict[str, object]:
    raise ValueError("a bug in a handler")


def refuse(request: dict[str, object], connection: Connection) -> dict[str, object]:
    raise ControlError("no such thing")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    s = ControlServer(tmp_path / "run" / "control.sock", {"echo": echo, "explode": explode, "refuse": refuse})
    s.start()
    yield s
    s.stop()


def ask(path: Path, *lines: bytes) -> list[dict[str, object]]:
    """Send raw lines on one connection; every reply line until the daemon closes it (or 5 s pass)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(str(path))
        for line in lines:
            sock.sendall(line)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_socket_is_0660_replaces_a_stale_one_and_goes_at_stop(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # an earlier run that died: the file stays, nobody listens
    stale.close()
    s = ControlServer(path, {"echo": echo})
    s.start()
    try:
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o660
        (reply,) = ask(path, b'{"op": "echo", "n": 1}\n')
        assert reply == {"ok": True, "echo": {"op": "echo", "n": 1}, "uid": 0}
    finally:
        s.stop()
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary name left behind either


def test_a_live_socket_or_a_file_is_never_replaced(server: ControlServer, tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="another process is listening"):
        ControlServer(server.path, {}).start()
    assert ask(server.path, b'{"op": "echo"}\n')[0]["ok"] is True  # the first one is untouched
    regular = tmp_path / "not-a-socket"
    regular.write_text("data")
    with pytest.raises(ControlError, match="is not a socket"):
        ControlServer(regular, {}).start()
    assert regular.read_text() == "data"


def test_requests_on_one_connection_and_every_kind_of_bad_one(server: ControlServer) -> None:
    replies = ask(
        server.path,
        b'{"op": "echo", "a": 1}\n',
        b"\n",  # blank lines are skipped
        b"\xff\xfe garbage \x00\n",
        b"[1, 2]\n",
        b'{"no": "op"}\n',
        b'{"op": "launch"}\n',
        b'{"op": "refuse"}\n',
        b'{"op": "echo", "a": 2}\n',
    )
    assert [r["ok"] for r in replies] == [True, False, False, False, False, False, True]
    assert "not a JSON request" in str(replies[1]["error"])
    assert replies[2]["error"] == replies[3]["error"] == 'a request is a JSON object with a string "op"'
    assert replies[4]["error"] == "unknown op 'launch'; known: echo, explode, refuse"
    assert replies[5]["error"] == "no such thing"
    assert replies[6]["echo"] == {"op": "echo", "a": 2}


def test_a_failing_handler_or_an_endless_line_ends_only_that_connection(server: ControlServer) -> None:
    (reply,) = ask(server.path, b'{"op": "explode"}\n')
    assert reply == {"ok": False, "error": "internal error in op 'explode': ValueError"}
    (reply,) = ask(server.path, b"x" * (MAX_REQUEST_BYTES + 70_000))
    assert reply == {"ok": False, "error": f"request line longer than {MAX_REQUEST_BYTES} bytes"}
    assert ask(server.path, b'{"op": "echo"}\n')[0]["ok"] is True  # the server lives on


def test_peer_rules() -> None:
    daemon_uid, daemon_gid = 998, 997
    assert peer_allowed(Peer(1, 0, 0, ()), daemon_uid, daemon_gid)  # root
    assert peer_allowed(Peer(1, 998, 100, ()), daemon_uid, daemon_gid)  # the daemon's user
    assert peer_allowed(Peer(1, 1000, 997, ()), daemon_uid, daemon_gid)  # primary group
    assert peer_allowed(Peer(1, 1000, 1000, (27, 997)), daemon_uid, daemon_gid)  # a supplementary group
    assert not peer_allowed(Peer(1, 1000, 1000, (27,)), daemon_uid, daemon_gid)


CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect": exc.strerror}))
    sys.exit()
s.sendall(b'{"op": "echo"}\\n')
print(s.recv(65536).decode().strip())
"""


def test_a_peer_of_another_uid_is_refused() -> None:
    """As `nobody`: the socket's mode keeps it out; with the mode loosened, its credentials still do."""
    folder = Path(tempfile.mkdtemp(prefix="anomalyd-control-"))  # pytest's tmp_path is root-only
    os.chmod(folder, 0o755)
    path = folder / "control.sock"
    s = ControlServer(path, {"echo": echo})
    s.start()

    def as_nobody() -> dict[str, object]:
        result = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c",
             CLIENT, str(path)],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return dict(json.loads(result.stdout))

    try:
        assert as_nobody() == {"connect": "Permission denied"}
        os.chmod(path, 0o666)  # a mistake by an administrator: the peer check still holds
        reply = as_nobody()
        assert reply["ok"] is False
        assert f"refused: uid {NOBODY} is neither root" in str(reply["error"])
        assert s.refused == 1
        assert ask(path, b'{"op": "echo"}\n')[0]["ok"] is True  # root still gets in
    finally:
        s.stop()
        path.unlink(missing_ok=True)
        folder.rmdir()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('""', "give the socket's file path"),
        (f'"/run/{"x" * 120}.sock"', "at most 107 bytes"),
        ("5", "not a valid path"),
    ],
)
def test_control_socket_key_is_validated(tmp_path: Path, value: str, message: str) -> None:
    text = f'[control]\nsocket = {value}\n[[streams]]\nname = "a"\nbundle = "b"\n[streams.source]\ntype = "mic"\ndevice = "x"\n'
    with pytest.raises(ConfigError, match=r"control\.socket") as info:
        parse_config(text, "t.toml", tmp_path)
    assert message in str(info.value)


def test_control_socket_default_and_relative_path(tmp_path: Path) -> None:
    streams = '[[streams]]\nname = "a"\nbundle = "b"\n[streams.source]\ntype = "mic"\ndevice = "x"\n'
    assert parse_config(streams, "t", tmp_path).control.socket == Path("/run/anomalyd/control.sock")
    relative = parse_config('[control]\nsocket = "c.sock"\n' + streams, "t", tmp_path)
    assert relative.control.socket == tmp_path.resolve() / "c.sock"
