"""`anomalyd calibrate`: k for a false-alarm budget, through the daemon's own windows and detector."""

from __future__ import annotations

import json
import math
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from anomalyd import cli
from anomalyd.bundle import load_bundle
from anomalyd.calibrate import hours_to_demonstrate, poisson_upper, replay_sources
from anomalyd.config import DetectorConfig, HealthConfig
from anomalyd.errors import BundleError
from fixtures import synth
from tests.bundle_helpers import edit_meta
from tests.conftest import ROOT
from tests.daemon_helpers import DaemonProcess, write_config, write_recording
from tests.mqtt_helpers import PASSWORD, USER, Broker, Subscriber

ANOMALYD = [sys.executable, "-m", "anomalyd"]
CALIBRATION_KEYS = {
    "k", "false_alarms_per_day", "normal_seconds", "events", "events_per_day", "events_per_day_upper95",
    "detector", "anomaly", "calibrated_at", "normal_sources", "anomaly_sources",
}  # fmt: skip


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=300, check=False, cwd=ROOT
    )


def score_lines(stdout: str) -> dict[str, tuple[float, float, str, str]]:
    """`anomalyd score` output: name -> (clip score, window threshold, event description, verdict)."""
    rows = {}
    for line in stdout.splitlines():
        path, score, threshold, event, verdict = line.split("\t")
        rows[Path(path).name] = (float(score.split("=")[1]), float(threshold.split("=")[1]), event, verdict)
    return rows


def test_poisson_upper_bound_and_hours_needed() -> None:
    # Textbook one-sided 95 % upper limits of a Poisson mean for 0, 1 and 10 observed events.
    assert poisson_upper(0) == pytest.approx(-math.log(0.05), rel=1e-6)
    assert poisson_upper(1) == pytest.approx(4.7439, abs=1e-3)  # chi2.ppf(0.95, 2 (c + 1)) / 2
    assert poisson_upper(10) == pytest.approx(16.9622, abs=1e-3)
    assert hours_to_demonstrate(1.0) == pytest.approx(71.9, abs=0.05)


@pytest.mark.slow
def test_calibration_keeps_its_budget_on_fresh_normal_audio(bundle_dir: Path, tmp_path: Path) -> None:
    """Calibrate on 5 minutes of one machine's normal audio (and some faults); fresh normal audio of the
    same machine (other runs, another seed) then raises no more events than the rate calibration vouches
    for: 5 minutes without an event bound it below 862.8 a day (95 %), not to 1 a day."""
    synth.write_dataset(tmp_path / "calib", n_normal=30, per_fault=2, seconds=10.0, seed=2)
    synth.write_dataset(tmp_path / "fresh", n_normal=20, per_fault=0, seconds=10.0, seed=3)
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    normal, anomaly = tmp_path / "calib" / "normal", tmp_path / "calib" / "anomaly"

    result = run(*ANOMALYD, "calibrate", "--bundle", bundle, "--normal", normal, "--anomaly", anomaly,
                 "--false-alarms-per-day", "1")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<- chosen" in result.stdout
    assert "71.9 h of normal audio without an event" in result.stdout  # 5 minutes cannot show 1/day

    meta = json.loads((bundle / "model.json").read_text())
    calibration = meta["threshold"]["calibration"]
    assert set(calibration) == CALIBRATION_KEYS
    assert meta["threshold"]["k"] == calibration["k"]
    assert calibration["events"] == 0
    assert calibration["normal_seconds"] == pytest.approx(300.0)
    assert calibration["events_per_day_upper95"] == pytest.approx(-math.log(0.05) / 300 * 86_400, rel=1e-4)
    assert calibration["detector"] == {"n": 3, "m": 5, "hold_off_windows": 4, "cooldown_seconds": 30.0}
    assert calibration["anomaly"]["files"] == 6
    assert calibration["anomaly"]["detection_rate"] > 0
    assert f"detection: {calibration['anomaly']['detected']} of 6 anomalous files" in result.stdout
    loaded = load_bundle(bundle)  # checksums still valid, schema accepts it
    assert loaded.meta.threshold.calibration == calibration
    k = loaded.meta.threshold.k

    # The smallest such k: one step lower, the same replay raises an event on the calibration audio.
    replayer, _, _ = replay_sources(
        loaded, [normal], [], detector=DetectorConfig(), silence_dbfs=HealthConfig().silence_dbfs
    )
    assert replayer.at_k(k).events == 0
    assert k == 0 or replayer.at_k(k - 0.001).events > 0

    fresh = sorted((tmp_path / "fresh" / "normal").glob("*.wav"))
    result = run(*ANOMALYD, "score", "--bundle", bundle, *fresh)
    assert result.returncode in (0, 1), result.stdout + result.stderr
    rows = score_lines(result.stdout)
    events = sum(event != "no event" for _, _, event, _ in rows.values())
    # Each fresh file is a stream of its own, so it raises at most one event (cooldown 30 s > 10 s).
    at_bound = calibration["events_per_day_upper95"] * 10.0 * len(fresh) / 86_400
    at_least = 1 - sum(math.exp(-at_bound) * at_bound**i / math.factorial(i) for i in range(events))
    assert at_least >= 0.05, (events, at_bound, result.stdout)  # P(>= events | rate at the bound)
    assert events <= len(fresh) // 4, result.stdout
    window_threshold = loaded.meta.threshold.window_scores.threshold(k)
    assert all(t == pytest.approx(window_threshold, abs=1e-5) for _, t, _, _ in rows.values())

    # The evidence is validated like every other field.
    edit_meta(bundle, lambda m: m["threshold"]["calibration"].update(events=-1))
    with pytest.raises(BundleError, match=r"threshold\.calibration\.events = -1: Input should be greater"):
        load_bundle(bundle)
    edit_meta(bundle, lambda m: m["threshold"]["calibration"].update(events=0))
    load_bundle(bundle)

    # k edited by hand no longer matches its evidence: refused, not silently trusted.
    def edit_k(meta: dict[str, Any]) -> None:
        t = meta["threshold"]
        t.update(k=5.0, value=t["mean"] + 5 * t["std"])

    edit_meta(bundle, edit_k)
    with pytest.raises(BundleError, match="is not the calibrated k"):
        load_bundle(bundle)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: ["--false-alarms-per-day", "0"], "--false-alarms-per-day '0': a budget is a number"),
        (lambda d: ["--false-alarms-per-day", "-1"], "--false-alarms-per-day '-1': a budget"),
        (lambda d: ["--false-alarms-per-day", "nan"], "--false-alarms-per-day 'nan': a budget"),
        (lambda d: ["--false-alarms-per-day", "1", "--normal", d / "empty"], "no WAV or FLAC files"),
        (lambda d: ["--false-alarms-per-day", "1", "--normal", d / "nowhere"], "no such file or folder"),
        (
            lambda d: ["--false-alarms-per-day", "1", "--normal", d / "short.wav"],
            "the detector looks at m = 5",
        ),
    ],
    ids=["zero", "negative", "nan", "empty-folder", "missing", "too-little-audio"],
)
def test_calibrate_refuses_bad_input_in_one_line(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], make: object, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    # 4 s: 4 windows, one fewer than the detector's m.
    sf.write(tmp_path / "short.wav", synth.render("normal", seed=2, index=0, seconds=4.0), synth.SAMPLE_RATE)
    options = make(tmp_path)  # type: ignore[operator]
    if "--normal" not in options:
        options += ["--normal", str(tmp_path / "short.wav")]
    before = (bundle_dir / "model.json").read_bytes()
    assert cli.main(["calibrate", "--bundle", str(bundle_dir), *map(str, options)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("anomalyd: error: ")
    assert message in err
    assert (bundle_dir / "model.json").read_bytes() == before


@pytest.mark.slow
def test_score_gives_the_verdict_of_a_real_daemon_on_the_same_file(bundle_dir: Path, tmp_path: Path) -> None:
    fault = write_recording(tmp_path / "fault.wav", "imbalance", 20.0, onset=6.0, until=13.0)
    normal = write_recording(tmp_path / "normal.wav", "normal", 20.0)
    config = write_config(
        tmp_path / "d.toml", bundle_dir, {"fault": {"path": fault}, "quiet": {"path": normal}}
    )
    daemon = DaemonProcess(config)
    assert daemon.wait_exit(60) == 0, daemon.log  # replayed files: it stops by itself
    conn = sqlite3.connect(tmp_path / "events.db")
    try:
        starts = dict(conn.execute("SELECT stream, MIN(start_sample) FROM events GROUP BY stream").fetchall())
    finally:
        conn.close()

    result = run(*ANOMALYD, "score", "--bundle", bundle_dir, fault, normal)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = score_lines(result.stdout)
    assert "quiet" not in starts
    assert rows["normal.wav"][2:] == ("no event", "normal")
    assert rows["fault.wav"][2:] == (f"event at {starts['fault'] / synth.SAMPLE_RATE:.2f} s", "ANOMALY")
    # The event starts at its earliest window over the threshold: one that reaches into the fault (6 s).
    assert 6.0 - 2.1 < starts["fault"] / synth.SAMPLE_RATE < 8.0


@pytest.mark.slow
def test_a_running_daemon_takes_the_calibrated_k_on_sighup(
    bundle_dir: Path, tmp_path: Path, broker: Broker
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    stats = load_bundle(bundle).meta.threshold.window_scores
    recording = write_recording(tmp_path / "fan.wav", "normal", 20.0)
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    mqtt = (f'node = "edge1"\n[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\n'
            f'username = "{USER}"\npassword_file = "pw"\nscore_interval_seconds = 0.2\n')  # fmt: skip
    config = write_config(
        tmp_path / "d.toml", bundle, {"fan": {"path": recording, "realtime": True, "loop": True}}, mqtt
    )
    watcher = Subscriber(broker, "anomalyd/edge1/fan/score")
    daemon = DaemonProcess(config)
    try:
        watcher.wait_for("/score", 1, timeout=30)
        assert json.loads(watcher.on("/score")[-1].payload)["threshold"] == pytest.approx(
            stats.threshold(3.0)
        )

        synth.write_dataset(tmp_path / "calib", n_normal=10, per_fault=0, seconds=10.0, seed=2)
        result = run(*ANOMALYD, "calibrate", "--bundle", bundle, "--normal", tmp_path / "calib" / "normal",
                     "--false-alarms-per-day", "10", "--config", config)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        k = load_bundle(bundle).meta.threshold.k
        assert k != 3.0
        daemon.signal(signal.SIGHUP)
        daemon.wait_log("restarted fan")
        expected = stats.threshold(k)

        def new_threshold() -> bool:
            return any(
                json.loads(m.payload)["threshold"] == pytest.approx(expected) for m in watcher.on("/score")
            )

        daemon.wait_for(new_threshold, 30, f"a score message with threshold {expected}")
        assert "Traceback" not in daemon.log
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(10) == 0, daemon.log
    finally:
        watcher.close()
        if daemon.process.poll() is None:
            daemon.process.kill()


def test_uncalibrated_bundles_keep_k_3(bundle_dir: Path) -> None:
    meta = json.loads((bundle_dir / "model.json").read_text())
    assert "calibration" not in meta["threshold"]
    threshold = load_bundle(bundle_dir).meta.threshold
    assert (threshold.k, threshold.calibration) == (3.0, None)
    assert np.isfinite(threshold.window_scores.threshold(threshold.k))
