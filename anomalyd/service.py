"""`anomalyd run`: the long-running service and its lifecycle.

Start in order (config, event store, bundles and worker, sources), stop in reverse. SIGTERM and SIGINT
stop: sources first, then the worker closes open events, then the store writes what is queued and
closes the database, all within a few seconds. SIGHUP reloads: the new config and its bundles are
checked first; if anything is wrong, the old configuration keeps running and one log line says why.
Under systemd: READY=1 once the streams run, STATUS= with a summary, WATCHDOG=1 only while the worker,
the store's writer and the MQTT thread are making progress (a broker outage is not a stall: the MQTT
thread keeps beating while it waits, and the link state is reported instead).

No thread may die quietly and leave a half-alive daemon: an unexpected exception in any thread is logged
once with its traceback, the daemon stops what still runs in order and exits with status 2, and systemd
(Restart=on-failure) starts it afresh; events left open are then ended publicly as `interrupted`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from anomalyd.config import DaemonConfig, config_warnings, load_config
from anomalyd.contract import Topics
from anomalyd.control import ControlServer
from anomalyd.errors import AnomalydError, ControlError
from anomalyd.homeassistant import HaStream, discovery_messages
from anomalyd.live import LiveView, watched_beats
from anomalyd.marks import MarkOp
from anomalyd.mqtt import Publisher
from anomalyd.notify import Notifier
from anomalyd.pipeline import Pipeline
from anomalyd.records import utc_now
from anomalyd.sources.mic import MicIO
from anomalyd.status import (
    LagWatch,
    Snapshot,
    diagnostics_payload,
    outbox_backlog,
    stalled,
    stamped,
    summary,
    take_snapshot,
)
from anomalyd.store import Mutes, Outbox, Roster, StoreWriter
from anomalyd.tap import RecordOp

if TYPE_CHECKING:
    from anomalyd.web.server import WebServer

logger = logging.getLogger(__name__)

STATUS_INTERVAL_S = 5.0  # how often STATUS= is refreshed
STOP_TIMEOUT_S = 4.0  # the whole shutdown fits in systemd's and the ops team's 5 s
EXIT_OK = 0
EXIT_ERROR = 2  # bad config, cannot start, or a thread died: systemd restarts on any non-zero status


def configure_logging(level: str) -> None:
    # Under systemd the journal stamps each line itself.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(format=f"{stamp}%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger().setLevel(level.upper())


class Daemon:
    def __init__(self, config_path: Path, mic_io: MicIO | None = None) -> None:
        self.config_path = config_path
        self._mic_io = mic_io
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._wakeup = threading.Event()  # set by signal handlers so the main loop reacts at once
        self._publisher: Publisher | None = None
        self._notifier = Notifier()
        self._fatal: str | None = None  # the thread whose unexpected death stops the daemon
        self._lag = LagWatch()
        self._store: StoreWriter | None = None
        self._node = ""
        self._diagnostics: dict[str, object] | None = None  # the last published, without its time
        self._main_beat = time.monotonic()  # the main loop's last turn: it is what pings the watchdog

    def _on_thread_death(self, args: threading.ExceptHookArgs) -> None:
        """threading.excepthook: any thread's unexpected exception is fatal, never a silent dead thread."""
        name = args.thread.name if args.thread is not None else "?"
        if self._fatal is None:
            self._fatal = name
            logger.critical(
                "thread %s died unexpectedly; stopping (systemd restarts the daemon)",
                name,
                exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
            )
        self._stop.set()
        self._wakeup.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload.set()
        else:
            self._stop.set()
        self._wakeup.set()

    def run(self) -> int:
        try:
            config = load_config(self.config_path)
        except AnomalydError as exc:
            logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
            logger.error("%s", exc)
            return EXIT_ERROR
        configure_logging(config.log_level)
        for warning in config_warnings(config):
            logger.warning("%s", warning)
        previous_hook = threading.excepthook
        threading.excepthook = self._on_thread_death
        try:
            return self._run(config)
        finally:
            threading.excepthook = previous_hook

    def _run(self, config: DaemonConfig) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        outbox = None
        if config.mqtt.enabled:
            outbox = Outbox(
                Topics(config.mqtt.prefix, config.node_id),
                config.mqtt.outbox_max_messages,
                Mutes(),
                clips=config.storage.clips,
            )
        try:
            store = StoreWriter(config.storage, outbox)
            publisher = self._make_publisher(config, store)
        except AnomalydError as exc:
            logger.error("cannot start: %s", exc)
            return EXIT_ERROR
        self._store, self._node = store, config.node_id
        store.start()
        if publisher is not None:
            publisher.start()
        interval = config.mqtt.score_interval_seconds if publisher is not None else None
        pipeline = Pipeline(store, self._mic_io, score_interval=interval)
        try:
            pipeline.start(config)
        except AnomalydError as exc:
            logger.error("cannot start: %s", exc)
            if publisher is not None:
                publisher.stop()
            store.stop(STOP_TIMEOUT_S)
            return EXIT_ERROR
        self._publisher = publisher
        if publisher is not None:
            self._announce_streams(config, pipeline, store, publisher)
            # `online` only after each stream's current state is in the outbox, so that nothing shows the
            # last state from before a crash again when the node comes back.
            pipeline.wait_stated(2.0)
            store.flush(2.0)
            publisher.mark_ready()
        logger.info(
            "anomalyd running on node %s: %d stream(s), events in %s",
            config.node_id, len(config.streams), config.storage.database,
        )  # fmt: skip
        control = self._start_control(config, pipeline, store)
        web = self._start_web(config, pipeline, store) if config.web.enabled else None
        self._notifier.ready(self._summary(pipeline))
        try:
            self._serve(pipeline, store)
        except Exception:  # the main loop too: stop in order rather than leave the threads behind
            logger.critical("the main loop failed; stopping (systemd restarts the daemon)", exc_info=True)
            self._fatal = self._fatal or "main"
        self._notifier.stopping()
        started = time.monotonic()
        if web is not None:
            web.stop(1.0)
        if control is not None:
            control.stop(0.5)
        stopped = pipeline.stop(STOP_TIMEOUT_S * 0.5)
        if publisher is not None:
            store.flush(0.5)  # the closing events reach the outbox, and get a moment to go out
            publisher.drain(0.5)
            publisher.stop(0.8)
        store.stop(max(0.5, STOP_TIMEOUT_S - (time.monotonic() - started)))
        logger.info("stopped in %.2f s", time.monotonic() - started)
        status = EXIT_ERROR if self._fatal is not None else EXIT_OK
        if not stopped:
            # A worker still inside ONNX Runtime would abort the interpreter's exit (SIGABRT) and turn a
            # clean stop into a crash report; everything that can be saved has been.
            logging.shutdown()
            os._exit(status)
        return status

    @staticmethod
    def _start_control(config: DaemonConfig, pipeline: Pipeline, store: StoreWriter) -> ControlServer | None:
        """The local control channel; without it the daemon monitors all the same."""
        record = RecordOp(pipeline.tap, pipeline.describe, lambda: [r.name for r in pipeline.streams()])
        server = ControlServer(config.control.socket, {"record": record, "mark": MarkOp(store.put)})
        try:
            server.start()
        except ControlError as exc:
            logger.warning("control channel off (monitoring goes on; `anomalyd record` cannot reach "
                           "this daemon): %s", exc)  # fmt: skip
            return None
        logger.info("control channel on %s", config.control.socket)
        return server

    def _beats(self, pipeline: Pipeline, store: StoreWriter) -> dict[str, float]:
        return watched_beats(self._main_beat, pipeline, store, self._publisher)

    def _stale_seconds(self) -> float:
        """How long a thread may show no progress before it counts as stalled."""
        return max(2.0, self._notifier.watchdog_interval or 0.0)

    def _start_web(self, config: DaemonConfig, pipeline: Pipeline, store: StoreWriter) -> WebServer | None:
        """The dashboard, /metrics and /healthz; without them the daemon monitors all the same."""
        # Imported only when enabled: the web stack costs about 20 MB that a headless box need not pay.
        from anomalyd.web.server import WebServer  # noqa: PLC0415

        view = LiveView(
            config.node_id, pipeline, store=store, publisher=self._publisher,
            beats=lambda: self._beats(pipeline, store), stale_seconds=self._stale_seconds(),
            stopping=self._stop.is_set,
        )  # fmt: skip
        server = WebServer(config.web, view)
        try:
            server.start()
        except AnomalydError as exc:
            logger.error("dashboard off (monitoring goes on): %s", exc)
            return None
        return server

    @staticmethod
    def _make_publisher(config: DaemonConfig, store: StoreWriter) -> Publisher | None:
        if not config.mqtt.enabled:
            return None
        return Publisher(
            config.mqtt,
            node=config.node_id,
            streams=[HaStream(s.name, "", s.area) for s in config.streams],  # models: once loaded
            database=config.storage.database,
            sink=store,
        )

    @staticmethod
    def _announce_streams(
        config: DaemonConfig, pipeline: Pipeline, store: StoreWriter, publisher: Publisher
    ) -> None:
        """The running streams (at start, after a reload) to Home Assistant discovery and to the store's
        writer, which restates mute states and clears the discovery of streams no longer configured."""
        models = {r.name: r.model.bundle.meta.model_id for r in pipeline.streams()}
        streams = [HaStream(s.name, models.get(s.name, ""), s.area) for s in config.streams]
        publisher.set_streams(streams)
        ha = config.mqtt.homeassistant
        wanted = discovery_messages(publisher.topics, streams, ha.discovery_prefix) if ha.enabled else []
        store.put(Roster({s.name: s.mute_minutes for s in config.streams}, tuple(m.topic for m in wanted)))

    def _serve(self, pipeline: Pipeline, store: StoreWriter) -> None:
        watchdog = self._notifier.watchdog_interval
        tick = min(1.0, watchdog / 3) if watchdog else 1.0
        self._main_beat = time.monotonic()  # start-up took its time; the loop begins now
        next_status = self._main_beat + STATUS_INTERVAL_S
        while not self._stop.is_set():
            self._wakeup.wait(tick)
            self._wakeup.clear()
            if self._stop.is_set():
                break
            if pipeline.all_ended():
                logger.info("every source has ended (replayed files): stopping")
                break
            if self._reload.is_set():
                self._reload.clear()
                self._apply_reload(pipeline)
            self._lag.update(self._snapshot(pipeline))
            now = time.monotonic()
            self._main_beat = now
            beats = self._beats(pipeline, store)
            if not stalled(beats, now, self._stale_seconds()):
                self._notifier.watchdog()
            else:
                logger.error(
                    "pipeline stalled (idle for %s s: %s); no watchdog ping",
                    ", ".join(f"{now - beat:.1f}" for beat in beats.values()), ", ".join(beats),
                )  # fmt: skip
            if now >= next_status:
                next_status = now + STATUS_INTERVAL_S
                snapshot = self._snapshot(pipeline, count_backlog=True)
                self._notifier.status(summary(snapshot))
                self._publish_diagnostics(snapshot)

    def _apply_reload(self, pipeline: Pipeline) -> None:
        self._notifier.reloading()
        try:
            config = load_config(self.config_path)
            assert pipeline.config is not None
            fixed = _restart_only_changes(pipeline.config, config)
            if fixed:
                logger.warning("reload: changes to %s take effect at the next restart", ", ".join(fixed))
            changes = pipeline.reload(config)
            assert self._store is not None
            if self._store.outbox is not None:
                self._store.outbox.clips = config.storage.clips
            if self._publisher is not None:
                self._announce_streams(config, pipeline, self._store, self._publisher)
        except AnomalydError as exc:
            logger.error("reload refused, the running configuration stays: %s", str(exc).replace("\n", "; "))
        except Exception:  # a reload must never take monitoring down: the running configuration stays
            logger.exception("reload failed unexpectedly, the running configuration stays")
        else:
            configure_logging(config.log_level)
            logger.info("reloaded %s: %s", self.config_path, ", ".join(changes) or "no stream changed")
        self._notifier.ready(self._summary(pipeline))

    def _snapshot(self, pipeline: Pipeline, count_backlog: bool = False) -> Snapshot:
        """`count_backlog`: read the outbox's size too (a database read: for diagnostics only, not for
        the lag check of every tick)."""
        assert pipeline.config is not None
        assert self._store is not None
        link = self._publisher.link_status() if self._publisher is not None else None
        now = utc_now()
        counted = link is not None and count_backlog
        return take_snapshot(
            pipeline.streams(),
            now=now,
            max_lag_seconds=pipeline.config.inference.max_lag_seconds,
            windows_scored=pipeline.windows_scored,
            blocks_dropped=pipeline.blocks_dropped,
            storage=self._store.status(),
            events_today=self._store.events_today(now),
            outbox_backlog=outbox_backlog(pipeline.config.storage.database) if counted else 0,
            mqtt=None if link is None else link.state.value,
            mqtt_detail="" if link is None else link.detail,
        )

    def _publish_diagnostics(self, snapshot: Snapshot) -> None:
        """The node's retained diagnostics, when anything but their time changed."""
        if self._publisher is None:
            return
        payload = diagnostics_payload(snapshot, self._node)
        if payload != self._diagnostics:
            self._diagnostics = payload
            self._publisher.set_diagnostics(stamped(payload, snapshot.at))

    def _summary(self, pipeline: Pipeline) -> str:
        return summary(self._snapshot(pipeline))


def _restart_only_changes(old: DaemonConfig, new: DaemonConfig) -> list[str]:
    """Sections a reload does not apply (the store's database, ONNX Runtime threads, the node id)."""
    fixed = []
    if old.storage.model_copy(update={"clips": new.storage.clips}) != new.storage:
        fixed.append("[storage]")
    if old.inference.model_copy(update={"max_lag_seconds": new.inference.max_lag_seconds}) != new.inference:
        fixed.append("[inference]")
    if old.node != new.node:
        fixed.append("node")
    if old.mqtt != new.mqtt:
        fixed.append("[mqtt]")
    if old.control != new.control:
        fixed.append("[control]")
    if old.web != new.web:
        fixed.append("[web]")
    return fixed
