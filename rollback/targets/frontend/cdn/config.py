"""rollback.yaml's CDN tiers of the frontend target (`targets.frontend.cdn: [...]`), one model per provider,
told apart by `provider`.

Tokens are never in the config: a model names the environment variable that holds one (`token_env`),
and the activity resolves it (factory.py). CloudFront takes boto3's default credential chain.

Pure pydantic: the registry (and so the workflows) import the target's config model.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from rollback.config_parts import ENV_NAME, Strict
from rollback.targets.frontend.origin import ENTRY_SURROGATE_KEY

# Ids become a segment of an API path: letters, digits, '-' and '_' only, so none can reach another path.
API_ID = r"^[A-Za-z0-9_-]{1,64}$"


def _base_url(value: str, *, path_allowed: bool = False) -> str:
    """An http(s) URL without a trailing slash (paths are appended to it)."""
    if not value.startswith(("http://", "https://")) or len(value.split("://", 1)[1].strip("/")) == 0:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    if any(c.isspace() for c in value) or "?" in value or "#" in value:
        raise ValueError(f"{value!r}: no whitespace, query or fragment")
    value = value.rstrip("/")
    if not path_allowed and "/" in value.split("://", 1)[1]:
        raise ValueError(f"{value!r}: scheme, host and port only, no path")
    return value


class CdnTier(Strict):
    """What every provider's model has."""

    purge_everything: bool = Field(default=False, description="purge all instead of the changed paths")
    timeout_seconds: float = Field(default=10, gt=0, le=300, description="per HTTP call")


class NoCdn(CdnTier):
    """No CDN in front of the origin: nothing to purge."""

    provider: Literal["none"] = "none"


class VarnishCdn(CdnTier):
    """A Varnish running rollback/targets/frontend/varnish_vcl.py's VCL (or any VCL that accepts BAN or PURGE)."""

    provider: Literal["varnish"] = "varnish"
    url: str = Field(description="Varnish's HTTP address, e.g. http://127.0.0.1:8088")
    method: Literal["BAN", "PURGE"] = Field(default="BAN", description="BAN: every query and deployment-id variant of a path; "
                                            "PURGE: the one object at the URL, for a VCL that implements only PURGE")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _base_url(value, path_allowed=True)


class CloudflareCdn(CdnTier):
    provider: Literal["cloudflare"] = "cloudflare"
    zone_id: str = Field(pattern=API_ID)
    token_env: str = Field(pattern=ENV_NAME, description="NAME of the environment variable holding the API token")
    api_url: str = "https://api.cloudflare.com"
    site_url: str = Field(description="the site's origin as users reach it, e.g. https://www.example.com (files are full URLs)")
    purge_by: Literal["files", "prefixes", "tags"] = "files"
    tags: list[Annotated[str, Field(min_length=1, max_length=1024)]] = Field(
        default_factory=list, description="cache tags (the Cache-Tag response header) to purge, for purge_by: tags")

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        return _base_url(value, path_allowed=True)

    @field_validator("site_url")
    @classmethod
    def _site_url(cls, value: str) -> str:
        return _base_url(value)

    @model_validator(mode="after")
    def _tags_for_tags(self) -> CloudflareCdn:
        if self.purge_by == "tags" and not self.tags and not self.purge_everything:
            raise ValueError("purge_by: tags needs at least one entry in `tags`")
        return self


class FastlyCdn(CdnTier):
    provider: Literal["fastly"] = "fastly"
    service_id: str = Field(pattern=API_ID)
    token_env: str = Field(pattern=ENV_NAME, description="NAME of the environment variable holding the API token")
    api_url: str = "https://api.fastly.com"
    # The origin tags every entry point with this key (origin.py): one purge covers them all, with any query string.
    surrogate_keys: list[Annotated[str, Field(pattern=r"^[^\s]{1,1024}$")]] = Field(
        default_factory=lambda: [ENTRY_SURROGATE_KEY], min_length=1)
    soft: bool = Field(default=False, description="Fastly-Soft-Purge: mark stale instead of removing (purge_all is never soft)")

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        return _base_url(value, path_allowed=True)


class CloudFrontCdn(CdnTier):
    """Credentials from boto3's default chain (AWS_ACCESS_KEY_ID ..., a profile, an instance role), never here."""

    provider: Literal["cloudfront"] = "cloudfront"
    distribution_id: str = Field(pattern=API_ID)
    endpoint_url: str | None = Field(default=None, description="another CloudFront endpoint (moto in the tests); default AWS")
    region: str | None = None
    poll_seconds: float = Field(default=5, gt=0, le=60)
    # Within one attempt of the purge step (10 minutes): a retried attempt finds the same invalidation
    # by its CallerReference and waits on.
    wait_seconds: int = Field(default=480, ge=1, le=540, description="give up waiting for the invalidation to be Completed (retryable)")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return None if value is None else _base_url(value, path_allowed=True)


CdnConfig = Annotated[Union[NoCdn, VarnishCdn, CloudflareCdn, FastlyCdn, CloudFrontCdn], Field(discriminator="provider")]

__all__ = ["CdnConfig", "CdnTier", "CloudFrontCdn", "CloudflareCdn", "FastlyCdn", "NoCdn", "VarnishCdn"]
