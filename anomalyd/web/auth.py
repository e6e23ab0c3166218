"""Who may change state from the dashboard: the holder of a token read from a file or a systemd credential.

The token travels only in the `Authorization: Bearer` header of a POST with a JSON body, which a browser
never adds by itself to a request another site makes it send, and a cross-site page cannot set without a
CORS preflight that this server never grants: that is the CSRF defence. Requests a browser labels
cross-site (Sec-Fetch-Site) or whose Origin is not this server are refused before the token is looked at.
The token is compared in constant time, and never logged, echoed or put in a URL.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import Request

from anomalyd.throttle import Throttle
from anomalyd.web.view import RefusedError

logger = logging.getLogger(__name__)

CREDENTIAL = "web-token"  # systemd: LoadCredential=web-token:/etc/anomalyd/web-token
MIN_TOKEN_CHARS = 16
MAX_TOKEN_BYTES = 4096
_refusals = Throttle(60.0, burst=5)


@dataclass(frozen=True)
class Token:
    """The write token, or None with `note` saying why writes are off (a log line without the secret)."""

    value: str | None
    note: str


def load_token(token_file: Path | None, environ: Mapping[str, str] = os.environ) -> Token:
    """The token from `token_file`, else from the systemd credential `web-token`; never raises: a token
    that cannot be used leaves the dashboard read-only and says why."""
    path = token_file
    if path is None:
        credentials = environ.get("CREDENTIALS_DIRECTORY")
        candidate = Path(credentials) / CREDENTIAL if credentials else None
        if candidate is None or not candidate.is_file():
            return Token(None, "dashboard is read-only: no [web] token_file and no 'web-token' credential")
        path = candidate
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
        mode = path.stat().st_mode
    except OSError as exc:
        reason = exc.strerror or exc
        return Token(None, f"dashboard is read-only: cannot read the token file {path}: {reason}")
    value, problem = _check(raw)
    if value is None:
        return Token(None, f"dashboard is read-only: the token file {path} {problem}")
    note = f"dashboard writes (mute, mark) need the token from {path}"
    if mode & 0o004:
        note += "; warning: that file is readable by every user of this machine (chmod 600 it)"
    return Token(value, note)


def _check(raw: bytes) -> tuple[str | None, str]:
    """(the token, "") or (None, what is wrong with the file's content)."""
    try:
        value = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    if not value:  # e.g. an empty credential: no token was installed
        return None, "is empty"
    if len(raw) > MAX_TOKEN_BYTES or not value.isprintable() or any(c.isspace() for c in value):
        return None, f"must hold one word of printable characters, at most {MAX_TOKEN_BYTES} bytes"
    if len(value) < MIN_TOKEN_CHARS:
        return None, f"holds a token shorter than {MIN_TOKEN_CHARS} characters (`openssl rand -hex 24`)"
    return value, ""


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser's cross-origin request (curl, a script): the token decides
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc.lower() == host.lower()


def check_write(request: Request, token: str | None) -> None:
    """Raise RefusedError unless this request may change state."""
    if token is None:
        raise RefusedError(
            "writes are off: no token is configured ([web] token_file, or the 'web-token' credential)", 403
        )
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise _refused(request, "cross-site request refused", 403)
    if not _same_origin(request):
        raise _refused(request, "request from another origin refused", 403)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise RefusedError("send a JSON body (Content-Type: application/json)", 415)
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise _refused(request, "refused: token missing or wrong", 401)


def _refused(request: Request, reason: str, status: int) -> RefusedError:
    if _refusals.ready():
        client = request.client.host if request.client is not None else "?"
        logger.warning(
            "dashboard: %s %s from %s: %s%s",
            request.method, request.url.path, client, reason, _refusals.take_suppressed(),
        )  # fmt: skip
    return RefusedError(reason, status)
