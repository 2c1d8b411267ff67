"""Where messages go: the run's log level from [tool.zk0.logging], library prints off the console."""

from __future__ import annotations

import logging

import pytest

from zk0 import logs, registry


@pytest.mark.parametrize("table,level", [("", logging.INFO), ('[tool.zk0.logging]\nlevel = "debug"\n', logging.DEBUG)])
def test_the_run_log_level_comes_from_the_packaged_pyproject(tmp_path, monkeypatch, table, level):
    (tmp_path / "pyproject.toml").write_text(table)
    monkeypatch.setattr(registry, "default_pyproject", lambda: tmp_path / "pyproject.toml")
    assert logs.run_log_level() == level


def test_a_bad_level_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[tool.zk0.logging]\nlevel = "loud"\n')
    monkeypatch.setattr(registry, "default_pyproject", lambda: tmp_path / "pyproject.toml")
    with pytest.raises(logs.LoggingError, match="level = 'LOUD': use one of DEBUG, INFO, WARNING, ERROR"):
        logs.run_log_level()


def test_library_prints_go_to_the_log_at_debug_not_the_console(tmp_path, capsys, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[tool.zk0.logging]\nlevel = "DEBUG"\n')
    monkeypatch.setattr(registry, "default_pyproject", lambda: tmp_path / "pyproject.toml")
    logger = logging.getLogger(logs.LOGGER)
    before = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with logs.run_log(tmp_path), logs.prints_to_debug("lerobot"):
            print("Reducing the number of VLM layers to 4 ...")
    finally:
        logger.setLevel(before)
    assert "Reducing" not in capsys.readouterr().out
    assert "DEBUG lerobot: Reducing the number of VLM layers to 4 ..." in (tmp_path / logs.RUN_LOG).read_text()


def test_the_run_log_holds_no_colour_codes_even_when_a_message_carries_them(tmp_path):
    """Flower's console colours each line; a rich table or a library's message may carry codes of their own."""
    from flwr.common.logger import log

    with logs.run_log(tmp_path):
        log(logging.INFO, "zk0 round 1/2 | \x1b[1mheld-out loss\x1b[0m 2.5")
        log(logging.WARNING, "round 1: rejected train reply from node 7: \x1b[31mnorm\x1b[0m")
    text = (tmp_path / logs.RUN_LOG).read_text()
    assert "INFO zk0 round 1/2 | held-out loss 2.5" in text and "WARNING round 1: rejected" in text
    assert "\x1b" not in text


COLOURED = ("import logging, sys; from flwr.common.logger import log; log(logging.INFO, 'SuperLink up'); "
            "print('\\x1b[36m(ClientAppActor pid=7)\\x1b[0m ready', flush=True); "
            "log(logging.ERROR, 'refused: bad key'); sys.exit(3)")


def test_deployment_logs_lose_flowers_colour_codes_and_keep_every_line(tmp_path):
    """A process zk0 starts writes its log through ``python -m zk0.logs``; its error lines still explain its exit."""
    import sys

    from zk0.deploy import processes

    processes.start(tmp_path, "superlink", [sys.executable, "-c", COLOURED], {"PATH": "/usr/bin:/bin"})
    error = wait_exited(processes, tmp_path, "superlink")
    text = (tmp_path / "logs" / "superlink.log").read_text()
    assert "\x1b" not in text and "(ClientAppActor pid=7) ready" in text
    assert "INFO :      SuperLink up" in text and "ERROR :     refused: bad key" in text
    assert "refused: bad key" in str(error)


def wait_exited(processes, folder, name: str):
    """The process's exit error, once it has exited (it runs a second or two)."""
    from waits import wait_for

    wait_for(lambda: processes.running_pid(folder, name) is None, f"{name} to exit")
    return processes.exited_error(folder, name)


def test_copy_plain_strips_control_sequences_line_by_line():
    import io

    sink = io.BytesIO()
    logs.copy_plain(io.BytesIO(b"\x1b[92mINFO \x1b[0m:  a\n\x1b[2Kb \x1b[1;31mc\x1b[0m\nno end"), sink)
    assert sink.getvalue() == b"INFO :  a\nb c\nno end"


def test_a_simulated_client_fed_camera_for_camera_keeps_its_mapping_off_the_console(run_config, caplog):
    """The demo's clients feed each policy camera from the dataset camera of that name: nothing to tell at INFO."""
    from inprocess import InProcessGrid

    from zk0 import client_app

    grid = InProcessGrid(client_app.app, run_config(), 1)
    with caplog.at_level(logging.DEBUG, logger=logs.LOGGER):
        client_app.runtime(grid.contexts[101])
    (line,) = [r for r in caplog.records if ": cameras " in r.getMessage()]
    assert line.levelno == logging.DEBUG and "observation.images.front -> observation.images.front" in line.getMessage()


def test_datasets_progress_bars_stay_off_after_lerobot_reads_metadata():
    """LeRobot switches them back on after every read, so recording the demo's datasets printed a bar per episode."""
    import datasets
    from lerobot.utils.utils import SuppressProgressBars

    logs.quiet_libraries()
    with SuppressProgressBars():
        pass
    assert not datasets.is_progress_bar_enabled()


def test_flowers_sampling_lines_stay_off_the_console_and_in_the_run_log(tmp_path):
    """The console handler the ServerApp prints through drops Flower's per-phase sampling lines; zk0.log keeps them."""
    import io
    from logging import INFO, WARNING

    from flwr.common.logger import console_handler, log

    logs.quiet_flower_sampling()
    logs.quiet_flower_sampling()  # idempotent: one filter however often a process asks
    assert sum(isinstance(f, logs.NotSampling) for f in console_handler.filters) == 1
    console = io.StringIO()
    previous = console_handler.setStream(console)
    try:
        with logs.run_log(tmp_path):
            log(INFO, "configure_train: Sampled %s nodes (out of %s)", 2, 4)
            log(INFO, "configure_evaluate: Sampled %s nodes (out of %s)", 2, 4)
            log(INFO, "zk0 round %d/%d", 1, 3)
            log(WARNING, "configure_train: Sampled %s nodes (out of %s)", 0, 4)
    finally:
        console_handler.setStream(previous)
    shown = logs.ANSI.sub("", console.getvalue())
    assert "zk0 round 1/3" in shown and "Sampled 2 nodes" not in shown and "Sampled 0 nodes" in shown
    assert (tmp_path / logs.RUN_LOG).read_text().count("Sampled 2 nodes (out of 4)") == 2
