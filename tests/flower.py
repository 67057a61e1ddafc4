"""Flower as the README starts it, its HTTP API, and a headless Chromium to look at its pages.
Used by tests/integration/test_flower.py and scripts/flower-screenshots.py."""

from __future__ import annotations

import base64
import json
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support import REPO, Proc, celery_env

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

#: Debian's chromium and chromium-driver (scripts/test-servers.sh install): nothing downloads a
#: browser build.
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def start_flower(config: Path, log: Path, *, port: int, credentials: str) -> Proc:
    """``celery -A app flower`` on 127.0.0.1:port, the password in the environment (as the
    README says); returns once it listens."""
    flower = Proc(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "app",
            "flower",
            "--address=127.0.0.1",
            f"--port={port}",
        ],
        env=celery_env(config, FLOWER_BASIC_AUTH=credentials),
        log=log,
        cwd=REPO,
    )
    flower.wait_for_output("Visit me at", timeout_s=60)
    return flower


def _authorization(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


def get(url: str, credentials: str | None = None) -> tuple[int, str]:
    """Status and body of a GET, with HTTP basic credentials ``user:password`` if given."""
    request = urllib.request.Request(url)
    if credentials is not None:
        request.add_header("Authorization", _authorization(credentials))
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


def get_json(url: str, credentials: str) -> Any:
    """The JSON of a Flower API answer (None unless it answered 200)."""
    status, body = get(url, credentials)
    return json.loads(body) if status == 200 else None


def browser_available() -> bool:
    return shutil.which(CHROMIUM) is not None and shutil.which(CHROMEDRIVER) is not None


def browser(credentials: str, *, width: int = 1400, height: int = 900) -> WebDriver:
    """Headless Chromium driven by selenium, sending the basic credentials with every request
    (the page's own API calls included)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.setExtraHTTPHeaders", {"headers": {"Authorization": _authorization(credentials)}}
    )
    return driver
