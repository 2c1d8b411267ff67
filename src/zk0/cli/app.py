"""The ``zk0`` command: registers the commands that :mod:`zk0.cli`'s other modules define, nothing else."""

from __future__ import annotations

import typer

from zk0.cli import data, deploy, publish, runs, simulate, tools

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Federated SmolVLA training across private SO-100/SO-101 datasets (Flower + LeRobot).")


@app.callback()
def _root() -> None:
    """zk0: federated SmolVLA training (run `zk0 COMMAND --help`)."""


app.command()(simulate.simulate)
app.command()(tools.baseline)
app.command()(tools.compare)
app.command()(publish.push)
app.command()(tools.report)
app.add_typer(data.data_app, name="data")
app.command("eval")(data.evaluate)
app.add_typer(deploy.server_app, name="server")
app.add_typer(deploy.client_app, name="client")
app.command("run")(runs.submit)
app.command("status")(runs.status)
app.command("logs")(runs.logs)
app.command("stop")(runs.stop_run)


def main() -> None:
    """Entry point for ``python -m zk0``."""
    app()
