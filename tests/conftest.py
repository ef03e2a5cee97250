"""Shared fixtures: a scripted aiohttp server on 127.0.0.1 (port 0) that counts arrivals."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, settings
from redis_proxy import RedisProxy
from redis_server import new_redis_server

import resilient
from resilient.testing import RedisServer

# Shared, noisy 2-core machines: no per-example deadline; the pytest-timeout bounds each test.
settings.register_profile("resilient", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("resilient")

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Arrival:
    """One request that reached the server: loop time, method, path, headers, body."""

    time: float
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class ScriptedServer:
    """A real aiohttp server whose replies a test scripts.

    ``script(path, *replies)`` queues replies for ``path``: each a status int, or an
    async ``(request) -> response`` callable; once the queue is empty the path's
    ``default`` (200 "ok") answers. ``arrivals`` records every request in order.
    """

    url: str = ""
    arrivals: list[Arrival] = field(default_factory=list, repr=False)
    queues: dict[str, list[int | Reply]] = field(default_factory=dict, repr=False)
    defaults: dict[str, int | Reply] = field(default_factory=dict, repr=False)

    def script(self, path: str, *replies: int | Reply) -> None:
        self.queues.setdefault(path, []).extend(replies)

    def default(self, path: str, reply: int | Reply) -> None:
        self.defaults[path] = reply

    def count(self, path: str | None = None, method: str | None = None) -> int:
        return sum(
            1
            for a in self.arrivals
            if (path is None or a.path == path) and (method is None or a.method == method)
        )

    def by_path(self) -> Counter[str]:
        return Counter(a.path for a in self.arrivals)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        loop = asyncio.get_running_loop()
        self.arrivals.append(
            Arrival(loop.time(), request.method, request.path, dict(request.headers), body)
        )
        queue = self.queues.get(request.path)
        reply = queue.pop(0) if queue else self.defaults.get(request.path, 200)
        if isinstance(reply, int):
            return web.Response(status=reply, text=f"status {reply}")
        return await reply(request)


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    scripted = ScriptedServer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", scripted.handle)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    scripted.url = f"http://127.0.0.1:{port}"
    try:
        yield scripted
    finally:
        await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain session (no middlewares); tests pass ``middlewares=`` per request."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(scope="session")
def redis_server_session() -> Iterator[RedisServer]:
    """One ``redis-server`` for the session (see tests/redis_server.py)."""
    redis = new_redis_server()
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


@pytest.fixture
def redis_url(redis_server_session: RedisServer) -> str:
    """The URL of an empty Redis (the session's server, flushed)."""
    redis_server_session.flush()
    return redis_server_session.url


@pytest.fixture
async def proxy(redis_url: str, redis_server_session: RedisServer) -> AsyncIterator[RedisProxy]:
    """A :class:`RedisProxy` (delays, withholds or cuts replies) to the session's Redis,
    flushed."""
    between = RedisProxy(redis_server_session.port)
    await between.start()
    try:
        yield between
    finally:
        await between.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A Redis of the test's own, which it may stop and restart."""
    redis = new_redis_server()
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


@pytest.fixture(scope="session")
def redis_cluster_url(redis_server_session: RedisServer) -> Iterator[str]:
    """A three-master Redis Cluster on loopback (``redis-cli --cluster create``)."""
    import shutil
    import subprocess

    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.fail("redis-cli not found (it comes with Debian's redis-server)")
    nodes = [RedisServer(redis_server_session.binary, cluster=True) for _ in range(3)]
    for node in nodes:
        node.start()
    try:
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        for node in nodes:
            node.wait_for_cluster(cli)
        yield f"redis+cluster://127.0.0.1:{nodes[0].port}"
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_sentinel_url(redis_server_session: RedisServer) -> Iterator[str]:
    """A Sentinel watching a master of its own: ``redis+sentinel://127.0.0.1:port/name``."""
    master = RedisServer(redis_server_session.binary)
    master.start()
    sentinel = RedisServer(redis_server_session.binary, sentinel_of=master)
    sentinel.start()
    try:
        yield sentinel.url
    finally:
        sentinel.stop()
        master.stop()


@pytest.fixture
async def gate(server: ScriptedServer) -> AsyncIterator[asyncio.Event]:
    """An event that ``scripted.held`` replies wait for; set at teardown so the server
    can stop."""
    event = asyncio.Event()
    yield event
    event.set()


@pytest.fixture
def events() -> Iterator[list[resilient.Event]]:
    """Every event the policies send during the test, in order."""
    seen: list[resilient.Event] = []
    remove = resilient.add_hook(seen.append)
    yield seen
    remove()
