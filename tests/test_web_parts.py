"""The dashboard's parts on their own: score trails and event traces, the spectrogram, the event-list
filters, the token file, and the README's list of metrics."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from anomalyd.bundle import load_bundle
from anomalyd.config import config_warnings, parse_config
from anomalyd.errors import ConfigError
from anomalyd.features import LogMel
from anomalyd.trace import MAX_EVENT_POINTS, EventTrace, ScoreTrail
from anomalyd.web.auth import load_token
from anomalyd.web.metrics import METRICS
from anomalyd.web.queries import MAX_LIMIT, parse_filter
from anomalyd.web.spectrogram import MARK_PX, render, viridis
from tests.conftest import ROOT


def test_a_score_trail_keeps_the_newest_in_order_when_it_wraps() -> None:
    trail = ScoreTrail(5)
    for i in range(12):
        trail.add(100.0 + i, float(i))
    assert trail.since(0.0) == [(100.0 + i, float(i)) for i in range(7, 12)]
    assert trail.since(109.5) == [(110.0, 10.0), (111.0, 11.0)]
    assert ScoreTrail(3).since(0.0) == []


def test_an_event_trace_is_bounded_and_keeps_its_peak() -> None:
    rate = 16_000
    trace = EventTrace(start_sample=10 * rate, rate=rate, lead=[(9 * rate, 0.5), (int(9.5 * rate), 0.7)])
    rng = np.random.default_rng(0)
    scores = rng.uniform(1.0, 2.0, 20_000)
    scores[12_345] = 50.0
    for i, score in enumerate(scores):
        trace.add(10 * rate + i * 8192, float(score))
    points = trace.points()
    assert len(points) <= MAX_EVENT_POINTS
    assert points[0][0] == -1.0  # the lead-in: before the start (merged with its neighbours by now)
    assert max(s for _, s in points) == 50.0
    offsets = [t for t, _ in points]
    assert offsets == sorted(offsets)
    assert offsets[-1] == pytest.approx(19_999 * 8192 / rate, abs=2 * 8192 * 16 / rate)


def _clip(path: Path, seconds: float, rate: int = 16_000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.1 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), rate, subtype="PCM_16")
    return path


def test_the_spectrogram_marks_the_event_in_the_stream_s_own_bands(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(bundle_dir)
    logmel = LogMel(bundle.meta.features, bundle.filterbank)
    png, seconds = render(_clip(tmp_path / "c.wav", 10.0), logmel, (2.0, 6.0))
    assert seconds == pytest.approx(10.0)
    image = np.asarray(Image.open(io.BytesIO(png)))
    assert image.shape[0] == 2 * bundle.meta.features.n_mels
    width = image.shape[1]
    red = np.all(image[0] == (230, 57, 70), axis=-1)
    assert red[int(0.25 * width) : int(0.55 * width)].all()
    assert not red[: int(0.15 * width)].any()
    assert not red[int(0.65 * width) :].any()
    assert (image[MARK_PX:, int(0.2 * width)] == 255).all()  # the start's white edge
    # The 1 kHz tone is one bright row band, not the floor.
    column = image[MARK_PX:, int(0.1 * width)].astype(int).sum(axis=-1)
    assert column.max() - np.median(column) > 200


def test_a_clip_too_short_for_a_frame_or_at_another_rate_still_draws(
    tmp_path: Path, bundle_dir: Path
) -> None:
    bundle = load_bundle(bundle_dir)
    logmel = LogMel(bundle.meta.features, bundle.filterbank)
    png, _ = render(_clip(tmp_path / "short.wav", 0.01), logmel, None)
    assert Image.open(io.BytesIO(png)).width == 1
    png, _ = render(_clip(tmp_path / "other.wav", 3.0, rate=44_100), logmel, (0.5, None))  # plain STFT
    assert Image.open(io.BytesIO(png)).height == 2 * 513


def test_viridis_runs_from_dark_blue_to_yellow() -> None:
    ends = viridis(np.array([0.0, 1.0]))
    assert [int(v) for v in ends[0]] == pytest.approx([68, 1, 84], abs=5)
    assert [int(v) for v in ends[1]] == pytest.approx([253, 231, 37], abs=5)


@pytest.mark.parametrize(
    ("query", "named"),
    [({"state": "shut"}, "state"), ({"marked": "maybe"}, "marked"), ({"limit": "0"}, "limit"),
     ({"limit": str(MAX_LIMIT + 1)}, "limit"), ({"limit": "1e3"}, "limit"), ({"since": "last week"}, "since"),
     ({"colour": "red"}, "colour")],
)  # fmt: skip
def test_bad_event_filters_are_named(query: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        parse_filter(query)


def test_event_filters() -> None:
    where = parse_filter({"stream": "fan-1", "since": "all", "state": "open", "marked": "no", "limit": "7"})
    assert (where.stream, where.since, where.state, where.marked, where.limit) == (
        "fan-1",
        None,
        "open",
        False,
        7,
    )
    assert parse_filter({"since": "2h"}).since is not None
    assert parse_filter({}).limit == 200


def test_the_token_file_and_the_credential(tmp_path: Path) -> None:
    good = tmp_path / "token"
    good.write_text("  0123456789abcdef0123  \n")
    good.chmod(0o600)
    token = load_token(good, {})
    assert token.value == "0123456789abcdef0123"
    assert "0123456789" not in token.note
    good.chmod(0o644)
    assert "readable by every user" in load_token(good, {}).note
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    assert load_token(None, {"CREDENTIALS_DIRECTORY": str(credentials)}).value is None
    (credentials / "web-token").write_text("fedcba9876543210fedcba")
    assert load_token(None, {"CREDENTIALS_DIRECTORY": str(credentials)}).value == "fedcba9876543210fedcba"
    assert load_token(good, {"CREDENTIALS_DIRECTORY": str(credentials)}).value == "0123456789abcdef0123"
    for bad, says in ((b"", "is empty"), (b"\xff\xfe" * 10, "not UTF-8"), (b"a" * 5000, "one word"),
                      (b"abc\x00defghijklmnopq", "one word")):  # fmt: skip
        good.write_bytes(bad)
        refused = load_token(good, {})
        assert refused.value is None
        assert says in refused.note, refused.note


def test_the_readme_lists_every_metric() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, _ in METRICS:
        assert f"`{name}`" in readme, name


STREAM = '[[streams]]\nname = "fan"\nbundle = "m"\n[streams.source]\ntype = "file"\npath = "a.wav"\n'


@pytest.mark.parametrize(
    ("web", "message"),
    [("port = 0", "x.toml: web.port = 0: Input should be greater than or equal to 1"),
     ("port = 70000", "web.port = 70000"), ('listen = "0.0.0.0; rm"', "web.listen = '0.0.0.0; rm'"),
     ("history_minutes = 0", "web.history_minutes = 0"), ("token = 'abc'", "web.token: unknown key; allowed here: "
      "enabled, history_minutes, listen, port, token_file")],
)  # fmt: skip
def test_web_settings_are_checked(tmp_path: Path, web: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"[web]\n{web}\n{STREAM}", "x.toml", tmp_path)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_web_defaults_paths_and_warnings(tmp_path: Path) -> None:
    config = parse_config(STREAM, "x.toml", tmp_path)
    assert (config.web.enabled, config.web.listen, config.web.port) == (False, "127.0.0.1", 8470)
    config = parse_config(f'[web]\nenabled = true\ntoken_file = "secret/t"\n{STREAM}', "x.toml", tmp_path)
    assert config.web.token_file == tmp_path / "secret" / "t"
    assert not config_warnings(config)
    open_to_all = parse_config(f'[web]\nenabled = true\nlisten = "0.0.0.0"\n{STREAM}', "x.toml", tmp_path)
    assert any("listens on 0.0.0.0" in w for w in config_warnings(open_to_all))
