"""Train a model bundle from recordings of one machine running normally.

    python -m training.train --normal DIR [--normal DIR2 ...] --out BUNDLE_DIR [--preset FILE] [--seed 1]

Reads top to bottom: list the folders (files of other formats are named and counted) and turn every file,
of any length, into log-mel frames as a stream (bad files are skipped and counted); cut the frames into
blocks of time and give whole blocks to training or validation; fit the normalisation on the training
blocks, train the autoencoder with early stopping on validation loss, then export the bundle, whose
threshold is mean + k * std of the validation blocks' scores as the exported ONNX model computes them. The
defaults below can be overridden by a TOML preset, then by options.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import logging
import re
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from anomalyd.audio import supported_names
from anomalyd.bundle import META_FILE
from anomalyd.errors import AnomalydError, ConfigError, TrainingDataError
from anomalyd.features import FMAX, FeatureParams, LogMel
from anomalyd.windows import LEVELLINGS, Normalisation, WindowGeometry
from training import blocks
from training.blocks import Block, Split, WindowSet
from training.dataset import Clip, Recording, fingerprint, load_recordings, make_filterbank
from training.export import ExportInputs, export_bundle
from training.finetune import FINETUNE_DEFAULTS, adapt_config, load_parent
from training.model import Architecture, ConvAutoencoder, active_code_share
from training.quantise import PRECISIONS, calibration_indices
from training.sources import audio_provenance, list_normal, report_flagged, report_lossy, report_unsupported

logger = logging.getLogger("training.train")

# Below this much normal audio a warning says so: a few seconds rarely hold a machine's normal states
# (loads, speeds, cycles), so faults rank little better than chance, and the threshold's spread rests on
# a handful of validation windows.
MIN_NORMAL_SECONDS = 60.0


@dataclass(frozen=True)
class TrainConfig:
    # data
    channel: int = 0  # channel to read from multi-channel recordings
    val_fraction: float = 0.2  # share of blocks held out for early stopping and the threshold
    block_seconds: float = 10.0  # audio is split by time into blocks this long; a shorter file is one block
    # windows (see anomalyd/windows.py for why these sizes)
    n_frames: int = 64  # log-mel frames per window, 2.05 s
    hop_frames: int = 16  # frames between windows when scoring; stored in the bundle
    train_hop_frames: int = 8  # denser windows for training: more examples from little audio
    pool_frames: int = 64  # frames averaged in the residual before squaring; stored in the bundle
    tile_frames: int = 16  # model input frames, each frame once (a quarter of windows' cost); 0: windows
    levelling: str = "window_power"  # "window_power": each window's level removed (gain-proof), or "none"
    fmax: float = FMAX  # Hz, highest mel filterbank edge; above the resampler's passband bands are unreliable
    # model (see training/model.py)
    channels: tuple[int, int, int] = (32, 64, 1)  # encoder channels per stride-2 stage; the last is the code
    kernel_size: int = 5  # convolution kernel size, odd
    precision: str = "auto"  # model arithmetic: "int8", "float32", or "auto" (int8 where close to float)
    # optimisation
    epochs: int = 100  # most epochs to train; early stopping usually ends sooner
    patience: int = 10  # epochs without a better validation loss before stopping
    batch_size: int = 128  # model inputs (tiles, or whole windows) per step
    learning_rate: float = 1e-3  # Adam's learning rate
    # decision rule
    k: float = 3.0  # threshold = mean + k * std of validation block scores
    # run
    seed: int = 0  # seeds the split, the initial weights and the batch order
    threads: int = 2  # torch CPU threads
    name: str = ""  # model name, the first part of the model id; default: the first --normal folder's name

    @property
    def geometry(self) -> WindowGeometry:
        """The windows and tiles these settings describe, as the bundle will store them."""
        return WindowGeometry(self.n_frames, self.hop_frames, self.pool_frames, self.tile_frames)

    def problems(self) -> list[str]:
        found = []
        if not 0 < self.val_fraction < 1:
            found.append(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        if self.n_frames % 8 or self.n_frames <= 0:
            found.append(f"n_frames must be a positive multiple of 8, got {self.n_frames}")
        found += self.geometry.problems()
        if self.tile_frames % 8:
            found.append(f"tile_frames must be 0 or a multiple of 8, got {self.tile_frames}")
        for key in ("hop_frames", "train_hop_frames", "epochs", "patience", "batch_size", "threads"):
            if getattr(self, key) <= 0:
                found.append(f"{key} must be positive, got {getattr(self, key)}")
        if self.levelling not in LEVELLINGS:
            found.append(f"levelling must be one of {', '.join(LEVELLINGS)}, got {self.levelling!r}")
        if not 0 < self.fmax <= FeatureParams().sample_rate / 2:
            found.append(f"fmax must lie in (0, {FeatureParams().sample_rate / 2:g}] Hz, got {self.fmax}")
        if len(self.channels) != 3 or min(self.channels) <= 0:
            found.append(f"channels must be three positive integers, got {list(self.channels)}")
        if self.kernel_size % 2 == 0 or self.kernel_size <= 0:
            found.append(f"kernel_size must be a positive odd number, got {self.kernel_size}")
        params = FeatureParams()
        window = params.n_samples(self.n_frames) / params.sample_rate
        if not window <= self.block_seconds <= 3600:
            found.append(
                f"block_seconds must hold a window ({window:.2f} s) and be at most 3600, "
                f"got {self.block_seconds}"
            )
        if self.precision not in PRECISIONS:
            found.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.learning_rate <= 0 or self.k <= 0:
            found.append(f"learning_rate and k must be positive, got {self.learning_rate}, {self.k}")
        return found


def field_help() -> dict[str, str]:
    """Each TrainConfig field's trailing comment above: the one place its meaning is written down."""
    source = inspect.getsource(TrainConfig)
    found = re.findall(r"^    (\w+): [^=]+=\s*[^#\n]+#\s*(.+)$", source, flags=re.MULTILINE)
    return dict(found)


def check_out(out: Path) -> None:
    """Refuse an --out that export would refuse, before minutes of training: an existing folder that is
    not a bundle (never overwritten), a file, or a place that cannot be written."""
    if out.exists() and not (out / META_FILE).is_file():
        what = "folder" if out.is_dir() else "file"
        raise ConfigError(
            f"--out {out}: an existing {what} that is not a model bundle; refusing to replace it"
        )
    parent = out.resolve().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    try:  # a real attempt: permission bits say little to root, or on a read-only or special filesystem
        tempfile.TemporaryDirectory(dir=existing, prefix=".anomalyd-probe-").cleanup()
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create it in {existing} ({exc.strerror})") from exc


def _coerce(key: str, value: Any, source: str) -> Any:
    """Turn a preset or option value into the type of TrainConfig's field `key`."""
    default = getattr(TrainConfig(), key)
    try:
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else value
            return tuple(int(v) for v in items)
        if isinstance(value, bool) or (isinstance(value, float) and isinstance(default, int)):
            raise TypeError  # int(True) and int(2.5) would be silently wrong
        return type(default)(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {key} = {value!r} is not a valid {type(default).__name__}") from exc


def load_preset(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read training preset ({exc})") from exc
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    return {key: _coerce(key, value, str(path)) for key, value in data.items()}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, TrainConfig]:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description=__doc__.splitlines()[0],
        epilog="Every option below --quiet may also be set in a --preset TOML file (same name, with _).",
    )
    parser.add_argument(
        "--normal",
        type=Path,
        required=True,
        action="append",
        metavar="DIR",
        help=f"folder of normal recordings ({supported_names()}; any length, e.g. one long recording, "
        "short clips, or both); may be given more than once, e.g. recordings plus false-alarm clips",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="bundle folder to write (replaced if it exists)"
    )
    parser.add_argument("--preset", type=Path, help="TOML file overriding the defaults")
    tuned = ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in FINETUNE_DEFAULTS.items())
    parser.add_argument(
        "--init-from",
        type=Path,
        metavar="BUNDLE",
        help="fine-tune: start from this bundle's weights, architecture, windows and normalisation "
        f"(threshold refitted); unless given as options (a preset's do not count), {tuned}; records "
        "training.parent_model_id",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug lines too (e.g. every file of another format)"
    )
    helps = field_help()
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else repr(default)
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=None,
            metavar=type(default).__name__.upper() if not isinstance(default, tuple) else "A,B,C",
            help=f"{helps.get(f.name, '')} (default {shown})",
        )
    args = parser.parse_args(argv)
    values = load_preset(args.preset) if args.preset else {}
    options = {f.name for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    for f in dataclasses.fields(TrainConfig):
        option = getattr(args, f.name)
        if option is not None:
            values[f.name] = _coerce(f.name, option, f"--{f.name.replace('_', '-')}")
    config = TrainConfig(**values)
    if args.init_from is not None:
        config = adapt_config(config, set(values), options, args.init_from)
    problems = config.problems()
    if problems:
        raise ConfigError("invalid training settings: " + "; ".join(problems))
    check_out(args.out)
    return args, config


@dataclass(frozen=True)
class FitResult:
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    history: list[tuple[float, float]]  # (train loss, validation loss) per epoch


def _mean_loss(model: ConvAutoencoder, x: WindowSet, batch_size: int) -> float:
    model.eval()
    with torch.no_grad():
        total = 0.0
        for batch in x.batches(batch_size):
            total += torch.nn.functional.mse_loss(model(batch), batch, reduction="sum").item()
    return total / x.numel


def fit(
    model: ConvAutoencoder, x_train: WindowSet, x_val: WindowSet, config: TrainConfig, quiet: bool
) -> FitResult:
    """Adam on mean squared reconstruction error; keeps the weights of the best validation epoch."""
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    order = torch.Generator().manual_seed(config.seed)
    best_loss, best_epoch, waited = float("inf"), 0, 0
    best_state = copy.deepcopy(model.state_dict())
    history: list[tuple[float, float]] = []
    bar = tqdm(
        range(1, config.epochs + 1),
        desc="training",
        unit="epoch",
        disable=True if quiet else None,
        leave=False,
    )
    for epoch in bar:
        model.train()
        train_total = 0.0
        permutation = torch.randperm(len(x_train), generator=order)
        for start in range(0, len(x_train), config.batch_size):
            idx = permutation[start : start + config.batch_size]
            batch = x_train.take(idx)
            loss = torch.nn.functional.mse_loss(model(batch), batch)
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            train_total += loss.item() * len(idx)
        val_loss = _mean_loss(model, x_val, config.batch_size)
        history.append((train_total / len(x_train), val_loss))
        bar.set_postfix(train=f"{history[-1][0]:.4f}", val=f"{val_loss:.4f}", best=best_epoch)
        if not quiet and not sys.stderr.isatty():  # a log or journal gets a line per epoch instead of a bar
            best = epoch if val_loss < best_loss else best_epoch
            logger.info(
                "epoch %d/%d: train loss %.5f, validation loss %.5f (best so far: epoch %d)",
                epoch, config.epochs, history[-1][0], val_loss, best,
            )  # fmt: skip
        if val_loss < best_loss:
            best_loss, best_epoch, waited = val_loss, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            waited += 1
            if waited >= config.patience:
                break
    model.load_state_dict(best_state)
    return FitResult(len(history), best_epoch, best_loss, history)


def load_data(
    args: argparse.Namespace, config: TrainConfig, logmel: LogMel
) -> tuple[list[Recording], dict[str, Any]]:
    """Every usable file of the --normal folders as log-mel frames, and what model.json says about them."""
    params = logmel.params
    folders = [list_normal(folder) for folder in args.normal]
    n_unsupported = report_unsupported(folders)
    report_flagged(folders)
    paths = [f.audio for f in folders]
    n_files = sum(map(len, paths))
    min_samples = params.n_samples(config.n_frames)
    recordings, skipped = load_recordings(paths, logmel, min_samples, config.channel)
    logger.info(
        "%d audio files in %s: %d usable (%.1f s), %d skipped",
        n_files,
        ", ".join(map(str, args.normal)),
        len(recordings),
        sum(r.seconds(params.sample_rate) for r in recordings),
        len(skipped),
    )
    if skipped:
        logger.warning("skipped %d of %d files (reasons above)", len(skipped), n_files)
    report_lossy(recordings)
    info = {
        "normal_dirs": [str(f) for f in args.normal],
        "audio": audio_provenance(recordings, folders, params.sample_rate),
        "fingerprint": fingerprint(recordings),
        "skipped_files": [{"name": s.path.name, "reason": s.reason} for s in skipped],
        "unsupported_files": n_unsupported,
    }
    return recordings, info


def split(recordings: list[Recording], config: TrainConfig, params: FeatureParams) -> Split:
    """Whole blocks of time to training or validation; a clear error when there are too few."""
    size = blocks.block_frames(params, config.block_seconds)
    gap = blocks.gap_frames(params)
    cut = [
        b
        for i, r in enumerate(recordings)
        for b in blocks.cut(i, r.logmel.shape[1], size, gap, config.n_frames)
    ]
    if len(cut) < blocks.MIN_TRAIN_BLOCKS + blocks.MIN_VAL_BLOCKS:
        total = sum(r.seconds(params.sample_rate) for r in recordings)
        window = params.n_samples(config.n_frames) / params.sample_rate
        raise TrainingDataError(
            blocks.too_little(total, len(recordings), len(cut), config.block_seconds, window)
        )
    return blocks.split_blocks(cut, config.val_fraction, config.seed)


def block_clips(recordings: list[Recording], chosen: list[Block]) -> list[Clip]:
    return [
        Clip(recordings[b.recording].path, recordings[b.recording].sha256,
             recordings[b.recording].logmel[:, b.start : b.stop])
        for b in chosen
    ]  # fmt: skip


def describe_files(recordings: list[Recording], parts: Split, sample_rate: int) -> list[dict[str, Any]]:
    """model.json's `training.files`: each used file, its length, content hash and its blocks' roles."""
    return [
        {
            "name": r.path.name,
            "dir": r.folder,
            "seconds": round(r.seconds(sample_rate), 2),
            "sha256": r.sha256,
            "blocks": parts.roles(i),
        }
        for i, r in enumerate(recordings)
    ]


def train(args: argparse.Namespace, config: TrainConfig) -> Path:
    started = time.monotonic()
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)

    params = FeatureParams(fmax=config.fmax)
    filterbank = make_filterbank(params)
    logmel = LogMel(params, filterbank)
    geometry = config.geometry
    model_frames = geometry.model_frames
    parent = load_parent(args.init_from, params) if args.init_from is not None else None

    recordings, data_info = load_data(args, config, logmel)
    parts = split(recordings, config, params)
    total = sum(r.seconds(params.sample_rate) for r in recordings)
    if total < MIN_NORMAL_SECONDS:
        logger.warning(
            "only %.0f s of normal audio, below the %.0f s minimum: with this little the model ranks faults "
            "near chance and the threshold is a guess; record more (`anomalyd record --minutes 5`)",
            total, MIN_NORMAL_SECONDS,
        )  # fmt: skip
    train_clips, val_clips = block_clips(recordings, parts.train), block_clips(recordings, parts.val)
    if len(val_clips) < 5:
        logger.warning(
            "only %d validation blocks: the threshold's std is a rough estimate; record more normal audio",
            len(val_clips),
        )

    # Fine-tuning keeps the parent's normalisation: its weights learnt inputs scaled by it.
    norm = (
        parent.normalisation
        if parent
        else Normalisation.fit(
            [c.logmel for c in train_clips],
            levelling=config.levelling,
            geometry=WindowGeometry(model_frames, config.train_hop_frames, model_frames, 0),
        )
    )
    x_train = WindowSet([c.logmel for c in train_clips], model_frames, config.train_hop_frames, norm)
    x_val = WindowSet([c.logmel for c in val_clips], model_frames, config.train_hop_frames, norm)
    seconds = {
        name: sum(c.logmel.shape[1] for c in chosen) * params.hop_length / params.sample_rate
        for name, chosen in (("train", train_clips), ("val", val_clips))
    }
    logger.info(
        "training on %d tiles from %d blocks (%.0f s), validating on %d tiles from %d blocks (%.0f s)",
        len(x_train), len(train_clips), seconds["train"], len(x_val), len(val_clips), seconds["val"],
    )  # fmt: skip

    arch = Architecture(channels=config.channels, kernel_size=config.kernel_size)
    model = ConvAutoencoder(arch)
    if parent is not None:
        parent.load_weights(model)
    result = fit(model, x_train, x_val, config, args.quiet)
    logger.info(
        "stopped after %d epochs; best validation loss %.5f at epoch %d",
        result.epochs_run,
        result.best_val_loss,
        result.best_epoch,
    )
    code_share = active_code_share(model, x_train.batches(config.batch_size))
    if code_share == 0:
        logger.warning(
            "the autoencoder's code is zero on every training window (a dead code): the model rebuilds one "
            "fixed spectral template and scores only how far a window's average spectrum lies from it; "
            "another --seed usually trains a live code"
        )

    training_info = {
        "config": {**dataclasses.asdict(config), "channels": list(config.channels)},
        **data_info,
        # Blocks are block_frames long, gap_frames apart, from each file's start; the last may be longer.
        "block_frames": blocks.block_frames(params, config.block_seconds),
        "gap_frames": blocks.gap_frames(params),
        "files": describe_files(recordings, parts, params.sample_rate),
        "train_blocks": len(train_clips),
        "val_blocks": len(val_clips),
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "active_code_share": round(code_share, 4),  # 0: a dead code (see training.model.active_code_share)
        "train_inputs": len(x_train),  # tiles (whole windows with tile_frames = 0), every train_hop_frames
        "seconds": round(time.monotonic() - started, 1),
        **(parent.info() if parent is not None else {}),
    }
    bundle = export_bundle(
        ExportInputs(
            out=args.out,
            name=config.name or args.normal[0].resolve().name,
            model=model,
            arch=arch,
            logmel=logmel,
            geometry=geometry,
            normalisation=norm,
            val_clips=val_clips,
            train_clips=train_clips,
            train_hop_frames=config.train_hop_frames,
            parity_windows=x_val.take(np.arange(min(64, len(x_val))))[:, 0].numpy(),
            precision=config.precision,
            calibration=(
                x_train.take(calibration_indices(len(x_train), config.seed))[:, 0].numpy()
                if config.precision != "float32"
                else None
            ),
            k=config.k,
            training=training_info,
        )
    )
    t = bundle.meta.threshold
    logger.info(
        "wrote %s (model %s): threshold %.5f = %.5f + %.1f x %.5f over %d validation blocks, in %.0f s",
        bundle.path,
        bundle.meta.model_id,
        t.value,
        t.clip_scores.mean,
        t.k,
        t.clip_scores.std,
        t.clip_scores.n,
        time.monotonic() - started,
    )
    return bundle.path


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args, config = parse_args(argv)
        if args.quiet:
            logging.getLogger().setLevel(logging.WARNING)
        elif args.verbose:
            logging.getLogger().setLevel(logging.DEBUG)
        train(args, config)
    except (AnomalydError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
