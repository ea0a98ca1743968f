"""The HTML report in a real browser: headless Chromium loads it from disk, every image
decodes (naturalWidth > 0), the console stays free of errors, and a screenshot is kept
under ``test-artifacts/``.

Chromium is Debian's ``chromium`` package, installed here if missing (as root, with
apt-get); where it cannot be installed the test is skipped and says why. The browser is
driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: commands on fd 3,
replies on fd 4, JSON messages ended by NUL), so no extra Python package is needed.
"""
import base64
import fcntl
import json
import os
import select
import shutil
import struct
import subprocess
import tempfile
import time

import pytest

from lightning_ntk.analysis import write_report
from lightning_ntk.analysis.report import SECTIONS

from .test_analysis import write_full_run

# A headless browser in a subprocess: slow (skipped by pytest -m "not slow").
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--window-size=1280,900"]


def _find_browser():
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium():
    """Path of a Chromium binary, installing Debian's package if it is missing."""
    found = _find_browser()
    if found:
        return found
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Chromium is not installed and cannot be installed here (needs root and apt-get); "
                    "install it with `apt-get install -y chromium` to run the browser test")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log = []
    for command in (["apt-get", "install", "-y", "chromium"], ["apt-get", "update"],
                    ["apt-get", "install", "-y", "chromium"]):
        try:
            done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=1200)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.append(f"{' '.join(command)}: {exc}")
            continue
        log.append(f"{' '.join(command)}: exit {done.returncode}\n{done.stderr[-1500:]}")
        if command[1] == "install" and done.returncode == 0:
            break
    found = _find_browser()
    if not found:
        pytest.skip("Chromium could not be installed (`apt-get install -y chromium` failed):\n" + "\n".join(log))
    return found


class DevTools:
    """A minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, binary, user_data_dir, log_path):
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # Move the child's ends above 2..4 so that the dup2 onto 3 and 4 cannot clobber them.
        high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        argv = [binary, *FLAGS, f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe", "about:blank"]
        self.pid = os.posix_spawn(binary, argv, dict(os.environ), file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
            (os.POSIX_SPAWN_DUP2, high_r, 3),
            (os.POSIX_SPAWN_DUP2, high_w, 4),
        ])
        os.close(high_r)
        os.close(high_w)
        self.write_fd, self.read_fd = to_chrome_w, from_chrome_r
        self.log_path = log_path
        self.buffer = b""
        self.next_id = 0
        self.events = []

    def _log_tail(self):
        try:
            with open(self.log_path, errors="replace") as handle:
                return handle.read()[-3000:]
        except OSError:
            return ""

    def _receive(self, deadline):
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from Chromium in time; its output:\n" + self._log_tail())
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the debugging pipe; its output:\n" + self._log_tail())
                self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)

    def send(self, method, params=None, session=None, timeout=60.0):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self.write_fd, data):]
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"DevTools {method} failed: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method, session, timeout=60.0):
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method and event.get("sessionId") == session:
                return event
        while True:
            event = self._receive(deadline)
            self.events.append(event)
            if event.get("method") == method and event.get("sessionId") == session:
                return event

    def drain(self, seconds):
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._receive(deadline))
        except TimeoutError:
            pass

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        for fd in (self.write_fd, self.read_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return
            time.sleep(0.05)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)


def _console_errors(events, session):
    errors = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append("console." + params["type"] + ": " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            errors.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
    return errors


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report of a demo run (one epoch) and of a file holding every group."""
    from lightning_ntk.demo import run_demo

    folder = tmp_path_factory.mktemp("browser")
    demo = str(folder / "demo.h5")
    run_demo(demo, epochs=1, quiet=True)
    full = write_full_run(str(folder / "full.h5"))
    return write_report([demo, full], folder / "report", progress=False, strict=True)


def _load(browser, session, path):
    """Navigate to ``path``; returns (images, section ids, title, page height) once it loaded."""
    browser.events.clear()
    browser.send("Page.navigate", {"url": "file://" + os.path.abspath(path)}, session=session)
    browser.wait_for("Page.loadEventFired", session)

    def evaluate(expression):
        return browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                            session=session)["result"]["value"]

    images = json.loads(evaluate("JSON.stringify(Array.from(document.images).map("
                                 "i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight})))"))
    sections = json.loads(evaluate("JSON.stringify(Array.from(document.querySelectorAll('h2[id]')).map(h => h.id))"))
    return images, sections, evaluate("document.title"), int(evaluate("document.documentElement.scrollHeight"))


def _broken(images):
    return [i for i in images if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]


def test_report_opens_in_headless_chromium(chromium, report, tmp_path):
    # A page with a missing image and a script error: the checks below must catch both.
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><title>bad</title></head><body>'
                   '<img src="missing.png" alt="missing"><script>console.error("boom")</script></body></html>')
    browser = DevTools(chromium, tempfile.mkdtemp(dir=tmp_path, prefix="profile-"), str(tmp_path / "chromium.log"))
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            browser.send(domain, session=session)

        images, _, _, _ = _load(browser, session, bad)
        browser.drain(0.3)
        control_errors = _console_errors(browser.events, session)
        assert [i["alt"] for i in _broken(images)] == ["missing"]
        assert any("boom" in e for e in control_errors), control_errors
        assert any("missing.png" in e for e in control_errors), control_errors

        images, sections, title, height = _load(browser, session, report)
        browser.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": min(height, 16000),
                                                            "deviceScaleFactor": 1, "mobile": False}, session=session)
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        browser.drain(0.3)
        errors = _console_errors(browser.events, session)
    finally:
        browser.close()
    os.makedirs(ARTIFACTS, exist_ok=True)
    png = base64.b64decode(shot["data"])
    with open(os.path.join(ARTIFACTS, "report_browser.png"), "wb") as handle:
        handle.write(png)

    # The full file feeds every section; every image of the page is in the DOM and decoded.
    assert sections == ["runs", "latest"] + [s.anchor for s in SECTIONS]
    with open(report, encoding="utf-8") as handle:
        assert len(images) == handle.read().count("<img ") >= len(SECTIONS)
    assert not _broken(images), _broken(images)
    assert errors == [], errors
    assert title == "lightning_ntk report: demo, full"
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, shot_height = struct.unpack(">II", png[16:24])
    assert width == 1280 and shot_height == min(height, 16000)
