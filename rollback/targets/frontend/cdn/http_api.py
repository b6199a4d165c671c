"""The HTTP call the HTTP providers (Varnish, Cloudflare, Fastly) share: explicit timeouts, a 429's
Retry-After honoured a few times (with progress while waiting, so the activity keeps heartbeating), and
every failure turned into a CdnError that says whether another attempt can help, with any token
scrubbed from the message.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import httpx

from rollback.targets.frontend.cdn import CdnError, Progress

# A 429 is waited out this many times within one purge before the activity's retry policy takes over.
RATE_LIMIT_ATTEMPTS = 4
# Never sleep longer than this on a provider's word: a Retry-After of an hour is the retry policy's business.
MAX_RETRY_AFTER_SECONDS = 60.0
# Without a Retry-After, wait 1 s, 2 s, 4 s ...
DEFAULT_BACKOFF_SECONDS = 1.0
# Progress (a heartbeat) at least this often while sleeping.
PROGRESS_EVERY_SECONDS = 5.0
# Statuses another attempt can fix; every other non-2xx (400, 401, 403, 404, 405 ...) never will.
RETRYABLE = frozenset({408, 425, 429, 500, 502, 503, 504})

Explain = Callable[[httpx.Response], str]


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: a number of seconds, or an HTTP date (RFC 9110); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


async def sleep_with_progress(seconds: float, progress: Progress, text: str) -> None:
    """Sleep `seconds`, calling progress at least every PROGRESS_EVERY_SECONDS (cancellable like any sleep)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        progress(f"{text}, {left:.0f}s left")
        await asyncio.sleep(min(left, PROGRESS_EVERY_SECONDS))


class ApiClient:
    """One provider's API: `async with ApiClient(...) as api: await api.send("POST", path, ...)`; `api.calls` counts requests."""

    def __init__(self, *, provider: str, base_url: str, timeout: float, headers: Mapping[str, str] | None = None,
                 secrets: tuple[str, ...] = (), explain: Explain | None = None) -> None:
        self.provider = provider
        self.base_url = base_url
        self.timeout = timeout
        self.calls = 0
        self._headers = dict(headers or {})
        self._secrets = tuple(s for s in secrets if s)
        self._explain = explain
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> ApiClient:
        # Connect, read, write and pool each bounded: a CDN API that hangs must fail the attempt, not the activity's timeout.
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=httpx.Timeout(self.timeout),
                                         follow_redirects=False)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    async def send(self, method: str, path: str, *, what: str, progress: Progress, headers: Mapping[str, str] | None = None,
                   json: Any = None) -> httpx.Response:
        """The 2xx answer to `method path`; CdnError naming `what` (e.g. "zone 023e...", "BAN /index.html") otherwise."""
        assert self._client is not None, "use ApiClient as an async context manager"
        wait = DEFAULT_BACKOFF_SECONDS
        for attempt in range(1, RATE_LIMIT_ATTEMPTS + 1):
            self.calls += 1
            try:
                answer = await self._client.request(method, path, headers=headers, json=json)
            except httpx.TimeoutException as err:
                raise CdnError(f"{self.provider}: {what}: no answer within {self.timeout:g}s ({type(err).__name__})", retryable=True) from None
            except httpx.HTTPError as err:
                raise CdnError(self.scrub(f"{self.provider}: {what}: {type(err).__name__}: {err}"), retryable=True) from None
            if answer.is_success:
                return answer
            if answer.status_code != 429:
                raise self.error(answer, what)
            hinted = retry_after_seconds(answer.headers.get("Retry-After"))
            delay = min(MAX_RETRY_AFTER_SECONDS, hinted if hinted is not None else wait)
            wait *= 2
            if attempt == RATE_LIMIT_ATTEMPTS:
                raise CdnError(f"{self.provider}: {what}: still rate limited (HTTP 429) after {attempt} attempts",
                               retryable=True, retry_after=hinted if hinted is not None else delay)
            await sleep_with_progress(delay, progress, f"{self.provider}: rate limited (HTTP 429), retry {attempt} of "
                                                       f"{RATE_LIMIT_ATTEMPTS - 1}")
        raise AssertionError("unreachable")

    def error(self, answer: httpx.Response, what: str) -> CdnError:
        status = answer.status_code
        reason = ""
        if self._explain is not None:
            try:
                reason = self._explain(answer)
            except Exception:  # noqa: BLE001 - a body we cannot read: the status still says enough
                reason = ""
        hint = " (check the token and its permissions)" if status in (401, 403) else ""
        message = f"{self.provider}: {what}: HTTP {status}" + (f": {reason[:300]}" if reason else "") + hint
        return CdnError(self.scrub(message), retryable=status in RETRYABLE or status >= 500,
                        retry_after=retry_after_seconds(answer.headers.get("Retry-After")))
