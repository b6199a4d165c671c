"""The demo frontend's build (rollback/dev/frontend_build.py), without a browser: a release that verifies as
built, content-addressed asset names, byte-identical rebuilds (so publishing one twice is a no-op), and
the two faults the demo deploys (`broken-js`, `missing-api`). tests/test_frontend_browser.py runs the
same builds in chromium."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from rollback.demo_app import DemoApp
from rollback.dev.frontend_build import build_release
from rollback.targets.frontend.release import OPERATION, verify_release
from rollback.targets.frontend.store import DirectoryStore

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)


def _files(release: Path) -> dict[str, bytes]:
    return {p.relative_to(release).as_posix(): p.read_bytes() for p in sorted(release.rglob("*")) if p.is_file()}


def _asset(release: Path, stem: str) -> Path:
    (found,) = (release / "assets").glob(f"{stem}.*.js")
    return found


def test_a_build_is_a_release_that_verifies_and_names_what_it_serves(tmp_path):
    release = build_release(tmp_path, "v1", created=T0)
    assert release == tmp_path / "v1"
    manifest = verify_release(release)
    app, items = _asset(release, "app"), _asset(release, "items")
    assert set(manifest.files) == {"index.html", "version.json", f"assets/{app.name}", f"assets/{items.name}"}
    assert manifest.version == "v1" and manifest.created == T0 and manifest.api == ["GET /api/items"]
    assert json.loads((release / "version.json").read_text()) == {"version": "v1", "build": manifest.build}
    assert re.fullmatch(r"v1-[0-9a-f]{8}", manifest.build)
    page = (release / "index.html").read_text()
    # The page names the bootstrap, the bootstrap names the chunk: both by their absolute, hashed paths.
    assert f'<script type="module" src="/assets/{app.name}">' in page and f'"/assets/{items.name}"' in app.read_text()
    assert '<span id="version">v1</span>' in page and '<ul id="items">' in page and 'id="error"' in page
    assert '<meta name="version-check-ms" content="5000">' in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]  # no staging left beside it


def test_asset_names_carry_the_hash_of_their_content(tmp_path):
    release = build_release(tmp_path, "v1", created=T0)
    for asset in (release / "assets").iterdir():
        stem, digest, suffix = asset.name.split(".")
        assert (stem, suffix) in (("app", "js"), ("items", "js"))
        assert digest == hashlib.sha256(asset.read_bytes()).hexdigest()[:10], asset.name


def test_the_same_inputs_give_the_same_bytes_and_publishing_twice_changes_nothing(tmp_path):
    first = _files(build_release(tmp_path / "a", "v2", created=T0, check_interval_ms=200))
    again = build_release(tmp_path / "b", "v2", created=T0, check_interval_ms=200)
    assert _files(again) == first
    # mtimes are the build time too: nginx's ETag (mtime + size) of a page never depends on when the build ran.
    assert {p.stat().st_mtime for p in again.rglob("*")} == {T0.timestamp()}
    store = DirectoryStore(tmp_path / "origin")
    store.publish(again)
    store.publish(build_release(tmp_path / "c", "v2", created=T0, check_interval_ms=200))  # not refused: the same release
    assert _files(store.path("v2")) == first


def test_a_rebuild_replaces_the_previous_build_whole(tmp_path):
    build_release(tmp_path, "v1", created=T0)
    (tmp_path / "v1" / "assets" / "stale.js").write_text("left over")
    release = build_release(tmp_path, "v1", created=T0, check_interval_ms=250)
    verify_release(release)  # an unlisted left-over file would be refused
    assert '<meta name="version-check-ms" content="250">' in (release / "index.html").read_text()


def test_releases_differ_in_every_asset_name_and_in_their_build(tmp_path):
    one, two = build_release(tmp_path, "v1", created=T0), build_release(tmp_path, "v2", created=T0 + timedelta(minutes=1))
    assert not {p.name for p in (one / "assets").iterdir()} & {p.name for p in (two / "assets").iterdir()}
    assert verify_release(one).build != verify_release(two).build


def test_broken_js_throws_while_the_chunk_evaluates(tmp_path):
    good = _asset(build_release(tmp_path / "good", "v3", created=T0), "items").read_text()
    broken_release = build_release(tmp_path / "bad", "v3", fault="broken-js", created=T0)
    broken = _asset(broken_release, "items").read_text()
    assert 'throw new Error("broken release v3");' in broken and "throw new Error(\"broken" not in good
    # Top level, before the exports: importing it fails, not merely rendering.
    assert broken.index("throw new Error") < broken.index("export ")
    assert verify_release(broken_release).api == ["GET /api/items"]


def test_missing_api_calls_and_declares_an_operation_the_demo_backend_lacks(tmp_path):
    release = build_release(tmp_path, "v4", fault="missing-api", created=T0)
    manifest = verify_release(release)
    assert manifest.api == ["GET /api/items", "GET /api/orders"] and all(OPERATION.fullmatch(op) for op in manifest.api)
    chunk = _asset(release, "items").read_text()
    assert 'fetch("/api/orders"' in chunk and 'fetch("/api/items"' in chunk
    assert 'fetch("/api/orders"' not in _asset(build_release(tmp_path / "ok", "v4", created=T0), "items").read_text()


async def test_the_demo_backend_serves_what_a_good_build_calls_and_not_what_missing_api_adds():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=DemoApp("v1", "none")), base_url="http://demo") as http:
        assert (await http.get("/api/items")).status_code == 200
        assert (await http.get("/api/orders")).status_code == 404


@pytest.mark.parametrize("kwargs, message", [
    ({"version": "../v1"}, "version:"),
    ({"version": "-v1"}, "version:"),
    ({"fault": "errors"}, "fault:"),
    ({"check_interval_ms": 0}, "check_interval_ms:"),
    ({"check_interval_ms": 1.5}, "check_interval_ms:"),
], ids=["path", "option", "backend-fault", "zero-interval", "fractional-interval"])
def test_bad_inputs_are_refused_naming_the_argument(tmp_path, kwargs, message):
    arguments = {"version": "v1", "created": T0, **kwargs}
    version = arguments.pop("version")
    with pytest.raises(ValueError, match=message):
        build_release(tmp_path, version, **arguments)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []
