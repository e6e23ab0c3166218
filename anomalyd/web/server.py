"""The dashboard's server: uvicorn in a thread of the daemon, on a socket the daemon binds itself (so a
port in use is one clear log line at start, not an exit from inside a library).

It serves until the daemon stops; open live streams end within about a second. An unexpected failure
of the server is logged and leaves monitoring running: the web side is a window on the daemon, never a
part it depends on.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

import uvicorn

from anomalyd.config import WebConfig
from anomalyd.errors import AnomalydError
from anomalyd.web.app import make_app
from anomalyd.web.auth import load_token
from anomalyd.web.view import DaemonView

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 64  # concurrent HTTP connections; more get 503 (a box's dashboard has a few viewers)


class WebError(AnomalydError):
    pass


def bind(listen: str, port: int) -> socket.socket:
    """A listening TCP socket on `listen`:`port` (IPv4 or IPv6). Raises WebError naming both."""
    try:
        infos = socket.getaddrinfo(listen, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise WebError(f"[web] listen = {listen!r}: not an address of this machine ({exc.strerror})") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise WebError(f"[web] cannot listen on {listen} port {port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


class WebServer:
    def __init__(self, config: WebConfig, view: DaemonView) -> None:
        self.config = config
        self._stopping = threading.Event()
        # uvicorn's own start and stop lines say nothing the daemon's do not; its errors still show.
        uvicorn_log = logging.getLogger("uvicorn.error")
        if not uvicorn_log.isEnabledFor(logging.DEBUG):
            uvicorn_log.setLevel(logging.WARNING)
        token = load_token(config.token_file)
        self.writes = token.value is not None
        self._note = token.note
        app = make_app(view, token.value, self._stopping)
        self._server = uvicorn.Server(
            uvicorn.Config(
                app, log_config=None, access_log=False, lifespan="off", http="h11", ws="none",
                loop="asyncio", server_header=False, date_header=True, proxy_headers=False,
                limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=5, timeout_graceful_shutdown=1,
            )
        )  # fmt: skip
        self._thread = threading.Thread(target=self._serve, name="web", daemon=True)
        self._socket: socket.socket | None = None
        self.port = config.port

    def start(self) -> None:
        """Bind and serve. Raises WebError when the address cannot be had."""
        self._socket = bind(self.config.listen, self.config.port)
        self.port = self._socket.getsockname()[1]
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        logger.info("dashboard on http://%s:%d/ (/metrics, /healthz); %s",
                    _host(self.config.listen), self.port, self._note)  # fmt: skip

    def _serve(self) -> None:
        assert self._socket is not None
        try:
            self._server.run(sockets=[self._socket])
        except Exception:
            logger.exception("the dashboard stopped unexpectedly; monitoring goes on without it")

    def stop(self, timeout: float = 1.5) -> None:
        self._stopping.set()
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(0.5)
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()


def _host(listen: str) -> str:
    return f"[{listen}]" if ":" in listen else listen
