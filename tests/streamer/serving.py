"""A server of the streamer (`DvpServer`, the cluster's front) run in a background thread
with its own event loop, for the tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class RunningServer:
    server: Any
    url: str
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def ws_url(self) -> str:
        base = self.url.split("?")[0].replace("http://", "ws://").replace("https://", "wss://")
        return base + "ws"

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def serve_in_thread(make: Callable[[], Any]) -> RunningServer:
    """Make a server (`make()`, in the new thread's event loop) and run it there until
    `stop_server`; raises what `make` or `start` raised."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            server = make()
            box["url"] = loop.run_until_complete(server.start())
            box["server"] = server
        except BaseException as err:  # noqa: BLE001  (re-raised in the test below)
            box["error"] = err
        ready.set()
        if "server" in box:
            loop.run_forever()

    thread = threading.Thread(target=main, name="test-server", daemon=True)
    thread.start()
    ready.wait(30)
    if "error" in box:
        raise box["error"]
    return RunningServer(box["server"], box["url"], loop, thread)


def stop_server(handle: RunningServer) -> None:
    """Close a server of `serve_in_thread` (its sessions first) and end its thread."""
    async def shutdown(server: Any = handle.server) -> None:
        await server._on_shutdown(server.app)
        await server.close()

    try:
        handle.call(shutdown(), 60)
    finally:
        handle.loop.call_soon_threadsafe(handle.loop.stop)
        handle.thread.join(10)
