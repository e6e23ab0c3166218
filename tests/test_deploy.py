"""Deploying a model: `anomalyd bundle info`, and `anomalyd bundle install` + SIGHUP onto a daemon that
runs as another user (as under systemd's DynamicUser), whose next event carries the new model id."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from anomalyd import cli
from anomalyd.bundle import load_bundle
from anomalyd.bundleinfo import NOT_CALIBRATED, describe, format_info
from anomalyd.database import read_events
from tests.bundle_helpers import edit_meta
from tests.conftest import ROOT, SMALL_PRESET
from tests.daemon_helpers import DaemonProcess, write_recording
from training import train

DAEMON_UID = 65534  # nobody: any uid but root's does


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder another user can reach (pytest's own tmp folders are root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="anomalyd-deploy-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def anomalyd(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "anomalyd", *map(str, args)],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip


def test_bundle_info_describes_a_bundle_and_refuses_a_tampered_one(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_id = load_bundle(bundle_dir).meta.model_id
    assert cli.main(["bundle", "info", str(bundle_dir)]) == 0
    text = capsys.readouterr().out
    for expected in (f"model id        {model_id}", "30 file(s) (22 train, 8 validation, 0 skipped)",
                     "16000 Hz", "64 frames (2.048 s)", NOT_CALIBRATED, "trained from scratch", "onnxruntime"):  # fmt: skip
        assert expected in text, text

    assert cli.main(["bundle", "info", "--json", str(bundle_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_id"] == model_id
    assert info["calibration"] is None
    assert info["parent_model_id"] is None
    assert info["threshold"]["k"] == 3.0
    assert info["training"]["files"] == 30

    # Provenance that other tools add to model.json is shown when present.
    bundle = tmp_path / "b"
    shutil.copytree(bundle_dir, bundle)
    audio = {"files": 12, "seconds": 600.0, "formats": {"WAV": 10, "FLAC": 2}, "sample_rates": {"48000": 12},
             "lossy": False, "devices": ["filemic"], "capture_rates": [48000]}  # fmt: skip
    edit_meta(bundle, lambda m: m["training"].update(audio=audio, parent_model_id="fan-0123456789ab"))
    info = describe(load_bundle(bundle))
    info["calibration"] = {"k": 4.2, "false_alarms_per_day": 1.0, "normal_seconds": 3600.0, "events": 0,
                           "events_per_day": 0.0, "events_per_day_upper95": 72.0, "anomaly": None,
                           "calibrated_at": "2026-11-22T09:00:00+00:00"}  # fmt: skip
    text = format_info(info)
    assert "600 s of audio" in text
    assert "rates 48000 12; formats WAV 10, FLAC 2; devices filemic" in text
    assert "fine-tuned from fan-0123456789ab" in text
    assert "k = 4.2 for at most 1.0 false alarm(s)/day" in text

    # A tampered bundle: one line, exit 2.
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    result = anomalyd("bundle", "info", bundle)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "checksum mismatch" in result.stderr
    assert anomalyd("bundle", "info", tmp_path / "nothing").returncode == 2


def test_install_refuses_a_bad_bundle_and_a_folder_that_is_not_one(bundle_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir, bad)
    edit_meta(bad, lambda m: m["window"].update(n_frames="64"))
    target = tmp_path / "models" / "fan"
    result = anomalyd("bundle", "install", bad, "--into", target)
    assert result.returncode == 2
    assert "n_frames" in result.stderr
    assert not target.exists()

    precious = tmp_path / "models" / "notes"
    precious.mkdir(parents=True)
    result = anomalyd("bundle", "install", bundle_dir, "--into", precious)
    assert result.returncode == 2
    assert "is not a model bundle; refusing" in result.stderr
    assert list(target.parent.iterdir()) == [precious]


def _config(folder: Path, state: Path, recording: Path) -> Path:
    config = folder / "anomalyd.toml"
    config.write_text(
        f'[storage]\ndatabase = "{state}/events.db"\n[storage.clips]\ndirectory = "{state}/clips"\n'
        f'[control]\nsocket = "{state}/control.sock"\n'
        f'[[streams]]\nname = "fan"\nbundle = "{state}/models/fan"\n'
        f'[streams.source]\ntype = "file"\npath = "{recording}"\nrealtime = true\nloop = true\n'
        "[streams.detector]\ncooldown_seconds = 0\n"
    )
    return config


def _owned_by_the_daemon_and_readable(folder: Path) -> None:
    for path in [folder, *folder.iterdir()]:
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (DAEMON_UID, DAEMON_UID), path
        assert stat.S_IMODE(st.st_mode) == (0o755 if path.is_dir() else 0o644), path


@pytest.mark.slow
def test_install_and_reload_under_another_user_switches_the_model(
    bundle_dir: Path, synth_train: Path, shared: Path
) -> None:
    # The service's state directory, as systemd makes it for a DynamicUser: the user's, mode 0750.
    state = shared / "state"
    state.mkdir()
    os.chown(state, DAEMON_UID, DAEMON_UID)
    state.chmod(0o750)
    fresh = shared / "retrained" / "fan-v2"  # a second model of the same machine, trained by root
    assert train.main(["--normal", str(synth_train), "--out", str(fresh), "--preset", str(SMALL_PRESET),
                       "--epochs", "5", "--seed", "1", "--name", "fan-v2", "--quiet"]) == 0  # fmt: skip
    old_id, new_id = load_bundle(bundle_dir).meta.model_id, load_bundle(fresh).meta.model_id
    assert old_id != new_id

    served = state / "models" / "fan"
    result = anomalyd("bundle", "install", bundle_dir, "--into", served)
    assert result.returncode == 0, result.stderr
    _owned_by_the_daemon_and_readable(served)
    assert (served.parent.stat().st_uid, stat.S_IMODE(served.parent.stat().st_mode)) == (DAEMON_UID, 0o755)

    recording = write_recording(shared / "fan.wav", "bearing", 10.0)
    daemon = DaemonProcess(_config(shared, state, recording), uid=DAEMON_UID)
    try:
        daemon.wait_log("anomaly start")  # setpriv has long exec'd the daemon: same pid, other user
        status = Path(f"/proc/{daemon.process.pid}/status").read_text().splitlines()
        uid_line = next(line for line in status if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(DAEMON_UID)] * 4, uid_line
        # The log line comes from the worker; the row follows from the store writer's thread.
        daemon.wait_for(lambda: bool(read_events(state / "events.db")), 30.0, "the first event's row")
        assert {e["model_id"] for e in read_events(state / "events.db")} == {old_id}

        result = anomalyd("bundle", "install", fresh, "--into", served)
        assert result.returncode == 0, result.stderr
        assert f"installed {new_id}" in result.stdout
        _owned_by_the_daemon_and_readable(served)
        assert sorted(p.name for p in served.parent.iterdir()) == ["fan"]  # no staging or old copy left
        seen = len(daemon.log)
        daemon.signal(signal.SIGHUP)  # systemctl reload anomalyd
        daemon.wait_for(lambda: "reloaded" in daemon.log[seen:], 30.0, "the reload")
        assert "refused" not in daemon.log[seen:], daemon.log[seen:]
        daemon.wait_for(
            lambda: any(e["model_id"] == new_id for e in read_events(state / "events.db")),
            30.0, "an event of the new model",
        )  # fmt: skip
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(10) == 0, daemon.log
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
    by_model = {e["model_id"]: e for e in read_events(state / "events.db")}
    assert by_model[old_id]["end_reason"] == "reconfigured"
    assert "Permission denied" not in daemon.log
    assert "Traceback" not in daemon.log
