"""Headless Chromium (Debian's package, driven by playwright) for tests that look at the UIs, and a Prefect server with its UI on.

Fixtures:
    browser (session): a :class:`Browser` on a fresh profile; skips when no Chromium is found
        (fails instead when ``CI`` is set: CI installs it, see ``.ci/run``).
    prefect_ui_server (session): a ``prefect server`` that also serves its web UI (the session's
        ``prefect_server`` runs with the UI off); ``prefect_ui_process`` starts it without waiting.

Screenshots go to ``tests/.screenshots/`` (git-ignored) and are listed at the end of the run.
Nothing is downloaded: playwright's pip wheel brings its driver, the browser is ``/usr/bin/chromium``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.prefect_server import PrefectServer, prefect_executable
from tests.plugins.processes import free_port, wait_http

SCREENSHOTS = Path(__file__).resolve().parents[1] / ".screenshots"
NO_CHROMIUM = "no Chromium found (install Debian's chromium package; CI does)"
# Root needs --no-sandbox; the rest keep Chromium from calling home on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000  # a page's first load on two busy cores can take tens of seconds
_saved: list[Path] = []


def find_chromium() -> str | None:
    """Debian's Chromium (``/usr/bin/chromium``) or a ``chromium`` on PATH; None when absent."""
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


class Browser:
    """One headless Chromium page with helpers that wait for what a person would see, and screenshot it.

    Attributes:
        page: the playwright ``Page`` (use its locators for anything the helpers do not cover).
        folder: where :meth:`screenshot` writes PNG files.
    """

    def __init__(self, page: Any, folder: Path) -> None:
        self.page = page
        self.folder = folder

    def open(self, url: str, *texts: str | re.Pattern[str]) -> Any:
        """Go to ``url`` and wait until every text in ``texts`` is visible; returns the page."""
        self.page.goto(url)
        self.expect(*texts)
        return self.page

    def expect(self, *texts: str | re.Pattern[str], within: Any = None) -> None:
        """Wait until each text is visible (in ``within``, a locator, or the page).

        Raises:
            AssertionError: a text did not show up; names it and the URL, saves ``FAILED-*.png``,
                and quotes the start of what the page did show.
        """
        scope = within if within is not None else self.page
        for text in texts:
            try:
                scope.get_by_text(text).filter(visible=True).first.wait_for(timeout=TIMEOUT_MS)
            except Exception as error:  # noqa: BLE001 - playwright's TimeoutError, turned into a readable failure
                shot = self.screenshot(f"FAILED-{re.sub(r'[^A-Za-z0-9]+', '-', str(text))[:40]}")
                shown = self.page.inner_text("body")[:1500]
                raise AssertionError(f"{text!r} not shown at {self.page.url} ({shot}); the page shows:\n{shown}") \
                    from error

    def follow(self, link: Any, *texts: str | re.Pattern[str], shot: str | None = None) -> str:
        """Click ``link`` (a locator) as a person would, wait until every text in ``texts`` is visible on the
        page it opens (a new tab when the link asks for one), screenshot it as ``shot``, and come back;
        returns the address the link led to."""
        origin, back = self.page, self.page.url
        target = link.first.get_attribute("target")
        if target and target != "_self":
            with origin.context.expect_page() as opened:
                link.first.click()
            self.page = opened.value
        else:
            link.first.click()
        try:
            self.page.wait_for_load_state()
            self.expect(*texts)
            if shot:
                self.page.wait_for_timeout(800)  # the Prefect UI fades a page in
                self.screenshot(shot)
            return self.page.url
        finally:
            if self.page is not origin:
                self.page.close()
                self.page = origin
            elif self.page.url != back:
                self.page.goto(back)

    def screenshot(self, name: str, show: Any = None) -> Path:
        """Save the visible window as ``<folder>/<name>.png``, scrolled so that ``show`` (a locator) is in view."""
        if show is not None:
            show.first.scroll_into_view_if_needed()
        path = self.folder / f"{name}.png"
        self.page.screenshot(path=str(path))
        _saved.append(path)
        print(f"screenshot: {path}")
        return path


@pytest.fixture(scope="module")  # Playwright's sync API keeps an event loop running in this thread while
def browser() -> Iterator[Browser]:  # open: any later asyncio.run() in the session would fail
    """Headless Debian Chromium on a fresh profile, one page at 1600×1000; screenshots in tests/.screenshots/."""
    executable = find_chromium()
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail(NO_CHROMIUM + "; .ci/run installs it with apt-get as root")
        pytest.skip(NO_CHROMIUM)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    (SCREENSHOTS / ".gitignore").write_text("*\n")  # never committed, like .pytest_cache
    for stale in SCREENSHOTS.glob("*.png"):  # the folder shows this run's pages only
        stale.unlink()
    with tempfile.TemporaryDirectory(prefix="pneumo-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000})
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield Browser(context.pages[0] if context.pages else context.new_page(), SCREENSHOTS)
        finally:
            context.close()


@pytest.fixture(scope="session")
def prefect_ui_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A ``prefect server`` with its web UI, started but maybe not answering yet.

    Request it before slower set-up (the MLflow server) so both start at once; then request
    ``prefect_ui_server``, which waits for it.
    """
    home = tmp_path_factory.mktemp("prefect-ui-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "true", "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
           # The UI calls the API at this address; `--port` alone leaves it at :4200.
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=home, start_new_session=True)
    server = PrefectServer(process, port, home, log)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def prefect_ui_server(prefect_ui_process: PrefectServer) -> PrefectServer:
    """A running ``prefect server`` on 127.0.0.1 with its web UI at ``api_url`` minus ``/api``."""
    wait_http(f"{prefect_ui_process.api_url}/health", prefect_ui_process.process, timeout=180,
              log=prefect_ui_process.log)
    return prefect_ui_process


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """List the screenshots this run saved, so a developer can open them."""
    if _saved:
        terminalreporter.write_sep("-", "browser screenshots")
        for path in _saved:
            terminalreporter.write_line(str(path))
