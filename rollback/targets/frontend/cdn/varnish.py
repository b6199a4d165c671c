"""Varnish as a CDN tier: one BAN (or PURGE) request per changed path to Varnish's own HTTP port.

With rollback/targets/frontend/varnish_vcl.py's VCL a BAN of `/index.html` drops every cached variant of
that path, whatever its query string (`?dpl=v2`) or the deployment id a client sent; a BAN of a path that
ends in `*` drops everything under that prefix, so purge_everything is a BAN of `/*`. PURGE drops the one
object at the exact URL (the variant of clients that pin nothing): it exists for a VCL of your own that
implements only PURGE; purge_everything is a BAN of `/*` either way, since PURGE cannot say "everything".
"""

from __future__ import annotations

import httpx

from rollback.targets.frontend.cdn import Progress, PurgeRequest, PurgeResult, counted
from rollback.targets.frontend.cdn.config import VarnishCdn
from rollback.targets.frontend.cdn.http_api import ApiClient

EVERYTHING = "/*"


def _reason(answer: httpx.Response) -> str:
    return answer.reason_phrase  # the VCL's synth reason: "Not allowed", "Bad ban path"


class VarnishProvider:
    name = "varnish"

    def __init__(self, config: VarnishCdn) -> None:
        self.config = config

    async def purge(self, request: PurgeRequest, progress: Progress) -> PurgeResult:
        if self.config.purge_everything:
            method, paths = "BAN", [EVERYTHING]
        else:
            method, paths = self.config.method, list(dict.fromkeys(request.paths))  # once each, in order
        if not paths:
            return PurgeResult(provider=self.name, calls=0, detail="nothing changed, nothing to purge")
        async with ApiClient(provider=self.name, base_url=self.config.url, timeout=self.config.timeout_seconds, explain=_reason) as api:
            for path in paths:
                progress(f"varnish: {method} {path}")
                await api.send(method, path, what=f"{method} {path} at {self.config.url}", progress=progress)
        verb = "banned" if method == "BAN" else "purged"
        done = f"{verb} everything" if paths == [EVERYTHING] and self.config.purge_everything else f"{verb} {counted(len(paths), 'path')}"
        return PurgeResult(provider=self.name, purged=paths, calls=api.calls, detail=done)
