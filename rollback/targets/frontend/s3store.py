"""The S3 store: frontend releases in a bucket a CDN (CloudFront) serves, behind the same ReleaseStore
protocol as the directory store, and with the same rules: a release goes live only exactly as built,
never changes once published, and retention never removes the live or a protected one.

Layout under `s3://<bucket>/<prefix>`:

- `releases/<version>/<file>`: the release, every file its manifest names, and `release.json`,
  written LAST by publish (create-only). A release without release.json is an upload in progress, or
  an interrupted one: no candidate, as a directory without a valid manifest is none.
- `assets/<name>`: the pool of every retained release's hashed assets, copied in at publish, so the
  CDN serves old and new chunks from one place and a tab opened on another release keeps loading its
  chunks in either direction. Names are content-hashed: a name is never rewritten with other bytes.
- `<entry point>` (index.html, version.json, every file not under assets/): the live release, what
  the CDN serves at the front door, and `current.json`, `{"version": v, "build": b}`, the pointer.

The honest limit of the switch: S3 has no multi-object atomicity. Each object is replaced whole (a
reader gets an entry point's old bytes or its new ones, never a mixture), but during a switch a reader
can get the new index.html and the old version.json. The switch copies the entry points first and
writes the pointer last, so once current.json names a release the front door is entirely that
release's, and a switch interrupted part-way is finished by running it again. Hashed assets of both
releases are in the pool throughout, so either index.html finds its chunks.

Every call has explicit timeouts and an explicit retry policy; every failure (a missing bucket,
access denied, an unreachable endpoint) is a ReleaseError naming the bucket and key, never a
credential.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError  # type: ignore[import-untyped]

from rollback.targets.frontend.release import (CHUNK, MANIFEST, ReleaseError, ReleaseManifest, check_listing, read_manifest,
                                               release_dir, verify_release)
from rollback.targets.frontend.store import ASSETS, entry_points
from rollback.versions import version_problem

RELEASES = "releases"
POINTER = "current.json"

# Browsers revalidate an entry point every time (the switch changes it in place); a hashed asset's
# name changes with its bytes, so it can be cached for a year.
ENTRY_CACHE_CONTROL = "no-cache"
ASSET_CACHE_CONTROL = "public, max-age=31536000, immutable"

# Explicit, not boto's defaults (60 s reads, legacy retries): an activity must fail in bounded time.
# "standard" retries throttling, 5xx and connection errors with jittered exponential backoff.
CONNECT_TIMEOUT_SECONDS = 5
READ_TIMEOUT_SECONDS = 30
MAX_ATTEMPTS = 5

# Requests in flight at once: a release is hundreds or thousands of small files, and one at a time a
# publish would spend minutes waiting on round trips. The client is thread-safe; its pool holds as many.
WORKERS = 16

DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys a request

# By suffix, not the `mimetypes` module: its answers depend on the host's /etc/mime.types, and a
# wrong Content-Type (a chunk served as text/plain) is a broken page under `nosniff`.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".txt": "text/plain; charset=utf-8",
    ".xml": "application/xml",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".otf": "font/otf",
    ".wasm": "application/wasm",
}
DEFAULT_CONTENT_TYPE = "application/octet-stream"

# What S3 answers for a key (or, to a HEAD, a bucket) that is not there.
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION_FAILED = {"PreconditionFailed", "412"}
_REFUSED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
            "ExpiredToken", "InvalidToken"}


T = TypeVar("T")
R = TypeVar("R")


class _NotFound(Exception):
    """The object asked for is not there (internal: callers turn it into None or a ReleaseError)."""


class _Exists(Exception):
    """A create-only write found the object already there (internal: publish compares what is there)."""


@dataclass(frozen=True)
class _Head:
    """What a HEAD says about an object; `sha256` only when S3 holds a full-object SHA-256 checksum."""

    content_type: str | None
    cache_control: str | None
    sha256: str | None


def content_type(path: str) -> str:
    """The Content-Type a file is served with, by its suffix."""
    name = path.rsplit("/", 1)[-1].lower()
    suffix = name[name.rfind("."):] if "." in name else ""
    return CONTENT_TYPES.get(suffix, DEFAULT_CONTENT_TYPE)


def is_asset(path: str) -> bool:
    return path.startswith(f"{ASSETS}/")


def cache_control(path: str) -> str:
    return ASSET_CACHE_CONTROL if is_asset(path) else ENTRY_CACHE_CONTROL


def normalise_prefix(prefix: str) -> str:
    """"" or "some/where/": keys are `prefix + name`, so the prefix ends with exactly one slash."""
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    if any(part in ("", ".", "..") for part in stripped.split("/")) or "\\" in stripped:
        raise ReleaseError(f"S3 prefix {prefix!r}: empty, '.' or '..' segments are not a place in a bucket")
    return f"{stripped}/"


def _checksum_of(sha256_hex: str) -> str:
    """The manifest's hex digest as S3's x-amz-checksum-sha256 (base64 of the raw digest)."""
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


def _hex_of(checksum: str | None) -> str | None:
    """S3's full-object SHA-256 checksum as hex; None for none, or a composite one (`...-N`, multipart)."""
    if not checksum or "-" in checksum:
        return None
    try:
        raw = base64.b64decode(checksum, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def _each(work: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`work` on every item, WORKERS at a time; results in the items' order, and the first item's failure (in
    that order) raised, so refusals name the same file whatever finished first."""
    if len(items) <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(WORKERS, len(items)), thread_name_prefix="s3store") as pool:
        return list(pool.map(work, items))


def _check_version(version: str) -> None:
    problem = version_problem(version)
    if problem is not None:
        raise ReleaseError(f"version: {problem}")


def _check_layout(manifest: ReleaseManifest) -> None:
    """An entry point is copied to `<prefix><path>`: it must not land on the pointer or inside releases/."""
    clashes = [p for p in entry_points(manifest) if p == POINTER or p.startswith(f"{RELEASES}/")]
    if clashes:
        raise ReleaseError(f"release {manifest.version}: {', '.join(clashes[:10])} would overwrite the S3 store's own "
                           f"{POINTER} or {RELEASES}/ at the front door; rename it in the build")


def _assets(manifest: ReleaseManifest) -> dict[str, str]:
    return {path: digest for path, digest in manifest.files.items() if is_asset(path)}


def _parse_manifest(version: str, raw: bytes) -> ReleaseManifest:
    """release.json's bytes, checked by release.read_manifest itself (on a private copy), so the S3 store and
    the directory store can never disagree on what a valid manifest is, nor word a refusal differently."""
    with tempfile.TemporaryDirectory(prefix="s3store-") as scratch:
        directory = release_dir(Path(scratch), version)
        directory.mkdir(parents=True)
        (directory / MANIFEST).write_bytes(raw)
        return read_manifest(directory)


class S3Store:
    """Frontend releases in `s3://<bucket>/<prefix>` (see the module docstring for the layout)."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = normalise_prefix(prefix)
        self.endpoint_url = endpoint_url
        config = Config(connect_timeout=CONNECT_TIMEOUT_SECONDS, read_timeout=READ_TIMEOUT_SECONDS,
                        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"}, max_pool_connections=WORKERS,
                        # An explicit endpoint is an S3-compatible service (MinIO, moto, a VPC endpoint by IP):
                        # path-style works on all of them, a virtual host `bucket.127.0.0.1` on none.
                        s3={"addressing_style": "path"} if endpoint_url else None)
        # Its own session: boto3's default session is shared module state, not safe to create clients from
        # in several threads at once (the activities run store methods in threads). The client itself is.
        self._client: Any = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    # -- where things are --------------------------------------------------------------------------

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _release_prefix(self, version: str) -> str:
        return f"{self.prefix}{RELEASES}/{version}/"

    def _release_location(self, version: str) -> str:
        return f"s3://{self.bucket}/{self._release_prefix(version)}"

    # -- S3, with every failure a ReleaseError -------------------------------------------------------

    @contextmanager
    def _s3(self, action: str, key: str) -> Iterator[None]:
        """Turn boto's failures into a ReleaseError naming the bucket and key (a missing object into _NotFound)."""
        where = f"s3://{self.bucket}/{key}"
        try:
            yield
        except ClientError as err:
            error = err.response.get("Error", {})
            code = str(error.get("Code", "")) or str(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))
            if code in _NOT_FOUND:
                raise _NotFound(key) from None
            if code in _PRECONDITION_FAILED:
                raise _Exists(key) from None
            if code == "NoSuchBucket":
                raise ReleaseError(f"S3 bucket {self.bucket} does not exist (store {self.location}, {action} {where})") from None
            if code in _REFUSED:
                raise ReleaseError(f"S3 refused {action} {where}: {code}; the credentials in use need access to "
                                   f"{self.location}") from None
            # Only the code and S3's message: never the request, whose headers carry the signature.
            raise ReleaseError(f"S3 {action} {where} failed: {code}: {error.get('Message', '')}".rstrip(": ")) from None
        except NoCredentialsError:
            raise ReleaseError(f"no AWS credentials for {self.location} ({action} {where}): boto3 found none in the "
                               "environment, the shared config or an instance role") from None
        except BotoCoreError as err:
            endpoint = self.endpoint_url or "AWS's S3 endpoint"
            raise ReleaseError(f"S3 unreachable for {action} {where} at {endpoint}: {err}") from None

    def _get(self, key: str) -> bytes | None:
        try:
            with self._s3("reading", key):
                body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
                try:
                    return bytes(body.read())
                finally:
                    body.close()  # not `with`: a StreamingBody's __enter__ hands out the raw urllib3 response
        except _NotFound:
            return None

    def _head(self, key: str) -> _Head | None:
        try:
            with self._s3("reading", key):
                head = self._client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except _NotFound:
            return None
        return _Head(content_type=head.get("ContentType"), cache_control=head.get("CacheControl"),
                     sha256=_hex_of(head.get("ChecksumSHA256")))

    def _download_sha256(self, key: str) -> str | None:
        """The object's bytes hashed here (None when it is not there): what verify trusts, not a stored checksum."""
        digest = hashlib.sha256()
        try:
            with self._s3("reading", key):
                body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
                try:
                    for chunk in body.iter_chunks(CHUNK):
                        digest.update(chunk)
                finally:
                    body.close()
        except _NotFound:
            return None
        return digest.hexdigest()

    def _sha256(self, key: str, head: _Head | None = None) -> str | None:
        """The object's sha256: S3's full-object checksum when it holds one (S3 computed it, or checked the
        one we sent, from the bytes), else the bytes downloaded and hashed. None when it is not there."""
        head = head or self._head(key)
        if head is None:
            return None
        return head.sha256 or self._download_sha256(key)

    def _keys(self, prefix: str) -> Iterator[str]:
        """Every key under `prefix`, page by page (a release can hold more than a listing's 1000)."""
        with self._s3("listing", prefix):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield str(item["Key"])

    def _children(self, prefix: str) -> Iterator[str]:
        """The names of the "folders" right under `prefix`."""
        with self._s3("listing", prefix):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    yield str(common["Prefix"])[len(prefix):].rstrip("/")

    def _put(self, key: str, body: Any, *, path: str, sha256_hex: str, create_only: bool = False) -> None:
        extra = {"IfNoneMatch": "*"} if create_only else {}
        with self._s3("writing", key):
            # The checksum is the manifest's: S3 refuses the upload (BadDigest) if the bytes that arrive are others.
            self._client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type(path),
                                    CacheControl=cache_control(path), ChecksumSHA256=_checksum_of(sha256_hex), **extra)

    def _copy(self, source_key: str, key: str, *, path: str, cache: str) -> None:
        with self._s3("copying to", key):
            # Server-side; REPLACE to set the headers the CDN forwards; SHA256 so S3 keeps a checksum of the bytes
            # it copied, which the switch compares against the manifest without downloading.
            self._client.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": source_key},
                                     MetadataDirective="REPLACE", ContentType=content_type(path), CacheControl=cache,
                                     ChecksumAlgorithm="SHA256")

    def _delete(self, keys: Iterable[str]) -> None:
        batch = list(keys)
        for start in range(0, len(batch), DELETE_BATCH):
            chunk = batch[start:start + DELETE_BATCH]
            with self._s3("deleting under", self.prefix):
                response = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True})
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise ReleaseError(f"S3 refused deleting s3://{self.bucket}/{first.get('Key')}: {first.get('Code')}: "
                                   f"{first.get('Message', '')} ({len(errors)} key(s) not deleted)")

    # -- manifests -------------------------------------------------------------------------------------

    def _stored_manifest(self, version: str) -> ReleaseManifest | None:
        """The release's manifest, checked; None when it has no release.json (absent, or still uploading)."""
        raw = self._get(f"{self._release_prefix(version)}{MANIFEST}")
        return None if raw is None else _parse_manifest(version, raw)

    def _releases(self) -> list[ReleaseManifest]:
        """Every complete release, oldest first."""
        found: list[ReleaseManifest] = []
        for name in self._children(f"{self.prefix}{RELEASES}/"):
            if version_problem(name) is not None:
                continue
            # S3 failing raises here: never mistaken for "no releases".
            raw = self._get(f"{self._release_prefix(name)}{MANIFEST}")
            if raw is None:
                continue  # an upload in progress (or an interrupted one) is no candidate
            try:
                found.append(_parse_manifest(name, raw))
            except ReleaseError:
                continue  # an invalid manifest: not a release, as in the directory store
        return sorted(found, key=lambda m: (m.created, m.version))

    # -- ReleaseStore ----------------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Every complete release (with a valid release.json), oldest first by the manifest's `created`."""
        return [manifest.version for manifest in self._releases()]

    def live(self) -> str | None:
        """The version current.json names; None when there is none, or it is not a pointer."""
        raw = self._get(f"{self.prefix}{POINTER}")
        if raw is None:
            return None
        try:
            pointer = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
        version = pointer.get("version") if isinstance(pointer, dict) else None
        return version if isinstance(version, str) and version_problem(version) is None else None

    def manifest(self, version: str) -> ReleaseManifest:
        _check_version(version)
        manifest = self._stored_manifest(version)
        if manifest is not None:
            return manifest
        if next(self._keys(self._release_prefix(version)), None) is not None:
            raise ReleaseError(f"release {version}: no {MANIFEST} ({self._release_location(version)}: an upload in progress, "
                               "or an interrupted one)")
        raise ReleaseError(f"release {version} does not exist ({self._release_location(version)})")

    def verify(self, version: str) -> ReleaseManifest:
        """Every object under releases/<version>/ downloaded and hashed against the manifest, which must name
        them all; and the release's assets already in the pool (what the CDN serves) must be the same bytes."""
        manifest = self.manifest(version)
        base = self._release_prefix(version)
        check_listing(manifest, {key[len(base):] for key in self._keys(base)})
        expected_files = sorted(manifest.files.items())
        actuals = _each(lambda item: self._download_sha256(f"{base}{item[0]}"), expected_files)
        for (relative, expected), actual in zip(expected_files, actuals, strict=True):
            if actual is None:
                raise ReleaseError(f"release {version}: missing {relative}")
            if actual != expected:
                raise ReleaseError(f"release {version}: {relative} has sha256 {actual[:12]}..., {MANIFEST} says {expected[:12]}...")
        self._pool_missing(manifest)  # refuses a pool asset with other bytes; a missing one the switch copies in
        return manifest

    def publish(self, source: Path) -> ReleaseManifest:
        """Upload the built release in `source`, verified first; its manifest last, create-only. The same release
        again writes nothing; a different one under the same version is refused."""
        manifest = verify_release(source)
        _check_layout(manifest)
        version = manifest.version
        existing = self._stored_manifest(version)
        if existing is not None:
            self._same_release(existing, manifest)
            self._copy_to_pool(version, self._pool_missing(existing))  # pruned by a racing retire: put back
            return manifest
        # Before any write: an asset whose name the pool holds with other bytes refuses the whole release.
        missing_in_pool = self._pool_missing(manifest)
        self._upload(source, manifest)
        self._copy_to_pool(version, missing_in_pool)
        manifest_key = f"{self._release_prefix(version)}{MANIFEST}"
        raw = (source / MANIFEST).read_bytes()
        try:
            # Create-only: two publishers of one version cannot both "win", and a retried PUT whose first
            # attempt landed is told so (412) rather than silently writing twice.
            self._put(manifest_key, raw, path=MANIFEST, sha256_hex=hashlib.sha256(raw).hexdigest(), create_only=True)
        except _Exists:
            stored = self._stored_manifest(version)
            if stored is None:  # there a moment ago, gone now: a retire ran in between
                raise ReleaseError(f"release {version}: {MANIFEST} appeared and vanished while publishing "
                                   f"({self._release_location(version)}); publish it again") from None
            self._same_release(stored, manifest)
        return manifest

    def switch(self, version: str) -> bool:
        """Make `version` live: its entry points copied to the front door, then current.json. False (no writes)
        when current.json names it and the front door already serves exactly its entry points. Does not verify
        the release (the caller does); refuses one that does not exist."""
        manifest = self.manifest(version)
        _check_layout(manifest)
        # A release whose pooled assets a retire pruned (racing its publish) gets them back before it serves.
        self._copy_to_pool(version, self._pool_missing(manifest))
        entries = entry_points(manifest)
        serving = _each(lambda path: self._serves(path, manifest.files[path]), entries)
        changed = [path for path, served in zip(entries, serving, strict=True) if not served]
        stale = self._stale_entry_points(manifest)
        pointer = {"version": version, "build": manifest.build}
        if not changed and not stale and self._pointer() == pointer:
            return False
        base = self._release_prefix(version)
        _each(lambda path: self._copy(f"{base}{path}", f"{self.prefix}{path}", path=path, cache=ENTRY_CACHE_CONTROL), changed)
        # Before the pointer, so that once it names this release the front door holds nothing of another.
        self._delete(f"{self.prefix}{path}" for path in stale)
        raw = json.dumps(pointer).encode()
        self._put(f"{self.prefix}{POINTER}", raw, path=POINTER, sha256_hex=hashlib.sha256(raw).hexdigest())
        return True

    def retire(self, *, keep: int, protect: set[str]) -> list[str]:
        """Remove all but the newest `keep` releases, never one in `protect` nor the live one, and the pool's
        assets that only removed releases listed. Returns the versions removed."""
        releases = self._releases()
        versions = [manifest.version for manifest in releases]
        kept = set(versions[-keep:]) if keep > 0 else set()
        live = self.live()
        removed = [m for m in releases if m.version not in kept and m.version not in protect and m.version != live]
        gone = {m.version for m in removed}
        retained_assets = {path for m in releases if m.version not in gone for path in _assets(m)}
        for manifest in removed:
            # Only assets a removed release listed, not every name no retained release lists: a release being
            # published has pooled its new assets before its release.json makes it one.
            self._delete(f"{self.prefix}{path}" for path in sorted(set(_assets(manifest)) - retained_assets))
            # release.json last: a retire cut short leaves a release that is still one (verify refuses it), and
            # running retire again finishes it, rather than leaving objects no listing of releases finds.
            base = self._release_prefix(manifest.version)
            self._delete(key for key in self._keys(base) if key != f"{base}{MANIFEST}")
            self._delete([f"{base}{MANIFEST}"])
        return [manifest.version for manifest in removed]

    # -- helpers of publish and switch -----------------------------------------------------------------

    def _same_release(self, existing: ReleaseManifest, manifest: ReleaseManifest) -> None:
        if existing.files != manifest.files or existing.build != manifest.build:
            raise ReleaseError(f"release {manifest.version} already exists with other content (build {existing.build}, "
                               f"{self._release_location(manifest.version)}); a release is immutable: publish it under a new version")

    def _upload(self, source: Path, manifest: ReleaseManifest) -> None:
        """Every file of the release under releases/<version>/, skipping those an interrupted run already put
        there with the right bytes, and dropping what it left that this release does not list."""
        base = self._release_prefix(manifest.version)
        present = {key[len(base):] for key in self._keys(base)}
        self._delete(f"{base}{path}" for path in sorted(present - set(manifest.files)))

        def upload(item: tuple[str, str]) -> None:
            path, digest = item
            key = f"{base}{path}"
            if path in present and self._sha256(key) == digest:
                return
            with (source / path).open("rb") as body:
                self._put(key, body, path=path, sha256_hex=digest)

        _each(upload, sorted(manifest.files.items()))

    def _pool_missing(self, manifest: ReleaseManifest) -> list[str]:
        """The release's assets the pool lacks; ReleaseError when the pool holds one of its names with other bytes."""
        pool = set(self._keys(f"{self.prefix}{ASSETS}/"))  # one listing, not a HEAD per asset the pool lacks
        assets = sorted(_assets(manifest).items())
        actuals = _each(lambda item: self._sha256(f"{self.prefix}{item[0]}") if f"{self.prefix}{item[0]}" in pool else None, assets)
        missing: list[str] = []
        for (path, expected), actual in zip(assets, actuals, strict=True):
            key = f"{self.prefix}{path}"
            if actual is None:
                missing.append(path)
            elif actual != expected:
                raise ReleaseError(f"release {manifest.version}: {path} has sha256 {expected[:12]}..., but s3://{self.bucket}/{key} "
                                   f"in the pool has {actual[:12]}...: a hashed asset's name must change with its content")
        return missing

    def _copy_to_pool(self, version: str, paths: list[str]) -> None:
        base = self._release_prefix(version)
        _each(lambda path: self._copy(f"{base}{path}", f"{self.prefix}{path}", path=path, cache=ASSET_CACHE_CONTROL), paths)

    def _serves(self, path: str, expected: str) -> bool:
        """The front door's copy of an entry point holds exactly these bytes, with the headers the switch sets."""
        key = f"{self.prefix}{path}"
        head = self._head(key)
        if head is None or head.content_type != content_type(path) or head.cache_control != ENTRY_CACHE_CONTROL:
            return False
        return self._sha256(key, head) == expected

    def _stale_entry_points(self, manifest: ReleaseManifest) -> list[str]:
        """Entry points of other releases, not of this one, still at the front door (a rollback from a release
        that added /about.html must not keep serving it). Only names some release lists: the store never
        deletes an object at the front door it cannot tell is its own."""
        own = set(entry_points(manifest))
        others = {path for other in self._releases() if other.version != manifest.version for path in entry_points(other)} - own
        return [path for path in sorted(others) if self._head(f"{self.prefix}{path}") is not None]

    def _pointer(self) -> object:
        raw = self._get(f"{self.prefix}{POINTER}")
        try:
            return None if raw is None else json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
