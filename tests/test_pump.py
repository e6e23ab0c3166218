"""A differently shaped machine: the synthetic reciprocating pump, whose normal sound is cyclic, not steady.

First the fixture itself, so that it cannot quietly become trivial: its normal sound follows a drifting
stroke, and each fault changes its own band in its own part of the stroke, barely the clip's level. Then
a model trained on pump audio by the real training command, with the project's default settings: it
ranks every fault above normal runs as loud, and the real daemon stays quiet on held-out normal runs and
raises an event for each fault.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.metrics import roc_auc_score

from anomalyd.bundle import load_bundle
from anomalyd.features import FeatureParams
from anomalyd.scoring import ClipScorer
from fixtures import fan, pump, synth
from fixtures.signals import SAMPLE_RATE, band_pass
from tests.conftest import ROOT
from tests.daemon_helpers import DaemonProcess, write_config, write_recording
from training import train

WINDOW_S = FeatureParams().n_samples(train.TrainConfig().n_frames) / SAMPLE_RATE  # one model window, s
AUC_FLOOR = 0.9

# What each fault is said to change: its band (Hz), parts of the stroke where that band must rise, and
# parts it must leave alone (phase 0: top dead centre; suction from 0 to 0.5, discharge from 0.5 to 1).
FAULT_SIGNATURES = {
    "valve_leak": ((2500, 5000), [(0.1, 0.4)], [(0.6, 0.95)]),  # hiss while the valve should hold
    "cavitation": ((1000, 7000), [(0.4, 0.5)], [(0.65, 1.0), (0.0, 0.25)]),  # crackle before BDC
    "knock": ((400, 2000), [(0.55, 0.6), (0.05, 0.1)], [(0.25, 0.45), (0.75, 0.95)]),  # after reversals
}


def _band_db(audio: npt.NDArray[np.float32], low: float, high: float, frame: int) -> npt.NDArray[np.float64]:
    """Level of each `frame`-sample frame within [low, high] Hz, dB."""
    band = band_pass(audio.astype(np.float64), low, high)
    frames = band[: len(band) // frame * frame].reshape(-1, frame)
    return np.asarray(10 * np.log10(np.mean(frames**2, axis=1)))


def _frame_phases(cycles: npt.NDArray[np.float64], frame: int, n_frames: int) -> npt.NDArray[np.float64]:
    """Where in its stroke (0..1) the centre of each frame falls."""
    return np.asarray(np.mod(cycles[frame // 2 :: frame][:n_frames], 1.0))


def _within(phases: npt.NDArray[np.float64], spans: list[tuple[float, float]]) -> npt.NDArray[np.bool_]:
    return np.asarray(np.any([(phases >= a) & (phases < b) for a, b in spans], axis=0))


def test_rendering_is_deterministic_and_a_fault_changes_only_its_span() -> None:
    normal = pump.render("normal", 1, 3, 6.0)
    assert np.array_equal(normal, pump.render("normal", 1, 3, 6.0))
    assert normal.dtype == np.float32
    assert 0.05 < np.abs(normal).max() < 0.5  # a sensible recording level, far from clipping
    assert not np.array_equal(normal, pump.render("normal", 1, 4, 6.0))
    assert not np.array_equal(normal, pump.render("normal", 2, 3, 6.0))
    assert np.array_equal(normal, synth.get_machine("pump").render("normal", 1, 3, 6.0))
    for fault in pump.FAULTS:
        faulty = pump.render(fault, 1, 3, 6.0, onset=2.0, until=4.0)
        inside = slice(2 * SAMPLE_RATE, 4 * SAMPLE_RATE)
        outside = np.r_[0 : 2 * SAMPLE_RATE, 4 * SAMPLE_RATE : 6 * SAMPLE_RATE]
        # The same machine run, sample for sample, before and after the fault.
        assert np.array_equal(faulty[outside], normal[outside]), fault
        assert not np.array_equal(faulty[inside], normal[inside]), fault
        # A modest change of the clip's level: the model levels windows anyway, a fault must be heard.
        level_change = 10 * np.log10(np.mean(faulty[inside] ** 2) / np.mean(normal[inside] ** 2))
        assert 0.1 < level_change < 1.5, (fault, level_change)


def test_normal_pump_sound_follows_its_drifting_stroke_and_each_run_has_its_own_rate() -> None:
    frame = 80  # 5 ms, short against a stroke (~0.71 s)
    periods = []
    for index in range(4):
        audio = pump.render("normal", 1, index, 10.0)
        cycles = pump.stroke_cycles(1, index, 10.0)
        envelope = _band_db(audio, 300, 7000, frame)  # above the drive hum
        # The level rises and falls with the stroke, by several dB...
        assert np.percentile(envelope, 90) - np.percentile(envelope, 10) > 6, index
        # ... repeating at the run's own stroke period (the strongest repetition between 0.5 and 1 s) ...
        centred = envelope - envelope.mean()
        ac = np.correlate(centred, centred, "full")[len(centred) - 1 :] / float(centred @ centred)
        lags = np.arange(len(ac)) * frame / SAMPLE_RATE
        best = int(np.argmax(np.where((lags > 0.5) & (lags < 1.0), ac, -1.0)))
        period = 10.0 / (cycles[-1] - cycles[0])
        assert abs(lags[best] - period) < 1.5 * frame / SAMPLE_RATE, (index, lags[best], period)
        assert ac[best] > 0.6, (index, ac[best])
        # ... and most of its variation is told by where in the stroke it falls: it follows the drift.
        bins = (_frame_phases(cycles, frame, len(envelope)) * 20).astype(int)
        by_phase = np.array([envelope[bins == b].mean() for b in range(20)])
        explained = 1 - np.mean((envelope - by_phase[bins]) ** 2) / np.var(envelope)
        assert explained > 0.6, (index, explained)
        # Within a run the stroke rate drifts (slip with the load): strokes are not all alike.
        long_run = pump.stroke_cycles(1, index, 20.0)
        dead_centres = np.searchsorted(long_run, np.arange(np.ceil(long_run[0]), long_run[-1]))
        strokes = np.diff(dead_centres) / SAMPLE_RATE
        assert (strokes.max() - strokes.min()) / strokes.mean() > 0.004, (index, strokes)
        periods.append(period)
    assert max(periods) / min(periods) > 1.01, periods  # every run has its own stroke rate
    # The same measure on the fan: nearly steady.
    steady = _band_db(fan.render("normal", 1, 0, 10.0), 300, 7000, 320)
    assert np.percentile(steady, 90) - np.percentile(steady, 10) < 2.5


@pytest.mark.parametrize("fault", pump.FAULTS)
def test_each_pump_fault_changes_its_own_band_in_its_own_part_of_the_stroke(fault: str) -> None:
    frame = 320  # 20 ms
    (low, high), lifted, untouched = FAULT_SIGNATURES[fault]
    rises, elsewhere, hum = [], [], []
    for index in range(4):
        normal = pump.render("normal", 1, index, 8.0)
        faulty = pump.render(fault, 1, index, 8.0)
        change = _band_db(faulty, low, high, frame) - _band_db(normal, low, high, frame)
        phases = _frame_phases(pump.stroke_cycles(1, index, 8.0), frame, len(change))
        rises.append(change[_within(phases, lifted)])
        elsewhere.append(change[_within(phases, untouched)])
        hum.append(_band_db(faulty, 20, 300, frame) - _band_db(normal, 20, 300, frame))
    assert np.median(np.concatenate(rises)) > 8, fault  # plainly there, where it is said to be
    assert np.percentile(np.abs(np.concatenate(elsewhere)), 95) < 1, fault  # and nowhere else
    assert np.median(np.abs(np.concatenate(hum))) < 0.2, fault  # the drive is untouched


def test_unknown_machine_or_kind_is_a_value_error_naming_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown machine 'valve'; choose from fan, pump"):
        synth.get_machine("valve")
    with pytest.raises(
        ValueError, match="unknown kind 'bearing' for the pump; choose from normal, valve_leak"
    ):
        pump.render("bearing", 0, 0)
    with pytest.raises(ValueError, match="unknown kind 'knock' for the fan; choose from normal, bearing"):
        synth.render("knock", 0, 0)
    written = synth.write_dataset(tmp_path, n_normal=1, per_fault=1, seconds=1.0, seed=0, machine="pump")
    assert [p.relative_to(tmp_path).as_posix() for p, _ in written] == [
        "normal/normal_0000.wav", "anomaly/valve_leak_0001.wav", "anomaly/cavitation_0001.wav",
        "anomaly/knock_0001.wav",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "fixtures.synth", "--machine", "pump", "--recording", str(tmp_path / "r.wav"),
         "--kind", "bearing"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--kind bearing: the pump has normal, valve_leak, cavitation, knock" in result.stderr


@pytest.fixture(scope="module")
def pump_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model of the pump trained on 50 normal runs of 3 s (seed 0; 150 s, above the training's 60 s
    minimum), by the real training command with the project's default settings. Many short runs rather
    than a few long ones: the validation blocks that set the threshold are whole files, so 10 runs, not
    a handful, tell it how much runs differ."""
    data = tmp_path_factory.mktemp("pump-train")
    synth.write_dataset(data, n_normal=50, per_fault=0, seconds=3.0, seed=0, machine="pump")
    out = tmp_path_factory.mktemp("pump-bundle") / "pump"
    assert train.main(["--normal", str(data / "normal"), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.slow
def test_clip_scores_rank_every_pump_fault_above_normal_runs_as_loud(pump_bundle: Path) -> None:
    scorer = ClipScorer.from_bundle(load_bundle(pump_bundle))
    runs = {i: pump.render("normal", 1, i, 4.0) for i in range(20)}  # held-out runs (seed 1)
    normal = [scorer.score_samples(audio).score for audio in runs.values()]
    aucs = {}
    for fault in pump.FAULTS:
        faulty = []
        for i in range(8):  # the same runs with the fault, brought to the loudness of the run without it
            audio = pump.render(fault, 1, i, 4.0)
            audio *= np.sqrt(np.mean(runs[i] ** 2) / np.mean(audio**2))
            faulty.append(scorer.score_samples(audio).score)
        aucs[fault] = float(roc_auc_score([0] * len(normal) + [1] * len(faulty), normal + faulty))
    report = ", ".join(f"{fault} {auc:.3f}" for fault, auc in aucs.items())
    assert min(aucs.values()) > AUC_FLOOR, f"per-fault AUC: {report}"


@pytest.mark.slow
def test_the_daemon_stays_quiet_on_normal_pump_runs_and_finds_every_fault(
    pump_bundle: Path, tmp_path: Path
) -> None:
    onset, until = 10.0, 22.0
    streams: dict[str, dict[str, object]] = {}
    for index in range(100, 106):  # held-out runs (seed 1), a minute each
        path = write_recording(tmp_path / f"normal{index}.wav", "normal", 60.0, index=index, machine="pump")
        streams[f"normal{index}"] = {"path": path}
    for fault in pump.FAULTS:
        path = write_recording(tmp_path / f"{fault}.wav", fault, 30.0, onset, until, machine="pump")
        streams[fault] = {"path": path}
    with DaemonProcess(write_config(tmp_path / "d.toml", pump_bundle, streams)) as daemon:
        assert daemon.wait_exit(120) == 0, daemon.log  # replayed files end; the daemon stops by itself
    conn = sqlite3.connect(tmp_path / "events.db")
    try:
        rows = conn.execute(
            "SELECT stream, start_sample FROM events ORDER BY stream, start_sample"
        ).fetchall()
    finally:
        conn.close()
    starts: dict[str, list[float]] = {}
    for stream, start in rows:
        starts.setdefault(stream, []).append(start / SAMPLE_RATE)
    assert not [s for s in starts if s.startswith("normal")], f"events on normal runs: {starts}"
    for fault in pump.FAULTS:
        assert fault in starts, f"no event for {fault}: {starts}"
        # Its first event starts at a window reaching into the fault, not on the normal stretch before.
        assert onset - WINDOW_S < starts[fault][0] < until, (fault, starts[fault])
