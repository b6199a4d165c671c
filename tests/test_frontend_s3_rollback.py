"""The frontend target on AWS's shape: releases in an S3 bucket prefix, CloudFront in front, both moto's
server (real boto3 over HTTP). A rollback through RollbackWorkflow switches the served entry points,
makes one CloudFront invalidation per direction, and validates the release byte for byte; its activities
run twice leave one effect each."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest
from temporalio.exceptions import ApplicationError

from activities.frontend import FrontendRollback
from activities.health import HttpHealth
from rollback.config import ConfigSource
from rollback.dev.frontend_build import build_release
from rollback.dev.stack import BackendStack
from rollback.models import Phase, RollbackTarget
from rollback.targets.frontend.contract import PurgeInput, ReleaseInput
from rollback.targets.frontend.s3store import S3Store
from tests.conftest import write_config
from tests.helpers import orchestrator
from tests.moto_server import REGION, Moto, moto, moto_server  # noqa: F401 (fixtures)
from tests.test_frontend_cdn import distribution

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)


def s3_site(moto: Moto, tmp_path: Path, name: str) -> S3Store:  # noqa: F811 (fixture)
    s3 = boto3.client("s3", endpoint_url=moto.endpoint_url, region_name=REGION)
    s3.create_bucket(Bucket=name)
    # The site is public (what CloudFront's origin, or a website bucket, reads).
    s3.put_bucket_policy(Bucket=name, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{name}/*"}]}))
    store = S3Store(name, "site/", endpoint_url=moto.endpoint_url, region=REGION)
    for day, version in enumerate(("v1", "v2")):
        store.publish(build_release(tmp_path / "builds", version, created=T0 + timedelta(days=day)))
    store.switch("v2")
    return store


def config_with(backend: BackendStack, tmp_path: Path, moto: Moto, store: S3Store, dist: str) -> ConfigSource:  # noqa: F811
    frontend = {
        "store": {"kind": "s3", "bucket": store.bucket, "prefix": "site/", "endpoint_url": moto.endpoint_url, "region": REGION},
        # moto answers path-style GETs: the bucket prefix is the site's root.
        "front_url": f"{moto.endpoint_url}/{store.bucket}/site",
        "health": {"path": "/index.html", "samples": 3},
        "cdn": [{"provider": "cloudfront", "distribution_id": dist, "endpoint_url": moto.endpoint_url, "region": REGION,
                 "poll_seconds": 0.1}],
        "versions": {"current": "v2", "known_good": "v1"},
    }
    return write_config(backend, tmp_path, extra={"environments": {"demo": {"targets": {"frontend": frontend}}}})


def invalidations(moto: Moto, dist: str) -> list[dict]:  # noqa: F811
    client = boto3.client("cloudfront", endpoint_url=moto.endpoint_url, region_name=REGION)
    listed = client.list_invalidations(DistributionId=dist)["InvalidationList"].get("Items", [])
    return [client.get_invalidation(DistributionId=dist, Id=i["Id"])["Invalidation"] for i in listed]


async def test_an_s3_frontend_behind_cloudfront_rolls_back_with_one_invalidation(blue_green, moto, tmp_path, client, task_queue,  # noqa: F811
                                                                                 run_worker, http):
    store = s3_site(moto, tmp_path, "frontend-rollback")
    dist = distribution(moto)
    await run_worker(config_with(blue_green, tmp_path, moto, store, dist))
    orch = orchestrator(client, task_queue)

    started = await orch.initiate_rollback(targets=[RollbackTarget.FRONTEND], initiated_by="tester")
    result = await orch.wait(started.execution_id)

    assert result is not None and result.state == Phase.SUCCEEDED, result
    assert store.live() == "v1"
    served = await http.get(f"{moto.endpoint_url}/{store.bucket}/site/version.json")
    assert served.json()["version"] == "v1"
    [made] = invalidations(moto, dist)
    assert sorted(made["InvalidationBatch"]["Paths"]["Items"]) == ["/", "/index.html", "/version.json"]
    status = await orch.get_rollback_status(started.execution_id)
    assert next(s for s in status.steps if s.name == "purge cloudfront").detail.startswith("cloudfront"), status.steps


async def test_each_frontend_activity_twice_has_one_effect(blue_green, moto, tmp_path, http):  # noqa: F811
    store = s3_site(moto, tmp_path, "frontend-twice")
    dist = distribution(moto)
    activities = FrontendRollback(config_with(blue_green, tmp_path, moto, store, dist), HttpHealth(http))
    release = ReleaseInput(environment="demo", version="v1")

    first, again = await activities.switch_release(release), await activities.switch_release(release)
    assert (first.switched, first.previous, again.switched) == (True, "v2", False)
    purge = PurgeInput(environment="demo", tier=0, paths=["/", "/index.html"], key="rollback-demo-1:run:frontend:forward:purge.0")
    one, two = await activities.purge_cdn(purge), await activities.purge_cdn(purge)
    assert one.reference == two.reference and len(invalidations(moto, dist)) == 1
    other = await activities.purge_cdn(purge.model_copy(update={"key": "rollback-demo-2:run:frontend:forward:purge.0"}))
    assert other.reference != one.reference and len(invalidations(moto, dist)) == 2


async def test_a_release_corrupted_in_the_bucket_is_refused_before_it_goes_live(blue_green, moto, tmp_path, http):  # noqa: F811
    store = s3_site(moto, tmp_path, "frontend-corrupt")
    activities = FrontendRollback(config_with(blue_green, tmp_path, moto, store, distribution(moto)), HttpHealth(http))
    boto3.client("s3", endpoint_url=moto.endpoint_url, region_name=REGION).put_object(
        Bucket=store.bucket, Key="site/releases/v1/index.html", Body=b"<p>defaced</p>")
    with pytest.raises(ApplicationError, match="release v1: index.html has sha256") as refused:
        await activities.verify_release(ReleaseInput(environment="demo", version="v1"))
    assert refused.value.non_retryable and store.live() == "v2"
