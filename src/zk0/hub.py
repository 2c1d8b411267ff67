"""Publishing a run's checkpoint on the Hugging Face Hub: which round, exactly what is uploaded, under which tags.

The token comes from ``HF_TOKEN``, a ``.env`` file in the working folder (python-dotenv, never loaded into
the environment), or the huggingface_hub login, and goes to huggingface_hub only: it never enters the run
folder, a log line or the card. Everything that talks to the Hub goes through one ``HfApi``-like object,
so tests put a recording fake at that boundary.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Protocol

from zk0.config import RunConfig
from zk0.tracking import read_metrics, round_summary

CHECKPOINTS = "checkpoints"


class PushError(RuntimeError):
    """A push that cannot go on; the message names the cause and the fix in one line."""


class HubApi(Protocol):
    """The part of ``huggingface_hub.HfApi`` a push uses."""

    def create_repo(self, repo_id: str, *, private: bool | None, exist_ok: bool) -> object: ...
    def upload_folder(self, *, repo_id: str, folder_path: str | Path, commit_message: str) -> object: ...
    def create_tag(self, repo_id: str, *, tag: str, tag_message: str | None, exist_ok: bool) -> None: ...


@dataclass(frozen=True)
class PushPlan:
    """One checkpoint folder bound for one repo: what ``zk0 push`` uploads, or writes with ``--dry-run``."""

    repo_id: str
    server_round: int
    folder: Path
    commit_message: str
    tags: tuple[str, ...]
    private: bool
    chosen_because: str


def checkpoint_rounds(run_dir: Path) -> list[int]:
    """Rounds with a complete checkpoint (weights written) in the run folder, ascending."""
    rounds = [int(path.parent.name.removeprefix("round_"))
              for path in (run_dir / CHECKPOINTS).glob("round_*/model.safetensors")]
    return sorted(rounds)


def best_round(records: list[dict], rounds: list[int]) -> tuple[int, str]:
    """The checkpointed round with the best recorded held-out result, and why.

    Closed-loop success decides where it was measured at a checkpointed round (offline error
    does not predict it); otherwise the lowest held-out action MAE over the clients' evaluations.
    """
    summaries = {r: round_summary(records, r) for r in rounds}
    success = {r: s["sim-success"] for r, s in summaries.items() if "sim-success" in s}
    if success:
        top = max(success, key=lambda r: (success[r], r))
        return top, f"best simulator success ({success[top]:.0%}) of the checkpointed rounds"
    mae = {r: s["client-eval-mae"] for r, s in summaries.items() if "client-eval-mae" in s}
    if mae:
        top = min(mae, key=lambda r: (mae[r], -r))
        return top, f"lowest held-out action MAE ({mae[top]:.3g}) of the checkpointed rounds"
    return rounds[-1], "no held-out metric was recorded: the last checkpointed round"


def plan_push(run_dir: Path, repo_id: str, round_spec: str, private: bool) -> PushPlan:
    """Choose the checkpoint (``round_spec``: a round number, ``last`` or ``best``) and what the commit says."""
    _check_repo_id(repo_id)
    rounds = checkpoint_rounds(run_dir)
    if not rounds:
        raise PushError(f"{run_dir} has no checkpoint (checkpoints/round_N/model.safetensors); push a run folder "
                        f"that completed a checkpoint round")
    records = read_metrics(run_dir / "metrics.jsonl")
    if round_spec == "best":
        chosen, why = best_round(records, rounds)
    elif round_spec == "last":
        chosen, why = rounds[-1], "the last checkpointed round"
    elif round_spec.isdigit() and int(round_spec) in rounds:
        chosen, why = int(round_spec), "the round asked for"
    else:
        choices = ", ".join(map(str, rounds))
        raise PushError(f"--round {round_spec}: choose best, last or a checkpointed round ({choices})")
    return PushPlan(repo_id, chosen, run_dir / CHECKPOINTS / f"round_{chosen}",
                    commit_message(run_dir, records, chosen), (f"fl-round-{chosen}", f"zk0-v{version('zk0')}"),
                    private, why)


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise PushError(f"--repo-id {repo_id!r} is not a Hub repo id; use user/name") from None
    if "/" not in repo_id:
        raise PushError(f"--repo-id {repo_id!r} needs the owner: user/name")


def commit_message(run_dir: Path, records: list[dict], server_round: int) -> str:
    """``zk0: fedprox round 5/5, 4 clients (red-pick, ...), held-out loss 0.41, MAE 4.2``: what the commit holds."""
    config = json.loads((run_dir / "config.json").read_text())["run-config"]
    summary = round_summary(records, server_round)
    trained = sorted({r["dataset"] for r in records if r.get("source") == "client" and "dataset" in r})
    held_out = (f", held-out loss {summary['client-eval-loss']:.4g}, MAE {summary['client-eval-mae']:.4g}"
                if "client-eval-mae" in summary else "")
    return (f"zk0: {config['strategy']} round {server_round}/{config['num-server-rounds']}, {len(trained)} clients "
            f"({', '.join(trained)}){held_out}")


def hub_token(workdir: Path) -> str | None:
    """``HF_TOKEN``, else ``HF_TOKEN`` of ``workdir/.env``, else the huggingface_hub login; None when none is set."""
    if token := os.environ.get("HF_TOKEN"):
        return token
    from dotenv import dotenv_values

    if (env_file := workdir / ".env").is_file() and (token := dotenv_values(env_file).get("HF_TOKEN")):
        return token
    from huggingface_hub import get_token

    return get_token()


def stage(plan: PushPlan, out: Path) -> list[Path]:
    """Write what is uploaded into ``out``: the checkpoint folder, its card saying which round this is and why.

    The card was written when the round was checkpointed; which round a push picks (``--round best``
    weighs every checkpointed round) is only known now, so it is added to the uploaded copy.
    """
    shutil.copytree(plan.folder, out)
    card = out / "README.md"
    if card.is_file():
        card.write_text(card.read_text().rstrip("\n") + f"\n\n## This upload\n\nRound {plan.server_round} of the "
                        f"run: {plan.chosen_because}.\n")
    return sorted(path.relative_to(out) for path in out.rglob("*") if path.is_file())


def dry_run(plan: PushPlan, out: Path) -> list[Path]:
    """Write exactly what :func:`push` would upload into ``out``; the files, relative to it."""
    if out.exists():
        raise PushError(f"{out} exists; remove it or give another --dry-run folder")
    return stage(plan, out)


def push(plan: PushPlan, api: HubApi) -> None:
    """Create the repo (or reuse it), upload the staged checkpoint folder in one commit, tag the round and zk0's
    version."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise PushError("HF_HUB_OFFLINE is set: the Hub is not reachable from here; unset it on a machine online, "
                        "or use --dry-run")
    try:
        with tempfile.TemporaryDirectory(prefix="zk0-push-") as staging:
            stage(plan, Path(staging) / "upload")
            api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
            api.upload_folder(repo_id=plan.repo_id, folder_path=Path(staging) / "upload",
                              commit_message=plan.commit_message)
        for tag in plan.tags:
            api.create_tag(plan.repo_id, tag=tag, tag_message=plan.commit_message, exist_ok=True)
    except Exception as err:  # noqa: BLE001 - network, auth and Hub errors all end the push with one line
        raise PushError(f"pushing to {plan.repo_id} failed: {_hub_reason(err)}") from None


def _hub_reason(err: Exception) -> str:
    """One short line for a Hub failure (no token, no URL with credentials, no traceback)."""
    name = type(err).__name__
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    if "401" in first or "Unauthorized" in first or name == "LocalTokenNotFoundError":
        return "the Hub refused the token (set HF_TOKEN, a .env file, or run `hf auth login`)"
    if name in ("ConnectError", "ConnectionError", "ConnectTimeout", "OfflineModeIsEnabled") or "resolve" in first:
        return "the Hub is not reachable from this machine; try again online, or use --dry-run"
    return f"{name}: {first}"


def skip_reason(num_server_rounds: int, checkpoint_interval: int) -> str | None:
    """Why a completed run with ``hf-repo-id`` set does not push (None: it pushes). A failed run never gets here."""
    if num_server_rounds < checkpoint_interval:
        return (f"num-server-rounds={num_server_rounds} < checkpoint-interval={checkpoint_interval}: "
                f"a short test run is not published")
    return None


def push_at_end(run_dir: Path, cfg: RunConfig, api: HubApi | None = None) -> str:
    """Push a completed run's last checkpoint to ``hf-repo-id`` (private); the one line to log either way.

    A push that fails loses nothing: the run folder stays, and ``zk0 push`` can try again.
    """
    repo_id = cfg.tracking.hf_repo_id
    if reason := skip_reason(cfg.federation.num_server_rounds, cfg.tracking.checkpoint_interval):
        return f"not pushed to {repo_id}: {reason}"
    try:
        plan = plan_push(run_dir, repo_id, "last", private=True)
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=hub_token(Path.cwd()))
        push(plan, api)
    except PushError as err:
        return f"not pushed to {repo_id}: {err} (the run folder is complete; retry with `zk0 push`)"
    return f"pushed round {plan.server_round} to https://huggingface.co/{repo_id} (private)"
