"""HTTP health validation against a real demo app: status, body, latency, ratio, version."""

from __future__ import annotations

from activities.health import HttpCheckInput, HttpHealth
from rollback.config_parts import HealthCheck


async def test_health_validation_judges_status_body_latency_and_version(blue_green, http):
    health = HttpHealth(http)
    url = blue_green.instance_url("blue")

    ok = await health.validate(HttpCheckInput(base_url=url, check=HealthCheck(samples=4, interval_ms=0), expect_version="v1"))
    assert ok.healthy and ok.successes == 4 and ok.versions == {"v1": 4} and ok.p95_latency_ms is not None

    wrong_version = await health.validate(HttpCheckInput(base_url=url, check=HealthCheck(samples=2, interval_ms=0), expect_version="v2"))
    assert not wrong_version.healthy and "version 'v1' != 'v2'" in wrong_version.detail

    body = await health.validate(HttpCheckInput(base_url=url, check=HealthCheck(samples=2, interval_ms=0, expected_body="ready")))
    assert not body.healthy and "body lacks 'ready'" in body.detail

    blue_green.redeploy_colour("blue", "v1", fault="latency")
    slow = await health.validate(HttpCheckInput(base_url=url, check=HealthCheck(samples=1, max_latency_ms=500, timeout_seconds=5)))
    assert not slow.healthy and "latency" in slow.detail

    # 10 good answers, then errors: 10 of 20 samples pass; a 50% threshold accepts that, 60% does not.
    blue_green.redeploy_colour("blue", "v1", fault="errors_after:10")
    half = await health.validate(HttpCheckInput(base_url=url, check=HealthCheck(samples=20, interval_ms=0, success_ratio=0.5)))
    assert half.healthy and half.successes == 10 and half.success_ratio == 0.5
    worse = await health.validate(HttpCheckInput(base_url=url, check=HealthCheck(samples=5, interval_ms=0, success_ratio=0.6)))
    assert not worse.healthy and worse.successes == 0 and "status 500 != 200" in worse.detail

    gone = await health.validate(HttpCheckInput(base_url="http://127.0.0.1:1", check=HealthCheck(samples=1)))
    assert not gone.healthy and "ConnectError" in gone.detail


async def test_smoke_check_covers_every_path_through_the_front_door(blue_green, tmp_path, http):
    from temporalio.testing import ActivityEnvironment

    from activities.backend import BackendRollback
    from rollback.targets.backend.contract import ValidateInput
    from tests.conftest import write_config

    good = BackendRollback(write_config(blue_green, tmp_path), HttpHealth(http))
    report = await ActivityEnvironment().run(good.smoke, ValidateInput(environment="demo", expect_version="v1"))
    assert report.healthy and report.samples == 40 and report.successes == 40
    assert report.p95_latency_ms is not None and report.p95_latency_ms < 500

    broken = BackendRollback(write_config(blue_green, tmp_path, extra={"environments": {"demo": {"targets": {"backend": {
        "smoke": {"paths": ["/api/items", "/missing"], "samples": 3}}}}}}), HttpHealth(http))
    report = await ActivityEnvironment().run(broken.smoke, ValidateInput(environment="demo", expect_version="v1"))
    assert not report.healthy and report.successes == 3
    assert "/missing: 0/3 ok (status 404 != 200)" in report.detail
