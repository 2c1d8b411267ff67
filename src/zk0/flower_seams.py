"""Every use of Flower internals zk0 depends on, in one place, checked against the pinned Flower version.

zk0 pins ``flwr==1.42.0``. What Flower 1.42 offers publicly (``flwr.app``, ``flwr.serverapp``,
``flwr.clientapp``, ``flwr.simulation.run_simulation``) does not cover everything zk0 needs; each
function here names the public API that is missing. Importing this module with another Flower
version fails at once with one line, instead of somewhere deep inside a round.

Grouped by user: the ServerApp; the resident ClientApp worker (:mod:`zk0.deploy.resident`), which speaks
a SuperNode's private Runtime API; the SuperNode entry point; ``zk0 simulate``. Internals that
``flwr.app`` does not load already are imported inside the function that needs them, so importing
this module costs no more than ``flwr.app``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from importlib.metadata import version
from typing import TYPE_CHECKING

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.constant import SUPERNODE_DEFAULT_CLIENT_ADDRESS

if TYPE_CHECKING:
    import argparse

    from flwr.serverapp import Grid
    from flwr.supercore.fab import Fab
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.retry import RetryInvoker
    from flwr.supercore.run import Run
    from flwr.supercore.runtime import RuntimeHttpClient

FLOWER = "1.42.0"

if (installed := version("flwr")) != FLOWER:
    raise ImportError(f"zk0 needs flwr=={FLOWER} (its internals are used in zk0.flower_seams), found {installed}: "
                      f"pip install 'flwr[simulation]=={FLOWER}'")

TASK_COMPLETED, TASK_FAILED = SubStatus.COMPLETED, SubStatus.FAILED  # a task's end states: no public names in 1.42
RUNTIME_API_ADDRESS = SUPERNODE_DEFAULT_CLIENT_ADDRESS  # a SuperNode's default Runtime API: no public name in 1.42


# ServerApp

def set_reply_sender(reply: Message, node_id: int) -> None:
    """Name the node a reply is about. The SuperLink itself answers for a node it lost ("Node Unavailable"),
    with its own id as the sender; Flower 1.42 has no public setter for ``Metadata.src_node_id``."""
    reply.metadata.__dict__["_src_node_id"] = node_id


def weighted_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """The ``weighting_key``-weighted mean of the replies' metric records, as Flower's FedAvg computes it
    (``strategy_utils.aggregate_metricrecords``; 1.42 exports no public helper)."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    return aggregate_metricrecords(records, weighting_key)


def deployed(grid: Grid) -> bool:
    """Whether the ServerApp talks to a SuperLink (a deployment) rather than to the simulation runtime's in-memory
    grid (``zk0 simulate``, ``flwr run`` on a simulation federation). Flower 1.42's Context carries no such flag;
    the grid classes that tell them apart are private (``flwr.superlink.grid``)."""
    from flwr.superlink.grid import HttpGrid

    return isinstance(grid, HttpGrid)


def add_console_filter(log_filter: logging.Filter) -> None:
    """Filter what Flower's console handler prints (and only that: other handlers of Flower's logger, such as a
    run's ``zk0.log``, still get every line). 1.42 has no public handle on its console handler
    (``flwr.supercore.logger.console_handler``). Adding the same kind of filter twice is a no-op."""
    from flwr.common.logger import console_handler

    if not any(type(existing) is type(log_filter) for existing in console_handler.filters):
        console_handler.addFilter(log_filter)


# Any process that creates messages

def set_task_identity(task_id: int, run_id: int, node_id: int) -> None:
    """Say which task this process runs: every ``Message`` created here takes its run and sender from it.
    Flower's own processes set it (``flwr.supercore.task_identity``); 1.42 has no public setter."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, node_id


def flower_run(run_id: int, override_config: dict) -> Run:
    """A run as the SuperLink records it, carrying ``override_config`` (the ``--run-config`` overrides).
    Flower 1.42 has no public ``Run`` (``flwr.supercore.run``)."""
    from flwr.supercore.run import Run

    run = Run.create_empty(run_id)
    run.override_config = override_config
    return run


# Resident ClientApp worker: a SuperNode's Runtime API (flwr.supercore.runtime and flwr.proto), private in 1.42

def acquirer_client(address: str, insecure: bool, root_certificates: bytes | None, retry: RetryInvoker,
                    auth_secret: bytes | None) -> RuntimeHttpClient:
    """The Runtime API client that acquires tasks, as a SuperExec's (signed when the SuperNode has an auth
    secret). Flower 1.42 has no public Runtime API client."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor

    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if auth_secret:
        interceptors.append(SuperExecAuthHttpInterceptor(
            master_secret=auth_secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}))
    return _runtime_client(address, insecure, root_certificates, interceptors, retry)


def task_client(address: str, insecure: bool, root_certificates: bytes | None, retry: RetryInvoker,
                token: str) -> RuntimeHttpClient:
    """The Runtime API client of one task, as ``flwr-clientapp``'s. Flower 1.42 has no public Runtime API client."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor

    interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)]
    return _runtime_client(address, insecure, root_certificates, interceptors, retry)


def _runtime_client(address: str, insecure: bool, root_certificates: bytes | None, interceptors: list,
                    retry: RetryInvoker) -> RuntimeHttpClient:
    """Flower's HTTP client of a SuperNode's Runtime API (``flwr.supercore.runtime``, private in 1.42)."""
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(address, insecure, root_certificates, interceptors,
                                                 retry_invoker=retry)


def shared_retry() -> RetryInvoker:
    """Flower's own retries of Runtime API calls; lowering its ``max_tries`` cuts every retry short.
    Flower 1.42's retry helpers (``flwr.supercore.retry``) are private."""
    from flwr.supercore.retry import make_simple_http_retry_invoker

    return make_simple_http_retry_invoker()


def bounded_retry(max_time: float, giveup: Callable[[Exception], bool]) -> RetryInvoker:
    """Retries of failed HTTP calls with Flower's exponential backoff (at most 10 s apart) for ``max_time``
    seconds, unless ``giveup`` says the error is final. Flower 1.42's ``RetryInvoker`` is private."""
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential

    return RetryInvoker(lambda: exponential(max_delay=10), (httpx.TransportError, httpx.HTTPStatusError),
                        max_tries=None, max_time=max_time, should_giveup=giveup)


def acquire_task(client: RuntimeHttpClient) -> tuple[str, int] | None:
    """The token and id of a ClientApp task the SuperNode hands out, or None when it has none.
    Flower 1.42's task protocol (``flwr.proto.runtime_pb2``) is private."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType

    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    return (res.token, res.task.task_id) if res.HasField("task") and res.token else None


def pull_task(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab, int]:
    """A task's message, context, run, FAB and id: Flower's ``pull_task_input`` minus its process-global
    ``TaskIdentity`` (the worker sets it under its app lock). Private in Flower 1.42 (``flwr.supernode``)."""
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (make_confirm_message_received_fn_protobuf,
                                                                     make_pull_object_fn_protobuf)
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

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


def push_message(client: RuntimeHttpClient, reply: Message, context: Context) -> None:
    """Send a task's reply to the SuperNode, as ``flwr-clientapp`` does (private in Flower 1.42)."""
    from flwr.supernode.runtime.run_clientapp import push_message as push

    push(client, reply, context)


def push_task_output(client: RuntimeHttpClient, context: Context | None, status: str, details: str) -> None:
    """Report a task's end state (``TASK_COMPLETED``/``TASK_FAILED``) and context to the SuperNode, as
    ``flwr-clientapp`` does (private in Flower 1.42)."""
    from flwr.supernode.runtime.run_clientapp import push_task_output as push

    push(client, context, status, details)


def send_task_heartbeat(client: RuntimeHttpClient) -> None:
    """Tell the SuperNode the task is alive; raises httpx errors. Flower 1.42's heartbeat call is private."""
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    client.SendTaskHeartbeat(SendTaskHeartbeatRequest())


def start_heartbeat(beat: Callable[[], bool]) -> HeartbeatSender:
    """Call ``beat`` in the background at Flower's heartbeat interval until the returned sender is stopped.
    Flower 1.42's ``HeartbeatSender`` is private."""
    from flwr.supercore.heartbeat import HeartbeatSender

    sender = HeartbeatSender(beat)
    sender.start()
    return sender


def fab_clientapp(fab: Fab) -> str | None:
    """The ClientApp a FAB's ``pyproject.toml`` names. Flower 1.42 has no public FAB reader."""
    from flwr.common.config import get_fab_config

    return get_fab_config(fab.content)["tool"]["flwr"]["app"]["components"].get("clientapp")


def refused_reply(message: Message, reason: str) -> Message:
    """The error reply to a task this worker will not run, coded as Flower codes a ClientApp it cannot load.
    Flower 1.42 has no public error codes."""
    return Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=reason), reply_to=message)


def failed_reply(message: Message, reason: str) -> Message:
    """The error reply to a task whose ClientApp raised, coded as Flower codes it. No public error codes in 1.42."""
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def stop_on_signals(exit_message: str, handler: Callable[[], None]) -> None:
    """On SIGINT, SIGTERM or SIGQUIT run ``handler`` and exit, as ``flwr-clientapp`` does.
    Flower 1.42's signal handling (``flwr.supercore.exit``) is private."""
    from flwr.supercore.exit import register_signal_handlers
    from flwr.supercore.telemetry import EventType

    register_signal_handlers(EventType.FLWR_CLIENTAPP_RUN_LEAVE, exit_message, exit_handlers=[handler])


def exit_with_parent(parent_pid: int) -> None:
    """Signal this process when ``parent_pid`` exits. Flower 1.42's parent monitor is private."""
    from flwr.supercore.app_utils import start_parent_process_monitor

    start_parent_process_monitor(parent_pid)


def add_auth_secret_option(parser: argparse.ArgumentParser) -> None:
    """``--superexec-auth-secret-file``, as Flower's SuperExec takes it. Private in Flower 1.42."""
    from flwr.supercore.auth import add_superexec_auth_secret_args

    add_superexec_auth_secret_args(parser)


def read_auth_secret(path: str | None) -> bytes | None:
    """The SuperExec auth secret in ``path``, checked as Flower checks it. Private in Flower 1.42."""
    from flwr.supercore.auth import load_superexec_auth_secret

    return load_superexec_auth_secret(path)


def read_root_certificates(path: str | None, insecure: bool) -> bytes | None:
    """The Runtime API's CA certificates, refusing ``path`` together with ``insecure`` as Flower does.
    Private in Flower 1.42 (``flwr.supercore.tls``)."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    return validate_and_resolve_root_certificates(path, insecure)


# SuperNode entry point

def run_supernode() -> None:
    """Flower's ``flower-supernode`` in this process, with this process's arguments; returns when its connection
    loop ends. Flower 1.42's only public SuperNode interface is the console script, which exits."""
    from flwr.supernode.cli import flower_supernode

    flower_supernode()


# zk0 simulate

def run_simulation(context: Context, overrides: dict, num_supernodes: int, backend_config: dict, app_dir: str,
                   server_app_attr: str, client_app_attr: str) -> None:
    """Flower's simulation runtime on a run carrying ``overrides``, as the SuperLink's simulation process starts it
    for ``flwr run``: every ClientApp's ``context.run_config`` is then the fused config the ServerApp gets in
    ``context``. Flower 1.42's public ``run_simulation`` takes no run, so its clients would get the defaults."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.telemetry import EventType

    run = flower_run(context.run_id, overrides)
    run.primary_task_id = random.getrandbits(63)
    run.federation_id = NOOP_FEDERATION_ID
    set_task_identity(1, context.run_id, SUPERLINK_NODE_ID)
    _run_simulation(num_supernodes=num_supernodes, server_app_attr=server_app_attr, client_app_attr=client_app_attr,
                    backend_config=backend_config, app_dir=app_dir, server_app_context=context, run=run, is_app=True,
                    exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE)
