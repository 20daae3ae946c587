"""Headless Chromium for the tests that check pages as a person sees them (the report, the explorer).

Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) driven by Selenium with the system driver
(never selenium-manager, which would try to download one). Tests skip with the reason when any piece is absent.
"""

from __future__ import annotations

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
SKIP_NO_BROWSER = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
)


def headless_chromium(width: int = 1400, height: int = 1200, console: bool = False):
    """A Selenium Chrome driver on the system Chromium; ``console=True`` records the browser console log."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[app]')")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        opts.add_argument(arg)
    if console:
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=opts)
