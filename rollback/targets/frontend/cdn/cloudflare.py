"""Cloudflare as a CDN tier: `POST /client/v4/zones/{zone_id}/purge_cache` with a bearer token.

Each body holds exactly one kind, as Cloudflare requires: `files` (full URLs: site_url + path), `prefixes`
(host + path, no scheme; the root `/` becomes the bare host, which covers the whole site), `tags` (cache
tags the origin sent in `Cache-Tag`), or `{"purge_everything": true}`. At most 100 entries per request
(Cloudflare's limit on every plan), so longer lists go in batches. A purge is idempotent: a retried
batch purges again and changes nothing more.

A purge by `files` drops the exact URLs: `/?dpl=v2` is another URL. Pinned URLs serve immutable releases,
so only `/version.json?...` could stay stale there, for its TTL; purge by tags or prefixes covers them.
"""

from __future__ import annotations

from typing import Any

import httpx

from rollback.targets.frontend.cdn import CdnError, Progress, PurgeRequest, PurgeResult, counted
from rollback.targets.frontend.cdn.config import CloudflareCdn
from rollback.targets.frontend.cdn.http_api import ApiClient

MAX_PER_REQUEST = 100


def _errors(answer: httpx.Response) -> str:
    """Cloudflare's own words: `errors[0].message` (and its code)."""
    errors = answer.json().get("errors") or []
    if errors and isinstance(errors[0], dict):
        first = errors[0]
        return f"{first.get('message', '')} (code {first.get('code')})"
    return ""


class CloudflareProvider:
    name = "cloudflare"

    def __init__(self, config: CloudflareCdn, *, token: str) -> None:
        self.config = config
        self._token = token

    def __repr__(self) -> str:  # never the token
        return f"CloudflareProvider(zone_id={self.config.zone_id!r})"

    def _entries(self, paths: list[str]) -> tuple[str, list[str]]:
        config = self.config
        if config.purge_by == "files":
            return "files", [config.site_url + path for path in paths]
        if config.purge_by == "prefixes":
            host = config.site_url.split("://", 1)[1]
            return "prefixes", list(dict.fromkeys(host if path == "/" else host + path for path in paths))
        return "tags", list(config.tags)

    async def purge(self, request: PurgeRequest, progress: Progress) -> PurgeResult:
        config = self.config
        bodies: list[dict[str, Any]]
        if config.purge_everything:
            kind, entries = "everything", ["*"]
            bodies = [{"purge_everything": True}]
        elif not request.paths:
            return PurgeResult(provider=self.name, calls=0, detail="nothing changed, nothing to purge")
        else:
            kind, entries = self._entries(list(dict.fromkeys(request.paths)))
            bodies = [{kind: entries[i:i + MAX_PER_REQUEST]} for i in range(0, len(entries), MAX_PER_REQUEST)]
        zone = f"zone {config.zone_id}"
        ids: list[str] = []
        async with ApiClient(provider=self.name, base_url=config.api_url, timeout=config.timeout_seconds,
                             headers={"Authorization": f"Bearer {self._token}"}, secrets=(self._token,), explain=_errors) as api:
            for number, body in enumerate(bodies, start=1):
                progress(f"cloudflare: purge {kind}, request {number} of {len(bodies)}")
                answer = await api.send("POST", f"/client/v4/zones/{config.zone_id}/purge_cache", what=zone, json=body,
                                        progress=progress)
                try:
                    payload = answer.json()
                    ok = payload.get("success") is True
                    purge_id = (payload.get("result") or {}).get("id")
                except (ValueError, AttributeError):
                    ok, purge_id = False, None
                if not ok:
                    raise CdnError(api.scrub(f"cloudflare: {zone}: HTTP {answer.status_code} but not success: {answer.text[:300]}"),
                                   retryable=True)
                if purge_id:
                    ids.append(str(purge_id))
        done = "purged everything" if kind == "everything" else f"purged {counted(len(entries), kind.rstrip('s'))}"
        return PurgeResult(provider=self.name, purged=entries, calls=api.calls, reference=", ".join(ids)[:300] or None, detail=done)
