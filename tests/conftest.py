"""Shared fixtures: synthetic machine audio on disk and one small bundle trained on it per test run.

`make test` runs the tests in two processes (pytest-xdist): most tests wait on real daemons, brokers and
browsers rather than compute, so two share the machine's cores well. What costs compute to make (the
synthetic clips, the trained bundles) is made once per run and shared by both (`_made_once`).
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from filelock import FileLock

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One core per test process: torch's and BLAS's thread pools (here and in the processes tests start)
    # would otherwise spin against each other's on a 2-core machine.
    os.environ["OMP_NUM_THREADS"] = "1"

import torch

from fixtures import synth
from tests.mqtt_helpers import Broker, make_certificates
from training import train

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
MIMII = ROOT / "fixtures" / "mimii"
SMALL_PRESET = ROOT / "configs" / "train-small.toml"
_REACHABLE = pytest.StashKey[list[tuple[Path, int]]]()


def pytest_configure(config: pytest.Config) -> None:
    """Tests run the daemon and the CLI as another user (as systemd's DynamicUser does), from this checkout
    and its .venv. A checkout inside a private folder (`mktemp -d` makes them 0700) would hide them from
    that user: folders above the checkout get search permission (not read) for the run, then their modes
    back. Done by the controlling process only, so that no test process gives the modes back while another
    still runs tests."""
    if hasattr(config, "workerinput"):
        return
    changed = []
    for folder in (ROOT, *ROOT.parents):
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            changed.append((folder, stat.S_IMODE(mode)))
    config.stash[_REACHABLE] = changed


def pytest_unconfigure(config: pytest.Config) -> None:
    for folder, mode in config.stash.get(_REACHABLE, []):
        folder.chmod(mode)


def _made_once(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder `make` fills, made once per test run: under pytest-xdist the first process to need it makes
    it (the others wait on a lock) and all share it. A failed make leaves nothing half-made for the next."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        out = factory.mktemp(name)
        make(out)
        return out
    root = factory.getbasetemp().parent / "made-once"
    root.mkdir(exist_ok=True)
    out, done = root / name, root / f"{name}.done"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            make(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def synth_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 normal clips of 4 s (seed 0): the training set."""
    out = _made_once(
        tmp_path_factory, "synth-train",
        lambda out: synth.write_dataset(out, n_normal=30, per_fault=0, seconds=4.0, seed=0),
    )  # fmt: skip
    return out / "normal"


@pytest.fixture(scope="session")
def synth_test(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out audio (seed 1): 40 normal clips and 10 of each fault type."""
    return _made_once(
        tmp_path_factory, "synth-test",
        lambda out: synth.write_dataset(out, n_normal=40, per_fault=10, seconds=4.0, seed=1),
    )  # fmt: skip


@pytest.fixture(scope="session")
def bundle_dir(synth_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model trained on `synth_train`, through the real training command."""
    return (
        _made_once(tmp_path_factory, "bundle", lambda out: _train(synth_train, out / "machine")) / "machine"
    )


@pytest.fixture(scope="session")
def window_bundle_dir(synth_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same, with whole windows as the model's input (`tile_frames = 0`) in float32: a format 3
    bundle, as anomalyd wrote them before tiles; older formats are this with fields taken out."""
    options = ("--tile-frames", "0", "--batch-size", "32", "--precision", "float32")
    made = _made_once(
        tmp_path_factory, "bundle-windows", lambda out: _train(synth_train, out / "machine-windows", *options)
    )
    return made / "machine-windows"


def _train(normal: Path, out: Path, *options: str) -> None:
    status = train.main(
        ["--normal", str(normal), "--out", str(out), "--preset", str(SMALL_PRESET), "--quiet", *options]
    )
    assert status == 0


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
