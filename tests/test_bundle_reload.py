"""SIGHUP onto a malformed bundle: the running daemon keeps its configuration and keeps scoring."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from tests.bundle_helpers import edit_meta, rehash
from tests.daemon_helpers import DaemonProcess, write_config, write_recording

pytestmark = [pytest.mark.slow, pytest.mark.fault]


def _string_for_a_number(bundle: Path) -> None:
    edit_meta(bundle, lambda m: m["window"].update(n_frames="64"))


def _garbage_graph(bundle: Path) -> None:
    (bundle / "model.onnx").write_bytes(b"\x00garbage" * 100)
    rehash(bundle, "model.onnx")


def _ir_14_graph(bundle: Path) -> None:
    graph = onnx.load(str(bundle / "model.onnx"))
    graph.ir_version = 14
    onnx.save(graph, str(bundle / "model.onnx"))
    rehash(bundle, "model.onnx")


def _link_outside(bundle: Path) -> None:
    outside = bundle.parent / "elsewhere.npy"
    shutil.copy(bundle / "mel_filterbank.npy", outside)
    (bundle / "mel_filterbank.npy").unlink()
    (bundle / "mel_filterbank.npy").symlink_to(outside)


TAMPERING: dict[str, tuple[Callable[[Path], None], str]] = {
    "string": (_string_for_a_number, "window.n_frames = '64': Input should be a valid integer"),
    "garbage-onnx": (_garbage_graph, "not a loadable ONNX model"),
    "ir-14": (_ir_14_graph, "Unsupported model IR version: 14"),
    "link-outside": (_link_outside, "outside the bundle folder"),
}


def wait_log_after(daemon: DaemonProcess, seen: int, text: str) -> None:
    """Wait for `text` in what the daemon logged after the first `seen` characters."""
    daemon.wait_for(lambda: text in daemon.log[seen:], 30.0, repr(text))


def test_sighup_onto_a_malformed_bundle_keeps_the_running_configuration(
    bundle_dir: Path, tmp_path: Path
) -> None:
    recording = write_recording(tmp_path / "fan.wav", "normal", 30.0)
    bundle = tmp_path / "models" / "fan"
    shutil.copytree(bundle_dir, bundle)
    config = write_config(
        tmp_path / "d.toml", bundle, {"fan": {"path": recording, "realtime": True, "loop": True}}
    )
    daemon = DaemonProcess(config)
    try:
        daemon.wait_log("anomalyd running on node")
        for tamper, message in TAMPERING.values():
            tamper(bundle)
            seen = len(daemon.log)
            daemon.signal(signal.SIGHUP)
            wait_log_after(daemon, seen, "reload refused, the running configuration stays")
            assert message in daemon.log[seen:], daemon.log[seen:]
            assert daemon.process.poll() is None
            shutil.rmtree(bundle)
            shutil.copytree(bundle_dir, bundle)
        seen = len(daemon.log)
        daemon.signal(signal.SIGHUP)  # the repaired bundle reloads
        wait_log_after(daemon, seen, "reloaded")
        assert "Traceback" not in daemon.log
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(10) == 0, daemon.log
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
