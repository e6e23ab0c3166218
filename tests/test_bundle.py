"""Loading bundles: damaged or mismatched ones are specific, clear errors; the runtime never needs torch."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import soundfile as sf
from onnx import TensorProto, helper

from anomalyd.bundle import load_bundle, make_world_readable, sha256_file, write_meta
from anomalyd.errors import BundleError, ChecksumError, IncompatibleBundleError
from anomalyd.inference import open_autoencoder
from anomalyd.scoring import ClipScorer
from anomalyd.windows import slice_windows
from tests.bundle_helpers import WINDOWS, edit_meta, install_graph, rehash, window_info
from tests.conftest import ROOT
from training.export import ONNX_IR_VERSION

pytestmark = pytest.mark.slow  # needs the session's trained bundle


@pytest.fixture
def copy(bundle_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle_dir, target)
    return target


@pytest.fixture
def old(window_bundle_dir: Path, tmp_path: Path) -> Path:
    """A copy of a format 3 bundle (whole windows reconstructed), for the formats before tiles."""
    target = tmp_path / "old-bundle"
    shutil.copytree(window_bundle_dir, target)
    return target


def test_good_bundle_loads(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert bundle.filterbank.shape == (128, 513)
    assert bundle.meta.threshold.value > bundle.meta.threshold.clip_scores.mean


def test_flipped_byte_in_model_is_a_checksum_error(copy: Path) -> None:
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"model\.onnx: checksum mismatch"):
        load_bundle(copy)


def test_filterbank_from_another_bundle_is_a_checksum_error(copy: Path) -> None:
    np.save(copy / "mel_filterbank.npy", np.zeros((128, 513), dtype=np.float32))
    with pytest.raises(ChecksumError, match="mel_filterbank"):
        load_bundle(copy)


def test_corrupt_json(copy: Path) -> None:
    (copy / "model.json").write_text('{"format": "anomalyd-bundle", ')
    with pytest.raises(BundleError, match="corrupt, not valid JSON"):
        load_bundle(copy)


def test_missing_file(copy: Path) -> None:
    (copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.onnx: missing from the bundle"):
        load_bundle(copy)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="no such bundle directory"):
        load_bundle(tmp_path / "nothing")


def test_future_format_version(copy: Path) -> None:
    edit_meta(copy, lambda m: m.update(format_version=99))
    with pytest.raises(
        IncompatibleBundleError, match="format version 99, this anomalyd reads versions 1, 2, 3"
    ):
        load_bundle(copy)


def _as_version_1(meta: dict[str, Any]) -> None:
    """model.json as a version 1 writer made it: no levelling and no residual statistics."""
    meta.update(format_version=1)
    del meta["normalisation"]["levelling"]
    del meta["residual"]


def _as_version_2(meta: dict[str, Any]) -> None:
    """model.json as a version 2 writer made it: levelled, no residual statistics."""
    meta.update(format_version=2)
    del meta["residual"]


def test_version_1_bundle_still_loads_and_scores_unlevelled_windows(old: Path, synth_train: Path) -> None:
    clip = sorted(synth_train.glob("*.wav"))[0]
    levelled = ClipScorer.from_bundle(load_bundle(old)).score_file(clip).score
    edit_meta(old, _as_version_1)
    v1 = load_bundle(old)
    assert v1.meta.normalisation.levelling == "none"
    # The same weights fed unlevelled windows: what a version 1 reader computed, not the version 2 score.
    unlevelled = ClipScorer.from_bundle(v1).score_file(clip).score
    assert np.isfinite(unlevelled)
    assert unlevelled != pytest.approx(levelled, rel=1e-3)


def test_version_1_bundle_claiming_levelling_is_refused(old: Path) -> None:
    edit_meta(old, lambda m: (m.update(format_version=1), m.pop("residual")))
    with pytest.raises(BundleError, match=r"normalisation\.levelling needs format_version 2"):
        load_bundle(old)


def test_version_2_bundle_still_loads_and_scores_the_squared_pooled_residual(
    old: Path, synth_train: Path
) -> None:
    clip = sorted(synth_train.glob("*.wav"))[0]
    weighted = ClipScorer.from_bundle(load_bundle(old)).score_file(clip).score
    edit_meta(old, _as_version_2)
    v2 = load_bundle(old)
    assert v2.meta.residual is None
    scorer = ClipScorer.from_bundle(v2)
    plain = scorer.score_file(clip).score
    # What a version 2 reader computed: the mean squared pooled residual of the same windows.
    audio, _ = sf.read(clip, dtype="float32")
    g = v2.meta.window
    windows = v2.meta.normalisation.apply(slice_windows(scorer.logmel(audio), g.n_frames, g.hop_frames))
    rebuilt = scorer.autoencoder.reconstruct(windows)
    residual = (rebuilt - windows).reshape(*windows.shape[:2], -1, g.pool_frames).mean(axis=3)
    assert plain == pytest.approx(float(np.mean(residual.astype(np.float64) ** 2)), rel=1e-4)
    assert plain != pytest.approx(weighted, rel=1e-3)


def test_format_3_bundle_reconstructs_each_window_whole(
    old: Path, bundle_dir: Path, synth_train: Path
) -> None:
    """Bundles from before tiles score as they always did: each window through the model in one piece,
    its band-weighted pooled residual; a format 4 bundle's model takes tiles."""
    meta = json.loads((old / "model.json").read_text())
    assert meta["format_version"] == 3
    assert "tile_frames" not in meta["window"]
    v3 = load_bundle(old)
    assert v3.meta.window.model_frames == v3.meta.window.n_frames == 64
    scorer = ClipScorer.from_bundle(v3)
    audio, _ = sf.read(sorted(synth_train.glob("*.wav"))[0], dtype="float32")
    g = v3.meta.window
    windows = v3.meta.normalisation.apply(slice_windows(scorer.logmel(audio), g.n_frames, g.hop_frames))
    rebuilt = scorer.autoencoder.reconstruct(windows)
    pooled = (rebuilt - windows).reshape(*windows.shape[:2], -1, g.pool_frames).mean(axis=3)
    assert v3.meta.residual is not None
    np.testing.assert_allclose(
        scorer.score_samples(audio).window_errors, v3.meta.residual.score(pooled), rtol=1e-5
    )
    new = json.loads((bundle_dir / "model.json").read_text())
    assert new["format_version"] == 4
    assert new["window"]["tile_frames"] == 16
    assert load_bundle(bundle_dir).meta.window.model_frames == 16


def test_rewriting_a_version_2_bundle_keeps_it_version_2(old: Path) -> None:
    """What `calibrate` does to model.json: a bundle without residual statistics must not come back
    claiming version 3, which requires them."""
    edit_meta(old, _as_version_2)
    meta = load_bundle(old).meta
    write_meta(old, replace(meta, threshold=replace(meta.threshold, k=4.0)))
    again = load_bundle(old)
    assert json.loads((old / "model.json").read_text())["format_version"] == 2
    assert again.meta.residual is None
    assert again.meta.threshold.k == 4.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("residual"), r"residual: required from format_version 3 on"),
        (
            lambda m: m["window"].pop("tile_frames"),
            r"window\.tile_frames: a positive number from format_version 4",
        ),
        (
            lambda m: m.update(format_version=3),
            r"window\.tile_frames: a positive number from format_version 4",
        ),
        (lambda m: m["window"].update(tile_frames=24), r"tile_frames must divide n_frames and hop_frames"),
        (
            lambda m: (m.update(format_version=2), m["window"].pop("tile_frames")),
            r"residual needs format_version 3",
        ),
        (lambda m: m["residual"]["var"].__setitem__(5, 0.0), r"residual\.var\[5\]"),
        (lambda m: m["residual"].update(mean=[0.0] * 64), "residual mean has 64 values, features have 128"),
        (lambda m: m["residual"].update(n_blocks=1), r"residual\.n_blocks"),
    ],
    ids=["missing", "no-tile", "version-3-tiles", "tile-24", "version-2", "zero-var", "short", "one-block"],
)
def test_bad_residual_statistics_are_refused_in_one_line(
    copy: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    edit_meta(copy, change)
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(copy)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["features"].update(n_mels=64), "normalisation mean has 128 values, features have 64"),
        (lambda m: m["features"].update(power=1.0), "power must be 2.0"),
        (lambda m: m["features"].update(center=True), "center=true is not supported"),
        (lambda m: m["window"].update(pool_frames=7), "pool_frames divide n_frames"),
    ],
    ids=["n_mels", "power", "center", "pool"],
)
def test_incompatible_feature_parameters(
    copy: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    edit_meta(copy, change)
    with pytest.raises(IncompatibleBundleError, match="incompatible feature parameters") as info:
        load_bundle(copy)
    assert message in str(info.value)


def test_filterbank_shape_must_match_features(copy: Path) -> None:
    edit_meta(copy, lambda m: m["features"].update(n_fft=2048))
    with pytest.raises(
        IncompatibleBundleError, match=r"shape \(128, 513\), feature parameters need \(128, 1025\)"
    ):
        load_bundle(copy)


def test_model_input_must_match_window_geometry(copy: Path) -> None:
    edit_meta(copy, lambda m: m["window"].update(tile_frames=32, hop_frames=32))
    with pytest.raises(IncompatibleBundleError, match=r"input shape .* need \[batch, 1, 128, 32\]"):
        ClipScorer.from_bundle(load_bundle(copy))


def test_unloadable_onnx_with_matching_checksum(copy: Path) -> None:
    (copy / "model.onnx").write_bytes(b"\x00garbage" * 100)
    edit_meta(copy, lambda m: m["files"].update({"model.onnx": sha256_file(copy / "model.onnx")}))
    with pytest.raises(BundleError, match="not a loadable ONNX model"):
        ClipScorer.from_bundle(load_bundle(copy))


def test_missing_metadata_field(copy: Path) -> None:
    edit_meta(copy, lambda m: m.pop("threshold"))
    with pytest.raises(BundleError, match=r"model\.json: threshold: required field is missing"):
        load_bundle(copy)


def test_runtime_scores_without_torch(bundle_dir: Path, synth_train: Path) -> None:
    """Load and score in a fresh interpreter in which importing torch is impossible."""
    clip = sorted(synth_train.glob("*.wav"))[0]
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
        "from anomalyd.cli import main\n"
        f"status = main(['score', '--bundle', {str(bundle_dir)!r}, {str(clip)!r}])\n"
        "assert status in (0, 1), status\n"
        "assert 'librosa' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert clip.name in result.stdout


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: m["features"].update(n_fft="1024"),
            r"features\.n_fft = '1024': Input should be a valid integer",
        ),
        (
            lambda m: m["window"].update(n_frames=True),
            r"window\.n_frames = True: Input should be a valid integer",
        ),
        (lambda m: m["features"].update(fmax=8000), None),  # an integer where a float belongs is fine
        (
            lambda m: m["threshold"].update(k=float("nan")),
            r"threshold\.k = nan: Input should be a finite number",
        ),
        (
            lambda m: m["threshold"].update(std=float("inf")),
            r"threshold\.std = inf: Input should be a finite number",
        ),
        (
            lambda m: m["window"].update(hop_frames=-3),
            r"window\.hop_frames = -3: Input should be greater than or equal to 1",
        ),
        (
            lambda m: m["features"].update(n_mels=10**18),
            r"features\.n_mels = 1000000000000000000: Input should be less than or equal to 512",
        ),
        (
            lambda m: m["features"].update(sample_rate=1),
            r"features\.sample_rate = 1: Input should be greater than or equal to 1000",
        ),
        (
            lambda m: m["normalisation"].update(std=[0.0] * 128),
            r"normalisation\.std\[0\] = 0\.0: Input should be greater than or equal to 0\.000001",
        ),
        (
            lambda m: m["normalisation"].update(mean=[0.0] * 100_000),
            r"normalisation\.mean = \[0\.0, .*List should have at most 512 items",
        ),
        (
            lambda m: m["normalisation"].update(mean="zeros"),
            r"normalisation\.mean = 'zeros': Input should be a valid list",
        ),
        (
            lambda m: m["features"].update(colour="red"),
            r"features\.colour: unknown field; allowed here: amin, center, fmax",
        ),
        (lambda m: m.update(colour="red"), r"colour: unknown field; allowed here: architecture, created_at"),
        (lambda m: m.pop("window"), r"window: required field is missing"),
        (lambda m: m["threshold"].pop("n_clips"), r"threshold\.n_clips: required field is missing"),
        (lambda m: m["threshold"].update(value=1.0), r"value 1\.0 is not mean \+ k \* std"),
        (
            lambda m: m["threshold"].update(n_clips=1),
            r"threshold\.n_clips = 1: Input should be greater than or equal to 2",
        ),
        (
            lambda m: m["files"].update({"../model.onnx": "0" * 64}),
            r"files\['\.\./model\.onnx'\] \(name\) = '\.\./model\.onnx': allowed: a plain file name inside the bundle folder",
        ),
        (
            lambda m: m["files"].update({"/etc/passwd": "0" * 64}),
            r"files\['/etc/passwd'\] \(name\) = .*plain file name",
        ),
        (
            lambda m: m["files"].update({"model.onnx": "XYZ"}),
            r"files\['model\.onnx'\] = 'XYZ': allowed: a SHA-256 digest",
        ),
        (
            lambda m: m.update(files=["model.onnx"]),
            r"files = \['model\.onnx'\]: Input should be a valid dictionary",
        ),
        (lambda m: m.update(created_at="yesterday"), r"created_at = 'yesterday': not an ISO 8601 time"),
        (lambda m: m.update(created_at="2026-01-01T00:00:00"), r"created_at = .*needs its UTC offset"),
        (lambda m: m.update(model_id="a\nb"), r"model_id = 'a\\nb': String should match pattern"),
        (lambda m: m.update(features=None), r"features = None: Input should be a valid dictionary"),
        (lambda m: m["training"].update(junk=nested(500)), None),  # descriptive fields may hold anything
        (lambda m: m["training"].pop("audio"), None),  # bundles from before it was recorded
        (
            lambda m: m["training"]["audio"].update(seconds="long"),
            r"training\.audio\.seconds = 'long': Input should be a valid number",
        ),
        (
            lambda m: m["training"]["audio"]["sample_rates"].update({"fast": 2}),
            r"training\.audio\.sample_rates\['fast'\] \(name\) = 'fast': allowed: a sample rate in Hz",
        ),
        (
            lambda m: m["training"]["audio"].update(capture_rates=[10**9]),
            r"training\.audio\.capture_rates\[0\] = 1000000000: Input should be less than or equal to 384000",
        ),
        (
            lambda m: m["training"]["audio"].update(lossy="no"),
            r"training\.audio\.lossy = 'no': Input should be a valid boolean",
        ),
        (
            lambda m: m["training"]["audio"].update(devices=["mic\n"]),
            r"training\.audio\.devices\[0\] = 'mic\\n': String should match pattern",
        ),
        (
            lambda m: m["training"]["audio"].update(colour="red"),
            r"training\.audio\.colour: unknown field; allowed here: capture_rates, devices",
        ),
        (
            lambda m: m["training"].update(audio=[1]),
            r"training\.audio = \[1\]: Input should be a valid dictionary",
        ),
        (
            lambda m: m.update(format_version=True),
            r"bundle format version True, this anomalyd reads versions 1, 2, 3",
        ),
        (lambda m: m.update(format_version="1"), r"bundle format version '1', this anomalyd reads versions"),
        (
            lambda m: m["normalisation"].update(levelling="frame"),
            r"normalisation\.levelling = 'frame': Input should be 'none' or 'window_power'",
        ),
    ],
)
def test_every_field_is_type_and_range_checked(
    copy: Path, change: Callable[[dict[str, Any]], None], message: str | None
) -> None:
    edit_meta(copy, change)
    if message is None:
        load_bundle(copy)
        return
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(copy)
    assert str(info.value).startswith(f"{copy / 'model.json'}: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            lambda text: text[:-1] + ', "junk": ' + "[" * 100_000 + "]" * 100_000 + "}",
            "corrupt, not valid JSON",
        ),
        (lambda text: text.replace('"n_mels": 128', '"n_mels": ' + "9" * 5000), "corrupt, not valid JSON"),
        (lambda text: text + " " * (17 << 20), r"bytes; a model\.json may hold 16777216 at most"),
        (lambda text: "[1, 2]", "not an anomalyd bundle"),
        (lambda text: "\udcff", "corrupt, not valid JSON"),
    ],
    ids=["deeply-nested", "huge-integer", "huge-file", "not-an-object", "not-utf8"],
)
def test_junk_model_json_is_a_clear_error(copy: Path, content: Callable[[str], str], message: str) -> None:
    meta = copy / "model.json"
    meta.write_bytes(content(meta.read_text()).encode("utf-8", "surrogateescape"))
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)


def test_listed_files_must_lie_inside_the_bundle(copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((copy / "weights.safetensors").read_bytes())
    (copy / "weights.safetensors").unlink()
    (copy / "weights.safetensors").symlink_to(outside)
    with pytest.raises(
        BundleError, match=r"weights\.safetensors: leads to .*elsewhere\.safetensors, outside"
    ):
        load_bundle(copy)
    # A link that stays inside the folder is fine.
    (copy / "weights.safetensors").unlink()
    (copy / "weights-v1.safetensors").write_bytes(outside.read_bytes())
    (copy / "weights.safetensors").symlink_to("weights-v1.safetensors")
    load_bundle(copy)
    # So is a link loop a clear error rather than a crash.
    (copy / "weights.safetensors").unlink()
    (copy / "weights.safetensors").symlink_to("weights.safetensors")
    with pytest.raises(BundleError, match=r"weights\.safetensors: "):
        load_bundle(copy)


def test_filterbank_header_is_checked_before_its_data(copy: Path) -> None:
    path = copy / "mel_filterbank.npy"
    data = bytearray(path.read_bytes())
    assert data[8:10] == (118).to_bytes(2, "little")  # version 1 header: 118 bytes, ending in a newline
    # A header that declares a terabyte: refused from the header, without allocating it.
    data[10:128] = (
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 513), }".ljust(117) + b"\n"
    )
    path.write_bytes(bytes(data))
    rehash(copy, "mel_filterbank.npy")
    with pytest.raises(BundleError, match=r"mel_filterbank\.npy: "):
        load_bundle(copy)

    np.save(path, np.full((128, 513), np.nan, dtype=np.float32))
    rehash(copy, "mel_filterbank.npy")
    with pytest.raises(BundleError, match="negative, NaN or infinite weights"):
        load_bundle(copy)

    np.save(path, np.zeros((128, 513), dtype=object), allow_pickle=True)
    rehash(copy, "mel_filterbank.npy")
    with pytest.raises(BundleError, match=r"mel_filterbank\.npy: "):
        load_bundle(copy)


def test_a_graph_that_returns_its_input_shape_loads(copy: Path) -> None:
    install_graph(copy, *identity())
    autoencoder = open_autoencoder(load_bundle(copy))
    tiles = np.ones((3, 128, 16), dtype=np.float32)
    np.testing.assert_array_equal(autoencoder.reconstruct(tiles), tiles)


def identity(shape: list[Any] = WINDOWS, kind: int = TensorProto.FLOAT) -> Graph:
    return (
        [helper.make_node("Identity", ["w"], ["r"])],
        [window_info("w", shape, kind)],
        [window_info("r", shape, kind)],
    )


Graph = tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]
TRANSPOSED: Graph = (
    [helper.make_node("Transpose", ["w"], ["r"], perm=[0, 1, 3, 2])],
    [window_info("w", WINDOWS)],
    [window_info("r", ["batch", 1, 16, 128])],
)
TWO_OUTPUTS: Graph = (
    [helper.make_node("Identity", ["w"], ["r"]), helper.make_node("Identity", ["w"], ["s"])],
    [window_info("w", WINDOWS)],
    [window_info("r", WINDOWS), window_info("s", WINDOWS)],
)
TIMES_NAN: Graph = (
    [helper.make_node("Mul", ["w", "nan"], ["r"])],
    [window_info("w", WINDOWS)],
    [window_info("r", WINDOWS)],
)


@pytest.mark.parametrize(
    ("graph", "extra", "message"),
    [
        (
            TRANSPOSED,
            {},
            r"output shape \['batch', 1, 16, 128\] of tensor\(float\), bundle tiles need \[batch, 1, 128, 16\]",
        ),
        (identity([1, 1, 128, 16]), {}, "fails on a trial batch"),
        (TWO_OUTPUTS, {}, "expected one input and one output, graph has 1 and 2"),
        (identity(kind=TensorProto.DOUBLE), {}, r"input shape .* of tensor\(double\)"),
        (
            TIMES_NAN,
            {"constants": {"nan": np.array(np.nan, dtype=np.float32)}},
            "returns values that are not finite",
        ),
        (
            identity(),
            {"ir_version": 14},
            r"not a loadable ONNX model \(Unsupported model IR version: 14, max supported IR version: 13\)",
        ),
    ],
    ids=["transposed", "fixed-batch", "two-outputs", "double", "nan-output", "ir-14"],
)
def test_the_graph_is_checked_when_the_session_is_built(
    copy: Path, graph: Graph, extra: dict[str, Any], message: str
) -> None:
    install_graph(copy, *graph, **extra)
    bundle = load_bundle(copy)  # the files themselves are intact: only building the session can tell
    with pytest.raises(BundleError, match=message) as info:
        open_autoencoder(bundle)
    assert str(info.value).startswith(f"{copy / 'model.onnx'}: ")
    assert "\n" not in str(info.value)


def test_export_writes_a_runtime_loadable_world_readable_bundle(bundle_dir: Path) -> None:
    """IR version pinned to what the runtime reads (the pinned onnx would write 14); 0755/0644 files."""
    model = onnx.load(str(bundle_dir / "model.onnx"))
    assert model.ir_version == ONNX_IR_VERSION == 8
    assert load_bundle(bundle_dir).meta.export["onnx_ir_version"] == 8
    assert stat.S_IMODE(bundle_dir.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in bundle_dir.iterdir()}
    assert modes == dict.fromkeys(
        ["model.json", "model.onnx", "mel_filterbank.npy", "weights.safetensors"], 0o644
    )


def test_make_world_readable_ignores_the_umask(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    old = os.umask(0o077)
    try:
        folder.mkdir()
        (folder / "weights.safetensors").write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((folder / "weights.safetensors").stat().st_mode) == 0o600
    make_world_readable(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "weights.safetensors").stat().st_mode) == 0o644


# Root reads any file; without these two capabilities it meets file modes like any other user.
WITHOUT_DAC = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and util-linux's setpriv"
)
def test_unreadable_bundle_file_is_one_clear_line(copy: Path, synth_train: Path) -> None:
    """The daemon may run as another user than training: a file it cannot read is an error naming the
    file, not a traceback."""
    clip = sorted(synth_train.glob("*.wav"))[0]
    command = [*WITHOUT_DAC, sys.executable, "-m", "anomalyd", "score", "--bundle", str(copy), str(clip)]
    ok = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)
    assert ok.returncode in (0, 1), ok.stderr

    for name in ("weights.safetensors", "model.json", "model.onnx"):
        (copy / name).chmod(0)
        refused = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)
        assert refused.returncode == 2
        assert refused.stderr == f"anomalyd: error: {copy / name}: cannot read (Permission denied)\n"
        (copy / name).chmod(0o644)
