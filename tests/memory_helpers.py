"""Peak memory of a real command, measured by the kernel (getrusage), not estimated."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from tests.conftest import ROOT

MAX_RSS_MB = 500  # the bound the issue sets for any input file

# A fresh parent whose only child is the command: RUSAGE_CHILDREN then reports that command alone, not
# the largest of everything the test process ever ran (training, other tests).
_PARENT = (
    "import json, resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"  # kB on Linux
    "json.dump({'rc': r.returncode, 'out': r.stdout, 'err': r.stderr, 'peak_mb': peak}, sys.stdout)\n"
)


@dataclass(frozen=True)
class Measured:
    returncode: int
    stdout: str
    stderr: str
    peak_mb: float  # the command's maximum resident set size


def run_measured(*args: str, timeout: float = 300) -> Measured:
    outer = subprocess.run(
        [sys.executable, "-c", _PARENT, *args],
        capture_output=True, text=True, timeout=timeout, check=True, cwd=ROOT,
    )  # fmt: skip
    result = json.loads(outer.stdout)
    return Measured(result["rc"], result["out"], result["err"], result["peak_mb"])


def anomalyd(*args: str, timeout: float = 300) -> Measured:
    """`python -m anomalyd ARGS` with its peak RSS."""
    return run_measured(sys.executable, "-m", "anomalyd", *args, timeout=timeout)
