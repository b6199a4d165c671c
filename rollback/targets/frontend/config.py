"""rollback.yaml's `targets.frontend`: static releases in a store, served by an origin behind CDN tiers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field

from rollback.config_parts import HealthCheck, Strict, TargetConfig
from rollback.targets.frontend.cdn.config import CdnConfig
from rollback.targets.frontend.store import DirectoryStore, ReleaseStore


class DirectoryStoreConfig(Strict):
    """Releases on the origin host (rollback/targets/frontend/store.py); the web server serves `<root>/current`."""

    kind: Literal["directory"] = "directory"
    root: Path = Field(description="holds releases/<version>/, the `current` link and the asset pool")

    def open(self) -> ReleaseStore:
        return DirectoryStore(self.root)


class S3StoreConfig(Strict):
    """Releases under an S3 bucket prefix (rollback/targets/frontend/s3store.py); credentials from boto3's chain."""

    kind: Literal["s3"]
    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = ""
    endpoint_url: str | None = Field(default=None, description="an S3-compatible endpoint; default AWS")
    region: str | None = None

    def open(self) -> ReleaseStore:
        from rollback.targets.frontend.s3store import S3Store  # boto3: only where an S3 store is configured

        return S3Store(self.bucket, self.prefix, endpoint_url=self.endpoint_url, region=self.region)


StoreConfig = Annotated[Union[DirectoryStoreConfig, S3StoreConfig], Field(discriminator="kind")]


class FrontendTarget(TargetConfig):
    store: StoreConfig
    front_url: str = Field(description="what users reach (the CDN, or Varnish): a switch succeeds once it serves the build")
    version_path: str = Field(default="/version.json", description='answers {"version": ..., "build": ...} of the live release')
    cdn: list[CdnConfig] = Field(default_factory=list, description="tiers purged after a switch, nearest the origin first")
    keep_releases: int = Field(default=5, ge=1, description="retention: the newest N, plus the live and known-good ones")
    switch_samples: int = Field(default=5, ge=1, le=1000, description="consecutive answers of the new build that make a switch done")
    switch_timeout_seconds: float = Field(default=30, gt=0)
    health: HealthCheck = Field(default_factory=lambda: HealthCheck(path="/"))
    check_assets: int = Field(default=20, ge=0, le=10000, description="validation fetches up to N of the release's files through the front door")

    @classmethod
    def resolve_paths(cls, raw: dict[str, Any], *, base: Path, state_dir: Path) -> None:
        store = raw["store"]
        if store.get("kind", "directory") == "directory":
            store["root"] = base / store["root"]
