"""The S3 store (rollback/targets/frontend/s3store.py) against moto's S3 server with real boto3: releases go
live only as built, the switch writes the entry points then the pointer and nothing when already done,
the pool serves every retained release's chunks, and retention never removes the live or a protected one."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest

from rollback.ports import free_port
from rollback.targets.frontend.release import ReleaseError, write_manifest
from rollback.targets.frontend.s3store import ASSET_CACHE_CONTROL, S3Store, content_type, normalise_prefix
from tests.moto_server import REGION, Moto, moto, moto_server  # noqa: F401 - fixtures

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
VENDOR = "console.log('vendor, the same in every release')"


def hashed(content: str, stem: str) -> str:
    return f"assets/{stem}.{hashlib.sha256(content.encode()).hexdigest()[:10]}.js"


def build(root: Path, version: str, *, age: int = 0, extra: dict[str, str] | None = None, app: str | None = None) -> Path:
    """What a build pipeline leaves: index.html, version.json, a chunk of its own, a chunk every release shares."""
    release = root / version
    code = app if app is not None else f"console.log('{version}')"
    files = {
        "index.html": f"<html><script src='/{hashed(code, 'app')}'></script>{version}</html>",
        "version.json": json.dumps({"version": version, "build": f"build-{version}"}),
        hashed(code, "app"): code,
        hashed(VENDOR, "vendor"): VENDOR,
        **(extra or {}),
    }
    for path, content in files.items():
        (release / path).parent.mkdir(parents=True, exist_ok=True)
        (release / path).write_text(content)
    write_manifest(release, build=f"build-{version}", created=T0 + timedelta(days=age))
    return release


def app_asset(release: Path) -> str:
    return next(p for p in json.loads((release / "release.json").read_text())["files"] if "/app." in p)


@pytest.fixture
def s3(moto: Moto) -> Any:
    return boto3.client("s3", endpoint_url=moto.endpoint_url, region_name=REGION)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"site-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["", "site/"], ids=["no-prefix", "prefix"])
def prefix(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(moto: Moto, bucket: str, prefix: str) -> S3Store:
    return S3Store(bucket, prefix, endpoint_url=moto.endpoint_url, region=REGION)


def read(s3: Any, bucket: str, key: str) -> bytes:
    return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def keys(s3: Any, bucket: str, prefix: str = "") -> set[str]:
    return {item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for item in page.get("Contents", [])}


def every_version(s3: Any, bucket: str) -> list[tuple[str, str]]:
    """Every object version and delete marker: with versioning on, any PUT, COPY or DELETE adds one."""
    found = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        found += [(v["Key"], v["VersionId"]) for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
    return sorted(found)


def test_two_releases_switch_back_and_forth_and_the_pool_serves_both(tmp_path, store, s3, bucket, prefix):
    v1, v2 = build(tmp_path, "v1", age=0), build(tmp_path, "v2", age=1)
    store.publish(v2)  # published out of order: versions() orders by the manifest's `created`
    store.publish(v1)
    assert store.versions() == ["v1", "v2"] and store.live() is None

    for version, release in (("v1", v1), ("v2", v2), ("v1", v1)):
        assert store.switch(version) is True
        assert store.live() == version
        assert read(s3, bucket, f"{prefix}index.html") == (release / "index.html").read_bytes()
        assert read(s3, bucket, f"{prefix}version.json") == (release / "version.json").read_bytes()
        assert json.loads(read(s3, bucket, f"{prefix}current.json")) == {"version": version, "build": f"build-{version}"}
        head = s3.head_object(Bucket=bucket, Key=f"{prefix}index.html")
        assert head["ContentType"] == "text/html; charset=utf-8" and head["CacheControl"] == "no-cache"

    # Both releases' chunks (and the shared one, once) are in the pool, immutable, whichever is live.
    pool = keys(s3, bucket, f"{prefix}assets/")
    assert pool == {f"{prefix}{app_asset(v1)}", f"{prefix}{app_asset(v2)}", f"{prefix}{hashed(VENDOR, 'vendor')}"}
    for key in pool:
        head = s3.head_object(Bucket=bucket, Key=key)
        assert head["CacheControl"] == ASSET_CACHE_CONTROL and head["ContentType"] == "text/javascript; charset=utf-8"
    assert read(s3, bucket, f"{prefix}{app_asset(v2)}") == (v2 / app_asset(v2)).read_bytes()
    # Nothing outside the prefix; the release itself, manifest included, under releases/.
    assert all(key.startswith(prefix) for key in keys(s3, bucket))
    assert keys(s3, bucket, f"{prefix}releases/v1/") == {f"{prefix}releases/v1/{p}" for p in
                                                          ("index.html", "version.json", app_asset(v1), hashed(VENDOR, "vendor"), "release.json")}


def test_switching_to_the_live_release_again_writes_nothing(tmp_path, store, s3, bucket):
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    v1 = build(tmp_path, "v1")
    store.publish(v1)
    assert store.switch("v1") is True
    before = every_version(s3, bucket)
    assert store.switch("v1") is False
    store.publish(v1)  # the same release again: no writes either
    assert every_version(s3, bucket) == before


def test_a_switch_repairs_a_front_door_that_no_longer_serves_the_live_release(tmp_path, store, s3, bucket, prefix):
    v1 = build(tmp_path, "v1")
    store.publish(v1)
    store.switch("v1")
    s3.put_object(Bucket=bucket, Key=f"{prefix}index.html", Body=b"<html>defaced</html>", ContentType="text/html; charset=utf-8",
                  CacheControl="no-cache")
    assert store.switch("v1") is True  # current.json names v1, but the bytes are not v1's
    assert read(s3, bucket, f"{prefix}index.html") == (v1 / "index.html").read_bytes()
    s3.copy_object(Bucket=bucket, Key=f"{prefix}index.html", CopySource={"Bucket": bucket, "Key": f"{prefix}index.html"},
                   MetadataDirective="REPLACE", ContentType="text/html; charset=utf-8", CacheControl="max-age=3600")
    assert store.switch("v1") is True  # the right bytes with a header that would let browsers keep it an hour
    assert s3.head_object(Bucket=bucket, Key=f"{prefix}index.html")["CacheControl"] == "no-cache"
    assert store.switch("v1") is False


def test_rolling_back_removes_entry_points_only_the_newer_release_had(tmp_path, store, s3, bucket, prefix):
    store.publish(build(tmp_path, "v1", age=0))
    store.publish(build(tmp_path, "v2", age=1, extra={"about.html": "<html>about</html>", "img/logo.svg": "<svg/>"}))
    store.switch("v2")
    assert s3.head_object(Bucket=bucket, Key=f"{prefix}img/logo.svg")["ContentType"] == "image/svg+xml"
    s3.put_object(Bucket=bucket, Key=f"{prefix}robots.txt", Body=b"not the store's")
    store.switch("v1")
    root = keys(s3, bucket, prefix) - keys(s3, bucket, f"{prefix}releases/") - keys(s3, bucket, f"{prefix}assets/")
    assert root == {f"{prefix}index.html", f"{prefix}version.json", f"{prefix}current.json", f"{prefix}robots.txt"}


def _overwrite(s3: Any, bucket: str, key: str, body: bytes) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=body)


@pytest.mark.parametrize("damage, message", [
    (lambda s3, b, base, r: _overwrite(s3, b, f"{base}index.html", b"<html>tampered</html>"), "index.html has sha256"),
    (lambda s3, b, base, r: _overwrite(s3, b, f"{base}{app_asset(r)}", b"evil()"), "/app."),
    (lambda s3, b, base, r: _overwrite(s3, b, f"{base}assets/extra.js", b"x"), "not in release.json: assets/extra.js"),
    (lambda s3, b, base, r: s3.delete_object(Bucket=b, Key=f"{base}version.json"), "missing version.json"),
    (lambda s3, b, base, r: _overwrite(s3, b, f"{base}release.json", b"{not json"), "release.json is not valid JSON"),
    (lambda s3, b, base, r: _overwrite(s3, b, f"{base}release.json", (r / "release.json").read_bytes().replace(b'"v1"', b'"v9"')),
     "release.json says version v9"),
    (lambda s3, b, base, r: s3.delete_object(Bucket=b, Key=f"{base}release.json"), "no release.json"),
], ids=["changed-entry-point", "changed-asset", "unlisted-object", "missing-object", "corrupt-manifest", "wrong-version", "no-manifest"])
def test_verify_refuses_a_release_not_exactly_as_built(tmp_path, store, s3, bucket, prefix, damage, message):
    v1 = build(tmp_path, "v1")
    store.publish(v1)
    assert store.verify("v1").version == "v1"
    damage(s3, bucket, f"{prefix}releases/v1/", v1)
    with pytest.raises(ReleaseError) as refused:
        store.verify("v1")
    assert message in str(refused.value) and str(refused.value).startswith("release v1"), refused.value


def test_verify_refuses_a_pool_asset_with_other_bytes_and_a_missing_release(tmp_path, store, s3, bucket, prefix):
    v1 = build(tmp_path, "v1")
    store.publish(v1)
    _overwrite(s3, bucket, f"{prefix}{app_asset(v1)}", b"evil()")  # what the CDN would serve
    with pytest.raises(ReleaseError, match=f"release v1: {app_asset(v1)} has sha256 .* in the pool has"):
        store.verify("v1")
    with pytest.raises(ReleaseError) as missing:
        store.verify("v9")
    assert str(missing.value) == f"release v9 does not exist (s3://{bucket}/{prefix}releases/v9/)"
    with pytest.raises(ReleaseError, match="release v9 does not exist"):
        store.switch("v9")
    with pytest.raises(ReleaseError, match="not a valid version"):
        store.manifest("../v1")


def test_publishing_other_content_under_a_published_version_is_refused_and_changes_nothing(tmp_path, store, s3, bucket):
    store.publish(build(tmp_path / "first", "v1"))
    before = {key: read(s3, bucket, key) for key in keys(s3, bucket)}
    with pytest.raises(ReleaseError, match="release v1 already exists with other content"):
        store.publish(build(tmp_path / "second", "v1", app="console.log('rebuilt')"))
    assert {key: read(s3, bucket, key) for key in keys(s3, bucket)} == before


def test_a_hashed_name_the_pool_holds_with_other_bytes_refuses_the_release_before_any_write(tmp_path, store, s3, bucket, prefix):
    v1 = build(tmp_path, "v1", age=0)
    store.publish(v1)
    # v2 ships a file under v1's app chunk name with other bytes: a build that does not hash names by content.
    v2 = build(tmp_path, "v2", age=1, extra={app_asset(v1): "console.log('same name, other bytes')"})
    with pytest.raises(ReleaseError, match=f"release v2: {app_asset(v1)} has sha256 .* a hashed asset's name must change"):
        store.publish(v2)
    assert keys(s3, bucket, f"{prefix}releases/v2/") == set() and store.versions() == ["v1"]
    assert read(s3, bucket, f"{prefix}{app_asset(v1)}") == (v1 / app_asset(v1)).read_bytes()


def test_an_upload_in_progress_is_no_candidate_and_publishing_again_completes_it(tmp_path, store, s3, bucket, prefix):
    v1 = build(tmp_path, "v1")
    base = f"{prefix}releases/v1/"
    s3.put_object(Bucket=bucket, Key=f"{base}index.html", Body=b"<html>half</html>")  # bytes of an older attempt
    s3.put_object(Bucket=bucket, Key=f"{base}assets/left-over.js", Body=b"x")  # a file this build does not have
    assert store.versions() == []
    with pytest.raises(ReleaseError, match="release v1: no release.json .*upload in progress"):
        store.manifest("v1")
    store.publish(v1)
    assert store.versions() == ["v1"] and store.verify("v1").version == "v1"


def test_retire_keeps_the_live_and_protected_releases_and_prunes_only_removed_releases_assets(tmp_path, store, s3, bucket, prefix):
    releases = {v: build(tmp_path, v, age=age) for age, v in enumerate(["v1", "v2", "v3", "v4"])}
    for release in releases.values():
        store.publish(release)
    store.switch("v2")
    # An asset of a release still uploading (no release.json yet) is in the pool but listed by no release.
    s3.put_object(Bucket=bucket, Key=f"{prefix}assets/app.uploading.js", Body=b"next()")

    assert store.retire(keep=1, protect={"v1"}) == ["v3"]
    assert store.versions() == ["v1", "v2", "v4"] and store.live() == "v2"
    assert keys(s3, bucket, f"{prefix}releases/v3/") == set()
    pool = keys(s3, bucket, f"{prefix}assets/")
    assert f"{prefix}{app_asset(releases['v3'])}" not in pool
    assert {f"{prefix}{app_asset(releases[v])}" for v in ("v1", "v2", "v4")} <= pool
    assert f"{prefix}{hashed(VENDOR, 'vendor')}" in pool and f"{prefix}assets/app.uploading.js" in pool
    assert store.retire(keep=1, protect={"v1"}) == []
    assert store.retire(keep=0, protect=set()) == ["v1", "v4"] and store.versions() == ["v2"]
    assert store.verify("v2").version == "v2" and store.switch("v2") is False


def test_listings_go_past_their_first_page_of_a_thousand_keys(tmp_path, moto, s3, bucket):
    prefix = "site/"
    store = S3Store(bucket, prefix, endpoint_url=moto.endpoint_url, region=REGION)
    store.publish(build(tmp_path, "v1"))
    # 1000 objects sorting before every file of the release (aaa/ < assets/ < index.html): a listing that stopped
    # at its first page would see only them, and call the release's own files missing.
    fillers = [f"{prefix}releases/v1/aaa/{i:04d}" for i in range(1000)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: s3.put_object(Bucket=bucket, Key=key, Body=b"x"), fillers))
    with pytest.raises(ReleaseError) as refused:
        store.verify("v1")
    assert str(refused.value).startswith("release v1: not in release.json: aaa/0000, aaa/0001"), refused.value
    assert store.retire(keep=0, protect=set()) == ["v1"]  # 1005 objects: two DeleteObjects batches
    assert keys(s3, bucket, f"{prefix}releases/") == set() and keys(s3, bucket, f"{prefix}assets/") == set()


def test_a_release_that_would_overwrite_the_stores_own_objects_is_refused(tmp_path, store):
    with pytest.raises(ReleaseError, match="current.json would overwrite the S3 store's own"):
        store.publish(build(tmp_path, "v1", extra={"current.json": "{}"}))
    with pytest.raises(ReleaseError, match="releases/v0/index.html would overwrite"):
        store.publish(build(tmp_path, "v2", extra={"releases/v0/index.html": "<html/>"}))


def test_a_pointer_that_is_not_one_is_nothing_live(tmp_path, store, s3, bucket, prefix):
    for body in (b"{not json", b'{"version": "../etc"}', b"[]"):
        s3.put_object(Bucket=bucket, Key=f"{prefix}current.json", Body=body)
        assert store.live() is None


def test_a_missing_bucket_or_an_unreachable_endpoint_is_a_clear_refusal(tmp_path, moto):
    missing = S3Store("no-such-bucket-here", "site", endpoint_url=moto.endpoint_url, region=REGION)
    for call in (missing.versions, missing.live, lambda: missing.publish(build(tmp_path, "v1")), lambda: missing.switch("v1")):
        with pytest.raises(ReleaseError, match="S3 bucket no-such-bucket-here does not exist .*s3://no-such-bucket-here/site/"):
            call()
    unreachable = S3Store("site", endpoint_url=f"http://127.0.0.1:{free_port()}", region=REGION)
    started = time.monotonic()
    with pytest.raises(ReleaseError, match=r"S3 unreachable for listing s3://site/releases/ at http://127\.0\.0\.1:\d+"):
        unreachable.versions()
    assert time.monotonic() - started < 60  # bounded: explicit timeouts and a bounded number of attempts


def test_prefixes_and_content_types():
    assert [normalise_prefix(p) for p in ("", "/", "site", "/site/", "a/b/")] == ["", "", "site/", "site/", "a/b/"]
    for bad in ("a//b", "a/../b", "./a"):
        with pytest.raises(ReleaseError, match="S3 prefix"):
            normalise_prefix(bad)
    assert {p: content_type(p) for p in ("index.html", "a.JS", "s.css", "v.json", "i.svg", "p.png", "x.js.map", "f.woff2", "LICENSE")} == {
        "index.html": "text/html; charset=utf-8", "a.JS": "text/javascript; charset=utf-8", "s.css": "text/css; charset=utf-8",
        "v.json": "application/json", "i.svg": "image/svg+xml", "p.png": "image/png", "x.js.map": "application/json",
        "f.woff2": "font/woff2", "LICENSE": "application/octet-stream"}
