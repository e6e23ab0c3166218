"""A real Home Assistant Core for tests: started from its own virtual environment (`make test-ha` builds it,
`ANOMALYD_HA_VENV` names it) in a throw-away config dir, onboarded and given an MQTT integration through
its REST API (no UI), then read through REST (`/api/states`, services) and its websocket API (registries,
state changes). Standard library only: the project's test environment has no websocket client."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.mqtt_helpers import WATCHER, WATCHER_PASSWORD, Broker, Subscriber, free_port

VENV_VARIABLE = "ANOMALYD_HA_VENV"

# No `default_config` (it pulls in far more than a test needs): the API, the websocket API, onboarding
# and config entries (the MQTT config flow), MQTT's own debug lines for a failure's story.
CONFIGURATION = """\
homeassistant: {{name: test, unit_system: metric, time_zone: UTC, latitude: 0, longitude: 0, elevation: 0,
  currency: EUR, country: DE}}
logger: {{default: info, logs: {{homeassistant.components.mqtt: debug}}}}
api:
websocket_api:
onboarding:
config:
http: {{server_host: 127.0.0.1, server_port: {port}}}
"""

_ENTRY_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ (\w+) ")
_PATHS = re.compile(r"(?<!\S)/\S*")  # absolute file paths, which may hold any word (not MQTT topics)


def venv_from_environment() -> Path | None:
    """The Home Assistant virtual environment named by ANOMALYD_HA_VENV, if it holds `hass`."""
    value = os.environ.get(VENV_VARIABLE, "")
    return Path(value) if value and (Path(value) / "bin" / "hass").is_file() else None


class WebSocket:
    """A minimal RFC 6455 client: JSON text messages over one connection (no extensions, no fragments sent)."""

    def __init__(self, port: int, timeout: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /api/websocket HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self._buffer = b""
        while b"\r\n\r\n" not in self._buffer:
            self._fill()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"websocket upgrade refused: {head.splitlines()[0]!r}")

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("websocket closed by Home Assistant")
        self._buffer += chunk

    def _take(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._fill()
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))  # clients must mask (RFC 6455 5.3)
        self.sock.sendall(header + mask + masked)

    def send(self, message: dict[str, Any]) -> None:
        self._send_frame(0x1, json.dumps(message).encode())

    def receive(self) -> dict[str, Any]:
        parts: list[bytes] = []
        while True:
            first, second = self._take(2)
            opcode, n = first & 0x0F, second & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._take(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._take(8))
            payload = self._take(n)  # a server never masks
            if opcode == 0x8:
                raise ConnectionError("websocket closed by Home Assistant")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode in (0x0, 0x1):
                parts.append(payload)
                if first & 0x80:
                    message: dict[str, Any] = json.loads(b"".join(parts))
                    return message

    def close(self) -> None:
        with contextlib.suppress(OSError):  # already closed by Home Assistant: nothing left to shut
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@dataclass(frozen=True)
class StateChange:
    at: float  # time.monotonic() when it arrived
    entity_id: str
    state: str | None  # None: the entity was removed
    attributes: dict[str, Any]


class HomeAssistant:
    """`hass` in its own process on a free loopback port, its config dir in `folder`."""

    def __init__(self, venv: Path, folder: Path) -> None:
        self.venv = venv
        self.folder = folder
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.client_id = f"{self.base}/"
        self.token = ""
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "configuration.yaml").write_text(CONFIGURATION.format(port=self.port))
        self.log_path = folder / "home-assistant.log"

    @property
    def version(self) -> str:
        return str(self.rest("GET", "/api/config")["version"])

    # -- process --------------------------------------------------------------------------------------
    def start(self, timeout: float = 600.0) -> float:
        """Start and wait until the API answers; returns the seconds that took. `--skip-pip`: every
        requirement was installed with Home Assistant, so a start never reaches a package registry."""
        began = time.monotonic()
        out = (self.folder / "hass.out").open("ab")
        self.process = subprocess.Popen(
            [str(self.venv / "bin" / "hass"), "-c", str(self.folder), "--skip-pip", "--log-no-color"],
            stdout=out, stderr=subprocess.STDOUT, cwd=self.folder,
        )  # fmt: skip
        out.close()
        self._wait(lambda: self._answers("/api/onboarding"), timeout, "its API")
        return time.monotonic() - began

    def _answers(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"Home Assistant exited ({self.process.returncode}) before {what}:\n"
                                     f"{self.log_tail()}")  # fmt: skip
            if condition():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{self.log_tail()}")

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> float:
        """Wait for a condition while Home Assistant runs; returns the seconds it took."""
        began = time.monotonic()
        self._wait(condition, timeout, what)
        return time.monotonic() - began

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (Home Assistant saves its state and stops), SIGKILL if it has not within `timeout`."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    # -- log ------------------------------------------------------------------------------------------
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        out = self.folder / "hass.out"
        text = self.log() or (out.read_text(errors="replace") if out.exists() else "")
        return "\n".join(text.splitlines()[-lines:])

    def log_entries(self) -> list[tuple[str, str]]:
        """(level, text) per log entry; a traceback's lines belong to the entry above them."""
        entries: list[tuple[str, str]] = []
        for line in self.log().splitlines():
            match = _ENTRY_START.match(line)
            if match:
                entries.append((match.group(1), line))
            elif entries:
                entries[-1] = (entries[-1][0], entries[-1][1] + "\n" + line)
        return entries

    def complaints(self, *needles: str) -> list[str]:
        """Warnings and errors whose log line mentions any of `needles` (e.g. a logger name or a topic).

        Only the line itself counts, file paths taken out: a traceback through a checkout or a venv whose
        path holds a needle ("anomalyd") is not about it."""

        def about(text: str) -> str:
            return _PATHS.sub("", text.splitlines()[0] if text else "")

        return [text for level, text in self.log_entries()
                if level in ("WARNING", "ERROR", "CRITICAL") and any(n in about(text) for n in needles)]  # fmt: skip

    # -- REST -----------------------------------------------------------------------------------------
    def rest(self, method: str, path: str, body: dict[str, Any] | None = None, *, form: bool = False,
             auth: bool = True) -> Any:  # fmt: skip
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        data = None
        if body is not None and form:
            data, headers["Content-Type"] = (
                urllib.parse.urlencode(body).encode(),
                "application/x-www-form-urlencoded",
            )
        elif body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        request = urllib.request.Request(self.base + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{method} {path}: HTTP {e.code}: {e.read()[:500]!r}") from e

    def onboard(self) -> None:
        """The first user (what the UI's first screen does), a token for it, then a long-lived token: a
        run can outlast the 30 minutes of an access token."""
        code = self.rest("POST", "/api/onboarding/users", {
            "client_id": self.client_id, "name": "Ops", "username": "ops", "password": "ops-pass-1234",
            "language": "en"}, auth=False)["auth_code"]  # fmt: skip
        tokens = self.rest("POST", "/auth/token", {"grant_type": "authorization_code", "code": code,
                                                   "client_id": self.client_id}, form=True, auth=False)  # fmt: skip
        self.token = tokens["access_token"]
        self.token = self.ws("auth/long_lived_access_token", client_name="anomalyd tests", lifespan=1)
        self.wait_for(lambda: self.rest("GET", "/api/config")["state"] == "RUNNING", 300, "state RUNNING")

    def add_mqtt(self, broker: Broker, timeout: float = 120.0) -> None:
        """The MQTT integration through its config flow, logged in as the broker's watcher user; returns once
        Home Assistant has announced itself on `homeassistant/status` (its discovery subscription is up)."""
        birth = Subscriber(broker, "homeassistant/status")
        try:
            flow = self.rest("POST", "/api/config/config_entries/flow", {"handler": "mqtt"})
            assert flow.get("step_id") == "broker", flow
            asked = {field["name"] for field in flow.get("data_schema", [])}
            answer: dict[str, Any] = {"broker": "127.0.0.1", "port": broker.port, "username": WATCHER,
                                      "password": WATCHER_PASSWORD}  # fmt: skip
            if "advanced_options" in asked:
                answer["advanced_options"] = False
            done = self.rest("POST", f"/api/config/config_entries/flow/{flow['flow_id']}", answer)
            assert done.get("type") == "create_entry", done
            self.wait_for(lambda: any(m.payload == "online" for m in birth.on("homeassistant/status")),
                          timeout, "Home Assistant's MQTT birth message")  # fmt: skip
        finally:
            birth.close()

    def states(self) -> dict[str, dict[str, Any]]:
        return {s["entity_id"]: s for s in self.rest("GET", "/api/states")}

    def state(self, entity_id: str) -> str | None:
        found = self.states().get(entity_id)
        return None if found is None else str(found["state"])

    def call_service(self, domain: str, service: str, **data: Any) -> None:
        self.rest("POST", f"/api/services/{domain}/{service}", data)

    # -- websocket ------------------------------------------------------------------------------------
    def connect(self, timeout: float = 60.0) -> WebSocket:
        ws = WebSocket(self.port, timeout)
        assert ws.receive()["type"] == "auth_required"
        ws.send({"type": "auth", "access_token": self.token})
        answer = ws.receive()
        assert answer["type"] == "auth_ok", answer
        return ws

    def ws(self, command: str, **fields: Any) -> Any:
        """One websocket command's result (its own connection)."""
        ws = self.connect()
        try:
            ws.send({"id": 1, "type": command, **fields})
            while True:
                answer = ws.receive()
                if answer.get("id") == 1 and answer.get("type") == "result":
                    assert answer["success"], f"{command}: {answer.get('error')}"
                    return answer["result"]
        finally:
            ws.close()

    def entity_registry(self) -> dict[str, dict[str, Any]]:
        return {e["entity_id"]: e for e in self.ws("config/entity_registry/list")}

    def device_registry(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.ws("config/device_registry/list")
        return result

    def area_registry(self) -> dict[str, str]:
        """area_id -> name"""
        return {a["area_id"]: a["name"] for a in self.ws("config/area_registry/list")}

    def record_states(self, prefix: str) -> StateRecorder:
        return StateRecorder(self, prefix)


class StateRecorder:
    """Every state change of entities whose object id starts with `prefix`, as Home Assistant reports them on
    its websocket: short-lived states (an event's `start` before its `update`) are not missed by polling."""

    def __init__(self, ha: HomeAssistant, prefix: str) -> None:
        self.prefix = prefix
        self.changes: list[StateChange] = []
        self._lock = threading.Lock()
        self._ws = ha.connect()
        self._ws.send({"id": 1, "type": "subscribe_events", "event_type": "state_changed"})
        assert self._ws.receive()["success"]
        self._ws.sock.settimeout(None)  # the reader blocks until close() shuts the socket down
        self._thread = threading.Thread(target=self._read, name="ha-states", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                message = self._ws.receive()
                data = message.get("event", {}).get("data", {})
                entity_id = data.get("entity_id", "")
                if entity_id.split(".", 1)[-1].startswith(self.prefix):
                    new = data.get("new_state") or {}
                    change = StateChange(
                        time.monotonic(), entity_id, new.get("state"), new.get("attributes", {})
                    )
                    with self._lock:
                        self.changes.append(change)
        except (ConnectionError, OSError):
            return  # closed

    def of(self, entity_id: str, since: float = 0.0) -> list[StateChange]:
        with self._lock:
            return [c for c in self.changes if c.entity_id == entity_id and c.at >= since]

    def close(self) -> None:
        self._ws.close()
        self._thread.join(10)
