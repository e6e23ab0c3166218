"""Prometheus metrics at /metrics, read from the daemon's state when scraped (nothing is counted twice and
the worker does no extra work per window). Names follow Prometheus conventions: `_total` counters,
base units (seconds), one `stream` label per machine.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator

import onnxruntime
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from anomalyd import __version__
from anomalyd.web.view import DaemonView, NodeState, StreamState

SOURCE_STATES = ("ok", "silent", "clipping", "lost", "ended", "invalid", "unknown")
MQTT_STATES = ("connected", "connecting", "disconnected")

# (name, help) of every metric, in the order the README lists them.
METRICS = (
    ("anomalyd_build_info", "anomalyd's version and its Python and ONNX Runtime versions"),
    ("anomalyd_stream_info", "one per stream: its area and model id"),
    ("anomalyd_stream_score", "the latest window's anomaly score (reconstruction error)"),
    ("anomalyd_stream_threshold", "the score above which windows count towards an event"),
    ("anomalyd_stream_anomaly", "1 while an anomaly event is open"),
    ("anomalyd_stream_source_state", "source health: 1 for the stream's current state"),
    ("anomalyd_stream_healthy", "1 while the source is ok and scores keep up with the audio"),
    ("anomalyd_stream_lag_seconds", "how far the scores trail the audio"),
    ("anomalyd_stream_muted", "1 while the stream's new alerts are muted"),
    ("anomalyd_stream_muted_until_timestamp_seconds", "when the mute ends (Unix time)"),
    ("anomalyd_stream_windows_scored_total", "windows scored since the stream (re)started"),
    ("anomalyd_stream_windows_silent_total", "windows not scored: digital silence in them"),
    ("anomalyd_stream_events_total", "anomaly events started since the daemon started"),
    ("anomalyd_windows_scored_total", "windows scored, all streams"),
    ("anomalyd_audio_blocks_dropped_total", "capture blocks lost because the worker could not keep up"),
    ("anomalyd_workers", "worker threads scoring the streams"),
    (
        "anomalyd_window_latency_seconds",
        "from a window's last audio arriving to its score, over the last 8192 windows, by quantile",
    ),
    ("anomalyd_mqtt_connected", "1 while connected to the broker (absent without MQTT)"),
    ("anomalyd_outbox_backlog_messages", "MQTT messages not yet acknowledged by the broker"),
    ("anomalyd_store_degraded", "1 while the event log cannot be written (rows held in memory)"),
    ("anomalyd_store_write_errors_total", "failed writes to the event log (full disk, I/O, locks)"),
    ("anomalyd_store_rows_pending", "event log rows waiting in memory"),
    ("anomalyd_store_rows_dropped_total", "event log rows given up because memory was full"),
    ("anomalyd_store_clips_skipped_total", "event clips not saved (disk short or failing)"),
    ("anomalyd_healthy", "1 while every watched thread makes progress (what /healthz and the watchdog say)"),
)
HELP = dict(METRICS)


_STREAM = ("stream",)
# Per-stream metrics read from StreamState: (name, is a counter, value or None for "no sample").
PER_STREAM: tuple[tuple[str, bool, Callable[[StreamState], float | None]], ...] = (
    ("anomalyd_stream_score", False, lambda s: s.score),
    ("anomalyd_stream_threshold", False, lambda s: s.threshold),
    ("anomalyd_stream_anomaly", False, lambda s: float(s.event_open)),
    ("anomalyd_stream_healthy", False, lambda s: float(s.source == "ok" and not s.lagging)),
    ("anomalyd_stream_lag_seconds", False, lambda s: s.lag_seconds),
    ("anomalyd_stream_muted", False, lambda s: float(s.muted_until is not None)),
    ("anomalyd_stream_muted_until_timestamp_seconds", False,
     lambda s: s.muted_until.timestamp() if s.muted_until is not None else None),
    ("anomalyd_stream_windows_scored_total", True, lambda s: s.windows_scored),
    ("anomalyd_stream_windows_silent_total", True, lambda s: s.windows_silent),
    ("anomalyd_stream_events_total", True, lambda s: s.events_total),
)  # fmt: skip
# Daemon-wide metrics read from NodeState.
PER_NODE: tuple[tuple[str, bool, Callable[[NodeState], float | None]], ...] = (
    ("anomalyd_windows_scored_total", True, lambda n: n.windows_scored),
    ("anomalyd_audio_blocks_dropped_total", True, lambda n: n.blocks_dropped),
    ("anomalyd_workers", False, lambda n: n.workers),
    ("anomalyd_mqtt_connected", False, lambda n: None if n.mqtt is None else float(n.mqtt == "connected")),
    ("anomalyd_store_degraded", False, lambda n: float(n.storage.state != "ok")),
    ("anomalyd_store_write_errors_total", True, lambda n: n.store_write_failures),
    ("anomalyd_store_rows_pending", False, lambda n: n.storage.rows_pending),
    ("anomalyd_store_rows_dropped_total", True, lambda n: n.storage.rows_dropped),
    ("anomalyd_store_clips_skipped_total", True, lambda n: n.storage.clips_skipped),
    ("anomalyd_healthy", False, lambda n: float(not n.stalled and not n.stopping)),
)  # fmt: skip


def _family(
    name: str, counter: bool, labels: tuple[str, ...] = ()
) -> GaugeMetricFamily | CounterMetricFamily:
    if counter:  # the client adds `_total` itself
        return CounterMetricFamily(name.removesuffix("_total"), HELP[name], labels=list(labels))
    return GaugeMetricFamily(name, HELP[name], labels=list(labels))


class DaemonCollector(Collector):
    def __init__(self, view: DaemonView) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        state = self._view.state()
        build = InfoMetricFamily("anomalyd_build", HELP["anomalyd_build_info"])
        build.add_metric([], {"version": __version__, "python": platform.python_version(),
                              "onnxruntime": onnxruntime.__version__})  # fmt: skip
        yield build
        info = InfoMetricFamily("anomalyd_stream", HELP["anomalyd_stream_info"], labels=list(_STREAM))
        source = GaugeMetricFamily(
            "anomalyd_stream_source_state", HELP["anomalyd_stream_source_state"], labels=["stream", "state"]
        )
        for s in state.streams:
            info.add_metric([s.name], {"area": s.area, "model_id": s.model_id})
            for level in SOURCE_STATES:
                source.add_metric([s.name, level], float(s.source == level))
        yield from (info, source)
        for name, counter, read in PER_STREAM:
            family = _family(name, counter, _STREAM)
            for s in state.streams:
                value = read(s)
                if value is not None:
                    family.add_metric([s.name], value)
            yield family
        for name, counter, read_node in PER_NODE:
            value = read_node(state)
            if value is not None:
                family = _family(name, counter)
                family.add_metric([], value)
                yield family
        if state.window_latency is not None:
            latency = GaugeMetricFamily(
                "anomalyd_window_latency_seconds",
                HELP["anomalyd_window_latency_seconds"],
                labels=["quantile"],
            )
            for quantile, seconds in zip(("0.5", "0.99"), state.window_latency, strict=True):
                latency.add_metric([quantile], seconds)
            yield latency
        if state.mqtt is not None:
            backlog = _family("anomalyd_outbox_backlog_messages", False)
            backlog.add_metric([], self._view.outbox_backlog())
            yield backlog


def registry_for(view: DaemonView) -> CollectorRegistry:
    """The daemon's metrics plus the process's own (memory, CPU, open files) and Python's."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(view))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry
