"""A TCP proxy on loopback that delays every reply by a fixed time (benchmark plumbing).

``DelayProxy(port, delay)`` listens on 127.0.0.1 (a free port, :attr:`DelayProxy.url`),
passes what clients send to ``127.0.0.1:port`` at once and hands what comes back to the
client ``delay`` seconds after it arrived (in order). Between a client and Redis it turns
every round trip into at least ``delay`` seconds, so round trips show as time.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["DelayProxy"]


class DelayProxy:
    """See the module docstring; ``async with DelayProxy(port, delay) as proxy``."""

    def __init__(self, port: int, delay: float) -> None:
        self._port = port
        self._delay = delay
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    async def __aenter__(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}/0"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        tasks = [
            asyncio.ensure_future(self._pipe(reader, up_writer, 0.0)),
            asyncio.ensure_future(self._pipe(up_reader, writer, self._delay)),
        ]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
                self._tasks.discard(task)
            for w in (writer, up_writer):
                w.close()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
        loop = asyncio.get_running_loop()
        while chunk := await src.read(65536):
            if delay:
                due = loop.time() + delay
                await asyncio.sleep(max(0.0, due - loop.time()))
            dst.write(chunk)
            await dst.drain()
