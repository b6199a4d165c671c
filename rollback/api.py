"""The inbound HTTP API (`rollback serve`): Alertmanager and pipeline triggers, start and inspect rollbacks.

Every endpoint authenticates before it parses the body: a bearer token, or for pipelines an
HMAC-SHA256 signature over a timestamp, the delivery id and the raw body (the way Slack and
Stripe sign webhooks: a signature of the body alone could be replayed under a new delivery
id, or days later). An endpoint whose secret is not set answers 503, so nothing is open by
default. Secrets are SecretStr: they never reach a response, a log line or a workflow input.

Bodies are read by hand (size-limited, after authentication) rather than by FastAPI's body
parameters, which would parse JSON before any dependency runs; the request schemas are
still published in the OpenAPI document (see `_install_openapi`). `_parse` turns every way a
body can fail to decode (too deep, a number too long to convert, NaN) into a 400.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from temporalio.service import RPCError, RPCStatusCode

from rollback.client import WORKFLOW_TYPE, RollbackError, RollbackOrchestrator, deploy_gate
from rollback.config import AppConfig, ConfigError, ConfigSource
from rollback.models import RollbackRequest, RollbackStatus, RollbackTarget, RollbackTrigger
from rollback.monitoring import TRIGGER_EVIDENCE_MAX_BYTES, TriggerRequest, json_size
from rollback.settings import config_path
from rollback.state import StateStore
from rollback.triggers import TriggerOutcome, route_trigger
from rollback.versions import version_problem

log = logging.getLogger("rollback.api")

MIN_SECRET_LENGTH = 16
STATUS_TIMEOUT_SECONDS = 10
SIGNATURE_PREFIX = "sha256="
# Pipelines sign b"v1:<X-Signature-Timestamp>:<X-Delivery-Id>:" + the raw body. The timestamp is unix
# seconds and the delivery id has no ':', so the three parts cannot be shifted into one another.
SIGNATURE_VERSION = "v1"
# A signed delivery is accepted this long either side of the server clock. A copy of it is refused
# after that, and before that its delivery id is still in the replay record (kept for a day, see
# rollback/state.TRIGGER_RETENTION), so it is a duplicate.
SIGNATURE_TOLERANCE_SECONDS = 300
TIMESTAMP_PATTERN = re.compile(r"[0-9]{1,12}")
DELIVERY_ID_PATTERN = re.compile(r"[\x21-\x39\x3b-\x7e]{1,150}")  # visible ASCII except ':'
# JSON nested deeper than this is refused: Python's parser raises RecursionError near 1,000 levels and
# pydantic cannot serialise a workflow input past ~250; no request of ours needs more than a handful.
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 4300  # Python's own limit for converting a decimal string (sys.get_int_max_str_digits)
SECRETS = {"token": "ROLLBACK_API_TOKEN", "alertmanager_token": "ROLLBACK_API_ALERTMANAGER_TOKEN",
           "pipeline_secret": "ROLLBACK_API_PIPELINE_SECRET"}


class ApiSettings(BaseSettings):
    """`ROLLBACK_API_*` environment variables. An unset or empty secret disables its endpoints (503)."""

    model_config = SettingsConfigDict(env_prefix="ROLLBACK_API_", extra="ignore", frozen=True)

    token: SecretStr | None = Field(default=None, description="bearer token for /v1/rollbacks")
    alertmanager_token: SecretStr | None = Field(default=None, description="bearer token Alertmanager sends")
    pipeline_secret: SecretStr | None = Field(default=None, description="HMAC-SHA256 key pipelines sign bodies with")
    max_body_bytes: int = Field(default=262144, ge=1024, le=16 * 1024 * 1024)
    config: Path = Field(default_factory=config_path, description="rollback.yaml (default: ROLLBACK_CONFIG)")

    @field_validator("token", "alertmanager_token", "pipeline_secret")
    @classmethod
    def _empty_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        return SecretStr(value.get_secret_value().strip())

    def problems(self) -> list[str]:
        """Weak secrets, named by their variable. Checked here, not in a validator, because
        pydantic's validation errors quote the input: the secret itself."""
        return [f"{variable} must be at least {MIN_SECRET_LENGTH} characters"
                for name, variable in SECRETS.items()
                if (secret := getattr(self, name)) is not None and len(secret.get_secret_value()) < MIN_SECRET_LENGTH]


def endpoint_summary(settings: ApiSettings) -> str:
    """Which endpoints are on, for the startup line (names variables, never values)."""
    parts = [f"{what} {'enabled' if getattr(settings, name) else f'disabled (set {SECRETS[name]})'}"
             for what, name in (("/v1/triggers/alertmanager", "alertmanager_token"),
                                ("/v1/triggers/pipeline", "pipeline_secret"), ("/v1/rollbacks and the gate", "token"))]
    return "; ".join(parts)


class SettingsError(ValueError):
    """The API's settings are unusable; the message names the variable, never its value."""


# -- request and response bodies ----------------------------------------------------------------

class Alert(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: Literal["firing", "resolved"]
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: datetime
    endsAt: datetime | None = None
    generatorURL: str = ""
    fingerprint: str = Field(min_length=1, max_length=128)


class AlertmanagerWebhook(BaseModel):
    """Alertmanager's webhook payload, version 4. Labels used: `environment` (on the alert or in
    commonLabels, required), `rollback_targets` (optional, comma-separated), `alertname`;
    annotation `summary`."""

    model_config = ConfigDict(extra="allow")

    version: Literal["4"]
    groupKey: str = ""
    truncatedAlerts: int = 0
    status: Literal["firing", "resolved"]
    receiver: str = ""
    groupLabels: dict[str, str] = Field(default_factory=dict)
    commonLabels: dict[str, str] = Field(default_factory=dict)
    commonAnnotations: dict[str, str] = Field(default_factory=dict)
    externalURL: str = ""
    alerts: list[Alert] = Field(max_length=1000)


class PipelineTrigger(BaseModel):
    """A deployment pipeline reports a failure. Headers: `X-Delivery-Id`, `X-Signature-Timestamp` (unix seconds) and
    `X-Signature-256: sha256=<hex HMAC-SHA256 of "v1:<timestamp>:<delivery id>:<raw body>">`."""

    model_config = ConfigDict(extra="forbid")

    environment: str = Field(min_length=1, max_length=63)
    targets: list[RollbackTarget] | None = Field(default=None, min_length=1, description="default: backend")
    reason: str = Field(min_length=1, max_length=1500)
    pipeline: str | None = Field(default=None, max_length=100)
    run_url: str | None = Field(default=None, max_length=500)
    commit: str | None = Field(default=None, max_length=64)
    require_approval: bool | None = Field(default=None, description="null: the environment's policy decides")

    @field_validator("targets")
    @classmethod
    def _targets(cls, targets: list[RollbackTarget] | None) -> list[RollbackTarget] | None:
        # The same rules as RollbackRequest, checked here so a bad body is a 422, not a failed start.
        if targets and RollbackTarget.FULL in targets and len(targets) > 1:
            raise ValueError("'full' cannot be combined with other targets")
        if targets and len(set(targets)) != len(targets):
            raise ValueError("targets must not repeat")
        return targets


class TriggerResult(BaseModel):
    environment: str
    keys: list[str] = Field(description="replay keys of this delivery")
    duplicate: bool = Field(description="every key was seen before: nothing was started or signalled")
    outcome: TriggerOutcome | None = None
    detail: str


class TriggerResponse(BaseModel):
    results: list[TriggerResult] = Field(default_factory=list)
    ignored_resolved: int = Field(default=0, description="resolved alerts, which never trigger anything")
    detail: str


class RollbackAccepted(BaseModel):
    execution_id: str
    environment: str
    status_url: str


class GateAnswer(BaseModel):
    environment: str
    target: str
    version: str
    allowed: bool
    reason: str | None = Field(default=None, description="why not: a rollback running, the lock held, the release rolled back from")


class ErrorBody(BaseModel):
    detail: str | list[dict[str, Any]]


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in {
        400: "body is not JSON (or nested too deeply, a number too large)",
        401: "missing or wrong credentials, or a stale signature timestamp; nothing was started",
        413: "body larger than ROLLBACK_API_MAX_BODY_BYTES", 422: "body does not match the schema (detail names the fields)",
        503: "endpoint not configured, or Temporal unreachable",
    }.items()
}


# -- security schemes (what /openapi.json and /docs show) -----------------------------------

api_bearer = HTTPBearer(auto_error=False, scheme_name="ApiToken", description="ROLLBACK_API_TOKEN")
alertmanager_bearer = HTTPBearer(auto_error=False, scheme_name="AlertmanagerToken",
                                 description="ROLLBACK_API_ALERTMANAGER_TOKEN (webhook_configs.http_config.authorization)")
pipeline_signature = APIKeyHeader(
    name="X-Signature-256", auto_error=False, scheme_name="PipelineSignature",
    description='sha256=<hex HMAC-SHA256 of "v1:<X-Signature-Timestamp>:<X-Delivery-Id>:<raw body>", keyed with '
                f"ROLLBACK_API_PIPELINE_SECRET>; the timestamp (unix seconds) must be within {SIGNATURE_TOLERANCE_SECONDS} s "
                "of the server clock")


# -- helpers ---------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def _unauthorized(detail: str, *, bearer: bool) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"} if bearer else None)


def _check_bearer(secret: SecretStr | None, credentials: HTTPAuthorizationCredentials | None, variable: str) -> None:
    if secret is None:
        raise HTTPException(503, f"not configured: set {variable} to enable this endpoint")
    if credentials is None:
        raise _unauthorized("missing bearer token", bearer=True)
    if not hmac.compare_digest(credentials.credentials.encode(), secret.get_secret_value().encode()):
        raise _unauthorized("invalid bearer token", bearer=True)


def _signed_message(timestamp: str, delivery_id: str, body: bytes) -> bytes:
    """The exact bytes a pipeline signs (docs/http-api.md shows the openssl command)."""
    return f"{SIGNATURE_VERSION}:{timestamp}:{delivery_id}:".encode() + body


def _check_signature(secret: SecretStr, message: bytes, signature: str) -> None:
    expected = SIGNATURE_PREFIX + hmac.new(secret.get_secret_value().encode(), message, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.strip().lower().encode("utf-8", "replace")):
        raise _unauthorized('X-Signature-256 does not match (expected sha256=<hex HMAC-SHA256 of '
                            '"v1:<X-Signature-Timestamp>:<X-Delivery-Id>:<raw body>">)', bearer=False)


def _check_fresh(timestamp: str) -> None:
    skew = int(timestamp) - int(time.time())
    if abs(skew) > SIGNATURE_TOLERANCE_SECONDS:
        when = "ahead of" if skew > 0 else "behind"
        raise _unauthorized(f"X-Signature-Timestamp is {abs(skew)} s {when} the server clock; allowed: "
                            f"{SIGNATURE_TOLERANCE_SECONDS} s (sign each delivery when sending it)", bearer=False)


async def _read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused as soon as it is known to exceed `limit` (declared or actually sent)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        # Not str.isdigit(): that accepts '²', which int() refuses; and a bounded length for int().
        if not re.fullmatch(r"[0-9]{1,20}", declared):
            raise HTTPException(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise HTTPException(413, f"body exceeds the limit of {limit} bytes")
    return bytes(body)


def _parse(body: bytes, model: type[M]) -> M:
    if not body.strip():
        raise HTTPException(400, "empty body: expected a JSON object")
    try:
        data = json.loads(body, parse_int=_int, parse_float=_float, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HTTPException(400, f"body is not valid JSON: {err}") from None
    except RecursionError:
        raise HTTPException(400, f"body is not valid JSON: nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise HTTPException(400, f"body is not valid JSON: nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors()]) from None


# Hooks of json.loads for numbers: what Python's parser would turn into a ValueError (an integer of more
# than 4,300 digits, CVE-2020-10735) or silently into inf or NaN, which JSON has not and Temporal's
# payloads cannot carry, becomes one clear 400.

def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise HTTPException(400, f"body is not valid JSON: number too large (an integer of {len(text)} digits; "
                                 f"at most {MAX_INT_DIGITS})")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise HTTPException(400, "body is not valid JSON: number too large (beyond a 64-bit float)")
    return value


def _no_constant(name: str) -> Any:
    raise HTTPException(400, f"body is not valid JSON: NaN and Infinity are not JSON numbers (found {name})")


def _depth(data: Any) -> int:
    """How deeply arrays and objects nest (iterative: the data may be close to the recursion limit)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _invalid(loc: Sequence[str | int], message: str, kind: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": tuple(loc), "msg": message}])


def _unknown_environment(config: AppConfig, environment: str, loc: Sequence[str | int]) -> RequestValidationError | None:
    if environment in config.environments:
        return None
    return _invalid(loc, f"unknown environment {environment!r}; configured: {', '.join(sorted(config.environments))}",
                    "unknown_environment")


def _alert_key(alert: Alert) -> str:
    # Normalised, so Alertmanager's nanoseconds and an API client's milliseconds name the same alert.
    starts = alert.startsAt if alert.startsAt.tzinfo else alert.startsAt.replace(tzinfo=timezone.utc)
    return f"alertmanager:{alert.fingerprint}:{starts.astimezone(timezone.utc).isoformat()}"


@dataclass
class _AlertGroup:
    environment: str
    alerts: list[Alert] = field(default_factory=list)
    targets: list[RollbackTarget] = field(default_factory=list)


def _group_alerts(payload: AlertmanagerWebhook, config: AppConfig) -> list[_AlertGroup]:
    """Firing alerts by environment; every problem with any alert is reported before anything starts."""
    groups: dict[str, _AlertGroup] = {}
    errors: list[dict[str, Any]] = []
    for index, alert in enumerate(payload.alerts):
        if alert.status != "firing":
            continue
        loc = ("body", "alerts", index, "labels")
        environment = alert.labels.get("environment") or payload.commonLabels.get("environment")
        if not environment:
            errors.append({"type": "missing", "loc": (*loc, "environment"),
                           "msg": "label 'environment' is required (on the alert or in commonLabels)"})
            continue
        if (problem := _unknown_environment(config, environment, (*loc, "environment"))) is not None:
            errors.extend(problem.errors())
            continue
        try:
            targets = _label_targets(alert.labels.get("rollback_targets", ""))
        except ValueError as err:
            errors.append({"type": "value_error", "loc": (*loc, "rollback_targets"), "msg": str(err)})
            continue
        group = groups.setdefault(environment, _AlertGroup(environment))
        group.alerts.append(alert)
        group.targets += [t for t in targets if t not in group.targets]
    if errors:
        raise RequestValidationError(errors)
    for group in groups.values():
        if RollbackTarget.FULL in group.targets:
            group.targets = [RollbackTarget.FULL]
    return list(groups.values())


def _label_targets(raw: str) -> list[RollbackTarget]:
    names = [part.strip() for part in raw.split(",") if part.strip()]
    allowed = ", ".join(t.value for t in RollbackTarget)
    unknown = [name for name in names if name not in {t.value for t in RollbackTarget}]
    if unknown:
        raise ValueError(f"unknown target(s) {', '.join(map(repr, unknown))} in label rollback_targets; use {allowed}")
    return [RollbackTarget(name) for name in names]


def _alerts_reason(alerts: list[Alert]) -> str:
    parts = []
    for alert in alerts:
        name = alert.labels.get("alertname", "unnamed alert")
        summary = alert.annotations.get("summary") or alert.annotations.get("description") or ""
        parts.append(f"{name}: {summary}" if summary else name)
    return ("Alertmanager: " + "; ".join(dict.fromkeys(parts)))[:2000]


# What a trigger's evidence keeps of its alerts: enough for a person to see which fired and why, bounded
# whatever Alertmanager sends (1,000 alerts with long labels are megabytes) because it travels in workflow
# inputs and the monitor's state. Alerts past the byte bound are counted, not kept.
EVIDENCE_ALERTS = 20
EVIDENCE_LABELS = 20
EVIDENCE_TEXT = 200  # characters of a label value, a summary, a URL
EVIDENCE_NAME = 100  # characters of a label name
EVIDENCE_ALERTS_BYTES = TRIGGER_EVIDENCE_MAX_BYTES - 1024  # room for the other fields: never cut again


def _alerts_evidence(payload: AlertmanagerWebhook, alerts: list[Alert]) -> dict[str, Any]:
    kept: list[dict[str, Any]] = []
    size = 0
    for a in alerts[:EVIDENCE_ALERTS]:
        entry = {"alertname": (a.labels.get("alertname") or "")[:EVIDENCE_TEXT], "fingerprint": a.fingerprint,
                 "startsAt": a.startsAt.isoformat(), "generatorURL": a.generatorURL[:EVIDENCE_TEXT],
                 "labels": {k[:EVIDENCE_NAME]: v[:EVIDENCE_TEXT] for k, v in list(a.labels.items())[:EVIDENCE_LABELS]},
                 "summary": (a.annotations.get("summary") or "")[:EVIDENCE_TEXT]}
        size += json_size(entry) + 1
        if size > EVIDENCE_ALERTS_BYTES:
            break
        kept.append(entry)
    return {"source": "alertmanager", "externalURL": payload.externalURL[:EVIDENCE_TEXT],
            "groupKey": payload.groupKey[:EVIDENCE_TEXT], "alerts_total": len(alerts),
            "alerts_omitted": len(alerts) - len(kept), "alerts": kept}


def _pipeline_reason(trigger: PipelineTrigger) -> str:
    where = ", ".join(part for part in (f"commit {trigger.commit}" if trigger.commit else "", trigger.run_url or "") if part)
    return f"pipeline {trigger.pipeline or 'unknown'}: {trigger.reason}" + (f" ({where})" if where else "")


# -- the endpoints -------------------------------------------------------------------------

class _Endpoints:
    def __init__(self, settings: ApiSettings, source: ConfigSource, orchestrator: RollbackOrchestrator) -> None:
        self.settings = settings
        self.source = source
        self.orchestrator = orchestrator
        # One trigger at a time per environment in this process, so that two copies of one
        # delivery arriving together cannot both pass the replay check.
        self._locks: dict[str, asyncio.Lock] = {}

    # authentication: dependencies, so they run before the handler reads anything

    async def api_token(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(api_bearer)]) -> None:
        _check_bearer(self.settings.token, credentials, SECRETS["token"])

    async def alertmanager_token(self, credentials: Annotated[HTTPAuthorizationCredentials | None,
                                                              Depends(alertmanager_bearer)]) -> None:
        _check_bearer(self.settings.alertmanager_token, credentials, SECRETS["alertmanager_token"])

    def config(self) -> AppConfig:
        try:
            return self.source.get()
        except ConfigError as err:
            raise HTTPException(503, f"configuration unavailable: {err}") from None

    async def _route_once(self, config: AppConfig, environment: str, keys: list[str],
                          request: TriggerRequest, source: str) -> TriggerResult:
        """Route a trigger unless every key was seen; record the keys only once it was routed,
        so a delivery that failed half-way (Temporal down) is not lost to its retry."""
        store = StateStore(config.state_dir)
        async with self._locks.setdefault(environment, asyncio.Lock()):
            seen = set(await asyncio.to_thread(store.triggers_seen, environment, source, keys))
            if len(seen) == len(keys):
                return TriggerResult(environment=environment, keys=keys, duplicate=True,
                                     detail="already received: nothing started")
            new = [key for key in keys if key not in seen]
            outcome = await route_trigger(self.orchestrator, environment, request.model_copy(update={"key": new[0][:200]}))
            await asyncio.to_thread(store.record_triggers, environment, source, new)
        log.info("%s trigger for %s (%d new key(s)): %s", source, environment, len(new), outcome.detail)
        return TriggerResult(environment=environment, keys=keys, duplicate=False, outcome=outcome, detail=outcome.detail)

    async def alertmanager(self, request: Request) -> TriggerResponse:
        payload = _parse(await _read_body(request, self.settings.max_body_bytes), AlertmanagerWebhook)
        config = self.config()
        groups = _group_alerts(payload, config)
        resolved = sum(alert.status != "firing" for alert in payload.alerts)
        results = []
        for group in groups:
            trigger = TriggerRequest(reason=_alerts_reason(group.alerts), trigger=RollbackTrigger.EXTERNAL,
                                     initiated_by="alertmanager", targets=group.targets or None,
                                     evidence=_alerts_evidence(payload, group.alerts))
            keys = list(dict.fromkeys(_alert_key(alert) for alert in group.alerts))
            results.append(await self._route_once(config, group.environment, keys, trigger, "alertmanager"))
        detail = f"{len(results)} environment(s)" if results else "no firing alerts: nothing to do"
        return TriggerResponse(results=results, ignored_resolved=resolved, detail=detail)

    async def pipeline(
        self, request: Request,
        delivery_id: Annotated[str | None, Header(
            alias="X-Delivery-Id", description="unique per delivery, the same when it is retried (1 to 150 visible ASCII "
                                               "characters, no ':'); signed; replays are ignored")] = None,
        timestamp: Annotated[str | None, Header(
            alias="X-Signature-Timestamp", description=f"unix seconds when the delivery was signed; within "
                                                       f"{SIGNATURE_TOLERANCE_SECONDS} s of the server clock")] = None,
        signature: Annotated[str | None, Depends(pipeline_signature)] = None,
    ) -> TriggerResponse:
        secret = self.settings.pipeline_secret
        if secret is None:
            raise HTTPException(503, f"not configured: set {SECRETS['pipeline_secret']} to enable this endpoint")
        body = await _read_body(request, self.settings.max_body_bytes)
        if not signature:
            raise _unauthorized("missing X-Signature-256 header", bearer=False)
        if not timestamp:
            raise _unauthorized("missing X-Signature-Timestamp header (unix seconds, signed with the delivery id and the body)",
                                bearer=False)
        if not TIMESTAMP_PATTERN.fullmatch(timestamp):
            raise _unauthorized("X-Signature-Timestamp must be unix seconds (digits only)", bearer=False)
        if not delivery_id or not DELIVERY_ID_PATTERN.fullmatch(delivery_id):
            raise _invalid(("header", "X-Delivery-Id"), "header X-Delivery-Id is required: 1 to 150 visible ASCII characters "
                           "without ':', unique per delivery", "missing" if not delivery_id else "value_error")
        _check_signature(secret, _signed_message(timestamp, delivery_id, body), signature)
        _check_fresh(timestamp)
        report = _parse(body, PipelineTrigger)
        config = self.config()
        if (problem := _unknown_environment(config, report.environment, ("body", "environment"))) is not None:
            raise problem
        pipeline = report.pipeline or "unknown"
        trigger = TriggerRequest(
            reason=_pipeline_reason(report)[:2000], trigger=RollbackTrigger.EXTERNAL, initiated_by=f"pipeline:{pipeline}"[:200],
            targets=report.targets, require_approval=report.require_approval,
            evidence={"source": "pipeline", "pipeline": pipeline, "run_url": report.run_url, "commit": report.commit,
                      "delivery_id": delivery_id})
        result = await self._route_once(config, report.environment, [f"pipeline:{delivery_id}"], trigger, "pipeline")
        return TriggerResponse(results=[result], detail=result.detail)

    async def start_rollback(self, request: Request, response: Response) -> RollbackAccepted:
        rollback = _parse(await _read_body(request, self.settings.max_body_bytes), RollbackRequest)
        if (problem := _unknown_environment(self.config(), rollback.environment, ("body", "environment"))) is not None:
            raise problem
        running = await self.orchestrator.running_rollback(rollback.environment)
        if running:
            raise HTTPException(409, f"a rollback is already running for {rollback.environment}: {running}")
        try:
            started = await self.orchestrator.start(rollback)
        except RollbackError as err:
            raise HTTPException(409, str(err)) from None
        log.info("rollback %s started over the API for %s", started.execution_id, rollback.environment)
        url = f"/v1/rollbacks/{started.execution_id}"
        response.headers["Location"] = url
        return RollbackAccepted(execution_id=started.execution_id, environment=started.environment, status_url=url)

    async def gate(self, environment: str, target: str, version: str) -> JSONResponse:
        """The deployment gate: 200 `allowed`, 409 refused with the reason (what `rollback gate` prints)."""
        config = self.config()
        if (problem := _unknown_environment(config, environment, ("path", "environment"))) is not None:
            raise problem
        configured = config.environment(environment).targets.configured()
        if target not in configured:
            raise _invalid(("query", "target"), f"{target!r} is not configured for {environment} (configured: {', '.join(configured)})")
        if (problem_text := version_problem(version)) is not None:
            raise _invalid(("query", "version"), problem_text)
        refusal = await deploy_gate(self.orchestrator, StateStore(config.state_dir), environment, target, version)
        return JSONResponse(status_code=200 if refusal is None else 409, content=GateAnswer(
            environment=environment, target=target, version=version, allowed=refusal is None, reason=refusal).model_dump())

    async def rollback_status(self, execution_id: str) -> RollbackStatus:
        if len(execution_id) > 255:
            raise HTTPException(404, "no such rollback")
        handle = (await self.orchestrator.client()).get_workflow_handle(execution_id)
        try:
            described = await handle.describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                raise HTTPException(404, f"no rollback named {execution_id!r}") from None
            raise
        if described.workflow_type != WORKFLOW_TYPE:
            raise HTTPException(404, f"{execution_id!r} is not a rollback")
        try:
            return await asyncio.wait_for(self.orchestrator.get_rollback_status(execution_id), STATUS_TIMEOUT_SECONDS)
        except TimeoutError:
            raise HTTPException(504, f"status query of {execution_id} timed out; is a worker running?") from None


# -- the application -----------------------------------------------------------------------

def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _install_openapi(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """FastAPI's schema plus the request bodies the handlers read by hand."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, openapi_version=app.openapi_version,
                                 description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, nested in definition.pop("$defs", {}).items():
                    components.setdefault(name, nested)
                components.setdefault(model.__name__, definition)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON {"detail": ...}; validation errors name fields but never echo input."""

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [{"type": e.get("type", "value_error"), "loc": list(e.get("loc", ())), "msg": e.get("msg", "")}
                  for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    async def temporal_down(_: Request, exc: Exception) -> JSONResponse:
        message = exc.message if isinstance(exc, RPCError) else str(exc)
        log.warning("Temporal unavailable: %s", message)
        return JSONResponse({"detail": f"Temporal unavailable: {message}"}, status_code=503)

    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s", type(exc).__name__, exc_info=exc)
        return JSONResponse({"detail": "internal error; see the server log"}, status_code=500)

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(RPCError, temporal_down)
    app.add_exception_handler(RollbackError, temporal_down)
    app.add_exception_handler(Exception, internal)


def create_app(*, settings: ApiSettings, orchestrator: RollbackOrchestrator | None = None) -> FastAPI:
    """The API. Raises SettingsError or ConfigError at once if the settings or rollback.yaml are bad."""
    if problems := settings.problems():
        raise SettingsError("; ".join(problems))
    source = ConfigSource(settings.config)
    source.get()
    endpoints = _Endpoints(settings, source, orchestrator or RollbackOrchestrator())
    app = FastAPI(title="Rollback orchestrator", version="1",
                  description="Trigger, start and inspect rollbacks. Each endpoint answers 503 until its secret is set.")
    _install_error_handlers(app)
    app.add_api_route(
        "/v1/triggers/alertmanager", endpoints.alertmanager, methods=["POST"], response_model=TriggerResponse,
        dependencies=[Depends(endpoints.alertmanager_token)], responses=ERRORS, openapi_extra=_body(AlertmanagerWebhook),
        summary="Alertmanager webhook (payload version 4): firing alerts start or signal a rollback per environment",
        tags=["triggers"])
    app.add_api_route(
        "/v1/triggers/pipeline", endpoints.pipeline, methods=["POST"], response_model=TriggerResponse,
        responses=ERRORS, openapi_extra=_body(PipelineTrigger), tags=["triggers"],
        summary="A deployment pipeline reports a failure (HMAC-SHA256 signed, one delivery id per delivery)")
    app.add_api_route(
        "/v1/rollbacks", endpoints.start_rollback, methods=["POST"], status_code=202, response_model=RollbackAccepted,
        dependencies=[Depends(endpoints.api_token)], openapi_extra=_body(RollbackRequest), tags=["rollbacks"],
        responses={**ERRORS, 409: {"model": ErrorBody, "description": "a rollback is already running (detail names it)"}},
        summary="Start a rollback (RollbackRequest, as for `temporal workflow start`)")
    app.add_api_route(
        "/v1/rollbacks/{execution_id}", endpoints.rollback_status, methods=["GET"], response_model=RollbackStatus,
        dependencies=[Depends(endpoints.api_token)], tags=["rollbacks"],
        responses={**ERRORS, 404: {"model": ErrorBody, "description": "no such rollback"},
                   504: {"model": ErrorBody, "description": "the status query timed out"}},
        summary="A rollback's phase, plan, steps and approval")
    app.add_api_route(
        "/v1/environments/{environment}/gate", endpoints.gate, methods=["GET"], response_model=GateAnswer,
        dependencies=[Depends(endpoints.api_token)], tags=["deployments"],
        responses={**ERRORS, 409: {"model": GateAnswer, "description": "refused: the reason says why"}},
        summary="May a pipeline deploy `version` of `target` now? (`rollback gate`)")
    _install_openapi(app, [AlertmanagerWebhook, PipelineTrigger, RollbackRequest])
    return app
