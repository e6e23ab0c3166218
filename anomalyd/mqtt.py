"""MQTT publishing that loses nothing: the outbox in SQLite is drained, in order, to the broker.

One thread owns the paho client and runs its network loop itself, so connection, reconnection (capped
exponential back-off with jitter), publishing and acknowledgements happen in one place. A message leaves
the outbox only when the broker has acknowledged it (PUBACK for QoS 1); after a reconnect or a restart
the backlog goes out again in order, flagged `replayed`. Messages whose rows could not be written (a
full disk) wait in memory and go out after the table's. The retained `status` is `online` while
connected and the broker publishes the Last Will, `offline`, if the daemon dies without saying goodbye.

Nothing a broker or a client sends can stop this thread: every paho callback is guarded, command
payloads are parsed strictly (anomalyd/mutes.py) and handed to the store's writer as records. The
thread's heartbeat stays fresh through any outage: it waits in short slices, and while the last failure
was the network's, it probes the broker's port every second so that delivery resumes as soon as the
broker is back, whatever the back-off has grown to.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import random
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from anomalyd.config import MqttConfig
from anomalyd.contract import Topics, as_replayed
from anomalyd.errors import CommandError, ConfigError
from anomalyd.homeassistant import HaStream, discovery_messages
from anomalyd.marks import MarkCommand, parse_mark_command
from anomalyd.mutes import MinutesCommand, MuteCommand, parse_minutes_command, parse_mute_command
from anomalyd.outbox import Delivered, MemoryOutbox, Outbox, Pending
from anomalyd.records import iso, utc_now
from anomalyd.throttle import Throttle

logger = logging.getLogger(__name__)

INFLIGHT = 50  # messages published and not yet acknowledged
CONNECT_TIMEOUT_S = 3.0  # TCP connect, and again the TLS handshake
CONNACK_TIMEOUT_S = 10.0
READY_WAIT_S = 10.0  # longest a connection waits for the service's first statement of stream states
WAIT_SLICE_S = 0.25  # waits are cut into slices this long, the heartbeat renewed after each
PROBE_INTERVAL_S = 1.0  # while the broker is unreachable, look at its port this often
PROBE_TIMEOUT_S = 0.5
MAX_BACKOFF_S = 3600.0
HA_STATUS_TOPIC_LEAF = "status"  # Home Assistant announces itself on <discovery_prefix>/status
RETAINED_REFUSAL = "retained command (publish it without -r)"
SHOWN_CHARS = 40  # how much of a foreign payload or topic a log line shows


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


def shown(value: str | bytes | bytearray) -> str:
    """A foreign topic or payload for a log line: escaped, cut short, its length said when cut."""
    head = ascii(value[:SHOWN_CHARS])
    return head if len(value) <= SHOWN_CHARS else f"{head}... ({len(value)} long)"


def mute_command(stream: str, payload: bytes, retain: bool, at: dt.datetime) -> MuteCommand:
    """The record for the store's writer from a command message (refused ones say why)."""
    if retain:  # a retained command would replay at every reconnect
        return MuteCommand(stream, 0.0, at, RETAINED_REFUSAL)
    try:
        return MuteCommand(stream, parse_mute_command(payload), at)
    except CommandError as exc:
        return MuteCommand(stream, 0.0, at, str(exc))


def minutes_command(stream: str, payload: bytes, retain: bool, at: dt.datetime) -> MinutesCommand:
    """The record for the store's writer from a `mute/minutes/set` message (refused ones say why)."""
    if retain:
        return MinutesCommand(stream, 0.0, at, RETAINED_REFUSAL)
    try:
        return MinutesCommand(stream, parse_minutes_command(payload), at)
    except CommandError as exc:
        return MinutesCommand(stream, 0.0, at, str(exc))


def mark_command(stream: str, payload: bytes, retain: bool, at: dt.datetime) -> MarkCommand:
    """The record for the store's writer from an `event/mark` message (refused ones say why)."""
    if retain:
        return MarkCommand(stream, "", at, RETAINED_REFUSAL)
    try:
        return MarkCommand(stream, parse_mark_command(payload), at)
    except CommandError as exc:
        return MarkCommand(stream, "", at, str(exc))


Parser = Callable[[str, bytes, bool, dt.datetime], MuteCommand | MarkCommand | MinutesCommand]
# Command topic leaf -> (what log lines call it, its parser)
PARSERS: dict[str, tuple[str, Parser]] = {
    "mute/set": ("mute", mute_command),
    "mute/minutes/set": ("mute duration", minutes_command),
    "event/mark": ("mark", mark_command),
}


class LinkState(Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"


@dataclass(frozen=True)
class LinkStatus:
    """The broker link, for STATUS and diagnostics."""

    state: LinkState
    detail: str  # "connected to host:port" or the last connection failure
    seconds: float  # how long it has been in this state


class StoreSink(Protocol):
    """The store's writer, as the publisher sees it: it takes acknowledgements and mute commands."""

    @property
    def outbox(self) -> Outbox | None: ...

    def put(self, item: Delivered | MuteCommand | MarkCommand | MinutesCommand) -> None: ...


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
        self,
        config: MqttConfig,
        *,
        node: str,
        streams: list[HaStream],
        database: Path,
        sink: StoreSink,
    ) -> None:
        self.config = config
        self.topics = Topics(config.prefix, node)
        self.streams = streams
        self._database = database
        self._sink = sink  # the store writer: Delivered(...) and MuteCommand(...) go to it
        self._memory = sink.outbox.memory if sink.outbox is not None else MemoryOutbox()
        self._password = read_password(config)  # fails at start, not at the first connection
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self.state = LinkState.DISCONNECTED
        self._state_since = time.monotonic()
        self._beat = time.monotonic()
        self._bounded_until = 0.0  # inside a blocking call that returns by then
        self.delivered = 0
        self._client: mqtt.Client | None = None
        self._connected_at = ""  # ISO time of the current connection: older outbox rows are replays
        self._connack: ReasonCode | None = None
        self._closed_early = False
        self._inflight: dict[int, int] = {}  # paho mid -> outbox id
        self._acked: list[int] = []
        self._memory_inflight: dict[int, int] = {}  # paho mid -> in-memory message seq
        self._memory_acked: list[int] = []
        self._sent_up_to = 0  # highest outbox id handed to paho on this connection
        self._done: set[int] = set()  # acknowledged ids the writer may not have deleted yet
        self._resend_discovery = False
        # Discovery waits until every stream's model is known (the service's `set_streams`, once loaded).
        self._streams_known = all(s.model_id for s in streams)
        self._delay = self._initial_delay()
        self._fast_retry = False  # the last failure was the network's: probe the port while waiting
        self._last_failure = ""  # the last connection failure logged, so that a retry loop logs it once
        self._lock = threading.Lock()
        self._diagnostics: str | None = None
        self._diagnostics_sent: str | None = None
        self._callback_failed: set[str] = set()
        self._callback_log = Throttle(60.0)
        self._command_log = Throttle(60.0, burst=20)  # a flood of bad commands is not a flood of lines
        self._read_log = Throttle(60.0)
        # `online` makes Home Assistant show each entity's last known value again. It goes out only once
        # the daemon has stated its streams' current alarm and source states (`mark_ready`), and after the
        # pending retained states: otherwise a restart after a crash shows a stale "Problem" for a moment,
        # a real off -> on change that automations would act on.
        self._ready = threading.Event()
        self._online = False
        self._early: set[int] = set()  # outbox ids sent ahead of their turn, before `online`

    # ---- lifecycle and what the service reads -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def heartbeat(self) -> float:
        """Monotonic time of the thread's last sign of life (now, while in a call bounded by a timeout)."""
        now = time.monotonic()
        return now if now < self._bounded_until else self._beat

    def link_status(self) -> LinkStatus:
        state = self.state
        detail = f"connected to {self._where()}" if state == LinkState.CONNECTED else self._last_failure
        return LinkStatus(state, detail or state.value, time.monotonic() - self._state_since)

    def mark_ready(self) -> None:
        """The streams' current states are in the outbox: `online` may be published (any thread)."""
        self._ready.set()

    def set_streams(self, streams: list[HaStream]) -> None:
        """Once the streams run, and after each reload: discovery and commands follow this list."""
        self.streams = streams
        self._streams_known = True
        self._resend_discovery = True

    def set_diagnostics(self, payload: str) -> None:
        """Publish `payload` retained (QoS 1) on <prefix>/<node>/diagnostics: now if connected and it
        changed, and again after every reconnect. Safe to call from any thread."""
        with self._lock:
            self._diagnostics = payload

    def drain(self, timeout: float) -> None:
        """At shutdown, give the outbox a moment to empty while still connected."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(sqlite3.Error):
            conn = sqlite3.connect(f"file:{self._database}?mode=ro", uri=True, timeout=1.0)
            try:
                while time.monotonic() < deadline and self.state == LinkState.CONNECTED:
                    waiting = conn.execute("SELECT count(*) FROM outbox").fetchone()[0] + len(self._memory)
                    if not waiting:
                        return
                    time.sleep(0.05)
            finally:
                conn.close()

    def stop(self, timeout: float = 2.0) -> None:
        """Say `offline` (retained) and disconnect cleanly, so that the Last Will is not sent."""
        self._stop.set()
        self._thread.join(timeout)

    def _where(self) -> str:
        return f"{self.config.host}:{self.config.broker_port}"

    def _set_state(self, state: LinkState) -> None:
        if state != self.state:
            self.state = state
            self._state_since = time.monotonic()

    def _make_client(self) -> mqtt.Client:
        client_id = self.config.client_id or f"anomalyd-{self.topics.node}"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        client.enable_logger(logging.getLogger("anomalyd.mqtt.paho"))
        client.suppress_exceptions = True  # and every callback guards itself: nothing drops the link
        client.connect_timeout = CONNECT_TIMEOUT_S
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
        client.on_connect = self._guarded("on_connect", self._on_connect)
        client.on_disconnect = self._guarded("on_disconnect", self._on_disconnect)
        client.on_publish = self._guarded("on_publish", self._on_publish)
        client.on_message = self._guarded("on_message", self._on_message)
        return client

    # ---- paho callbacks (called from client.loop(), on this publisher's own thread) ------------------

    def _guarded(self, name: str, callback: Callable[..., None]) -> Callable[..., None]:
        """The callback, with any exception logged (the traceback once) instead of dropping the link."""

        def guarded(*args: Any) -> None:
            try:
                callback(*args)
            except Exception:
                if name not in self._callback_failed:
                    self._callback_failed.add(name)
                    logger.exception("MQTT: the %s handler failed; the connection stays up", name)
                elif self._callback_log.ready():
                    logger.error(
                        "MQTT: the %s handler failed again%s", name, self._callback_log.take_suppressed()
                    )

        return guarded

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._connack = reason

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if self.state == LinkState.CONNECTED:
            logger.warning("MQTT connection to %s lost (%s)", self._where(), reason)
            self._last_failure = f"connection to {self._where()} lost ({reason})"
            self._fast_retry = True
        elif self._connack is None:
            self._closed_early = True
        self._set_state(LinkState.DISCONNECTED)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        row = self._inflight.pop(mid, None)
        if row is not None:
            self._acked.append(row)
            return
        seq = self._memory_inflight.pop(mid, None)
        if seq is not None:
            self._memory_acked.append(seq)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self._ignored("a message on a topic that is not UTF-8")
            return
        if topic == f"{self.config.homeassistant.discovery_prefix}/{HA_STATUS_TOPIC_LEAF}":
            if message.payload == b"online":
                self._resend_discovery = True
            return
        command = self.topics.command_of(topic)
        if command is None:
            self._ignored(f"a message on unexpected topic {shown(topic)}")
            return
        stream, leaf = command
        self._on_command(*PARSERS[leaf], stream, message)

    def _on_command(self, kind: str, parse: Parser, stream: str, message: mqtt.MQTTMessage) -> None:
        """A stream's command to the store's writer, refused ones too (the writer answers them)."""
        if stream not in {s.name for s in self.streams}:
            self._ignored(f"a {kind} command for unknown stream {shown(stream)}")
            return
        command = parse(stream, bytes(message.payload), message.retain, utc_now())
        if command.refused and self._command_log.ready():
            logger.warning(
                "MQTT: %s command %s for stream %s refused: %s%s",
                kind, shown(message.payload), stream, command.refused, self._command_log.take_suppressed(),
            )  # fmt: skip
        self._sink.put(command)

    def _ignored(self, what: str) -> None:
        if self._command_log.ready():
            logger.warning("MQTT: ignored %s%s", what, self._command_log.take_suppressed())

    # ---- the thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._beat = time.monotonic()
            try:
                if self._connect():
                    self._delay = self._initial_delay()
                    self._serve()
            except Exception:  # the publisher must outlive whatever the network or paho throws
                logger.exception("MQTT publisher failed; reconnecting")
                self._fast_retry = False
            self._drop_connection()
            if not self._stop.is_set():
                self._wait_before_retry()

    def _initial_delay(self) -> float:
        return min(self.config.retry_initial_seconds, MAX_BACKOFF_S)

    def _wait_before_retry(self) -> None:
        """Back off (capped, with jitter) in short slices; after a network failure, look at the broker's
        port every second and connect at once when it answers."""
        delay = self._delay * random.uniform(0.8, 1.2)
        self._delay = min(self._delay * 2, self.config.retry_max_seconds, MAX_BACKOFF_S)
        logger.debug("MQTT: next connection attempt in %.1f s", delay)
        start = time.monotonic()
        deadline = start + delay
        next_probe = start + PROBE_INTERVAL_S
        while not self._stop.is_set():
            now = time.monotonic()
            self._beat = now
            if now >= deadline:
                return
            if self._fast_retry and now >= next_probe:
                next_probe = now + PROBE_INTERVAL_S
                if self._port_open():
                    logger.info("MQTT: %s accepts connections again; connecting", self._where())
                    return
            wake = min(deadline, next_probe) if self._fast_retry else deadline
            self._stop.wait(max(0.0, min(WAIT_SLICE_S, wake - now)))

    def _port_open(self) -> bool:
        self._bounded_until = time.monotonic() + PROBE_TIMEOUT_S + 1.0
        try:
            with socket.create_connection(
                (self.config.host, self.config.broker_port), timeout=PROBE_TIMEOUT_S
            ):
                return True
        except OSError:
            return False
        finally:
            self._bounded_until = 0.0

    def _connect(self) -> bool:
        self._set_state(LinkState.CONNECTING)
        self._client = client = self._make_client()
        self._connack = None
        self._closed_early = False
        if not self._dial(client) or not self._accepted(client):
            return False
        self._last_failure = ""
        self._set_state(LinkState.CONNECTED)
        self._connected_at = iso(utc_now()) or ""
        self._inflight.clear()
        self._memory_inflight.clear()
        self._sent_up_to = 0
        with self._lock:
            self._diagnostics_sent = None
        logger.info("MQTT: connected to %s as %s", self._where(), client._client_id.decode())
        self._online = False
        self._early.clear()
        client.subscribe(self.topics.mute_commands, qos=1)
        client.subscribe(self.topics.minutes_commands, qos=1)
        client.subscribe(self.topics.mark_commands, qos=1)
        if self.config.homeassistant.enabled:
            client.subscribe(f"{self.config.homeassistant.discovery_prefix}/{HA_STATUS_TOPIC_LEAF}", qos=1)
            self._resend_discovery = True
        return True

    def _dial(self, client: mqtt.Client) -> bool:
        """Open the TCP (and TLS) connection and send CONNECT; a blocking call bounded by its timeouts."""
        where = self._where()
        self._bounded_until = time.monotonic() + 2 * CONNECT_TIMEOUT_S + 1.0
        try:
            client.connect(self.config.host, self.config.broker_port, keepalive=self.config.keepalive_seconds)
        except ssl.SSLCertVerificationError as exc:
            return self._failed(
                f"TLS certificate of {where} not trusted ({exc.verify_message}); check mqtt.tls.ca_file",
                network=False,
            )
        except (ssl.SSLError, ValueError) as exc:
            return self._failed(f"TLS with {where} failed: {exc}", network=False)
        except OSError as exc:
            return self._failed(f"cannot connect to {where}: {exc}", network=True)
        finally:
            self._bounded_until = 0.0
        return True

    def _accepted(self, client: mqtt.Client) -> bool:
        """Wait (in slices) for the broker's CONNACK; True if it accepted the connection."""
        where = self._where()
        deadline = time.monotonic() + CONNACK_TIMEOUT_S
        while self._connack is None and time.monotonic() < deadline and not self._stop.is_set():
            self._beat = time.monotonic()
            if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                self._closed_early = True
                break
        if self._connack is None:
            if self._closed_early:
                return self._failed(f"{where} closed the connection before accepting it", network=True)
            return self._failed(f"no answer from {where} to the connection request", network=False)
        if self._connack.is_failure:
            return self._failed(f"{where} refused the connection: {self._connack}", network=False)
        return True

    def _failed(self, why: str, network: bool) -> bool:
        """Log a connection failure once (error), its repetitions quietly (debug), until one succeeds.
        `network`: refused, unreachable or timed out, so the broker's port is worth probing; not after a
        refused login or an untrusted certificate (those keep the back-off)."""
        self._fast_retry = network
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
                self._beat = time.monotonic()
                if self._resend_discovery and self._streams_known and self.config.homeassistant.enabled:
                    self._resend_discovery = False
                    self._publish_discovery()
                self._publish_diagnostics()
                if not self._online and (self._ready.is_set() or self._waited_too_long()):
                    self._go_online(outbox)
                self._publish_pending(outbox)
                if self._client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                    break
                self._report_acked()
        if self._stop.is_set() and self.state == LinkState.CONNECTED:
            self._goodbye()

    def _waited_too_long(self) -> bool:
        """Never stay `offline` because the service did not say it was ready (a bug, a stuck start)."""
        return time.monotonic() - self._state_since > READY_WAIT_S

    def _go_online(self, outbox: sqlite3.Connection) -> None:
        """Retained states not yet sent go out ahead of their turn (only the newest of each topic waits in
        the outbox, so nothing they say is overtaken), then `online`; everything else keeps its order."""
        assert self._client is not None
        try:
            rows = outbox.execute(
                "SELECT id, topic, payload, qos FROM outbox WHERE id > ? AND kind IN ('state', 'source') "
                "ORDER BY id",
                [self._sent_up_to],
            ).fetchall()
        except sqlite3.Error:
            rows = []  # the event log is unreadable: its newest states wait in memory, sent in turn
        for row_id, topic, payload, qos in rows:
            if row_id in self._done:
                continue
            info = self._client.publish(topic, payload, qos=qos, retain=True)
            self._inflight[info.mid] = row_id
            self._early.add(row_id)
        self._client.publish(self.topics.status, "online", qos=1, retain=True)
        self._online = True

    def _read_outbox(self, outbox: sqlite3.Connection, limit: int) -> list[_Row] | None:
        """The next rows of the outbox table; None when it cannot be read (then memory goes on)."""
        try:
            return [
                _Row(*r)
                for r in outbox.execute(
                    "SELECT id, topic, payload, qos, retain, kind, created_at FROM outbox "
                    "WHERE id > ? ORDER BY id LIMIT ?",
                    [self._sent_up_to, limit],
                ).fetchall()
            ]
        except sqlite3.Error as exc:
            if self._read_log.ready():
                logger.warning("MQTT: cannot read the outbox (%s); sending what waits in memory", exc)
            return None

    def _publish_pending(self, outbox: sqlite3.Connection) -> None:
        assert self._client is not None
        room = INFLIGHT - len(self._inflight) - len(self._memory_inflight)
        if room <= 0:
            return
        generation = self._memory.generation
        limit = room + len(self._done) + len(self._early)
        rows = self._read_outbox(outbox, limit)
        for row in rows or []:
            if row.id in self._done or row.id in self._early:
                self._early.discard(row.id)
                self._sent_up_to = max(self._sent_up_to, row.id)
                continue
            late = row.kind == "event" and row.created_at < self._connected_at
            payload = as_replayed(row.payload) if late else row.payload
            info = self._client.publish(row.topic, payload, qos=row.qos, retain=bool(row.retain))
            self._sent_up_to = row.id
            room -= 1
            if row.qos == 0:
                self._acked.append(row.id)  # nothing to wait for; sent is as good as it gets
            else:
                self._inflight[info.mid] = row.id
        if rows is not None and len(rows) >= limit:
            return  # the table first: what waits in memory is newer
        for pending in self._memory.take(room, generation):
            self._publish_memory(pending)

    def _publish_memory(self, pending: Pending) -> None:
        assert self._client is not None
        m = pending.message
        late = m.kind == "event" and pending.created_at < self._connected_at
        payload = as_replayed(m.payload) if late else m.payload
        info = self._client.publish(m.topic, payload, qos=m.qos, retain=m.retain)
        if m.qos == 0:
            self._memory_acked.append(pending.seq)
        else:
            self._memory_inflight[info.mid] = pending.seq

    def _report_acked(self) -> None:
        if self._memory_acked:
            seqs, self._memory_acked = self._memory_acked, []
            self._memory.acked(seqs)
            self.delivered += len(seqs)
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

    def _publish_diagnostics(self) -> None:
        assert self._client is not None
        with self._lock:
            payload = self._diagnostics
            if payload is None or payload == self._diagnostics_sent:
                return
            self._diagnostics_sent = payload
        self._client.publish(self.topics.diagnostics, payload, qos=1, retain=True)

    def _goodbye(self) -> None:
        assert self._client is not None
        info = self._client.publish(self.topics.status, "offline", qos=1, retain=True)
        deadline = time.monotonic() + 1.0
        while not info.is_published() and time.monotonic() < deadline:
            self._client.loop(timeout=0.05)
        self._report_acked()
        self._set_state(LinkState.DISCONNECTED)  # first: a disconnection we asked for is no news
        self._client.disconnect()

    def _drop_connection(self) -> None:
        if self._client is not None:
            with contextlib.suppress(OSError, ssl.SSLError):  # already gone: nothing to tell the broker
                self._client.disconnect()
        self._set_state(LinkState.DISCONNECTED)
        self._inflight.clear()
        self._memory_inflight.clear()
        self._memory.acked(self._memory_acked)
        self._memory_acked = []
        self._memory.requeue()
