"""systemd's notification protocol (sd_notify): one datagram per message to $NOTIFY_SOCKET.

A no-op when not started by systemd. Written out rather than depending on libsystemd: it is a dozen
lines, and the daemon must install on boards without systemd's development headers.
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace socket
            address = "\0" + address[1:]
        self._address = address
        self._socket: socket.socket | None = None
        self._failures = 0
        if address:
            # Never blocking: a listener that stops reading must not stall the main loop (and with it the
            # watchdog and a stop); a message it cannot take is lost and logged.
            self._socket = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        owned = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 1e6 if usec.isdigit() and owned else None

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *fields: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            self._failures += 1
            if self._failures in (1, 10, 100) or self._failures % 1000 == 0:
                logger.warning(
                    "sd_notify to %s failed (%d time(s)): %s", self._address.lstrip("\0"), self._failures, exc
                )

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def reloading(self) -> None:
        self.send("RELOADING=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")
