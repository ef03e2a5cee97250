"""A real ``nginx`` on a free loopback port with a temporary config, for tests and benchmarks.

``NginxServer(binary, http_config)`` writes a config whose ``http { ... }`` block holds
``http_config`` with the placeholders ``{port}`` (the server's port) and ``{root}`` (its
directory, holding ``ok.txt``: the file a ``limit_req`` location serves) replaced, and runs
nginx in the foreground (``daemon off``) with every path (pid, logs, temp files) in a
temporary directory. ``start()`` waits until the port answers; ``stop()`` ends it.

Two ready-made configs: :func:`limit_req_config` (a ``limit_req`` leaky bucket in front
of a fixed reply, answering 429 with ``Retry-After``) and :func:`proxy_config` (a reverse
proxy to an upstream on loopback, answering 502 while the upstream is down).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

__all__ = ["NginxServer", "find_nginx", "limit_req_config", "proxy_config"]


def find_nginx() -> str | None:
    """The path of ``nginx`` (PATH, then Debian's place), or None."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/bin/nginx") if os.path.exists(p)), None
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def limit_req_config(rate: float, burst: int = 0, *, retry_after: str | None = "1") -> str:
    """``limit_req`` at ``rate`` requests/s, ``burst`` without queueing (``nodelay``),
    keyed by client address (every loopback client shares one bucket). A refused request
    gets ``429`` with ``Retry-After: retry_after`` (none if None); an accepted one gets
    ``200 ok``, a static file (``limit_req`` runs before the content phase, not before a
    ``return``)."""
    per_minute = round(rate * 60)  # nginx accepts r/s or r/m: r/m gives finer rates
    header = "" if retry_after is None else f"add_header Retry-After {retry_after} always;"
    return f"""
limit_req_zone $binary_remote_addr zone=api:1m rate={per_minute}r/m;
server {{
    listen 127.0.0.1:{{port}};
    server_name limited;
    location / {{
        limit_req zone=api burst={burst} nodelay;
        limit_req_status 429;
        error_page 429 = @limited;
        root {{root}};
        default_type text/plain;
        try_files /ok.txt =404;
    }}
    location @limited {{
        {header}
        return 429 "too many requests";
    }}
}}
"""


def proxy_config(upstream_port: int) -> str:
    """A reverse proxy to ``127.0.0.1:upstream_port``; 502 while nothing listens there."""
    return f"""
upstream backend {{
    server 127.0.0.1:{upstream_port} max_fails=0;
    keepalive 32;
}}
server {{
    listen 127.0.0.1:{{port}};
    location / {{
        proxy_pass http://backend;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_connect_timeout 1s;
        proxy_next_upstream off;
    }}
}}
"""


class NginxServer:
    """One ``nginx`` master (one worker) on 127.0.0.1:``port``; see the module docstring."""

    def __init__(self, binary: str, http_config: str, *, port: int | None = None) -> None:
        self.binary = binary
        self.port = _free_port() if port is None else port
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = tempfile.mkdtemp(prefix="resilient-nginx-")
        os.chmod(self._dir, 0o755)
        self._conf = os.path.join(self._dir, "nginx.conf")
        with open(os.path.join(self._dir, "ok.txt"), "w", encoding="ascii") as file:
            file.write("ok")
        self._write(http_config.replace("{port}", str(self.port)).replace("{root}", self._dir))
        self._proc: subprocess.Popen[bytes] | None = None

    def _write(self, http_config: str) -> None:
        d = self._dir
        user = "user root;\n" if os.geteuid() == 0 else ""
        with open(self._conf, "w", encoding="ascii") as file:
            file.write(
                f"{user}daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\n"
                f"error_log {d}/error.log warn;\n"
                "events { worker_connections 1024; }\n"
                "http {\n"
                f"    access_log off;\n"
                f"    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n"
                f"    fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n"
                f"    scgi_temp_path {d}/scgi;\n"
                f"    keepalive_requests 100000;\n"
                f"{http_config}\n}}\n"
            )

    def start(self) -> None:
        """Start nginx and wait (at most 10 s) until its port accepts connections."""
        self._proc = subprocess.Popen(
            [self.binary, "-p", self._dir, "-c", self._conf, "-e", f"{self._dir}/error.log"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"nginx exited at start: {err.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nginx did not start on port {self.port}")

    def stop(self) -> None:
        """Stop nginx (SIGTERM, then SIGKILL after 5 s); ``start()`` may run it again."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            if proc.stderr is not None:
                proc.stderr.close()

    def error_log(self) -> str:
        """nginx's error log so far (``limit_req`` logs every refused request there)."""
        try:
            with open(os.path.join(self._dir, "error.log"), encoding="utf-8") as file:
                return file.read()
        except OSError:
            return ""

    def close(self) -> None:
        """:meth:`stop`, then remove the temporary directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> NginxServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
