"""Shared fixtures: synthetic machine audio on disk and one small bundle trained on it per test session."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures import synth
from tests.mqtt_helpers import Broker, make_certificates
from training import train

ROOT = Path(__file__).resolve().parent.parent
MIMII = ROOT / "fixtures" / "mimii"
SMALL_PRESET = ROOT / "configs" / "train-small.toml"


@pytest.fixture(scope="session", autouse=True)
def project_reachable_by_other_users() -> Iterator[None]:
    """Tests run the daemon and the CLI as another user (as systemd's DynamicUser does), from this checkout
    and its .venv. A checkout inside a private folder (`mktemp -d` makes them 0700) would hide them from
    that user: folders above the checkout get search permission (not read) for the session, then their
    modes back."""
    changed = []
    for folder in (ROOT, *ROOT.parents):
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            changed.append((folder, stat.S_IMODE(mode)))
    yield
    for folder, mode in changed:
        folder.chmod(mode)


@pytest.fixture(scope="session")
def synth_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 normal clips of 4 s (seed 0): the training set."""
    out = tmp_path_factory.mktemp("synth-train")
    synth.write_dataset(out, n_normal=30, per_fault=0, seconds=4.0, seed=0)
    return out / "normal"


@pytest.fixture(scope="session")
def synth_test(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out audio (seed 1): 40 normal clips and 10 of each fault type."""
    out = tmp_path_factory.mktemp("synth-test")
    synth.write_dataset(out, n_normal=40, per_fault=10, seconds=4.0, seed=1)
    return out


@pytest.fixture(scope="session")
def bundle_dir(synth_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model trained on `synth_train`, through the real training command."""
    out = tmp_path_factory.mktemp("bundle") / "machine"
    status = train.main(
        ["--normal", str(synth_train), "--out", str(out), "--preset", str(SMALL_PRESET), "--quiet"]
    )
    assert status == 0
    return out


@pytest.fixture(scope="session")
def window_bundle_dir(synth_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same, with whole windows as the model's input (`tile_frames = 0`): a format 3 bundle, as
    anomalyd wrote them before tiles; older formats are this with fields taken out."""
    out = tmp_path_factory.mktemp("bundle") / "machine-windows"
    status = train.main(
        ["--normal", str(synth_train), "--out", str(out), "--preset", str(SMALL_PRESET), "--quiet",
         "--tile-frames", "0", "--batch-size", "32"]
    )  # fmt: skip
    assert status == 0
    return out


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throw-away CA, a server certificate for localhost, and an unrelated CA."""
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def broker(tmp_path: Path, certs: dict[str, Path]) -> Iterator[Broker]:
    """A real Mosquitto on loopback for one test (password login, a plain and a TLS listener)."""
    folder = tmp_path / "broker"
    folder.mkdir()
    b = Broker(folder, certs)
    b.start()
    yield b
    b.stop()


CHROMIUM = Path("/usr/bin/chromium")  # Debian's; the set-up installs it (never a downloaded browser)


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, object]) -> dict[str, object]:
    """Playwright drives Debian's Chromium; a missing one fails the browser tests, never skips them."""
    assert CHROMIUM.exists(), f"{CHROMIUM} missing: `make test` installs Debian's chromium"
    return {**browser_type_launch_args, "executable_path": str(CHROMIUM)}


@pytest.fixture(scope="session")
def base_url() -> None:
    """Each browser test's daemon has its own port: pages are opened by their full URL."""
    return None
