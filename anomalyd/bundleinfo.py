"""`anomalyd bundle info` and `anomalyd bundle install`: what a bundle is, and putting one in service.

`info` loads the bundle exactly as the daemon does (every check of `anomalyd.bundle`), then describes it
from its loaded metadata. The calibration is the schema-checked `threshold.calibration`; `training` is a
free-form section (`training.audio`, `training.parent_model_id`, ...) read tolerantly: shown when present
and well formed, never a reason to refuse an otherwise good bundle.

`install` copies a bundle into the service's model folder so that a daemon running as another user
(systemd DynamicUser: the state directory belongs to the dynamic user, mode 0750) can read it, and so
that a reload never sees half a bundle: the copy is built in a hidden sibling, loaded as the daemon
would load it (ONNX Runtime session included), made world-readable, given to the owner of the target
folder when run as root, and only then swapped in with one atomic rename (renameat2 RENAME_EXCHANGE
where the kernel has it, else two renames); the old bundle is removed last.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from anomalyd.bundle import META_FILE, Bundle, load_bundle, make_world_readable
from anomalyd.errors import BundleError
from anomalyd.inference import open_autoencoder

logger = logging.getLogger(__name__)

NOT_CALIBRATED = "not calibrated (k = 3 default)"
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


# ---- info -------------------------------------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _files(training: dict[str, Any], key: str) -> int:
    value = training.get(key)
    return len(value) if isinstance(value, list) else 0


def _file_counts(training: dict[str, Any]) -> tuple[int, int, int]:
    """(files, files with training audio, files with validation audio). Bundles split by time list each
    file once with the role of each of its blocks ("TTV"); older ones kept two lists."""
    entries = training.get("files")
    if isinstance(entries, list):
        roles = [str(e.get("blocks", "")) for e in entries if isinstance(e, dict)]
        return len(roles), sum("T" in r for r in roles), sum("V" in r for r in roles)
    train, val = _files(training, "train_files"), _files(training, "val_files")
    return train + val, train, val


def describe(bundle: Bundle) -> dict[str, Any]:
    """The facts `bundle info` shows, as one JSON-able dict (also its --json output)."""
    meta = bundle.meta
    training = meta.training
    config = _dict(training.get("config"))
    audio = _dict(training.get("audio")) or None
    t = meta.threshold
    calibration = t.calibration
    features = meta.features
    window = meta.window
    hop_s = features.hop_length / features.sample_rate
    parent = training.get("parent_model_id")
    n_files, n_train, n_val = _file_counts(training)
    return {
        "path": str(bundle.path),
        "model_id": meta.model_id,
        "name": config.get("name") or meta.model_id.rsplit("-", 1)[0],
        "created_at": meta.created_at,
        "training": {
            "files": n_files,
            "train_files": n_train,
            "val_files": n_val,
            "skipped_files": _files(training, "skipped_files"),
            "seconds": _number(audio.get("seconds")) if audio else None,
            "fingerprint": training.get("fingerprint"),
            "epochs_run": training.get("epochs_run"),
            "training_seconds": _number(training.get("seconds")),
            "audio": audio,
        },
        "features": {
            "sample_rate": features.sample_rate,
            "n_fft": features.n_fft,
            "hop_length": features.hop_length,
            "n_mels": features.n_mels,
            "fmax": features.fmax,
            "frames_per_second": round(1 / hop_s, 3),
        },
        "window": {
            "n_frames": window.n_frames,
            "hop_frames": window.hop_frames,
            "pool_frames": window.pool_frames,
            # Format 4: the model reconstructs tiles of this many frames, each frame once; before, whole
            # windows, each frame n_frames / hop_frames times.
            "model_frames": window.model_frames,
            "reconstructions_per_frame": window.model_frames // window.tile_hop,
            "levelling": bundle.meta.normalisation.levelling,
            # Format 3: bands weighed by the residual's spread on training windows; before, all alike.
            "score": "band_weighted" if bundle.meta.residual is not None else "squared_residual",
            "seconds": round(window.n_frames * hop_s, 3),
            "hop_seconds": round(window.hop_frames * hop_s, 3),
        },
        "threshold": {
            "value": t.value,
            "k": t.k,
            "mean": t.clip_scores.mean,
            "std": t.clip_scores.std,
            "n_clips": t.clip_scores.n,
            "window_mean": t.window_scores.mean,
            "window_std": t.window_scores.std,
            "n_windows": t.window_scores.n,
            "window_value": t.window_scores.threshold(t.k),
        },
        "calibration": calibration,
        "parent_model_id": parent if isinstance(parent, str) else None,
        "architecture": meta.architecture,
        # Bundles before int8 models record no precision: they are all float32.
        "precision": str(_dict(meta.export).get("precision", "float32")),
        # precision "auto" exported float32 because the int8 model strayed this far (relative rms).
        "int8_refused": _dict(meta.export).get("int8_refused_relative_rms_error"),
        # "channels-last" (training/channels_last.py) or "quantised"; absent before that rebuild existed.
        "int8_graph": _dict(meta.export).get("int8_graph"),
        "versions": meta.versions,
    }


def _counts(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


_CALIBRATION_KEYS = ("k", "false_alarms_per_day", "calibrated_at", "events", "normal_seconds",
                     "events_per_day", "events_per_day_upper95")  # fmt: skip


def _calibration_lines(cal: dict[str, Any] | None) -> list[str]:
    if cal is None:
        return [f"calibration     {NOT_CALIBRATED}"]
    c = {key: cal.get(key, "?") for key in _CALIBRATION_KEYS}
    lines = [
        f"calibration     k = {c['k']} for at most {c['false_alarms_per_day']} false alarm(s)/day, "
        f"calibrated {c['calibrated_at']}",
        f"                {c['events']} event(s) in {c['normal_seconds']} s of normal audio "
        f"({c['events_per_day']}/day, upper 95 % {c['events_per_day_upper95']}/day)",
    ]
    anomaly = _dict(cal.get("anomaly"))
    if anomaly:
        a = {key: anomaly.get(key, "?") for key in ("detected", "files", "median_delay_seconds")}
        lines.append(
            f"                anomalies: {a['detected']} of {a['files']} detected, "
            f"median delay {a['median_delay_seconds']} s"
        )
    return lines


def _precision(info: dict[str, Any]) -> str:
    refused = info.get("int8_refused")
    if isinstance(refused, int | float):
        return f"{info['precision']} (int8 refused: {refused:.1%} rms from float32, over 10 %)"
    graph = info.get("int8_graph")
    return f"{info['precision']} ({graph} graph)" if isinstance(graph, str) else str(info["precision"])


def _model_line(arch: dict[str, Any], window: dict[str, Any]) -> str:
    channels = arch.get("channels")
    shape = (
        f"channels {channels}, kernel {arch.get('kernel_size')}" if channels else str(arch.get("name", "?"))
    )
    frames, per_frame = window["model_frames"], window["reconstructions_per_frame"]
    return f"{shape}, {frames}-frame inputs ({per_frame} reconstruction(s) per frame)"


def format_info(info: dict[str, Any]) -> str:
    """The human-readable `bundle info`, one fact per line."""
    tr, th, f, w = info["training"], info["threshold"], info["features"], info["window"]
    seconds = f"{tr['seconds']:.0f} s of audio, " if tr["seconds"] is not None else ""
    lines = [
        f"bundle          {info['path']}",
        f"model id        {info['model_id']}",
        f"name            {info['name']}",
        f"created         {info['created_at']}",
        f"training data   {tr['files']} file(s) ({tr['train_files']} train, {tr['val_files']} validation, "
        f"{tr['skipped_files']} skipped), {seconds}fingerprint {tr['fingerprint']}",
    ]
    audio = tr["audio"]
    if audio:
        source = [f"rates {_counts(audio['sample_rates'])}" if "sample_rates" in audio else ""]
        source.append(f"formats {_counts(audio['formats'])}" if "formats" in audio else "")
        source.append(f"devices {_counts(audio['devices'])}" if audio.get("devices") else "")
        source.append(
            f"capture rates {_counts(audio['capture_rates'])}" if audio.get("capture_rates") else ""
        )
        source.append("LOSSY" if audio.get("lossy") else "")
        source.append(f"recorded by {audio['recorded_by']}" if audio.get("recorded_by") else "")
        lines.append(f"audio source    {'; '.join(s for s in source if s) or '(not recorded)'}")
    if tr["epochs_run"] is not None:
        took = f" in {tr['training_seconds']:.0f} s" if tr["training_seconds"] is not None else ""
        lines.append(f"trained         {tr['epochs_run']} epoch(s){took}")
    lines += [
        f"features        {f['sample_rate']} Hz, n_fft {f['n_fft']}, hop {f['hop_length']} "
        f"({f['frames_per_second']} frames/s), {f['n_mels']} mel bands up to {f['fmax']:g} Hz",
        f"windows         {w['n_frames']} frames ({w['seconds']} s) every {w['hop_frames']} "
        f"({w['hop_seconds']} s), residual pooled over {w['pool_frames']}, levelling {w['levelling']}, "
        f"score {w['score']}",
        f"threshold       clip {th['value']:.5f} = {th['mean']:.5f} + {th['k']:g} x {th['std']:.5f} "
        f"({th['n_clips']} validation clips)",
        f"                window {th['window_value']:.5f} = {th['window_mean']:.5f} + {th['k']:g} x "
        f"{th['window_std']:.5f} ({th['n_windows']} validation windows; the daemon's rule)",
        *_calibration_lines(info["calibration"]),
        f"model           {_model_line(info['architecture'], w)}, {_precision(info)}",
        f"fine-tuned from {info['parent_model_id'] or '- (trained from scratch)'}",
        "versions        " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
    ]
    return "\n".join(lines)


def show_info(path: Path, as_json: bool) -> int:
    """Print what the bundle at `path` is; a bad bundle raises BundleError (the CLI: one line, exit 2)."""
    info = describe(load_bundle(path))
    print(json.dumps(info, indent=2) if as_json else format_info(info))
    return 0


# ---- install ----------------------------------------------------------------------------------------


def _owner_of(folder: Path) -> tuple[int, int]:
    st = folder.stat()
    return st.st_uid, st.st_gid


def _chown_tree(root: Path, owner: tuple[int, int]) -> None:
    os.chown(root, *owner, follow_symlinks=False)
    for path in root.rglob("*"):
        os.chown(path, *owner, follow_symlinks=False)


def _make_parents(folder: Path) -> None:
    """Create missing folders down to `folder` (0755), each owned like the nearest existing one when root:
    a models folder created by root inside the daemon's state directory must stay the daemon's."""
    missing = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    owner = _owner_of(probe)
    for created in reversed(missing):
        created.mkdir(mode=0o755)
        created.chmod(0o755)
        if os.geteuid() == 0:
            os.chown(created, *owner)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: a filesystem or kernel without it
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def install_bundle(source: Path, target: Path) -> Bundle:
    """Copy the bundle `source` to `target` (replacing a bundle there), checked, readable, atomically.

    Raises BundleError for a bad source, a target that exists and is not a bundle, or a failed copy.
    """
    load_bundle(source)  # refuse a bad bundle before touching anything
    if target.exists() and not (target / META_FILE).is_file():
        raise BundleError(f"{target}: exists and is not a model bundle; refusing to replace it")
    staging = target.with_name(f".{target.name}.installing")
    retired = target.with_name(f".{target.name}.old")
    try:
        _make_parents(target.parent)
        for leftover in (staging, retired):
            shutil.rmtree(leftover, ignore_errors=True)
        shutil.copytree(source, staging, symlinks=False)
        make_world_readable(staging)
        if os.geteuid() == 0:  # root installs for the daemon's user: give it the files
            _chown_tree(staging, _owner_of(target.parent))
        bundle = load_bundle(staging)  # what the daemon will load, as it will load it
        open_autoencoder(bundle)
        if target.exists():
            if _exchange(staging, target):
                shutil.rmtree(staging)  # now holds the old bundle
            else:
                target.rename(retired)
                staging.rename(target)
                shutil.rmtree(retired)
        else:
            staging.rename(target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise BundleError(f"{target}: cannot install the bundle ({exc.strerror or exc})") from exc
    except BundleError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    installed = load_bundle(target)
    logger.info("installed %s as %s", installed.meta.model_id, target)
    return installed
