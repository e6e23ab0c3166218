"""The audio loader on every kind of file a plant engineer may hand it."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from anomalyd.audio import (
    MAX_ABS_SAMPLE,
    MAX_LOAD_SECONDS,
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    check_samples,
    list_audio_files,
    load_audio,
    read_audio,
    stream_audio,
)
from anomalyd.errors import AudioError
from tests.conftest import MIMII

RATE = 16_000


def tone(freq: float = 440.0, seconds: float = 1.0, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize(
    ("subtype", "tolerance"),
    [("PCM_16", 1 / 2**15), ("PCM_24", 1 / 2**23), ("PCM_32", 1 / 2**31), ("FLOAT", 0.0), ("DOUBLE", 0.0)],
)
def test_wav_sample_formats_read_as_float32(tmp_path: Path, subtype: str, tolerance: float) -> None:
    x = tone()
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, x, RATE, subtype=subtype)
    y = load_audio(path, RATE)
    assert y.dtype == np.float32
    assert y.shape == x.shape
    assert np.max(np.abs(y - x)) <= tolerance


def test_flac(tmp_path: Path) -> None:
    x = tone()
    sf.write(tmp_path / "a.flac", x, RATE, subtype="PCM_16")
    assert np.max(np.abs(load_audio(tmp_path / "a.flac", RATE) - x)) <= 1 / 2**15


def test_wave_format_extensible_multichannel_like_mimii_originals(tmp_path: Path) -> None:
    """The MIMII originals: 8 channels, WAVE_FORMAT_EXTENSIBLE. Channel 0 must equal the mono copy."""
    mono, rate = read_audio(MIMII / "normal" / "00000000.wav")
    channels = np.stack([mono * (1 - 0.1 * c) for c in range(8)], axis=1)
    path = tmp_path / "eight.wav"
    sf.write(path, channels, rate, subtype="PCM_16", format="WAVEX")
    with path.open("rb") as f:
        header = f.read(40)
    assert struct.unpack("<H", header[20:22])[0] == 0xFFFE  # WAVE_FORMAT_EXTENSIBLE
    np.testing.assert_array_equal(load_audio(path, 16_000, channel=0), mono)
    np.testing.assert_allclose(load_audio(path, 16_000, channel=3), channels[:, 3], atol=1 / 2**15)


def test_channel_out_of_range_names_file_and_channels(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    sf.write(path, np.zeros((RATE, 2), dtype=np.float32), RATE)
    with pytest.raises(AudioError, match=r"stereo\.wav: channel 5 requested, file has 2"):
        load_audio(path, RATE, channel=5)


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000])
def test_other_rates_are_resampled_to_the_model_rate(tmp_path: Path, rate: int) -> None:
    path = tmp_path / f"r{rate}.wav"
    sf.write(path, tone(1000.0, 2.0, rate), rate, subtype="PCM_16")
    y = load_audio(path, RATE)
    assert len(y) == pytest.approx(2 * RATE, abs=2)
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    peak_hz = np.argmax(spectrum) * RATE / len(y)
    assert peak_hz == pytest.approx(1000.0, abs=1.0)


def _bytes_of_valid_wav(tmp_path: Path) -> bytes:
    sf.write(tmp_path / "ok.wav", tone(), RATE, subtype="PCM_16")
    return (tmp_path / "ok.wav").read_bytes()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda b: b[: len(b) // 2], "truncated WAV: header declares 32000 bytes of audio, file holds"),
        (lambda b: b[:30], "not a readable audio file"),
        (lambda b: b"", "not a readable audio file"),
        (lambda b: b"This is a text file, not audio." * 10, "not a readable audio file"),
        (lambda b: b[:44], "holds no audio samples|truncated"),
    ],
    ids=["truncated", "header-only", "empty", "text", "no-samples"],
)
def test_bad_files_give_one_clear_line_naming_the_file(tmp_path: Path, content, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.wav"
    path.write_bytes(content(_bytes_of_valid_wav(tmp_path)))
    with pytest.raises(AudioError, match=message) as info:
        load_audio(path, RATE)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_truncated_flac(tmp_path: Path) -> None:
    sf.write(tmp_path / "whole.flac", np.random.default_rng(0).normal(0, 0.1, 48_000), RATE, subtype="PCM_16")
    data = (tmp_path / "whole.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match=r"cut\.flac: not a readable audio file \(.*lost sync"):
        load_audio(tmp_path / "cut.flac", RATE)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "nope.wav", RATE)


def test_nan_samples_are_refused(tmp_path: Path) -> None:
    x = tone()
    x[100] = np.nan
    sf.write(tmp_path / "nan.wav", x, RATE, subtype="FLOAT")
    with pytest.raises(
        AudioError, match=r"nan\.wav: sample 100 is nan; allowed: finite values \(no NaN or inf\)"
    ):
        load_audio(tmp_path / "nan.wav", RATE)


def test_list_audio_files_is_sorted_and_filters_suffixes(tmp_path: Path) -> None:
    for name in ("b.wav", "a.FLAC", "notes.txt", "c.wav"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_audio_files(tmp_path)] == ["a.FLAC", "b.wav", "c.wav"]
    with pytest.raises(AudioError, match="not a directory"):
        list_audio_files(tmp_path / "missing")


def _patch_wav_header(path: Path, rate: int | None = None, channels: int | None = None) -> None:
    """Rewrite the fmt chunk of a canonical 44-byte-header WAV, as a damaged or hostile header would."""
    data = bytearray(path.read_bytes())
    if channels is not None:
        data[22:24] = struct.pack("<H", channels)
    if rate is not None:
        data[24:28] = struct.pack("<I", rate)
        data[28:32] = struct.pack("<I", min(rate * 2, 2**32 - 1))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rate", [1, 999, 384_001, 2**31 - 1])
def test_sample_rate_outside_the_supported_range_is_refused_before_decoding(
    tmp_path: Path, rate: int
) -> None:
    path = tmp_path / "odd.wav"
    sf.write(path, tone(seconds=2.5), RATE, subtype="PCM_16")  # 80 kB
    _patch_wav_header(path, rate=rate)
    with pytest.raises(
        AudioError, match=rf"odd\.wav: declares a sample rate of {rate} Hz; supported: 1000 to 384000 Hz"
    ):
        load_audio(path, RATE)
    with pytest.raises(AudioError, match="declares a sample rate"):
        next(stream_audio(path, RATE))


@pytest.mark.parametrize("rate", [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE])
def test_the_limits_of_the_range_are_accepted(tmp_path: Path, rate: int) -> None:
    sf.write(tmp_path / "edge.wav", np.zeros(rate // 10, np.float32), rate, subtype="PCM_16")
    assert len(load_audio(tmp_path / "edge.wav", RATE)) == pytest.approx(RATE // 10, abs=2)


def test_a_header_claiming_65535_channels_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "many.wav"
    sf.write(path, tone(), RATE, subtype="PCM_16")
    _patch_wav_header(path, channels=65535)
    with pytest.raises(AudioError, match=r"many\.wav: "):
        load_audio(path, RATE)


@pytest.mark.parametrize(
    ("value", "shown"),
    [(np.inf, "inf"), (-np.inf, "-inf"), (1e20, "1.0000000200408773e+20"), (-16.5, "-16.5")],
)
def test_absurd_samples_are_refused_naming_file_and_position(
    tmp_path: Path, value: float, shown: str
) -> None:
    x = tone(seconds=3.0)
    x[40_000] = value
    sf.write(tmp_path / "bad.wav", x, RATE, subtype="FLOAT")
    message = rf"bad\.wav: sample 40000 is {re.escape(shown)}; allowed: finite values \(no NaN or inf\) within \+-16"
    with pytest.raises(AudioError, match=message):
        load_audio(tmp_path / "bad.wav", RATE)
    with pytest.raises(AudioError, match=message):
        list(stream_audio(tmp_path / "bad.wav", RATE))


def test_check_samples_accepts_up_to_plus_24_dbfs() -> None:
    check_samples(np.array([0.0, MAX_ABS_SAMPLE, -MAX_ABS_SAMPLE], dtype=np.float32), "x")
    with pytest.raises(AudioError, match=r"^x: sample 7 is nan;"):
        check_samples(np.array([0.0, np.nan], dtype=np.float32), "x", offset=6)


@pytest.mark.parametrize("rate", [16_000, 44_100, 1_000])
def test_streamed_blocks_equal_one_shot_resampling(tmp_path: Path, rate: int) -> None:
    """Block-by-block decoding and chunked resampling give exactly soxr's one-shot output."""
    x = np.random.default_rng(rate).normal(0, 0.1, int(rate * 3.3)).astype(np.float32)
    sf.write(tmp_path / "x.wav", x, rate, subtype="FLOAT")
    blocks = list(stream_audio(tmp_path / "x.wav", RATE))
    if rate != RATE:
        assert len(blocks) > 3
    expected = x if rate == RATE else soxr.resample(x, rate, RATE, quality="HQ")
    np.testing.assert_array_equal(np.concatenate(blocks), expected)
    np.testing.assert_array_equal(load_audio(tmp_path / "x.wav", RATE), expected)


def test_files_loaded_whole_have_a_maximum_length(tmp_path: Path) -> None:
    sf.write(tmp_path / "long.wav", np.zeros(3 * RATE, np.float32), RATE, subtype="PCM_16")
    with pytest.raises(AudioError, match=r"long\.wav: 3 s of audio, longer than the 2 s a file may hold"):
        load_audio(tmp_path / "long.wav", RATE, max_seconds=2.0)
    assert len(load_audio(tmp_path / "long.wav", RATE, max_seconds=3.0)) == 3 * RATE
    assert MAX_LOAD_SECONDS == 600.0


def test_a_streaming_wav_of_unknown_length_is_read_to_its_real_end(tmp_path: Path) -> None:
    """A data size of 0xFFFFFFFF (a writer that never came back to fill it in) is not trusted for length."""
    path = tmp_path / "live.wav"
    sf.write(path, tone(seconds=2.0), RATE, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    data[40:44] = struct.pack("<I", 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    assert len(load_audio(path, RATE)) == 2 * RATE
