"""Fastly as a CDN tier: purge by surrogate key, with the `Fastly-Key` token.

The origin tags every entry point `Surrogate-Key: frontend-entry` (origin.py), so one key purge covers
them all, under every query string. One key: `POST /service/{id}/purge/{key}`; several: the bulk
`POST /service/{id}/purge` with `Surrogate-Key: k1 k2` (at most 256 keys a request). `Fastly-Soft-Purge: 1`
marks them stale instead of removing them. purge_everything is `POST /service/{id}/purge_all`, which
Fastly never does softly.
"""

from __future__ import annotations

from urllib.parse import quote

import httpx

from rollback.targets.frontend.cdn import CdnError, Progress, PurgeRequest, PurgeResult, counted
from rollback.targets.frontend.cdn.config import FastlyCdn
from rollback.targets.frontend.cdn.http_api import ApiClient

MAX_KEYS_PER_REQUEST = 256


def _message(answer: httpx.Response) -> str:
    body = answer.json()
    return " ".join(str(body[k]) for k in ("msg", "detail") if body.get(k)) if isinstance(body, dict) else ""


class FastlyProvider:
    name = "fastly"

    def __init__(self, config: FastlyCdn, *, token: str) -> None:
        self.config = config
        self._token = token

    def __repr__(self) -> str:  # never the token
        return f"FastlyProvider(service_id={self.config.service_id!r})"

    async def purge(self, request: PurgeRequest, progress: Progress) -> PurgeResult:
        config = self.config
        service = f"/service/{config.service_id}"
        what = f"service {config.service_id}"
        soft = {"Fastly-Soft-Purge": "1"} if config.soft else {}
        if not config.purge_everything and not request.paths:
            return PurgeResult(provider=self.name, calls=0, detail="nothing changed, nothing to purge")
        ids: list[str] = []
        async with ApiClient(provider=self.name, base_url=config.api_url, timeout=config.timeout_seconds,
                             headers={"Fastly-Key": self._token, "Accept": "application/json"}, secrets=(self._token,),
                             explain=_message) as api:
            if config.purge_everything:
                progress("fastly: purge all")
                answer = await api.send("POST", f"{service}/purge_all", what=what, progress=progress)
                _ok(answer, what)
                return PurgeResult(provider=self.name, purged=["*"], calls=api.calls, detail="purged everything")
            keys = list(dict.fromkeys(config.surrogate_keys))
            if len(keys) == 1:
                progress(f"fastly: purge key {keys[0]}")
                answer = await api.send("POST", f"{service}/purge/{quote(keys[0], safe='')}", what=what, headers=soft,
                                        progress=progress)
                ids.append(str(_ok(answer, what).get("id", "")))
            else:
                for start in range(0, len(keys), MAX_KEYS_PER_REQUEST):
                    batch = keys[start:start + MAX_KEYS_PER_REQUEST]
                    progress(f"fastly: purge {counted(len(batch), 'key')}")
                    answer = await api.send("POST", f"{service}/purge", what=what, headers={"Surrogate-Key": " ".join(batch), **soft},
                                            progress=progress)
                    answered = _ok(answer, what)
                    ids.extend(str(answered[key]) for key in batch if key in answered)
        done = f"{'soft-' if config.soft else ''}purged {counted(len(keys), 'surrogate key')}"
        return PurgeResult(provider=self.name, purged=keys, calls=api.calls, reference=", ".join(i for i in ids if i)[:300] or None,
                           detail=done)


def _ok(answer: httpx.Response, what: str) -> dict[str, object]:
    try:
        body = answer.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise CdnError(f"fastly: {what}: HTTP {answer.status_code} with a body that is not a JSON object", retryable=True)
    if "status" in body and body["status"] != "ok":
        raise CdnError(f"fastly: {what}: status {str(body['status'])[:100]!r}", retryable=True)
    return body
