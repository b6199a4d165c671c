"""CloudFront as a CDN tier: one invalidation of the changed paths, then wait until it is Completed.

A retried activity must never create a second invalidation (each costs money past the free 1000 paths a
month, and at most 15 wildcard ones may be in progress). The CallerReference is derived from the
request (its key and paths), and before creating one we look among the distribution's recent
invalidations for that reference and reuse it. CloudFront itself answers a repeated CallerReference
with the earlier invalidation, but not every stand-in does (moto creates another), and the lookup also
lets a retry resume waiting for the one in progress.

boto3 is synchronous: every call runs in a thread (asyncio.to_thread), with botocore's own connect
and read timeouts and its standard retry mode; the waiting in between is an asyncio sleep, so
cancellation ends it at once. Credentials come from boto3's default chain, never from the config.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import datetime, timedelta, timezone
from typing import Any

# boto3 ships no type information (no stubs installed): its calls are typed as Any here.
import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError  # type: ignore[import-untyped]

from rollback.targets.frontend.cdn import CdnError, Progress, PurgeRequest, PurgeResult, counted
from rollback.targets.frontend.cdn.config import CloudFrontCdn

EVERYTHING = "/*"
# CloudFront's limit on paths in one invalidation; more than that is invalidated as everything.
MAX_PATHS = 3000
# How far back a retry looks for the invalidation it may already have made: activity retries span
# minutes, a day is ample, and it bounds the get_invalidation calls a first attempt makes.
LOOKBACK = timedelta(days=1)
MAX_LISTED = 1000
MAX_EXAMINED = 100
# Errors no retry fixes; everything else (throttling, 5xx, TooManyInvalidationsInProgress) may pass.
PERMANENT = frozenset({"AccessDenied", "AccessDeniedException", "NoSuchDistribution", "InvalidArgument", "InconsistentQuantities",
                       "MissingBody", "BatchTooLarge", "InvalidationBatchAlreadyExists", "InvalidClientTokenId",
                       "SignatureDoesNotMatch", "UnrecognizedClientException"})


def caller_reference(request: PurgeRequest, paths: list[str]) -> str:
    """Stable for the same request: the same key and paths always give the same reference."""
    digest = hashlib.sha256("\n".join([request.key, *paths]).encode()).hexdigest()
    return f"rollback-{digest[:40]}"


class CloudFrontProvider:
    name = "cloudfront"

    def __init__(self, config: CloudFrontCdn) -> None:
        self.config = config
        self.calls = 0
        self._client: Any = None

    def _cloudfront(self) -> Any:
        if self._client is None:
            timeout = self.config.timeout_seconds
            self._client = boto3.session.Session().client(
                "cloudfront", endpoint_url=self.config.endpoint_url, region_name=self.config.region,
                config=Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 3, "mode": "standard"}))
        return self._client

    async def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        what = f"distribution {self.config.distribution_id}: {operation}"
        self.calls += 1
        try:
            return await asyncio.to_thread(lambda: getattr(self._cloudfront(), operation)(**kwargs))
        except NoCredentialsError:
            raise CdnError(f"cloudfront: {what}: no AWS credentials (boto3's default chain: AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role)", retryable=False) from None
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", "Unknown"))
            message = str(err.response.get("Error", {}).get("Message", ""))[:300]
            raise CdnError(f"cloudfront: {what}: {code}" + (f": {message}" if message else ""), retryable=code not in PERMANENT) from None
        except BotoCoreError as err:  # endpoint unreachable, read timeout ...: another attempt may get through
            raise CdnError(f"cloudfront: {what}: {type(err).__name__}: {err}", retryable=True) from None

    async def _existing(self, reference: str) -> dict[str, Any] | None:
        """The distribution's recent invalidation made with `reference`, newest first; None if there is none."""
        since = datetime.now(timezone.utc) - LOOKBACK
        summaries: list[dict[str, Any]] = []
        marker = ""
        while len(summaries) < MAX_LISTED:
            page = (await self._call("list_invalidations", DistributionId=self.config.distribution_id, MaxItems="100",
                                     **({"Marker": marker} if marker else {})))["InvalidationList"]
            summaries.extend(page.get("Items") or [])
            marker = page.get("NextMarker") or ""
            if not page.get("IsTruncated") or not marker:
                break
        recent = sorted((s for s in summaries if _aware(s["CreateTime"]) >= since), key=lambda s: _aware(s["CreateTime"]), reverse=True)
        for summary in recent[:MAX_EXAMINED]:
            invalidation = (await self._call("get_invalidation", DistributionId=self.config.distribution_id,
                                             Id=summary["Id"]))["Invalidation"]
            if invalidation["InvalidationBatch"]["CallerReference"] == reference:
                return invalidation
        return None

    async def purge(self, request: PurgeRequest, progress: Progress) -> PurgeResult:
        config = self.config
        paths = list(dict.fromkeys(request.paths))
        if config.purge_everything or len(paths) > MAX_PATHS:
            paths = [EVERYTHING]
        elif not paths:
            return PurgeResult(provider=self.name, calls=0, detail="nothing changed, nothing to purge")
        self.calls = 0
        reference = caller_reference(request, paths)
        progress(f"cloudfront: looking for invalidation {reference}")
        invalidation = await self._existing(reference)
        reused = invalidation is not None
        if invalidation is None:
            invalidation = (await self._call("create_invalidation", DistributionId=config.distribution_id, InvalidationBatch={
                "Paths": {"Quantity": len(paths), "Items": paths}, "CallerReference": reference}))["Invalidation"]
        invalidation_id = str(invalidation["Id"])
        status = str(invalidation["Status"])
        deadline = time.monotonic() + config.wait_seconds
        started = time.monotonic()
        while status.lower() != "completed":
            if time.monotonic() >= deadline:
                raise CdnError(f"cloudfront: distribution {config.distribution_id}: invalidation {invalidation_id} still {status} "
                               f"after {config.wait_seconds}s", retryable=True, retry_after=config.poll_seconds)
            progress(f"cloudfront: invalidation {invalidation_id} {status} ({time.monotonic() - started:.0f}s)")
            await asyncio.sleep(config.poll_seconds)
            status = str((await self._call("get_invalidation", DistributionId=config.distribution_id,
                                           Id=invalidation_id))["Invalidation"]["Status"])
        what = "everything" if paths == [EVERYTHING] else counted(len(paths), "path")
        done = f"invalidated {what}" + (" (the invalidation an earlier attempt made)" if reused else "")
        return PurgeResult(provider=self.name, purged=paths, calls=self.calls, reference=invalidation_id, detail=done)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
