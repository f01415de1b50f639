"""Open a page in real headless Debian chromium and report what a person would see.

Talks the DevTools protocol over `--remote-debugging-pipe` (fd 3 in, fd 4 out, NUL-terminated
JSON), so no extra package is needed: navigates, waits for the load event, collects console
errors, uncaught exceptions and failed loads, reads every <img>'s decoded size, and takes a
screenshot. The browser runs with a fresh profile, no network services, and is ended by its
own PID.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage", "--remote-debugging-pipe", "--window-size=1280,2000"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class _Pipe:
    def __init__(self, write_fd: int, read_fd: int):
        self.w, self.r = write_fd, read_fd
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        want = self.next_id
        deadline = time.monotonic() + timeout
        while True:
            m = self.read(deadline)
            if m.get("id") == want:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def wait_event(self, name: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for e in self.events:
            if e.get("method") == name:
                return e
        while True:
            m = self.read(deadline)
            self.events.append(m)
            if m.get("method") == name:
                return m


IMAGES_JS = """JSON.stringify(Array.from(document.images).map(i => ({
  alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})))"""


def inspect_page(page: Path, screenshot: Path, timeout: float = 90) -> dict:
    """Load `page` (a file) and return {"images", "errors", "title", "screenshot_bytes"}."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()

    a, b = to_chrome_r, from_chrome_w

    def move_fds() -> None:  # in the child: chromium reads commands on fd 3, replies on fd 4
        import fcntl

        a2, b2 = fcntl.fcntl(a, fcntl.F_DUPFD, 10), fcntl.fcntl(b, fcntl.F_DUPFD, 10)
        os.dup2(a2, 3)  # dup2 makes 3 and 4 inheritable; the pipe's own fds are not
        os.dup2(b2, 4)

    proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            preexec_fn=move_fds, close_fds=False, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    pipe = _Pipe(to_chrome_w, from_chrome_r)
    try:
        targets = pipe.send("Target.getTargets", timeout=timeout)["targetInfos"]
        page_target = next(t["targetId"] for t in targets if t["type"] == "page")
        session = pipe.send("Target.attachToTarget", {"targetId": page_target,
                                                      "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.events.clear()
        pipe.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        pipe.wait_event("Page.loadEventFired", timeout)
        images = json.loads(pipe.send("Runtime.evaluate", {"expression": IMAGES_JS,
                                                           "returnByValue": True},
                                      session=session)["result"]["value"])
        title = pipe.send("Runtime.evaluate", {"expression": "document.title",
                                               "returnByValue": True},
                          session=session)["result"]["value"]
        shot = pipe.send("Page.captureScreenshot", {"format": "png",
                                                    "captureBeyondViewport": True},
                         session=session, timeout=timeout)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        errors = []
        for e in pipe.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                errors.append(f"exception: {d.get('text')} "
                              f"{d.get('exception', {}).get('description', '')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(f"console.{p['type']}: {p.get('args')}")
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Network.loadingFailed":
                errors.append(f"load failed: {p.get('errorText')}")
        try:
            pipe.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError):
            pass
        return {"images": images, "errors": errors, "title": title,
                "screenshot_bytes": screenshot.stat().st_size}
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child, by its handle
            proc.wait(timeout=10)
        os.close(to_chrome_w)
        os.close(from_chrome_r)
        shutil.rmtree(profile, ignore_errors=True)
