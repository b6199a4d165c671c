"""The demo backend: a tiny raw ASGI app with a switchable fault.

`python -m rollback.demo_app --port P --version V --fault none|errors|latency|errors_after:N`

`/openapi.json` describes the API (what the frontend compatibility check reads).
A release is (version, fault): the fault lets the demo deploy a "broken" version
whose /health and /api fail or are slow, while /version always tells the truth so
the orchestrator can see which release answers. `errors_after:N` serves the first N
/health and /api requests well and fails every later one: a release that passes
its pre-switch checks and breaks once it takes traffic. Raw ASGI (no framework) keeps it
fast enough for load tests (>1000 req/s on loopback) with no extra dependency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import uvicorn

Fault = Literal["none", "errors", "latency", "errors_after", "noisy"]
FAULTS: tuple[str, ...] = ("none", "errors", "latency", "errors_after:N", "noisy")
# `noisy`: healthy but imperfect, the kind of service that trips naive alerting:
# every 100th /api or /health answer is a 500 (1% errors) and every 40th is slow
# (brief latency spikes, 2.5% of requests: far below a p95).
NOISY_ERROR_EVERY = 100
NOISY_SLOW_EVERY = 40
# Well above the health check's default max latency (1000 ms), well below its 10 s proxy timeout.
LATENCY_SECONDS = 2.5

def openapi_document(version: str) -> dict[str, Any]:
    """The API this release serves, as OpenAPI 3.1: what the frontend compatibility check reads."""
    def get(summary: str) -> dict[str, Any]:
        return {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}

    return {"openapi": "3.1.0", "info": {"title": "demo backend", "version": version},
            "paths": {"/version": get("the release"), "/health": get("health"), "/api/items": get("the items")}}


ITEMS = [
    {"id": 1, "name": "widget", "price": 9.99},
    {"id": 2, "name": "gadget", "price": 19.5},
    {"id": 3, "name": "gizmo", "price": 4.25},
]



def parse_fault(text: str) -> tuple[Fault, int]:
    """'none' | 'errors' | 'latency' | 'noisy' | 'errors_after:N' → (kind, N). Raises ValueError."""
    if text in ("none", "errors", "latency", "noisy"):
        return text, 0  # type: ignore[return-value]
    kind, _, count = text.partition(":")
    if kind == "errors_after" and count.isdigit():
        return "errors_after", int(count)
    raise ValueError(f"unknown fault {text!r}; expected one of {', '.join(FAULTS)}")


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class DemoApp:
    def __init__(self, version: str, fault: str) -> None:
        self.version = version
        self.fault, self.good_requests_left = parse_fault(fault)
        self.requests = 0
        # Pre-encoded: /version is the hot path of load tests.
        self._version_body = json.dumps({"version": version}).encode()
        self._openapi_body = json.dumps(openapi_document(version)).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, {"error": "method not allowed"})
        elif path == "/version":
            await _respond(send, 200, self._version_body)
        elif path == "/openapi.json":
            await _respond(send, 200, self._openapi_body)
        elif path == "/health":
            await self._faulty(send, {"status": "ok", "version": self.version})
        elif path == "/api/items":
            await self._faulty(send, ITEMS)
        else:
            await _respond(send, 404, {"error": "not found", "path": path})

    async def _faulty(self, send: Send, payload: Any) -> None:
        if self.fault == "errors_after":
            # One event loop, no awaits in between: the countdown needs no lock.
            if self.good_requests_left > 0:
                self.good_requests_left -= 1
                await _respond(send, 200, payload)
                return
        if self.fault in ("errors", "errors_after"):
            await _respond(send, 500, {"status": "error", "version": self.version, "error": "injected fault"})
            return
        if self.fault == "noisy":
            self.requests += 1
            if self.requests % NOISY_ERROR_EVERY == 0:
                await _respond(send, 500, {"status": "error", "version": self.version, "error": "injected noise"})
                return
            if self.requests % NOISY_SLOW_EVERY == 0:
                await asyncio.sleep(LATENCY_SECONDS)
        if self.fault == "latency":
            await asyncio.sleep(LATENCY_SECONDS)
        await _respond(send, 200, payload)


async def _respond(send: Send, status: int, payload: Any) -> None:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _fault_arg(text: str) -> str:
    try:
        parse_fault(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rollback.demo_app", description="Demo backend app.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--fault", type=_fault_arg, default="none", help=", ".join(FAULTS))
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    app = DemoApp(args.version, args.fault)
    # uvicorn handles SIGTERM/SIGINT: stop accepting, finish in-flight requests, exit 0.
    # timeout_graceful_shutdown bounds that so a stop never hangs on idle keepalive connections.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=5,
        # nginx keeps upstream connections alive (keepalive 32); idle longer than nginx
        # would so the backend does not close a connection nginx is about to reuse.
        timeout_keep_alive=75,
    )


if __name__ == "__main__":
    main()
