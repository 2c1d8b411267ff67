"""zk0.deploy.resident: the long-lived ClientApp worker of a SuperNode in process isolation.

Unit tests drive tasks through the worker with Flower's Runtime API calls replaced; the
deployment e2e tests (tests/test_deploy.py) run resident workers behind real SuperNodes.
"""

from __future__ import annotations

import io
import threading
import zipfile
from importlib.metadata import version
from types import SimpleNamespace

import pytest
from conftest import ROOT
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from waits import deadline, wait_for

from zk0.deploy import resident

PYPROJECT = (ROOT / "pyproject.toml").read_text()


def fab(pyproject: str = PYPROJECT) -> Fab:
    """A FAB holding only ``pyproject.toml`` (all the worker reads of it)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("pyproject.toml", pyproject)
    return Fab("0" * 64, buffer.getvalue(), {})


def run(fab_id: str = resident.APP_ID, fab_version: str | None = None) -> Run:
    r = Run.create_empty(7)
    r.fab_id, r.fab_version = fab_id, fab_version or version("zk0")
    return r


def test_refusal_accepts_only_this_zk0():
    assert resident.refusal(run(), fab()) is None
    assert "serves only 'zk0/zk0'" in resident.refusal(run(fab_id="mallory/zk0"), fab())
    foreign = PYPROJECT.replace('clientapp = "zk0.client_app:app"', 'clientapp = "evil.app:app"')
    assert "evil.app:app" in resident.refusal(run(), fab(foreign))
    assert "zk0 9.9.9" in resident.refusal(run(fab_version="9.9.9"), fab())


class FakeRuntime:
    """Stands in for the SuperNode's Runtime API: hands out one task input, records the outputs."""

    def __init__(self, monkeypatch, task_run: Run, app) -> None:
        self.replies: list[Message] = []
        self.outputs: list[tuple[str, str]] = []
        for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):  # the ServerApp's side
            monkeypatch.setattr(TaskIdentity, name, value)
        message = Message(RecordDict(), dst_node_id=3, message_type=MessageType.TRAIN)
        message.metadata.__dict__["_message_id"] = message.object_id
        context = Context(run_id=7, node_id=3, node_config={}, state=RecordDict(), run_config={})
        monkeypatch.setattr(resident, "pull_task", lambda client: (message, context, task_run, fab(), 1))
        monkeypatch.setattr(resident, "push_message", lambda client, reply, ctx: self.replies.append(reply))
        monkeypatch.setattr(resident, "push_task_output",
                            lambda client, ctx, status, details: self.outputs.append((status, details)))
        monkeypatch.setattr(resident, "task_heartbeat", lambda client: lambda: True)
        monkeypatch.setattr(resident, "run_app", app)


def test_refused_task_gets_an_error_reply_and_the_app_does_not_run(monkeypatch):
    def app(message, context):
        raise AssertionError("a refused task must not reach the ClientApp")

    api = FakeRuntime(monkeypatch, run(fab_id="mallory/other"), app)
    resident.Worker("127.0.0.1:9", insecure=True, root_certificates=None).run_task("token")
    (reply,) = api.replies
    assert reply.has_error() and reply.error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION
    assert "mallory/other" in reply.error.reason
    assert api.outputs == [(SubStatus.FAILED, reply.error.reason)]


def test_app_exception_is_an_error_reply_and_the_worker_keeps_serving(monkeypatch):
    calls = []

    def app(message, context):
        calls.append(message)
        if len(calls) == 1:
            raise ValueError("dataset missing")
        return Message(RecordDict(), reply_to=message)

    api = FakeRuntime(monkeypatch, run(), app)
    worker = resident.Worker("127.0.0.1:9", insecure=True, root_certificates=None)
    worker.run_task("token-1")
    worker.run_task("token-2")
    failed, ok = api.replies
    assert failed.has_error() and failed.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "dataset missing" in failed.error.reason
    assert not ok.has_error()
    assert [status for status, _ in api.outputs] == [SubStatus.FAILED, SubStatus.COMPLETED]


def test_a_task_whose_message_never_arrives_does_not_block_the_next(monkeypatch):
    """The SuperLink died mid-transfer: that task's pull hangs; the next task must still run."""
    stuck, served, release, hung = threading.Event(), [], threading.Event(), []

    def pull(client):
        if not served and not stuck.is_set():
            stuck.set()
            hung.append(threading.current_thread())
            release.wait(deadline())  # as Flower's pull of a lost message (for 2 h), until this test ends
            raise ConnectionError("the SuperLink is gone")  # the stale task ends here, never reaching the app
        message = Message(RecordDict(), dst_node_id=3, message_type=MessageType.TRAIN)
        message.metadata.__dict__["_message_id"] = message.object_id
        return message, Context(run_id=7, node_id=3, node_config={}, state=RecordDict(), run_config={}), run(), fab(), 2

    FakeRuntime(monkeypatch, run(), lambda message, context: served.append(message) or Message(RecordDict(),
                                                                                               reply_to=message))
    monkeypatch.setattr(resident, "pull_task", pull)
    tasks = iter(["stale", "fresh"])

    class Acquirer:
        def AcquireTask(self, request):
            token = next(tasks, None)
            if token is None:
                wait_for(lambda: served, "the fresh task to run")
                raise KeyboardInterrupt  # ends serve() once the fresh task ran
            return SimpleNamespace(HasField=lambda field: True, token=token, task=SimpleNamespace(task_id=1))

    worker = resident.Worker("127.0.0.1:9", insecure=True, root_certificates=None)
    worker.acquirer = Acquirer()
    with pytest.raises(KeyboardInterrupt):
        worker.serve()
    assert stuck.is_set() and len(served) == 1
    release.set()  # the stuck thread must end while this test's fakes are in place: left running, it set the
    hung[0].join(deadline())  # process's task identity (run 7) under a later test's in-process federation
    assert not hung[0].is_alive()
