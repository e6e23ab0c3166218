"""Fine-tuning: start training from a bundle's weights instead of random ones (`--init-from BUNDLE`).

Used when a machine's normal sound has grown (false alarms marked normal, a new operating point): the
bundle's model already knows the machine, so a few epochs at a lower learning rate teach it the new
audio, much faster than training from scratch.

- The parent's architecture, window geometry, levelling and feature parameters are taken as they are; an
  option or preset that asks for others is refused in one line (the weights would not fit, or would see
  other inputs than those they learnt).
- The parent's normalisation (per-band mean and std) is kept, not refitted: the weights learnt inputs
  scaled by it, and the new audio is mostly the old machine again; refitting on a set that now includes
  unusual clips would shift every input, and the model would first have to unlearn the shift.
- The threshold is fitted again, on the new validation clips, as in any training.
- Unless given as options, epochs, patience and learning rate take the FINETUNE_DEFAULTS below (a
  preset's values for them are budgets for training from scratch, so they do not count).

The weights are read from weights.safetensors (checked against model.json's checksum by `load_bundle`),
never from a pickle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from safetensors.torch import load_file

from anomalyd.bundle import WEIGHTS_FILE, Bundle, load_bundle
from anomalyd.errors import BundleError, ConfigError
from anomalyd.features import FeatureParams
from anomalyd.windows import Normalisation
from training.model import Architecture, ConvAutoencoder

# Defaults when fine-tuning (a command-line option still overrides each): the model starts near a good
# solution, so fewer epochs, a shorter patience and smaller steps that refine it rather than wreck it.
FINETUNE_DEFAULTS: dict[str, Any] = {"epochs": 30, "patience": 5, "learning_rate": 3e-4}
C = TypeVar("C")  # training.train's TrainConfig (imported from there would be circular)
_FROM_PARENT = (
    "channels", "kernel_size", "n_frames", "hop_frames", "pool_frames", "tile_frames", "levelling", "fmax",
)  # fmt: skip


@dataclass(frozen=True)
class Parent:
    """The bundle fine-tuning starts from."""

    bundle: Bundle
    arch: Architecture

    @property
    def normalisation(self) -> Normalisation:
        return self.bundle.meta.normalisation

    def load_weights(self, model: ConvAutoencoder) -> None:
        path = self.bundle.path / WEIGHTS_FILE
        try:
            state = load_file(str(path))
            model.load_state_dict(state, strict=True)
        except (OSError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"{path}: weights do not fit the bundle's architecture ({first})") from exc

    def info(self) -> dict[str, Any]:
        """What model.json's `training` records about the parent."""
        return {"parent_model_id": self.bundle.meta.model_id, "init_from": str(self.bundle.path)}


def _architecture(bundle: Bundle) -> Architecture:
    arch = bundle.meta.architecture
    where = f"{bundle.path}: architecture"
    if arch.get("name") != "conv_autoencoder":
        raise BundleError(f"{where} {arch.get('name')!r} is not conv_autoencoder; cannot fine-tune it")
    channels, kernel = arch.get("channels"), arch.get("kernel_size")
    if not (
        isinstance(channels, list)
        and len(channels) == 3
        and all(type(c) is int and c > 0 for c in channels)
        and type(kernel) is int
        and kernel > 0
        and kernel % 2 == 1
    ):
        raise BundleError(f"{where}: channels {channels!r}, kernel_size {kernel!r}: not a known setup")
    return Architecture(channels=(channels[0], channels[1], channels[2]), kernel_size=kernel)


def load_parent(path: Path, features: FeatureParams) -> Parent:
    """The bundle at `path`, checked as the daemon checks it, whose features must be this training's."""
    bundle = load_bundle(path)
    if bundle.meta.features != features:
        raise BundleError(
            f"{path}: made with other feature parameters ({bundle.meta.features}) than this training uses "
            f"({features}); train from scratch instead"
        )
    return Parent(bundle, _architecture(bundle))


def adapt_config(config: C, explicit: set[str], options: set[str], parent_path: Path) -> C:
    """The training config for fine-tuning from `parent_path`: its architecture and windows, and the
    fine-tuning defaults for what no option gave. `explicit`: keys set by a preset or an option; one that
    contradicts the parent is refused (ConfigError, one line). `options`: keys set on the command line."""
    bundle = load_bundle(parent_path)
    arch = _architecture(bundle)
    window = bundle.meta.window
    theirs: dict[str, Any] = {
        "channels": arch.channels,
        "kernel_size": arch.kernel_size,
        "n_frames": window.n_frames,
        "hop_frames": window.hop_frames,
        "pool_frames": window.pool_frames,
        "tile_frames": window.tile_frames,
        "levelling": bundle.meta.normalisation.levelling,
        "fmax": bundle.meta.features.fmax,
    }
    clashes = [
        f"{key} {_shown(getattr(config, key))} (bundle: {_shown(theirs[key])})"
        for key in _FROM_PARENT
        if key in explicit and getattr(config, key) != theirs[key]
    ]
    if clashes:
        raise ConfigError(
            f"--init-from {parent_path}: the bundle has another architecture or window setup: "
            f"{'; '.join(clashes)}; drop those options or train from scratch"
        )
    defaults = {key: value for key, value in FINETUNE_DEFAULTS.items() if key not in options}
    return dataclasses.replace(config, **theirs, **defaults)  # type: ignore[type-var]


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple | list) else str(value)
