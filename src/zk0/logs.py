"""Where zk0's messages go: a ``zk0.log`` in every run folder, and a console without third-party chatter.

zk0 logs through Flower's logger, so its lines sit between Flower's own in the ServerApp's output.
The run's file gets every line at ``[tool.zk0.logging] level`` (package pyproject.toml, default
INFO), without terminal colour codes. Libraries that print or log for themselves (FFmpeg's muxer,
LeRobot's "Reducing the number of VLM layers", Ray's FutureWarning) are kept off the console:
their words go to the log at DEBUG, or nowhere when they say nothing a user can act on.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path

LOGGER = "flwr"  # Flower's logger, which zk0 uses too
RUN_LOG = "zk0.log"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


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


@contextlib.contextmanager
def run_log(run_dir: Path) -> Iterator[Path]:
    """Copy every line of Flower's logger into ``run_dir/zk0.log`` (appended: a resumed run continues it)."""
    path = run_dir / RUN_LOG
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(run_log_level())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
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


def quiet_libraries() -> None:
    """Progress bars of Hugging Face ``datasets`` (one per dataset opened) and FFmpeg's encoder statistics stay
    off the console of every zk0 process; FFmpeg errors still show."""
    import av.logging
    import datasets

    datasets.disable_progress_bars()
    av.logging.set_libav_level(av.logging.ERROR)


def quiet_simulation_runtime() -> None:
    """Ray's FutureWarnings (about its own APIs, nothing a zk0 user can change) stay off the console."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray(\.|$)")
