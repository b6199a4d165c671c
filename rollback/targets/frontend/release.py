"""A frontend release: an immutable directory `releases/<version>/` holding `index.html`, hashed assets
and `release.json`, the manifest that names every file with its sha256, the backend operations the
build calls (`METHOD /path`) and, optionally, the backend versions it supports.

A release goes live only once every file is exactly what its manifest says, and the manifest names
every file there is: a file added or changed after the build (by hand, by a half-finished upload) is
a refusal, never served.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rollback.versions import Version, version_problem

MANIFEST = "release.json"
ENTRY_POINT = "index.html"
VERSION_FILE = "version.json"  # what the front door answers: {"version": ..., "build": ...} of the live release
# `GET /api/items/{id}`: a method and an absolute path, path parameters in braces (as in OpenAPI),
# optionally the query parameters it sends: `GET /api/items?page&size`.
OPERATION = re.compile(r"^(GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS) (/[A-Za-z0-9._~!$'()*+,;=:@%{}/-]*)(\?[A-Za-z0-9._~-]+(&[A-Za-z0-9._~-]+)*)?$")
CHUNK = 1024 * 1024


class ReleaseError(ValueError):
    """A release that must not go live; the message names the release and what is wrong."""


class BackendRange(BaseModel):
    """The backend versions a build supports (inclusive, compared as versions: v2.3.0 < v2.10.0)."""

    model_config = ConfigDict(extra="forbid")

    min: Version | None = None
    max: Version | None = None


class ReleaseManifest(BaseModel):
    """release.json."""

    model_config = ConfigDict(extra="forbid")

    version: Version
    build: str = Field(min_length=1, max_length=200, description="build id or commit")
    created: datetime
    files: dict[str, str] = Field(description="relative path -> sha256 hex of its bytes; every file but release.json")
    api: list[str] = Field(default_factory=list, description="backend operations the build calls, as `METHOD /path`")
    backend: BackendRange | None = None

    @field_validator("files")
    @classmethod
    def _files(cls, files: dict[str, str]) -> dict[str, str]:
        for path, digest in files.items():
            if not _relative_path_ok(path):
                raise ValueError(f"{path!r} is not a relative path inside the release")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"{path}: {digest!r} is not a sha256 hex digest")
        if ENTRY_POINT not in files:
            raise ValueError(f"names no {ENTRY_POINT}")
        return files

    @field_validator("api")
    @classmethod
    def _operations(cls, api: list[str]) -> list[str]:
        bad = [entry for entry in api if not OPERATION.fullmatch(entry)]
        if bad:
            raise ValueError(f"not `METHOD /path`: {', '.join(repr(b) for b in bad[:5])}")
        return api


def _relative_path_ok(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts) and "\\" not in path \
        and path != MANIFEST


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(release_dir: Path) -> ReleaseManifest:
    """The release's manifest, checked; ReleaseError naming the release when it is missing or wrong."""
    path = release_dir / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReleaseError(f"release {release_dir.name}: no {MANIFEST}" if release_dir.is_dir()
                           else f"release {release_dir.name} does not exist ({release_dir})") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ReleaseError(f"release {release_dir.name}: {MANIFEST} is not valid JSON ({err})") from None
    try:
        manifest = ReleaseManifest.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or MANIFEST
        raise ReleaseError(f"release {release_dir.name}: {MANIFEST} {where}: {first['msg']}") from None
    if manifest.version != release_dir.name:
        raise ReleaseError(f"release {release_dir.name}: {MANIFEST} says version {manifest.version}")
    return manifest


def check_listing(manifest: ReleaseManifest, present: set[str]) -> None:
    """The files a store holds for the release (relative paths) are exactly those its manifest names."""
    present = present - {MANIFEST}
    missing = sorted(set(manifest.files) - present)
    if missing:
        raise ReleaseError(f"release {manifest.version}: missing {', '.join(missing[:10])}")
    unlisted = sorted(present - set(manifest.files))
    if unlisted:
        raise ReleaseError(f"release {manifest.version}: not in {MANIFEST}: {', '.join(unlisted[:10])}")


def verify_release(release_dir: Path) -> ReleaseManifest:
    """Check every file against the manifest, and that the manifest names every file. Returns the manifest."""
    manifest = read_manifest(release_dir)
    check_listing(manifest, {p.relative_to(release_dir).as_posix() for p in release_dir.rglob("*") if p.is_file() or p.is_symlink()})
    inside = release_dir.resolve()
    for relative, expected in sorted(manifest.files.items()):
        path = release_dir / relative
        # A link (of the file or of a directory on its way) could point anywhere: another release, /etc.
        if path.is_symlink() or not path.resolve().is_relative_to(inside) or path.resolve() != inside / relative:
            raise ReleaseError(f"release {release_dir.name}: {relative} goes through a symbolic link")
        if (actual := sha256_of(path)) != expected:
            raise ReleaseError(f"release {release_dir.name}: {relative} has sha256 {actual[:12]}..., "
                               f"{MANIFEST} says {expected[:12]}...")
    if VERSION_FILE in manifest.files:
        _check_version_file(manifest, (release_dir / VERSION_FILE).read_bytes())
    return manifest


def _check_version_file(manifest: ReleaseManifest, content: bytes) -> None:
    """version.json must name the release and build of its manifest: a switch is done once the front door
    answers that build, so a mismatch would only show after the switch, as a timeout and an undo."""
    try:
        said = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        said = None
    if not isinstance(said, dict) or said.get("version") != manifest.version or said.get("build") != manifest.build:
        shown = {k: said.get(k) for k in ("version", "build")} if isinstance(said, dict) else "not a JSON object"
        raise ReleaseError(f"release {manifest.version}: {VERSION_FILE} says {shown}, {MANIFEST} says "
                           f"{{'version': {manifest.version!r}, 'build': {manifest.build!r}}}")


def release_dir(root: Path, version: str) -> Path:
    """`<root>/releases/<version>`, for a version that is a valid name (never a path)."""
    problem = version_problem(version)
    if problem is not None:
        raise ReleaseError(f"version: {problem}")
    return root / "releases" / version


def write_manifest(release_dir: Path, *, build: str, created: datetime, api: list[str] | None = None,
                   backend: BackendRange | None = None) -> ReleaseManifest:
    """Write release.json for the files a build left in `release_dir` (what a pipeline does after building)."""
    files = {p.relative_to(release_dir).as_posix(): sha256_of(p) for p in sorted(release_dir.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    manifest = ReleaseManifest(version=release_dir.name, build=build, created=created, files=files, api=api or [],
                               backend=backend)
    (release_dir / MANIFEST).write_text(manifest.model_dump_json(indent=2, exclude_none=True))
    return manifest
