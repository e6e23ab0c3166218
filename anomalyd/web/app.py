"""The dashboard's HTTP routes (Starlette): pages, the JSON API, clips, /metrics and /healthz.

Pages are static files shipped in the package (no build step, no CDN); they fetch the JSON API and
follow /api/live. Everything that reads the event log or files runs in Starlette's thread pool, never
on the event loop. The two writes (mute, mark) are checked by anomalyd/web/auth.py.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Any

import soundfile as sf
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from anomalyd import __version__
from anomalyd.marks import MAX_NOTE_CHARS
from anomalyd.records import iso
from anomalyd.web.auth import check_write
from anomalyd.web.metrics import registry_for
from anomalyd.web.overview import LiveFeed, health_json, number, overview_with_scores, stream_json
from anomalyd.web.queries import MAX_CSV_ROWS, get_event, list_events, parse_filter, to_csv
from anomalyd.web.spectrogram import render
from anomalyd.web.view import DaemonView, RefusedError

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 4096  # a mute or mark request is a few dozen bytes
CLIP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}-\d{8}T\d{6}-[0-9a-f]{8}\.wav")  # clipfiles.clip_name
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; media-src 'self'; style-src 'self' 'unsafe-inline'; "
        b"script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
]


class SecurityHeaders:
    """Headers on every answer that keep other sites from framing the dashboard or running scripts in it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"ok": False, "error": message}, status_code=status)


async def _json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, read with a size limit. Raises RefusedError (400 / 413)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise RefusedError(f"request body over {MAX_BODY_BYTES} bytes", 413)
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise RefusedError("the body is not JSON", 400) from None
    if not isinstance(data, dict):
        raise RefusedError("the body must be a JSON object", 400)
    return data


class Dashboard:
    def __init__(self, view: DaemonView, token: str | None, stopping: threading.Event) -> None:
        self.view = view
        self.token = token
        self.live = LiveFeed(view, token is not None, stopping)
        self.registry = registry_for(view)

    # ---- pages and the live picture --------------------------------------------------------------

    @staticmethod
    def page(name: str) -> FileResponse:
        return FileResponse(STATIC / name, media_type="text/html", headers={"cache-control": "no-cache"})

    async def index(self, request: Request) -> Response:
        return self.page("index.html")

    async def event_page(self, request: Request) -> Response:
        return self.page("event.html")

    async def stream_page(self, request: Request) -> Response:
        return self.page("stream.html")

    def overview(self, request: Request) -> Response:
        return JSONResponse(overview_with_scores(self.view, self.token is not None))

    async def live_stream(self, request: Request) -> Response:
        if self.live.full():
            return _error(503, "too many dashboards open; try again later")
        return StreamingResponse(
            self.live.messages(),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    # ---- the event log ---------------------------------------------------------------------------

    def events(self, request: Request) -> Response:
        try:
            where = parse_filter(request.query_params)
        except ValueError as exc:
            return _error(400, str(exc))
        rows, total = list_events(self.view.database, where)
        return JSONResponse({"events": [self._public(r) for r in rows], "total": total})

    def events_csv(self, request: Request) -> Response:
        try:
            where = parse_filter({**request.query_params, "limit": str(MAX_CSV_ROWS)}, MAX_CSV_ROWS)
        except ValueError as exc:
            return _error(400, str(exc))
        rows, _ = list_events(self.view.database, where)
        return PlainTextResponse(
            to_csv(rows),
            media_type="text/csv",
            headers={"content-disposition": 'attachment; filename="anomalyd-events.csv"'},
        )

    @staticmethod
    def _public(row: dict[str, Any]) -> dict[str, Any]:
        """An event as the API shows it: the clip's file name, never a path on this box."""
        out = {k: v for k, v in row.items() if k not in ("clip_path", "normal_clip_path", "clip_offset")}
        out["clip"] = Path(row["clip_path"]).name if row.get("clip_path") else None
        return out

    def _event(self, request: Request) -> dict[str, Any]:
        try:
            event = get_event(self.view.database, request.path_params["event_id"])
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc
        if event is None:
            raise HTTPException(404, f"no event {request.path_params['event_id'][:40]!r} in the event log")
        return event

    @property
    def _clips(self) -> Path:
        return self.view.clips.resolve()

    def _clip_file(self, event: dict[str, Any]) -> Path | None:
        """The event's clip, only if it is a file inside the clip folder."""
        if not event.get("clip_path"):
            return None
        path = Path(event["clip_path"]).resolve()
        if not path.is_relative_to(self._clips) or path.suffix != ".wav" or not path.is_file():
            return None
        return path

    def event(self, request: Request) -> Response:
        event = self._event(request)
        out = self._public(event)
        clip = self._clip_file(event)
        out["clip"] = out["spectrogram_url"] = None
        if clip is not None:
            base = f"/api/events/{event['event_id']}"
            try:
                seconds = sf.info(str(clip)).duration
            except (OSError, sf.LibsndfileError):
                seconds = None
            out["clip"] = {
                "url": f"{base}/clip.wav", "file": clip.name, "seconds": number(seconds),
                "event_offset_seconds": number(event.get("clip_offset") or 0.0),
            }  # fmt: skip
            out["spectrogram_url"] = f"{base}/spectrogram.png"
        return JSONResponse(out)

    def event_clip(self, request: Request) -> Response:
        clip = self._clip_file(self._event(request))
        if clip is None:
            return _error(404, "this event has no clip (clips off, the disk short, or deleted by the quota)")
        return FileResponse(clip, media_type="audio/wav")

    def spectrogram(self, request: Request) -> Response:
        event = self._event(request)
        clip = self._clip_file(event)
        if clip is None:
            return _error(404, "this event has no clip to draw")
        start = float(event.get("clip_offset") or 0.0)
        duration = event.get("duration_seconds")
        span = (start, start + duration if duration is not None else None)
        try:
            png, _ = render(clip, self.view.logmel(event["stream"]), span)
        except (OSError, ValueError, sf.LibsndfileError) as exc:
            return _error(422, f"cannot draw {clip.name}: {exc}")
        cache = "max-age=3600" if event["state"] == "closed" else "no-cache"
        return Response(png, media_type="image/png", headers={"cache-control": cache})

    def clip_by_name(self, request: Request) -> Response:
        """/clips/<file>: the clip folder as `[storage.clips] base_url` names it in event messages."""
        name, clips = request.path_params["name"], self._clips
        path = (clips / name).resolve() if CLIP_NAME.fullmatch(name) else None
        if path is None or path.parent != clips or not path.is_file():
            return _error(404, "no such clip")
        return FileResponse(path, media_type="audio/wav")

    # ---- streams ---------------------------------------------------------------------------------

    def stream(self, request: Request) -> Response:
        name = request.path_params["name"]
        details = self.view.stream_details(name)
        state = next((s for s in self.view.state().streams if s.name == name), None)
        if details is None or state is None:
            return _error(404, f"no stream {name[:64]!r} in this daemon")
        out = stream_json(state)
        out.update(details)
        return JSONResponse(out)

    # ---- writes ----------------------------------------------------------------------------------

    async def mute(self, request: Request) -> Response:
        try:
            check_write(request, self.token)
            body = await _json_body(request)
            seconds = body.get("seconds")
            if isinstance(seconds, bool) or not isinstance(seconds, int | float):
                raise RefusedError('give {"seconds": N}: 0 unmutes', 400)
            until = await run_in_threadpool(self.view.mute, request.path_params["name"], float(seconds))
        except RefusedError as exc:
            return _error(exc.status, str(exc))
        return JSONResponse({"ok": True, "stream": request.path_params["name"], "muted_until": iso(until)})

    async def mark(self, request: Request) -> Response:
        try:
            check_write(request, self.token)
            body = await _json_body(request)
            note = body.get("note", "")
            if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS:
                raise RefusedError(f"note: text of at most {MAX_NOTE_CHARS} characters", 400)
            event = await run_in_threadpool(self._event, request)
            if event["state"] != "closed":
                raise RefusedError("the event is still open; mark it once it has ended", 409)
            marked = await run_in_threadpool(self.view.mark, event["event_id"], note)
        except RefusedError as exc:
            return _error(exc.status, str(exc))
        return JSONResponse({
            "ok": True, "event_id": marked.event_id, "stream": marked.stream, "marked_at": marked.marked_at,
            "normal_clip": marked.normal_clip.name, "already": marked.already,
        })  # fmt: skip

    # ---- for machines ------------------------------------------------------------------------------

    def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def healthz(self, request: Request) -> Response:
        """200 while every watched thread makes progress (what makes the daemon ping systemd's watchdog),
        503 when one has stalled or the daemon is stopping; the rest is information."""
        state = self.view.state()
        health = health_json(state)
        body = {
            **health, "node": state.node, "version": __version__, "at": iso(state.at),
            "streams": len(state.streams),
            "streams_unhealthy": sum(s.source != "ok" or s.lagging for s in state.streams),
            "events_open": sum(s.event_open for s in state.streams),
            "storage": state.storage.state, "mqtt": state.mqtt,
        }  # fmt: skip
        return JSONResponse(body, status_code=200 if health["status"] == "ok" else 503)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, str(exc.detail))


def make_app(view: DaemonView, token: str | None, stopping: threading.Event) -> Starlette:
    d = Dashboard(view, token, stopping)
    routes = [
        Route("/", d.index),
        Route("/events/{event_id}", d.event_page),
        Route("/streams/{name}", d.stream_page),
        Route("/api/overview", d.overview),
        Route("/api/live", d.live_stream),
        Route("/api/events", d.events),
        Route("/api/events.csv", d.events_csv),
        Route("/api/events/{event_id}", d.event),
        Route("/api/events/{event_id}/clip.wav", d.event_clip),
        Route("/api/events/{event_id}/spectrogram.png", d.spectrogram),
        Route("/api/events/{event_id}/mark", d.mark, methods=["POST"]),
        Route("/api/streams/{name}", d.stream),
        Route("/api/streams/{name}/mute", d.mute, methods=["POST"]),
        Route("/clips/{name}", d.clip_by_name),
        Route("/metrics", d.metrics),
        Route("/healthz", d.healthz),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={HTTPException: _http_error},
    )
