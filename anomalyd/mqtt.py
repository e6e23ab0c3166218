"""MQTT publishing that loses nothing: the outbox in SQLite is drained, in order, to the broker.

One thread owns the paho client and runs its network loop itself, so connection, reconnection (capped
exponential back-off with jitter), publishing and acknowledgements happen in one place. A message leaves
the outbox only when the broker has acknowledged it (PUBACK for QoS 1); after a reconnect or a restart
the backlog goes out again in order, flagged `replayed`. The retained `status` is `online` while
connected and the broker publishes the Last Will, `offline`, if the daemon dies without saying goodbye.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import sqlite3
import ssl
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from anomalyd.config import MqttConfig
from anomalyd.contract import Topics, as_replayed, discovery_messages, mute_payload
from anomalyd.errors import ConfigError
from anomalyd.records import iso, utc_now
from anomalyd.sources.base import Backoff
from anomalyd.store import Delivered, Mutes

logger = logging.getLogger(__name__)

INFLIGHT = 50  # messages published and not yet acknowledged
CONNACK_TIMEOUT_S = 10.0
HA_STATUS_TOPIC_LEAF = "status"  # Home Assistant announces itself on <discovery_prefix>/status


def read_password(config: MqttConfig) -> str | None:
    """The broker password from its file or environment variable; never from the config itself."""
    if config.password_file is not None:
        try:
            return config.password_file.read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(
                f"mqtt.password_file {config.password_file}: cannot read ({exc.strerror})"
            ) from exc
    if config.password_env:
        value = os.environ.get(config.password_env)
        if value is None:
            raise ConfigError(f"mqtt.password_env: environment variable {config.password_env} is not set")
        return value
    return None


class LinkState(Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"


@dataclass
class _Row:
    id: int
    topic: str
    payload: str
    qos: int
    retain: bool
    kind: str
    created_at: str


class Publisher:
    def __init__(
        self, config: MqttConfig, *, node: str, streams: list[str], database: Path, sink: Any, mutes: Mutes
    ) -> None:
        self.config = config
        self.topics = Topics(config.prefix, node)
        self.streams = streams
        self._database = database
        self._sink = sink  # the store writer: Delivered(...) goes to it, the one writer of the database
        self.mutes = mutes
        self._password = read_password(config)  # fails at start, not at the first connection
        self._stop = threading.Event()
        self._backoff = Backoff(config.retry_initial_seconds, config.retry_max_seconds, self._stop)
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self.state = LinkState.DISCONNECTED
        self.heartbeat = time.monotonic()
        self.delivered = 0
        self._client: mqtt.Client | None = None
        self._connected_at = ""  # ISO time of the current connection: older outbox rows are replays
        self._connack: ReasonCode | None = None
        self._inflight: dict[int, int] = {}  # paho mid -> outbox id
        self._acked: list[int] = []
        self._sent_up_to = 0  # highest outbox id handed to paho on this connection
        self._done: set[int] = set()  # acknowledged ids the writer may not have deleted yet
        self._resend_discovery = False
        self._last_failure = ""  # the last connection failure logged, so that a retry loop logs it once

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def set_streams(self, streams: list[str]) -> None:
        """After a reload: discovery and commands follow the new stream list."""
        self.streams = streams
        self._resend_discovery = True

    def drain(self, timeout: float) -> None:
        """At shutdown, give the outbox a moment to empty while still connected."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(sqlite3.Error):
            conn = sqlite3.connect(f"file:{self._database}?mode=ro", uri=True, timeout=1.0)
            try:
                while time.monotonic() < deadline and self.state == LinkState.CONNECTED:
                    if not conn.execute("SELECT count(*) FROM outbox").fetchone()[0]:
                        return
                    time.sleep(0.05)
            finally:
                conn.close()

    def stop(self, timeout: float = 2.0) -> None:
        """Say `offline` (retained) and disconnect cleanly, so that the Last Will is not sent."""
        self._stop.set()
        self._thread.join(timeout)

    def _make_client(self) -> mqtt.Client:
        client_id = self.config.client_id or f"anomalyd-{self.topics.node}"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        client.enable_logger(logging.getLogger("anomalyd.mqtt.paho"))
        client.suppress_exceptions = False
        client.will_set(self.topics.status, "offline", qos=1, retain=True)
        if self.config.username:
            client.username_pw_set(self.config.username, self._password)
        tls = self.config.tls
        if tls.enabled:
            client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        client.max_inflight_messages_set(INFLIGHT)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    # ---- paho callbacks (called from client.loop(), on this publisher's own thread) ------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._connack = reason

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if self.state == LinkState.CONNECTED:
            logger.warning(
                "MQTT connection to %s:%d lost (%s)", self.config.host, self.config.broker_port, reason
            )
        self.state = LinkState.DISCONNECTED

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        row = self._inflight.pop(mid, None)
        if row is not None:
            self._acked.append(row)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == f"{self.config.homeassistant.discovery_prefix}/{HA_STATUS_TOPIC_LEAF}":
            if message.payload == b"online":
                self._resend_discovery = True
            return
        stream = self.topics.stream_of_command(message.topic)
        if stream is not None:
            self._mute_command(stream, message.payload.decode(errors="replace").strip())

    # ---- the thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                if self._connect():
                    self._backoff.reset()
                    self._serve()
            except Exception:  # the publisher must outlive whatever the network or paho throws
                logger.exception("MQTT publisher failed; reconnecting")
            self._drop_connection()
            if not self._stop.is_set():
                logger.info("MQTT: next connection attempt in %.1f s", self._backoff.next_delay)
                self._backoff.wait()

    def _connect(self) -> bool:
        self.state = LinkState.CONNECTING
        self._client = client = self._make_client()
        self._connack = None
        where = f"{self.config.host}:{self.config.broker_port}"
        try:
            client.connect(self.config.host, self.config.broker_port, keepalive=self.config.keepalive_seconds)
        except ssl.SSLCertVerificationError as exc:
            return self._failed(
                f"TLS certificate of {where} not trusted ({exc.verify_message}); check mqtt.tls.ca_file"
            )
        except (OSError, ssl.SSLError) as exc:
            return self._failed(f"cannot connect to {where}: {exc}")
        deadline = time.monotonic() + CONNACK_TIMEOUT_S
        while self._connack is None and time.monotonic() < deadline and not self._stop.is_set():
            if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                break
        if self._connack is None:
            return self._failed(f"no answer from {where} to the connection request")
        if self._connack.is_failure:
            return self._failed(f"{where} refused the connection: {self._connack}")
        self._last_failure = ""
        self.state = LinkState.CONNECTED
        self._connected_at = iso(utc_now()) or ""
        self._inflight.clear()
        self._sent_up_to = 0
        logger.info("MQTT: connected to %s as %s", where, client._client_id.decode())
        client.publish(self.topics.status, "online", qos=1, retain=True)
        client.subscribe(self.topics.mute_commands, qos=1)
        if self.config.homeassistant.enabled:
            client.subscribe(f"{self.config.homeassistant.discovery_prefix}/{HA_STATUS_TOPIC_LEAF}", qos=1)
            self._resend_discovery = True
        return True

    def _failed(self, why: str) -> bool:
        """Log a connection failure once (error), its repetitions quietly (debug), until one succeeds."""
        if why != self._last_failure:
            logger.error("MQTT: %s; events keep going to the local log and are sent once connected", why)
            self._last_failure = why
        else:
            logger.debug("MQTT: still failing: %s", why)
        return False

    def _serve(self) -> None:
        assert self._client is not None
        with sqlite3.connect(f"file:{self._database}?mode=ro", uri=True, timeout=10.0) as outbox:
            while not self._stop.is_set() and self.state == LinkState.CONNECTED:
                self.heartbeat = time.monotonic()
                if self._resend_discovery:
                    self._resend_discovery = False
                    self._publish_discovery()
                self._publish_pending(outbox)
                if self._client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                    break
                self._report_acked()
        if self._stop.is_set() and self.state == LinkState.CONNECTED:
            self._goodbye()

    def _publish_pending(self, outbox: sqlite3.Connection) -> None:
        assert self._client is not None
        room = INFLIGHT - len(self._inflight)
        if room <= 0:
            return
        rows = [
            _Row(*r)
            for r in outbox.execute(
                "SELECT id, topic, payload, qos, retain, kind, created_at FROM outbox "
                "WHERE id > ? ORDER BY id LIMIT ?",
                [self._sent_up_to, room + len(self._done)],
            ).fetchall()
        ]
        for row in rows:
            if row.id in self._done:
                continue
            late = row.kind == "event" and row.created_at < self._connected_at
            payload = as_replayed(row.payload) if late else row.payload
            info = self._client.publish(row.topic, payload, qos=row.qos, retain=bool(row.retain))
            self._sent_up_to = row.id
            if row.qos == 0:
                self._acked.append(row.id)  # nothing to wait for; sent is as good as it gets
            else:
                self._inflight[info.mid] = row.id

    def _report_acked(self) -> None:
        if not self._acked:
            return
        ids, self._acked = tuple(self._acked), []
        self.delivered += len(ids)
        self._done.update(ids)
        if len(self._done) > 10 * INFLIGHT:  # the writer has long deleted most of them
            self._done = set(sorted(self._done)[-INFLIGHT:])
        self._sink.put(Delivered(ids))

    def _publish_discovery(self) -> None:
        assert self._client is not None
        for m in discovery_messages(self.topics, self.streams, self.config.homeassistant.discovery_prefix):
            self._client.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
        logger.info("MQTT: Home Assistant discovery published for %d stream(s)", len(self.streams))

    def _mute_command(self, stream: str, text: str) -> None:
        now = utc_now()
        if stream not in self.streams:
            logger.warning("MQTT: mute command for unknown stream %r ignored", stream)
            return
        if text.lower() in ("", "0", "off", "unmute", "false"):
            until = None
        else:
            try:
                seconds = float(text)
            except ValueError:
                logger.warning(
                    "MQTT: mute command %r for %s ignored: expected seconds, or 'off'", text, stream
                )
                return
            until = now + dt.timedelta(seconds=seconds) if seconds > 0 else None
        self.mutes.set(stream, until)
        logger.warning("stream %s: alerts %s", stream, f"muted until {iso(until)}" if until else "unmuted")
        assert self._client is not None
        self._client.publish(
            self.topics.stream(stream, "mute"), mute_payload(stream, until, now), qos=1, retain=True
        )

    def _goodbye(self) -> None:
        assert self._client is not None
        info = self._client.publish(self.topics.status, "offline", qos=1, retain=True)
        deadline = time.monotonic() + 1.0
        while not info.is_published() and time.monotonic() < deadline:
            self._client.loop(timeout=0.05)
        self._report_acked()
        self.state = LinkState.DISCONNECTED  # first: a disconnection we asked for is no news
        self._client.disconnect()

    def _drop_connection(self) -> None:
        if self._client is not None:
            with contextlib.suppress(OSError, ssl.SSLError):  # already gone: nothing to tell the broker
                self._client.disconnect()
        self.state = LinkState.DISCONNECTED
        self._inflight.clear()
