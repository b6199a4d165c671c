"""The interface every CDN tier of the frontend target implements: purge the URL paths a release switch
changed, once per idempotency key, and say what was done.

One provider per module (noop, varnish, cloudflare, fastly, cloudfront), one factory (factory.py) that
builds a provider from its rollback.yaml model (config.py) and resolves its token from the environment.

Pure (pydantic and typing only): workflows import PurgeResult, the activity's result type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

Progress = Callable[[str], None]


class PurgeRequest(BaseModel):
    """What to forget: the URL paths whose content changed, keyed so a retried purge is the same purge."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    paths: list[str] = Field(description='URL paths that changed, each starting with "/": ["/", "/index.html", "/version.json"]')
    key: str = Field(min_length=1, max_length=500, description="idempotency key: workflow id + step id")

    @field_validator("paths")
    @classmethod
    def _paths(cls, paths: list[str]) -> list[str]:
        bad = [p for p in paths if not p.startswith("/") or any(c.isspace() for c in p)]
        if bad:
            raise ValueError(f"not a URL path (must start with '/', no whitespace): {', '.join(repr(b) for b in bad[:5])}")
        return paths


class PurgeResult(BaseModel):
    """What a provider did. `purged` names what it purged in its own terms: paths, full URLs, surrogate keys,
    cache tags, or ["*"] for everything."""

    provider: str
    purged: list[str] = Field(default_factory=list)
    calls: int = Field(ge=0, description="requests made to the provider's API (retries after a 429 included)")
    reference: str | None = Field(default=None, description="the provider's id of the purge (CloudFront invalidation id ...)")
    detail: str = Field(default="", description="what was done, in a few words: 'banned 3 paths'")

    def step_detail(self) -> str:
        """One line for the rollback step's status: `varnish: banned 3 paths in 1 call`."""
        done = self.detail or f"purged {counted(len(self.purged), 'item')}"
        line = f"{self.provider}: {done}"
        if self.calls:
            line += f" in {counted(self.calls, 'call')}"
        if self.reference:
            line += f" ({self.reference})"
        return line


def counted(n: int, noun: str) -> str:
    """`1 path`, `3 paths`: the providers' detail lines."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


class CdnError(Exception):
    """A purge that failed. `retryable` tells the activity whether another attempt can succeed (a 5xx, a 429,
    a timeout) or never will (bad token, unknown zone); `retry_after` is the provider's own hint in seconds.
    The message names the provider and what failed, never a token."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


class CdnProvider(Protocol):
    name: str

    async def purge(self, request: PurgeRequest, progress: Progress) -> PurgeResult:
        """Purge `request.paths` (or everything, if the provider's config says so). `progress` is called with a short
        text while waiting (rate limits, an invalidation in progress); the activity turns it into a heartbeat.
        Raises CdnError."""
        ...


__all__ = ["CdnError", "CdnProvider", "Progress", "PurgeRequest", "PurgeResult", "counted"]
