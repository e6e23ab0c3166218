"""Calibration: choose k in mean + k * std (validation *window* scores) for a false-alarm budget.

    anomalyd calibrate --bundle B --normal AUDIO... [--anomaly AUDIO...] --false-alarms-per-day X

Each file is streamed once through the daemon's own `StreamingWindows` and autoencoder to window scores;
then, for a candidate k, the daemon's own `Detector` (n-of-m, hold-off, cooldown) is replayed over those
scores (`anomalyd.replay`) and its events per day of normal audio are counted.

How k is searched: by bisection over the sorted distinct window scores of the normal audio. The event
count can change only where the threshold crosses a window score, so these are the only thresholds worth
trying, at any resolution a grid could offer; and "no event at all" is monotone in the threshold (raising
it only removes windows from every n-of-m set), so for a budget that allows no event in the replayed
audio — the usual case, 1 a day allows none in a day's audio — bisection finds exactly the smallest
threshold. (With hold-off and cooldown a larger count is not strictly monotone: a higher threshold can
split one event into two; the chosen k is therefore replayed again and moved up until it keeps the
budget.) k is then rounded up to 0.001.

The evidence is only as strong as the audio is long: the one-sided 95 % Poisson upper bound on the
event rate is reported beside the observed rate; with zero events it is -ln(0.05) = 3.0 events per
length of audio, so demonstrating 1 false alarm a day takes 72 hours of normal audio without one.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from anomalyd.audio import list_audio_files
from anomalyd.bundle import Bundle, ScoreStats, load_bundle, write_meta
from anomalyd.bundle_schema import MAX_K
from anomalyd.config import DetectorConfig
from anomalyd.errors import AudioError, CalibrationError
from anomalyd.records import iso, utc_now
from anomalyd.replay import Rule, event_starts, first_event_seconds, scored_mask
from anomalyd.scoring import ClipScorer, ScoredFile

logger = logging.getLogger(__name__)

DAY_S = 86_400.0
CONFIDENCE = 0.95  # one-sided, for the upper bound on the false-alarm rate
MAX_BUDGET = 1e6  # false alarms a day: beyond one every 0.1 s a budget means nothing
K_STEP = 0.001  # resolution of the chosen k (rounded up: never more alarms than the evidence shows)
TABLE_OFFSETS = (-1.0, -0.5, 0.0, 0.5, 1.0)  # k around the chosen one in the printed table


def check_budget(text: str) -> float:
    """The --false-alarms-per-day value: a number in (0, MAX_BUDGET]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_BUDGET:  # False for NaN too
        raise CalibrationError(
            f"--false-alarms-per-day {text!r}: a budget is a number of events a day, above 0 and at most "
            f"{MAX_BUDGET:g}"
        )
    return value


def audio_files(sources: Sequence[Path], what: str) -> list[Path]:
    """The audio files that `sources` (files or folders of WAV/FLAC files) name, in order."""
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            found = list_audio_files(source)
            if not found:
                raise CalibrationError(f"{what} {source}: no WAV or FLAC files in this folder")
            files += found
        elif source.is_file():
            files.append(source)
        else:
            raise CalibrationError(f"{what} {source}: no such file or folder")
    return files


def stream_files(scorer: ClipScorer, files: Sequence[Path], channel: int) -> tuple[list[ScoredFile], int]:
    """Each file streamed once to window scores; unreadable or too short files are skipped and counted."""
    scored, skipped = [], 0
    for path in files:
        try:
            scored.append(scorer.stream_file(path, channel))
        except AudioError as exc:
            logger.warning("skipping %s", exc)
            skipped += 1
    return scored, skipped


def poisson_upper(count: int, confidence: float = CONFIDENCE) -> float:
    """One-sided upper confidence bound on a Poisson mean after observing `count` events."""
    alpha = 1 - confidence

    def cdf(mean: float) -> float:  # P(X <= count)
        terms = (-mean + i * math.log(mean) - math.lgamma(i + 1) for i in range(count + 1))
        return math.fsum(math.exp(t) for t in terms)

    low, high = float(count), count + 10.0 + 10 * math.sqrt(count + 1)
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) > alpha else (low, middle)
    return high


def hours_to_demonstrate(budget_per_day: float, confidence: float = CONFIDENCE) -> float:
    """Hours of normal audio without any event that put the upper bound at the budget."""
    return -math.log(1 - confidence) / budget_per_day * 24


@dataclass(frozen=True)
class Evidence:
    """What the daemon's detector does at one k on the replayed audio."""

    k: float
    threshold: float  # window-score threshold, mean + k * std
    events: int  # events on the normal audio
    normal_seconds: float
    anomaly_delays: tuple[float | None, ...]  # per anomalous file: seconds to its first event, or None

    @property
    def events_per_day(self) -> float:
        return self.events / self.normal_seconds * DAY_S

    @property
    def events_per_day_upper95(self) -> float:
        return poisson_upper(self.events) / self.normal_seconds * DAY_S

    @property
    def detected(self) -> int:
        return sum(d is not None for d in self.anomaly_delays)

    @property
    def detection_rate(self) -> float | None:
        return self.detected / len(self.anomaly_delays) if self.anomaly_delays else None

    @property
    def median_delay(self) -> float | None:
        delays = [d for d in self.anomaly_delays if d is not None]
        return statistics.median(delays) if delays else None


@dataclass(frozen=True)
class Replayer:
    """Window scores of normal (and anomalous) audio, scored once; the detector replayed per k."""

    normal: list[ScoredFile]
    anomaly: list[ScoredFile]
    stats: ScoreStats  # the bundle's validation window scores
    detector: DetectorConfig
    silence_dbfs: float

    @property
    def normal_seconds(self) -> float:
        return sum(f.seconds for f in self.normal)

    def rule(self, threshold: float) -> Rule:
        return Rule(self.detector, threshold, self.silence_dbfs)

    def events(self, threshold: float) -> int:
        rule = self.rule(threshold)
        return sum(len(event_starts(f, rule)) for f in self.normal)

    def at_k(self, k: float) -> Evidence:
        threshold = self.stats.threshold(k)
        rule = self.rule(threshold)
        delays = tuple(first_event_seconds(f, rule) for f in self.anomaly)
        return Evidence(k, threshold, self.events(threshold), self.normal_seconds, delays)

    def scored_windows(self) -> int:
        return sum(int(np.count_nonzero(scored_mask(f, self.silence_dbfs))) for f in self.normal)

    def candidates(self) -> list[float]:
        """Thresholds worth trying, ascending: k = 0, then every distinct scored window score above it."""
        scores = [f.clip.window_errors[scored_mask(f, self.silence_dbfs)] for f in self.normal]
        distinct = np.unique(np.concatenate(scores).astype(np.float64))
        return [self.stats.mean, *distinct[distinct > self.stats.mean].tolist()]

    def k_for(self, threshold: float) -> float:
        """The smallest k on the K_STEP grid whose threshold is at least `threshold`."""
        k = round(max(0.0, math.ceil((threshold - self.stats.mean) / self.stats.std / K_STEP) * K_STEP), 6)
        while self.stats.threshold(k) < threshold:  # rounding in mean + k * std may land just below
            k = round(k + K_STEP, 6)
        return k

    def within(self, events: int, budget: float) -> bool:
        return events / self.normal_seconds * DAY_S <= budget

    def choose_k(self, budget: float) -> Evidence:
        """The smallest k whose events on the normal audio stay within `budget` a day (see the module)."""
        if not self.stats.std > 0:
            raise CalibrationError(
                f"the bundle's validation window scores have std {self.stats.std}: "
                "k cannot move the threshold"
            )
        candidates = self.candidates()
        low, high = -1, len(candidates) - 1  # candidates[high] keeps the budget: no window is above it
        while high - low > 1:
            middle = (low + high) // 2
            if self.within(self.events(candidates[middle]), budget):
                high = middle
            else:
                low = middle
        for threshold in candidates[high:]:
            k = self.k_for(threshold)
            if k > MAX_K:
                raise CalibrationError(
                    f"the budget of {budget:g} false alarms a day needs k above {MAX_K:g} on this normal "
                    "audio: it does not sound like the audio the model was trained on"
                )
            evidence = self.at_k(k)
            if self.within(evidence.events, budget):
                return evidence
        raise CalibrationError("no k keeps the budget")  # unreachable: nothing is above the top candidate


@dataclass(frozen=True)
class Calibration:
    bundle: Bundle
    budget: float  # false alarms a day
    detector: DetectorConfig
    chosen: Evidence
    table: list[Evidence]  # k around the chosen one, the bundle's own and the default
    anomaly_files: list[str]
    skipped: int
    normal_sources: list[str]
    anomaly_sources: list[str]

    def record(self) -> dict[str, Any]:
        """`threshold.calibration` in model.json (the shape agreed in the bundle schema)."""
        c = self.chosen
        d = self.detector
        anomaly = None
        if c.anomaly_delays:
            anomaly = {
                "files": len(c.anomaly_delays),
                "detected": c.detected,
                "detection_rate": c.detection_rate,
                "median_delay_seconds": c.median_delay,
            }
        return {
            "k": c.k,
            "false_alarms_per_day": self.budget,
            "normal_seconds": round(c.normal_seconds, 3),
            "events": c.events,
            "events_per_day": c.events_per_day,
            "events_per_day_upper95": c.events_per_day_upper95,
            "detector": {
                "n": d.n,
                "m": d.m,
                "hold_off_windows": d.hold_off_windows,
                "cooldown_seconds": d.cooldown_seconds,
            },
            "anomaly": anomaly,
            "calibrated_at": iso(utc_now()),
            "normal_sources": self.normal_sources,
            "anomaly_sources": self.anomaly_sources,
        }


def replay_sources(
    bundle: Bundle,
    normal: Sequence[Path],
    anomaly: Sequence[Path],
    *,
    detector: DetectorConfig,
    silence_dbfs: float,
    channel: int = 0,
) -> tuple[Replayer, list[str], int]:
    """Stream every file once; return the replayer, the anomalous files' names and the skipped count."""
    normal_files = audio_files(normal, "--normal")
    anomaly_files = audio_files(anomaly, "--anomaly")
    scorer = ClipScorer.from_bundle(bundle)
    normal_scored, skipped_n = stream_files(scorer, normal_files, channel)
    anomaly_scored, skipped_a = stream_files(scorer, anomaly_files, channel)
    replayer = Replayer(
        normal_scored, anomaly_scored, bundle.meta.threshold.window_scores, detector, silence_dbfs
    )
    return replayer, [f.source for f in anomaly_scored], skipped_n + skipped_a


def calibrate(
    bundle: Bundle,
    normal: Sequence[Path],
    anomaly: Sequence[Path],
    budget: float,
    *,
    detector: DetectorConfig,
    silence_dbfs: float,
    channel: int = 0,
) -> Calibration:
    replayer, anomaly_files, skipped = replay_sources(
        bundle, normal, anomaly, detector=detector, silence_dbfs=silence_dbfs, channel=channel
    )
    windows = replayer.scored_windows()
    if windows < detector.m:
        raise CalibrationError(
            f"the normal audio holds {windows} scored window(s) ({replayer.normal_seconds:.1f} s); the "
            f"detector looks at m = {detector.m}, so calibration needs at least {detector.m}: give more "
            "normal audio"
        )
    chosen = replayer.choose_k(budget)
    ks = {round(chosen.k + d, 3) for d in TABLE_OFFSETS} | {bundle.meta.threshold.k, 3.0}
    table = [chosen if k == chosen.k else replayer.at_k(k) for k in sorted(k for k in ks if 0 <= k <= MAX_K)]
    return Calibration(
        bundle=bundle,
        budget=budget,
        detector=detector,
        chosen=chosen,
        table=table,
        anomaly_files=anomaly_files,
        skipped=skipped,
        normal_sources=[str(p) for p in normal],
        anomaly_sources=[str(p) for p in anomaly],
    )


def write_calibration(calibration: Calibration) -> Path:
    """Record k and its evidence in the bundle's model.json (atomically), then load it back as the daemon
    would, so that a bundle this wrote is one the daemon accepts on its next reload."""
    bundle = calibration.bundle
    threshold = replace(bundle.meta.threshold, k=calibration.chosen.k, calibration=calibration.record())
    path = write_meta(bundle.path, replace(bundle.meta, threshold=threshold))
    load_bundle(bundle.path)
    return path


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def report_lines(calibration: Calibration) -> list[str]:
    """The printed summary: inputs, the table around the choice, the choice and how sure it is."""
    c = calibration.chosen
    hours = c.normal_seconds / 3600
    lines = [
        f"normal audio: {c.normal_seconds:.1f} s ({hours:.2f} h)"
        + (f", {calibration.skipped} file(s) skipped" if calibration.skipped else ""),
        f"{'k':>8}  {'threshold':>9}  {'events':>6}  {'events/day':>10}  {'upper95/day':>11}  detection",
    ]
    for e in calibration.table:
        mark = "  <- chosen" if e is c else ""
        lines.append(
            f"{e.k:>8.3f}  {e.threshold:>9.5f}  {e.events:>6d}  {e.events_per_day:>10.1f}  "
            f"{e.events_per_day_upper95:>11.1f}  {_rate(e.detection_rate):>9}{mark}"
        )
    lines.append(
        f"chosen k = {c.k:.3f} for {calibration.budget:g} false alarm(s) a day: {c.events} event(s) in "
        f"{hours:.2f} h of normal audio = {c.events_per_day:.1f}/day; 95 % upper bound "
        f"{c.events_per_day_upper95:.1f}/day"
    )
    needed = hours_to_demonstrate(calibration.budget)
    if c.events_per_day_upper95 > calibration.budget:
        lines.append(
            f"not yet demonstrated: {needed:.1f} h of normal audio without an event would show "
            f"{calibration.budget:g}/day with 95 % confidence"
        )
    for name, delay in zip(calibration.anomaly_files, c.anomaly_delays, strict=True):
        lines.append(f"anomaly {name}: " + ("no event" if delay is None else f"event after {delay:.2f} s"))
    if c.anomaly_delays:
        median = "-" if c.median_delay is None else f"{c.median_delay:.2f} s"
        lines.append(
            f"detection: {c.detected} of {len(c.anomaly_delays)} anomalous files "
            f"({_rate(c.detection_rate)}), median delay {median}"
        )
    return lines
