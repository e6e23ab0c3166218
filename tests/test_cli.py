"""`anomalyd score` and `python -m training.evaluate` as a user runs them: real processes, real files."""

from __future__ import annotations

import csv
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import soundfile as sf
from onnx import helper

from anomalyd import cli
from anomalyd.config import HealthConfig
from tests import memory_helpers
from tests.bundle_helpers import WINDOWS, install_graph, rehash, window_info
from tests.conftest import MIMII, ROOT
from training.evaluate import FileScore, compute_metrics

pytestmark = pytest.mark.slow

ANOMALYD = [sys.executable, "-m", "anomalyd"]
SILENCE = HealthConfig().silence_dbfs  # the daemon's digital-silence level


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=300, check=False, cwd=ROOT
    )


def parse_score_lines(stdout: str) -> dict[str, tuple[float, float, str]]:
    """name -> (clip score, window threshold, verdict); the event column is checked to agree."""
    rows = {}
    for line in stdout.splitlines():
        path, score, threshold, event, verdict = line.split("\t")
        assert (event == "no event") == (verdict == "normal"), line
        rows[Path(path).name] = (float(score.split("=")[1]), float(threshold.split("=")[1]), verdict)
    return rows


def test_score_exit_status_follows_the_verdicts(bundle_dir: Path, synth_test: Path) -> None:
    normal = sorted((synth_test / "normal").glob("*.wav"))[:3]
    faulty = sorted((synth_test / "anomaly").glob("imbalance_*.wav"))[:2]

    result = run(*ANOMALYD, "score", "--bundle", bundle_dir, *normal)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = parse_score_lines(result.stdout)
    assert [rows[p.name][2] for p in normal] == ["normal"] * 3

    result = run(*ANOMALYD, "score", "--bundle", bundle_dir, *normal, *faulty)
    assert result.returncode == 1
    rows = parse_score_lines(result.stdout)
    assert [rows[p.name][2] for p in faulty] == ["ANOMALY"] * 2


def test_score_errors_exit_2_and_still_score_the_good_files(
    bundle_dir: Path, synth_test: Path, tmp_path: Path
) -> None:
    good = sorted((synth_test / "normal").glob("*.wav"))[0]
    bad = tmp_path / "broken.wav"
    bad.write_bytes(good.read_bytes()[:3000])
    result = run(*ANOMALYD, "score", "--bundle", bundle_dir, bad, good)
    assert result.returncode == 2
    assert f"{bad}: truncated WAV" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert good.name in result.stdout


def test_digital_silence_is_called_silent_never_normal_nor_anomaly(
    bundle_dir: Path, synth_test: Path, tmp_path: Path
) -> None:
    good = sorted((synth_test / "normal").glob("*.wav"))[0]
    zeros = tmp_path / "dead-channel.wav"
    sf.write(zeros, np.zeros(16_000 * 4, np.int16), 16_000, subtype="PCM_16")
    result = run(*ANOMALYD, "score", "--bundle", bundle_dir, zeros, good)
    assert result.returncode == 2  # a file that cannot be judged
    lines = {Path(line.split("\t")[0]).name: line.split("\t") for line in result.stdout.splitlines()}
    assert lines[zeros.name][1:] == ["score=-", lines[zeros.name][2], "no windows scored", "silent"]
    assert lines[good.name][-1] == "normal"
    assert result.stderr.strip() == (
        f"anomalyd: error: {zeros}: digital silence (every window has a stretch below {SILENCE:g} dBFS): cannot be "
        "judged; check the channel and the microphone"
    )


def test_score_too_short_and_bad_bundle(bundle_dir: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(16_000, dtype=np.float32), 16_000)
    result = run(*ANOMALYD, "score", "--bundle", bundle_dir, short)
    assert result.returncode == 2
    assert "too short to score (1.00 s, one window needs 2.08 s)" in result.stderr

    result = run(*ANOMALYD, "score", "--bundle", tmp_path, short)
    assert result.returncode == 2
    assert "not a model bundle" in result.stderr
    assert "Traceback" not in result.stderr


def test_k_override_moves_the_threshold(bundle_dir: Path, synth_test: Path) -> None:
    clip = sorted((synth_test / "normal").glob("*.wav"))[0]
    base = parse_score_lines(run(*ANOMALYD, "score", "--bundle", bundle_dir, clip).stdout)[clip.name]
    strict = parse_score_lines(run(*ANOMALYD, "score", "--bundle", bundle_dir, "--k", "0", clip).stdout)[
        clip.name
    ]
    assert strict[0] == base[0]
    assert strict[1] < base[1]


@pytest.mark.parametrize(
    "command",
    [
        [*ANOMALYD, "--help"],
        [*ANOMALYD, "score", "--help"],
        [*ANOMALYD, "calibrate", "--help"],
        [sys.executable, "-m", "training.train", "--help"],
        [sys.executable, "-m", "training.evaluate", "--help"],
        [sys.executable, "-m", "fixtures.synth", "--help"],
    ],
    ids=["anomalyd", "score", "calibrate", "train", "evaluate", "synth"],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = run(*command)
    assert result.returncode == 0
    assert "usage:" in result.stdout


def mann_whitney_auc(normal: list[float], anomaly: list[float]) -> float:
    """AUC as the probability that an anomalous file outscores a normal one (ties count half)."""
    wins = sum((a > n) + 0.5 * (a == n) for a in anomaly for n in normal)
    return wins / (len(anomaly) * len(normal))


def test_evaluate_writes_metrics_scores_and_plots(bundle_dir: Path, synth_test: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = run(
        sys.executable, "-m", "training.evaluate",
        "--bundle", bundle_dir,
        "--normal", synth_test / "normal",
        "--anomaly", synth_test / "anomaly",
        "--json", tmp_path / "metrics.json",
        "--plots", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"auc", "pauc", "tpr", "fpr", "n_normal", "n_anomaly"} <= set(metrics)
    assert (metrics["n_normal"], metrics["n_anomaly"]) == (40, 30)

    with (out / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 70
    normal = [float(r["score"]) for r in rows if r["label"] == "normal"]
    anomaly = [float(r["score"]) for r in rows if r["label"] == "anomaly"]
    assert metrics["auc"] == pytest.approx(mann_whitney_auc(normal, anomaly), abs=1e-9)
    # TPR and FPR are the daemon's verdict per file (an event or not), as `anomalyd score` gives it.
    events = {"normal": [], "anomaly": []}
    for r in rows:
        events[r["label"]].append(r["verdict"] == "anomaly")
        assert (r["event_seconds"] != "") == (r["verdict"] == "anomaly")
    assert metrics["fpr"] == pytest.approx(np.mean(events["normal"]))
    assert metrics["tpr"] == pytest.approx(np.mean(events["anomaly"]))
    for png in ("roc.png", "histogram.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same files through `anomalyd score` give the same scores.
    cli = parse_score_lines(
        run(
            *ANOMALYD, "score", "--bundle", bundle_dir, *sorted((synth_test / "anomaly").glob("*.wav"))
        ).stdout
    )
    for r in rows:
        if r["label"] == "anomaly":
            assert cli[Path(r["file"]).name][0] == pytest.approx(float(r["score"]), abs=1e-5)
            assert cli[Path(r["file"]).name][2] == ("ANOMALY" if r["verdict"] == "anomaly" else "normal")


def standardised_pauc(normal: list[float], anomaly: list[float], max_fpr: float) -> float:
    """Partial AUC up to max_fpr by the trapezoid rule on the ROC, McClish-standardised to [0.5, 1] for
    better-than-chance curves: the definition the DCASE Task 2 evaluators use, written out independently."""
    thresholds = sorted(set(normal) | set(anomaly), reverse=True)
    points = [(0.0, 0.0)]
    for t in thresholds:
        points.append((np.mean(np.array(normal) >= t), np.mean(np.array(anomaly) >= t)))
    area, (x0, y0) = 0.0, points[0]
    for fpr, tpr in points[1:]:
        x1, y1 = fpr, tpr
        if x1 > max_fpr:  # interpolate the last segment at max_fpr
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
        x0, y0 = x1, y1
        if x0 >= max_fpr:
            break
    min_area, max_area = max_fpr**2 / 2, max_fpr
    return 0.5 * (1 + (area - min_area) / (max_area - min_area))


def test_pauc_is_the_dcase_standardised_partial_auc() -> None:
    rng = np.random.default_rng(3)
    normal = rng.normal(0, 1, 200).tolist()
    anomaly = rng.normal(1.2, 1, 100).tolist()
    scores = [FileScore(Path(f"n{i}"), 0, s) for i, s in enumerate(normal)]
    scores += [FileScore(Path(f"a{i}"), 1, s) for i, s in enumerate(anomaly)]
    metrics = compute_metrics(scores, threshold=1.0, n_skipped=0, model_id="m")
    assert metrics.pauc == pytest.approx(standardised_pauc(normal, anomaly, 0.1), abs=1e-9)
    assert metrics.auc == pytest.approx(mann_whitney_auc(normal, anomaly), abs=1e-9)
    assert 0.5 < metrics.pauc < metrics.auc < 1


def test_end_to_end_on_real_mimii_clips(tmp_path: Path) -> None:
    """Train on three real fan recordings, then score real normal and anomalous ones through the CLI."""
    normal = tmp_path / "normal"
    normal.mkdir()
    for name in ("00000000.wav", "00000001.wav", "00000002.wav"):
        shutil.copy(MIMII / "normal" / name, normal)
    bundle = tmp_path / "bundle"
    result = run(
        sys.executable, "-m", "training.train", "--normal", normal, "--out", bundle,
        "--epochs", "4", "--channels", "8,16,8", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["training"]["train_inputs"] == 37  # one 10 s clip: 311 frames, 16-frame tiles every 8
    files = [MIMII / "normal" / "00000003.wav", *sorted((MIMII / "anomaly").glob("*.wav"))]
    result = run(*ANOMALYD, "score", "--bundle", bundle, *files)
    assert result.returncode in (0, 1), result.stderr
    rows = parse_score_lines(result.stdout)
    assert len(rows) == 3
    assert result.returncode == (1 if any(v == "ANOMALY" for *_, v in rows.values()) else 0)
    assert all(np.isfinite(score) and score > 0 for score, _, _ in rows.values())


def assert_one_error_line(stderr: str, *fragments: str) -> None:
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("anomalyd: error: ")
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def test_a_wav_declaring_1_hz_is_refused_in_bounded_memory(bundle_dir: Path, tmp_path: Path) -> None:
    """80 kB that declare 1 Hz: once 7.6 GB, a traceback and exit 1 ("anomalous")."""
    path = tmp_path / "1hz.wav"
    sf.write(path, np.random.default_rng(0).normal(0, 0.1, 40_000), 16_000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    data[24:32] = struct.pack("<II", 1, 2)  # sample rate 1 Hz, 2 bytes per second
    path.write_bytes(bytes(data))
    assert path.stat().st_size == 80_044
    result = memory_helpers.anomalyd("score", "--bundle", str(bundle_dir), str(path))
    assert result.returncode == 2
    assert_one_error_line(
        result.stderr, f"{path}: declares a sample rate of 1 Hz; supported: 1000 to 384000 Hz"
    )
    assert result.peak_mb < memory_helpers.MAX_RSS_MB


def test_a_long_file_is_scored_in_bounded_memory(bundle_dir: Path, tmp_path: Path) -> None:
    """10 minutes of 48 kHz stereo (115 MB on disk): scored as a stream, so memory does not follow length."""
    path = tmp_path / "long.wav"
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", 48_000, 2, "PCM_16") as f:
        for _ in range(60):
            f.write(rng.normal(0, 0.05, (480_000, 2)).astype(np.float32))
    result = memory_helpers.anomalyd("score", "--bundle", str(bundle_dir), str(path))
    assert result.returncode in (0, 1), result.stderr
    # The model was trained on 16 kHz audio: 48 kHz is scored, with that one warning.
    assert result.stderr.startswith(f"anomalyd: warning: {path}: recorded at 48000 Hz"), result.stderr
    assert len(result.stderr.splitlines()) == 1
    print(f"peak RSS scoring 10 min of 48 kHz stereo: {result.peak_mb:.0f} MB")
    assert result.peak_mb < memory_helpers.MAX_RSS_MB
    (score,) = parse_score_lines(result.stdout).values()
    assert np.isfinite(score[0])


def test_a_huge_or_non_finite_sample_is_an_error_not_a_verdict(
    bundle_dir: Path, synth_test: Path, tmp_path: Path
) -> None:
    """One sample of 1e20 once gave score nan, verdict "normal", exit 0."""
    samples, rate = sf.read(sorted((synth_test / "anomaly").glob("bearing_*.wav"))[0], dtype="float32")
    for value in (1e20, np.nan, np.inf):
        faulty = samples.copy()
        faulty[20_000] = value
        path = tmp_path / f"faulty-{value}.wav"
        sf.write(path, faulty, rate, subtype="FLOAT")
        result = run(*ANOMALYD, "score", "--bundle", bundle_dir, path)
        assert result.returncode == 2
        assert result.stdout == ""
        assert_one_error_line(result.stderr, f"{path}: sample 20000 is ", "allowed: finite values")


def test_a_window_score_that_is_not_finite_has_no_verdict(
    bundle_dir: Path, synth_test: Path, tmp_path: Path
) -> None:
    """A graph that overflows on real windows (finite on the trial batch of zeros): exit 2, never "normal"."""
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    square = [helper.make_node("Mul", ["w", "w"], ["s"]), helper.make_node("Mul", ["s", "big"], ["r"])]
    install_graph(bundle, square, [window_info("w", WINDOWS)], [window_info("r", WINDOWS)],
                  constants={"big": np.array(1e38, dtype=np.float32)})  # fmt: skip
    clip = sorted((synth_test / "normal").glob("*.wav"))[0]
    result = run(*ANOMALYD, "score", "--bundle", bundle, clip)
    assert result.returncode == 2
    assert result.stdout == ""
    assert_one_error_line(
        result.stderr, f"{clip}: window 0 (from 0.00 s) scored inf, not a finite number: no verdict"
    )


def test_check_config_builds_the_onnx_session_and_exits_2(
    bundle_dir: Path, synth_test: Path, tmp_path: Path
) -> None:
    """An IR-14 graph (what the pinned onnx writes by default) passes every checksum: only building the
    ONNX Runtime session can tell, and check-config does, so that `run` never meets it first."""
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    config = tmp_path / "anomalyd.toml"
    config.write_text(
        f'[[streams]]\nname = "fan"\nbundle = "{bundle}"\n[streams.source]\ntype = "file"\npath = "x.wav"\n'
    )
    assert run(*ANOMALYD, "check-config", config).returncode == 0

    graph = onnx.load(str(bundle / "model.onnx"))
    graph.ir_version = 14
    onnx.save(graph, str(bundle / "model.onnx"))
    rehash(bundle, "model.onnx")
    expected = f"{bundle / 'model.onnx'}: not a loadable ONNX model (Unsupported model IR version: 14, max supported IR version: 13)"
    result = run(*ANOMALYD, "check-config", config)
    assert result.returncode == 2
    assert_one_error_line(result.stderr, expected)

    clip = sorted((synth_test / "normal").glob("*.wav"))[0]
    result = run(*ANOMALYD, "score", "--bundle", bundle, clip)
    assert result.returncode == 2
    assert_one_error_line(result.stderr, expected)


def test_check_config_help_states_exit_2() -> None:
    result = run(*ANOMALYD, "check-config", "--help")
    assert "0 when the daemon would start with this config, 2 otherwise" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--k", "nan"], "k must be a number in 0..100"),
        (["--k", "inf"], "k must be a number in 0..100"),
        (["--k", "-1"], "k must be a number in 0..100"),
        (["--threads", "0"], "threads must be an integer in 1..64"),
        (["--threads", "many"], "threads must be an integer in 1..64"),
        (["--channel", "-1"], "a channel is an integer, 0 or more"),
    ],
)
def test_score_options_are_range_checked(
    bundle_dir: Path, capsys: pytest.CaptureFixture[str], option: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["score", "--bundle", str(bundle_dir), *option, "x.wav"])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


class BoomError(RuntimeError):
    pass


def test_an_unexpected_error_is_exit_2_and_one_line_the_traceback_only_with_v(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A bug anywhere in a command must never read as a verdict (exit 1) nor spill a traceback."""

    def broken(path: Path) -> None:
        raise BoomError("something\nbroke")

    monkeypatch.setattr(cli, "load_bundle", broken)
    assert cli.main(["score", "--bundle", str(tmp_path), "x.wav"]) == 2
    assert capsys.readouterr().err == "anomalyd: error: internal error: BoomError: something broke\n"

    assert cli.main(["-v", "score", "--bundle", str(tmp_path), "x.wav"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("anomalyd: error: internal error: BoomError: something broke\nTraceback")
    assert 'raise BoomError("something\\nbroke")' in err

    def interrupted(path: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_bundle", interrupted)
    assert cli.main(["score", "--bundle", str(tmp_path), "x.wav"]) == 130
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["events", "--database", "{tmp}/absent.db"], "absent.db: no event database"),
        (["events", "--database", "{tmp}", "--since", "yesterday"], "--since 'yesterday': expected an age"),
        (["check-config", "{tmp}/absent.toml"], "absent.toml: cannot read config"),
        (["score", "--bundle", "{tmp}", "x.wav"], "not a model bundle"),
    ],
    ids=["events-no-db", "events-since", "check-config", "score-bundle"],
)
def test_every_command_exits_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = run(*ANOMALYD, *(a.format(tmp=tmp_path) for a in args))
    assert result.returncode == 2
    assert_one_error_line(result.stderr, message)
