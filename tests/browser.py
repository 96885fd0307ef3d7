"""A real browser for the tests: Playwright for Python driving Debian's Chromium (never a
browser Playwright would download). `scripts/test` installs Chromium where it can (root with
apt-get); elsewhere the browser tests are skipped and say why. Screenshots go to `artifacts/`
in the repository's root, the folder CI keeps."""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.harness import ROOT

CHROMIUM = os.environ.get("METERPROXY_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts"


def browser_unavailable() -> str | None:
    """Why this machine cannot run the browser tests, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "needs the playwright package (requirements.lock)"
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        return f"needs Chromium at {CHROMIUM} (apt-get install chromium; scripts/test does it as root)"
    return None


needs_browser = pytest.mark.skipif(browser_unavailable() is not None, reason=str(browser_unavailable()))


@contextmanager
def chromium() -> Iterator:
    """Debian's Chromium, headless (each `browser.new_context()` has cookies of its own)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
