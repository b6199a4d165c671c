"""The compatibility rules between a frontend release's declared API and a backend's OpenAPI document."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from rollback.targets.frontend.compatibility import check, in_range, version_key
from rollback.targets.frontend.contract import CompatibilityReport, purge_urls
from rollback.targets.frontend.release import BackendRange, ReleaseManifest

DIGEST = "0" * 64


def manifest(api: list[str], backend: BackendRange | None = None) -> ReleaseManifest:
    return ReleaseManifest(version="v2", build="b2", created=datetime(2026, 1, 1, tzinfo=timezone.utc),
                           files={"index.html": DIGEST}, api=api, backend=backend)


def document(paths: dict) -> dict:
    return {"openapi": "3.1.0", "info": {"title": "t", "version": "x"}, "paths": paths}


OK = {"responses": {"200": {"description": "OK"}}}


def test_every_declared_operation_must_exist_with_its_method():
    doc = document({"/api/items": {"get": OK}, "/api/items/{itemId}": {"get": OK, "delete": OK}})
    assert check(manifest(["GET /api/items", "GET /api/items/{id}", "DELETE /api/items/{id}"]), doc, "v1") == ([], [])
    missing, problems = check(manifest(["GET /api/orders", "POST /api/items", "GET /api/items"]), doc, "v1")
    assert missing == ["GET /api/orders", "POST /api/items"] and problems == []


def test_a_parameter_the_backend_requires_must_be_one_the_frontend_sends():
    page = {"name": "page", "in": "query", "required": True}
    doc = document({"/api/items": {"get": {**OK, "parameters": [page, {"name": "size", "in": "query"}]}},
                    "/api/orders": {"parameters": [page], "post": {**OK, "requestBody": {"required": True}}},
                    "/api/report": {"get": {**OK, "requestBody": {"required": True}}}})
    assert check(manifest(["GET /api/items?page", "POST /api/orders?page"]), doc, "v1") == ([], [])
    _, problems = check(manifest(["GET /api/items?size", "POST /api/orders", "GET /api/report"]), doc, "v1")
    assert problems == ["GET /api/items requires query parameter page", "POST /api/orders requires query parameter page",
                        "GET /api/report requires a request body"]


def test_the_declared_backend_range_is_compared_as_versions():
    assert version_key("v2.10.0") > version_key("v2.9.1") > version_key("v2.9")
    supported = BackendRange(min="v2.3.0", max="v2.10.0")
    assert in_range("v2.9.0", supported) and in_range("v2.10.0", supported) and not in_range("v2.11.0", supported)
    assert not in_range("v2.2.9", supported)
    _, problems = check(manifest([], supported), document({}), "v3.0.0")
    assert problems == ["frontend v2 supports backend v2.3.0 to v2.10.0, not v3.0.0"]


def test_a_document_without_paths_is_a_problem_not_a_pass():
    assert check(manifest(["GET /api/items"]), {"openapi": "3.1.0"}, "v1") == ([], ["backend v1's OpenAPI document has no `paths`"])


@pytest.mark.parametrize("entry", ["GET api/items", "FETCH /api/items", "GET /api/items?", "GET /api/items?a&&b", "GET /a b"])
def test_malformed_operations_are_refused_in_the_manifest(entry):
    with pytest.raises(ValueError, match="not `METHOD /path`"):
        manifest([entry])


def test_the_report_names_what_is_missing_and_the_entry_points_include_the_root():
    report = CompatibilityReport(frontend_version="v2", backend_version="v1", compatible=False, missing=["GET /api/orders"],
                                 problems=["GET /api/items requires query parameter page"])
    assert report.summary() == ("frontend v2 with backend v1: incompatible: missing GET /api/orders; "
                                "GET /api/items requires query parameter page")
    assert purge_urls(["index.html", "version.json", "docs/index.html"]) == ["/", "/docs/", "/docs/index.html", "/index.html",
                                                                              "/version.json"]
