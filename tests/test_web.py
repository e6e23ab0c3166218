"""The dashboard's server, /metrics and /healthz, against a real daemon process replaying a fault.

One daemon serves the read-only tests of this module (a bearing fault from 5 s to 13 s of a looped
recording); tests that change state or need another config run their own.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from anomalyd.bundle import load_bundle
from anomalyd.web.metrics import METRICS
from tests.conftest import ROOT
from tests.daemon_helpers import DaemonProcess, write_recording
from tests.mqtt_helpers import Broker, daemon_mqtt
from tests.web_helpers import Client, WebSetup, web_config

pytestmark = pytest.mark.slow

FAULT = (5.0, 13.0)  # seconds of the recording with a bearing fault


@pytest.fixture(scope="module")
def served(
    bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WebSetup, DaemonProcess]]:
    folder = tmp_path_factory.mktemp("web")
    recording = write_recording(folder / "fan.wav", "bearing", 40.0, *FAULT)
    setup = web_config(folder, bundle_dir, {"fan": {"path": recording, "realtime": True, "loop": True,
                                                    "area": "Hall 2", "cooldown_seconds": 2.0}})  # fmt: skip
    with DaemonProcess(setup.config) as daemon:
        daemon.wait_log("dashboard on http://127.0.0.1")
        client = setup.client()
        daemon.wait_for(lambda: _closed_with_clip(client), 40.0, "the fault's event, closed, with its clip")
        yield setup, daemon
        daemon.stop()


def _closed_with_clip(client: Client) -> bool:
    events = client.get_json("/api/events?state=closed")["events"]
    return bool(events) and events[-1]["has_clip"]


def _metrics(client: Client) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}}, parsed by the Prometheus client's own parser."""
    answer = client.get("/metrics")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/plain; version=")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_parse_and_tell_the_streams_state(
    served: tuple[WebSetup, DaemonProcess], bundle_dir: Path
) -> None:
    setup, _ = served
    client = setup.client()
    metrics = _metrics(client)
    without_mqtt = {"anomalyd_mqtt_connected", "anomalyd_outbox_backlog_messages"}
    muted_only = {"anomalyd_stream_muted_until_timestamp_seconds"}
    for name, _ in METRICS:
        if name not in without_mqtt | muted_only:
            assert name in metrics, f"{name} missing from /metrics"
    assert not without_mqtt & set(metrics), "MQTT metrics without MQTT"
    fan = (("stream", "fan"),)
    meta = load_bundle(bundle_dir).meta
    assert metrics["anomalyd_stream_threshold"][fan] == pytest.approx(
        meta.threshold.window_scores.threshold(meta.threshold.k)
    )
    assert metrics["anomalyd_stream_events_total"][fan] >= 1
    assert metrics["anomalyd_stream_windows_scored_total"][fan] > 20
    assert metrics["anomalyd_stream_source_state"][(("state", "ok"), ("stream", "fan"))] == 1
    assert sum(v for k, v in metrics["anomalyd_stream_source_state"].items() if ("stream", "fan") in k) == 1
    assert (
        metrics["anomalyd_stream_info"][(("area", "Hall 2"), ("model_id", meta.model_id), ("stream", "fan"))]
        == 1
    )
    assert metrics["anomalyd_healthy"][()] == 1
    assert metrics["anomalyd_workers"][()] == 1
    latency = metrics["anomalyd_window_latency_seconds"]
    assert 0 < latency[(("quantile", "0.5"),)] <= latency[(("quantile", "0.99"),)] < 5.0
    assert metrics["anomalyd_store_degraded"][()] == 0
    assert metrics["anomalyd_build_info"]
    assert metrics["process_resident_memory_bytes"][()] > 10e6
    overview = client.get_json("/api/overview")
    assert metrics["anomalyd_stream_score"][fan] > 0
    assert overview["streams"][0]["threshold"] == pytest.approx(
        metrics["anomalyd_stream_threshold"][fan], rel=1e-5
    )


def test_the_anomaly_gauge_follows_the_fault(served: tuple[WebSetup, DaemonProcess]) -> None:
    """During the looped recording's next fault the stream's anomaly gauge is 1 and its score over the
    threshold; once the fault has passed, 0 again."""
    setup, daemon = served
    client = setup.client()
    fan = (("stream", "fan"),)
    seen = []

    def anomaly_seen() -> bool:
        m = _metrics(client)
        seen.append(
            (
                m["anomalyd_stream_anomaly"][fan],
                m["anomalyd_stream_score"][fan],
                m["anomalyd_stream_threshold"][fan],
            )
        )
        return seen[-1][0] == 1

    daemon.wait_for(anomaly_seen, 45.0, "anomalyd_stream_anomaly 1")
    assert any(score > threshold for _, score, threshold in seen)
    daemon.wait_for(lambda: _metrics(client)["anomalyd_stream_anomaly"][fan] == 0, 30.0, "the event's end")


def test_healthz_is_json_and_ok(served: tuple[WebSetup, DaemonProcess]) -> None:
    setup, _ = served
    answer = setup.client().get("/healthz")
    assert answer.status == 200
    body = answer.json()
    assert body["status"] == "ok"
    assert body["stalled"] == []
    assert body["streams"] == 1
    assert body["storage"] == "ok"
    assert body["mqtt"] is None


def test_overview_has_history_and_the_tile_facts(
    served: tuple[WebSetup, DaemonProcess], bundle_dir: Path
) -> None:
    setup, _ = served
    overview = setup.client().get_json("/api/overview")
    assert overview["writes"] is True
    assert overview["history_seconds"] == 600
    (fan,) = overview["streams"]
    assert fan["name"] == "fan"
    assert fan["area"] == "Hall 2"
    assert fan["source"] == "ok"
    assert fan["model_id"] == load_bundle(bundle_dir).meta.model_id
    times = [t for t, _ in fan["scores"]]
    assert len(times) > 20
    assert times == sorted(times)
    assert time.time() - 5 < times[-1] <= time.time() + 1  # window ends in real (Unix) time
    assert max(s for _, s in fan["scores"]) > fan["threshold"]  # the fault is in the history


def test_live_stream_pushes_only_new_scores(served: tuple[WebSetup, DaemonProcess]) -> None:
    setup, _ = served

    messages = []
    with urllib.request.urlopen(setup.base + "/api/live", timeout=10) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        while len(messages) < 3:
            line = resp.readline().decode()
            if line.startswith("data: "):
                messages.append(json.loads(line[6:]))
    first, second, third = (m["streams"][0]["scores"] for m in messages)
    assert len(first) > 20  # the whole history first
    assert 0 < len(second) + len(third) < 10  # then about two windows a second
    assert all(t > first[-1][0] for t, _ in second + third)


def test_events_list_filters_and_csv(served: tuple[WebSetup, DaemonProcess]) -> None:
    setup, _daemon = served
    client = setup.client()
    listed = client.get_json("/api/events")
    assert listed["total"] >= 1
    event = listed["events"][-1]
    assert event["stream"] == "fan"
    assert event["state"] == "closed"
    assert event["has_clip"]
    assert event["duration_seconds"] == pytest.approx(FAULT[1] - FAULT[0], abs=4.0)
    assert event["clip"].endswith(".wav")
    assert "/" not in event["clip"]
    assert client.get_json("/api/events?stream=nope")["total"] == 0
    assert client.get_json("/api/events?marked=yes")["total"] == 0
    assert client.get_json("/api/events?since=1h&state=closed")["total"] >= 1
    assert client.get_json("/api/events?since=2000-01-01T00:00:00&limit=1")["events"][0]["event_id"]
    for bad, named in (
        ("state=shut", "state"),
        ("limit=0", "limit"),
        ("since=yesterday", "since"),
        ("colour=red", "colour"),
    ):
        answer = client.get(f"/api/events?{bad}")
        assert answer.status == 400, bad
        error = answer.json()["error"]
        assert named in error
        assert "\n" not in error
    exported = client.get("/api/events.csv?state=closed")
    assert exported.headers["content-type"].startswith("text/csv")
    assert "attachment" in exported.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(exported.body.decode())))
    assert rows
    assert rows[0]["event_id"] == event["event_id"]
    cli = subprocess.run([sys.executable, "-m", "anomalyd", "events", "--config", str(setup.config), "--format", "csv"],
                         capture_output=True, text=True, cwd=ROOT, check=True)  # fmt: skip
    assert (
        exported.body.decode().splitlines()[0] == cli.stdout.splitlines()[0]
    )  # the same columns as the CLI's


def test_event_page_data_clip_and_spectrogram(served: tuple[WebSetup, DaemonProcess]) -> None:
    setup, _ = served
    client = setup.client()
    event_id = client.get_json("/api/events?state=closed")["events"][-1]["event_id"]
    event = client.get_json(f"/api/events/{event_id[:8]}")  # a prefix is enough, as on the CLI
    assert event["event_id"] == event_id
    offsets = [t for t, _ in event["scores"]]
    assert offsets[0] < 0 < offsets[-1]
    assert offsets == sorted(offsets)
    assert max(s for _, s in event["scores"]) == pytest.approx(event["peak_score"], rel=1e-4)
    clip = event["clip"]
    assert clip["event_offset_seconds"] == pytest.approx(3.0, abs=0.01)  # the pre-roll
    wav = client.get(clip["url"])
    assert wav.status == 200
    assert wav.headers["content-type"] == "audio/wav"
    samples, rate = sf.read(io.BytesIO(wav.body))
    assert clip["seconds"] == pytest.approx(len(samples) / rate, abs=1e-3)
    assert clip["seconds"] == pytest.approx(event["duration_seconds"] + 6.0, abs=0.1)  # pre- and post-roll
    part = client.get(clip["url"], Range="bytes=0-99")  # the audio element seeks with ranges
    assert part.status == 206
    assert len(part.body) == 100
    png = client.get(event["spectrogram_url"])
    assert png.status == 200
    assert png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.body))
    assert image.height == 2 * 128
    assert image.width > 100
    by_name = client.get(f"/clips/{clip['file']}")  # where [storage.clips] base_url points
    assert by_name.status == 200
    assert by_name.body == wav.body


def test_stream_details_show_bundle_and_calibration(
    served: tuple[WebSetup, DaemonProcess], bundle_dir: Path
) -> None:
    setup, _ = served
    client = setup.client()
    details = client.get_json("/api/streams/fan")
    assert details["bundle"]["model_id"] == load_bundle(bundle_dir).meta.model_id
    assert "calibration" in details["bundle"]
    assert details["detector"]["n"] == 3
    assert details["source_config"]["type"] == "file"
    assert details["mute_minutes"] == 60
    assert client.get("/api/streams/nope").status == 404
    assert client.get("/streams/fan").headers["content-type"].startswith("text/html")


@pytest.mark.parametrize(
    "path",
    [
        "/clips/..%2f..%2fd.toml", "/clips/../d.toml", "/clips/%2e%2e/web-token", "/static/../app.py",
        "/static/%2e%2e/app.py", "/clips/fan-20260101T000000-0123abcd.wav", "/api/events/../../web-token",
        "/api/events/zzzzzzzz/clip.wav", "/clips/web-token",
    ],
)  # fmt: skip
def test_nothing_outside_the_clip_and_static_folders_is_served(
    served: tuple[WebSetup, DaemonProcess], path: str
) -> None:
    setup, _ = served
    answer = setup.client().get(path)
    assert answer.status in (400, 404), (path, answer.status)
    assert setup.token is not None
    assert setup.token.encode() not in answer.body


def test_answers_carry_security_headers(served: tuple[WebSetup, DaemonProcess]) -> None:
    setup, _ = served
    for path in ("/", "/api/overview", "/metrics"):
        headers = setup.client().get(path).headers
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "access-control-allow-origin" not in headers  # no CORS: other sites cannot read or write


def test_writes_need_the_token_and_refuse_cross_site(served: tuple[WebSetup, DaemonProcess]) -> None:
    setup, daemon = served
    client = setup.client()
    assert setup.token is not None
    cases = [
        ({}, None, 401),
        ({}, "wrong-token-wrong-token", 401),
        ({"sec-fetch-site": "cross-site"}, setup.token, 403),
        ({"sec-fetch-site": "same-site"}, setup.token, 403),
        ({"origin": "http://evil.example"}, setup.token, 403),
        ({"content-type": "text/plain"}, setup.token, 415),
        ({"content-type": "application/x-www-form-urlencoded"}, setup.token, 415),
    ]
    for headers, token, status in cases:
        answer = client.post("/api/streams/fan/mute", {"seconds": 60}, token, **headers)
        assert answer.status == status, (headers, answer.body)
        assert answer.json()["ok"] is False
    assert client.get_json("/api/overview")["streams"][0]["muted_until"] is None  # none of them muted
    assert client.request("/api/streams/fan/mute").status == 405  # never by GET
    big = client.request("/api/streams/fan/mute", "POST", b'{"seconds": 1' + b" " * 5000 + b"}",
                         {"content-type": "application/json", "authorization": f"Bearer {setup.token}"})  # fmt: skip
    assert big.status == 413
    for payload in ({"seconds": "60"}, {"seconds": -1}, {"seconds": 1e9}, {"seconds": True}, [60]):
        assert client.post("/api/streams/fan/mute", payload, setup.token).status == 400, payload
    assert client.post("/api/streams/nope/mute", {"seconds": 60}, setup.token).status == 404
    assert setup.token not in daemon.log
    assert "token missing or wrong" in daemon.log  # refusals are logged, without the token


def test_mute_from_the_dashboard_outlives_a_restart(bundle_dir: Path, tmp_path: Path) -> None:
    """Without MQTT too: the mute is kept in the event log, restored at start and shown again."""
    recording = write_recording(tmp_path / "fan.wav", "normal", 30.0)
    setup = web_config(tmp_path, bundle_dir, {"fan": {"path": recording, "realtime": True, "loop": True}})
    client = setup.client()
    with DaemonProcess(setup.config) as daemon:
        daemon.wait_log("dashboard on")
        answer = client.post("/api/streams/fan/mute", {"seconds": 3600}, setup.token)
        assert answer.status == 200, answer.body
        until = answer.json()["muted_until"]
        assert client.get_json("/api/overview")["streams"][0]["muted_until"] == until
        assert _metrics(client)["anomalyd_stream_muted"][(("stream", "fan"),)] == 1
        daemon.stop()
    with DaemonProcess(setup.config) as daemon:
        daemon.wait_log("dashboard on")
        assert client.get_json("/api/overview")["streams"][0]["muted_until"] == until
        assert client.post("/api/streams/fan/mute", {"seconds": 0}, setup.token).json()["muted_until"] is None
        assert _metrics(client)["anomalyd_stream_muted"][(("stream", "fan"),)] == 0
        daemon.stop()


def test_mark_a_false_alarm_from_the_dashboard(bundle_dir: Path, tmp_path: Path) -> None:
    recording = write_recording(tmp_path / "fan.wav", "bearing", 24.0, 4.0, 11.0)
    setup = web_config(tmp_path, bundle_dir, {"fan": {"path": recording, "realtime": True, "loop": True}})
    client = setup.client()
    with DaemonProcess(setup.config) as daemon:
        daemon.wait_log("dashboard on")
        daemon.wait_for(
            lambda: client.get_json("/api/events?state=open")["total"] == 1, 30.0, "an open event"
        )
        open_id = client.get_json("/api/events?state=open")["events"][0]["event_id"]
        refused = client.post(f"/api/events/{open_id}/mark", {"note": "x"}, setup.token)
        assert refused.status == 409
        assert "still open" in refused.json()["error"]
        daemon.wait_for(lambda: _closed_with_clip(client), 30.0, "the event closed with its clip")
        assert client.post("/api/events/0123456789abcdef/mark", {}, setup.token).status == 404
        assert client.post(f"/api/events/{open_id}/mark", {"note": "belt squeal, known"}).status == 401
        marked = client.post(f"/api/events/{open_id}/mark", {"note": "belt squeal, known"}, setup.token)
        assert marked.status == 200, marked.body
        body = marked.json()
        assert body["already"] is False
        assert body["stream"] == "fan"
        assert (tmp_path / "normal" / "fan" / body["normal_clip"]).is_file()  # joins the normal audio
        again = client.post(f"/api/events/{open_id}/mark", {}, setup.token).json()
        assert again["already"] is True
        listed = client.get_json("/api/events?marked=yes")
        assert [e["event_id"] for e in listed["events"]] == [open_id]
        assert listed["events"][0]["mark_note"] == "belt squeal, known"
        daemon.stop()


def test_without_a_token_the_dashboard_is_read_only(bundle_dir: Path, tmp_path: Path) -> None:
    recording = write_recording(tmp_path / "fan.wav", "normal", 20.0)
    setup = web_config(
        tmp_path, bundle_dir, {"fan": {"path": recording, "realtime": True, "loop": True}}, token=False
    )
    client = setup.client()
    with DaemonProcess(setup.config) as daemon:
        daemon.wait_log("dashboard on")
        assert "dashboard is read-only: no [web] token_file" in daemon.log
        assert client.get_json("/api/overview")["writes"] is False
        answer = client.post("/api/streams/fan/mute", {"seconds": 60}, "any-token-at-all-here")
        assert answer.status == 403
        assert "writes are off" in answer.json()["error"]
        daemon.stop()


@pytest.mark.parametrize(
    ("content", "mode", "says"),
    [("xq7-tiny\n", 0o600, "shorter than 16"), ("xq7 two words, long enough\n", 0o600, "one word"),
     (None, 0o600, "cannot read the token file")],
)  # fmt: skip
def test_an_unusable_token_file_leaves_monitoring_and_reading_on(
    bundle_dir: Path, tmp_path: Path, content: str | None, mode: int, says: str
) -> None:
    recording = write_recording(tmp_path / "fan.wav", "normal", 20.0)
    setup = web_config(tmp_path, bundle_dir, {"fan": {"path": recording, "realtime": True, "loop": True}})
    token_file = tmp_path / "web-token"
    if content is None:
        token_file.unlink()
    else:
        token_file.write_text(content)
        token_file.chmod(mode)
    with DaemonProcess(setup.config) as daemon:
        daemon.wait_log("dashboard on")
        assert says in daemon.log
        if content is not None:
            assert content.strip() not in daemon.log  # never the token, even a bad one
        assert setup.client().get_json("/api/overview")["writes"] is False
        assert setup.client().get("/healthz").status == 200
        daemon.stop()


def test_a_port_in_use_leaves_monitoring_on(bundle_dir: Path, tmp_path: Path) -> None:

    recording = write_recording(tmp_path / "fan.wav", "bearing", 12.0, 3.0, 9.0)
    setup = web_config(tmp_path, bundle_dir, {"fan": {"path": recording, "realtime": False}})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", setup.port))
        taken.listen(1)
        with DaemonProcess(setup.config) as daemon:
            status = daemon.wait_exit(60.0)  # the replay ends and the daemon stops by itself
            assert status == 0, daemon.log
    log = daemon.log
    assert re.search(
        rf"dashboard off \(monitoring goes on\): \[web\] cannot listen on 127\.0\.0\.1 port {setup.port}", log
    )
    assert "anomaly start" in log
    assert "Traceback" not in log


def test_metrics_tell_the_broker_link(bundle_dir: Path, tmp_path: Path, broker: Broker) -> None:
    recording = write_recording(tmp_path / "fan.wav", "normal", 20.0)
    setup = web_config(tmp_path, bundle_dir, {"fan": {"path": recording, "realtime": True, "loop": True}},
                       extra=daemon_mqtt(tmp_path, broker))  # fmt: skip
    client = setup.client()
    with DaemonProcess(setup.config) as daemon:
        daemon.wait_log("MQTT: connected")
        daemon.wait_log("dashboard on")
        daemon.wait_for(lambda: _metrics(client)["anomalyd_mqtt_connected"][()] == 1, 10.0, "connected 1")
        assert _metrics(client)["anomalyd_outbox_backlog_messages"][()] >= 0
        broker.stop()
        daemon.wait_for(lambda: _metrics(client)["anomalyd_mqtt_connected"][()] == 0, 20.0, "connected 0")
        assert client.get_json("/api/overview")["mqtt"] != "connected"
        assert client.get("/healthz").status == 200  # an outage is not a stall, as for the watchdog
        daemon.stop()


def test_the_daemon_imports_no_web_stack_when_the_dashboard_is_off() -> None:
    code = "import sys, anomalyd.service; print(sorted(m for m in ('starlette', 'uvicorn', 'prometheus_client', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert out.stdout.strip() == "[]"


# ---- hostile input: no request may break the server or reach monitoring --------------------------------

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=8,
)


@settings(derandomize=True, deadline=None, database=None, max_examples=250,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(
    kind=st.sampled_from(["events", "event", "clip", "static", "mute", "mark", "stream"]),
    text=TEXT,
    params=st.dictionaries(
        st.sampled_from(["stream", "since", "state", "marked", "limit", "x"]), TEXT, max_size=4
    ),
    body=JSON_VALUE | st.dictionaries(st.sampled_from(["seconds", "note"]), JSON_VALUE, max_size=2),
)
def test_no_request_breaks_the_server(
    served: tuple[WebSetup, DaemonProcess], kind: str, text: str, params: dict[str, str], body: object
) -> None:
    """Seeded: the same 250 requests every run (a few seconds). Every answer is a deliberate one (< 500),
    with the token too; nothing gets muted or marked by accident of parsing."""
    setup, _ = served
    client = setup.client()
    quoted = urllib.parse.quote(text, safe="")
    if kind == "events":
        answer = client.get("/api/events?" + urllib.parse.urlencode(params))
    elif kind == "event":
        answer = client.get(f"/api/events/{quoted}")
    elif kind == "clip":
        answer = client.get(f"/clips/{quoted}")
    elif kind == "static":
        answer = client.get(f"/static/{quoted}")
    elif kind == "stream":
        answer = client.get(f"/api/streams/{quoted}")
    elif kind == "mute":
        answer = client.post(f"/api/streams/{quoted or 'fan'}/mute", body, setup.token)
    else:
        answer = client.post(f"/api/events/{quoted or 'x'}/mark", body, setup.token)
    assert answer.status < 500, (kind, text, params, body, answer.status, answer.body[:200])
    if kind == "mute" and answer.status == 200:
        client.post("/api/streams/fan/mute", {"seconds": 0}, setup.token)  # leave the module's daemon unmuted


def test_after_the_fuzz_the_daemon_still_scores(served: tuple[WebSetup, DaemonProcess]) -> None:
    setup, daemon = served
    client = setup.client()
    before = client.get_json("/api/overview")["streams"][0]["windows_scored"]
    daemon.wait_for(lambda: client.get_json("/api/overview")["streams"][0]["windows_scored"] > before + 4, 10.0,
                    "more windows scored")  # fmt: skip
    assert client.get("/healthz").status == 200
    assert "Traceback" not in daemon.log
    assert client.get_json("/api/events?marked=yes")["total"] == 0
