"""The frontend's CDN tiers against real servers: Varnish (with our VCL) in front of the nginx origin, the
Cloudflare and Fastly stand-ins that check each request against the documented API, and moto's CloudFront;
the factory's refusals."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3  # type: ignore[import-untyped]
import httpx
import pytest
from pydantic import TypeAdapter, ValidationError

from rollback.targets.frontend.cdn import CdnError, PurgeRequest
from rollback.targets.frontend.cdn.cloudflare import CloudflareProvider
from rollback.targets.frontend.cdn.cloudfront import CloudFrontProvider
from rollback.targets.frontend.cdn.config import CdnConfig, CloudflareCdn, CloudFrontCdn, FastlyCdn, NoCdn, VarnishCdn
from rollback.targets.frontend.cdn.factory import provider_for
from rollback.targets.frontend.cdn.http_api import RATE_LIMIT_ATTEMPTS
from rollback.targets.frontend.cdn.fastly import FastlyProvider
from rollback.targets.frontend.cdn.noop import NoopProvider
from rollback.targets.frontend.cdn.varnish import VarnishProvider
from rollback.targets.frontend.contract import purge_urls
from rollback.targets.frontend.origin import CDN_ENTRY_TTL_SECONDS
from rollback.targets.frontend.release import write_manifest
from rollback.targets.frontend.store import entry_points
from rollback.targets.frontend.varnish_vcl import NOT_FOUND_TTL_SECONDS

from tests.cdn_standins import (  # noqa: F401 (fixtures)
    CLOUDFLARE_TOKEN, CLOUDFLARE_ZONE, FASTLY_SERVICE, FASTLY_TOKEN, StandIn, cloudflare_standin, fastly_standin,
)
from tests.moto_server import REGION, Moto, moto, moto_server  # noqa: F401 (fixtures)
from tests.varnish import (  # noqa: F401 (the fixture frontend_stack)
    FrontendStack, asset_of, frontend_stack, frontend_stack_fixture, make_release, poll, varnish_ttl,
)

T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)
ENTRY = ["/", "/index.html", "/version.json"]


class Progress:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, text: str) -> None:
        self.texts.append(text)


def get(stack: FrontendStack, path: str, **kwargs: object) -> httpx.Response:
    return httpx.get(stack.varnish_url + path, timeout=5, **kwargs)  # type: ignore[arg-type]


def cached(stack: FrontendStack, path: str, **kwargs: object) -> httpx.Response:
    """GET twice: the second answer must come from Varnish's cache."""
    first = get(stack, path, **kwargs)
    second = get(stack, path, **kwargs)
    assert second.headers["x-cache"] == "HIT", f"{path} {kwargs} not cached: {first.headers} / {second.headers}"
    assert second.text == first.text
    return second


def release(stack: FrontendStack, tmp_path: Path, version: str, hours: int) -> Path:
    built = make_release(tmp_path / "builds", version, T0 + timedelta(hours=hours))
    stack.store.publish(built)
    return built


# -- Varnish in front of the origin ----------------------------------------------


async def test_varnish_caches_entry_points_until_the_purge_of_the_changed_paths(frontend_stack: FrontendStack, tmp_path: Path) -> None:
    stack = frontend_stack
    v1, v2 = release(stack, tmp_path, "v1", 1), release(stack, tmp_path, "v2", 2)
    stack.store.switch("v1")

    assert "release v1" in cached(stack, "/").text
    assert "release v1" in cached(stack, "/index.html").text
    assert cached(stack, "/version.json").json() == {"version": "v1", "build": "build-v1"}
    assert cached(stack, "/version.json?dpl=v9").json()["version"] == "v1"  # another variant of the path, also cached
    first = get(stack, "/")
    assert first.headers["cache-control"] == "no-cache"  # browsers still revalidate ...
    assert varnish_ttl(stack.varnish, "/index.html") == CDN_ENTRY_TTL_SECONDS  # ... Varnish keeps it per Surrogate-Control
    assert "surrogate-control" not in first.headers and "surrogate-key" not in first.headers and "x-url" not in first.headers

    stack.store.switch("v2")
    assert httpx.get(stack.origin_url + "/version.json", timeout=5).json()["version"] == "v2"
    for path in ENTRY:  # ... while Varnish keeps what the origin's Surrogate-Control allows: the switch alone changes nothing
        answer = get(stack, path)
        assert answer.headers["x-cache"] == "HIT" and "v1" in answer.text, path

    paths = purge_urls(sorted(set(entry_points(stack.store.manifest("v1"))) | set(entry_points(stack.store.manifest("v2")))))
    assert paths == ENTRY
    progress = Progress()
    result = await VarnishProvider(VarnishCdn(url=stack.varnish_url)).purge(PurgeRequest(paths=paths, key="wf-1:purge.0"), progress)
    assert (result.calls, result.purged) == (3, ENTRY)
    assert result.step_detail() == "varnish: banned 3 paths in 3 calls"

    assert "release v2" in get(stack, "/").text
    assert "release v2" in get(stack, "/index.html").text
    assert get(stack, "/version.json").json() == {"version": "v2", "build": "build-v2"}
    assert get(stack, "/version.json?dpl=v9").json()["version"] == "v2"  # the ban covered the query variant too
    assert "release v2" in cached(stack, "/").text  # and the new build is cached in turn

    for built in (v1, v2):  # hashed assets of both releases, before and after
        asset = cached(stack, asset_of(built))
        assert asset.status_code == 200 and asset.headers["content-type"] == "application/javascript"
        assert "immutable" in asset.headers["cache-control"]
        assert varnish_ttl(stack.varnish, asset_of(built)) == 365 * 24 * 3600


async def test_a_missing_chunk_is_a_brief_404_never_index_html(frontend_stack: FrontendStack, tmp_path: Path) -> None:
    stack = frontend_stack
    release(stack, tmp_path, "v1", 1)
    stack.store.switch("v1")
    built = make_release(tmp_path / "builds", "v3", T0 + timedelta(hours=3))
    chunk = asset_of(built)

    missing = get(stack, chunk)
    assert missing.status_code == 404 and "release" not in missing.text
    assert missing.headers["cache-control"] == "no-cache"  # not the origin's year-long immutable for a 404
    assert get(stack, "/assets/app.000000000000.js").status_code == 404
    assert varnish_ttl(stack.varnish, chunk) == NOT_FOUND_TTL_SECONDS

    stack.store.publish(built)  # the chunk exists now (in the pool): Varnish must not keep answering 404 for long

    def served() -> httpx.Response | None:
        answer = get(stack, chunk)
        return answer if answer.status_code == 200 else None

    found = poll(served, timeout=NOT_FOUND_TTL_SECONDS + 10, what=f"{chunk} served once it exists")
    assert "v3" in found.text


async def test_pinned_clients_get_their_release_and_never_each_others(frontend_stack: FrontendStack, tmp_path: Path) -> None:
    stack = frontend_stack
    for hours, version in enumerate(("v1", "v2"), start=1):
        built = make_release(tmp_path / "builds", version, T0 + timedelta(hours=hours))
        # A file under assets/ whose name both releases share: which one answers shows what the origin pinned.
        (built / "assets" / "shared.js").write_text(f"// {version}\n")
        write_manifest(built, build=f"build-{version}", created=T0 + timedelta(hours=hours))
        stack.store.publish(built)
    stack.store.switch("v1")

    assert "release v1" in cached(stack, "/").text  # the unpinned answer is cached first ...
    for how in ({"headers": {"x-deployment-id": "v2"}}, {"params": {"dpl": "v2"}}):
        # ... and no pinned client gets it; each pinned answer is cached as a variant of its own.
        assert "release v2" in cached(stack, "/", **how).text, how
        assert "release v2" in cached(stack, "/index.html", **how).text, how
        assert cached(stack, "/assets/shared.js", **how).text == "// v2\n"
    assert cached(stack, "/assets/shared.js").text == "// v1\n"

    # The __dpl cookie, among others, reaches the origin (which pins assets by it) and keys a variant of its own ...
    cookies = {"cookie": "session=abc; __dpl=v2; theme=dark"}
    assert cached(stack, "/assets/shared.js", headers=cookies).text == "// v2\n"
    # ... but never an entry point (the origin's rule: one tab's cookie must not pin a new tab or a reload).
    assert "release v1" in cached(stack, "/", headers=cookies).text
    # Other cookies make a request neither uncacheable nor a variant: it gets the unpinned answer from the cache.
    for path, body in (("/", "release v1"), ("/assets/shared.js", "// v1")):
        other = get(stack, path, headers={"cookie": "session=abc; theme=dark"})
        assert other.headers["x-cache"] == "HIT" and body in other.text, path
    # An id that is not a version pins nothing (the origin ignores it too) and shares the unpinned answer.
    bogus = get(stack, "/", headers={"x-deployment-id": "../v2", "cookie": "__dpl=.."})
    assert bogus.headers["x-cache"] == "HIT" and "release v1" in bogus.text
    # /version.json is the live release's whoever asks: a pinned tab learns that it should move.
    assert get(stack, "/version.json", headers={"x-deployment-id": "v2"}).json()["version"] == "v1"


async def test_varnish_refuses_purges_from_outside_its_acl_and_purge_drops_one_url(tmp_path: Path) -> None:
    with frontend_stack(tmp_path, purgers=["192.0.2.0/24"]) as stack:
        release(stack, tmp_path, "v1", 1)
        stack.store.switch("v1")
        cached(stack, "/index.html")
        with pytest.raises(CdnError) as refused:
            await VarnishProvider(VarnishCdn(url=stack.varnish_url)).purge(PurgeRequest(paths=["/index.html"], key="k"), Progress())
        assert not refused.value.retryable
        assert "405" in str(refused.value) and "/index.html" in str(refused.value)
        assert get(stack, "/index.html").headers["x-cache"] == "HIT"  # nothing was dropped

    with frontend_stack(tmp_path / "second") as stack:
        release(stack, tmp_path, "v1", 1)
        stack.store.switch("v1")
        cached(stack, "/index.html")
        cached(stack, "/index.html", headers={"x-deployment-id": "v1"})
        result = await VarnishProvider(VarnishCdn(url=stack.varnish_url, method="PURGE")).purge(
            PurgeRequest(paths=["/index.html"], key="k"), Progress())
        assert result.step_detail() == "varnish: purged 1 path in 1 call"
        assert get(stack, "/index.html").headers["x-cache"] == "MISS"  # the exact URL is gone ...
        assert get(stack, "/index.html", headers={"x-deployment-id": "v1"}).headers["x-cache"] == "HIT"  # ... only it

        cached(stack, "/version.json")
        everything = await VarnishProvider(VarnishCdn(url=stack.varnish_url, purge_everything=True)).purge(
            PurgeRequest(paths=["/index.html"], key="k"), Progress())
        assert (everything.purged, everything.detail) == (["/*"], "banned everything")
        assert get(stack, "/version.json").headers["x-cache"] == "MISS"
        assert get(stack, "/index.html", headers={"x-deployment-id": "v1"}).headers["x-cache"] == "MISS"


# -- Cloudflare ------------------------------------------------------------------


def cloudflare(standin: StandIn, **config: object) -> CloudflareProvider:
    settings = {"zone_id": CLOUDFLARE_ZONE, "token_env": "CF_TOKEN", "api_url": standin.url, "site_url": "https://www.example.com"}
    provider = provider_for(CloudflareCdn.model_validate({**settings, **config}), environ={"CF_TOKEN": CLOUDFLARE_TOKEN})
    assert isinstance(provider, CloudflareProvider)
    return provider


async def test_cloudflare_purges_full_urls_in_batches_of_100(cloudflare_standin: StandIn) -> None:
    paths = [f"/page/{i}.html" for i in range(250)]
    result = await cloudflare(cloudflare_standin).purge(PurgeRequest(paths=paths, key="wf:purge.1"), Progress())

    sent = cloudflare_standin.requests
    assert [r.status for r in sent] == [200, 200, 200]
    assert result.calls == 3 and len(result.purged) == 250
    bodies = [r.json() for r in sent]
    assert [len(b["files"]) for b in bodies] == [100, 100, 50]
    assert all(list(b) == ["files"] for b in bodies)
    assert [u for b in bodies for u in b["files"]] == [f"https://www.example.com{p}" for p in paths]
    assert all(r.path == f"/client/v4/zones/{CLOUDFLARE_ZONE}/purge_cache" and r.method == "POST" for r in sent)
    assert all(r.headers["authorization"] == f"Bearer {CLOUDFLARE_TOKEN}" for r in sent)
    assert result.step_detail().startswith("cloudflare: purged 250 files in 3 calls")


async def test_cloudflare_bodies_by_tags_prefixes_and_everything(cloudflare_standin: StandIn) -> None:
    request = PurgeRequest(paths=ENTRY, key="k")
    await cloudflare(cloudflare_standin, purge_by="tags", tags=["frontend-entry"]).purge(request, Progress())
    await cloudflare(cloudflare_standin, purge_by="prefixes").purge(request, Progress())
    everything = await cloudflare(cloudflare_standin, purge_everything=True).purge(request, Progress())

    assert [r.status for r in cloudflare_standin.requests] == [200, 200, 200]
    assert [r.json() for r in cloudflare_standin.requests] == [
        {"tags": ["frontend-entry"]},
        # "/" is the bare host (everything on the site); no scheme, as Cloudflare requires.
        {"prefixes": ["www.example.com", "www.example.com/index.html", "www.example.com/version.json"]},
        {"purge_everything": True},
    ]
    assert everything.purged == ["*"] and everything.reference


async def test_cloudflare_refused_token_is_final_and_never_quoted(cloudflare_standin: StandIn) -> None:
    settings = CloudflareCdn(zone_id=CLOUDFLARE_ZONE, token_env="CF_TOKEN", api_url=cloudflare_standin.url, site_url="https://www.example.com")
    wrong = "cf-wrong-token-5512"
    with pytest.raises(CdnError) as refused:
        await provider_for(settings, environ={"CF_TOKEN": wrong}).purge(PurgeRequest(paths=ENTRY, key="k"), Progress())
    message = str(refused.value)
    assert not refused.value.retryable
    assert "401" in message and CLOUDFLARE_ZONE in message and "Authentication error" in message
    assert wrong not in message and CLOUDFLARE_TOKEN not in message and wrong not in repr(refused.value)
    assert cloudflare_standin.requests[0].status == 401


async def test_cloudflare_waits_out_429_retry_after_then_succeeds_or_gives_back(cloudflare_standin: StandIn) -> None:
    cloudflare_standin.rate_limit(2)
    progress = Progress()
    result = await cloudflare(cloudflare_standin).purge(PurgeRequest(paths=ENTRY, key="k"), progress)

    sent = cloudflare_standin.requests
    assert [r.status for r in sent] == [429, 429, 200] and result.calls == 3
    assert all(later.at - earlier.at >= 0.9 for earlier, later in zip(sent, sent[1:], strict=False))  # Retry-After: 1, honoured
    assert any("rate limited" in text for text in progress.texts)

    cloudflare_standin.rate_limit(RATE_LIMIT_ATTEMPTS)  # every attempt of one purge
    with pytest.raises(CdnError) as limited:
        await cloudflare(cloudflare_standin).purge(PurgeRequest(paths=ENTRY, key="k"), Progress())
    assert limited.value.retryable and limited.value.retry_after == 1
    assert "429" in str(limited.value)

    cloudflare_standin.answer_next(1, 503)
    with pytest.raises(CdnError) as unavailable:
        await cloudflare(cloudflare_standin).purge(PurgeRequest(paths=ENTRY, key="k"), Progress())
    assert unavailable.value.retryable and "503" in str(unavailable.value)


# -- Fastly ----------------------------------------------------------------------


def fastly(standin: StandIn, **config: object) -> FastlyProvider:
    settings = {"service_id": FASTLY_SERVICE, "token_env": "FASTLY_TOKEN", "api_url": standin.url}
    provider = provider_for(FastlyCdn.model_validate({**settings, **config}), environ={"FASTLY_TOKEN": FASTLY_TOKEN})
    assert isinstance(provider, FastlyProvider)
    return provider


async def test_fastly_purges_the_entry_surrogate_key(fastly_standin: StandIn) -> None:
    result = await fastly(fastly_standin).purge(PurgeRequest(paths=ENTRY, key="k"), Progress())

    (sent,) = fastly_standin.requests
    assert (sent.method, sent.path, sent.status) == ("POST", f"/service/{FASTLY_SERVICE}/purge/frontend-entry", 200)
    assert sent.headers["fastly-key"] == FASTLY_TOKEN and "fastly-soft-purge" not in sent.headers
    assert result.purged == ["frontend-entry"] and result.reference and result.reference.endswith("frontend-entry")
    assert result.step_detail().startswith("fastly: purged 1 surrogate key in 1 call")


async def test_fastly_bulk_keys_soft_purge_and_purge_all(fastly_standin: StandIn) -> None:
    request = PurgeRequest(paths=ENTRY, key="k")
    bulk = await fastly(fastly_standin, surrogate_keys=["frontend-entry", "html", "manifest"], soft=True).purge(request, Progress())
    await fastly(fastly_standin, soft=True).purge(request, Progress())
    everything = await fastly(fastly_standin, soft=True, purge_everything=True).purge(request, Progress())

    first, single, purge_all = fastly_standin.requests
    assert (first.path, first.status, first.headers["surrogate-key"]) == (f"/service/{FASTLY_SERVICE}/purge", 200, "frontend-entry html manifest")
    assert first.headers["fastly-soft-purge"] == "1" and single.headers["fastly-soft-purge"] == "1"
    assert bulk.calls == 1 and bulk.purged == ["frontend-entry", "html", "manifest"] and bulk.detail.startswith("soft-purged 3")
    assert (purge_all.path, purge_all.status) == (f"/service/{FASTLY_SERVICE}/purge_all", 200)
    assert "fastly-soft-purge" not in purge_all.headers  # Fastly never purges everything softly
    assert everything.purged == ["*"]


async def test_fastly_refused_token_and_rate_limit(fastly_standin: StandIn) -> None:
    settings = FastlyCdn(service_id=FASTLY_SERVICE, token_env="FASTLY_TOKEN", api_url=fastly_standin.url)
    with pytest.raises(CdnError) as refused:
        await provider_for(settings, environ={"FASTLY_TOKEN": "fastly-wrong-3321"}).purge(PurgeRequest(paths=ENTRY, key="k"), Progress())
    assert not refused.value.retryable and "401" in str(refused.value) and FASTLY_SERVICE in str(refused.value)
    assert "fastly-wrong-3321" not in str(refused.value)

    fastly_standin.rate_limit(1)
    result = await fastly(fastly_standin).purge(PurgeRequest(paths=ENTRY, key="k"), Progress())
    assert [r.status for r in fastly_standin.requests] == [401, 429, 200] and result.calls == 2


# -- CloudFront (moto) -------------------------------------------------------------


def distribution(moto: Moto) -> str:
    client = boto3.client("cloudfront", endpoint_url=moto.endpoint_url, region_name=REGION)
    created = client.create_distribution(DistributionConfig={
        "CallerReference": uuid.uuid4().hex, "Comment": "rollback test", "Enabled": True,
        "Origins": {"Quantity": 1, "Items": [{"Id": "origin", "DomainName": "origin.example.com",
                                              "CustomOriginConfig": {"HTTPPort": 80, "HTTPSPort": 443, "OriginProtocolPolicy": "http-only"}}]},
        "DefaultCacheBehavior": {"TargetOriginId": "origin", "ViewerProtocolPolicy": "allow-all", "MinTTL": 0,
                                 "ForwardedValues": {"QueryString": True, "Cookies": {"Forward": "none"}}},
    })
    return str(created["Distribution"]["Id"])


async def test_cloudfront_makes_one_invalidation_per_key_and_waits_for_it(moto: Moto) -> None:
    dist = distribution(moto)
    config = CloudFrontCdn(distribution_id=dist, endpoint_url=moto.endpoint_url, region=REGION, poll_seconds=0.1, wait_seconds=30)
    request = PurgeRequest(paths=ENTRY, key="rollback-42:frontend.purge.0")
    progress = Progress()

    first = await CloudFrontProvider(config).purge(request, progress)
    again = await provider_for(config).purge(request, Progress())  # a retried activity: a new provider, the same key

    client = boto3.client("cloudfront", endpoint_url=moto.endpoint_url, region_name=REGION)
    listed = client.list_invalidations(DistributionId=dist)["InvalidationList"]
    assert listed["Quantity"] == 1
    assert first.reference == again.reference == listed["Items"][0]["Id"]
    made = client.get_invalidation(DistributionId=dist, Id=first.reference)["Invalidation"]
    assert made["Status"].lower() == "completed"
    assert made["InvalidationBatch"]["Paths"] == {"Quantity": 3, "Items": ENTRY}
    assert "earlier attempt" in again.detail and "earlier attempt" not in first.detail
    assert first.step_detail().startswith("cloudfront: invalidated 3 paths in")
    assert progress.texts

    other = await CloudFrontProvider(config).purge(PurgeRequest(paths=ENTRY, key="rollback-43:frontend.purge.0"), Progress())
    assert other.reference != first.reference
    assert client.list_invalidations(DistributionId=dist)["InvalidationList"]["Quantity"] == 2

    everything = await CloudFrontProvider(config.model_copy(update={"purge_everything": True})).purge(request, Progress())
    assert everything.purged == ["/*"]
    assert client.get_invalidation(DistributionId=dist, Id=everything.reference)["Invalidation"]["InvalidationBatch"]["Paths"]["Items"] == ["/*"]


async def test_cloudfront_unknown_distribution_is_final(moto: Moto) -> None:
    config = CloudFrontCdn(distribution_id="E0NOSUCHDIST00", endpoint_url=moto.endpoint_url, region=REGION)
    with pytest.raises(CdnError) as refused:
        await CloudFrontProvider(config).purge(PurgeRequest(paths=ENTRY, key="k"), Progress())
    assert not refused.value.retryable and "NoSuchDistribution" in str(refused.value)


# -- factory and config ------------------------------------------------------------


async def test_factory_names_a_missing_token_variable() -> None:
    cloudflare_config = CloudflareCdn(zone_id=CLOUDFLARE_ZONE, token_env="ROLLBACK_TEST_CF_TOKEN", site_url="https://www.example.com")
    for environ in ({}, {"ROLLBACK_TEST_CF_TOKEN": ""}):
        with pytest.raises(CdnError) as missing:
            provider_for(cloudflare_config, environ=environ)
        assert "ROLLBACK_TEST_CF_TOKEN" in str(missing.value) and not missing.value.retryable
    with pytest.raises(CdnError, match="ROLLBACK_TEST_FASTLY_TOKEN"):
        provider_for(FastlyCdn(service_id=FASTLY_SERVICE, token_env="ROLLBACK_TEST_FASTLY_TOKEN"), environ={})

    noop = provider_for(NoCdn())
    assert isinstance(noop, NoopProvider)
    result = await noop.purge(PurgeRequest(paths=ENTRY, key="k"), Progress())
    assert result.calls == 0 and result.step_detail() == "none: no CDN configured, nothing to purge"


def test_cdn_config_errors_name_the_field_or_the_providers() -> None:
    adapter: TypeAdapter[CdnConfig] = TypeAdapter(CdnConfig)
    with pytest.raises(ValidationError) as unknown:
        adapter.validate_python({"provider": "akamai", "url": "http://x"})
    text = str(unknown.value)
    assert "akamai" in text and all(name in text for name in ("'none'", "'varnish'", "'cloudflare'", "'fastly'", "'cloudfront'"))

    with pytest.raises(ValidationError) as missing:
        adapter.validate_python({"provider": "cloudflare", "token_env": "CF", "site_url": "https://www.example.com"})
    assert "zone_id" in str(missing.value) and "Field required" in str(missing.value)

    with pytest.raises(ValidationError) as extra:
        adapter.validate_python({"provider": "varnish", "url": "http://127.0.0.1:8088", "token": "x"})
    assert "token" in str(extra.value) and "Extra inputs are not permitted" in str(extra.value)

    with pytest.raises(ValidationError, match="token_env"):
        adapter.validate_python({"provider": "fastly", "service_id": "s", "token_env": "not a name"})
    with pytest.raises(ValidationError, match="tags"):
        adapter.validate_python({"provider": "cloudflare", "zone_id": "z", "token_env": "CF", "site_url": "https://a.example",
                                 "purge_by": "tags"})
    assert adapter.validate_python({"provider": "varnish", "url": "http://127.0.0.1:8088/"}) == VarnishCdn(url="http://127.0.0.1:8088")
