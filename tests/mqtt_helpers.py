"""A real Mosquitto for tests (password login, a plain and a TLS listener) and an independent subscriber."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from anomalyd.contract import load_schema, schema_for

USER, PASSWORD = "anomalyd", "s3cret-pass"
WATCHER, WATCHER_PASSWORD = "watcher", "watch-pass"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "2", "-subj", f"/CN={name}")  # fmt: skip
    return key, cert


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate it signed (for localhost / 127.0.0.1), and an unrelated CA."""
    ca_key, ca_cert = make_ca(folder, "test-ca")
    _, other_ca = make_ca(folder, "other-ca")
    key, csr, cert = folder / "server.key", folder / "server.csr", folder / "server.crt"
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=localhost",
    )
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", str(cert), "-days", "2", "-extfile", str(folder / "san.ext"))  # fmt: skip
    return {"ca": ca_cert, "other_ca": other_ca, "cert": cert, "key": key}


class Broker:
    """Mosquitto on loopback. `users` decides who may log in; `allow(...)` changes it live (SIGHUP)."""

    def __init__(self, folder: Path, certs: dict[str, Path]) -> None:
        self.folder = folder
        self.port, self.tls_port = free_port(), free_port()
        self.passwd = folder / "passwd"
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(
            "per_listener_settings false\nallow_anonymous false\n"
            f"password_file {self.passwd}\npersistence false\npid_file {folder}/mosquitto.pid\n"
            f"log_dest file {folder}/mosquitto.log\nuser root\n"
            f"listener {self.port} 127.0.0.1\n"
            f"listener {self.tls_port} 127.0.0.1\ncafile {certs['ca']}\ncertfile {certs['cert']}\n"
            f"keyfile {certs['key']}\n"
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.allow(USER, WATCHER)

    def allow(self, *users: str) -> None:
        passwords = {USER: PASSWORD, WATCHER: WATCHER_PASSWORD}
        self.passwd.unlink(missing_ok=True)
        for i, user in enumerate(users):
            flags = ["-c"] if i == 0 else []
            subprocess.run(["mosquitto_passwd", *flags, "-b", str(self.passwd), user, passwords[user]],
                           check=True, capture_output=True, timeout=30)  # fmt: skip
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(1)  # SIGHUP: mosquitto re-reads the password file
            time.sleep(0.3)

    def start(self) -> None:
        self.process = subprocess.Popen(["mosquitto", "-c", str(self.conf)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise AssertionError("mosquitto did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


@dataclass(frozen=True)
class Received:
    topic: str
    payload: str
    retain: bool


class Subscriber:
    """An independent client that records everything under a topic filter."""

    def __init__(self, broker: Broker, topic: str = "#") -> None:
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watcher-{time.monotonic_ns()}")
        self.client.username_pw_set(WATCHER, WATCHER_PASSWORD)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rc, p: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port, keepalive=10)
        self.client.loop_start()
        assert self._subscribed.wait(10), "subscriber could not subscribe"

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(message.topic, message.payload.decode(), message.retain))

    def on(self, suffix: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def wait_for(self, suffix: str, count: int, timeout: float) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.on(suffix)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{len(self.on(suffix))} of {count} messages on *{suffix} within {timeout} s")

    def wait_quiet(self, quiet: float, timeout: float = 10.0) -> None:
        """Wait until nothing new has arrived for `quiet` seconds (retained messages come in a burst)."""
        deadline = time.monotonic() + timeout
        seen, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            with self._lock:
                count = len(self.messages)
            if count != seen:
                seen, since = count, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.05)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def validate(message: Received) -> None:
    """Check a received payload against the project's JSON Schema for its topic."""
    name = schema_for(message.topic)
    if name in ("state", "status"):
        jsonschema.validate(message.payload, load_schema(name))
    elif name is not None:
        jsonschema.validate(json.loads(message.payload), load_schema(name),
                            format_checker=jsonschema.FormatChecker())  # fmt: skip


def daemon_mqtt(folder: Path, broker: Broker, node: str = "edge1") -> str:
    """Config lines for a daemon publishing to `broker` (its password in a file in `folder`), quick to
    reconnect and to publish scores."""
    (folder / "pw").write_text(PASSWORD + "\n")
    return (
        f'node = "{node}"\n[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\n'
        f'username = "{USER}"\npassword_file = "pw"\nretry_initial_seconds = 0.2\nretry_max_seconds = 1.0\n'
        "score_interval_seconds = 1.0\n"
    )


def retained(broker: Broker, topic_filter: str, settle: float = 1.5) -> dict[str, str]:
    """Topic -> payload of the retained messages under a filter, as a subscriber connecting now gets them."""
    later = Subscriber(broker, topic_filter)
    try:
        later.wait_quiet(settle)
        return {m.topic: m.payload for m in later.on("") if m.retain}
    finally:
        later.close()
