"""A real ``redis-server`` on a free loopback port, persistence off, for tests and benchmarks.

``RedisServer(binary)`` takes the path of Debian's ``redis-server`` (see
:func:`find_redis_server`); ``start()`` / ``stop()`` (a kill, as a crash) / ``flush()``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

__all__ = ["RedisServer", "find_redis_server"]


def find_redis_server() -> str | None:
    """The path of ``redis-server`` (PATH, then Debian's places), or None."""
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.path.exists(p)),
        None,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SENTINEL_NAME = "resilient"
"""The master's name in a Sentinel started by :class:`RedisServer`."""


def _cluster_port() -> int:
    """A free port whose cluster bus port (``+ 10000``) is free too."""
    for _ in range(100):
        port = _free_port()
        if port + 10_000 <= 65_535:
            try:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + 10_000))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1; ``stop()`` kills it, ``start()`` restarts
    it on the same port (empty: persistence is off). ``cluster=True``: a Redis Cluster node
    (its bus on ``port + 10000``), to be joined with ``redis-cli --cluster create``.
    ``sentinel_of=master``: a Sentinel watching ``master`` under the name
    :data:`SENTINEL_NAME`; its ``url`` is the ``redis+sentinel://`` URI."""

    def __init__(
        self, binary: str, *, cluster: bool = False, sentinel_of: RedisServer | None = None
    ) -> None:
        self.binary = binary
        self.cluster = cluster
        self.sentinel_of = sentinel_of
        self.port = _cluster_port() if cluster else _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        if sentinel_of is not None:
            self.url = f"redis+sentinel://127.0.0.1:{self.port}/{SENTINEL_NAME}"
        self._dir = tempfile.mkdtemp(prefix="resilient-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        if self.sentinel_of is not None:
            conf = os.path.join(self._dir, "sentinel.conf")
            with open(conf, "w", encoding="ascii") as file:
                file.write(
                    f"port {self.port}\nbind 127.0.0.1\ndir {self._dir}\n"
                    f"sentinel monitor {SENTINEL_NAME} 127.0.0.1 {self.sentinel_of.port} 1\n"
                )
            return [self.binary, conf, "--sentinel"]
        return [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir,
            "--protected-mode",
            "yes",
            *(["--cluster-enabled", "yes"] if self.cluster else []),
        ]

    def start(self) -> None:
        self._proc = subprocess.Popen(
            self._command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def wait_for_cluster(self, cli: str, timeout: float = 20.0) -> None:
        """Block until this node reports ``cluster_state:ok``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = subprocess.run(
                [cli, "-p", str(self.port), "cluster", "info"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout
            if "cluster_state:ok" in info:
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis cluster node {self.port} never became ok")

    def stop(self) -> None:
        """Kill the server at once (no shutdown save), as a crash would."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            sock.recv(16)
