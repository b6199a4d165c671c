"""Test harness: a real headless browser (Debian's chromium, driven by Playwright), one per test process.

    from tests.browser import browser  # noqa: F401 (fixture)

    async def test_x(browser):
        context = await browser.new_context()
        page = await context.new_page()

Playwright's Python package brings its driver; the browser is the system's chromium
(`executable_path`), so nothing is ever downloaded. A missing chromium fails the test with what to
run: the frontend's skew protection is only tested in a browser, and a skip would hide that.

The fixture is session-scoped on the session's event loop (pyproject: pytest-asyncio in auto mode,
session loop scope), so one browser serves every test of a process (xdist worker); tests isolate
themselves with a context each (cookies and sessionStorage are per context).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, async_playwright

CHROMIUM = "/usr/bin/chromium"
LAUNCH_TIMEOUT_MS = 60_000


def chromium_path() -> str:
    found = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if found is None:
        pytest.fail(f"chromium is not installed ({CHROMIUM}; Debian package 'chromium'): run make bootstrap")
    return found


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    executable = chromium_path()
    # Chromium refuses to start its sandbox as root (containers, CI runners): only then do without it.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, headless=True, args=args,
                                                    timeout=LAUNCH_TIMEOUT_MS)
        try:
            yield launched
        finally:
            await launched.close()
