"""The one place that turns a CDN tier's config into its provider, resolving its token from the environment.

Called by the activity, never by a workflow: the workflow carries the tier's index, the config names the
token's environment variable, and only here is the token read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from rollback.targets.frontend.cdn import CdnError, CdnProvider
from rollback.targets.frontend.cdn.cloudflare import CloudflareProvider
from rollback.targets.frontend.cdn.config import CdnConfig, CloudflareCdn, CloudFrontCdn, FastlyCdn, NoCdn, VarnishCdn
from rollback.targets.frontend.cdn.fastly import FastlyProvider
from rollback.targets.frontend.cdn.noop import NoopProvider
from rollback.targets.frontend.cdn.varnish import VarnishProvider


def _token(provider: str, name: str, environ: Mapping[str, str]) -> str:
    token = environ.get(name, "").strip()
    if not token:
        raise CdnError(f"{provider}: the environment variable {name} (token_env) is not set or empty: "
                       f"the worker needs the API token there", retryable=False)
    return token


def provider_for(config: CdnConfig, *, environ: Mapping[str, str] = os.environ) -> CdnProvider:
    if isinstance(config, NoCdn):
        return NoopProvider()
    if isinstance(config, VarnishCdn):
        return VarnishProvider(config)
    if isinstance(config, CloudflareCdn):
        return CloudflareProvider(config, token=_token(config.provider, config.token_env, environ))
    if isinstance(config, FastlyCdn):
        return FastlyProvider(config, token=_token(config.provider, config.token_env, environ))
    if isinstance(config, CloudFrontCdn):
        from rollback.targets.frontend.cdn.cloudfront import CloudFrontProvider  # boto3: only where CloudFront is configured

        return CloudFrontProvider(config)
    raise CdnError(f"no CDN provider for {type(config).__name__}", retryable=False)
