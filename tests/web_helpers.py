"""Helpers for tests of the dashboard: a daemon config with [web] on a free port, and a small HTTP client
(the standard library's, so that what is tested is the server, not a client library's manners)."""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.daemon_helpers import write_config
from tests.mqtt_helpers import free_port


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    def __init__(self, base: str) -> None:
        self.base = base

    def request(
        self, path: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Answer:
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                return Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
        except urllib.error.HTTPError as err:
            return Answer(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())

    def get(self, path: str, **headers: str) -> Answer:
        return self.request(path, headers=headers)

    def get_json(self, path: str) -> Any:
        answer = self.get(path)
        assert answer.status == 200, (path, answer.status, answer.body[:300])
        return answer.json()

    def post(self, path: str, payload: Any, token: str | None = None, **headers: str) -> Answer:
        wanted = {"content-type": "application/json", **headers}
        if token is not None:
            wanted["authorization"] = f"Bearer {token}"
        return self.request(path, "POST", json.dumps(payload).encode(), wanted)


@dataclass
class WebSetup:
    config: Path
    port: int
    token: str | None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Client:
        return Client(self.base)


def web_config(
    folder: Path,
    bundle: Path,
    streams: dict[str, dict[str, object]],
    *,
    token: bool = True,
    extra: str = "",
    web: str = "",
) -> WebSetup:
    """A daemon config with the dashboard on a free port and, with `token`, a token file (mode 600)."""
    port = free_port()
    lines = ["[web]", "enabled = true", f"port = {port}", web]
    value = None
    if token:
        value = secrets.token_hex(24)
        (folder / "web-token").write_text(value + "\n")
        (folder / "web-token").chmod(0o600)
        lines.append('token_file = "web-token"')
    clips = "pre_roll_seconds = 3.0\npost_roll_seconds = 3.0"
    config = write_config(folder / "d.toml", bundle, streams, extra + "\n" + "\n".join(lines), clips)
    return WebSetup(config, port, value)
