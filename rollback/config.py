"""rollback.yaml: environments, their targets, policies, and the RollbackConfig knobs.

Loading validates everything up front; an error names the file, the field path and
what is wrong, in one line, so a typo never surfaces half-way through a rollback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, Field, ValidationError, create_model, field_validator, model_validator

from rollback.models import EXECUTION_ORDER, RollbackTarget
from rollback.config_parts import Strict, TargetConfig
from rollback.targets.registry import BY_NAME, TARGETS
from rollback.monitoring import DEFAULT_RULES, MetricSpec, MonitorSettings, Rule


T = TypeVar("T", bound=TargetConfig)
ENVIRONMENT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class RollbackConfig(Strict):
    """Global knobs (the contract's fields, plus a few of ours)."""

    max_rollback_attempts: int = Field(default=3, ge=1, le=20)
    health_check_timeout: int = Field(default=300, ge=1, description="seconds a health validation may take")
    backup_retention_days: int = Field(default=30, ge=1)
    notification_channels: list[str] = Field(default_factory=lambda: ["slack", "email"])
    auto_rollback_enabled: bool = True
    cross_repo_coordination: bool = True
    lock_ttl_seconds: int = Field(default=3600, ge=10, description="lease of the deployment lock; renewed while a rollback runs")


class Policy(Strict):
    require_approval: bool = False
    approval_timeout_seconds: int = Field(default=1800, ge=1)
    on_approval_timeout: Literal["reject", "proceed"] = "reject"
    on_failure: Literal["compensate", "halt"] = "compensate"
    couple_frontend: bool = Field(default=False, description="a backend rollback that the live frontend does not fit takes the "
                                                             "frontend back to its newest retained release that fits")


# -- monitoring (HealthMonitorWorkflow) -------------------------------------------------

_SOURCE_NAME = r"^[A-Za-z0-9_-]+$"  # no dots: names become parts of gauge keys
_METRIC_NAME = r"^[A-Za-z0-9_:-]+$"  # no dots: dotted names are gauge keys
DEFAULT_PROMETHEUS_WINDOW_SECONDS = 300.0


def _http_url(url: str) -> str:
    """An absolute http(s) URL with a host and a valid port; a typo fails at load time, not at 3 a.m."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as err:
        raise ValueError(f"{url!r} is not a valid URL: {err}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise ValueError(f"{url!r} must be an absolute http:// or https:// URL with a host")
    return url


HttpUrl = Annotated[str, AfterValidator(_http_url)]


class Probe(Strict):
    """A synthetic HTTP probe: `requests` GETs at every collection, judged by status."""

    name: str = Field(min_length=1, max_length=64, pattern=_SOURCE_NAME)
    url: HttpUrl = Field(description="absolute http(s) URL")
    requests: int = Field(default=5, ge=1, le=100, description="requests per collection, sent concurrently")
    timeout_seconds: float = Field(default=2.0, gt=0, le=60, description="per request; a slower answer counts as a failure")
    expected_status: int = Field(default=200, ge=100, le=599)


class PrometheusSource(Strict):
    url: HttpUrl = Field(description="base URL; queries go to <url>/api/v1/query")
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)


class PostgresSource(Strict):
    dsn_env: str = Field(default="MONITOR_DATABASE_URL", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                         description="NAME of the environment variable holding the DSN (never the DSN itself)")
    timeout_seconds: float = Field(default=3.0, gt=0, le=60)
    long_query_seconds: float = Field(default=30.0, gt=0, description="an active query older than this counts as long-running")


class Dependency(Strict):
    """A named external dependency checked with one GET per collection."""

    name: str = Field(min_length=1, max_length=64, pattern=_SOURCE_NAME)
    url: HttpUrl
    timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    expected_status: int = Field(default=200, ge=100, le=599)


class MetricDefinition(Strict):
    """How a named metric is measured: from a probe's samples, or a PromQL query."""

    source: Literal["probe", "prometheus"]
    probe: str | None = Field(default=None, description="probe metrics: the probe's name")
    stat: Literal["error_ratio", "latency_p95_ms", "latency_p99_ms"] | None = Field(default=None, description="probe metrics")
    query: str | None = Field(default=None, min_length=1,
                              description="prometheus metrics: PromQL; `{window}` is replaced by the rule's window, e.g. 300s")

    @model_validator(mode="after")
    def _fields_of_source(self) -> "MetricDefinition":
        if self.source == "probe":
            if not self.probe or not self.stat:
                raise ValueError("a probe metric needs 'probe' and 'stat' (error_ratio, latency_p95_ms or latency_p99_ms)")
            if self.query is not None:
                raise ValueError("'query' is for prometheus metrics only")
        else:
            if not self.query:
                raise ValueError("a prometheus metric needs 'query'")
            if self.probe is not None or self.stat is not None:
                raise ValueError("'probe' and 'stat' are for probe metrics only")
        return self


HOST_GAUGES = ("host.cpu_percent", "host.memory_percent")
POSTGRES_GAUGES = ("postgres.connections_used_ratio", "postgres.probe_latency_ms",
                   "postgres.long_running_queries", "postgres.blocked_queries")


def dependency_gauges(name: str) -> tuple[str, str]:
    return f"dependency.{name}.up", f"dependency.{name}.latency_ms"


class Monitoring(Strict):
    """The `monitoring` block of an environment: sources, metrics and rules of its HealthMonitorWorkflow."""

    interval_seconds: float = Field(default=15, gt=0, le=3600)
    cooldown_minutes: float = Field(default=15, ge=0)
    consecutive_error_limit: int = Field(default=4, ge=1)
    targets: list[RollbackTarget] = Field(default_factory=lambda: [RollbackTarget.BACKEND], min_length=1,
                                          description="what a firing rule rolls back unless the rule says otherwise")
    rules: list[Rule] = Field(default_factory=lambda: list(DEFAULT_RULES))
    probes: list[Probe] = Field(default_factory=list)
    prometheus: PrometheusSource | None = None
    postgres: PostgresSource | None = None
    host: bool = Field(default=False, description="CPU and memory of the worker's host, from /proc")
    dependencies: list[Dependency] = Field(default_factory=list)
    metrics: dict[str, MetricDefinition] = Field(default_factory=dict)

    @field_validator("metrics")
    @classmethod
    def _metric_names(cls, metrics: dict[str, MetricDefinition]) -> dict[str, MetricDefinition]:
        for name in metrics:
            if not re.match(_METRIC_NAME, name) or len(name) > 100:
                raise ValueError(f"metric name {name!r} must match {_METRIC_NAME} (dotted names are reserved for "
                                 "gauges such as host.cpu_percent), at most 100 characters")
        return metrics

    @model_validator(mode="after")
    def _references(self) -> "Monitoring":
        for field, items in (("probes", self.probes), ("dependencies", self.dependencies), ("rules", self.rules)):
            names = [item.name for item in items]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"{field}: duplicate name(s) {', '.join(duplicates)}")
        probes = [p.name for p in self.probes]
        for name, definition in self.metrics.items():
            if definition.source == "probe" and definition.probe not in probes:
                raise ValueError(f"metrics.{name}.probe: probe {definition.probe!r} is not configured "
                                 f"(probes: {', '.join(probes) or 'none'})")
            if definition.source == "prometheus" and self.prometheus is None:
                raise ValueError(f"metrics.{name}: a prometheus metric needs the 'prometheus' source configured")
        known = set(self.all_metrics()) | set(self.gauge_keys())
        for index, rule in enumerate(self.rules):
            metric = rule.metric_name
            if metric in known:
                continue
            where = f"rules.{index} ({rule.name!r})" if "rules" in self.model_fields_set else f"default rule {rule.name!r}"
            raise ValueError(f"{where}: unknown metric {metric!r}; {_metric_hint(metric)}; "
                             f"known: {', '.join(sorted(known)) or 'none'}")
        return self

    def all_metrics(self) -> dict[str, MetricDefinition]:
        """The defined metrics plus the defaults the first probe provides (api_error_rate, response_time_p95)."""
        metrics = dict(self.metrics)
        if self.probes:
            first = self.probes[0].name
            metrics.setdefault("api_error_rate", MetricDefinition(source="probe", probe=first, stat="error_ratio"))
            metrics.setdefault("response_time_p95", MetricDefinition(source="probe", probe=first, stat="latency_p95_ms"))
        return metrics

    def gauge_keys(self) -> list[str]:
        """Every reading key the configured gauge sources produce at each collection."""
        keys: list[str] = []
        if self.postgres is not None:
            keys += POSTGRES_GAUGES
        if self.host:
            keys += HOST_GAUGES
        for dependency in self.dependencies:
            keys += dependency_gauges(dependency.name)
        return keys

    def settings(self, environment: str, auto_rollback_enabled: bool) -> MonitorSettings:
        """The monitor workflow's view: plain data, no URLs or credentials."""
        specs: list[MetricSpec] = []
        windows: dict[str, float] = {}
        for name, metric in self.all_metrics().items():
            if metric.source == "probe":
                assert metric.stat is not None  # a probe metric's stat is required (_fields_of_source)
                specs.append(MetricSpec(name=name, source="probe", probe=metric.probe, stat=metric.stat))
            else:
                specs.append(MetricSpec(name=name, source="prometheus", stat="last"))
                # One query per metric and collection: the widest window any rule needs.
                used = [r.window.total_seconds() for r in self.rules if r.metric_name == name]
                if used:
                    windows[name] = max(used)
        specs += [MetricSpec(name=key, source="gauge", stat="last") for key in self.gauge_keys()]
        return MonitorSettings(
            environment=environment, interval_seconds=self.interval_seconds, cooldown_minutes=self.cooldown_minutes,
            consecutive_error_limit=self.consecutive_error_limit, targets=list(self.targets),
            auto_rollback_enabled=auto_rollback_enabled, rules=list(self.rules), metrics=specs,
            prometheus_windows=windows,
        )


def _metric_hint(metric: str) -> str:
    if metric.startswith("postgres."):
        return f"postgres gauges need the 'postgres' source ({', '.join(POSTGRES_GAUGES)})"
    if metric.startswith("host."):
        return f"host gauges need 'host: true' ({', '.join(HOST_GAUGES)})"
    if metric.startswith("dependency."):
        return "dependency gauges are dependency.<name>.up and dependency.<name>.latency_ms of a configured dependency"
    if metric in ("api_error_rate", "response_time_p95"):
        return "define it under 'metrics' or configure a probe (the first probe provides it by default)"
    return "define it under 'metrics'"


class TargetsBase(Strict):
    """rollback.yaml's `targets`: one optional field per target the registry names, of its slice's config model."""

    def get(self, name: str) -> TargetConfig | None:
        """The configuration of target `name`, None when this environment does not configure it."""
        return getattr(self, name) if name in CONFIGURABLE_TARGETS else None

    def of(self, name: str, model: type[T]) -> T | None:
        """Target `name`'s configuration as its slice's model (what the slice's own code asks for)."""
        found = self.get(name)
        if found is not None and not isinstance(found, model):
            raise TypeError(f"targets.{name} is a {type(found).__name__}, not a {model.__name__}")
        return found

    def configured(self) -> list[str]:
        return [name for name in CONFIGURABLE_TARGETS if self.get(name) is not None]


if TYPE_CHECKING:
    Targets = TargetsBase
else:
    Targets = create_model("Targets", __base__=TargetsBase, **{t.name: (t.config | None, None) for t in TARGETS})


# The targets this version has a slice for (rollback/targets/registry.py), in execution order
# (frontend, backend, database).
CONFIGURABLE_TARGETS = tuple(t.value for t in EXECUTION_ORDER if t.value in BY_NAME)


class Environment(Strict):
    policy: Policy = Field(default_factory=Policy)
    targets: Targets
    monitoring: Monitoring | None = None

    @model_validator(mode="after")
    def _monitored_targets_exist(self) -> "Environment":
        # A monitor that fires a rollback of an unconfigured target would only fail later, mid-incident.
        if self.monitoring is None:
            return self
        configured = set(self.targets.configured()) | {RollbackTarget.FULL.value}
        wanted = [("monitoring.targets", t) for t in self.monitoring.targets]
        wanted += [(f"monitoring.rules ({r.name!r}).targets", t) for r in self.monitoring.rules for t in r.targets or []]
        for where, target in wanted:
            if target.value not in configured:
                raise ValueError(f"{where}: target {target.value!r} is not configured in this environment "
                                 f"(configured: {', '.join(sorted(configured - {'full'})) or 'none'})")
        return self


class AppConfig(Strict):
    state_dir: Path
    rollback: RollbackConfig = Field(default_factory=RollbackConfig)
    environments: dict[str, Environment]

    @field_validator("environments")
    @classmethod
    def _environment_names(cls, environments: dict[str, Environment]) -> dict[str, Environment]:
        # The same rule as RollbackRequest.environment, or no request could ever name it.
        for name in environments:
            if not ENVIRONMENT_NAME.match(name) or len(name) > 63:
                raise ValueError(f"environment name {name!r} must match {ENVIRONMENT_NAME.pattern}, at most 63 characters")
        return environments

    def environment(self, name: str) -> Environment:
        return self.environments[name]


class ConfigError(ValueError):
    """A configuration file is missing or invalid; the message says where and why."""


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def load_config(path: Path) -> AppConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (set ROLLBACK_CONFIG to your rollback.yaml)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        config = AppConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"{path}: {_location(first['loc'])}: {first['msg']}") from None
    return _resolve_paths(config, path.parent.resolve())


def _resolve_paths(config: AppConfig, base: Path) -> AppConfig:
    """Relative paths are relative to the config file, not to wherever the worker started."""
    raw = config.model_dump()
    raw["state_dir"] = base / config.state_dir
    for env in raw["environments"].values():
        for target in TARGETS:
            if part := env["targets"].get(target.name):
                target.config.resolve_paths(part, base=base, state_dir=raw["state_dir"])
    return AppConfig.model_validate(raw)


class ConfigSource:
    """The config file as the worker sees it: re-read when the file changes.

    Activities ask for the config on every call, so an operator's edit (a new
    instance, a changed policy) applies to the next activity without a restart.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._config: AppConfig | None = None

    def get(self) -> AppConfig:
        stat = self.path.stat() if self.path.exists() else None
        stamp = (stat.st_mtime, stat.st_size) if stat else None
        if self._config is None or stamp != self._stamp:
            self._config = load_config(self.path)
            self._stamp = stamp
        return self._config
