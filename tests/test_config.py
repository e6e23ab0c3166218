"""Config validation: the shipped example is valid; every kind of mistake names file, key path and value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from anomalyd.config import FileSource, MicSource, load_config, parse_config
from anomalyd.errors import ConfigError
from tests.conftest import ROOT

MINIMAL = """
[[streams]]
name = "fan-1"
bundle = "models/fan"
[streams.source]
type = "file"
path = "rec.wav"
"""


def test_shipped_example_is_valid() -> None:
    config = load_config(ROOT / "configs" / "anomalyd.toml")
    assert config.streams[0].name == "fan-1"
    assert isinstance(config.streams[0].source, MicSource)
    assert config.streams[0].source.device == "USB"
    assert config.streams[0].detector.n == 3


def test_every_key_of_the_example_is_commented() -> None:
    for number, line in enumerate((ROOT / "configs" / "anomalyd.toml").read_text().splitlines(), 1):
        if "=" in line and not line.lstrip().startswith("#") and not line.startswith("["):
            assert "#" in line, f"line {number} has no comment: {line}"


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    config = parse_config(MINIMAL, "x.toml", tmp_path)
    stream = config.streams[0]
    assert stream.bundle == tmp_path / "models" / "fan"
    assert isinstance(stream.source, FileSource)
    assert stream.source.path == tmp_path / "rec.wav"
    assert stream.source.realtime is True
    assert config.storage.database == tmp_path / "events.db"
    assert config.node_id  # the host name by default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nodee = 'a'\n" + MINIMAL, "x.toml: nodee: unknown key; allowed here: control, health, inference, log_level, mqtt, node"),
        (MINIMAL + "chanel = 1\n", "streams[0].source.chanel: unknown key; allowed here: block_seconds, channel"),
        (MINIMAL.replace('"file"', '"speaker"'), "streams[0].source = {'type': 'speaker'"),
        (MINIMAL + "[streams.detector]\nn = 6\n", "streams[0].detector = {'n': 6}: n (6) must not exceed m (5)"),
        (MINIMAL + "[streams.detector]\nm = 0\n", "streams[0].detector.m = 0: Input should be greater than or equal to 1"),
        (MINIMAL.replace('"fan-1"', '"fan 1"'), "streams[0].name = 'fan 1': String should match pattern"),
        ("log_level = 'loud'\n" + MINIMAL, "log_level = 'loud': Input should be 'debug', 'info', 'warning' or 'error'"),
        ("[storage]\nretention_days = -1\n" + MINIMAL, "storage.retention_days = -1: Input should be greater than 0"),
        ("[storage.clips]\nquota = 1\n" + MINIMAL, "storage.clips.quota: unknown key; allowed here: base_url, directory, enabled"),
        (MINIMAL + MINIMAL, "streams = [{"),
        ("node = 'a'\n", "streams: required key is missing"),
        (MINIMAL.replace('path = "rec.wav"\n', ""), "streams[0].source.path: required key is missing"),
        ("[[streams]\n", "x.toml: not valid TOML"),
    ],
    ids=[
        "unknown-top", "unknown-nested", "bad-type", "n-over-m", "m-zero", "bad-name", "bad-level",
        "negative", "unknown-clips", "duplicate", "no-streams", "missing-path", "toml",
    ],
)  # fmt: skip
def test_errors_name_file_key_value_and_what_is_allowed(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "x.toml", tmp_path)
    assert message in str(info.value)
    assert all(line.startswith("x.toml: ") for line in str(info.value).splitlines())


def test_duplicate_stream_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stream names must be unique, repeated: fan-1"):
        parse_config(MINIMAL + MINIMAL, "x.toml", tmp_path)


def test_all_errors_are_reported_at_once(tmp_path: Path) -> None:
    text = "nodee = 1\n[storage]\nmax_events = 0\n" + MINIMAL + "[streams.detector]\ncooldown_seconds = -5\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "x.toml", tmp_path)
    assert len(str(info.value).splitlines()) == 3


def test_mic_device_by_index_or_name(tmp_path: Path) -> None:
    text = MINIMAL.replace('type = "file"\npath = "rec.wav"', 'type = "mic"\ndevice = 2\nchannel = 1')
    source = parse_config(text, "x.toml", tmp_path).streams[0].source
    assert isinstance(source, MicSource)
    assert (source.device, source.channel, source.sample_rate) == (2, 1, 0)


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "anomalyd", "check-config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_check_config_command(tmp_path: Path) -> None:
    missing_bundle = tmp_path / "a.toml"
    missing_bundle.write_text(MINIMAL)
    result = _check_config(missing_bundle)
    assert result.returncode == 2
    assert "models/fan: no such bundle directory" in result.stderr

    bad = tmp_path / "b.toml"
    bad.write_text(MINIMAL + "colour = 'red'\n")
    result = _check_config(bad)
    assert result.returncode == 2
    assert f"{bad}: streams[0].source.colour: unknown key" in result.stderr

    result = _check_config(tmp_path / "absent.toml")
    assert result.returncode == 2
    assert "cannot read config" in result.stderr


@pytest.mark.slow
def test_check_config_accepts_a_good_config(bundle_dir: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(MINIMAL.replace('"models/fan"', f'"{bundle_dir}"'))
    result = _check_config(good)
    assert result.returncode == 0, result.stderr
    assert "ok (1 stream(s)" in result.stdout
