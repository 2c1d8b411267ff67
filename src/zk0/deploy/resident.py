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

import httpx

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.config import get_fab_config
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.logger import log
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (AcquireTaskRequest, PullAppMessagesRequest,  # pylint: disable=E0611
                                    PullTaskInputRequest, SendTaskHeartbeatRequest)
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.auth import add_superexec_auth_secret_args, load_superexec_auth_secret
from flwr.supercore.constant import SUPERNODE_DEFAULT_CLIENT_ADDRESS, TaskType
from flwr.supercore.exit import register_signal_handlers
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (make_confirm_message_received_fn_protobuf,
                                                                 make_pull_object_fn_protobuf)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor,
                                         SuperExecAuthHttpInterceptor)
from flwr.supercore.retry import RetryInvoker, exponential, make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.telemetry import EventType
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from zk0 import client_app

APP_ID = "zk0/zk0"  # publisher/name in pyproject.toml
APP_REF = "zk0.client_app:app"
FLOWER = "1.42.0"  # the task protocol below uses this release's private runtime API
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
        self.retry = make_simple_http_retry_invoker()  # shared, so exiting can cut every retry short
        interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if auth_secret:
            interceptors.append(SuperExecAuthHttpInterceptor(
                master_secret=auth_secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}))
        self.acquirer = self._client(interceptors)
        self.app_lock = threading.Lock()

    def _client(self, interceptors: list, retry: RetryInvoker | None = None) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(self.address, self.insecure, self.root_certificates,
                                                     interceptors, retry_invoker=retry or self.retry)

    def close(self) -> None:
        """On exit: the SuperNode may be gone, so try each remaining call once, then close."""
        self.retry.max_tries = 1
        self.acquirer.close()

    def serve(self) -> None:
        """Acquire and run ClientApp tasks until the process is stopped."""
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        while True:
            res = self.acquirer.AcquireTask(request)
            if res.HasField("task") and res.token:
                threading.Thread(target=self.run_task, args=(res.token,), daemon=True,
                                 name=f"zk0-task-{res.task.task_id}").start()
            else:
                time.sleep(POLL_SECONDS)

    def run_task(self, token: str) -> None:
        """Run one task like ``flwr.supernode.runtime.run_clientapp``: every outcome gets a reply and a status."""
        client = self._client([RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                               RuntimeTokenHttpInterceptor(token)], task_retry_invoker())
        heartbeat = HeartbeatSender(task_heartbeat(client))
        heartbeat.start()
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        status, details = SubStatus.FAILED, "the zk0 resident worker stopped during the task"
        try:
            message, context, run, fab, task_id = pull_task(client)
            with self.app_lock:
                TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run.run_id, context.node_id
                if reason := refusal(run, fab):
                    log(ERROR, "zk0 resident worker refused a task: %s", reason)
                    reply, details = error_reply(message, ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason), reason
                else:
                    reply = run_app(message, context)
                    status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # pylint: disable=broad-exception-caught
            log(ERROR, "ClientApp raised an exception", exc_info=ex)
            details = f"{type(ex)}:<'{ex}'>"  # Flower's format, shown by the ServerApp
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            if reply is None and message is not None:  # the app raised, or a signal stopped the worker
                reply = error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, details)
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
    return RetryInvoker(lambda: exponential(max_delay=10), (httpx.TransportError, httpx.HTTPStatusError),
                        max_tries=None, max_time=TASK_RETRY_SECONDS,
                        should_giveup=lambda err: isinstance(err, httpx.HTTPStatusError)
                        and err.response.status_code not in TRANSIENT_HTTP)


def task_heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """The task's heartbeat; unlike Flower's, a revoked task does not signal the process (see above)."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(request)
        except (httpx.TransportError, httpx.HTTPStatusError):
            return False
        return True
    return beat


def pull_task(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab, int]:
    """Flower's ``pull_task_input`` minus its process-global ``TaskIdentity`` (set under the app lock)."""
    res = client.PullTaskInput(PullTaskInputRequest())
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message)
    message.metadata.__dict__["_message_id"] = tree.object_id  # a deflated message lacks its own id
    return message, context, run, fab, res.task_id


def refusal(run: Run, fab: Fab) -> str | None:
    """Why this worker must not run ``run`` (another app, or zk0 code other than its own), else None."""
    if run.fab_id != APP_ID:
        return f"run {run.run_id} is app {run.fab_id!r}; this worker serves only {APP_ID!r}"
    clientapp = get_fab_config(fab.content)["tool"]["flwr"]["app"]["components"].get("clientapp")
    if clientapp != APP_REF:
        return f"run {run.run_id} names ClientApp {clientapp!r}; this worker runs only {APP_REF!r}"
    if run.fab_version != version("zk0"):
        return (f"run {run.run_id} is zk0 {run.fab_version} but this worker runs zk0 {version('zk0')}: "
                "install the run's version on this node or submit the run from this version")
    return None


def error_reply(message: Message, code: int, reason: str) -> Message:
    """The error reply the ServerApp receives instead of a result."""
    return Message(Error(code=code, reason=reason), reply_to=message)


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
    if version("flwr") != FLOWER:
        raise SystemExit(f"zk0 resident worker is built on Flower {FLOWER} internals, found flwr {version('flwr')}: "
                         "install flwr=={FLOWER} or start the node with `zk0 client start --no-resident`")
    worker = Worker(address, insecure, root_certificates, auth_secret)
    register_signal_handlers(EventType.FLWR_CLIENTAPP_RUN_LEAVE, "zk0 resident worker stopped.",
                             exit_handlers=[worker.close])
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)  # signals this process when the parent exits
    log(INFO, "zk0 resident worker serving the Runtime API at %s", address)
    worker.serve()


def main(argv: list[str] | None = None) -> None:
    """``python -m zk0.deploy.resident``: flags as ``flwr-clientapp``'s, without a task token."""
    parser = argparse.ArgumentParser(description="Long-lived zk0 ClientApp worker for a SuperNode "
                                                 "started with --isolation process")
    parser.add_argument("--appio-api-address", "--runtime-api-address", dest="address",
                        default=SUPERNODE_DEFAULT_CLIENT_ADDRESS,
                        help="the SuperNode's Runtime API (its --host:--port; default %(default)s)")
    parser.add_argument("--insecure", action="store_true",
                        help="plain HTTP: the SuperNode's Runtime API has no --ssl-certfile (loopback only)")
    parser.add_argument("--root-certificates", metavar="CA",
                        help="PEM CA that signed the SuperNode's Runtime API certificate (--ssl-ca-certfile)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (e.g. the SuperNode) exits")
    add_superexec_auth_secret_args(parser)
    args = parser.parse_args(argv)
    serve(args.address, args.insecure, validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
          args.parent_pid, load_superexec_auth_secret(args.superexec_auth_secret_file))


if __name__ == "__main__":
    main()
