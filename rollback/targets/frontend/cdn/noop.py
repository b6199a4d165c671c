"""The provider for `provider: none`: no CDN between users and the origin, so a switch is all it takes."""

from __future__ import annotations

from rollback.targets.frontend.cdn import Progress, PurgeRequest, PurgeResult


class NoopProvider:
    name = "none"

    async def purge(self, request: PurgeRequest, progress: Progress) -> PurgeResult:
        return PurgeResult(provider=self.name, purged=[], calls=0, detail="no CDN configured, nothing to purge")
