"""Releases on the origin host: `<root>/releases/<version>/` and `<root>/current`, a symbolic link to the
live one, which the web server serves.

The switch is atomic: a new link is made beside `current` and renamed over it (rename(2) replaces
the name in one step), so a reader always finds either the old release or the new one, never
nothing. Releases are never changed once written; retention removes whole ones, never the live or
the known-good one.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime
from pathlib import Path

from rollback.targets.frontend.release import ReleaseError, ReleaseManifest, read_manifest, release_dir, verify_release
from rollback.versions import version_problem

CURRENT = "current"


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

    def verify(self, version: str) -> ReleaseManifest:
        return verify_release(self.path(version))

    def switch(self, version: str) -> bool:
        """Make `version` live. False when it already was (nothing done): the switch is declarative."""
        target = self.path(version)
        if not target.is_dir():
            raise ReleaseError(f"release {version} does not exist ({target})")
        if self.live() == version:
            return False
        relative = os.path.join("releases", version)  # relative: the root can move, or be mounted elsewhere
        staging = self.root / f".{CURRENT}.{version}.{os.getpid()}"
        if staging.is_symlink():
            staging.unlink()  # left by a run that died between symlink and rename
        os.symlink(relative, staging)
        os.replace(staging, self.current_link)
        return True

    def retire(self, *, keep: int, protect: set[str]) -> list[str]:
        """Remove all but the newest `keep` releases, never one in `protect` (the live and known-good ones)
        nor the one live now. Returns the versions removed."""
        versions = self.versions()
        kept = set(versions[-keep:]) if keep > 0 else set()
        live = self.live()
        removed = [v for v in versions if v not in kept and v not in protect and v != live]
        for version in removed:
            shutil.rmtree(self.path(version))
        return removed
