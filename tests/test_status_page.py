"""The status page in a real headless browser, against real nodes on loopback.

Debian's chromium, driven through Debian's chromedriver with the W3C WebDriver
protocol: plain JSON over HTTP on loopback, so the test needs no Python package
and nothing is downloaded at test time (``.ci/run`` installs both packages).
Skipped where they are missing.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lan import wait_until
from tests.processes import network_key, network_node

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = next(
    (
        path
        for path in ("/usr/lib/chromium/chromium", shutil.which("chromium"))
        if path and Path(path).exists()
    ),
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMEDRIVER is None or CHROMIUM is None,
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)

ERROR_TRAP = """
window.__pageErrors = [];
addEventListener("error", (e) => window.__pageErrors.push(String(e.message || e)));
addEventListener("unhandledrejection", (e) => window.__pageErrors.push("rejected: " + e.reason));
"""
"""Installed before any script of the page runs: every uncaught error and rejection."""


class Browser:
    """One chromedriver process and one headless chromium session."""

    def __init__(self, profile: Path) -> None:
        assert CHROMEDRIVER is not None and CHROMIUM is not None
        self.driver = subprocess.Popen(
            [CHROMEDRIVER, "--port=0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.base = f"http://127.0.0.1:{self._port()}"
        arguments = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--no-first-run", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1000",
        ]  # fmt: skip
        capabilities = {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": arguments},
            "goog:loggingPrefs": {"browser": "ALL"},
        }
        session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
        self.session = f"/session/{session['sessionId']}"

    def _port(self) -> int:
        stdout = self.driver.stdout
        assert stdout is not None
        for line in stdout:  # chromedriver says which port it took, then goes quiet
            match = re.search(rb"started successfully on port (\d+)", line)
            if match:
                return int(match.group(1))
        raise AssertionError("chromedriver did not start")

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{method} {path}: {error.read().decode()}") from None

    def command(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(method, self.session + path, body)

    def run(self, script: str) -> Any:
        return self.command("POST", "/execute/sync", {"script": script, "args": []})

    def open(self, url: str) -> None:
        self.command(
            "POST",
            "/goog/cdp/execute",
            {"cmd": "Page.addScriptToEvaluateOnNewDocument", "params": {"source": ERROR_TRAP}},
        )
        self.command("POST", "/url", {"url": url})

    def errors(self) -> list[str]:
        """Uncaught script errors, and anything the console reported as severe."""
        trapped: list[str] = self.run("return window.__pageErrors")
        console = self.command("POST", "/se/log", {"type": "browser"})
        return trapped + [entry["message"] for entry in console if entry["level"] == "SEVERE"]

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.command("GET", "/screenshot")))

    def close(self) -> None:
        try:
            self.command("DELETE", "")
        finally:
            self.driver.terminate()
            self.driver.wait(timeout=10)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    running = Browser(tmp_path / "profile")
    yield running
    running.close()


PEERS = "return [...document.querySelectorAll('#peers tbody tr')].map(r => r.innerText)"


def test_the_page_shows_the_node_and_follows_a_peer_joining(
    browser: Browser, tmp_path: Path
) -> None:
    key = network_key(tmp_path, "page")
    first = network_node(key, "page", "--metrics", "0")
    second = None
    try:
        assert first.status_page is not None
        node_id = first.status_json()["overlay"]["node_id"]
        browser.open(first.status_page)
        wait_until(
            lambda: browser.run("return document.getElementById('node-id').textContent") == node_id,
            15,
            "the node id on the page",
        )
        assert browser.run("return document.getElementById('state').textContent") == "alone"
        assert browser.run(PEERS) == []
        assert browser.run("return document.title") == "irisnode"

        second = network_node(key, "page", seeds=[first.link_port or 0])
        peer_id = second.status_json()["overlay"]["node_id"]

        def peer_shown() -> list[str]:
            rows: list[str] = browser.run(PEERS)
            return [row for row in rows if peer_id in row and "up" in row]

        (row,) = wait_until(peer_shown, 15, "the new peer in the page's peer table")
        assert f"127.0.0.1:{second.link_port}" in row
        wait_until(
            lambda: browser.run(
                f"return !!document.querySelector('#ring circle[data-node-id=\"{peer_id}\"]')"
            ),
            15,
            "the new peer on the ring",
        )
        wait_until(
            lambda: "joined" in browser.run("return document.getElementById('state').textContent"),
            15,
            "joined on the page",
        )
        rate = browser.run(
            "return document.querySelector('[data-rate=\"messaging.requests\"]').textContent"
        )
        assert re.fullmatch(r"\d+\.\d", rate), rate  # two refreshes seen: a rate, not a dash
        browser.screenshot(tmp_path / "status-page.png")
        assert (tmp_path / "status-page.png").read_bytes().startswith(b"\x89PNG")
        assert browser.errors() == []
    finally:
        if second is not None:
            second.stop()
        first.stop()
