"""zk0.reasons: a failure reason that crosses the wire is one short line without the owner's paths."""

from __future__ import annotations

import json
import traceback

import pytest
from federation import request, small_update, train_reply
from flwr.app import Error, Message, MessageType

from zk0.audit import read_audit
from zk0.reasons import error_reason, one_line
from zk0.server_app import receive_train

HOME = "/home/alice/robots/so101"


def open_dataset() -> None:
    """Fails the way a node fails on a broken dataset: an OSError re-raised with more context."""
    try:
        with open(f"{HOME}/data/ds1/meta/info.json"):
            pass
    except OSError as err:
        raise ValueError(f"dataset local:{HOME}/data/ds1 does not open: {err}\n(see ~/zk0/logs/node.log)") from err


def node_traceback() -> str:
    """A real chained traceback, padded with frames from the owner's tree to the size seen in runs (~5 kB)."""
    try:
        open_dataset()
    except ValueError:
        text = traceback.format_exc()
    frames = "".join(f'  File "{HOME}/.venv/lib/python3.12/site-packages/zk0/m{i}.py", line {i}, in f{i}\n'
                     f"    f{i + 1}()\n" for i in range(40))
    return text.replace("Traceback (most recent call last):\n", "Traceback (most recent call last):\n" + frames, 1)


def test_a_traceback_becomes_its_exception_line_without_paths():
    text = node_traceback()
    assert len(text) > 5000 and text.count("\n") > 80
    line = one_line(text)
    assert line == ("ValueError: dataset local:ds1 does not open: [Errno 2] No such file or directory: "
                    "'info.json' (see node.log)")
    assert len(line) <= 300 and "/home" not in line and "~" not in line


@pytest.mark.parametrize(("text", "expected"), [
    ("missing /home/alice/data/ds1/meta/info.json", "missing info.json"),
    ("see ~/zk0/runs/r1/ and /tmp/x", "see r1 and x"),
    ("no file C:\\Users\\alice\\data\\ds.parquet", "no file ds.parquet"),
    ("repr 'C:\\\\Users\\\\bob\\\\y.json'", "repr 'y.json'"),
    ("hf:user/ds at https://huggingface.co/datasets/user/ds, 3/4 and/or ./rel/x", None),
    ("  first   line \n\n second line", "first line"),
    ("", ""),
])
def test_paths_are_cut_to_their_last_part_and_other_text_stays(text, expected):
    assert one_line(text) == (expected if expected is not None else text)


def test_a_long_reason_is_capped():
    line = error_reason(RuntimeError("x" * 1000))
    assert len(line) == 300 and line.startswith("RuntimeError: xxx") and line.endswith("…")
    assert one_line("abcdef", limit=4) == "abc…"
    assert one_line(line) == line  # idempotent: the server may apply it to a reason a client already shortened


def test_error_reason_names_the_exception_type():
    assert error_reason(KeyError("payload")) == "KeyError: 'payload'"
    assert error_reason(FileNotFoundError(f"{HOME}/x.json")) == "FileNotFoundError: x.json"


def test_a_client_traceback_is_stored_as_one_short_line(strategy, round_state, events, tmp_path):
    failed = Message(Error(code=0, reason=node_traceback()), reply_to=request(102))
    good = train_reply(round_state, 101, small_update(0))
    receive_train(strategy, round_state, [failed, good])
    expected = "client error: " + one_line(node_traceback())
    (event,) = [e for e in events if e.get("event") == "rejected-update"]
    (record,) = [a for a in read_audit(tmp_path) if a["status"] == "rejected"]
    assert event["reason"] == record["reason"] == expected and len(expected) <= 300
    assert HOME not in (tmp_path / "audit.jsonl").read_text() and HOME not in json.dumps(events)


def test_audit_stores_any_reason_as_one_line(round_state, tmp_path):
    failed = Message(Error(code=0, reason=node_traceback()), reply_to=request(103, MessageType.QUERY))
    round_state.audit.received(0, "query", failed, accepted=False, reason=failed.error.reason)
    (record,) = read_audit(tmp_path)
    assert record["reason"] == one_line(node_traceback())
