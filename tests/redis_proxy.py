"""A TCP proxy between a client and a real ``redis-server`` that withholds on demand.

:meth:`RedisProxy.hold_reply` withholds the reply to the next command that carries a
marker (Redis has run it; its answer comes late), :meth:`RedisProxy.hold_command`
withholds the command itself (Redis runs it late, after whatever the client sent next
on other connections). Everything after the held message on that connection waits with
it, until :meth:`RedisProxy.release`, or :meth:`RedisProxy.drop`, which loses a held
command on the way. A client that gives up closes its connection; the proxy still
delivers what it holds, then closes its side, as a network would.

A marker is any bytes of the command: ``b"$5\\r\\nadmit\\r\\n"`` matches a script's
``admit`` argument exactly (RESP frames each argument as ``$<length>\\r\\n<bytes>\\r\\n``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib

from resilient.storage._redis import _script

__all__ = ["RedisProxy", "arg", "script"]


def arg(text: str) -> bytes:
    """The RESP frame of one command argument: a marker that matches it exactly."""
    data = text.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def script(name: str) -> bytes:
    """A marker of every run of ``resilient/<name>.lua``: the SHA1 ``EVALSHA`` names it by."""
    return arg(hashlib.sha1(_script(name).encode()).hexdigest())


class RedisProxy:
    """Proxy to ``127.0.0.1:port``; ``url`` once :meth:`start` ran."""

    def __init__(self, port: int) -> None:
        self._port = port
        self.url = ""
        self._reply_marker: bytes | None = None
        self._command_marker: bytes | None = None
        self._gate = asyncio.Event()
        self._lost: set[asyncio.Event] = set()  # gates whose held commands are dropped
        self.held = asyncio.Event()
        """Set once a message was caught by the armed hold (cleared by the next hold)."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"
        return self.url

    def hold_reply(self, marker: bytes) -> None:
        """Withhold the reply to the next command containing ``marker``."""
        self._arm()
        self._reply_marker = marker

    def hold_command(self, marker: bytes) -> None:
        """Withhold the next command containing ``marker`` on its way to Redis."""
        self._arm()
        self._command_marker = marker

    def _arm(self) -> None:
        self._gate = asyncio.Event()
        self.held.clear()

    def release(self) -> None:
        """Deliver what is held (and let everything through until the next hold)."""
        self._reply_marker = self._command_marker = None
        self._gate.set()

    def drop(self) -> None:
        """Lose the held command (and what follows it on its connection): Redis never
        sees it."""
        self._lost.add(self._gate)
        self.release()

    async def close(self) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        except OSError:  # Redis is down: the client sees its connection closed, as it would
            writer.close()
            return
        pending: list[asyncio.Event | None] = []  # per command sent: the gate of its reply

        async def upstream() -> None:
            gate: asyncio.Event | None = None
            with contextlib.suppress(OSError):
                while chunk := await reader.read(65536):
                    if self._command_marker is not None and self._command_marker in chunk:
                        self._command_marker, gate = None, self._gate
                        self.held.set()
                    reply_gate = None
                    if self._reply_marker is not None and self._reply_marker in chunk:
                        self._reply_marker, reply_gate = None, self._gate
                        self.held.set()
                    pending.append(reply_gate)
                    if gate is not None:
                        await gate.wait()
                        if gate in self._lost:
                            continue
                    up_writer.write(chunk)
                    await up_writer.drain()
                if gate is not None:
                    await gate.wait()
                up_writer.write_eof()  # the client left: Redis runs what it got, then closes

        async def downstream() -> None:
            gate: asyncio.Event | None = None
            while chunk := await up_reader.read(65536):
                if pending:
                    gate = pending.pop(0) or gate
                if gate is not None:
                    await gate.wait()
                with contextlib.suppress(OSError):
                    writer.write(chunk)
                    await writer.drain()
            writer.close()

        pumps = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        self._tasks.update(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)  # closed, or the proxy closed
        writer.close()
        up_writer.close()
