"""Resident ClientApp worker: one long-lived process runs every zk0 message of a SuperNode.

By default a SuperNode's SuperExec starts a new ``flwr-clientapp`` process per message,
which imports torch and LeRobot, installs the FAB and rebuilds the policy and dataset every
time. A SuperNode started with ``--isolation process`` starts nothing: this worker acquires
its ClientApp tasks over the SuperNode's Runtime API and runs them here, with zk0's
installed ClientApp, so the policy, processors and loaders (``zk0.client_app._RUNTIMES``)
are built once per run. Each task runs as Flower's ``run_clientapp`` runs it (same pull,
heartbeat, reply and status calls), minus the FAB installation and the process exit.

The worker runs its own installed code, never the FAB's, so it refuses (error reply) tasks
of any other app or zk0 version: a node operator never serves a foreign run by mistake.

Run: ``python -m zk0.deploy.resident --appio-api-address 127.0.0.1:9094 --insecure`` next to
``flower-supernode --isolation process``.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from importlib.metadata import version
from logging import ERROR, INFO
from typing import TYPE_CHECKING

import httpx

from flwr.app import Context, Message
from flwr.common.logger import log

from zk0 import client_app
from zk0.flower_seams import (RUNTIME_API_ADDRESS, TASK_COMPLETED, TASK_FAILED, acquire_task, acquirer_client,
                              add_auth_secret_option, bounded_retry, exit_with_parent, fab_clientapp, failed_reply,
                              pull_task, push_message, push_task_output, read_auth_secret, read_root_certificates,
                              refused_reply, send_task_heartbeat, set_task_identity, shared_retry, start_heartbeat,
                              stop_on_signals, task_client)

if TYPE_CHECKING:
    from zk0.flower_seams import Fab, RetryInvoker, Run, RuntimeHttpClient

APP_ID = "zk0/zk0"  # publisher/name in pyproject.toml
APP_REF = "zk0.client_app:app"
POLL_SECONDS = 0.2  # idle wait between AcquireTask calls (loopback, cheap)
TASK_RETRY_SECONDS = 600.0  # how long one task's calls ride out a SuperNode that is briefly away
TRANSIENT_HTTP = (502, 503, 504)


class Worker:
    """A connection to one SuperNode's Runtime API that runs its ClientApp tasks.

    Each task gets its own thread, and the ClientApp runs one message at a time. Pulling a
    message happens outside that lock: a message whose content never fully reaches the
    SuperNode (the SuperLink died mid-transfer) then keeps only its own thread waiting,
    not the rounds that follow.
    """

    def __init__(self, address: str, insecure: bool, root_certificates: bytes | None,
                 auth_secret: bytes | None = None) -> None:
        self.address, self.insecure, self.root_certificates = address, insecure, root_certificates
        self.retry = shared_retry()  # shared, so exiting can cut every retry short
        self.acquirer = acquirer_client(address, insecure, root_certificates, self.retry, auth_secret)
        self.app_lock = threading.Lock()

    def close(self) -> None:
        """On exit: the SuperNode may be gone, so try each remaining call once, then close."""
        self.retry.max_tries = 1
        self.acquirer.close()

    def serve(self) -> None:
        """Acquire and run ClientApp tasks until the process is stopped."""
        while True:
            if task := acquire_task(self.acquirer):
                token, task_id = task
                threading.Thread(target=self.run_task, args=(token,), daemon=True, name=f"zk0-task-{task_id}").start()
            else:
                time.sleep(POLL_SECONDS)

    def run_task(self, token: str) -> None:
        """Run one task like ``flwr.supernode.runtime.run_clientapp``: every outcome gets a reply and a status."""
        client = task_client(self.address, self.insecure, self.root_certificates, task_retry_invoker(), token)
        heartbeat = start_heartbeat(task_heartbeat(client))
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        status, details = TASK_FAILED, "the zk0 resident worker stopped during the task"
        try:
            message, context, run, fab, task_id = pull_task(client)
            with self.app_lock:
                set_task_identity(task_id, run.run_id, context.node_id)
                if reason := refusal(run, fab):
                    log(ERROR, "zk0 resident worker refused a task: %s", reason)
                    reply, details = refused_reply(message, reason), reason
                else:
                    reply = run_app(message, context)
                    status, details = TASK_COMPLETED, ""
        except Exception as ex:  # pylint: disable=broad-exception-caught
            log(ERROR, "ClientApp raised an exception", exc_info=ex)
            details = f"{type(ex)}:<'{ex}'>"  # Flower's format, shown by the ServerApp
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            if reply is None and message is not None:  # the app raised, or a signal stopped the worker
                reply = failed_reply(message, details)
            if reply is not None and context is not None:
                try:
                    push_message(client, reply, context)
                except Exception as ex:  # pylint: disable=broad-exception-caught
                    log(ERROR, "Failed to push reply message", exc_info=ex)
            push_task_output(client, context, status, details)
            client.close()


def task_retry_invoker() -> RetryInvoker:
    """Retries for one task's calls: transient failures for a while, anything else fails that task.

    Flower's own invoker answers a revoked task token (401) with SIGINT to the whole process,
    right for a one-message ``flwr-clientapp``, wrong for a worker holding every round's state.
    """
    return bounded_retry(TASK_RETRY_SECONDS, lambda err: isinstance(err, httpx.HTTPStatusError)
                         and err.response.status_code not in TRANSIENT_HTTP)


def task_heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """The task's heartbeat; unlike Flower's, a revoked task does not signal the process (see above)."""
    def beat() -> bool:
        try:
            send_task_heartbeat(client)
        except (httpx.TransportError, httpx.HTTPStatusError):
            return False
        return True
    return beat


def refusal(run: Run, fab: Fab) -> str | None:
    """Why this worker must not run ``run`` (another app, or zk0 code other than its own), else None."""
    if run.fab_id != APP_ID:
        return f"run {run.run_id} is app {run.fab_id!r}; this worker serves only {APP_ID!r}"
    clientapp = fab_clientapp(fab)
    if clientapp != APP_REF:
        return f"run {run.run_id} names ClientApp {clientapp!r}; this worker runs only {APP_REF!r}"
    if run.fab_version != version("zk0"):
        return (f"run {run.run_id} is zk0 {run.fab_version} but this worker runs zk0 {version('zk0')}: "
                "install the run's version on this node or submit the run from this version")
    return None


def run_app(message: Message, context: Context) -> Message:
    """Run zk0's ClientApp on the message, building the run's resident runtime on its first message.

    Only the latest run's runtime is kept: a finished run's policy must not stay in memory.
    Each build is logged, so a deployment (and its tests) can see that rounds reuse it.
    """
    key = (context.run_id, context.node_id)
    for old in [k for k in client_app._RUNTIMES if k != key]:
        del client_app._RUNTIMES[old]
    if key not in client_app._RUNTIMES:
        start = time.monotonic()
        client_app.runtime(context)
        log(INFO, "zk0 resident worker: built policy and dataset of run %s in %.1f s", context.run_id,
            time.monotonic() - start)
    return client_app.app(message=message, context=context)


def serve(address: str, insecure: bool, root_certificates: bytes | None, parent_pid: int | None,
          auth_secret: bytes | None = None) -> None:
    """Serve the SuperNode's Runtime API at ``address`` until SIGTERM/SIGINT or until ``parent_pid`` exits.

    ``auth_secret`` is the SuperNode's ``--superexec-auth-secret-file`` content, when it has one.
    """
    worker = Worker(address, insecure, root_certificates, auth_secret)
    stop_on_signals("zk0 resident worker stopped.", worker.close)
    if parent_pid is not None:
        exit_with_parent(parent_pid)
    log(INFO, "zk0 resident worker serving the Runtime API at %s", address)
    worker.serve()


def main(argv: list[str] | None = None) -> None:
    """``python -m zk0.deploy.resident``: flags as ``flwr-clientapp``'s, without a task token."""
    parser = argparse.ArgumentParser(description="Long-lived zk0 ClientApp worker for a SuperNode "
                                                 "started with --isolation process")
    parser.add_argument("--appio-api-address", "--runtime-api-address", dest="address",
                        default=RUNTIME_API_ADDRESS,
                        help="the SuperNode's Runtime API (its --host:--port; default %(default)s)")
    parser.add_argument("--insecure", action="store_true",
                        help="plain HTTP: the SuperNode's Runtime API has no --ssl-certfile (loopback only)")
    parser.add_argument("--root-certificates", metavar="CA",
                        help="PEM CA that signed the SuperNode's Runtime API certificate (--ssl-ca-certfile)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (e.g. the SuperNode) exits")
    add_auth_secret_option(parser)
    args = parser.parse_args(argv)
    serve(args.address, args.insecure, read_root_certificates(args.root_certificates, args.insecure),
          args.parent_pid, read_auth_secret(args.superexec_auth_secret_file))


if __name__ == "__main__":
    main()
