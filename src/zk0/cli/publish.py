"""``zk0 push``: a run's checkpoint to the Hugging Face Hub (or, with ``--dry-run``, to a folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zk0.cli.common import fail


def push(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (zk0 simulate, zk0 run or a baseline).")],
    repo_id: Annotated[str, typer.Option(help="The Hub model repo, user/name (created if missing).")],
    round_: Annotated[str, typer.Option(
        "--round", help="Which checkpoint: a round number, last, or best (simulator success, else held-out MAE).")]
        = "last",
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Write what would be uploaded to RUN_DIR/push-ROUND and list it; contact nobody.")] = False,
) -> None:
    """Upload one checkpoint (weights, processors, model card) in one commit tagged fl-round-N and zk0-vX."""
    from zk0.hub import PushError, dry_run as write_dry_run, hub_token, plan_push, push as push_plan

    run_dir = run_dir.expanduser().resolve()
    try:
        plan = plan_push(run_dir, repo_id, round_, private)
        typer.echo(f"round {plan.server_round}: {plan.chosen_because}")
        if dry_run:
            out = run_dir / f"push-{plan.server_round}"
            files = write_dry_run(plan, out)
            typer.echo(f"would upload to {plan.repo_id} ({'private' if private else 'public'}), tags "
                       f"{', '.join(plan.tags)}, commit: {plan.commit_message}")
            for path in files:
                typer.echo(f"  {path}")
            typer.secho(f"written to {out}", fg=typer.colors.GREEN)
            return
        from huggingface_hub import HfApi

        push_plan(plan, HfApi(token=hub_token(Path.cwd())))
    except PushError as err:
        fail(err)
    typer.secho(f"pushed round {plan.server_round} to https://huggingface.co/{plan.repo_id}", fg=typer.colors.GREEN)
