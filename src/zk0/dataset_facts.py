"""What a client tells the server about its dataset, so the model card can say what trained.

The server never sees a client's data, yet a published policy must name its robot, fps, tasks and
how many episodes trained and were held out. Each client's query reply (round 0) carries these
facts next to its statistics. Robot type and task strings are the owner's own text, so the
client sends each as one printable line, bounded in length and count, with local paths cut to
their last part (:func:`owner_text`); the server refuses, in one line, a reply whose facts an
honest client could not have sent (:func:`checked_facts`), like every other field of a reply.
"""

from __future__ import annotations

from collections.abc import Mapping

from zk0.reasons import one_line

MAX_TEXT = 120  # characters of a robot type or one task string
MAX_TASKS = 8  # task strings a client sends; num-tasks says how many its dataset has
MAX_COUNT = 1_000_000  # bounds the episode and task counts a node claims
MAX_FPS = 1000
MAX_NAME = 255  # a dataset's name is a file name or a hub id: never longer
FIELDS = ("robot-type", "fps", "tasks", "num-tasks", "train-episodes", "held-out-episodes")


class FactsError(ValueError):
    """A reply's dataset facts that an honest client would not send; the message names the field."""


def owner_text(text: object) -> str:
    """``text`` as one printable line of at most :data:`MAX_TEXT` characters without local paths ('' for none).

    Control characters (terminal escapes, newlines) become spaces first: the text ends up in
    logs, HTML and the card. Applying it twice changes nothing, which is how the server checks it.
    """
    printable = "".join(ch if ch.isprintable() else " " for ch in str(text or ""))
    return one_line(printable, MAX_TEXT) if printable.strip() else ""


def dataset_facts(robot_type: str | None, fps: int, tasks: list[str], train_episodes: int,
                  held_out_episodes: int) -> dict[str, int | str | list[str]]:
    """The facts a client's query reply carries, in the form :func:`checked_facts` accepts."""
    sent = [text for text in (owner_text(task) for task in tasks) if text][:MAX_TASKS]
    return {"robot-type": owner_text(robot_type), "fps": int(fps), "tasks": sent, "num-tasks": len(tasks),
            "train-episodes": int(train_episodes), "held-out-episodes": int(held_out_episodes)}


def checked_facts(record: Mapping[str, object], frames: int) -> dict[str, int | str | list[str]]:
    """The facts of a query reply's ``record``, once each is of the form an honest client sends.

    Train episodes cannot outnumber the ``frames`` the reply claims for them (every episode has one).
    The dataset's name, which every reply carries, must be printable too: it lands in the card's tables.
    """
    name = record["dataset"]
    if not (isinstance(name, str) and name.isprintable() and 0 < len(name) <= MAX_NAME):
        raise FactsError(f"dataset must be a printable name of 1..{MAX_NAME} characters")
    facts = {key: record[key] for key in FIELDS}
    if not _owner_line(facts["robot-type"]):
        raise FactsError(f"robot-type must be one printable line of at most {MAX_TEXT} characters without paths")
    tasks = facts["tasks"]
    if not (isinstance(tasks, list) and len(tasks) <= MAX_TASKS and all(map(_owner_line, tasks)) and all(tasks)):
        raise FactsError(f"tasks must be at most {MAX_TASKS} non-empty printable lines of at most {MAX_TEXT} "
                         "characters without paths")
    for key, low, high in (("fps", 1, MAX_FPS), ("num-tasks", len(tasks), MAX_COUNT),
                           ("train-episodes", 1, min(frames, MAX_COUNT)), ("held-out-episodes", 1, MAX_COUNT)):
        _check_count(key, facts[key], low, high)
    return facts


def _owner_line(value: object) -> bool:
    return isinstance(value, str) and owner_text(value) == value


def _check_count(key: str, value: object, low: int, high: int) -> None:
    """``value`` must be an int in ``low..high``: a bool, a float or anything else is no count."""
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        raise FactsError(f"{key} must be a whole number in {low}..{high}, got {one_line(repr(value), 40)}")
