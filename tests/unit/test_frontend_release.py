"""Frontend releases on disk (rollback/targets/frontend): a release goes live only exactly as built,
the live pointer is switched atomically, and retention never removes the live or known-good one."""

from __future__ import annotations

import json
import re
import os
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from rollback.targets.frontend.release import BackendRange, ReleaseError, read_manifest, verify_release, write_manifest
from rollback.targets.frontend.store import DirectoryStore

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)


def build(root: Path, version: str, *, age: int = 0, api: list[str] | None = None) -> Path:
    """What a build pipeline leaves: index.html, a hashed chunk, release.json."""
    release = root / "releases" / version
    (release / "assets").mkdir(parents=True)
    chunk = f"chunk-{version}.js"
    (release / "assets" / chunk).write_text(f"console.log('{version}')")
    (release / "index.html").write_text(f"<html><script src='/assets/{chunk}'></script>{version}</html>")
    write_manifest(release, build=f"build-{version}", created=T0 + timedelta(days=age), api=api or ["GET /api/items"],
                   backend=BackendRange(min="v1"))
    return release


def test_a_release_as_built_verifies_and_says_what_it_calls(tmp_path):
    manifest = verify_release(build(tmp_path, "v1", api=["GET /api/items", "POST /api/orders/{id}/pay"]))
    assert manifest.version == "v1" and set(manifest.files) == {"index.html", "assets/chunk-v1.js"}
    assert manifest.api == ["GET /api/items", "POST /api/orders/{id}/pay"] and manifest.backend == BackendRange(min="v1")


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "assets" / "chunk-v1.js").write_text("tampered"), "assets/chunk-v1.js has sha256"),
    (lambda r: (r / "assets" / "chunk-v1.js").unlink(), "missing assets/chunk-v1.js"),
    (lambda r: (r / "assets" / "extra.js").write_text("x"), "not in release.json: assets/extra.js"),
    (lambda r: (r / "release.json").write_text("{not json"), "release.json is not valid JSON"),
    (lambda r: (r / "release.json").unlink(), "no release.json"),
    (lambda r: _edit(r, version="v9"), "release.json says version v9"),
    (lambda r: _edit(r, api=["GET api/items"]), "not `METHOD /path`"),
    (lambda r: _edit(r, files={"../../etc/passwd": "0" * 64, "index.html": "0" * 64}), "is not a relative path inside the release"),
    (lambda r: _link(r), "goes through a symbolic link"),
], ids=["changed-file", "missing-file", "unlisted-file", "corrupt-manifest", "no-manifest", "wrong-version", "bad-operation",
        "path-outside", "symlink"])
def test_a_release_not_exactly_as_built_is_refused_naming_what_is_wrong(tmp_path, damage, message):
    release = build(tmp_path, "v1")
    damage(release)
    with pytest.raises(ReleaseError) as refused:
        verify_release(release)
    assert message in str(refused.value) and str(refused.value).startswith("release v1"), refused.value


def _edit(release: Path, **fields: object) -> None:
    raw = json.loads((release / "release.json").read_text())
    (release / "release.json").write_text(json.dumps({**raw, **fields}))


def _link(release: Path) -> None:
    outside = release.parent.parent / "outside.js"
    outside.write_text("console.log('not from this build')")
    (release / "assets" / "chunk-v1.js").unlink()
    (release / "assets" / "chunk-v1.js").symlink_to(outside)
    _edit(release, files={**json.loads((release / "release.json").read_text())["files"],
                          "assets/chunk-v1.js": __import__("hashlib").sha256(outside.read_bytes()).hexdigest()})


def test_a_missing_release_and_a_version_that_is_a_path_are_refused(tmp_path):
    store = DirectoryStore(tmp_path)
    with pytest.raises(ReleaseError, match="release v3 does not exist"):
        store.verify("v3")
    with pytest.raises(ReleaseError, match="is not a valid version"):
        store.path("../v1")


def test_the_switch_is_atomic_idempotent_and_relative(tmp_path):
    store = DirectoryStore(tmp_path)
    for version in ("v1", "v2"):
        build(tmp_path, version)
    assert store.live() is None
    assert store.switch("v1") is True and store.switch("v1") is False, "switching to the live release does nothing"
    assert os.readlink(store.current_link) == "releases/v1" and store.live() == "v1"

    # A reader of current/index.html during 400 switches back and forth always finds a release.
    seen: set[str] = set()
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                seen.add((store.current_link / "index.html").read_text()[-9:-7])
            except OSError as err:
                errors.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(400):
            store.switch("v2" if n % 2 == 0 else "v1")
    finally:
        done.set()
        reader.join()
    assert errors == [] and seen <= {"v1", "v2"} and store.live() == "v1"


def test_retention_keeps_the_newest_and_never_the_live_or_known_good_one(tmp_path):
    store = DirectoryStore(tmp_path)
    for age, version in enumerate(["v1", "v2", "v3", "v4", "v5"]):
        build(tmp_path, version, age=age)
    (tmp_path / "releases" / "v6-uploading").mkdir()  # no manifest yet: not a release, never removed
    store.switch("v2")
    assert store.retire(keep=2, protect={"v1"}) == ["v3"]
    assert store.versions() == ["v1", "v2", "v4", "v5"] and (tmp_path / "releases" / "v6-uploading").is_dir()
    assert read_manifest(tmp_path / "releases" / "v5").build == "build-v5"


def _assets(version: str) -> dict[str, str]:
    return {f"assets/app.{version}0000.js": f"console.log('{version}')"}


def built_with_assets(tmp_path: Path, version: str, age: int) -> Path:
    source = tmp_path / "build" / version
    for relative, text in {"index.html": f"<p>{version}</p>", **_assets(version)}.items():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_text(text)
    write_manifest(source, build=f"b-{version}", created=datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(days=age))
    return source


def test_publishing_is_atomic_idempotent_and_refuses_other_content_under_a_version(tmp_path):
    store = DirectoryStore(tmp_path / "site")
    source = built_with_assets(tmp_path, "v1", 0)
    assert store.publish(source).build == "b-v1"
    assert store.publish(source).build == "b-v1"  # again: nothing changes
    assert store.versions() == ["v1"] and not list((tmp_path / "site" / "releases").glob(".*"))
    (source / "index.html").write_text("<p>rebuilt</p>")
    write_manifest(source, build="b-v1-again", created=datetime(2026, 1, 2, tzinfo=timezone.utc))
    with pytest.raises(ReleaseError, match="release v1 already exists with other content"):
        store.publish(source)
    (source / "stray.txt").write_text("not in the manifest")
    with pytest.raises(ReleaseError, match="not in release.json: stray.txt"):
        store.publish(source)  # verified before anything is copied


def test_every_retained_releases_assets_stay_reachable_through_the_pool_until_retired(tmp_path):
    store = DirectoryStore(tmp_path / "site")
    for age, version in enumerate(["v1", "v2", "v3"]):
        store.publish(built_with_assets(tmp_path, version, age))
    store.switch("v3")
    pool = tmp_path / "site" / "pool" / "assets"
    assert sorted(p.name for p in pool.iterdir()) == ["app.v10000.js", "app.v20000.js", "app.v30000.js"]
    assert (pool / "app.v10000.js").read_text() == "console.log('v1')"
    assert store.retire(keep=1, protect={"v2"}) == ["v1"]
    assert sorted(p.name for p in pool.iterdir()) == ["app.v20000.js", "app.v30000.js"]  # no dangling link


def test_each_switch_that_moves_the_pointer_is_logged_once(tmp_path):
    store = DirectoryStore(tmp_path / "site")
    for age, version in enumerate(["v1", "v2"]):
        store.publish(built_with_assets(tmp_path, version, age))
    assert store.switch("v1") and store.switch("v2") and not store.switch("v2") and store.switch("v1")
    assert [(s["from"], s["to"]) for s in store.switches()] == [(None, "v1"), ("v1", "v2"), ("v2", "v1")]


@pytest.mark.parametrize("content, said", [
    ('{"version": "v1", "build": "other"}', "version.json says {'version': 'v1', 'build': 'other'}"),
    ("not json", "version.json says not a JSON object"),
])
def test_a_version_file_that_disagrees_with_the_manifest_is_refused(tmp_path, content, said):
    release = tmp_path / "releases" / "v1"
    release.mkdir(parents=True)
    (release / "index.html").write_text("<p>v1</p>")
    (release / "version.json").write_text(content)
    write_manifest(release, build="b-v1", created=datetime(2026, 1, 1, tzinfo=timezone.utc))
    with pytest.raises(ReleaseError, match=re.escape(f"release v1: {said}, release.json says {{'version': 'v1', 'build': 'b-v1'}}")):
        verify_release(release)
