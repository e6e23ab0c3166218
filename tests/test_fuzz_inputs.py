"""Seeded, time-boxed fuzz of what `anomalyd score` reads: audio files and model bundles.

Real files (a MIMII recording in five encodings, the session's trained bundle) are mutated the way damage
and hostile hands do: flipped bytes, header fields (rate, channels, sizes, format codes), truncation,
NaN/inf/huge float samples; model.json fields of the wrong type or range, missing or extra fields, file
names leading outside; model.onnx and the filterbank corrupted with their checksums fixed up so that only
the deeper checks can tell. Each case runs through the real CLI (`anomalyd.cli.main`, in-process) and must
end in a real verdict (exit 0/1, one line with a finite score) or exit 2 with one error line naming the
file and no traceback. A handful of adversarial files also run in a subprocess whose peak RSS is measured.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from anomalyd.audio import read_audio
from anomalyd.bundle import sha256_file
from anomalyd.cli import main
from tests import memory_helpers
from tests.conftest import MIMII

pytestmark = pytest.mark.slow

FUZZ = settings(
    derandomize=True,  # the same cases on every run: a failure is reproducible, never flaky
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
SECONDS = 2.2  # one window (2.08 s) and a little: short, so that hundreds of cases stay within seconds
RATE = 16_000


# ---------------------------------------------------------------------------------------------- seeds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same real recording as 16-bit WAV, float WAV, 48 kHz float WAV, 24-bit 2-channel WAVEX and FLAC."""
    folder = tmp_path_factory.mktemp("fuzz-seeds")
    samples, rate = read_audio(MIMII / "normal" / "00000000.wav")
    clip = samples[: int(SECONDS * rate)]
    upsampled = np.interp(np.arange(int(SECONDS * 48_000)) / 3, np.arange(len(clip)), clip).astype(np.float32)
    files = {
        "pcm16.wav": (clip, rate, "WAV", "PCM_16"),
        "float.wav": (clip, rate, "WAV", "FLOAT"),
        "float48k.wav": (upsampled, 48_000, "WAV", "FLOAT"),
        "stereo24.wav": (np.stack([clip, clip * 0.5], axis=1), rate, "WAVEX", "PCM_24"),
        "pcm16.flac": (clip, rate, "FLAC", "PCM_16"),
    }
    for name, (data, file_rate, fmt, subtype) in files.items():
        sf.write(folder / name, data, file_rate, format=fmt, subtype=subtype)
    return {name: folder / name for name in files}


@pytest.fixture(scope="module")
def clip(seeds: dict[str, Path]) -> Path:
    return seeds["pcm16.wav"]


# ------------------------------------------------------------------------------------------ the check


def check_cli_outcome(status: int, out: str, err: str, *named: Path) -> None:
    """Exit 0/1 only with a real verdict; otherwise 2 and one error line naming one of `named`."""
    assert status in (0, 1, 2), (status, out, err)
    assert "Traceback" not in err, err
    assert "anomalyd: error: internal error:" not in err, err  # main()'s net for bugs
    assert "unexpected error loading the bundle" not in err, err  # load_bundle's net for bugs
    # A file at a rate the model's training audio did not have (a mutated header's, say), or a lossy one,
    # is still scored, after one warning line per kind that names it.
    lines = err.splitlines()
    warnings = [line for line in lines if line.startswith("anomalyd: warning: ")]
    assert len(warnings) <= 2, err
    assert all(any(str(path) in line for path in named) for line in warnings), err
    err = "".join(f"{line}\n" for line in lines if line not in warnings)
    if status == 2:
        assert out == "", out
        # For --hypothesis-show-statistics: which refusals the cases reached (the text after the path).
        event("exit 2: " + re.sub(r"-?\d[\d.e+-]*|'[^']*'", "#", err.split(": ", 3)[-1])[:60])
        lines = err.splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("anomalyd: error: "), err
        assert any(str(path) in lines[0] for path in named), err
        return
    assert err == "", err
    (line,) = out.splitlines()
    _, score, threshold, verdict_event, verdict = line.split("\t")
    value, limit = float(score.removeprefix("score=")), float(threshold.removeprefix("threshold="))
    assert math.isfinite(value), line
    assert math.isfinite(limit), line
    assert re.fullmatch(r"no event|event at \d+\.\d\d s", verdict_event), line
    assert verdict == ("normal" if verdict_event == "no event" else "ANOMALY"), line
    assert status == (1 if verdict == "ANOMALY" else 0), line
    event(f"exit {status}: a verdict")


def score(bundle: Path, audio: Path, capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capfd.readouterr()
    status = main(["score", "--bundle", str(bundle), str(audio)])
    captured = capfd.readouterr()
    return status, captured.out, captured.err


# -------------------------------------------------------------------------------------- audio mutations

U32 = st.sampled_from([0, 1, 2, 7, 999, 1000, 65_535, 384_001, 2**31 - 1, 2**32 - 1]) | st.integers(
    0, 2**32 - 1
)
U16 = st.sampled_from([0, 1, 2, 3, 8, 0xFFFE, 0xFFFF]) | st.integers(0, 2**16 - 1)
# Canonical 44-byte WAV header: offset -> width of each field worth lying about.
WAV_FIELDS = {4: 4, 20: 2, 22: 2, 24: 4, 28: 4, 32: 2, 34: 2, 40: 4}
BAD_SAMPLES = st.sampled_from([np.nan, np.inf, -np.inf, 1e20, -1e38, 16.5, 3.4e38, 1e-45])


@dataclass(frozen=True)
class Mutated:
    """A mutated file's name, what was done to it, and its bytes (kept out of failure reports)."""

    name: str
    done: list[str]
    content: bytes = field(repr=False)


@st.composite
def mutated_audio(draw: st.DrawFn, seeds: dict[str, Path]) -> Mutated:
    name = draw(st.sampled_from(sorted(seeds)))
    data = bytearray(seeds[name].read_bytes())
    kind = draw(st.sampled_from(["flip", "header", "truncate", "samples", "flac-streaminfo"]))
    done = []
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            # Half of the flips land in the header, where a byte decides how the rest is read.
            at, value = draw(st.integers(0, 63) | st.integers(0, len(data) - 1)), draw(st.integers(0, 255))
            data[at] = value
            done.append(f"byte {at} = {value}")
    elif kind == "header" and name.endswith(".wav"):
        for _ in range(draw(st.integers(1, 3))):
            offset, width = draw(st.sampled_from(sorted(WAV_FIELDS.items())))
            value = draw(U32 if width == 4 else U16)
            data[offset : offset + width] = struct.pack("<I" if width == 4 else "<H", value)
            done.append(f"header field at {offset} = {value}")
    elif kind == "samples" and name.startswith("float"):
        values = np.frombuffer(bytes(data[44:]), dtype="<f4").copy()
        for _ in range(draw(st.integers(1, 4))):
            at, sample = draw(st.integers(0, len(values) - 1)), draw(BAD_SAMPLES)
            values[at] = sample
            done.append(f"float {at} = {sample}")
        data[44:] = values.tobytes()
    elif kind == "flac-streaminfo" and name.endswith(".flac"):
        # STREAMINFO: bytes 18..25 hold the rate (20 bits), channels (3), bits (5) and total samples (36).
        for at in draw(st.lists(st.integers(18, 25), min_size=1, max_size=4)):
            data[at] = value = draw(st.integers(0, 255))
            done.append(f"streaminfo byte {at} = {value}")
    else:
        length = draw(st.integers(0, len(data) - 1))
        data = data[:length]
        done.append(f"cut to {length} bytes")
    return Mutated(name, done, bytes(data))


@settings(FUZZ, max_examples=400)
@given(data=st.data())
def test_mutated_audio_gets_a_real_verdict_or_one_error_line(
    data: st.DataObject,
    seeds: dict[str, Path],
    bundle_dir: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    mutated = data.draw(mutated_audio(seeds))
    path = tmp_path / f"mutated-{mutated.name}"
    path.write_bytes(mutated.content)
    check_cli_outcome(*score(bundle_dir, path, capfd), path)


# ------------------------------------------------------------------------------------- bundle mutations

NASTY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324]),
    st.text(max_size=12),
    st.sampled_from(["", "128", "1e999", "NaN", "../../etc/passwd", "/etc/passwd", "model.onnx", "\x00"]),
    st.lists(st.integers(-3, 3), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in model.json (a few entries of each long list)."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i in sorted({0, 1, len(value) - 1} & set(range(len(value)))):
            yield from json_paths(value[i], (*prefix, i))


Draw = Callable[[st.SearchStrategy[Any]], Any]


def mutate_meta(draw: Draw, meta: dict[str, Any]) -> None:
    """One change somewhere in model.json: a nasty value, a field removed or added, a file name."""
    path = draw(st.sampled_from(list(json_paths(meta))[1:]))
    parent = meta
    for part in path[:-1]:
        parent = parent[part]
    action = draw(st.sampled_from(["replace", "replace", "delete", "extra", "file-name"]))
    files = meta.get("files")
    if action == "replace":
        parent[path[-1]] = draw(NASTY)
    elif action == "delete":
        del parent[path[-1]]
    elif action == "extra" and isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=8))] = draw(NASTY)
    elif action == "file-name" and isinstance(files, dict):
        name = draw(
            st.sampled_from(["../model.onnx", "/etc/hostname", "a/../model.onnx", ".x", "", "x" * 300])
        )
        files[name] = "0" * 64


def corrupt_bytes(draw: Draw, path: Path) -> None:
    """Flip bytes (often in the first 128, where headers are), and/or cut the file short."""
    data = bytearray(path.read_bytes())
    span = draw(st.sampled_from([128, len(data)]))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, span - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data) - 1))]
    path.write_bytes(bytes(data))


@settings(FUZZ, max_examples=450)
@given(data=st.data())
def test_tampered_bundles_are_refused_in_one_line_or_score_for_real(
    data: st.DataObject, bundle_dir: Path, clip: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(bundle_dir, bundle)
    meta = json.loads((bundle / "model.json").read_text())
    target = data.draw(
        st.sampled_from(["model.json", "model.json", "model.json-bytes", "model.onnx", "mel_filterbank.npy"])
    )
    if target == "model.json":
        for _ in range(data.draw(st.integers(1, 3))):
            mutate_meta(data.draw, meta)
        (bundle / "model.json").write_text(json.dumps(meta))
    elif target == "model.json-bytes":
        corrupt_bytes(data.draw, bundle / "model.json")
    else:
        corrupt_bytes(data.draw, bundle / target)
        meta["files"][target] = sha256_file(
            bundle / target
        )  # tampered with care: only deeper checks can tell
        (bundle / "model.json").write_text(json.dumps(meta))

    # Refused: the line names the bundle. Loaded: a real verdict, or a clip score that is not finite.
    check_cli_outcome(*score(bundle, clip, capfd), bundle, clip)


# ----------------------------------------------------------------------------------- memory, measured


def adversarial_files(folder: Path, seeds: dict[str, Path]) -> list[Path]:
    """Headers that once asked for gigabytes, and real decoding at the extremes of the rate range."""
    files = []

    def patched(name: str, seed: str, fields: dict[int, bytes]) -> None:
        data = bytearray(seeds[seed].read_bytes())
        for offset, value in fields.items():
            data[offset : offset + len(value)] = value
        (folder / name).write_bytes(bytes(data))
        files.append(folder / name)

    patched("1hz.wav", "pcm16.wav", {24: struct.pack("<II", 1, 2)})
    patched("65535-channels.wav", "pcm16.wav", {22: struct.pack("<H", 65_535)})
    patched("2-31-frames.wav", "pcm16.wav", {40: struct.pack("<I", 2**32 - 2)})
    patched(
        "unknown-length.wav", "float.wav", {4: struct.pack("<I", 2**32 - 1), 40: struct.pack("<I", 2**32 - 1)}
    )
    patched("1khz-float.wav", "float48k.wav", {24: struct.pack("<II", 1_000, 4_000)})  # 105 s at 1 kHz
    patched("384khz-float.wav", "float48k.wav", {24: struct.pack("<II", 384_000, 1_536_000)})
    streaminfo_21 = seeds["pcm16.flac"].read_bytes()[21]  # high nibble: bits per sample; low: total samples
    patched("2-36-samples.flac", "pcm16.flac", {21: bytes([streaminfo_21 | 0x0F, 0xFF, 0xFF, 0xFF, 0xFF])})
    patched("nan.wav", "float.wav", {44 + 4 * 1000: struct.pack("<f", math.nan)})
    return files


def test_adversarial_files_in_a_subprocess_stay_within_500_mb(
    seeds: dict[str, Path], bundle_dir: Path, tmp_path: Path
) -> None:
    files = adversarial_files(tmp_path, seeds)
    result = memory_helpers.anomalyd("score", "--bundle", str(bundle_dir), *map(str, files))
    print(f"peak RSS over {len(files)} adversarial files: {result.peak_mb:.0f} MB")
    assert result.peak_mb < memory_helpers.MAX_RSS_MB
    assert result.returncode == 2  # at least one of them is refused
    assert "Traceback" not in result.stderr
    assert "anomalyd: error: internal error:" not in result.stderr
    # A file at a rate the model never heard is scored after one warning: not a verdict, not a refusal.
    stderr = "".join(f"{x}\n" for x in result.stderr.splitlines() if not x.startswith("anomalyd: warning: "))
    for path in files:  # one line each, on stdout (a verdict) or stderr (why not)
        lines = [line for line in (result.stdout + stderr).splitlines() if str(path) in line]
        assert len(lines) == 1, (path, result.stdout, result.stderr)
        if not lines[0].startswith("anomalyd: error: "):
            assert math.isfinite(float(lines[0].split("\t")[1].removeprefix("score="))), lines[0]
    refused = {Path(line.split(": ")[2]).name for line in stderr.splitlines()}
    assert {"1hz.wav", "2-31-frames.wav", "nan.wav"} <= refused, result.stderr
