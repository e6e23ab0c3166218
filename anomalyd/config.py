"""The daemon's configuration: one TOML file, validated once, into one typed tree.

Unknown keys are refused (a misspelt key must not silently fall back to a default). Every error names
the file, the key path (`streams[1].detector.n`), the bad value and what is allowed. Relative paths are
taken relative to the config file's folder, so a config and its models can move together.
Each component receives only its own section.

Every number has a documented range (and NaN and infinities are refused everywhere): a value that passes
`check-config` can never overflow a timer, a SQL LIMIT or a back-off at run time.
"""

from __future__ import annotations

import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from anomalyd.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/anomalyd/anomalyd.toml")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"  # safe in file names and MQTT topics
# Node ids go into MQTT topics and Home Assistant discovery ids, which allow only [A-Za-z0-9_-].
NODE_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# Topic prefixes: levels of [A-Za-z0-9_-], separated by single slashes (no wildcards, NUL or empty levels).
PREFIX_PATTERN = r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$"
MAX_CONFIG_BYTES = 1_000_000  # a config file is a few kB; anything near this is not a config
DAY_S = 86_400.0


def default_node() -> str:
    """The short host name, made valid as a node id (`edge1.plant` -> `edge1`, odd characters -> `-`)."""
    short = socket.gethostname().split(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_-]", "-", short)[:64] or "anomalyd"


def _check_retry(initial: float, maximum: float) -> None:
    if maximum < initial:
        raise ValueError(f"retry_max_seconds ({maximum}) must not be below retry_initial_seconds ({initial})")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ClipsConfig(_Section):
    enabled: bool = Field(True, description="save a WAV clip of each anomaly")
    directory: Path = Field(Path("clips"), description="folder for clips; relative to the config file")
    pre_roll_seconds: float = Field(5.0, ge=0, le=60, description="audio kept from before the event start")
    post_roll_seconds: float = Field(5.0, ge=0, le=60, description="audio kept after the event end")
    max_seconds: float = Field(120.0, gt=0, le=3600, description="longest clip; a longer event is cut")
    quota_mb: float = Field(
        1024.0, gt=0, le=10_000_000, description="total size of all clips; oldest deleted beyond it"
    )
    min_free_mb: float = Field(
        500.0, ge=0, le=10_000_000, description="no clip is written when the disk has less free"
    )
    base_url: str = Field(
        "",
        pattern=r"^(https?://[^\s]{1,500})?$",
        description="URL under which the clip folder is served (a web server or the dashboard); event "
        "messages then carry each clip's URL; empty = file names only",
    )


class StorageConfig(_Section):
    database: Path = Field(Path("events.db"), description="SQLite event log; relative to the config file")
    retention_days: float = Field(
        365.0, gt=0, le=36_500, description="events and status rows older than this go"
    )
    max_events: int = Field(100_000, gt=0, le=100_000_000, description="newest events kept; older ones go")
    normal_dir: Path | None = Field(
        None,
        description="events marked as false alarms copy their clip into <normal_dir>/<stream>/, extra "
        "normal audio for retraining; relative to the config file; empty = 'normal' beside the database",
    )
    clips: ClipsConfig = ClipsConfig()

    @property
    def normal_folder(self) -> Path:
        return self.normal_dir or self.database.parent / "normal"


class InferenceConfig(_Section):
    max_batch: int = Field(64, ge=1, le=4096, description="windows per ONNX Runtime call, across streams")
    threads: int = Field(1, ge=1, le=64, description="ONNX Runtime threads per model")
    workers: int = Field(
        0,
        ge=0,
        le=64,
        description="worker threads, each taking a share of the streams; 0: as the measured load needs",
    )  # 0: never more than the cores the daemon may run on
    max_lag_seconds: float = Field(
        5.0, ge=0.5, le=3600, description="scores trailing their audio by more than this = stream lagging"
    )


class HealthConfig(_Section):
    silence_dbfs: float = Field(
        -70.0, ge=-200, le=0, description="RMS of 10 ms below this (dBFS) is digital silence (a dropout)"
    )
    silence_seconds: float = Field(
        10.0, gt=0, le=DAY_S, description="continuous silence this long is called a dead or muted microphone"
    )
    clipping_fraction: float = Field(0.01, gt=0, le=1, description="share of full-scale samples = clipping")
    stall_seconds: float = Field(5.0, ge=0.5, le=3600, description="no audio from a device this long = lost")
    retry_initial_seconds: float = Field(
        1.0, ge=0.01, le=3600, description="first wait before reopening a lost device"
    )
    retry_max_seconds: float = Field(
        60.0, ge=0.01, le=3600, description="longest wait between reopening attempts"
    )

    @model_validator(mode="after")
    def _retry_order(self) -> HealthConfig:
        _check_retry(self.retry_initial_seconds, self.retry_max_seconds)
        return self


class TlsConfig(_Section):
    enabled: bool = Field(False, description="connect with TLS; the broker's certificate is always verified")
    ca_file: Path | None = Field(
        None, description="CA certificate(s) to verify the broker; empty = system CAs"
    )
    cert_file: Path | None = Field(None, description="client certificate, when the broker asks for one")
    key_file: Path | None = Field(None, description="the client certificate's private key")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class HomeAssistantConfig(_Section):
    enabled: bool = Field(True, description="publish Home Assistant MQTT discovery for every stream")
    discovery_prefix: str = Field("homeassistant", pattern=r"^[^#+]+$", description="Home Assistant's prefix")


class MqttConfig(_Section):
    enabled: bool = Field(False, description="publish events and status over MQTT")
    host: str = Field(
        "localhost", pattern=r"^[A-Za-z0-9.:_\[\]%-]{1,253}$", description="broker host name or address"
    )
    port: int = Field(0, ge=0, le=65535, description="broker port; 0 = 8883 with TLS, 1883 without")
    client_id: str = Field(
        "", pattern=r"^[A-Za-z0-9_.-]{0,128}$", description="MQTT client id; empty = anomalyd-<node>"
    )
    keepalive_seconds: int = Field(30, ge=5, le=3600, description="MQTT keep-alive")
    prefix: str = Field(
        "anomalyd", pattern=PREFIX_PATTERN, max_length=128, description="first level(s) of every topic"
    )
    username: str = Field("", pattern=r"^[^\x00-\x1f]{0,256}$", description="user name; empty = no login")
    password_file: Path | None = Field(
        None, description="file holding the password (e.g. a systemd credential); never in this config"
    )
    password_env: str = Field(
        "", pattern=r"^([A-Za-z_][A-Za-z0-9_]{0,127})?$", description="or: environment variable holding it"
    )
    tls: TlsConfig = TlsConfig()
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()
    score_interval_seconds: float = Field(
        10.0, ge=0.1, le=DAY_S, description="how often each stream's score is published"
    )
    outbox_max_messages: int = Field(
        100_000,
        ge=100,
        le=10_000_000,
        description="undelivered messages kept; beyond it scores go first, events last",
    )
    retry_initial_seconds: float = Field(1.0, ge=0.01, le=3600, description="first wait before reconnecting")
    retry_max_seconds: float = Field(
        60.0, ge=0.01, le=3600, description="longest wait between reconnection attempts"
    )

    @model_validator(mode="after")
    def _one_password_source(self) -> MqttConfig:
        if self.password_file is not None and self.password_env:
            raise ValueError("give password_file or password_env, not both")
        _check_retry(self.retry_initial_seconds, self.retry_max_seconds)
        return self

    @property
    def has_credentials(self) -> bool:
        return bool(self.username or self.password_file or self.password_env)

    @property
    def broker_port(self) -> int:
        return self.port or (8883 if self.tls.enabled else 1883)


class MicSource(_Section):
    type: Literal["mic"]
    device: str | int = Field(
        description="input device: a case-insensitive substring of its name (see `anomalyd devices`), "
        "or its index"
    )
    channel: int = Field(0, ge=0, le=255, description="channel of the device this stream listens to")
    sample_rate: int = Field(
        0, ge=0, le=384_000, description="capture rate in Hz (8000-384000); 0 = the device's default"
    )
    block_seconds: float = Field(0.1, gt=0, le=2, description="audio per capture callback")

    @field_validator("sample_rate")
    @classmethod
    def _rate_range(cls, rate: int) -> int:
        if rate and not 8000 <= rate <= 384_000:
            raise ValueError(f"must be 0 (the device's default) or 8000..384000 Hz, got {rate}")
        return rate


class FileSource(_Section):
    type: Literal["file"]
    path: Path = Field(description="WAV or FLAC file to replay; relative to the config file")
    channel: int = Field(0, ge=0, le=255, description="channel of the file")
    realtime: bool = Field(
        True, description="pace replay at the file's own speed; false = as fast as possible"
    )
    loop: bool = Field(False, description="start again at the end instead of ending the stream")
    block_seconds: float = Field(0.1, gt=0, le=10, description="audio handed on at a time")


Source = Annotated[MicSource | FileSource, Field(discriminator="type")]


class DetectorConfig(_Section):
    n: int = Field(
        3, ge=1, le=1000, description="windows over the threshold, out of the last m, that open an event"
    )
    m: int = Field(5, ge=1, le=1000, description="windows looked at for the n-of-m rule")
    hold_off_windows: int = Field(
        4, ge=1, le=1000, description="consecutive windows under the threshold that close an open event"
    )
    cooldown_seconds: float = Field(
        30.0, ge=0, le=DAY_S, description="after an event closes, no new one opens for this long"
    )
    update_seconds: float = Field(
        10.0, ge=0.5, le=DAY_S, description="interval of update messages while an event is open"
    )
    k: float | None = Field(
        None, gt=0, le=1000, description="override the bundle's k in mean + k * std (window scores)"
    )
    threshold: float | None = Field(
        None, gt=0, le=1e9, description="absolute window-score threshold; overrides k"
    )

    @model_validator(mode="after")
    def _n_within_m(self) -> DetectorConfig:
        if self.n > self.m:
            raise ValueError(f"n ({self.n}) must not exceed m ({self.m})")
        return self


class StreamConfig(_Section):
    name: str = Field(pattern=NAME_PATTERN, description="stream id: letters, digits, '-' and '_'")
    bundle: Path = Field(description="model bundle folder; relative to the config file")
    source: Source
    detector: DetectorConfig = DetectorConfig()
    area: str = Field(
        "",
        pattern=r"^[^\x00-\x1f]{0,64}$",
        description="where the machine stands (e.g. 'Hall 2'); Home Assistant's suggested area",
    )
    mute_minutes: float = Field(
        60.0,
        gt=0,
        le=10_080,
        description="how long a mute without a duration lasts (Home Assistant's "
        "Mute switch); changed at run time over MQTT",
    )


SOCKET_PATH_MAX = 107  # bytes: a Unix socket's path must fit sockaddr_un.sun_path (108 with its NUL)


class ControlConfig(_Section):
    socket: Path = Field(
        Path("/run/anomalyd/control.sock"),
        description="Unix socket of the local control channel (`anomalyd record`); relative to the config "
        "file; its folder is the service's RuntimeDirectory",
    )

    @field_validator("socket")
    @classmethod
    def _socket_path(cls, path: Path) -> Path:
        raw = str(path)
        if not raw or raw == "." or "\x00" in raw:
            raise ValueError("give the socket's file path, e.g. /run/anomalyd/control.sock")
        if len(raw.encode()) > SOCKET_PATH_MAX:
            raise ValueError(f"a Unix socket path holds at most {SOCKET_PATH_MAX} bytes")
        return path


class WebConfig(_Section):
    enabled: bool = Field(False, description="serve the dashboard, /metrics and /healthz from the daemon")
    listen: str = Field(
        "127.0.0.1",
        pattern=r"^[A-Za-z0-9.:_\[\]%-]{1,253}$",
        description="address to listen on: 127.0.0.1 = this box only (the default); 0.0.0.0 or an "
        "interface's address opens the read-only pages and /metrics to that network",
    )
    port: int = Field(8470, ge=1, le=65535, description="TCP port of the dashboard")
    token_file: Path | None = Field(
        None,
        description="file holding the token that muting and marking from the dashboard need (at least 16 "
        "characters; e.g. a systemd credential); empty = the systemd credential 'web-token' when the unit "
        "passes one, else the dashboard is read-only. Never put the token itself in this file",
    )
    history_minutes: float = Field(
        10.0, ge=1, le=120, description="minutes of scores each stream's tile shows"
    )


class DaemonConfig(_Section):
    node: str = Field(
        "",
        description="this machine's id in events and topics: letters, digits, '-' and '_', at most 64; "
        "empty = the short host name, made valid",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    storage: StorageConfig = StorageConfig()
    inference: InferenceConfig = InferenceConfig()
    health: HealthConfig = HealthConfig()
    mqtt: MqttConfig = MqttConfig()
    control: ControlConfig = ControlConfig()
    web: WebConfig = WebConfig()
    streams: list[StreamConfig] = Field(min_length=1, description="one entry per monitored machine")

    @field_validator("node")
    @classmethod
    def _node_id(cls, node: str) -> str:
        if node and not re.fullmatch(NODE_PATTERN, node):
            raise ValueError(
                "use letters, digits, '-' and '_' only, at most 64 (e.g. 'edge1' for edge1.plant): "
                "it goes into MQTT topics and Home Assistant ids"
            )
        return node

    @field_validator("streams")
    @classmethod
    def _unique_names(cls, streams: list[StreamConfig]) -> list[StreamConfig]:
        names = [s.name for s in streams]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"stream names must be unique, repeated: {', '.join(repeated)}")
        return streams

    @property
    def node_id(self) -> str:
        return self.node or default_node()


def config_warnings(config: DaemonConfig) -> list[str]:
    """Things that work but that an operator should know about (logged at start, shown by check-config)."""
    found = []
    mqtt = config.mqtt
    web = config.web
    if web.enabled and web.listen not in ("127.0.0.1", "::1", "localhost"):
        found.append(
            f"web: the dashboard listens on {web.listen}: its read-only pages, clips and /metrics are open "
            "to that network; muting and marking still need the token"
        )
    if mqtt.enabled and mqtt.has_credentials and not mqtt.tls.enabled:
        found.append(
            f"mqtt: credentials are configured without TLS: the password crosses the network to "
            f"{mqtt.host} in clear text; set [mqtt.tls] enabled = true"
        )
    return found


_SOURCE_TAGS: dict[str, type[BaseModel]] = {"mic": MicSource, "file": FileSource}


def _key_path(loc: tuple[int | str, ...]) -> str:
    """('streams', 0, 'source', 'mic', 'device') -> 'streams[0].source.device' (drops union tags)."""
    path = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _SOURCE_TAGS and i > 0 and loc[i - 1] == "source":
            continue
        else:
            path += f".{part}" if path else part
    return path or "(top level)"


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """The config section class inside an annotation such as `list[StreamConfig]`, if there is one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        inner = _inner_model(arg)
        if inner is not None:
            return inner
    return None


def _allowed_keys(loc: tuple[int | str, ...]) -> list[str]:
    """Keys allowed in the section holding the unknown key at `loc`."""
    model: type[BaseModel] | None = DaemonConfig
    for i, part in enumerate(loc[:-1]):
        if isinstance(part, int) or model is None:
            continue
        if part in _SOURCE_TAGS and i > 0 and loc[i - 1] == "source":
            model = _SOURCE_TAGS[part]
            continue
        field = model.model_fields.get(part)
        model = _inner_model(field.annotation) if field is not None else None
    return sorted(model.model_fields) if model is not None else []


def _short(value: Any, limit: int = 80) -> str:
    """A value's repr for one log line: a 1 MB string must not become a 1 MB error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def format_errors(source: str, exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        where = _key_path(loc)
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(loc))
            lines.append(f"{source}: {where}: unknown key; allowed here: {allowed}")
            continue
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            lines.append(f"{source}: {where}: required key is missing")
        else:
            lines.append(f"{source}: {where} = {_short(error['input'])}: {message}")
    return "\n".join(lines)


def _resolve_paths(config: DaemonConfig, base: Path) -> DaemonConfig:
    def absolute(path: Path) -> Path:
        return path if path.is_absolute() else (base / path).resolve()

    storage = config.storage.model_copy(
        update={
            "database": absolute(config.storage.database),
            "normal_dir": absolute(config.storage.normal_dir) if config.storage.normal_dir else None,
            "clips": config.storage.clips.model_copy(
                update={"directory": absolute(config.storage.clips.directory)}
            ),
        }
    )
    tls = config.mqtt.tls
    mqtt = config.mqtt.model_copy(
        update={
            "password_file": absolute(config.mqtt.password_file) if config.mqtt.password_file else None,
            "tls": tls.model_copy(
                update={
                    key: absolute(value)
                    for key, value in (
                        ("ca_file", tls.ca_file),
                        ("cert_file", tls.cert_file),
                        ("key_file", tls.key_file),
                    )
                    if value is not None
                }
            ),
        }
    )
    control = config.control.model_copy(update={"socket": absolute(config.control.socket)})
    token = config.web.token_file
    web = config.web.model_copy(update={"token_file": absolute(token) if token is not None else None})
    streams = []
    for stream in config.streams:
        source = stream.source
        if isinstance(source, FileSource):
            source = source.model_copy(update={"path": absolute(source.path)})
        streams.append(stream.model_copy(update={"bundle": absolute(stream.bundle), "source": source}))
    return config.model_copy(
        update={"storage": storage, "streams": streams, "mqtt": mqtt, "control": control, "web": web}
    )


def parse_config(text: str, source: str, base: Path) -> DaemonConfig:
    """Validate TOML text; `source` names it in errors, `base` anchors relative paths."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text)} characters; a config file holds at most {MAX_CONFIG_BYTES}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{source}: not valid TOML: arrays or tables nested too deeply") from exc
    try:
        config = DaemonConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(source, exc)) from exc
    return _resolve_paths(config, base)


def load_config(path: Path) -> DaemonConfig:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        text = raw.decode()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from exc
    return parse_config(text, str(path), path.resolve().parent)
