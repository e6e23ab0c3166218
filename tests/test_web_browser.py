"""The dashboard in a real browser (Debian's headless Chromium, driven by Playwright) against a real daemon
replaying a fault: the tile's score crosses the threshold and the event appears without a reload, the
event page plays its clip and shows its spectrogram, mute works with the token and is refused without
it, marking a false alarm works. Screenshots go to test-artifacts/ (or $ANOMALYD_TEST_ARTIFACTS).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import ROOT
from tests.daemon_helpers import DaemonProcess, write_recording
from tests.web_helpers import Client, WebSetup, web_config

pytestmark = pytest.mark.slow

ARTIFACTS = Path(os.environ.get("ANOMALYD_TEST_ARTIFACTS", ROOT / "test-artifacts"))
FAULT = (8.0, 17.0)  # seconds of fan-1's recording with a bearing fault
WAIT_MS = 45_000


@pytest.fixture(scope="module")
def served(
    bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WebSetup, DaemonProcess]]:
    """Three machines, one of which develops a bearing fault 8 s in."""
    folder = tmp_path_factory.mktemp("browser")
    streams: dict[str, dict[str, object]] = {
        "fan-1": {"path": write_recording(folder / "fan-1.wav", "bearing", 60.0, *FAULT), "area": "Hall 2"},
        "fan-2": {"path": write_recording(folder / "fan-2.wav", "normal", 60.0, index=5), "area": "Hall 2"},
        "fan-3": {"path": write_recording(folder / "fan-3.wav", "normal", 60.0, index=6), "area": "Hall 3"},
    }
    for spec in streams.values():
        spec.update(realtime=True, loop=True)
    setup = web_config(folder, bundle_dir, streams)
    with DaemonProcess(setup.config) as daemon:
        daemon.wait_log("dashboard on http://127.0.0.1")
        yield setup, daemon
        daemon.stop()


def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def _wait_js(page: Page, expression: str, timeout_s: float = WAIT_MS / 1000) -> None:
    """Poll a JavaScript expression until it is true (the page's CSP forbids the eval that Playwright's
    own wait_for_function uses; evaluate is fine)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        page.wait_for_timeout(100)


def _number(page: Page, selector: str) -> float:
    return float(page.locator(selector).inner_text())


def test_the_dashboard_follows_a_fault_live_and_its_event_page_plays_the_clip(
    served: tuple[WebSetup, DaemonProcess], page: Page
) -> None:
    setup, daemon = served
    client = setup.client()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(setup.base + "/")
    tile = page.locator('.tile[data-stream="fan-1"]')
    expect(tile).to_be_visible()
    expect(page.locator(".tile")).to_have_count(3)
    expect(page.locator("#live-status")).to_have_text("live")
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads

    # The score crosses the threshold on the tile, pushed live.
    expect(tile).to_have_attribute("data-over", "true", timeout=WAIT_MS)
    assert _number(page, '.tile[data-stream="fan-1"] .tile-score') > _number(
        page, '.tile[data-stream="fan-1"] .tile-threshold'
    )
    expect(tile).to_have_attribute("data-state", "anomaly", timeout=WAIT_MS)
    expect(page.locator('.tile[data-stream="fan-2"]')).to_have_attribute("data-state", "ok")
    # The event appears in the list without a reload.
    row = page.locator('tr.event-row[data-state="open"]')
    expect(row).to_have_count(1, timeout=WAIT_MS)
    assert (
        int(page.locator('.tile[data-stream="fan-1"] canvas.tile-chart').get_attribute("data-points") or 0)
        > 10
    )
    assert page.evaluate(
        "window.__sameDocument === true && performance.getEntriesByType('navigation').length === 1"
    )
    _shot(page, "dashboard.png")

    # Once the event has ended and its clip is written, the row says so, still without a reload.
    event_id = row.get_attribute("data-event-id")
    assert event_id
    daemon.wait_for(lambda: client.get_json(f"/api/events/{event_id}")["clip"] is not None, 40.0, "the clip")
    expect(page.locator(f'tr.event-row[data-event-id="{event_id}"]')).to_have_attribute(
        "data-state", "closed", timeout=WAIT_MS
    )
    assert page.evaluate("window.__sameDocument === true")

    # The event page: facts, scores, spectrogram, and the clip, which plays.
    page.locator(f'tr.event-row[data-event-id="{event_id}"] a', has_text="view").click()
    page.wait_for_url(f"**/events/{event_id}")
    expect(page.locator("#ev-stream")).to_have_text("fan-1")
    expect(page.locator("#ev-state")).to_contain_text("closed")
    clip = client.get_json(f"/api/events/{event_id}")["clip"]
    _wait_js(page, "document.getElementById('ev-audio').readyState >= 1")
    duration = page.evaluate("document.getElementById('ev-audio').duration")
    assert duration == pytest.approx(clip["seconds"], abs=0.05)
    _wait_js(
        page,
        "document.getElementById('ev-spectrogram').complete && document.getElementById('ev-spectrogram').naturalWidth > 100",
    )
    assert page.evaluate("document.getElementById('ev-spectrogram').naturalHeight") == 256
    assert int(page.locator("#ev-scores").get_attribute("data-points") or 0) > 10
    page.evaluate("document.getElementById('ev-audio').play()")
    _wait_js(page, "document.getElementById('ev-audio').currentTime > 0.5")
    _shot(page, "event.png")

    # Mute: refused without the token, done with it; the dashboard shows it.
    page.locator("#ev-mute-button").click()
    expect(page.locator("#action-status")).to_contain_text("token missing or wrong")
    assert client.get_json("/api/streams/fan-1")["muted_until"] is None
    assert setup.token is not None
    page.fill("#token-input", setup.token)
    page.locator("#token-form button[type=submit]").click()
    page.locator("#ev-mute-button").click()
    expect(page.locator("#action-status")).not_to_contain_text("refused")
    daemon.wait_for(
        lambda: client.get_json("/api/streams/fan-1")["muted_until"] is not None, 10.0, "the mute"
    )
    assert setup.token not in page.url

    # Mark the event a false alarm, with a note.
    page.fill("#mark-note", "bearing test rig, not a fault")
    page.locator("#mark-button").click()
    daemon.wait_for(
        lambda: client.get_json(f"/api/events/{event_id}")["marked_normal_at"] is not None, 10.0, "the mark"
    )
    expect(page.locator("#ev-marked")).to_contain_text("bearing test rig")

    page.goto(setup.base + "/")
    expect(page.locator('.tile[data-stream="fan-1"] .tile-muted')).to_contain_text("muted until")
    page.goto(setup.base + "/streams/fan-1")
    expect(page.locator("#st-bundle")).to_contain_text(client.get_json("/api/streams/fan-1")["model_id"])
    _shot(page, "stream.png")
    assert not errors, errors


def test_writes_from_another_site_are_refused_even_with_the_token(
    served: tuple[WebSetup, DaemonProcess], page: Page
) -> None:
    """A page on another origin that knows the token still cannot mute: no CORS, and the browser marks
    its request cross-site."""
    setup, _ = served
    page.goto("about:blank")
    page.set_content("<p>another site</p>")
    result = page.evaluate(
        """async ([url, token]) => {
            try {
                const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json",
                    "Authorization": "Bearer " + token}, body: JSON.stringify({seconds: 60})});
                return "status " + r.status;
            } catch (e) { return "blocked"; }
        }""",
        [setup.base + "/api/streams/fan-2/mute", setup.token],
    )
    assert result == "blocked"  # the preflight finds no CORS permission: the request never runs
    time.sleep(0.5)
    assert Client(setup.base).get_json("/api/streams/fan-2")["muted_until"] is None


def test_an_open_page_tells_the_truth_across_a_crash(bundle_dir: Path, tmp_path: Path, page: Page) -> None:
    """SIGKILL mid-event: the page says it lost the daemon; once the daemon is back, without a reload,
    the machine is no longer shown in anomaly and the event is listed closed, 'interrupted'."""
    recording = write_recording(tmp_path / "fan.wav", "bearing", 60.0, 3.0)
    setup = web_config(tmp_path, bundle_dir, {"fan-1": {"path": recording, "realtime": True}})
    with DaemonProcess(setup.config) as daemon:
        daemon.wait_log("dashboard on")
        page.goto(setup.base + "/")
        tile = page.locator('.tile[data-stream="fan-1"]')
        expect(tile).to_have_attribute("data-state", "anomaly", timeout=WAIT_MS)
        expect(page.locator('tr.event-row[data-state="open"]')).to_have_count(1, timeout=WAIT_MS)
        page.evaluate("window.__sameDocument = true")
        daemon.signal(signal.SIGKILL)
        daemon.wait_exit(10)
    expect(page.locator("#live-status")).to_have_text("reconnecting…", timeout=WAIT_MS)
    write_recording(recording, "normal", 60.0)  # the machine is healthy again when the daemon returns
    with DaemonProcess(setup.config) as daemon:
        daemon.wait_log("closed 1 event(s) left open by an earlier run")
        expect(page.locator("#live-status")).to_have_text("live", timeout=WAIT_MS)
        expect(tile).to_have_attribute("data-state", "ok", timeout=WAIT_MS)
        row = page.locator("tr.event-row")
        expect(row).to_have_count(1)
        expect(row).to_have_attribute("data-state", "closed", timeout=WAIT_MS)
        expect(row).to_contain_text("interrupted")
        assert page.evaluate("window.__sameDocument === true")
        _shot(page, "after-crash.png")
        daemon.stop()
