"""Config values that used to pass validation and kill a daemon thread at run time, and a seeded fuzz.

Every number has a range; NaN and infinities are refused; names that go into MQTT topics and Home
Assistant ids are validated; a config nested too deeply or too large is one clear error. For every config
that IS accepted, the arithmetic the daemon does with its values (timers, SQL limits, back-off, sample
counts) must work: that is what the fuzz checks.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomalyd import cli
from anomalyd.config import DaemonConfig, config_warnings, default_node, parse_config
from anomalyd.contract import Topics
from anomalyd.errors import ConfigError
from anomalyd.homeassistant import HaStream, discovery_messages
from anomalyd.mutes import MAX_MUTE_SECONDS
from tests.test_config import MINIMAL

# What Home Assistant accepts in a discovery topic: <prefix>/<component>/[<node_id>/]<object_id>/config
HA_DISCOVERY_TOPIC = re.compile(r"^(?P<prefix>[^/]+(/[^/]+)*)/(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config$")  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[storage]\nretention_days = 1e10\n", "storage.retention_days = 10000000000.0: Input should be less than or equal to 36500"),
        ("[storage]\nmax_events = 9223372036854775808\n", "storage.max_events = 9223372036854775808: Input should be less than or equal to 100000000"),
        ("[storage]\nretention_days = nan\n", "storage.retention_days = nan: Input should be a finite number"),
        ("[mqtt]\nretry_initial_seconds = inf\n", "mqtt.retry_initial_seconds = inf: Input should be a finite number"),
        ("[mqtt]\nretry_initial_seconds = 30.0\nretry_max_seconds = 5.0\n", "retry_max_seconds (5.0) must not be below retry_initial_seconds (30.0)"),
        ("[mqtt]\nscore_interval_seconds = 1e-300\n", "mqtt.score_interval_seconds = 1e-300: Input should be greater than or equal to 0.1"),
        ("[health]\nstall_seconds = inf\n", "health.stall_seconds = inf: Input should be a finite number"),
        ("[health]\nretry_max_seconds = 1e300\n", "health.retry_max_seconds = 1e+300: Input should be less than or equal to 3600"),
        ("[health]\nsilence_dbfs = -inf\n", "health.silence_dbfs = -inf: Input should be a finite number"),
        ("[inference]\nmax_lag_seconds = 0\n", "inference.max_lag_seconds = 0: Input should be greater than or equal to 0.5"),
        ("[storage.clips]\nquota_mb = inf\n", "storage.clips.quota_mb = inf: Input should be a finite number"),
        ("node = 'edge1.plant'\n", "node = 'edge1.plant': use letters, digits, '-' and '_' only"),
        ("node = 'a/#'\n", "node = 'a/#': use letters, digits, '-' and '_' only"),
        ('node = "a\\u0000b"\n', "node = 'a\\x00b': use letters, digits, '-' and '_' only"),
        ("node = '" + "n" * 70_000 + "'\n", "node = 'nnnnnnnn"),
        ("[mqtt]\nprefix = 'plant/#'\n", "mqtt.prefix = 'plant/#': String should match pattern"),
        ("[mqtt]\nprefix = 'plant//x'\n", "mqtt.prefix = 'plant//x': String should match pattern"),
        ("[mqtt.homeassistant]\ndiscovery_prefix = 'ha/+'\n", "mqtt.homeassistant.discovery_prefix = 'ha/+': String should match pattern"),
        ("[mqtt]\nclient_id = 'a b'\n", "mqtt.client_id = 'a b': String should match pattern"),
    ],
    ids=[
        "retention-huge", "max-events-2**63", "nan", "retry-inf", "retry-order", "interval-tiny",
        "stall-inf", "retry-max-huge", "dbfs-minus-inf", "lag-zero", "quota-inf", "dotted-node",
        "wildcard-node", "nul-node", "70k-node", "wildcard-prefix", "empty-level", "ha-prefix", "client-id",
    ],
)  # fmt: skip
def test_out_of_range_values_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text + MINIMAL, "x.toml", tmp_path)
    assert message in str(info.value)
    for line in str(info.value).splitlines():
        assert line.startswith("x.toml: ")
        assert len(line) < 400, "one short line per problem, even for a 70 kB value"


@pytest.mark.parametrize("section", ["streams.detector", "storage"])
def test_cooldown_and_detector_limits(tmp_path: Path, section: str) -> None:
    text = MINIMAL + "[streams.detector]\ncooldown_seconds = inf\nn = 2000\nm = 2000\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "x.toml", tmp_path)
    lines = str(info.value).splitlines()
    assert any("cooldown_seconds = inf: Input should be a finite number" in line for line in lines)
    assert any("detector.n = 2000: Input should be less than or equal to 1000" in line for line in lines)


def test_deeply_nested_toml_is_one_clear_error(tmp_path: Path) -> None:
    text = "x = " + "[" * 100_000 + "]" * 100_000 + "\n" + MINIMAL
    with pytest.raises(ConfigError, match=r"x\.toml: not valid TOML: arrays or tables nested too deeply"):
        parse_config(text, "x.toml", tmp_path)


def test_a_huge_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "huge.toml"
    path.write_text(MINIMAL + "# " + "x" * 2_000_000 + "\n")
    result = subprocess.run([sys.executable, "-m", "anomalyd", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode != 0
    assert "a config file holds at most 1000000" in result.stderr
    assert "Traceback" not in result.stderr


def test_default_node_is_the_short_host_name_made_valid(tmp_path: Path) -> None:
    node = default_node()
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", node)
    assert parse_config(MINIMAL, "x.toml", tmp_path).node_id == node


def test_credentials_without_tls_are_warned_about(tmp_path: Path) -> None:
    plain = parse_config(
        '[mqtt]\nenabled = true\nusername = "u"\npassword_env = "P"\n' + MINIMAL, "x", tmp_path
    )
    assert any("credentials are configured without TLS" in w for w in config_warnings(plain))
    secure = parse_config(
        '[mqtt]\nenabled = true\nusername = "u"\n[mqtt.tls]\nenabled = true\n' + MINIMAL, "x", tmp_path
    )
    assert config_warnings(secure) == []
    anonymous = parse_config("[mqtt]\nenabled = true\n" + MINIMAL, "x", tmp_path)
    assert config_warnings(anonymous) == []


# ---- fuzz ----------------------------------------------------------------------------------------------

NUMERIC_KEYS = {
    "storage": ["retention_days", "max_events"],
    "storage.clips": ["pre_roll_seconds", "post_roll_seconds", "max_seconds", "quota_mb", "min_free_mb"],
    "inference": ["max_batch", "threads", "max_lag_seconds"],
    "health": ["silence_dbfs", "silence_seconds", "clipping_fraction", "stall_seconds",
               "retry_initial_seconds", "retry_max_seconds"],
    "mqtt": ["port", "keepalive_seconds", "score_interval_seconds", "outbox_max_messages",
             "retry_initial_seconds", "retry_max_seconds"],
    "streams.detector": ["n", "m", "hold_off_windows", "cooldown_seconds", "update_seconds", "k", "threshold"],
    "streams.source": ["channel", "block_seconds"],
    "streams": ["mute_minutes"],
}  # fmt: skip

NASTY_NUMBERS = (
    st.sampled_from(
        [
            "inf",
            "-inf",
            "nan",
            "+nan",
            "1e308",
            "-1e308",
            "1e-308",
            "0",
            "-0",
            "0.0",
            "-1",
            "1",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "1e10",
            "2.5",
            "0.001",
            "true",
            "'7'",
            "[1]",
            "{}",
            "1979-05-27",
        ]
    )
    | st.integers(min_value=1, max_value=60).map(str)
    | st.integers(min_value=-(2**70), max_value=2**70).map(str)
    | st.floats(allow_nan=True).map(
        lambda f: {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(str(f), repr(f))
    )
)
VALID_NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True)
ODD_NAMES = st.text(alphabet=st.characters(codec="utf-8", exclude_characters='"\\\n\r'), max_size=80)
# Mostly valid names, so that most examples reach the run-time arithmetic rather than a name error.
NAMES = st.one_of(VALID_NAMES, VALID_NAMES, VALID_NAMES, ODD_NAMES)
ACCEPTED: list[int] = []


def _runtime_arithmetic(config: DaemonConfig) -> None:
    """What the daemon computes from config values; none of it may raise for an accepted config."""
    now = dt.datetime.now(dt.UTC)
    _ = now - dt.timedelta(days=config.storage.retention_days)
    sqlite3.connect(":memory:").execute("SELECT 1 LIMIT ?", [config.storage.max_events]).fetchall()
    for stream in config.streams:
        _ = now + dt.timedelta(minutes=stream.mute_minutes)
        assert stream.mute_minutes * 60 <= MAX_MUTE_SECONDS  # what the Mute switch's "on" asks for
        d = stream.detector
        _ = int(d.cooldown_seconds * 48_000) + int(d.update_seconds * 48_000)
        _ = now + dt.timedelta(seconds=d.cooldown_seconds)
        _ = int(stream.source.block_seconds * 384_000)
    for initial, maximum in ((config.mqtt.retry_initial_seconds, config.mqtt.retry_max_seconds),
                             (config.health.retry_initial_seconds, config.health.retry_max_seconds)):  # fmt: skip
        _ = now + dt.timedelta(seconds=min(initial * 2**40, maximum) * 1.2)
    _ = now + dt.timedelta(seconds=config.mqtt.score_interval_seconds + config.inference.max_lag_seconds)
    topics = Topics(config.mqtt.prefix, config.node_id)
    ha_streams = [HaStream(s.name, "m", s.area) for s in config.streams]
    for m in discovery_messages(topics, ha_streams, config.mqtt.homeassistant.discovery_prefix):
        match = HA_DISCOVERY_TOPIC.match(m.topic)
        assert match, m.topic
    for topic in (topics.status, topics.stream(config.streams[0].name, "state")):
        assert not set("#+\0") & set(topic)
        assert "//" not in topic
        assert len(topic.encode()) < 65_535


@pytest.mark.slow
@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    section=st.sampled_from(sorted(NUMERIC_KEYS)),
    data=st.data(),
    value=NASTY_NUMBERS,
    node=NAMES,
    stream=NAMES,
    prefix=NAMES,
)
def test_fuzzed_configs_are_refused_cleanly_or_safe_to_run(  # noqa: PLR0917
    tmp_path: Path,
    bundle_dir: Path,
    capsys: pytest.CaptureFixture[str],
    section: str,
    data: st.DataObject,
    value: str,
    node: str,
    stream: str,
    prefix: str,
) -> None:
    key = data.draw(st.sampled_from(NUMERIC_KEYS[section]))
    body = MINIMAL.replace('"fan-1"', f'"{stream}"').replace('"models/fan"', f'"{bundle_dir}"')
    if section == "streams":
        body = body.replace('bundle = "', f'{key} = {value}\nbundle = "')
    elif section.startswith("streams."):
        body += f"[{section}]\n{key} = {value}\n" if section != "streams.source" else ""
        if section == "streams.source":
            body = body.replace('path = "rec.wav"', f'path = "rec.wav"\n{key} = {value}')
    else:
        body = f"[{section}]\n{key} = {value}\n" + body
    text = (
        f'node = "{node}"\n[mqtt]\nprefix = "{prefix}"\n' + body
        if section != "mqtt"
        else (f'node = "{node}"\n' + body.replace("[mqtt]\n", f'[mqtt]\nprefix = "{prefix}"\n'))
    )
    # Through the command an operator (and systemd's ExecStartPre) runs: 0 or 2, never a traceback.
    path = tmp_path / "fuzz.toml"
    path.write_text(text)
    status = cli.main(["check-config", str(path)])
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    try:
        config = parse_config(text, str(path), tmp_path)
    except ConfigError as exc:
        assert status == 2
        message = str(exc)
        assert message
        assert all(line.startswith(f"{path}: ") for line in message.splitlines())
        assert stderr.startswith("anomalyd: error: ")
        return
    assert status == 0, stderr
    _runtime_arithmetic(config)
    ACCEPTED.append(1)


@pytest.mark.slow
def test_the_fuzz_reaches_accepted_configs(tmp_path: Path) -> None:
    """Guards the fuzz above against only ever producing refusals (it runs first: same file, above)."""
    assert len(ACCEPTED) >= 20  # about 10 % of the 400 examples are valid configs


@pytest.mark.slow
def test_check_config_warns_about_credentials_without_tls(bundle_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "plain.toml"
    path.write_text(
        '[mqtt]\nenabled = true\nusername = "u"\npassword_env = "P"\n'
        + MINIMAL.replace('"models/fan"', f'"{bundle_dir}"')
    )
    result = subprocess.run([sys.executable, "-m", "anomalyd", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "anomalyd: warning: mqtt: credentials are configured without TLS" in result.stderr
