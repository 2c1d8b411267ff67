"""Where zk0's messages go: a ``zk0.log`` in every run folder, and a console without third-party chatter.

zk0 logs through Flower's logger, so its lines sit between Flower's own in the ServerApp's output.
The run's file gets every line at ``[tool.zk0.logging] level`` (package pyproject.toml, default
INFO), without terminal colour codes. Libraries that print or log for themselves (FFmpeg's muxer,
LeRobot's "Reducing the number of VLM layers", Ray's FutureWarning) are kept off the console:
their words go to the log at DEBUG, or nowhere when they say nothing a user can act on.

Flower's console handler colours every line, terminal or not, and has no switch for it; the
processes a deployment starts write through ``python -m zk0.logs`` (:func:`copy_plain`), so their
log files hold text without those codes too.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

LOGGER = "flwr"  # Flower's logger, which zk0 uses too
RUN_LOG = "zk0.log"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")  # a terminal control sequence (colours, cursor moves)
ANSI_BYTES = re.compile(ANSI.pattern.encode())
FLOWER_SAMPLING = ("configure_train: Sampled", "configure_evaluate: Sampled")  # Flower's FedAvg, every phase


class LoggingError(ValueError):
    """A bad ``[tool.zk0.logging]`` table; the message names the key and the fix."""


def run_log_level() -> int:
    """``[tool.zk0.logging] level`` of the package's pyproject.toml (default INFO)."""
    from zk0.registry import default_pyproject

    table = tomllib.loads(default_pyproject().read_text()).get("tool", {}).get("zk0", {}).get("logging", {})
    level = str(table.get("level", "INFO")).upper()
    if level not in LEVELS:
        raise LoggingError(f"[tool.zk0.logging] level = {level!r}: use one of {', '.join(LEVELS)}")
    return getattr(logging, level)


class PlainFormatter(logging.Formatter):
    """Log lines without terminal control sequences: a file is read in editors, pagers and browsers."""

    def format(self, record: logging.LogRecord) -> str:
        return ANSI.sub("", super().format(record))


@contextlib.contextmanager
def run_log(run_dir: Path) -> Iterator[Path]:
    """Copy every line of Flower's logger into ``run_dir/zk0.log`` (appended: a resumed run continues it)."""
    path = run_dir / RUN_LOG
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(run_log_level())
    handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def prints_to_debug(source: str) -> Iterator[None]:
    """What a library ``print``s inside goes to the log at DEBUG instead of the console."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            yield
    finally:
        for line in out.getvalue().splitlines():
            if line.strip():
                logging.getLogger(LOGGER).debug("%s: %s", source, line.strip())


@contextlib.contextmanager
def ffmpeg_quiet() -> Iterator[None]:
    """FFmpeg's own messages off while encoding or decoding (a broken video is reported in one line of ours),
    then back to errors only.

    The level is libav's own: LeRobot's video encoder reinstates FFmpeg's terminal logger after each
    episode, so PyAV's ``set_level`` (which filters only PyAV's logger) does not reach it.
    """
    import av.logging

    av.logging.set_libav_level(av.logging.PANIC)
    try:
        yield
    finally:
        av.logging.set_libav_level(av.logging.ERROR)


class NotSampling(logging.Filter):
    """Flower's strategy says how many nodes it sampled before every phase of every round; zk0's own round line
    and the round's record say who took part, so the console leaves those lines to the run's log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not str(record.msg).startswith(FLOWER_SAMPLING)


def quiet_flower_sampling() -> None:
    """Keep Flower's per-phase sampling lines off its console handler (``zk0.log`` still has them)."""
    from zk0.flower_seams import add_console_filter

    add_console_filter(NotSampling())


def quiet_libraries() -> None:
    """Progress bars of Hugging Face ``datasets`` (one per dataset opened or episode recorded) and FFmpeg's encoder
    statistics stay off the console of every zk0 process; FFmpeg errors still show.

    LeRobot turns the progress bars back on after each metadata read, whatever they were before
    (``lerobot.utils.utils.SuppressProgressBars`` calls ``datasets.utils.logging.enable_progress_bar`` on
    exit), so in zk0's processes that switch keeps them off.
    """
    import av.logging
    import datasets
    import datasets.utils.logging

    datasets.disable_progress_bars()
    datasets.utils.logging.enable_progress_bar = datasets.disable_progress_bars
    av.logging.set_libav_level(av.logging.ERROR)


def quiet_simulation_runtime() -> None:
    """Ray's FutureWarnings (about its own APIs, nothing a zk0 user can change) stay off the console."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray(\.|$)")


def copy_plain(source: BinaryIO, sink: BinaryIO) -> None:
    """Copy ``source`` to ``sink`` line by line without terminal control sequences, each line as it comes
    (a log file someone follows); ends when every writer of ``source`` has closed it."""
    for line in iter(source.readline, b""):
        sink.write(ANSI_BYTES.sub(b"", line))
        sink.flush()


if __name__ == "__main__":  # a deployment process's output on stdin, its log file on stdout
    copy_plain(sys.stdin.buffer, sys.stdout.buffer)
