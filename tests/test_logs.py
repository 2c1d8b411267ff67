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
