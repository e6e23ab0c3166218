"""`anomalyd run` with one thread made to fail: for tests that a dying thread takes the daemon down.

Usage: python -m tests.fault_run {worker|store|source} CALLS --config FILE

After CALLS calls, one function of the named thread raises an unexpected exception (RuntimeError), the
kind of bug no input check can foresee. Everything else is the real daemon.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from anomalyd import cli
from anomalyd.detector import Detector
from anomalyd.sources.file import FileReplay
from anomalyd.store import StoreWriter

TARGETS: dict[str, tuple[type, str]] = {
    "worker": (Detector, "push"),
    "store": (StoreWriter, "write"),
    "source": (FileReplay, "_replay"),  # the file reader thread
}


def fail_after(owner: type, name: str, calls: int) -> None:
    original: Callable[..., Any] = getattr(owner, name)
    count = 0

    def failing(*args: Any, **kwargs: Any) -> Any:
        nonlocal count
        count += 1
        if count > calls:
            raise RuntimeError(f"injected fault in {owner.__name__}.{name}")
        return original(*args, **kwargs)

    setattr(owner, name, failing)


if __name__ == "__main__":
    target, calls, *rest = sys.argv[1:]
    fail_after(*TARGETS[target], int(calls))
    sys.exit(cli.main(["run", *rest]))
