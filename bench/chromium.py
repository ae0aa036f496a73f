"""Headless Chromium driven over the DevTools protocol: for the browser benchmark
(bench/browser_latency.py) and the real-browser test (tests/streamer/test_browser.py).

`launch(profile, url, extra_args)` starts Chromium (headless, no sandbox, no GPU, no
background networking or component updates; DevTools on a free port of 127.0.0.1) and
returns the process and port; `page_socket(port, url)` finds the page's DevTools WebSocket;
`DevTools(ws)` calls methods and evaluates JavaScript in the page; `stop(proc)` ends it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or \
    shutil.which("google-chrome")
BASE_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--disable-sync",
             "--disable-default-apps", "--mute-audio",
             "--autoplay-policy=no-user-gesture-required"]


class DevTools:
    """A minimal Chrome DevTools protocol client over one page's WebSocket (a
    websockets.sync client connection)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0

    def call(self, method: str, timeout: float = 20.0, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"DevTools {method} did not answer in {timeout} s")
            reply = json.loads(self.ws.recv(timeout=left))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"DevTools {method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str, timeout: float = 20.0) -> Any:
        """The value of `expression` in the page. While the page is still loading it has no
        execution context yet; that answer is retried until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = self.call("Runtime.evaluate", timeout=max(0.1, deadline - time.monotonic()),
                                   expression=expression, returnByValue=True, awaitPromise=True)
                break
            except RuntimeError as err:
                if "Cannot find default execution context" not in str(err) or \
                        time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")


def launch(profile: Path, url: str, extra_args: list[str] | tuple[str, ...] = ()
           ) -> tuple[subprocess.Popen, int]:
    """Start Chromium on `url` with its profile in `profile` (its log in
    profile/chromium.log); returns (process, DevTools port)."""
    if CHROMIUM is None:
        raise RuntimeError("Chromium is not installed (apt-get install chromium)")
    args = [CHROMIUM, *BASE_ARGS, *extra_args, "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0", f"--user-data-dir={profile}", url]
    log = profile / "chromium.log"
    with open(log, "wb") as err:  # a file, not a pipe: Chromium's logging cannot block it
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "HOME": str(profile)})
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if port_file.is_file() and port_file.read_text().strip():
            return proc, int(port_file.read_text().split()[0])
        if proc.poll() is not None:
            raise RuntimeError(f"Chromium exited: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError("Chromium did not open its DevTools port within 60 s")


def page_socket(port: int, url: str) -> str:
    """The DevTools WebSocket address of the page whose address starts with `url`."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
            targets = json.load(r)
        for target in targets:
            if target.get("type") == "page" and target.get("url", "").startswith(url):
                return target["webSocketDebuggerUrl"]
        time.sleep(0.2)
    raise TimeoutError("the page did not appear in Chromium's targets")


def stop(proc: subprocess.Popen) -> None:
    """End Chromium (terminate, then kill after 10 s)."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
