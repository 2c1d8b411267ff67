"""The federation's only door to the network: a reverse proxy that forwards Flower's Fleet API and nothing else.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (submit and stop runs, register and
remove node keys, read logs) and the Runtime API (ServerApps) on one port, and the open-source
Control API has no user authentication. So zk0's SuperLink listens on loopback only, where the
operator's ``flwr`` and the ServerApps reach it, and this proxy listens on the public address: it
terminates TLS with the SuperLink's certificate, forwards ``POST`` on the exact Fleet paths a
SuperNode calls, and answers 404 to anything else. Node authentication stays Flower's: the signed
headers a SuperNode sends pass through untouched and the SuperLink checks them.

Run as ``python -m zk0.deploy.fleet_proxy`` by ``zk0 server start``.
"""

from __future__ import annotations

import argparse
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# Every route of Flower 1.42's Fleet router (flwr/superlink/routers/fleet/router.py); a test keeps them equal.
FLEET_PATHS = frozenset(f"/v1/fleet/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received"))
# Headers that describe one hop, not the request (RFC 9110 section 7.6.1), and the Host the upstream gets anew.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                        b"trailer", b"transfer-encoding", b"upgrade", b"proxy-connection", b"host"})
BLOCK = 1 << 20  # bytes per forwarded write: 64 KiB writes gave 176 MiB/s uploads on loopback, 1 MiB 285
NOT_EXPOSED = b'{"detail": "not exposed: this port serves only the Flower Fleet API to SuperNodes"}'
log = logging.getLogger("zk0.deploy.fleet_proxy")


class FleetProxy:
    """An ASGI app forwarding Fleet API calls to ``upstream`` (the SuperLink on loopback), streaming both ways.

    The path forwarded is the allow-list's own string, never the caller's, and a request with a query
    string or a percent-encoded path is refused: no spelling of a Control path can slip through.
    Responses stream without a read deadline, as Flower's own streaming calls expect.
    """

    def __init__(self, upstream: str, verify: ssl.SSLContext | bool) -> None:
        self.upstream = upstream.rstrip("/")
        self.verify = verify
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                timeout = httpx.Timeout(connect=15.0, read=None, write=None, pool=None)
                self.client = httpx.AsyncClient(verify=self.verify, timeout=timeout, http1=True)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = fleet_path(scope)
        if path is None:
            await _reply(send, 404, NOT_EXPOSED)
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        request = self.client.build_request("POST", f"{self.upstream}{path}", headers=headers,
                                            content=_body(receive))
        try:
            response = await self.client.send(request, stream=True)
        except ConnectionAbortedError:
            return  # the SuperNode hung up mid-request: nobody is left to answer
        except httpx.HTTPError as err:
            log.warning("upstream SuperLink unreachable for %s: %s", path, type(err).__name__)
            await _reply(send, 502, b'{"detail": "the SuperLink behind this port is not answering"}')
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]})
            async for chunk in response.aiter_raw(BLOCK):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


def fleet_path(scope: Scope) -> str | None:
    """The allow-listed Fleet path this request asks for, or None for anything else (method, path, query)."""
    path = scope.get("path", "")
    raw = scope.get("raw_path") or path.encode()
    if scope.get("method") != "POST" or scope.get("query_string") or raw != path.encode():
        return None
    return next((allowed for allowed in FLEET_PATHS if allowed == path), None)


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    """The request body in blocks of up to ``BLOCK`` bytes as it arrives (fewer, larger upstream writes);
    a caller that hangs up aborts the upstream call."""
    block = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionAbortedError("the SuperNode hung up mid-request")
        block += message.get("body", b"")
        more = message.get("more_body", False)
        if len(block) >= BLOCK or not more:
            yield bytes(block)
            block.clear()
        if not more:
            return


async def _reply(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def upstream_verify(cafile: str | None) -> ssl.SSLContext | bool:
    """TLS to the loopback SuperLink checked against the federation's CA; False only for an --insecure SuperLink."""
    return ssl.create_default_context(cafile=cafile) if cafile else False


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m zk0.deploy.fleet_proxy", description=__doc__.split("\n")[0])
    parser.add_argument("--host", required=True, help="Public address to listen on.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="The SuperLink's loopback URL, e.g. https://127.0.0.1:9093")
    parser.add_argument("--certfile", help="TLS certificate to serve (omit for an --insecure federation).")
    parser.add_argument("--keyfile")
    parser.add_argument("--cafile", help="CA that signed the upstream SuperLink's certificate.")
    args = parser.parse_args(argv)
    uvicorn.run(FleetProxy(args.upstream, upstream_verify(args.cafile)), host=args.host, port=args.port,
                ssl_certfile=args.certfile, ssl_keyfile=args.keyfile, lifespan="on", access_log=True,
                log_level="info", server_header=False, date_header=False, timeout_graceful_shutdown=5, ws="none")


if __name__ == "__main__":
    main()
