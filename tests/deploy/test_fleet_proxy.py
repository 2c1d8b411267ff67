"""The Fleet proxy: the only port a federation exposes forwards Flower's Fleet API, byte for byte, and refuses
every other path however it is spelled."""

from __future__ import annotations

import hashlib
import os
import ssl

import httpx
import pytest
from proxyserve import proxy_pair
from waits import deadline

from zk0.deploy import node_folder, processes, server_folder
from zk0.deploy.fleet_proxy import FLEET_PATHS, fleet_path


def test_the_allow_list_is_exactly_flowers_fleet_router():
    from flwr.superlink.routers.fleet.router import router

    assert FLEET_PATHS == {route.path for route in router.routes}
    assert {method for route in router.routes for method in route.methods} == {"POST"}


@pytest.mark.parametrize("method,path,raw,query", [
    ("POST", "/v1/control/list-runs", None, b""),
    ("POST", "/v1/control/register-node", None, b""),
    ("POST", "/v1/runtime/pull-app-inputs", None, b""),
    ("GET", "/docs", None, b""),
    ("GET", "/health", None, b""),
    ("GET", "/v1/fleet/get-run", None, b""),
    ("POST", "/v1/fleet/../control/stop-run", None, b""),
    ("POST", "/v1/fleet/get-run/", None, b""),
    ("POST", "/v1/fleet/get-run", None, b"x=1"),
    ("POST", "/v1/fleet/get-run", b"/v1/fleet/get%2Drun", b""),
    ("POST", "/V1/FLEET/GET-RUN", None, b""),
])
def test_anything_but_a_fleet_post_is_refused(method, path, raw, query):
    scope = {"method": method, "path": path, "raw_path": raw or path.encode(), "query_string": query}
    assert fleet_path(scope) is None


def test_every_fleet_path_passes_as_the_allow_lists_own_string():
    for path in FLEET_PATHS:
        scope = {"method": "POST", "path": path, "raw_path": path.encode(), "query_string": b""}
        assert fleet_path(scope) == path


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs") / "server"
    server_folder.init_server(folder, [], "127.0.0.1", processes.free_port(), control_port=processes.free_port())
    upstream, up_port, port, servers = proxy_pair(folder)
    yield folder, upstream, up_port, port
    for server in servers:
        server.should_exit = True


def test_a_fleet_call_reaches_the_superlink_byte_for_byte_with_its_signed_headers(tls_pair):
    folder, upstream, _, port = tls_pair
    body = os.urandom(8 << 20)
    signed = {"flwr-public-key": "cHVi", "flwr-signature": "c2ln", "flwr-timestamp": "2026-11-29T00:00:00",
              "content-type": "application/protobuf", "x-stream": str(5 << 20)}
    with httpx.Client(verify=ssl.create_default_context(cafile=folder / "ca.crt"), timeout=deadline()) as client:
        reply = client.post(f"https://127.0.0.1:{port}/v1/fleet/push-object", content=body, headers=signed)
    assert reply.status_code == 200
    assert reply.headers["x-sha256"] == hashlib.sha256(body).hexdigest() and reply.headers["x-size"] == str(len(body))
    assert reply.content == b"z" * (5 << 20), "the streamed answer arrives whole"
    path, headers = upstream.seen[-1]
    assert path == "/v1/fleet/push-object"
    assert {k: headers[k] for k in signed} == signed
    assert headers["host"].endswith(f":{tls_pair[2]}"), "the SuperLink sees its own address, not the public one"


def test_control_calls_never_reach_the_superlink(tls_pair):
    folder, upstream, _, port = tls_pair
    before = len(upstream.seen)
    with httpx.Client(verify=ssl.create_default_context(cafile=folder / "ca.crt"), timeout=deadline()) as client:
        for path in ("/v1/control/list-runs", "/v1/control/stop-run", "/v1/control/register-node",
                     "/v1/control/unregister-node", "/v1/control/start-run", "/docs"):
            reply = client.post(f"https://127.0.0.1:{port}{path}", content=b"x")
            assert reply.status_code == 404 and "only the Flower Fleet API" in reply.text
    assert len(upstream.seen) == before


def test_a_silent_superlink_gives_a_502_not_a_hang(tmp_path):
    from proxyserve import serve

    from zk0.deploy.fleet_proxy import FleetProxy

    port = processes.free_port()
    server = serve(FleetProxy(f"http://127.0.0.1:{processes.free_port()}", False), port, None)
    try:
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/fleet/get-run", content=b"", timeout=deadline())
        assert reply.status_code == 502 and "not answering" in reply.text
    finally:
        server.should_exit = True


def test_a_node_that_is_not_accepted_is_told_why(tmp_path):
    """`zk0 client start` gives up after --wait with the reason it finds by dialling the server as the node did."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from proxyserve import Upstream, serve

    from zk0.deploy.pki import make_server_cert, write_cert, write_key

    ours, other = tmp_path / "ours", tmp_path / "other"
    for folder in (ours, other):
        server_folder.init_server(folder, [], "127.0.0.1", processes.free_port(), control_port=processes.free_port())
    elsewhere = tmp_path / "elsewhere"  # a certificate from our CA that names only another host
    elsewhere.mkdir()
    ca_key = serialization.load_pem_private_key((tmp_path / "ours-ca" / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((ours / "ca.crt").read_bytes())
    key, cert = make_server_cert(ca_key, ca_cert, ["robots.example.org"])
    write_key(elsewhere / "server.key", key, serialization.PrivateFormat.PKCS8)
    write_cert(elsewhere / "server.crt", cert)
    tls, plain, misnamed = processes.free_port(), processes.free_port(), processes.free_port()
    servers = [serve(Upstream(), tls, ours), serve(Upstream(), plain, None), serve(Upstream(), misnamed, elsewhere)]
    try:
        why = node_folder.why_not_connected
        assert "nothing accepts connections at 127.0.0.1:1" in why("127.0.0.1:1", ours / "ca.crt")
        assert "is not signed by" in why(f"127.0.0.1:{tls}", other / "ca.crt")
        assert "does not name 127.0.0.1" in why(f"127.0.0.1:{misnamed}", ours / "ca.crt")
        assert "does not speak TLS" in why(f"127.0.0.1:{plain}", ours / "ca.crt")
        assert "speaks TLS: start with --ca" in why(f"127.0.0.1:{tls}", None)
        assert "is its key registered" in why(f"127.0.0.1:{tls}", ours / "ca.crt")
        assert "answers plain HTTP" in why(f"127.0.0.1:{plain}", None)
    finally:
        for server in servers:
            server.should_exit = True
