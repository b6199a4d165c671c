"""The frontend's skew protection in a real browser: chromium (tests/browser.py) against a real nginx serving
a DirectoryStore with the origin's own configuration (rollback/targets/frontend/origin.py), releases
built by the demo build (rollback/dev/frontend_build.py), and the demo backend behind /api/.

What a rollback of the frontend must never do to an open tab: fail its next chunk load (the switch
happened under it), reload it in a loop, or leave it on a release that is no longer live without
telling. The switch is `store.switch(version)`, exactly what the rollback activity calls.

Observing the page: `window.chunkLoads` (each import's outcome), `window.versionChecks` (each
/version.json check), sessionStorage `reloads` (the page's own reload count, which survives reloads)
and Playwright's `framenavigated` on the main frame (what the browser did, whatever the page says).
No sleeps: every wait polls the page for a condition, with Playwright's deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, Route
from playwright.async_api import Error as PlaywrightError

from rollback.dev.frontend_build import Fault, build_release
from rollback.dev.instances import pid_alive
from rollback.ports import free_port
from rollback.targets.frontend import origin as origin_conf
from rollback.targets.frontend.store import DirectoryStore
from tests.browser import browser  # noqa: F401 (fixture)

NGINX = "/usr/sbin/nginx"
T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
START_DEADLINE_SECONDS = 15
STOP_DEADLINE_SECONDS = 10
PAGE_TIMEOUT_MS = 15_000
# Short enough that a test sees several checks in a second; long enough not to flood nginx.
FAST_CHECK_MS = 150
# Never within a test: the page then checks only after a failed chunk load, or when told to.
NO_CHECK_MS = 600_000
MISSING_CHUNK = "/assets/items.0123456789.js"


def _wait(predicate, what: str, deadline: float = START_DEADLINE_SECONDS) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} within {deadline}s")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.HTTPError:
        return False


@dataclass(frozen=True)
class Backend:
    port: int


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """The demo backend (it answers GET /api/items, and 404 for /api/orders), one per module."""
    port = free_port()
    log = (tmp_path_factory.mktemp("backend") / "app.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "rollback.demo_app", "--port", str(port), "--version", "v1", "--fault", "none"],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    try:
        _wait(lambda: process.poll() is None and _answers(f"http://127.0.0.1:{port}/version"), "the demo backend answers")
        yield Backend(port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_DEADLINE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Origin:
    """A DirectoryStore behind nginx, and the builds published into it."""

    store: DirectoryStore
    builds: Path
    url: str
    published: list[str] = field(default_factory=list)

    def publish(self, version: str, *, fault: Fault = "none", check_ms: int = FAST_CHECK_MS) -> None:
        # Each release built a minute after the previous one: distinct build times, as in a pipeline.
        created = T0 + timedelta(minutes=len(self.published))
        self.store.publish(build_release(self.builds, version, fault=fault, created=created, check_interval_ms=check_ms))
        self.published.append(version)

    def chunk_of(self, version: str) -> str:
        """The URL path of the release's items chunk."""
        (chunk,) = (self.store.path(version) / "assets").glob("items.*.js")
        return f"/assets/{chunk.name}"


def _origin_config(*, root: Path, port: int, work_dir: Path, api_port: int) -> str:
    # The page calls the backend on its own origin: nginx proxies /api/ to the demo backend.
    return origin_conf.nginx_conf(root=root, listen=f"127.0.0.1:{port}", work_dir=work_dir, api_upstream=f"127.0.0.1:{api_port}")


@pytest.fixture
def origin(tmp_path: Path, backend: Backend) -> Iterator[Origin]:
    if not Path(NGINX).exists():
        pytest.fail(f"nginx is not installed ({NGINX}; Debian package nginx-light): run make bootstrap")
    work_dir = tmp_path / "nginx"
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work_dir / "tmp" / kind).mkdir(parents=True)
    port = free_port()
    store = DirectoryStore(tmp_path / "origin")
    store.root.mkdir()
    conf = work_dir / "nginx.conf"
    conf.write_text(_origin_config(root=store.root, port=port, work_dir=work_dir, api_port=backend.port))
    command = [NGINX, "-p", f"{work_dir}/", "-c", str(conf), "-e", str(work_dir / "error.log")]
    # nginx daemonizes: the command returns once the master is forked, and its pid is in nginx.pid.
    subprocess.run(command, check=True, capture_output=True, timeout=START_DEADLINE_SECONDS)
    pid_file = work_dir / "nginx.pid"
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: pid_file.exists() and _answers(f"{url}/version.json"), "nginx answers")
        yield Origin(store=store, builds=tmp_path / "builds", url=url)
    finally:
        pid = int(pid_file.read_text()) if pid_file.exists() else None
        subprocess.run([*command, "-s", "quit"], capture_output=True, timeout=STOP_DEADLINE_SECONDS)
        if pid is not None:
            # pid_alive counts a zombie as gone: the daemonized master is not our child, and is reaped
            # by whoever adopted it, sometimes a second later.
            try:
                _wait(lambda: not pid_alive(pid), "nginx exits", STOP_DEADLINE_SECONDS)
            except AssertionError:
                os.kill(pid, signal.SIGKILL)


@pytest_asyncio.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:  # noqa: F811 (the fixture above)
    """One browser profile per test: its own cookies (the `__dpl` pin) and sessionStorage."""
    created = await browser.new_context()
    created.set_default_timeout(PAGE_TIMEOUT_MS)
    try:
        yield created
    finally:
        await created.close()


class Tab:
    """A page and what the browser saw it do: every main-frame navigation (load or reload)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.navigations: list[str] = []
        page.on("framenavigated", lambda frame: self.navigations.append(frame.url) if frame == page.main_frame else None)

    @classmethod
    async def open(cls, context: BrowserContext, url: str, *, gate: "VersionGate | None" = None) -> "Tab":
        tab = cls(await context.new_page())
        if gate is not None:
            await tab.page.route("**/version.json", gate.handle)
        await tab.page.goto(url)
        await tab.first_chunk()
        return tab

    async def first_chunk(self) -> dict:
        """The page's own first chunk load (it starts one as soon as it runs), rendered: until then its render may
        still clear `#error` behind a later load's back. Read in the same evaluation as the wait's condition: a
        page that reloads itself right away (it opened on a release that is not live) has a new document by the
        time a second evaluation would run."""
        for _ in range(5):
            try:
                rendered = await self.page.wait_for_function(
                    "() => window.chunkLoads?.length >= 1 && (!window.chunkLoads[0].ok || 'items' in window.chunkLoads[0] "
                    "|| 'renderError' in window.chunkLoads[0]) && JSON.stringify(window.chunkLoads[0])")
                return json.loads(await rendered.json_value())
            except PlaywrightError as err:
                if "Execution context was destroyed" not in str(err):
                    raise
        raise AssertionError("the page kept navigating before its first chunk load could be read")

    async def load_items(self, chunk: str | None = None) -> dict:
        return await self.page.evaluate("(chunk) => chunk ? loadItems(chunk) : loadItems()", chunk)

    async def load_items_pinned(self) -> tuple[dict, str | None]:
        """loadItems(), and the `__dpl` pin its chunk request carried (what the origin chose the release by)."""
        async with self.page.expect_request(lambda request: "/assets/items." in request.url) as sent:
            record = await self.load_items()
        cookies = (await (await sent.value).all_headers()).get("cookie", "")
        pins = [part.strip().removeprefix("__dpl=") for part in cookies.split(";") if part.strip().startswith("__dpl=")]
        return record, (pins[0] if pins else None)

    async def chunk_loads(self) -> list[dict]:
        return await self.page.evaluate("() => window.chunkLoads")

    async def version(self) -> str:
        return await self.page.inner_text("#version")

    async def reloads(self) -> int:
        return int(await self.page.evaluate("() => sessionStorage.getItem('reloads') || '0'"))

    async def wait_for_version(self, version: str) -> None:
        # Polls across the reload: Playwright reruns the predicate in each new document.
        await self.page.wait_for_function("(v) => document.getElementById('version')?.textContent === v "
                                          "&& window.chunkLoads?.length >= 1", arg=version)

    async def wait_for_checks(self, count: int, *, live: str) -> None:
        """`count` more version checks in this document than it has made so far, all answered `live`."""
        seen = await self.page.evaluate("() => window.versionChecks.length")
        await self.page.wait_for_function("([n, live]) => window.versionChecks.length >= n", arg=[seen + count, live])
        checks = await self.page.evaluate("() => window.versionChecks")
        assert all(check.get("live") == live for check in checks[seen:]), checks


class VersionGate:
    """Holds the page's /version.json requests until opened: the test decides when the tab may learn of a
    switch, so "immediately after the switch" is a state, not a race against the check interval. A held
    request goes to the origin when released, so it sees what is live then. (Routing disables the page's
    HTTP cache: only the test that needs the gate uses it.)"""

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    async def handle(self, route: Route) -> None:
        await self.opened.wait()
        await route.continue_()

    def open(self) -> None:
        self.opened.set()


async def test_an_open_tab_keeps_its_release_across_a_rollback_then_moves_to_the_live_one_once(origin, context):
    origin.publish("v1")
    origin.publish("v2")
    origin.store.switch("v2")
    gate = VersionGate()
    tab = await Tab.open(context, origin.url, gate=gate)
    first = await tab.first_chunk()
    assert (first["ok"], first["status"], first["version"]) == (True, 200, "v2"), first
    assert await tab.page.inner_text("#items") != ""  # rendered from /api/items through the origin

    assert origin.store.switch("v1") is True  # the rollback activity's switch
    # The tab has not heard of it yet: its next chunk still comes from v2 (pinned by its cookie).
    after_switch, pin = await tab.load_items_pinned()
    assert (after_switch["ok"], after_switch["status"], after_switch["version"], pin) == (True, 200, "v2", "v2"), after_switch
    assert tab.navigations == [f"{origin.url}/"]

    gate.open()  # the held check reaches the origin: v1 is live, so the tab moves
    await tab.wait_for_version("v1")
    assert await tab.reloads() == 1
    assert len(tab.navigations) == 2, tab.navigations
    moved, pin = await tab.load_items_pinned()
    assert (moved["ok"], moved["status"], moved["version"], pin) == (True, 200, "v1", "v1"), moved
    # And it stays: several more checks in the new document, no further navigation.
    await tab.wait_for_checks(3, live="v1")
    assert len(tab.navigations) == 2 and await tab.reloads() == 1, tab.navigations


async def test_chunk_loads_never_fail_while_the_release_switches_back_and_forth_under_an_open_tab(origin, context):
    for version in ("v1", "v2", "v3"):
        origin.publish(version, check_ms=NO_CHECK_MS)
    origin.store.switch("v2")
    tab = await Tab.open(context, origin.url)
    loads = 60
    stream = asyncio.ensure_future(tab.page.evaluate(
        "async (n) => { const out = []; for (let i = 0; i < n; i++) out.push(await loadItems()); return out; }", loads))
    switches = ["v1", "v3", "v2", "v1", "v3", "v1"]
    for index, version in enumerate(switches):
        # Each switch lands between loads of the stream, several loads apart.
        await tab.page.wait_for_function("(n) => window.chunkLoads.length >= n", arg=1 + (index + 1) * (loads // (len(switches) + 1)))
        origin.store.switch(version)
    results = await stream
    assert [r for r in results if not (r["ok"] and r["status"] == 200 and r["version"] == "v2")] == []
    assert len(tab.navigations) == 1 and await tab.reloads() == 0
    # Told to check, the tab moves once to what is live at the end.
    async with tab.page.expect_navigation():
        await tab.page.evaluate("() => { void checkVersion(); }")
    await tab.wait_for_version("v1")
    assert await tab.reloads() == 1 and len(tab.navigations) == 2


async def test_a_tab_holding_newer_chunks_still_loads_them_after_the_rollback(origin, context):
    origin.publish("v1", check_ms=NO_CHECK_MS)
    origin.publish("v2", check_ms=NO_CHECK_MS)  # published, not live
    origin.store.switch("v1")
    older = await Tab.open(context, origin.url)
    assert (await older.first_chunk())["version"] == "v1"
    origin.store.switch("v2")
    # Opened while v2 is live, it opens on v2 although the browser holds the older tab's pin (the pin is for
    # /assets/ only, never for navigations); it pins the browser to v2.
    newer = await Tab.open(context, origin.url)
    assert (await newer.first_chunk())["version"] == "v2"

    origin.store.switch("v1")  # the rollback
    for tab, version in ((newer, "v2"), (older, "v1")):
        record = await tab.load_items()
        assert (record["ok"], record["status"], record["version"]) == (True, 200, version), (version, record)
    # A tab opened after the rollback pins the whole browser to v1 again (the cookie is shared): v2's
    # chunk is then neither in the pinned release nor the live one, and comes from the pool.
    fresh = await Tab.open(context, origin.url)
    assert (await fresh.first_chunk())["version"] == "v1"
    record, pin = await newer.load_items_pinned()
    assert (record["ok"], record["status"], record["version"], pin) == (True, 200, "v2", "v1"), record
    # Unpinned (a client without the cookie) the same: the pool holds every retained release's chunks.
    async with httpx.AsyncClient(base_url=origin.url, timeout=5) as http:
        answer = await http.get(origin.chunk_of("v2"))
        assert answer.status_code == 200 and answer.content == (origin.store.path("v2") / origin.chunk_of("v2")[1:]).read_bytes()
    assert [await t.reloads() for t in (older, newer, fresh)] == [0, 0, 0]


async def test_a_missing_chunk_is_a_404_never_the_page_and_the_live_tab_does_not_reload(origin, context):
    origin.publish("v1")
    origin.store.switch("v1")
    async with httpx.AsyncClient(base_url=origin.url, timeout=5) as http:
        index = (await http.get("/")).text
        for path, headers in ((MISSING_CHUNK, {}), (MISSING_CHUNK, {"cookie": "__dpl=v1"}), ("/some/client/route", {})):
            answer = await http.get(path, headers=headers)
            assert answer.status_code == 404, (path, answer.status_code)
            assert answer.text != index and 'id="version"' not in answer.text, (path, answer.text[:200])
            assert "javascript" not in answer.headers.get("content-type", ""), answer.headers

    tab = await Tab.open(context, origin.url)
    record = await tab.load_items(MISSING_CHUNK)
    assert (record["ok"], record["status"]) == (False, 404), record
    # The failure makes the tab ask what is live; its own version is, so it stays.
    await tab.page.wait_for_function("() => window.versionChecks.some((c) => c.reason === 'chunk-failed' && c.live === 'v1')")
    await tab.wait_for_checks(3, live="v1")
    assert await tab.reloads() == 0 and len(tab.navigations) == 1, tab.navigations
    assert MISSING_CHUNK in await tab.page.inner_text("#error")
    assert (await tab.load_items())["ok"] is True  # its own chunk still loads


async def test_a_reload_that_lands_on_the_old_release_again_is_not_repeated_the_page_shows_a_banner(origin, context):
    origin.publish("v1")
    origin.publish("v2")
    origin.store.switch("v1")
    # Pinned by the header (as a proxy or a test harness might be), the reload lands on v2 again, whatever the cookie.
    await context.set_extra_http_headers({"x-deployment-id": "v2"})
    tab = await Tab.open(context, origin.url)
    await tab.page.wait_for_function("() => !document.getElementById('banner').hidden")
    assert await tab.version() == "v2" and "v1" in await tab.page.inner_text("#banner")
    assert await tab.reloads() == 1 and len(tab.navigations) == 2, tab.navigations
    await tab.wait_for_checks(3, live="v1")
    assert await tab.reloads() == 1 and len(tab.navigations) == 2, tab.navigations

    # The page's own release goes live: it is up to date, the banner goes and the guard with it...
    origin.store.switch("v2")
    await tab.page.wait_for_function("() => document.getElementById('banner').hidden && sessionStorage.getItem('reloadedFor') === null")
    # ...so a later switch gets its one reload again, and no more.
    origin.store.switch("v1")
    await tab.page.wait_for_function("() => sessionStorage.getItem('reloads') === '2' && !document.getElementById('banner')?.hidden")
    await tab.wait_for_checks(3, live="v1")
    assert await tab.reloads() == 2 and len(tab.navigations) == 3, tab.navigations


async def test_a_broken_release_shows_its_error_and_one_calling_a_missing_operation_declares_it(origin, context):
    origin.publish("v1")
    origin.publish("v2", fault="broken-js")
    origin.publish("v3", fault="missing-api")
    origin.store.switch("v2")
    tab = await Tab.open(context, origin.url)
    record = await tab.first_chunk()
    # Fetched fine (200), failed while evaluating: the page says so, and stays (its version is live).
    assert (record["ok"], record["status"]) == (False, 200) and "broken release v2" in record["error"], record
    await tab.page.wait_for_selector("#error:not([hidden])")
    assert "broken release v2" in await tab.page.inner_text("#error")
    await tab.wait_for_checks(2, live="v2")
    assert await tab.reloads() == 0

    assert origin.store.manifest("v3").api == ["GET /api/items", "GET /api/orders"]
    assert origin.store.manifest("v1").api == ["GET /api/items"]
    origin.store.switch("v3")  # what the compatibility check exists to prevent: the page meets the 404
    await tab.wait_for_version("v3")
    await tab.page.wait_for_function("() => window.chunkLoads[0]?.renderError !== undefined")
    assert "GET /api/orders answered 404" in await tab.page.inner_text("#error")


async def test_a_reload_after_the_switch_gets_the_live_page_even_when_both_pages_share_mtime_and_size(origin, context):
    for version in ("v1", "v2"):
        # One mtime for both (what a reproducible build with a fixed epoch does), same page size.
        origin.store.publish(build_release(origin.builds, version, created=T0, check_interval_ms=NO_CHECK_MS))
    origin.store.switch("v2")
    tab = await Tab.open(context, origin.url)
    origin.store.switch("v1")
    await tab.page.reload()
    assert await tab.version() == "v1"
