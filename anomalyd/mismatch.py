"""Audio unlike what a model was trained on: lossy-compressed, or at a rate its training audio never had.

Such audio still gets a score, but the score reads high for reasons that are not the machine's: a lossy
codec removes what the ear misses, and another capture rate changes the top of the spectrum (a normal
clip resampled from 44.1 or 48 kHz scored 6-7x higher than the same machine recorded at 16 kHz). Each
kind of mismatch is told once per run, naming the first file, not once per file.
"""

from __future__ import annotations

from anomalyd.audio import AudioFileInfo
from anomalyd.bundle import TrainingAudio


class MismatchWarnings:
    """Warnings about inputs that differ from the bundle's training audio, each kind at most once."""

    def __init__(self, training: TrainingAudio | None) -> None:
        self.training = training  # None: a bundle from before training audio was recorded
        self._told: set[str] = set()

    def check(self, info: AudioFileInfo) -> list[str]:
        """The warnings this file raises that were not given before (usually none)."""
        found = []
        if info.lossy and "lossy" not in self._told:
            self._told.add("lossy")
            found.append(
                f"{info.path}: {info.format} ({info.subtype}) is lossy: compression changes the spectrum, "
                "so scores read higher than for the machine's real sound; score WAV or FLAC where you "
                "can (not repeated for further lossy files)"
            )
        rates = self.training.rates if self.training is not None else frozenset()
        if rates and info.sample_rate not in rates and "rate" not in self._told:
            self._told.add("rate")
            trained = ", ".join(f"{r} Hz" for r in sorted(rates))
            found.append(
                f"{info.path}: recorded at {info.sample_rate} Hz, the model's training audio at {trained}: "
                "audio of another capture rate scores higher though the machine is normal; record at "
                "the training rate, or retrain on audio at this one (not repeated for further files)"
            )
        return found
