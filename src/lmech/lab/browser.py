"""Headless Chromium for the lab's browser tests and screenshots (Debian's ``chromium`` package,
driven by Playwright; ``playwright install`` is never needed or used).

The browser is started with a fresh profile and with everything that could reach the network on
its own switched off (``--disable-background-networking``, ``--disable-component-update``,
``--disable-sync``, ``--disable-quic``), so a page that loads is a page that needs no network.

>>> from lmech.lab.browser import chromium_path, open_browser      # doctest: +SKIP
>>> with open_browser() as context:                                 # doctest: +SKIP
...     page = context.new_page(); page.goto("file:///tmp/report.html")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")


def chromium_path() -> str | None:
    """The Chromium executable: ``$LMECH_CHROMIUM``, else Debian's, else ``chromium`` on PATH."""
    env = os.environ.get("LMECH_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for candidate in CHROMIUM_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    return shutil.which("chromium")


def unavailable_reason() -> str | None:
    """Why the browser cannot be driven here (None when it can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; it drives Debian's chromium)"
    if chromium_path() is None:
        return "chromium is not installed (apt-get install chromium)"
    return None


@contextlib.contextmanager
def open_browser(width: int = 1400, height: int = 1000) -> Iterator:
    """A Playwright browser context on headless Chromium with a fresh, temporary profile."""
    from playwright.sync_api import sync_playwright

    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    with tempfile.TemporaryDirectory(prefix="lmech-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=chromium_path(), headless=True, args=list(CHROMIUM_ARGS),
            viewport={"width": width, "height": height})
        try:
            yield context
        finally:
            context.close()


__all__ = ["CHROMIUM_ARGS", "chromium_path", "open_browser", "unavailable_reason"]
