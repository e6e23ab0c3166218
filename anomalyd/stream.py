"""One monitored stream inside the worker: audio blocks in; windows, scores, events and status out.

Owned by the worker thread alone, so it needs no locks. Time comes from sample counts at the model rate,
anchored to one wall-clock reading when the source (re)opens.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from anomalyd.bundle import Bundle, load_bundle
from anomalyd.capacity import Cost, stream_cost
from anomalyd.clips import ClipRecorder
from anomalyd.config import ClipsConfig, HealthConfig, StreamConfig
from anomalyd.detector import Detector, Phase, Transition, WindowScore
from anomalyd.features import LogMel
from anomalyd.health import HealthMonitor, sanitise
from anomalyd.inbox import MAX_MERGED_SECONDS
from anomalyd.inference import Autoencoder, open_autoencoder
from anomalyd.records import AnomalyEvent, ClipJob, SourceState, SourceStatus, utc_now
from anomalyd.sources.base import AudioBlock, SourceNotice
from anomalyd.streaming import Resampler, Step, StreamingWindows, Tile, Window
from anomalyd.tiles import TileStore
from anomalyd.trace import EventTrace, LeadIn, ScoreTrail

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Model:
    """A loaded bundle; streams that name the same bundle folder share one."""

    bundle: Bundle
    logmel: LogMel
    autoencoder: Autoencoder
    cost: Cost  # what one real-time stream of it takes of a core here (anomalyd/capacity.py)

    @classmethod
    def load(cls, path: Path, threads: int) -> Model:
        bundle = load_bundle(path)
        meta = bundle.meta
        logmel, autoencoder = LogMel(meta.features, bundle.filterbank), open_autoencoder(bundle, threads)
        return cls(bundle, logmel, autoencoder, stream_cost(logmel, autoencoder, meta.window))

    @property
    def rate(self) -> int:
        return self.bundle.meta.features.sample_rate


@dataclass
class Output:
    """What one step of a stream produced, for the worker to pass on."""

    tiles: list[Tile] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    events: list[AnomalyEvent] = field(default_factory=list)
    statuses: list[SourceStatus] = field(default_factory=list)
    clips: list[ClipJob] = field(default_factory=list)
    audio: npt.NDArray[np.float32] | None = None  # the block at the model rate, as windowed (for recording)

    def extend(self, other: Output) -> None:
        self.tiles += other.tiles
        self.windows += other.windows
        self.events += other.events
        self.statuses += other.statuses
        self.clips += other.clips


class StreamRuntime:
    def __init__(
        self,
        config: StreamConfig,
        model: Model,
        node: str,
        health: HealthConfig,
        clips: ClipsConfig,
        *,
        trail_seconds: float = 0.0,
    ) -> None:
        """`trail_seconds`: keep this much of the recent scores for the dashboard (0: none)."""
        self.config = config
        self.model = model
        self.node = node
        meta = model.bundle.meta
        stats = meta.threshold.window_scores
        detector = config.detector
        if detector.threshold is not None:
            self.k: float | None = None
            self.threshold = detector.threshold
        else:
            self.k = detector.k if detector.k is not None else meta.threshold.k
            self.threshold = stats.threshold(self.k)
        self.detector = Detector(detector, self.threshold, model.rate)
        self.windows = StreamingWindows(model.logmel, meta.window)
        self.tiles = TileStore(meta.window)  # reconstructed tiles of the windows not yet scored
        self.health = HealthMonitor(health)
        # An event can start m windows and a window length before the window that opens it, which is
        # scored at most one worker step (a block, or blocks merged up to MAX_MERGED_SECONDS) after its
        # audio arrived.
        frames_back = detector.m * meta.window.hop_frames + meta.window.n_frames + 2
        block = int(max(config.source.block_seconds, MAX_MERGED_SECONDS) * model.rate)
        lookback = frames_back * meta.features.hop_length + block
        self.clips = ClipRecorder(config.name, clips, model.rate, lookback) if clips.enabled else None
        hop_seconds = meta.window.hop_frames * meta.features.hop_length / model.rate
        self.trail = ScoreTrail(math.ceil(trail_seconds / hop_seconds) + 1) if trail_seconds else None
        self._lead = LeadIn()
        self._lead_samples = int(clips.pre_roll_seconds * model.rate)  # an event's chart starts this early
        self._trace: EventTrace | None = None
        self._resampler: Resampler | None = None
        self._fed = 0  # samples fed to the resampler since it was made
        self._fed_from = 0  # samples (at the model rate) the stream had then
        self._anchor: tuple[int, dt.datetime] | None = None  # (sample index, its UTC time)
        self._reanchor = True
        self._event_id: str | None = None
        self._event_started_at: dt.datetime | None = None
        self.last_score = math.nan
        self.windows_scored = 0
        self.windows_silent = 0  # not scored: digital silence (a dropout) in some part of them
        self.windows_nonfinite = 0  # not compared: the model gave a NaN or infinite score
        self.samples_invalid = 0  # NaN, infinite or absurd samples, zeroed on entry
        # Audio time (UTC) of the end of the last window the worker has scored: lag is now minus this.
        self.scored_until: dt.datetime | None = None
        # When the source last opened, plus one window: the first score is due then, so a stream whose
        # audio the worker never gets to lags from that moment on, not silently.
        self._first_due: dt.datetime | None = None
        self._window = dt.timedelta(seconds=meta.features.n_samples(meta.window.n_frames) / model.rate)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def event_id(self) -> str | None:
        """The open event's id."""
        return self._event_id

    @property
    def event_open(self) -> bool:
        return self._event_id is not None

    def time_at(self, sample: int) -> dt.datetime:
        anchor_sample, anchor_time = self._anchor or (0, utc_now())
        return anchor_time + dt.timedelta(seconds=(sample - anchor_sample) / self.model.rate)

    def lag_seconds(self, now: dt.datetime) -> float | None:
        """How far the scores trail the audio: now minus the audio time of the last scored window's end.

        None while nothing is being captured (lost, ended, not yet opened): that is a health matter.
        """
        if self.health.state in (None, SourceState.LOST, SourceState.ENDED):
            return None
        since = max((t for t in (self.scored_until, self._first_due) if t is not None), default=None)
        return None if since is None else max(0.0, (now - since).total_seconds())

    def feed(self, block: AudioBlock) -> Output:
        out = Output()
        samples = self._observe(block, out)
        if self._resampler is None or self._resampler.in_rate != block.rate:
            self._resampler = Resampler(block.rate, self.model.rate)
            self._fed, self._fed_from = 0, self.windows.samples_in
        self._fed += len(samples)
        samples = self._resampler(samples)
        first = self.windows.samples_in
        if self._reanchor:
            # The block's last sample was captured about now; sample counts carry time from here on.
            self._anchor = (first + len(samples), utc_now())
            self._reanchor = False
        step = self.windows.push(samples)
        out.tiles, out.windows = step.tiles, step.windows
        out.audio = samples
        if self.clips is not None:
            self._add_clip(out, self.clips.push(first, samples))
        return out

    def completes_nothing(self, samples: int, rate: int) -> bool:
        """Whether `samples` more audio at `rate` is sure to complete no tile or window, so that it can wait
        and be fed with the audio after it (anomalyd/holdback.py). A resampler's output never runs ahead of
        its input's duration (soxr's trails it by its filter's delay)."""
        if self._resampler is None or self._resampler.in_rate != rate:
            return False
        most = (self._fed + samples) * self.model.rate  # the most output it can give, times `rate`
        wanted = (self.windows.samples_in - self._fed_from + self.windows.samples_wanted()) * rate
        return most < wanted

    def _observe(self, block: AudioBlock, out: Output) -> npt.NDArray[np.float32]:
        """The block's samples made safe, health judged a second at a time (merged blocks can be long)."""
        pieces = []
        zeroed = 0
        at = 0
        while at < len(block.samples):
            piece = block.samples[at : at + self.health.samples_to_second(block.rate)]
            at += len(piece)
            clean, invalid = sanitise(piece)
            zeroed += invalid
            change = self.health.observe(clean, block.rate, invalid)
            if change:
                out.statuses.append(self._status(*change))
            pieces.append(clean)
        self.samples_invalid += zeroed
        # Pieces left as they were are views of the block: it needs copying only when one was cleaned.
        return np.concatenate(pieces) if zeroed else block.samples

    def drain(self) -> Step:
        """Tiles and windows still held by the resampler, at the end of a source's audio."""
        if self._resampler is None:
            return Step([], [])
        tail = self._resampler(np.empty(0, dtype=np.float32), last=True)
        self._resampler = None
        return self.windows.push(tail) if len(tail) else Step([], [])

    def notice(self, notice: SourceNotice) -> Output:
        out = Output()
        if notice.state != SourceState.OK:
            out.extend(
                self.finish(reason="source-lost" if notice.state == SourceState.LOST else "stream-ended")
            )
        else:
            self._reanchor = True
            self._first_due = utc_now() + self._window
        change = self.health.source_reports(notice.state, notice.detail)
        if change:
            out.statuses.append(self._status(*change))
        return out

    def scored(self, window: Window, score: float) -> Output:
        """The inference worker scored one of this stream's windows."""
        out = Output()
        self.scored_until = self.time_at(window.end_sample)
        if window.quietest_dbfs < self.health.config.silence_dbfs:
            # Digital silence anywhere in a window (a dead microphone, a dropout and its edges)
            # reconstructs badly: a health matter, reported by the source's state, not an anomaly.
            self.windows_silent += 1
            return out
        if not math.isfinite(score):
            # Inputs are sanitised, so only a broken model gets here; a NaN compares as "not over the
            # threshold" and would hide a fault, so it is counted and reported, never compared.
            self.windows_nonfinite += 1
            if self.windows_nonfinite in (1, 10, 100) or self.windows_nonfinite % 1000 == 0:
                logger.error(
                    "stream %s: the model gave %d non-finite score(s); they are not compared with the "
                    "threshold (model %s)",
                    self.name, self.windows_nonfinite, self.model.bundle.meta.model_id,
                )  # fmt: skip
            return out
        self.windows_scored += 1
        self.last_score = score
        centre = (window.start_sample + window.end_sample) // 2
        self._lead.add(centre, score)
        if self._trace is not None:
            self._trace.add(centre, score)
        if self.trail is not None:
            self.trail.add(self.scored_until.timestamp(), score)
        for transition in self.detector.push(
            WindowScore(window.index, window.start_sample, window.end_sample, score)
        ):
            out.extend(self._on_transition(transition))
        return out

    def finish(self, reason: str) -> Output:
        """Close any open event (shutdown, source lost or ended, reconfiguration) and flush its clip."""
        out = Output()
        for transition in self.detector.close(self.windows.samples_in, reason):
            out.extend(self._on_transition(transition))
        if self.clips is not None:
            self._add_clip(out, self.clips.flush())
        self._resampler = None
        return out

    def _add_clip(self, out: Output, job: ClipJob | None) -> None:
        if job is not None:
            out.clips.append(job)

    def _on_transition(self, t: Transition) -> Output:
        out = Output()
        if t.phase == Phase.START:
            self._event_id = uuid.uuid4().hex
            self._event_started_at = self.time_at(t.start_sample)
            lead = self._lead.after(t.start_sample - self._lead_samples)
            self._trace = EventTrace(t.start_sample, self.model.rate, lead)
            if self.clips is not None:
                self.clips.start(self._event_id, self._event_started_at, t.start_sample)
        assert self._event_id is not None
        assert self._event_started_at is not None
        ended = t.phase == Phase.END
        meta = self.model.bundle.meta
        stats = meta.threshold.window_scores
        out.events.append(
            AnomalyEvent(
                event_id=self._event_id,
                type=t.phase.value,
                node=self.node,
                stream=self.name,
                started_at=self._event_started_at,
                ended_at=self.time_at(t.end_sample) if ended else None,
                start_sample=t.start_sample,
                end_sample=t.end_sample,
                score=self.last_score,
                peak_score=t.peak_score,
                mean_score=t.mean_score,
                threshold=self.threshold,
                mean=stats.mean,
                std=stats.std,
                k=self.k,
                model_id=meta.model_id,
                windows=t.windows,
                windows_over=t.windows_over,
                reason=t.reason,
                at=utc_now(),
                scores=self._trace.points() if self._trace is not None else (),
            )
        )
        if ended:
            if self.clips is not None:
                self._add_clip(out, self.clips.end(t.end_sample))
            self._event_id = self._event_started_at = None
            self._trace = None
        return out

    def _status(self, state: SourceState, detail: str) -> SourceStatus:
        log = logger.info if state in (SourceState.OK, SourceState.ENDED) else logger.warning
        log("stream %s: source %s (%s)", self.name, state.value, detail)
        return SourceStatus(self.node, self.name, state, detail, utc_now())
