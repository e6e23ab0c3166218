"""The project's exception vocabulary.

Every message names the bad value and where it came from, so that one log line is enough to act on.
Edges convert them: the CLI to an exit status, training to a skipped file, the daemon to log-and-retry.
"""

from __future__ import annotations


class AnomalydError(Exception):
    """Base class: anything the user can fix by changing an input."""


class AudioError(AnomalydError):
    """An audio file that cannot be read or used (missing, empty, truncated, not audio, too short)."""


class BundleError(AnomalydError):
    """A model bundle that cannot be used: missing or corrupt files, checksum mismatch, bad metadata."""


class ChecksumError(BundleError):
    """A bundle file whose content differs from the checksum recorded in model.json."""


class IncompatibleBundleError(BundleError):
    """A bundle whose feature parameters or format this version cannot score with."""


class ConfigError(AnomalydError):
    """A configuration file or option that fails validation."""


class StoreError(AnomalydError):
    """The event database cannot be opened, created or migrated, or is from an incompatible version."""


class CommandError(AnomalydError):
    """An MQTT command payload that is refused; the message is the short reason sent back."""


class MarkError(AnomalydError):
    """An event that cannot be marked a false alarm: unknown, still open, or without its clip."""


class ScoreError(AnomalydError):
    """A window score that is not a finite number: there is no verdict to give, never a "normal" one."""


class CalibrationError(AnomalydError):
    """A calibration that cannot be done as asked: a bad budget, too little or no usable audio."""


class ControlError(AnomalydError):
    """A control-channel request that is refused, or a control socket that cannot be set up or reached."""


class TrainingDataError(AnomalydError):
    """Normal audio that cannot make a model: too little of it to train on and to validate with."""
