"""Local stand-ins of Cloudflare's and Fastly's purge APIs: real HTTP servers (FastAPI under uvicorn, in a
background thread, on a free loopback port) that check every request against the provider's documented
API (path, auth header, body) and answer as the provider documents. Every request is recorded.

Cloudflare (https://developers.cloudflare.com/api/resources/cache/methods/purge/):
    POST /client/v4/zones/{zone_id}/purge_cache, `Authorization: Bearer <token>`, a JSON object with exactly
    one of files (URLs), prefixes (host/path, no scheme), tags, hosts or purge_everything: true; at most 100
    entries. 200 {"success": true, "errors": [], "messages": [], "result": {"id": ...}}.
Fastly (https://www.fastly.com/documentation/reference/api/purging/):
    `Fastly-Key: <token>`; POST /service/{id}/purge/{key} -> {"status": "ok", "id": ...}; POST /service/{id}/purge
    with `Surrogate-Key: k1 k2` (at most 256) -> {"k1": id, ...}; POST /service/{id}/purge_all -> {"status": "ok"};
    optional `Fastly-Soft-Purge: 1`.

    from tests.cdn_standins import cloudflare_standin, fastly_standin  # noqa: F401 (fixtures)

    def test_x(cloudflare_standin):
        cloudflare_standin.answer_next(2, 429, {"Retry-After": "1"})
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from rollback.ports import free_port

READY_SECONDS = 10.0
CLOUDFLARE_KINDS = ("files", "prefixes", "tags", "hosts", "purge_everything")
CLOUDFLARE_MAX_ENTRIES = 100
FASTLY_MAX_KEYS = 256


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # names lowercased
    body: bytes
    status: int
    at: float  # time.monotonic() when it arrived

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class StandIn:
    """One stand-in server: `url`, what it received (`requests`), and canned failures for the next requests."""

    name: str
    token: str
    app: FastAPI = field(default_factory=FastAPI)
    requests: list[Recorded] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    _canned: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer_next(self, count: int, status: int, headers: dict[str, str] | None = None) -> None:
        """Answer the next `count` requests with `status` (and `headers`), whatever they are."""
        with self._lock:
            self._canned.extend([(status, dict(headers or {}))] * count)

    def rate_limit(self, count: int, retry_after: str = "1") -> None:
        self.answer_next(count, 429, {"Retry-After": retry_after})

    def canned(self) -> tuple[int, dict[str, str]] | None:
        with self._lock:
            return self._canned.pop(0) if self._canned else None

    def record(self, request: Request, body: bytes, status: int, at: float) -> None:
        with self._lock:
            self.requests.append(Recorded(method=request.method, path=request.url.path,
                                          headers={k.lower(): v for k, v in request.headers.items()}, body=body, status=status, at=at))

    def start(self) -> StandIn:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"{self.name}-standin", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + READY_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() >= deadline:
                raise RuntimeError(f"{self.name} stand-in did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)


def _serve(standin: StandIn, handle: Any) -> None:
    """Route every method and path of the app to `handle(request, body) -> Response`, recording each request."""

    @standin.app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def everything(request: Request) -> Response:
        at = time.monotonic()
        body = await request.body()
        canned = standin.canned()
        if canned is not None:
            status, headers = canned
            answer: Response = JSONResponse({"canned": status}, status_code=status, headers=headers)
        else:
            answer = handle(request, body)
        standin.record(request, body, answer.status_code, at)
        return answer


# -- Cloudflare ----------------------------------------------------------------


def _cf_error(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse({"success": False, "errors": [{"code": code, "message": message}], "messages": [], "result": None},
                        status_code=status)


def _cf_body_problem(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return "request body is not valid JSON"
    if not isinstance(data, dict):
        return "request body must be a JSON object"
    unknown = sorted(set(data) - set(CLOUDFLARE_KINDS))
    if unknown:
        return f"unknown fields: {', '.join(unknown)}"
    kinds = [k for k in CLOUDFLARE_KINDS if k in data]
    if len(kinds) != 1:
        return f"exactly one of {', '.join(CLOUDFLARE_KINDS)} is required, got {kinds or 'none'}"
    kind = kinds[0]
    value = data[kind]
    if kind == "purge_everything":
        return None if value is True else "purge_everything must be true"
    if not isinstance(value, list) or not value:
        return f"{kind} must be a non-empty list"
    if len(value) > CLOUDFLARE_MAX_ENTRIES:
        return f"{kind}: at most {CLOUDFLARE_MAX_ENTRIES} entries per request, got {len(value)}"
    for entry in value:
        url = entry.get("url") if kind == "files" and isinstance(entry, dict) else entry
        if not isinstance(url, str) or not url:
            return f"{kind}: {entry!r} is not a string"
        if kind == "files" and not url.startswith(("http://", "https://")):
            return f"files: {url!r} is not a full URL"
        if kind in ("prefixes", "hosts") and "://" in url:
            return f"{kind}: {url!r} must not have a scheme"
    return None


def cloudflare_app(standin: StandIn, zone_id: str) -> None:
    def handle(request: Request, body: bytes) -> Response:
        parts = request.url.path.split("/")
        if request.method != "POST" or len(parts) != 6 or parts[1:4] != ["client", "v4", "zones"] or parts[5] != "purge_cache":
            return _cf_error(404, 7000, "No route for that URI")
        if request.headers.get("authorization") != f"Bearer {standin.token}":
            return _cf_error(401, 10000, "Authentication error")
        if parts[4] != zone_id:
            return _cf_error(400, 7003, f"Could not route to /zones/{parts[4]}/purge_cache, perhaps your object identifier is invalid?")
        if not request.headers.get("content-type", "").startswith("application/json"):
            return _cf_error(400, 6003, "Invalid request headers: Content-Type must be application/json")
        problem = _cf_body_problem(body)
        if problem is not None:
            return _cf_error(400, 1012, problem)
        return JSONResponse({"success": True, "errors": [], "messages": [], "result": {"id": uuid.uuid4().hex}})

    _serve(standin, handle)


# -- Fastly --------------------------------------------------------------------


def fastly_app(standin: StandIn, service_id: str) -> None:
    def handle(request: Request, body: bytes) -> Response:
        parts = request.url.path.split("/")
        if request.method != "POST" or len(parts) < 4 or parts[1] != "service":
            return JSONResponse({"msg": "Record not found", "detail": "no such route"}, status_code=404)
        if request.headers.get("fastly-key") != standin.token:
            return JSONResponse({"msg": "Provided credentials are missing or invalid"}, status_code=401)
        if parts[2] != service_id:
            return JSONResponse({"msg": "Record not found", "detail": f"Cannot find service '{parts[2]}'"}, status_code=404)
        soft = request.headers.get("fastly-soft-purge")
        if soft is not None and soft != "1":
            return JSONResponse({"msg": "Bad request", "detail": "Fastly-Soft-Purge must be 1"}, status_code=400)
        if parts[3:] == ["purge_all"]:
            return JSONResponse({"status": "ok"})
        if len(parts) == 5 and parts[3] == "purge" and parts[4]:
            return JSONResponse({"status": "ok", "id": f"{uuid.uuid4().int % 10**8}-{parts[4]}"})
        if parts[3:] == ["purge"]:
            keys = request.headers.get("surrogate-key", "").split()
            if not keys and body:
                try:
                    keys = list(json.loads(body).get("surrogate_keys") or [])
                except (ValueError, AttributeError):
                    return JSONResponse({"msg": "Bad request", "detail": "body is not a JSON object"}, status_code=400)
            if not keys or len(keys) > FASTLY_MAX_KEYS:
                return JSONResponse({"msg": "Bad request", "detail": f"1 to {FASTLY_MAX_KEYS} surrogate keys, got {len(keys)}"},
                                    status_code=400)
            return JSONResponse({key: f"{uuid.uuid4().int % 10**8}-{key}" for key in keys})
        return JSONResponse({"msg": "Record not found", "detail": "no such route"}, status_code=404)

    _serve(standin, handle)


CLOUDFLARE_ZONE = "023e105f4ecef8ad9ca31a8372d0c353"
CLOUDFLARE_TOKEN = "cf-token-Zq81-never-in-a-message"
FASTLY_SERVICE = "SU1Z0isxPaozGVKXdv0eY"
FASTLY_TOKEN = "fastly-token-9xQ2-never-in-a-message"


@pytest.fixture
def cloudflare_standin() -> Iterator[StandIn]:
    standin = StandIn(name="cloudflare", token=CLOUDFLARE_TOKEN)
    cloudflare_app(standin, CLOUDFLARE_ZONE)
    standin.start()
    try:
        yield standin
    finally:
        standin.stop()


@pytest.fixture
def fastly_standin() -> Iterator[StandIn]:
    standin = StandIn(name="fastly", token=FASTLY_TOKEN)
    fastly_app(standin, FASTLY_SERVICE)
    standin.start()
    try:
        yield standin
    finally:
        standin.stop()
