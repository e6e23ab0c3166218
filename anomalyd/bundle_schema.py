"""model.json, checked field by field before anything in it is used.

A bundle comes from disk: it may have been edited by hand, damaged, or made by something else. Every field
has a strict type (no "3" for 3, no true for 1), a range, and no number may be NaN or infinite; lists have
a bounded length; file names are plain names inside the bundle folder. Rules between fields (as many
normalisation values as mel bands, the filterbank's shape, the graph's shape) are checked by
`anomalyd.bundle` and `anomalyd.inference` afterwards. A failure is one line naming the file, the field,
the value and what is allowed.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from anomalyd.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE
from anomalyd.errors import BundleError

MAX_MELS = 512  # mel bands
MAX_N_FFT = 16_384  # samples
MAX_WINDOW_FRAMES = 1_024  # frames per window
MAX_FILES = 16  # files listed in `files`
MAX_K = 100.0  # threshold = mean + k * std
MAX_DB = 1e4  # |normalisation mean| and std, in dB
MIN_STD_DB = 1e-6  # normalisation std; training floors it at 1e-3 dB
MIN_RESIDUAL_VAR = 1e-12  # a band's pooled residual variance; training floors it there too
MAX_COUNT = 10**12  # clips and windows behind the threshold statistics
THRESHOLD_TOLERANCE = 1e-6  # relative: `value` must equal mean + k * std

FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # no separator, no leading dot: stays inside
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"

_repr = reprlib.Repr()  # bounded, whatever the value: model.json may hold megabytes in one field
_repr.maxstring = _repr.maxother = 40
_repr.maxlist = _repr.maxdict = 4
_repr.maxlevel = 2

ShortText = Annotated[str, Field(min_length=1, max_length=32, pattern=PRINTABLE)]


def _file_name(name: str) -> str:
    if not FILE_NAME.fullmatch(name):
        raise ValueError(
            "allowed: a plain file name inside the bundle folder (letters, digits, '.', '_', '-', not "
            "starting with '.'; no '/')"
        )
    return name


def _sha256(digest: str) -> str:
    if not SHA256_HEX.fullmatch(digest):
        raise ValueError("allowed: a SHA-256 digest, 64 lowercase hexadecimal digits")
    return digest


FileName = Annotated[str, AfterValidator(_file_name)]
Sha256 = Annotated[str, AfterValidator(_sha256)]


def _aware_iso_time(value: str) -> str:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise ValueError("an ISO 8601 time needs its UTC offset")
    return value


class _Doc(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class FeaturesDoc(_Doc):
    sample_rate: int = Field(ge=MIN_SAMPLE_RATE, le=MAX_SAMPLE_RATE, description="Hz")
    n_fft: int = Field(ge=16, le=MAX_N_FFT, description="samples per FFT frame")
    hop_length: int = Field(ge=1, le=MAX_N_FFT, description="samples between frame starts")
    n_mels: int = Field(ge=1, le=MAX_MELS, description="mel bands")
    fmin: float = Field(ge=0, le=MAX_SAMPLE_RATE / 2, description="Hz")
    fmax: float = Field(gt=0, le=MAX_SAMPLE_RATE / 2, description="Hz")
    power: float = Field(gt=0, le=4, description="exponent of the magnitude spectrum")
    amin: float = Field(gt=0, le=1, description="power floor before log10")
    window: ShortText
    center: bool
    mel_scale: ShortText
    mel_norm: ShortText


class WindowDoc(_Doc):
    n_frames: int = Field(ge=1, le=MAX_WINDOW_FRAMES, description="log-mel frames per window")
    hop_frames: int = Field(ge=1, le=4 * MAX_WINDOW_FRAMES, description="frames between window starts")
    pool_frames: int = Field(ge=1, le=MAX_WINDOW_FRAMES, description="frames per residual block")
    # Format version 4; before, the model reconstructed each window whole.
    tile_frames: int = Field(0, ge=0, le=MAX_WINDOW_FRAMES, description="frames per model input (tile)")


class NormalisationDoc(_Doc):
    mean: list[Annotated[float, Field(ge=-MAX_DB, le=MAX_DB)]] = Field(min_length=1, max_length=MAX_MELS)
    std: list[Annotated[float, Field(ge=MIN_STD_DB, le=MAX_DB)]] = Field(min_length=1, max_length=MAX_MELS)
    # Format version 2; a version 1 bundle was trained on windows as they are.
    levelling: Literal["none", "window_power"] = "none"


class ResidualDoc(_Doc):
    """Format 3: each band's mean and variance of the pooled residual on the training windows."""

    mean: list[Annotated[float, Field(ge=-MAX_DB, le=MAX_DB)]] = Field(min_length=1, max_length=MAX_MELS)
    var: list[Annotated[float, Field(ge=MIN_RESIDUAL_VAR, le=MAX_DB)]] = Field(
        min_length=1, max_length=MAX_MELS
    )
    n_blocks: int = Field(ge=2, le=MAX_COUNT)


MAX_SOURCES = 10_000  # audio files or folders named in a calibration
MAX_DAY_EVENTS = 1e9  # events per day: more than one per window of 0.1 ms is not a rate anyone asks for
NonNegative = Annotated[float, Field(ge=0)]


class CalibrationDetectorDoc(_Doc):
    n: int = Field(ge=1, le=1000)
    m: int = Field(ge=1, le=1000)
    hold_off_windows: int = Field(ge=1, le=1000)
    cooldown_seconds: float = Field(ge=0, le=86_400)


class CalibrationAnomalyDoc(_Doc):
    files: int = Field(ge=1, le=MAX_COUNT)
    detected: int = Field(ge=0, le=MAX_COUNT)
    detection_rate: float = Field(ge=0, le=1)
    median_delay_seconds: NonNegative | None = Field(description="null when nothing was detected")


class CalibrationDoc(_Doc):
    """How `anomalyd calibrate` chose k: the budget and the evidence on the audio it replayed."""

    k: float = Field(ge=0, le=MAX_K)
    false_alarms_per_day: float = Field(gt=0, le=MAX_DAY_EVENTS)
    normal_seconds: float = Field(gt=0, le=1e12)
    events: int = Field(ge=0, le=MAX_COUNT)
    events_per_day: float = Field(ge=0, le=MAX_DAY_EVENTS)
    events_per_day_upper95: float = Field(ge=0, le=1e12)
    detector: CalibrationDetectorDoc
    anomaly: CalibrationAnomalyDoc | None
    calibrated_at: str = Field(max_length=64, description="UTC, ISO 8601 with offset")
    normal_sources: list[Annotated[str, Field(max_length=4096)]] = Field(min_length=1, max_length=MAX_SOURCES)
    anomaly_sources: list[Annotated[str, Field(max_length=4096)]] = Field(max_length=MAX_SOURCES)

    @field_validator("calibrated_at")
    @classmethod
    def _aware_time(cls, value: str) -> str:
        return _aware_iso_time(value)


class ThresholdDoc(_Doc):
    k: float = Field(ge=0, le=MAX_K)
    value: float = Field(ge=0)
    mean: float = Field(ge=0)
    std: float = Field(ge=0)
    n_clips: int = Field(ge=2, le=MAX_COUNT)
    window_mean: float = Field(ge=0)
    window_std: float = Field(ge=0)
    n_windows: int = Field(ge=2, le=MAX_COUNT)
    calibration: CalibrationDoc | None = None

    @model_validator(mode="after")
    def _value_is_the_rule(self) -> ThresholdDoc:
        # `value` is derived; an edited value that no longer equals the rule would be silently ignored.
        expected = self.mean + self.k * self.std
        if not math.isclose(self.value, expected, rel_tol=THRESHOLD_TOLERANCE, abs_tol=1e-12):
            raise ValueError(f"value {self.value} is not mean + k * std = {expected}")
        # The evidence must describe the k in use: a k edited after calibration has none.
        if self.calibration is not None and self.calibration.k != self.k:
            raise ValueError(
                f"k {self.k} is not the calibrated k {self.calibration.k}; "
                "calibrate again or remove the calibration"
            )
        return self


def _sample_rate_key(key: str) -> str:
    if not (key.isdigit() and MIN_SAMPLE_RATE <= int(key) <= MAX_SAMPLE_RATE):
        raise ValueError(f"allowed: a sample rate in Hz, {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE}, as digits")
    return key


SampleRate = Annotated[int, Field(ge=MIN_SAMPLE_RATE, le=MAX_SAMPLE_RATE, description="Hz")]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class TrainingAudioDoc(_Doc):
    """`training.audio`: where the training audio came from (written by training, read by scoring)."""

    files: Count
    seconds: float = Field(ge=0, le=1e9, description="usable audio, at the model rate")
    formats: dict[ShortText, Count] = Field(max_length=32, description="libsndfile format name -> files")
    sample_rates: dict[Annotated[str, AfterValidator(_sample_rate_key)], Count] = Field(
        max_length=64, description="the files' own rate (Hz, as text) -> files"
    )
    lossy: bool
    devices: list[Annotated[str, Field(min_length=1, max_length=256, pattern=PRINTABLE)]] = Field(
        [], max_length=64, description="capture devices named by the folders' recording manifests"
    )
    capture_rates: list[SampleRate] = Field([], max_length=64, description="the devices' rates, Hz")
    recorded_by: Annotated[str, Field(max_length=64, pattern=PRINTABLE)] | None = None


class TrainingDoc(_Doc):
    """`training`: descriptive and free-form, but for the parts scoring reads, which are checked."""

    model_config = ConfigDict(extra="allow")

    audio: TrainingAudioDoc | None = None


class MetaDoc(_Doc):
    format: Literal["anomalyd-bundle"]
    format_version: Literal[1, 2, 3, 4]
    model_id: str = Field(min_length=1, max_length=256, pattern=PRINTABLE)
    created_at: str = Field(max_length=64, description="UTC, ISO 8601 with offset")
    features: FeaturesDoc
    window: WindowDoc
    normalisation: NormalisationDoc
    threshold: ThresholdDoc
    files: dict[FileName, Sha256] = Field(max_length=MAX_FILES, description="file name -> SHA-256")
    # Descriptive only: nothing in scoring reads them (but training.audio, for a warning).
    architecture: dict[str, Any] = {}
    training: TrainingDoc = TrainingDoc()
    export: dict[str, Any] = {}
    versions: dict[str, Annotated[str, Field(max_length=256)]] = Field({}, max_length=64)
    residual: ResidualDoc | None = None  # format 3, where it is required

    @field_validator("created_at")
    @classmethod
    def _aware_time(cls, value: str) -> str:
        return _aware_iso_time(value)

    @model_validator(mode="after")
    def _fields_match_the_version(self) -> MetaDoc:
        # A version 1 reader would ignore the field and score unlevelled windows: wrong, silently.
        if self.format_version == 1 and "levelling" in self.normalisation.model_fields_set:
            raise ValueError("normalisation.levelling needs format_version 2")
        # Either way round a reader would score differently from the trainer, silently.
        if self.format_version < 3 and self.residual is not None:
            raise ValueError("residual needs format_version 3")
        if self.format_version >= 3 and self.residual is None:
            raise ValueError("residual: required from format_version 3 on (how windows are scored)")
        if (self.format_version >= 4) != bool(self.window.tile_frames):
            raise ValueError("window.tile_frames: a positive number from format_version 4 on, absent before")
        return self


def _submodel(model: type[BaseModel] | None, part: int | str) -> type[BaseModel] | None:
    field = model.model_fields.get(str(part)) if model is not None else None
    annotation = field.annotation if field is not None else None
    # An optional section (`CalibrationDoc | None`) names its fields like a required one.
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _where(loc: tuple[int | str, ...]) -> str:
    """('normalisation', 'std', 3) -> normalisation.std[3]; ('files', 'x', '[key]') -> files['x'] (name)"""
    path = ""
    model: type[BaseModel] | None = MetaDoc
    for part in loc:
        if part == "[key]":
            path += " (name)"
        elif isinstance(part, int) or model is None:
            path += f"[{part!r}]"
        else:
            # An unknown key may hold anything, a line break included: quoted unless a plain name.
            name = part if part.isidentifier() else repr(part)
            path += f".{name}" if path else name
        model = _submodel(model, part)
    return path or "(top level)"


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    """Field names allowed in the object holding the last part of `loc`."""
    model: type[BaseModel] | None = MetaDoc
    for part in loc[:-1]:
        model = _submodel(model, part)
    return sorted(model.model_fields) if model is not None else []


def describe(source: Path, exc: ValidationError, limit: int = 3) -> str:
    """One line: the file, then each bad field with its value and what is allowed (the first `limit`)."""
    errors = exc.errors(include_url=False)
    parts = []
    for error in errors[:limit]:
        loc = tuple(error["loc"])
        where = _where(loc)
        if error["type"] == "missing":
            parts.append(f"{where}: required field is missing")
        elif error["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown field; allowed here: {', '.join(_fields_at(loc))}")
        else:
            message = error["msg"].removeprefix("Value error, ")
            parts.append(f"{where} = {_repr.repr(error['input'])}: {message}")
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return f"{source}: " + "; ".join(parts)


def parse_meta(source: Path, data: Any) -> MetaDoc:
    """Validate model.json's parsed content; raises BundleError with `describe`'s line."""
    try:
        return MetaDoc.model_validate(data)
    except ValidationError as exc:
        raise BundleError(describe(source, exc)) from exc
