"""A robot owner's folder (``zk0 client keygen DIR``) and what its SuperNode meets when it dials.

The folder holds ``node_key`` / ``node_key.pub`` (an ECDSA P-384 key pair in OpenSSH format, as
Flower's SuperNode authentication expects), ``runtime.secret`` (shared by the SuperNode and its
resident worker) and the ``pids/`` and ``logs/`` of the processes it runs.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from zk0.deploy.pki import write_key, write_private
from zk0.deploy.processes import DeployError, exited_error, launch_log, running_pid


def keygen(folder: Path) -> str:
    """Write a SuperNode key pair into ``folder``; return the public key line to send to the operator."""
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / "node_key", folder / "node_key.pub"
    if private.exists():
        raise DeployError(f"{private} exists; keep using it (its public key is in {public}) or choose another folder")
    key = ec.generate_private_key(ec.SECP384R1())
    write_key(private, key, serialization.PrivateFormat.OpenSSH)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    public.write_text(f"{line} zk0-node\n")
    return public.read_text().strip()


def runtime_secret(folder: Path) -> Path:
    """A fresh random secret (mode 600) shared by a SuperNode and its worker, so no other local
    process can take the node's tasks from its loopback runtime API."""
    path = folder / "runtime.secret"
    write_private(path, os.urandom(32))
    return path


def wait_connected(folder: Path, name: str, timeout: float) -> str | None:
    """The node id once the SuperNode ``name`` is accepted by the SuperLink; None if still trying.

    A SuperNode that was refused (unregistered key, untrusted certificate) exits: that becomes
    a :class:`DeployError` with the reason from its log.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if match := re.search(r"SuperNode ID: (\d+)", launch_log(folder, name)):
            return match.group(1)
        if running_pid(folder, name) is None:
            raise exited_error(folder, name)
        time.sleep(0.3)
    return None


def why_not_connected(server: str, ca: Path | None) -> str:
    """Why a SuperNode dialling ``server`` (TLS checked against ``ca``, or plain when None) is not accepted,
    found by dialling it the same way: no listener, a TLS mismatch either way, a certificate from
    another CA or for another name, or, when all of that is fine, an unregistered key."""
    host, _, port = server.rpartition(":")
    host = host.strip("[]")
    try:
        sock = socket.create_connection((host, int(port)), timeout=10)
    except (OSError, ValueError) as err:
        return (f"nothing accepts connections at {server} ({getattr(err, 'strerror', None) or err}): is the server "
                f"up, the address right and its port open?")
    with sock:
        if ca is None:
            return _plain_answer(sock, server)
        context = ssl.create_default_context(cafile=str(ca))
        try:
            with context.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as err:
            if err.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
                return (f"the server's certificate does not name {host}: dial a name the operator gave "
                        f"`zk0 server init --host`, or ask them to add {host}")
            return f"the server's certificate is not signed by {ca} ({err.verify_message}): get the federation's ca.crt"
        except (ssl.SSLError, OSError):
            return f"{server} does not speak TLS (a server started with --insecure?): ask the operator which it is"
    return (f"TLS to {server} works but the SuperLink has not accepted this node: is its key registered "
            f"(`zk0 server add-node`)?")


def _plain_answer(sock: socket.socket, server: str) -> str:
    """What an --insecure node learns from a plain HTTP request: a TLS server answers no HTTP."""
    sock.settimeout(10)
    try:
        sock.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: zk0\r\nContent-Length: 0\r\n\r\n")
        answer = sock.recv(64)
    except OSError:
        answer = b""
    if not answer.startswith(b"HTTP/"):
        return f"{server} speaks TLS: start with --ca ca.crt (from the operator) instead of --insecure"
    return f"{server} answers plain HTTP but has not accepted this node; see the SuperNode's log"
