"""Training from what was recorded: one long recording, mixed folders and formats, provenance, warnings."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from anomalyd.audio import SUPPORTED_FORMATS, describe_audio, list_folder
from anomalyd.bundle import load_bundle
from anomalyd.features import FeatureParams, LogMel
from anomalyd.scoring import ClipScorer
from fixtures.synth import SAMPLE_RATE, render
from tests.conftest import ROOT
from training import blocks, train
from training.dataset import load_recordings, make_filterbank, stream_logmel
from training.sources import MANIFEST_FILE, list_normal

pytestmark = pytest.mark.slow

QUICK = ["--epochs", "2", "--channels", "8,8,4", "--patience", "2"]
TRAIN_HOP = train.TrainConfig().train_hop_frames
N_FRAMES = train.TrainConfig().n_frames
TILE = train.TrainConfig().tile_frames or N_FRAMES  # what the model is trained on


def _write(path: Path, audio: np.ndarray, rate: int = SAMPLE_RATE, **kwargs: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, rate, **kwargs)
    return path


def _clip(index: int, seconds: float) -> np.ndarray:
    return render("normal", 0, index, seconds)


def _long(seconds_each: float, n: int, first: int = 0) -> np.ndarray:
    """One recording of several machine runs concatenated, as a long `arecord` take."""
    return np.concatenate([_clip(first + i, seconds_each) for i in range(n)])


@pytest.fixture(scope="module")
def long_recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 minutes in one WAV."""
    folder = tmp_path_factory.mktemp("long")
    _write(folder / "take.wav", _long(30.0, 6), subtype="PCM_16")
    return folder


@pytest.fixture(scope="module")
def long_bundle(long_recording: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("long-bundle") / "fan"
    assert train.main(["--normal", str(long_recording), "--out", str(out), *QUICK, "--quiet"]) == 0
    return out


def test_one_long_recording_trains_split_by_time(long_bundle: Path, long_recording: Path) -> None:
    meta = load_bundle(long_bundle).meta
    info = meta.training
    [entry] = info["files"]
    assert entry["name"] == "take.wav"
    assert entry["seconds"] == 180.0
    roles = entry["blocks"]
    assert len(roles) == 18
    assert roles.count("V") == round(18 * 0.2) == info["val_blocks"]
    assert meta.threshold.clip_scores.n == 4

    # The blocks as model.json describes them: no training window shares a sample with a validation block.
    params = FeatureParams()
    hop, n_fft = params.hop_length, params.n_fft
    total = params.n_frames(180 * SAMPLE_RATE)
    cut = blocks.cut(0, total, info["block_frames"], info["gap_frames"], N_FRAMES)
    assert len(cut) == len(roles)
    val_spans = [
        (b.start * hop, (b.stop - 1) * hop + n_fft) for b, r in zip(cut, roles, strict=True) if r == "V"
    ]
    train_tiles = [
        (s * hop, (s + TILE - 1) * hop + n_fft)
        for b, r in zip(cut, roles, strict=True)
        if r == "T"
        for s in range(b.start, b.stop - TILE + 1, TRAIN_HOP)
    ]
    assert len(train_tiles) == info["train_inputs"]  # exactly the model inputs training used
    for w0, w1 in train_tiles:
        assert all(w1 <= v0 or w0 >= v1 for v0, v1 in val_spans)

    # The threshold is the validation blocks' scores, reproduced by the runtime from their audio.
    audio, _ = sf.read(long_recording / "take.wav", dtype="float32")
    scorer = ClipScorer.from_bundle(load_bundle(long_bundle))
    scores = [scorer.score_samples(audio[v0:v1]).score for v0, v1 in val_spans]
    assert np.mean(scores) == pytest.approx(meta.threshold.clip_scores.mean, rel=1e-5)
    assert np.std(scores, ddof=1) == pytest.approx(meta.threshold.clip_scores.std, rel=1e-4)

    audio_info = meta.training_audio
    assert audio_info is not None
    assert (audio_info.files, audio_info.seconds, audio_info.formats) == (1, 180.0, {"WAV": 1})
    assert (audio_info.sample_rates, audio_info.lossy, audio_info.devices) == ({16000: 1}, False, ())


def test_folders_of_mixed_lengths_and_formats(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Short clips, a long 48 kHz file, an MP3 and files of other formats; and a second folder of
    clips recorded by `anomalyd record` (with its manifest), as false-alarm clips would be."""
    assert "MP3" in {f.name for f in SUPPORTED_FORMATS}  # libsndfile >= 1.1 here
    recorded = tmp_path / "recorded"
    for i in range(4):
        _write(recorded / f"clip_{i}.wav", _clip(i, 3.0), subtype="PCM_16")
    _write(recorded / "blip.wav", _clip(9, 2.0), subtype="PCM_16")  # shorter than a window: skipped
    long = soxr.resample(_long(20.0, 3, first=10), SAMPLE_RATE, 48_000).astype(np.float32)
    _write(recorded / "take-48k.wav", long, 48_000, subtype="PCM_24")
    _write(recorded / "phone.mp3", _clip(20, 4.0), format="MP3")
    for name in ("notes.txt", "take.aiff", "cover.jpg", "readme.md"):
        (recorded / name).write_bytes(b"not used")
    marked = tmp_path / "marked"
    for i in range(3):
        _write(marked / f"fan-20261122T0900{i:02d}Z-{i:04d}.wav", _clip(30 + i, 4.0), subtype="PCM_16")
    segments = [{"file": f"fan-20261122T0900{i:02d}Z-{i:04d}.wav", "seconds": 4.0, "flags": flags}
                for i, flags in enumerate(([], ["clipping"], []))]  # fmt: skip
    segments.append({"file": "gone.wav", "flags": ["silent"]})  # moved out of the folder: not trained on
    manifest = {"stream": "fan", "device": "filemic", "capture_rate": 48000, "rate": 16000,
                "source": "daemon", "segments": segments}  # fmt: skip
    (marked / MANIFEST_FILE).write_text(json.dumps(manifest))

    out = tmp_path / "bundle"
    with caplog.at_level(logging.DEBUG):
        status = train.main(
            ["--normal", str(recorded), "--normal", str(marked), "--out", str(out), *QUICK, "-v"]
        )
    assert status == 0, caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        "not used: 4 files not of a supported audio format (WAV, FLAC, OGG, MP3): cover.jpg, notes.txt, "
        "readme.md and 1 more (all named with -v)" in warnings
    )
    assert not [w for w in warnings if "s minimum" in w]  # 88 s of normal audio is enough
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    for name in ("notes.txt", "take.aiff", "cover.jpg", "readme.md"):
        assert f"not a supported audio format: {recorded / name}" in debug
    assert any(
        "1 of 9 training files are lossy (1 MP3)" in w and "changes the spectrum" in w for w in warnings
    )
    assert any("blip.wav: too short" in w for w in warnings)
    assert any(
        w.startswith("1 recorded segment(s) flagged by `anomalyd record` are trained on: "
                     "fan-20261122T090001Z-0001.wav (clipping); move them out") for w in warnings
    )  # fmt: skip
    assert "skipped 1 of 10 files (reasons above)" in warnings

    meta = load_bundle(out).meta  # validated, provenance included, as the daemon loads it
    info = meta.training
    assert info["normal_dirs"] == [str(recorded), str(marked)]
    assert info["unsupported_files"] == 4
    assert [s["name"] for s in info["skipped_files"]] == ["blip.wav"]
    by_name = {f["name"]: f for f in info["files"]}
    assert len(by_name["take-48k.wav"]["blocks"]) == 6  # 60 s: six blocks of 10 s
    assert {f["dir"] for f in info["files"]} == {0, 1}
    assert all(len(f["blocks"]) == 1 for name, f in by_name.items() if name != "take-48k.wav")
    assert info["train_blocks"] + info["val_blocks"] == 4 + 6 + 1 + 3
    assert info["audio"] == {
        "files": 9,
        "seconds": pytest.approx(4 * 3.0 + 60.0 + 4.0 + 3 * 4.0, abs=0.2),
        "formats": {"MP3": 1, "WAV": 8},
        "sample_rates": {"16000": 8, "48000": 1},
        "lossy": True,
        "devices": ["filemic"],
        "capture_rates": [48000],
        "recorded_by": "anomalyd record",
    }
    assert meta.training_audio is not None
    assert meta.training_audio.rates == {16000, 48000}


def test_too_little_audio_in_one_recording_is_a_clear_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write(tmp_path / "normal" / "short-take.wav", _clip(0, 15.0), subtype="PCM_16")
    status = train.main(["--normal", str(tmp_path / "normal"), "--out", str(tmp_path / "b"), *QUICK])
    assert status == 2
    assert "too little normal audio: 15.0 s in 1 usable file makes 2 blocks; training needs 3" in caplog.text
    assert "at least 22.1 s in one recording" in caplog.text
    assert not (tmp_path / "b").exists()


def test_too_little_normal_audio_to_trust_is_warned_about_with_the_minimum(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write(tmp_path / "normal" / "take.wav", _long(10.0, 4), subtype="PCM_16")  # 40 s: trains, but...
    with caplog.at_level(logging.WARNING):
        status = train.main(["--normal", str(tmp_path / "normal"), "--out", str(tmp_path / "b"), *QUICK])
    assert status == 0, caplog.text
    assert f"only 40 s of normal audio, below the {train.MIN_NORMAL_SECONDS:.0f} s minimum" in caplog.text


def test_a_damaged_manifest_is_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for content in ("{not json", "[1, 2]", '{"device": 7, "capture_rate": "fast"}'):
        (tmp_path / MANIFEST_FILE).write_text(content)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert list_normal(tmp_path).manifest is None
        assert len(caplog.records) == 1
        assert "recording.json: not a usable recording manifest" in caplog.text
    (tmp_path / MANIFEST_FILE).write_text('{"device": "usb mic", "capture_rate": 0}')
    # A usable device name is kept, a bad rate dropped.
    manifest = list_normal(tmp_path).manifest
    assert manifest is not None
    assert (manifest.device, manifest.capture_rate) == ("usb mic", None)


def test_long_files_are_streamed_into_the_same_features(tmp_path: Path) -> None:
    """Frames computed block by block equal frames of the whole; a file over the 600 s that `load_audio`
    allows trains (only its log-mel frames are held)."""
    params = FeatureParams()
    logmel = LogMel(params, make_filterbank(params))
    audio = _clip(0, 12.3)
    blocks_in = [audio[i : i + 7_777] for i in range(0, len(audio), 7_777)]
    frames, n = stream_logmel(iter(blocks_in), logmel)
    assert n == len(audio)
    np.testing.assert_allclose(frames, logmel(audio), atol=1e-3)

    noise = np.random.default_rng(0).normal(0, 0.05, 601 * 8_000).astype(np.float32)
    path = _write(tmp_path / "ten-minutes.wav", noise, 8_000, subtype="PCM_16")
    [recording], skipped = load_recordings([[path]], logmel, params.n_samples(64))
    assert not skipped
    assert recording.seconds(params.sample_rate) == pytest.approx(601, abs=0.01)
    assert recording.logmel.shape == (128, params.n_frames(601 * SAMPLE_RATE))


def test_listing_names_every_file(tmp_path: Path) -> None:
    for name in ("b.wav", "a.FLAC", "c.mp3", "d.ogg", "e.aiff", "notes.txt", ".hidden.wav"):
        (tmp_path / name).write_bytes(b"")
    audio, others = list_folder(tmp_path)
    assert [p.name for p in audio] == ["a.FLAC", "b.wav", "c.mp3", "d.ogg"]
    assert [p.name for p in others] == ["e.aiff", "notes.txt"]


def test_score_warns_once_for_lossy_audio_and_another_rate(bundle_dir: Path, tmp_path: Path) -> None:
    files = [
        _write(tmp_path / "a.mp3", _clip(100, 4.0), format="MP3"),
        _write(tmp_path / "b-44k.wav", soxr.resample(_clip(101, 4.0), SAMPLE_RATE, 44_100), 44_100),
        _write(tmp_path / "c.mp3", _clip(102, 4.0), format="MP3"),
        _write(tmp_path / "d-44k.wav", soxr.resample(_clip(103, 4.0), SAMPLE_RATE, 44_100), 44_100),
        _write(tmp_path / "e.wav", _clip(104, 4.0), subtype="PCM_16"),
    ]
    assert describe_audio(files[0]).lossy
    assert not describe_audio(files[1]).lossy
    result = subprocess.run(
        [sys.executable, "-m", "anomalyd", "score", "--bundle", str(bundle_dir), *map(str, files)],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr
    assert len(result.stdout.splitlines()) == 5  # every file still scored
    # libmpg123 (inside libsndfile) may print decoder notes of its own; anomalyd's lines are these two.
    lines = [line for line in result.stderr.splitlines() if line.startswith("anomalyd:")]
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith(f"anomalyd: warning: {files[0]}: MP3 (MPEG_LAYER_III) is lossy")
    assert lines[1].startswith(f"anomalyd: warning: {files[1]}: recorded at 44100 Hz, the model's training")
    assert "16000 Hz" in lines[1]

    # A bundle from before training audio was recorded: the rate cannot be judged, so it is not warned about.
    old = tmp_path / "old-bundle"
    shutil.copytree(bundle_dir, old)
    meta = json.loads((old / "model.json").read_text())
    del meta["training"]["audio"]
    (old / "model.json").write_text(json.dumps(meta))
    assert load_bundle(old).meta.training_audio is None
    result = subprocess.run(
        [sys.executable, "-m", "anomalyd", "score", "--bundle", str(old), str(files[1])],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode in (0, 1)
    assert result.stderr == ""
