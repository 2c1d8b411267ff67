"""Loopback HTTP(S) servers for the Fleet proxy's tests and benchmark: an upstream that records what reached
it, and the proxy itself, each served by uvicorn in a thread of this process."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import uvicorn
from waits import wait_for

from zk0.deploy import processes
from zk0.deploy.fleet_proxy import FleetProxy, upstream_verify


class Upstream:
    """Stands in for the SuperLink: answers every POST with the body's SHA-256 and length, then ``stream``
    bytes in 1 MiB chunks (``x-stream`` request header), and records each path and headers it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.seen.append((scope["path"], headers))
        digest, size = hashlib.sha256(), 0
        while True:
            message = await receive()
            digest.update(message.get("body", b""))
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        stream = int(headers.get("x-stream", "0"))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-sha256", digest.hexdigest().encode()), (b"x-size", str(size).encode())]})
        chunk = b"z" * (1 << 20)
        for start in range(0, stream, len(chunk)):
            await send({"type": "http.response.body", "body": chunk[:stream - start], "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def serve(app, port: int, tls: Path | None) -> uvicorn.Server:
    """``app`` on 127.0.0.1:``port`` in a daemon thread (TLS with the server folder's certificate when given)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="auto", ws="none",
                            ssl_certfile=str(tls / "server.crt") if tls else None,
                            ssl_keyfile=str(tls / "server.key") if tls else None)
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    wait_for(lambda: server.started, f"a test server to start on 127.0.0.1:{port}", poll=0.02)
    return server


def proxy_pair(tls: Path | None) -> tuple[Upstream, int, int, list[uvicorn.Server]]:
    """An upstream and a Fleet proxy in front of it: (upstream, upstream port, proxy port, servers to stop)."""
    upstream, up_port, proxy_port = Upstream(), processes.free_port(), processes.free_port()
    scheme = "https" if tls else "http"
    proxy = FleetProxy(f"{scheme}://127.0.0.1:{up_port}", upstream_verify(str(tls / "ca.crt") if tls else None))
    servers = [serve(upstream, up_port, tls), serve(proxy, proxy_port, tls)]
    return upstream, up_port, proxy_port, servers
