"""The inspector's web application (Starlette): read-only JSON endpoints, the
server-sent change feed and the static front end.

Every request must name the bound address in its ``Host`` header (a page on another
site that resolves its own name to 127.0.0.1 is refused: DNS rebinding); only GET and
HEAD exist; refused requests get a typed JSON error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import InvalidArgumentError, MMSBError, PageNotFoundError
from ._data import Inspected, error_body

__all__ = ["create_app", "MAX_STREAMS"]

MAX_STREAMS = 8
"""Most change-feed streams served at once."""
RETRY_MS = 1000
"""Milliseconds a browser waits before it reconnects a dropped change feed."""
_STATUS = {PageNotFoundError: 404, InvalidArgumentError: 400}


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


class _Guard:
    """Refuses a request whose Host is not one of ``allowed`` (421) and any method but
    GET / HEAD (405), before the application sees it."""

    def __init__(self, app: ASGIApp, allowed: Callable[[], set[str]]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = ""
            for k, v in scope.get("headers", []):
                if k == b"host":
                    host = v.decode("latin-1").lower()
            if host not in self.allowed():
                resp = _error(421, "HostNotAllowed",
                              f"Host {host[:80]!r} is not this inspector's address; open "
                              "the URL it printed")
                await resp(scope, receive, send)
                return
            if scope["method"] not in ("GET", "HEAD"):
                resp = _error(405, "ReadOnly", "the inspector is read-only: only GET and "
                                               "HEAD requests exist")
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(inspected: Inspected, allowed_hosts: Callable[[], set[str]]) -> ASGIApp:
    """The inspector application over ``inspected``; ``allowed_hosts()`` gives the
    ``Host`` values accepted (the bound address, with and without its port)."""
    streams = asyncio.Semaphore(MAX_STREAMS)

    def endpoint(fn: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def run(request: Request) -> Response:
            try:
                body = await asyncio.to_thread(fn, request)
            except MMSBError as exc:
                status = next((s for t, s in _STATUS.items() if isinstance(exc, t)), 400)
                return JSONResponse(error_body(exc), status_code=status)
            return JSONResponse(body)
        return run

    def q(request: Request, name: str, default: Any = None) -> Any:
        return request.query_params.get(name, default)

    def filters(r: Request) -> dict[str, Any]:
        return {k: q(r, k) for k in ("lo", "hi", "page", "source")}

    routes = [
        Route("/api/summary", endpoint(lambda r: inspected.summary())),
        Route("/api/timeline", endpoint(
            lambda r: inspected.timeline(bins=q(r, "bins", 200), axis=q(r, "axis", "lsn"),
                                         **filters(r)))),
        Route("/api/log", endpoint(
            lambda r: inspected.log_rows(limit=q(r, "limit", 100), **filters(r)))),
        Route("/api/pages", endpoint(
            lambda r: inspected.pages(offset=q(r, "offset", 0), limit=q(r, "limit", 200)))),
        Route("/api/heat", endpoint(
            lambda r: inspected.heat_all(mode=q(r, "mode", "count"), offset=q(r, "offset", 0),
                                         limit=q(r, "limit", 100), cols=q(r, "cols", 64)))),
        Route("/api/pages/{pid}/heat", endpoint(
            lambda r: inspected.heat(r.path_params["pid"], q(r, "mode", "count")))),
        Route("/api/pages/{pid}/history", endpoint(
            lambda r: inspected.history(r.path_params["pid"]))),
        Route("/api/pages/{pid}/version", endpoint(
            lambda r: inspected.version(r.path_params["pid"], lsn=q(r, "lsn"),
                                        offset=q(r, "offset", 0), length=q(r, "length", 512)))),
        Route("/api/pages/{pid}/blame", endpoint(
            lambda r: inspected.blame(r.path_params["pid"]))),
        Route("/api/graph", endpoint(lambda r: inspected.graph(q(r, "lsn")))),
        Route("/api/stats", endpoint(lambda r: inspected.stats())),
        Route("/api/events", _events(inspected, streams)),
        Route("/api/{rest:path}", lambda r: _error(404, "NotFound",
                                                   f"no endpoint {r.url.path[:80]!r}")),
        Mount("/", StaticFiles(directory=str(resources.files("mmsb.ui") / "static"),
                               html=True)),
    ]
    return _Guard(Starlette(routes=routes), allowed_hosts)


def _events(inspected: Inspected, streams: asyncio.Semaphore) -> Callable[[Request], Any]:
    """Server-sent events: one ``data:`` line per change-feed event after ``since``,
    read from the bus's log (woken by the writer), until the client goes away.

    The last event of each LSN carries ``id: LSN``, so a browser that reconnects sends
    it back as ``Last-Event-ID`` and the feed resumes after it: nothing is lost, and
    nothing already seen is sent again (a stream cut between two events of one LSN
    sends that LSN's events again)."""

    async def handler(request: Request) -> Response:
        if not inspected.is_bus:
            return _error(404, "NotLive", "a checkpoint file has no change feed; open a bus "
                                          "directory to follow it live")
        since = 0
        for name, raw in (("since", request.query_params.get("since", "0")),
                          ("Last-Event-ID", request.headers.get("last-event-id", "0"))):
            try:
                value = int(raw)
                if value < 0:
                    raise ValueError
            except ValueError:
                return _error(400, "InvalidArgumentError", f"{name} must be an integer >= 0 "
                                                           f"(an LSN), not {raw[:40]!r}")
            since = max(since, value)
        if streams.locked():
            return _error(503, "TooManyStreams", f"at most {MAX_STREAMS} live views at once")

        async def feed() -> AsyncIterator[str]:
            async with streams:
                last = since
                yield f"retry: {RETRY_MS}\n: feed after LSN {since}\n\n"
                while not await request.is_disconnected():
                    batch = await asyncio.to_thread(_next_batch, inspected, last)
                    if isinstance(batch, str):
                        yield f"event: feed-error\ndata: {json.dumps(batch)}\n\n"
                        return
                    for k, ev in enumerate(batch):
                        last = max(last, ev["lsn"])
                        ends = k + 1 == len(batch) or batch[k + 1]["lsn"] != ev["lsn"]
                        head = f"id: {ev['lsn']}\n" if ends else ""
                        yield f"{head}data: {json.dumps(ev)}\n\n"
                    if not batch:
                        yield ": idle\n\n"

        return StreamingResponse(feed(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    return handler


def _next_batch(inspected: Inspected, since: int) -> list[dict[str, Any]] | str:
    """The events after ``since`` (about 500 at most, ending with the last event of an
    LSN), or, when there are none, those that arrive within about a second (the reader
    sleeps until the writer publishes, no polling); the error text when the feed cannot
    go on."""
    out: list[dict[str, Any]] = []
    reader = inspected.reader
    try:
        if reader.last_lsn <= since and not reader.wait_for(since + 1, 1.0):
            return out
        for ev in reader.changes(since):
            if len(out) >= 500 and ev.lsn != out[-1]["lsn"]:
                break  # the next batch starts at this LSN
            out.append({"lsn": ev.lsn, "type": ev.type.name, "page": ev.page_id,
                        "timestamp_ns": ev.timestamp})
    except MMSBError as exc:
        return " ".join(str(exc).split())
    return out
