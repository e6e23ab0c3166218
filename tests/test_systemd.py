"""The unit file, checked offline by systemd's own tools: valid, and hardened to exposure <= 2.0."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNIT = ROOT / "systemd" / "anomalyd.service"
INSTALLED = "/opt/anomalyd/.venv/bin/anomalyd"

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")


# The drop-in the README gives for the dashboard's write token.
WEB_TOKEN = "LoadCredential=web-token:/etc/anomalyd/web-token"


@pytest.fixture(params=["as shipped", "with the dashboard's token credential"])
def unit(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """The unit with ExecStart pointing at this checkout's entry point (verify checks that it exists),
    as shipped and with the web token's credential added as the README says."""
    entry = Path(sys.executable).parent / "anomalyd"
    assert entry.exists(), "the anomalyd entry point is installed in the virtual environment"
    text = UNIT.read_text().replace(INSTALLED, str(entry))
    if request.param != "as shipped":
        assert f"#   systemctl edit anomalyd    ->  [Service]  {WEB_TOKEN}" in text
        text = text.replace("[Install]", f"{WEB_TOKEN}\n\n[Install]")
        assert text.index(WEB_TOKEN) > text.index("[Service]")
    copy = tmp_path / "anomalyd.service"
    copy.write_text(text)
    return copy


def test_unit_verifies(unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "anomalyd.service" not in result.stderr  # no warnings about the unit itself


def test_unit_exposure_is_at_most_2(unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    level = re.search(r"Overall exposure level for anomalyd\.service: (\d+\.\d+)", result.stdout)
    assert level, result.stdout + result.stderr
    assert float(level[1]) <= 2.0
    assert result.returncode == 0


def test_unit_has_the_lifecycle_the_daemon_implements() -> None:
    settings = dict(
        line.split("=", 1)
        for line in UNIT.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "notify"
    assert settings["Restart"] == "on-failure"
    assert settings["WatchdogSec"].endswith("s")
    assert settings["ExecStartPre"] == f"{INSTALLED} check-config /etc/anomalyd/anomalyd.toml"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["DynamicUser"] == "yes"
    assert settings["StateDirectory"] == "anomalyd"
    assert settings["RuntimeDirectory"] == "anomalyd"  # the control socket's folder
    assert settings["RuntimeDirectoryMode"] == "0750"
    assert settings["SupplementaryGroups"] == "audio"
    assert settings["DeviceAllow"] == "char-alsa rw"
    assert settings["ProtectSystem"] == "strict"
