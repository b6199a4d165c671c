"""Does a frontend release work against a backend release? Its manifest's `api` (the operations it calls)
against the backend's OpenAPI document, and its declared backend range against the backend's version.

Pure: the planner runs it on what the activities fetched. An operation matches a path of the document
when the templates are the same once parameter names are ignored (`/items/{id}` = `/items/{itemId}`),
and the method is one the path offers. A parameter the backend requires (in the query, or a request
body) must be one the frontend declares it sends: `GET /api/items?page&size` declares query parameters
`page` and `size`; a POST, PUT or PATCH is taken to send a body.
"""

from __future__ import annotations

import re
from typing import Any

from rollback.targets.frontend.release import BackendRange, ReleaseManifest

_PARAMETER = re.compile(r"\{[^}/]*\}")
_BODY_METHODS = {"POST", "PUT", "PATCH"}


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Order versions as people read them: v2.10.0 after v2.9.1 (numbers compare as numbers)."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|[^\d.+_-]+", version))


def in_range(version: str, supported: BackendRange) -> bool:
    key = version_key(version)
    return (supported.min is None or version_key(supported.min) <= key) and (supported.max is None or key <= version_key(supported.max))


def _template(path: str) -> str:
    return _PARAMETER.sub("{}", path.rstrip("/") or "/")


def parse_operation(entry: str) -> tuple[str, str, set[str]]:
    """`GET /api/items?page&size` -> ("GET", "/api/items", {"page", "size"})."""
    method, _, target = entry.partition(" ")
    path, _, query = target.partition("?")
    return method, path, {name for name in query.split("&") if name}


def _required(operation: dict[str, Any], path_item: dict[str, Any]) -> tuple[set[str], bool]:
    """The query parameters the backend requires, and whether it requires a body (path parameters are
    in the template, headers and cookies are the browser's)."""
    parameters = [*path_item.get("parameters", []), *operation.get("parameters", [])]
    query = {p.get("name", "") for p in parameters if isinstance(p, dict) and p.get("in") == "query" and p.get("required")}
    body = operation.get("requestBody")
    return query, isinstance(body, dict) and bool(body.get("required"))


def check(manifest: ReleaseManifest, openapi: dict[str, Any], backend_version: str) -> tuple[list[str], list[str]]:
    """(operations the backend lacks, other problems); both empty when the pair is compatible."""
    paths = openapi.get("paths")
    if not isinstance(paths, dict):
        return [], [f"backend {backend_version}'s OpenAPI document has no `paths`"]
    by_template = {_template(p): item for p, item in paths.items() if isinstance(item, dict)}
    missing: list[str] = []
    problems: list[str] = []
    for entry in manifest.api:
        method, path, sends = parse_operation(entry)
        item = by_template.get(_template(path))
        operation = item.get(method.lower()) if item is not None else None
        if item is None or not isinstance(operation, dict):
            missing.append(f"{method} {path}")
            continue
        query, body = _required(operation, item)
        if unsent := sorted(query - sends):
            problems.append(f"{method} {path} requires query parameter{'s' if len(unsent) > 1 else ''} {', '.join(unsent)}")
        if body and method not in _BODY_METHODS:
            problems.append(f"{method} {path} requires a request body")
    if manifest.backend is not None and not in_range(backend_version, manifest.backend):
        low, high = manifest.backend.min or "any", manifest.backend.max or "any"
        problems.append(f"frontend {manifest.version} supports backend {low} to {high}, not {backend_version}")
    return missing, problems
