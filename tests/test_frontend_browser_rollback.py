"""A real browser through a real rollback: chromium holds a tab open on v2 through Varnish while
RollbackWorkflow (real Temporal, real worker) switches the frontend back to v1 and purges Varnish.

The tab keeps loading its chunks the whole time, and once the purged `/version.json` tells it v1 is
live, it moves there exactly once. What the browser fetched is observed with Playwright's response
events, which survive the reload (the page's own records do not).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest
from playwright.async_api import BrowserContext, Error as PlaywrightError, Response

from rollback.dev.frontend_stack import FrontendStack
from rollback.dev.stack import BackendStack
from rollback.models import Phase, RollbackTarget
from tests.browser import browser  # noqa: F401 (fixture)
from tests.test_frontend_rollback import config_of, frontend_of
from tests.helpers import orchestrator

CHECK_MS = 300
PAGE_TIMEOUT_MS = 15_000


@pytest.fixture
def frontend(blue_green: BackendStack) -> Iterator[FrontendStack]:
    stack = frontend_of(blue_green, check_interval_ms=CHECK_MS)
    try:
        stack.start("v1")
        yield stack
    finally:
        stack.stop()


async def test_a_tab_open_on_v2_keeps_loading_its_chunks_through_the_rollback_then_moves_to_v1_once(
        blue_green, frontend, browser, tmp_path, client, task_queue, run_worker):  # noqa: F811 (fixture)
    frontend.deploy("v2")
    await run_worker(config_of(blue_green, frontend, tmp_path))
    context: BrowserContext = await browser.new_context()
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    try:
        page = await context.new_page()
        navigations: list[str] = []
        page.on("framenavigated", lambda frame: navigations.append(frame.url) if frame == page.main_frame else None)
        assets: list[tuple[str, int]] = []
        page.on("response", lambda response: _record(assets, response))
        await page.goto(frontend.front_url)
        await page.wait_for_function("() => document.getElementById('version')?.textContent === 'v2' && window.chunkLoads?.length >= 1")

        done = asyncio.Event()
        loader = asyncio.ensure_future(_keep_loading(page, done))
        orch = orchestrator(client, task_queue)
        started = await orch.initiate_rollback(targets=[RollbackTarget.FRONTEND], initiated_by="tester", reason="broken tab test")
        result = await orch.wait(started.execution_id)
        assert result is not None and result.state == Phase.SUCCEEDED, result

        await page.wait_for_function("() => document.getElementById('version')?.textContent === 'v1' && window.chunkLoads?.length >= 1")
        # Stays: a few more checks of the live version in the new document, and no further navigation.
        checks = await page.evaluate("() => window.versionChecks.length")
        await page.wait_for_function("(n) => window.versionChecks.length >= n", arg=checks + 3)
        done.set()
        loads = await loader
    finally:
        await context.close()

    assert len(navigations) == 2, navigations  # the first load and exactly one move
    assert loads >= 5, loads  # the tab kept loading while the rollback ran
    failed = [(url, status) for url, status in assets if status != 200]
    assert failed == [], failed
    assert {url.rsplit("/", 1)[1].split(".")[0] for url, _ in assets} >= {"app", "items"}


def _record(assets: list[tuple[str, int]], response: Response) -> None:
    if "/assets/" in response.url:
        assets.append((response.url.split("?")[0], response.status))


async def _keep_loading(page, done: asyncio.Event) -> int:
    """Load the chunk again and again until told to stop; a load cut by the tab's own reload is not a failure."""
    loads = 0
    while not done.is_set():
        with contextlib.suppress(PlaywrightError):
            record = await page.evaluate("() => loadItems()")
            assert record["ok"], record
            loads += 1
        await asyncio.sleep(0.02)  # pacing the stream, not synchronising: the waits above poll the page
    return loads

