"""Where frontend releases live, behind one protocol (ReleaseStore), and the directory store: releases on
the origin host, `<root>/releases/<version>/`, and `<root>/current`, a symbolic link to the live one,
which the web server serves (rollback/targets/frontend/origin.py renders its nginx configuration).

The switch is atomic: a new link is made beside `current` and renamed over it (rename(2) replaces
the name in one step), so a reader always finds either the old release or the new one, never
nothing. Releases are never changed once written; retention removes whole ones, never the live or
the known-good one.

`<root>/pool/assets/<name>` links every hashed asset of every retained release: a tab opened on an
older or a newer release than the live one asks for chunks `current` does not have, and the origin
answers them from the pool (hashed names are content-addressed, so any release holding the name holds
the same bytes).
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from rollback.targets.frontend.release import ReleaseError, ReleaseManifest, read_manifest, release_dir, verify_release
from rollback.versions import version_problem

CURRENT = "current"
SWITCH_LOG = "switches.jsonl"  # one line per switch that moved the pointer: what was live when
POOL = "pool"
ASSETS = "assets"  # a release's hashed, immutable files: everything else is an entry point


class ReleaseStore(Protocol):
    """What the frontend activities need of a store. Every method is idempotent and synchronous (the
    activities run them in a thread)."""

    def versions(self) -> list[str]:
        """Every complete release, oldest first (by its manifest's `created`)."""
        ...

    def live(self) -> str | None:
        """The version served now; None when nothing is live yet."""
        ...

    def manifest(self, version: str) -> ReleaseManifest:
        """The release's manifest, checked as a manifest (not the files): ReleaseError when missing or wrong."""
        ...

    def verify(self, version: str) -> ReleaseManifest:
        """Every file against the manifest, and the manifest names every file: ReleaseError naming what is wrong."""
        ...

    def publish(self, source: Path) -> ReleaseManifest:
        """Add the built release in `source` (a directory named after its version, with its release.json), verified
        first. Publishing the same release again changes nothing; a different one under the same version is refused."""
        ...

    def switch(self, version: str) -> bool:
        """Make `version` live; False when it already was (nothing done)."""
        ...

    def retire(self, *, keep: int, protect: set[str]) -> list[str]:
        """Remove all but the newest `keep` releases, never one in `protect` nor the live one. Returns those removed."""
        ...


def to_retire(versions: list[str], *, keep: int, protect: set[str]) -> list[str]:
    """Of `versions` (oldest first), those retention removes: all but the newest `keep`, never a protected one."""
    kept = set(versions[-keep:]) if keep > 0 else set()
    return [v for v in versions if v not in kept and v not in protect]


def entry_points(manifest: ReleaseManifest) -> list[str]:
    """The release's files that are not hashed assets: what a switch changes at the front door, and what a CDN must purge."""
    return sorted(path for path in manifest.files if not path.startswith(f"{ASSETS}/"))


class DirectoryStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def current_link(self) -> Path:
        return self.root / CURRENT

    def path(self, version: str) -> Path:
        return release_dir(self.root, version)

    def versions(self) -> list[str]:
        """Every release here, oldest first (by the time its manifest says it was built)."""
        releases = self.root / "releases"
        if not releases.is_dir():
            return []
        found: list[tuple[datetime, str]] = []
        for entry in releases.iterdir():
            if entry.is_dir() and version_problem(entry.name) is None:
                try:
                    found.append((read_manifest(entry).created, entry.name))
                except ReleaseError:
                    continue  # not a release (yet): an upload in progress is no candidate
        return [name for _, name in sorted(found)]

    def live(self) -> str | None:
        """The version `current` points at, None when there is no link yet."""
        try:
            target = os.readlink(self.current_link)
        except FileNotFoundError:
            return None
        name = Path(target).name
        return name if Path(target).parent.name == "releases" and version_problem(name) is None else None

    def manifest(self, version: str) -> ReleaseManifest:
        return read_manifest(self.path(version))

    def verify(self, version: str) -> ReleaseManifest:
        return verify_release(self.path(version))

    def publish(self, source: Path) -> ReleaseManifest:
        manifest = verify_release(source)
        target = self.path(manifest.version)
        if target.is_dir():
            existing = read_manifest(target)
            if existing.files != manifest.files or existing.build != manifest.build:
                raise ReleaseError(f"release {manifest.version} already exists with other content (build {existing.build}); "
                                   "a release is immutable: publish it under a new version")
        else:
            # Copied beside its final name, then renamed: a half-copied release is never a release.
            staging = target.with_name(f".{manifest.version}.{os.getpid()}.partial")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source, staging, symlinks=False)
            os.replace(staging, target)
        self._pool_assets(manifest.version)
        return manifest

    def _pool_assets(self, version: str) -> None:
        """Link the release's hashed assets into the pool (idempotent: an existing link to a retained release stays)."""
        assets = self.path(version) / ASSETS
        if not assets.is_dir():
            return
        pool = self.root / POOL / ASSETS
        pool.mkdir(parents=True, exist_ok=True)
        for asset in sorted(assets.rglob("*")):
            if not asset.is_file():
                continue
            relative = asset.relative_to(assets)
            link = pool / relative
            if link.exists():  # follows the link: a dangling one is relinked below
                # A name two releases hold with other bytes (an unhashed file under assets/) keeps its first
                # link: a pinned tab gets its own release's copy, an unpinned one the live release's first.
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            staging = link.with_name(f".{link.name}.{os.getpid()}")
            staging.unlink(missing_ok=True)
            os.symlink(os.path.relpath(asset, link.parent), staging)
            os.replace(staging, link)

    def switch(self, version: str) -> bool:
        """Make `version` live. False when it already was (nothing done): the switch is declarative."""
        target = self.path(version)
        if not target.is_dir():
            raise ReleaseError(f"release {version} does not exist ({target})")
        self._pool_assets(version)  # a release a pipeline copied in by itself has its assets pooled before it serves
        if self.live() == version:
            return False
        relative = os.path.join("releases", version)  # relative: the root can move, or be mounted elsewhere
        staging = self.root / f".{CURRENT}.{version}.{os.getpid()}"
        if staging.is_symlink():
            staging.unlink()  # left by a run that died between symlink and rename
        previous = self.live()
        os.symlink(relative, staging)
        os.replace(staging, self.current_link)
        with (self.root / SWITCH_LOG).open("a") as log:
            log.write(json.dumps({"at": datetime.now(timezone.utc).isoformat(), "from": previous, "to": version}) + "\n")
        return True

    def switches(self) -> list[dict[str, str | None]]:
        """Every switch that moved the pointer, oldest first."""
        path = self.root / SWITCH_LOG
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []

    def retire(self, *, keep: int, protect: set[str]) -> list[str]:
        """Remove all but the newest `keep` releases, never one in `protect` (the live and known-good ones)
        nor the one live now. Returns the versions removed."""
        versions = self.versions()
        live = self.live()
        removed = to_retire(versions, keep=keep, protect=protect | ({live} if live else set()))
        for version in removed:
            shutil.rmtree(self.path(version))
        if removed:
            self._prune_pool(set(versions) - set(removed))
        return removed

    def _prune_pool(self, retained: set[str]) -> None:
        """Drop pool links into removed releases; relink a name another retained release still holds."""
        pool = self.root / POOL / ASSETS
        if not pool.is_dir():
            return
        for link in sorted(pool.rglob("*")):
            if link.is_symlink() and not link.exists():
                link.unlink()
        for version in sorted(retained):
            self._pool_assets(version)
